"""The pipeline: load -> normalize -> analyze -> plan -> rewrite -> check -> verify -> save.

Each stage is a small function; ``Pruning`` runs them and keeps every intermediate result for the
report. Nothing is written unless every stage passed.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import onnx

from onnxprune import model as io
from onnxprune.coupling import CouplingGraph, analyze
from onnxprune.errors import NothingToPrune, RewriteError
from onnxprune.normalize import fold_static_shapes, normalize
from onnxprune.plan import Plan, PlanOptions, make_plan
from onnxprune.rewrite import check_shapes, rewrite
from onnxprune.stats import ModelStats, model_stats
from onnxprune.verify import DEFAULT_TOL, Verification, compare, masked_original

log = logging.getLogger(__name__)


@dataclass
class Analysis:
    model: onnx.ModelProto  # normalized original
    shapes: io.Shapes
    cg: CouplingGraph
    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    seconds: float = 0.0


def analyze_model(model: onnx.ModelProto | str, input_shapes: dict[str, tuple[int, ...]] | None = None,
                  head_mode: str = "dim", owned: bool | None = None) -> Analysis:
    """``owned``: the caller hands the ModelProto over (it may be normalized in place); a path is
    always loaded and owned here."""
    t0 = time.perf_counter()
    owned = (not isinstance(model, onnx.ModelProto)) or bool(owned)
    if not isinstance(model, onnx.ModelProto):
        model = io.load(model)
    else:
        io.check_opset(model)
    model = fold_static_shapes(normalize(model, inplace=owned), input_shapes)
    shapes = io.infer_shapes(model, input_shapes)
    consts = io.ConstantTable.of(model.graph)
    cg = analyze(model, shapes, consts, head_mode=head_mode)
    return Analysis(model, shapes, cg, dict(input_shapes or {}), time.perf_counter() - t0)


def barrier_summary(cg: CouplingGraph, limit: int = 8) -> list[str]:
    reasons: dict[str, int] = {}
    for g in cg.groups:
        if g.frozen:
            reasons[g.frozen[0]] = reasons.get(g.frozen[0], 0) + 1
    return [f"{r} ({n} group{'s' if n > 1 else ''})" for r, n in sorted(reasons.items(), key=lambda x: -x[1])][:limit]


@dataclass
class Result:
    analysis: Analysis
    plan: Plan
    pruned: onnx.ModelProto
    pruned_shapes: io.Shapes
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
            "plan": self.plan.to_json(cg),
            "verification": self.verification.to_json() if self.verification else None,
            "timings_s": self.timings,
        }


def build_plan(an: Analysis, opts: PlanOptions, plan_json: dict | None = None) -> Plan:
    if plan_json is not None:
        return Plan.from_json(plan_json, an.cg)
    plan = make_plan(an.cg, opts)
    if not plan.groups:
        lines = barrier_summary(an.cg)
        raise NothingToPrune("nothing to prune: every group is frozen: " + "; ".join(lines))
    return plan


def apply_plan(an: Analysis, plan: Plan, keep_bytes: bool = False):
    """Rewrite and check: (pruned model, its shapes), plus the checked serialization with
    ``keep_bytes`` (pass it to ``save_atomic(data=...)`` to save without serializing again)."""
    pruned = rewrite(an.model, an.cg, plan)
    try:
        data = full_check(pruned)
    except Exception as exc:  # noqa: BLE001
        raise RewriteError(f"pruned model fails the ONNX checker: {str(exc).splitlines()[0][:300]}") from None
    new_shapes = io.infer_shapes(pruned, an.input_shapes)
    check_shapes(pruned, an.cg, plan, new_shapes)
    return (pruned, new_shapes, data) if keep_bytes else (pruned, new_shapes)


def full_check(model: onnx.ModelProto) -> bytes | None:
    """onnx.checker with full_check; models with external data are checked as saved files.

    Returns the serialized model that was checked (None for external data), so that saving it
    does not serialize it again."""
    if not io.has_external(model) and io.approx_bytes(model) < io.LARGE_BYTES:
        # full_check = the structural check + strict, type-checking shape inference; the latter only
        # needs the weights' types and dims, so it runs on a weightless copy (one serialization less)
        data = model.SerializeToString()
        onnx.checker.check_model(data)
        onnx.shape_inference.infer_shapes(io.weightless(model), check_type=True, strict_mode=True)
        return data
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory(prefix="onnxprune-check-") as d:
        path = Path(d) / "model.onnx"
        io.save_atomic(model, path, external=True)
        onnx.checker.check_model(str(path), full_check=True)
    return None


def verify_plan(an: Analysis, plan: Plan, pruned: onnx.ModelProto, feeds: dict[str, np.ndarray],
                ep: str = "auto", tol: float = DEFAULT_TOL) -> Verification:
    """P vs masked original. Approximate groups change the function: they are checked for
    fidelity only, and the exact groups are verified on a model pruned by the exact part alone."""
    approx = [gp for gp in plan.pruned() if gp.approximate]
    if not approx:
        return compare(an.model, masked_original(an.model, an.cg, plan), pruned, feeds, ep, tol)
    exact = plan.exact_only()
    p_exact = rewrite(an.model, an.cg, exact) if exact.pruned() else an.model
    v = compare(an.model, masked_original(an.model, an.cg, exact), p_exact, feeds, ep, tol)
    full = compare(an.model, an.model, pruned, feeds, ep, float("inf"))
    for o, f in zip(v.outputs, full.outputs, strict=True):
        o.fidelity = f.fidelity
        o.shape = f.shape
    v.exact = False
    v.note = (f"{len(approx)} approximate group(s) pruned: exact groups verified against the masked "
              f"original; fidelity is that of the full pruned model")
    return v


def run(model: onnx.ModelProto | str, opts: PlanOptions, *, input_shapes=None, input_arrays=None,
        plan_json: dict | None = None, verify: bool = False, ep: str = "auto", tol: float = DEFAULT_TOL) -> Result:
    t0 = time.perf_counter()
    opts.validate()
    mode = opts.head_mode
    if plan_json is not None:
        o = plan_json.get("options", {}) if isinstance(plan_json, dict) else {}
        mode = "heads" if o.get("head_ratio") is not None else "dim"
    an = analyze_model(model, input_shapes, head_mode=mode)
    t1 = time.perf_counter()
    plan = build_plan(an, opts, plan_json)
    t2 = time.perf_counter()
    pruned, new_shapes, data = apply_plan(an, plan, keep_bytes=True)
    t3 = time.perf_counter()
    before = model_stats(an.model, an.shapes)
    after = model_stats(pruned, new_shapes)
    res = Result(an, plan, pruned, new_shapes, before, after,
                 timings={"analyze": t1 - t0, "plan": t2 - t1, "rewrite_and_check": t3 - t2}, serialized=data)
    if verify:
        feeds = io.make_inputs(an.model, input_shapes, arrays=input_arrays)
        res.verification = verify_plan(an, plan, pruned, feeds, ep, tol)
        res.timings["verify"] = time.perf_counter() - t3
    return res
