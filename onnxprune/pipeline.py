"""The pipeline: load -> normalize -> analyze -> plan -> rewrite -> check -> verify -> save.

Each stage lives on its floor (analysis, planning, rewrite, measure); ``run`` composes them and keeps
every intermediate result for the report in a ``Result``. Nothing is written here.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import onnx

from onnxprune.analysis.analyze import Analysis, barrier_summary
from onnxprune.analysis.analyze import analyze_model as _analyze
from onnxprune.analysis.contract import Registry
from onnxprune.analysis.shapes import Shapes
from onnxprune.handlers import REGISTRY
from onnxprune.measure.stats import ModelStats, model_stats
from onnxprune.measure.verify import DEFAULT_TOL, Verification, verify_plan
from onnxprune.planning.options import PlanOptions
from onnxprune.planning.plan import Plan, build_plan
from onnxprune.rewrite.check import apply_plan
from onnxprune.runtime.inputs import make_inputs

__all__ = ["Analysis", "Result", "analyze_model", "apply_plan", "barrier_summary", "build_plan", "run", "verify_plan"]

log = logging.getLogger(__name__)


def analyze_model(model: onnx.ModelProto | str, input_shapes: dict[str, tuple[int, ...]] | None = None,
                  head_mode: str = "dim", owned: bool | None = None, registry: Registry = REGISTRY,
                  input_arrays=None) -> Analysis:
    """The analysis with every handler of ``onnxprune.handlers`` (see ``analysis.analyze``)."""
    return _analyze(model, registry, input_shapes, head_mode=head_mode, owned=owned, input_arrays=input_arrays)


@dataclass
class Result:
    analysis: Analysis
    plan: Plan
    pruned: onnx.ModelProto
    pruned_shapes: Shapes
    before: ModelStats
    after: ModelStats
    verification: Verification | None = None
    timings: dict[str, float] = field(default_factory=dict)
    serialized: bytes | None = None  # the checked serialization of ``pruned`` (None: external data)

    def to_json(self) -> dict:
        cg = self.analysis.cg
        prunable, total = cg.coverage()
        return {
            "stats": {"original": self.before.to_json(), "pruned": self.after.to_json()},
            "coverage": {"prunable_channels": prunable, "channels": total},
            "groups": {"total": len(cg.groups), "pruned": len(self.plan.pruned()),
                       "frozen": len(self.plan.frozen)},
            "unknown_ops": {k: v[:5] for k, v in cg.unknown_ops.items()},
            "normalization": list(self.analysis.changes),
            "plan": self.plan.to_json(cg),
            "verification": self.verification.to_json() if self.verification else None,
            "timings_s": self.timings,
        }


def head_mode_for(opts: PlanOptions, plan_json: dict | None = None) -> str:
    """The analysis mode a run needs: whole heads for ``--head-ratio`` (or a plan made with it)."""
    if plan_json is not None:
        o = plan_json.get("options", {}) if isinstance(plan_json, dict) else {}
        o = o if isinstance(o, dict) else {}
        return "heads" if o.get("head_ratio") is not None else "dim"
    return opts.head_mode


def run(model: onnx.ModelProto | str, opts: PlanOptions, *, input_shapes=None, input_arrays=None,
        plan_json: dict | None = None, verify: bool = False, ep: str = "auto", tol: float = DEFAULT_TOL,
        analysis: Analysis | None = None) -> Result:
    """The whole pipeline. ``analysis``: one already made of this model in the mode this run needs
    (a target search made it), reused instead of analysing again."""
    t0 = time.perf_counter()
    opts.validate()
    mode = head_mode_for(opts, plan_json)
    if analysis is not None and analysis.cg.head_mode == mode:
        an = analysis
    else:
        an = analyze_model(model, input_shapes, head_mode=mode, input_arrays=input_arrays)
    t1 = time.perf_counter()
    plan = build_plan(an, opts, plan_json)
    t2 = time.perf_counter()
    pruned, new_shapes, data = apply_plan(an, plan, keep_bytes=True)
    t3 = time.perf_counter()
    before = model_stats(an.model, an.shapes, registry=an.registry)
    after = model_stats(pruned, new_shapes, registry=an.registry)
    res = Result(an, plan, pruned, new_shapes, before, after,
                 timings={"analyze": t1 - t0, "plan": t2 - t1, "rewrite_and_check": t3 - t2}, serialized=data)
    if verify:
        feeds = make_inputs(an.model, input_shapes, arrays=input_arrays)
        res.verification = verify_plan(an, plan, pruned, feeds, ep, tol)
        res.timings["verify"] = time.perf_counter() - t3
    return res
