"""Latency gate for stripe shrink mode (issue 12 item 3): is a conv's crop or split faster than the
dense masked conv it replaces?

Every planned conv is cut out as a *micro-model pair* (``rewrite.stripes.micro_pairs``: the dense
masked conv and its shrunk form, one input of the conv's input shape at ``batch``, equal outputs) and
the pair is timed interleaved with ``measure.latency.measure_runners``. The *rule*
(:func:`split_pays`): a conv changes physically only when the shrunk form's median is strictly below
the dense one's. :func:`gated` turns the timings into the ``split`` set of
``rewrite.stripes.shrink_stripes``::

    timings = gate_splits(model, plan, cg=cg)
    result = shrink_stripes(model, plan, cg, split=gated(timings))

A pair is timed in the form ``shrink_stripes`` builds when every conv may change. With a smaller
``split`` set a later conv of a reordered channel group may be built differently (the first split of
a group fixes its order), so its timing is then an estimate. Micro-models time one layer on its own:
what the neighbours do to caches and what the session fuses across layers (Conv+Relu) are not seen.

Not built yet: timing whole models per candidate set, choosing among box groupings by latency.
"""

from __future__ import annotations

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

    @property
    def pays(self) -> bool:
        """The rule: see :func:`split_pays`."""
        return split_pays(self.dense_ms, self.shrunk_ms)

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
                "macs_before": self.macs_before, "macs_after": self.macs_after, "reason": self.reason}


def split_pays(dense_ms: float | None, shrunk_ms: float | None) -> bool:
    """A crop or split is made only when the shrunk form's median is strictly below the dense one's
    (never when either was not timed)."""
    return dense_ms is not None and shrunk_ms is not None and shrunk_ms < dense_ms


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
                seed: int = 0) -> dict[str, SplitTiming]:
    """``{conv key: SplitTiming}`` for every planned conv: its micro-model pair timed interleaved on
    one random input (``seed``) on ``ep``; convs with nothing to shrink get an entry without timings.
    ``cg`` (the coupling graph of ``model``) lets multi-box convs be timed split rather than cropped."""
    rng = np.random.default_rng(seed)
    out: dict[str, SplitTiming] = {}
    for key, pair in micro_pairs(model, plan, cg, batch).items():
        out[key] = _time_pair(pair, rng, ep, threads, warmup, repeat)
    return out


def _time_pair(pair: MicroPair, rng: np.random.Generator, ep: str, threads: int | None, warmup: int,
               repeat: int) -> SplitTiming:
    rec = pair.record
    if pair.shrunk is None or pair.dense is None:
        why = rec.reason or "nothing to shrink"
        if pair.dense is None and rec.shrunk:
            why = "the conv's input shape is unknown: no micro-model"
        return SplitTiming(rec.key, form_of(rec), None, None, rec.macs_before, rec.macs_after, why)
    feeds = {pair.input_name: rng.standard_normal(pair.input_shape).astype(pair.dtype)}
    runners = [Runner(pair.dense, feeds, ep, threads), Runner(pair.shrunk, feeds, ep, threads)]
    dense, shrunk = measure_runners(runners, warmup=warmup, repeat=repeat)
    return SplitTiming(rec.key, form_of(rec), dense.median_ms, shrunk.median_ms, rec.macs_before, rec.macs_after,
                       rec.reason)
