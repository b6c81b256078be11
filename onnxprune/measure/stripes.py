"""Latency gate for stripe shrink mode (issue 12 item 3): is a conv's crop or split faster than the
dense masked conv it replaces?

Every planned conv is cut out as a *micro-model pair* (``rewrite.stripes.micro_pairs``: the dense
masked conv and its shrunk form, one input of the conv's input shape at ``batch``, equal outputs) and
the pair is timed interleaved with ``measure.latency.measure_runners``. The *verdict* (:func:`verdict`)
is a paired sign test over the interleaved runs (run i of the shrunk form against run i of the dense
one, both from the same round): ``faster`` or ``slower`` when the one-sided binomial tail is below
``ALPHA`` (``slower`` also needs the medians ``MIN_EFFECT`` apart), else ``tie``; a tie is timed
again (pooling the runs) up to ``MAX_ROUNDS`` times. The *rule* (:func:`makes`): a **split** (several convs and a Concat in place of one) is made only when it is
measured faster; a **crop** (one conv with a smaller kernel: strictly fewer MACs, the same node count)
is made unless it is measured slower, or when it is measured slower by an *immaterial* amount
(:func:`immaterial_crops`: the slowdowns of the crops so accepted add up, at every gated batch, to at
most ``CROP_SLACK`` of the whole model's latency there, measured once). Medians alone decided before: on a loaded 2-core machine the
micro-models of sub-millisecond depthwise convs tie, and half of the crops were refused by coin flips.
:func:`gated` turns the timings into the ``split`` set of ``rewrite.stripes.shrink_stripes``::

    timings = gate_splits(model, plan, cg=cg)
    result = shrink_stripes(model, plan, cg, split=gated(timings))

A pair is timed in the form ``shrink_stripes`` builds when every conv may change. With a smaller
``split`` set a later conv of a reordered channel group may be built differently (the first split of
a group fixes its order), so its timing is then an estimate. Micro-models time one layer on its own:
what the neighbours do to caches and what the session fuses across layers (Conv+Relu) are not seen.

Not built yet: timing whole models per candidate set, choosing among box groupings by latency.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx

from onnxprune.analysis.coupling import CouplingGraph
from onnxprune.measure.latency import Runner, measure_runners
from onnxprune.planning.stripes import StripePlan
from onnxprune.rewrite.stripes import MicroPair, ShrunkConv, micro_pairs


@dataclass(frozen=True)
class SplitTiming:
    """Median latency (ms) of one conv's dense and shrunk micro-models; None where nothing was
    timed (``reason`` says why). ``form``: what the shrunk model is (``dense``, ``crop 2x3``,
    ``split 3``)."""

    key: str
    form: str
    dense_ms: float | None
    shrunk_ms: float | None
    macs_before: int | None = None
    macs_after: int | None = None
    reason: str | None = None
    #: ``faster`` / ``slower`` / ``tie`` from the paired sign test (None: only medians are known).
    verdict: str | None = None
    #: Timing rounds (a tie is timed again) and the paired runs the verdict rests on.
    rounds: int = 0
    pairs: int = 0
    #: A crop measured slower but made anyway (:func:`immaterial_crops`): what it costs, per batch.
    immaterial: str | None = None

    @property
    def pays(self) -> bool:
        """Whether the rule lets this conv change: :func:`makes` with the verdict, or
        :func:`split_pays` on the medians where no verdict was taken; an immaterial crop does."""
        if self.immaterial is not None:
            return True
        if self.verdict is None:
            return split_pays(self.dense_ms, self.shrunk_ms)
        return makes(self.form, self.verdict)

    @property
    def gain_ms(self) -> float | None:
        if self.dense_ms is None or self.shrunk_ms is None:
            return None
        return self.dense_ms - self.shrunk_ms

    @property
    def speedup(self) -> float | None:
        if self.dense_ms is None or not self.shrunk_ms:
            return None
        return self.dense_ms / self.shrunk_ms

    def to_json(self) -> dict:
        return {"key": self.key, "form": self.form, "dense_ms": self.dense_ms, "shrunk_ms": self.shrunk_ms,
                "gain_ms": self.gain_ms, "speedup": self.speedup, "pays": self.pays,
                "macs_before": self.macs_before, "macs_after": self.macs_after, "reason": self.reason,
                "verdict": self.verdict, "rounds": self.rounds, "pairs": self.pairs, "immaterial": self.immaterial}


def split_pays(dense_ms: float | None, shrunk_ms: float | None) -> bool:
    """A crop or split is made only when the shrunk form's median is strictly below the dense one's
    (never when either was not timed)."""
    return dense_ms is not None and shrunk_ms is not None and shrunk_ms < dense_ms


#: One-sided significance of the paired sign test; a tie is re-timed up to MAX_ROUNDS rounds in all.
ALPHA = 0.01
MAX_ROUNDS = 3
#: A shrunk form is "slower" only when its median is at least this share above the dense one's.
MIN_EFFECT = 0.05


def sign_tail(k: int, n: int) -> float:
    """P(X >= k) for X ~ Binomial(n, 1/2)."""
    return sum(math.comb(n, i) for i in range(k, n + 1)) / 2.0 ** n if n else 1.0


def verdict(dense_ms: list[float], shrunk_ms: list[float], alpha: float = ALPHA,
            min_effect: float = MIN_EFFECT) -> str:
    """``faster`` / ``slower`` / ``tie`` for the shrunk form, by a paired sign test over runs taken
    side by side (equal pairs are dropped); ``slower`` also needs the shrunk median ``min_effect``
    above the dense one, so that a crop (fewer MACs) is not refused for a consistent 1% that the
    whole model cannot show."""
    m = min(len(dense_ms), len(shrunk_ms))
    d, s = np.asarray(dense_ms[:m]), np.asarray(shrunk_ms[:m])
    wins, losses = int(np.sum(s < d)), int(np.sum(s > d))
    n = wins + losses
    if sign_tail(wins, n) < alpha:
        return "faster"
    if sign_tail(losses, n) < alpha and np.median(s) >= (1.0 + min_effect) * np.median(d):
        return "slower"
    return "tie"


def makes(form: str, verdict_: str) -> bool:
    """The rule: a split only when measured faster, a crop unless measured slower, nothing else."""
    if form.startswith("split"):
        return verdict_ == "faster"
    if form.startswith("crop"):
        return verdict_ != "slower"
    return False


#: Crops measured slower are made while their slowdowns, summed, stay within this share of the whole
#: model's latency at every gated batch (a 0.02 ms loss on a 43 ms model is not worth 7x7 -> 6x4).
CROP_SLACK = 0.01


def immaterial_crops(per_batch: Mapping[int, Mapping[str, SplitTiming]], model_ms: Mapping[int, float],
                     slack: float = CROP_SLACK) -> dict[str, str]:
    """The crops the rule refused (measured slower at some batch of ``per_batch``: {batch: {conv key:
    timing}}) that are made after all, with why: taken in order of MACs saved per share of the model's
    latency lost (the worst batch), each while the summed losses (shrunk median minus dense median,
    where positive) at every batch stay within ``slack`` x ``model_ms`` there (the whole model's median,
    ms). A crop not timed at every batch, a split, or a batch without a model latency: never."""
    if not per_batch or any(not (model_ms.get(b) or 0) > 0 for b in per_batch):
        return {}
    keys = set.intersection(*(set(t) for t in per_batch.values()))
    loss: dict[str, dict[int, float]] = {}
    for k in keys:
        ts = [per_batch[b][k] for b in per_batch]
        if not ts[0].form.startswith("crop") or all(t.pays for t in ts) or \
                any(t.dense_ms is None or t.shrunk_ms is None for t in ts):
            continue
        loss[k] = {b: max(0.0, per_batch[b][k].shrunk_ms - per_batch[b][k].dense_ms) for b in per_batch}

    def worth(k: str) -> float:
        t = next(iter(per_batch.values()))[k]
        saved = float((t.macs_before or 0) - (t.macs_after or 0))
        worst = max(loss[k][b] / model_ms[b] for b in per_batch)
        return saved / max(worst, 1e-12)

    used = dict.fromkeys(per_batch, 0.0)
    out: dict[str, str] = {}
    for k in sorted(loss, key=lambda k: (-worth(k), k)):
        if all(used[b] + loss[k][b] <= slack * model_ms[b] for b in per_batch):
            for b in per_batch:
                used[b] += loss[k][b]
            out[k] = ", ".join(f"+{loss[k][b]:.3f} ms at batch {b} ({100 * loss[k][b] / model_ms[b]:.2f}% of the "
                               f"model's {model_ms[b]:.1f} ms)" for b in sorted(per_batch))
    return out


def gated(timings: dict[str, SplitTiming]) -> set[str]:
    """The conv keys the rule lets change: the ``split`` set for ``shrink_stripes``."""
    return {k for k, t in timings.items() if t.pays}


def form_of(rec: ShrunkConv) -> str:
    if rec.split:
        return f"split {len(rec.built)}"
    if rec.shrunk:
        kh, kw = rec.built[0].kernel
        return f"crop {kh}x{kw}"
    return "dense"


def gate_splits(model: onnx.ModelProto, plan: StripePlan, ep: str = "auto", threads: int | None = None,
                batch: int = 1, repeat: int = 30, *, cg: CouplingGraph | None = None, warmup: int = 5,
                seed: int = 0, max_rounds: int = MAX_ROUNDS) -> dict[str, SplitTiming]:
    """``{conv key: SplitTiming}`` for every planned conv: its micro-model pair timed interleaved on
    one random input (``seed``) on ``ep``, ``repeat`` paired runs a round, a tie re-timed up to
    ``max_rounds`` rounds; convs with nothing to shrink get an entry without timings.
    ``cg`` (the coupling graph of ``model``) lets multi-box convs be timed split rather than cropped."""
    rng = np.random.default_rng(seed)
    out: dict[str, SplitTiming] = {}
    for key, pair in micro_pairs(model, plan, cg, batch).items():
        out[key] = _time_pair(pair, rng, ep, threads, warmup, repeat, max_rounds)
    return out


def _time_pair(pair: MicroPair, rng: np.random.Generator, ep: str, threads: int | None, warmup: int,
               repeat: int, max_rounds: int = MAX_ROUNDS) -> SplitTiming:
    rec = pair.record
    if pair.shrunk is None or pair.dense is None:
        why = rec.reason or "nothing to shrink"
        if pair.dense is None and rec.shrunk:
            why = "the conv's input shape is unknown: no micro-model"
        return SplitTiming(rec.key, form_of(rec), None, None, rec.macs_before, rec.macs_after, why)
    feeds = {pair.input_name: rng.standard_normal(pair.input_shape).astype(pair.dtype)}
    runners = [Runner(pair.dense, feeds, ep, threads), Runner(pair.shrunk, feeds, ep, threads)]
    d_ms: list[float] = []
    s_ms: list[float] = []
    rounds, call = 0, "tie"
    while call == "tie" and rounds < max(1, max_rounds):
        dense, shrunk = measure_runners(runners, warmup=warmup if rounds == 0 else 1, repeat=repeat)
        d_ms += dense.samples_ms
        s_ms += shrunk.samples_ms
        rounds += 1
        call = verdict(d_ms, s_ms)
    return SplitTiming(rec.key, form_of(rec), float(np.median(d_ms)), float(np.median(s_ms)), rec.macs_before,
                       rec.macs_after, rec.reason, verdict=call, rounds=rounds, pairs=min(len(d_ms), len(s_ms)))
