"""Pruning to a target: ``--target-macs F`` / ``--target-latency F`` / ``--target-fidelity F`` on ``prune``.

Both search the uniform ratio (``--ratio``; ``--layer-ratio`` groups keep theirs) for the smallest one
whose pruned model meets every given target: MACs <= F x original, and/or latency measured on the
chosen execution provider (interleaved with the original, ratio of medians) <= F x original. The
search is a bisection over [0, 0.95]; every ratio is evaluated at most once (cache per ratio), and
ratios that give the same plan (the same kept-unit count in every group) share one measurement.
MACs fall in small steps as the ratio grows (every group removes floor(units x ratio)), so the MAC
target lands just below F: within a fraction of a percent on ResNets.

``--target-fidelity F`` (``FidelitySearch``) looks the other way: the *largest* ratio whose held-out
fidelity (``measure.fidelity.score``: top-1 agreement or mean cosine, worst output) stays >= F.
An evaluation there is a whole data-aware run (plan, compensation, rewrite, held-out fidelity), which
the caller supplies as ``trial(ratio)`` (``pipeline.run`` and ``pipeline.measure_holdout`` sit above
this floor): the activations (or gradients) the plan is scored on are captured once, by the caller, and only the
compensation and the fidelity pass repeat per ratio. Fidelity is not monotone in the ratio, so the
bisection keeps every evaluation and returns the largest evaluated ratio that meets F (bisection
moves up only from a ratio that meets it, so that is where it ends); the ratio one step
(``FIDELITY_TOL``) above it was evaluated and failed, unless the search reached ``MAX_RATIO``. Ratios
whose plans keep the same units share one evaluation. With ``--target-macs`` too, the MAC target is a
cap: the search starts at the smallest ratio meeting it (``RatioSearch``), every result must meet it
and F, and a UserError says so when the ratio at the cap already loses F.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import onnx

from onnxprune.analysis.analyze import Analysis
from onnxprune.errors import UserError
from onnxprune.measure.fidelity import METRICS, Fidelity, score
from onnxprune.measure.latency import Runner, measure_runners
from onnxprune.measure.stats import ModelStats, model_stats
from onnxprune.planning.data_importance import Activations
from onnxprune.planning.options import PlanOptions
from onnxprune.planning.plan import Plan, build_plan
from onnxprune.rewrite.check import apply_plan
from onnxprune.runtime.inputs import make_inputs

log = logging.getLogger(__name__)

MAX_RATIO = 0.95
MACS_TOL = 1 / 1024  # bisection stops when the ratio interval is this narrow
LATENCY_TOL = 1 / 64
FIDELITY_TOL = 1 / 64  # each step compensates and measures: 6-7 evaluations from [0, MAX_RATIO]
SELECTION_NOTE = ("the held-out share chose this ratio (the largest of several that kept the target there), so "
                  "its fidelity there is an optimistic estimate; judge the model on data it has not seen")


@dataclass
class Evaluation:
    ratio: float
    macs: int
    params: int
    mac_ratio: float  # pruned / original
    signature: tuple = field(repr=False, default=())
    latency_ms: float | None = None
    original_ms: float | None = None

    @property
    def latency_ratio(self) -> float | None:
        if self.latency_ms is None or not self.original_ms:
            return None
        return self.latency_ms / self.original_ms

    def to_json(self) -> dict:
        return {"ratio": self.ratio, "macs": self.macs, "params": self.params, "mac_ratio": self.mac_ratio,
                "latency_ms": self.latency_ms, "original_latency_ms": self.original_ms,
                "latency_ratio": self.latency_ratio}


@dataclass
class TargetResult:
    ratio: float
    target_macs: float | None
    target_latency: float | None
    chosen: Evaluation
    evaluations: list[Evaluation]
    ep: str | None = None
    round_to: int = 1

    def to_json(self) -> dict:
        return {"ratio": self.ratio, "target_macs": self.target_macs, "target_latency": self.target_latency,
                "ep": self.ep, "round_to": self.round_to, "chosen": self.chosen.to_json(),
                "evaluations": [e.to_json() for e in sorted(self.evaluations, key=lambda e: e.ratio)]}

    def summary(self) -> str:
        parts = []
        if self.target_macs is not None:
            parts.append(f"MACs <= {self.target_macs:g}x")
        if self.target_latency is not None:
            parts.append(f"latency <= {self.target_latency:g}x ({self.ep})")
        got = f"MACs {self.chosen.mac_ratio:.3f}x"
        if self.chosen.latency_ratio is not None:
            got += f", latency {self.chosen.latency_ratio:.3f}x"
        return (f"target {' and '.join(parts)} of the original: ratio {self.ratio:.4f} "
                f"({got}; {len(self.evaluations)} ratios evaluated)")


def prune_at(an: Analysis, opts: PlanOptions, ratio: float, activations: Activations | None = None,
             gradients=None):
    """Plan and rewrite at ``ratio`` (everything else from ``opts``; ``activations`` for a data-aware
    importance, ``gradients`` (``pipeline.gradient_scores_for``) for a gradient one): (pruned, shapes, plan)."""
    o = dataclasses.replace(opts, ratio=float(ratio))
    plan = build_plan(an, o, None, activations, gradients)
    pruned, shapes = apply_plan(an, plan)
    return pruned, shapes, plan


def plan_signature(plan) -> tuple:
    """Kept-unit counts per group: plans with equal signatures have equal MACs and latency."""
    return tuple(sorted((gid, len(gp.keep)) for gid, gp in plan.groups.items()))


def plan_identity(plan) -> tuple:
    """The kept units themselves: plans with equal identities are the same model."""
    return tuple(sorted((gid, tuple(int(k) for k in gp.keep)) for gid, gp in plan.groups.items()))


class RatioSearch:
    """Evaluates ratios (cached) and bisects for the smallest one meeting the targets."""

    def __init__(self, an, opts, *, target_macs: float | None = None, target_latency: float | None = None,
                 ep: str = "auto", threads: int | None = None, batch: int = 1, input_shapes=None,
                 warmup: int = 3, repeat: int = 20, progress=None, activations: Activations | None = None,
                 gradients=None):
        if target_macs is None and target_latency is None:
            raise UserError("no target given (--target-macs or --target-latency)")
        for name, f in (("--target-macs", target_macs), ("--target-latency", target_latency)):
            if f is not None and not 0.0 < f:
                raise UserError(f"{name} must be > 0, got {f}")
        self.an, self.opts = an, opts
        self.target_macs, self.target_latency = target_macs, target_latency
        self.ep, self.threads, self.batch = ep, threads, batch
        self.input_shapes = input_shapes
        self.warmup, self.repeat = warmup, repeat
        self.progress = progress
        self.activations = activations
        self.gradients = gradients  # a gradient criterion's scores: collected once, planned at every ratio
        self.base = model_stats(an.model, an.shapes, registry=an.registry)
        self.cache: dict[float, Evaluation] = {}
        self.by_signature: dict[tuple, Evaluation] = {}
        self._original_runner = None
        self._feeds = None

    # -- evaluation -----------------------------------------------------------------------------
    def _runner_for_original(self):
        if self._original_runner is None:
            self._feeds = make_inputs(self.an.model, self._batch_shapes(), batch=self.batch)
            self._original_runner = Runner(self.an.model, self._feeds, self.ep, self.threads)
        return self._original_runner

    def _batch_shapes(self):
        return dict(self.input_shapes or {})

    def evaluate(self, ratio: float) -> Evaluation:
        key = round(float(ratio), 6)
        if key in self.cache:
            return self.cache[key]
        if key == 0.0:
            pruned, sig = self.an.model, ()
            macs, params = self.base.macs, self.base.params
        else:
            pruned, shapes, plan = prune_at(self.an, self.opts, key, self.activations, self.gradients)
            sig = plan_signature(plan)
            known = self.by_signature.get(sig)
            if known is not None:
                ev = dataclasses.replace(known, ratio=key)
                self.cache[key] = ev
                return ev
            st = model_stats(pruned, shapes, registry=self.an.registry)
            macs, params = st.macs, st.params
        ev = Evaluation(key, macs, params, macs / self.base.macs if self.base.macs else 1.0, sig)
        if self.target_latency is not None and (self.target_macs is None or self._macs_ok(ev)):
            self._measure(ev, pruned)
        self.cache[key] = ev
        self.by_signature.setdefault(sig, ev)
        if self.progress is not None:
            self.progress(ev)
        return ev

    def _measure(self, ev: Evaluation, pruned: onnx.ModelProto) -> None:
        orig = self._runner_for_original()
        other = Runner(pruned, self._feeds, self.ep, self.threads)
        lo, lp = measure_runners([orig, other], self.warmup, self.repeat)
        ev.original_ms, ev.latency_ms = lo.median_ms, lp.median_ms

    def _macs_ok(self, ev: Evaluation) -> bool:
        return self.target_macs is None or ev.mac_ratio <= self.target_macs

    def ok(self, ev: Evaluation) -> bool:
        if not self._macs_ok(ev):
            return False
        if self.target_latency is not None:
            return ev.latency_ratio is not None and ev.latency_ratio <= self.target_latency
        return True

    # -- search ---------------------------------------------------------------------------------
    def search(self, hi: float = MAX_RATIO) -> TargetResult:
        tol = LATENCY_TOL if self.target_latency is not None else MACS_TOL
        lo_ev = self.evaluate(0.0)
        if self.ok(lo_ev):
            return self._result(lo_ev)
        hi_ev = self.evaluate(hi)
        if not self.ok(hi_ev):
            got = f"MACs {hi_ev.mac_ratio:.3f}x"
            if hi_ev.latency_ratio is not None:
                got += f", latency {hi_ev.latency_ratio:.3f}x"
            raise UserError(f"target not reachable: at ratio {hi} the pruned model has {got} of the original "
                            f"(frozen groups and --layer-ratio/--ignore keep the rest)")
        lo = 0.0
        while hi - lo > tol:
            mid = (lo + hi) / 2
            ev = self.evaluate(mid)
            if self.ok(ev):
                hi, hi_ev = mid, ev
            else:
                lo = mid
        return self._result(hi_ev)

    def _result(self, ev: Evaluation) -> TargetResult:
        return TargetResult(ev.ratio, self.target_macs, self.target_latency, ev, list(self.cache.values()),
                            self.ep if self.target_latency is not None else None, int(self.opts.round_to))


# ----------------------------------------------------------------------------------------------
# --target-fidelity


class Trial(Protocol):
    """What one data-aware run at a ratio gives (``pipeline.Result`` after ``measure_holdout``)."""

    plan: Plan
    pruned: onnx.ModelProto
    before: ModelStats
    after: ModelStats
    fidelity: Fidelity | None


@dataclass
class FidelityEvaluation:
    ratio: float
    macs: int
    params: int
    mac_ratio: float  # pruned / original
    value: float  # the metric (worst output) on the held-out share
    meets: bool  # value >= the target (and MACs within the cap, when there is one)
    summary: dict  # Fidelity.summary(): every metric, worst output
    seconds: float  # the trial's wall time (0 when it shares an earlier ratio's plan)
    pruned_groups: int
    same_plan_as: float | None = None  # an earlier ratio whose plan keeps the same units
    identity: tuple = field(repr=False, default=())

    def to_json(self) -> dict:
        return {"ratio": self.ratio, "macs": self.macs, "params": self.params, "mac_ratio": self.mac_ratio,
                "value": self.value, "meets": self.meets, "fidelity": self.summary, "seconds": self.seconds,
                "pruned_groups": self.pruned_groups, "same_plan_as": self.same_plan_as}


@dataclass
class FidelityTargetResult:
    ratio: float
    target: float
    metric: str
    target_macs: float | None
    chosen: FidelityEvaluation
    evaluations: list[FidelityEvaluation]
    reached_max: bool  # MAX_RATIO itself keeps the target: nothing larger was searched
    cap: TargetResult | None = None  # the --target-macs search that set the smallest ratio
    round_to: int = 1
    seconds: float = 0.0

    def to_json(self) -> dict:
        return {"ratio": self.ratio, "target_fidelity": self.target, "metric": self.metric,
                "target_macs": self.target_macs, "round_to": self.round_to, "reached_max_ratio": self.reached_max,
                "max_ratio": MAX_RATIO, "step": FIDELITY_TOL, "seconds": self.seconds, "note": SELECTION_NOTE,
                "chosen": self.chosen.to_json(), "mac_cap": self.cap.to_json() if self.cap is not None else None,
                "evaluations": [e.to_json() for e in sorted(self.evaluations, key=lambda e: e.ratio)]}

    def summary(self) -> str:
        goal = f"held-out {self.metric} >= {self.target:g}"
        if self.target_macs is not None:
            goal += f" with MACs <= {self.target_macs:g}x"
        evs = "; ".join(evaluation_line(e) for e in sorted(self.evaluations, key=lambda e: e.ratio))
        top = ", the largest searched" if self.reached_max else ""
        return (f"target {goal}: ratio {self.ratio:.4f}{top} (MACs {self.chosen.mac_ratio:.3f}x, {self.metric} "
                f"{self.chosen.value:.4f}); {len(self.evaluations)} ratios evaluated: {evs}")


def evaluation_line(e: FidelityEvaluation) -> str:
    same = f", plan of {e.same_plan_as:.4f}" if e.same_plan_as is not None else ""
    return f"{e.ratio:.4f} -> MACs {e.mac_ratio:.3f}x, {e.value:.4f} {'meets' if e.meets else 'fails'}{same}"


class FidelitySearch:
    """Bisects for the largest ratio whose held-out fidelity (``metric``) stays >= ``target``
    (module docstring). ``trial(ratio)`` runs the pipeline at that ratio (compensation included) and
    measures the held-out fidelity; ``activations`` are the ones the trial scores units on (to tell
    ratios with the same plan apart before running them). ``best`` holds the chosen ratio's trial."""

    def __init__(self, an: Analysis, opts: PlanOptions, trial: Callable[[float], Trial], *, target: float,
                 metric: str, target_macs: float | None = None, activations: Activations | None = None,
                 progress: Callable[[FidelityEvaluation], None] | None = None, hi: float = MAX_RATIO,
                 tol: float = FIDELITY_TOL, gradients=None):
        if not 0.0 < target <= 1.0:
            raise UserError(f"--target-fidelity must be in (0, 1], got {target:g}")
        if target_macs is not None and not 0.0 < target_macs:
            raise UserError(f"--target-macs must be > 0, got {target_macs}")
        if metric not in METRICS:
            raise UserError(f"--metric must be one of {', '.join(METRICS)}, got {metric!r}")
        self.an, self.opts, self.trial = an, opts, trial
        self.target, self.metric, self.target_macs = target, metric, target_macs
        self.activations, self.progress = activations, progress
        self.gradients = gradients  # a gradient criterion's scores, the ones the trial plans on
        self.hi, self.tol = hi, tol
        self.cache: dict[float, FidelityEvaluation] = {}
        self.by_identity: dict[tuple, FidelityEvaluation] = {}
        self.best: Trial | None = None
        self._best_ev: FidelityEvaluation | None = None

    def evaluate(self, ratio: float) -> FidelityEvaluation:
        key = round(float(ratio), 6)
        if key in self.cache:
            return self.cache[key]
        plan = build_plan(self.an, dataclasses.replace(self.opts, ratio=key), None, self.activations, self.gradients)
        ident = plan_identity(plan)
        known = self.by_identity.get(ident)
        if known is not None:
            ev = dataclasses.replace(known, ratio=key, seconds=0.0, same_plan_as=known.same_plan_as or known.ratio)
        else:
            t0 = time.perf_counter()
            res = self.trial(key)
            if res.fidelity is None:
                raise ValueError("the trial measured no held-out fidelity")
            value = score(res.fidelity, self.metric)
            if value is None:
                raise UserError(f"--metric {self.metric}: the model has no classifier-shaped output; use --metric cosine")
            base = res.before.macs
            mac_ratio = res.after.macs / base if base else 1.0
            meets = value >= self.target and (self.target_macs is None or mac_ratio <= self.target_macs)
            ev = FidelityEvaluation(key, res.after.macs, res.after.params, mac_ratio, float(value), meets,
                                    res.fidelity.summary(), time.perf_counter() - t0, len(res.plan.pruned()),
                                    identity=ident)
            self.by_identity[ident] = ev
            if self._better(ev):
                self.best = res  # only the chosen ratio's model stays in memory
        if self._better(ev):
            self._best_ev = ev
        self.cache[key] = ev
        if self.progress is not None:
            self.progress(ev)
        return ev

    def _better(self, ev: FidelityEvaluation) -> bool:
        """A candidate (meets the target and removes something) above the best so far."""
        return ev.meets and ev.pruned_groups > 0 and (self._best_ev is None or ev.ratio > self._best_ev.ratio)

    def _cap(self) -> TargetResult | None:
        if self.target_macs is None:
            return None
        return RatioSearch(self.an, self.opts, target_macs=self.target_macs, activations=self.activations,
                           gradients=self.gradients).search()

    def search(self) -> FidelityTargetResult:
        t0 = time.perf_counter()
        cap = self._cap()
        lo, hi = (cap.ratio if cap is not None else 0.0), self.hi
        if cap is not None and lo > 0.0:
            at_cap = self.evaluate(lo)
            if not at_cap.meets:
                raise UserError(f"--target-fidelity {self.target:g} cannot hold with --target-macs {self.target_macs:g}: "
                                f"at ratio {lo:.4f}, the smallest cut meeting the MAC target (MACs "
                                f"{at_cap.mac_ratio:.3f}x), held-out {self.metric} is {at_cap.value:.4f}; lower "
                                "--target-fidelity or raise --target-macs")
        while hi - lo > self.tol:  # hi is taken to fail until it is evaluated (below)
            mid = (lo + hi) / 2
            if self.evaluate(mid).meets:
                lo = mid
            else:
                hi = mid
        if hi == self.hi:  # everything below the top met the target: try the top itself
            self.evaluate(hi)
        chosen = self._best_ev
        if chosen is None:
            cuts = [e for e in self.cache.values() if e.pruned_groups > 0] or list(self.cache.values())
            smallest = min(cuts, key=lambda e: e.ratio)
            raise UserError(f"--target-fidelity {self.target:g} not reachable: the smallest cut evaluated (ratio "
                            f"{smallest.ratio:.4f}, MACs {smallest.mac_ratio:.3f}x) keeps held-out {self.metric} "
                            f"{smallest.value:.4f} (no evaluated ratio that removes units keeps it); lower --target-fidelity")
        if self.best is None or plan_identity(self.best.plan) != chosen.identity:
            raise AssertionError("the chosen ratio's trial was not kept")
        return FidelityTargetResult(chosen.ratio, self.target, self.metric, self.target_macs, chosen,
                                    list(self.cache.values()), chosen.ratio >= self.hi, cap, int(self.opts.round_to),
                                    time.perf_counter() - t0)
