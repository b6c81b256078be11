"""The pipeline: load -> normalize -> analyze -> plan -> rewrite -> check -> verify -> save.

Each stage lives on its floor (analysis, planning, rewrite, measure); ``run`` composes them and keeps
every intermediate result for the report in a ``Result``. Nothing is written here.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import onnx

from onnxprune.analysis.analyze import Analysis, barrier_summary
from onnxprune.analysis.analyze import analyze_model as _analyze
from onnxprune.analysis.contract import Registry
from onnxprune.analysis.shapes import Shapes
from onnxprune.errors import UserError
from onnxprune.handlers import REGISTRY
from onnxprune.measure.fidelity import Fidelity, measure_fidelity
from onnxprune.measure.stats import ModelStats, model_stats, node_macs, real_shapes
from onnxprune.measure.verify import DEFAULT_TOL, Verification, compare, verify_plan
from onnxprune.planning.data_importance import Activations, consumer_taps, recon_specs
from onnxprune.planning.importance import DATA_IMPORTANCES, GRADIENT_IMPORTANCES
from onnxprune.planning.options import GradientSettings, PlanOptions
from onnxprune.planning.plan import Plan, build_plan, grad_options
from onnxprune.rewrite.check import apply_plan
from onnxprune.rewrite.compensate import Compensated, CompensateOptions, compensate
from onnxprune.runtime.calib import CalibView
from onnxprune.runtime.capture import DEFAULT_BUDGET, Capture, capture
from onnxprune.runtime.inputs import make_inputs

if TYPE_CHECKING:
    from onnxprune.planning.grad_importance import GradScores

__all__ = ["Activations", "Analysis", "Result", "analyze_model", "apply_plan", "barrier_summary", "build_plan",
           "capture_activations", "gradient_scores_for", "run", "verify_plan"]

log = logging.getLogger(__name__)


def analyze_model(model: onnx.ModelProto | str, input_shapes: dict[str, tuple[int, ...]] | None = None,
                  head_mode: str = "dim", owned: bool | None = None, registry: Registry = REGISTRY,
                  input_arrays=None, bias_inputs: bool = False) -> Analysis:
    """The analysis with every handler of ``onnxprune.handlers`` (see ``analysis.analyze``);
    ``bias_inputs``: zero biases added first, for compensation (``analysis.passes.add_bias_inputs``)."""
    return _analyze(model, registry, input_shapes, head_mode=head_mode, owned=owned, input_arrays=input_arrays,
                    bias_inputs=bias_inputs)


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
    fidelity: Fidelity | None = None  # on held-out calibration data (``measure_holdout``)
    compensation: Compensated | None = None  # the compensated original the plan was applied to

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
            "importance": self.plan.importance,
            "timings_s": self.timings,
            **({"fidelity": self.fidelity.to_json()} if self.fidelity is not None else {}),
            **({"compensation": self.compensation.to_json()} if self.compensation is not None else {}),
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
        analysis: Analysis | None = None, calib: CalibView | Capture | Activations | None = None,
        compensation: CompensateOptions | None = None, fit: CalibView | None = None, progress=None,
        gradients: GradScores | None = None, grad_settings: GradientSettings | None = None) -> Result:
    """The whole pipeline. ``analysis``: one already made of this model in the mode this run needs
    (a target search made it), reused instead of analysing again. ``calib``: for the data-aware
    importances, the fit share of the calibration data (captured here) or activations captured
    before (``capture_activations``); ignored by the weight criteria and with ``plan_json``.
    ``compensation`` (mode bias or lsq): the consumers of the removed channels are refitted on
    ``fit`` (the fit share; ``calib`` when that is a view) before the rewrite (``rewrite.compensate``);
    P is cut from the compensated original and verified against it. An analysis made here then gets
    zero biases first (``bias_inputs``); pass one made with ``bias_inputs=True``. A gradient criterion
    (``taylor``, ``hessian``, ``fisher``, ``group-fisher``) scores on ``gradients``
    (``gradient_scores_for``, made once for every ratio of a search) or, without them, on gradients
    collected here on ``fit`` as ``grad_settings`` say."""
    t0 = time.perf_counter()
    opts.validate()
    mode = head_mode_for(opts, plan_json)
    comp_on = compensation is not None and compensation.mode != "none"
    fit = fit if fit is not None else calib if isinstance(calib, CalibView) else None
    if comp_on and fit is None:
        raise UserError(f"compensation '{compensation.mode}' needs calibration data (--calib or --calib-images)")
    if analysis is not None and analysis.cg.head_mode == mode:
        an = analysis
    else:
        an = analyze_model(model, input_shapes, head_mode=mode, input_arrays=input_arrays, bias_inputs=comp_on)
    t1 = time.perf_counter()
    acts = None
    if plan_json is None and opts.importance in DATA_IMPORTANCES and calib is not None:
        acts = (calib if isinstance(calib, Activations) else Activations.of(calib) if isinstance(calib, Capture)
                else capture_activations(an, calib, ep, opts=opts))
    if plan_json is None and opts.importance in GRADIENT_IMPORTANCES and gradients is None:
        if fit is None:
            raise UserError(f"--importance {opts.importance} needs gradients on calibration data (--calib or "
                            "--calib-images)")
        gradients = gradient_scores_for(an, fit, opts, grad_settings, progress=progress)
    t1b = time.perf_counter()
    plan = build_plan(an, opts, plan_json, acts, gradients)
    comp = compensate(an, plan, fit, compensation, ep, progress) if comp_on else None
    cut = comp.analysis if comp is not None else an  # O' (same graph, refitted constants) or O
    t2 = time.perf_counter()
    pruned, new_shapes, data = apply_plan(cut, plan, keep_bytes=True)
    t3 = time.perf_counter()
    before = model_stats(an.model, an.shapes, registry=an.registry)
    after = model_stats(pruned, new_shapes, registry=an.registry)
    res = Result(an, plan, pruned, new_shapes, before, after,
                 timings={"analyze": t1 - t0, "plan": t2 - t1b - (comp.seconds if comp else 0.0),
                          "rewrite_and_check": t3 - t2}, serialized=data, compensation=comp)
    if comp is not None:
        res.timings["compensate"] = comp.seconds
    if acts is not None and acts.seconds is not None:
        res.timings["capture"] = acts.seconds
    if gradients is not None and gradients.gradients is not None:
        res.timings["gradients"] = float(gradients.gradients.get("seconds", {}).get("total", 0.0))
    if verify:
        feeds = make_inputs(an.model, input_shapes, arrays=input_arrays)
        res.verification = verify_plan(cut, plan, pruned, feeds, ep, tol)
        if comp is not None:  # verified against O'; the fidelity column is against the untouched O
            for o, f in zip(res.verification.outputs, compare(an.model, an.model, pruned, feeds, ep, tol).outputs,
                            strict=True):
                o.fidelity = f.fidelity
        res.timings["verify"] = time.perf_counter() - t3
    return res


def capture_activations(an: Analysis, view: CalibView, ep: str = "auto", progress=None,
                        budget_bytes: int = DEFAULT_BUDGET, opts: PlanOptions | None = None) -> Activations:
    """Per-channel statistics of the input of every consumer of every prunable group of ``an`` on
    ``view`` (the fit share): one capture, each (tensor, axis) tapped once (``planning.data_importance``).
    ``opts``: only the groups a plan with these options may prune (approximate ones only when allowed)."""
    t0 = time.perf_counter()
    groups = [g for g in an.cg.groups
              if g.prunable and (opts is None or opts.allow_approximate or not g.is_approximate)]
    plan = consumer_taps(an.cg, groups)
    taps = plan.taps
    if not taps:
        return Activations({}, view.n, 0.0)
    # recon's Gram sums in the same run (the first gram budget's worth; the rest in later passes)
    grams = recon_specs(an.cg, groups, plan) if opts is not None and opts.importance == "recon" else ()
    cap = capture(an.model, taps, view, ep=ep, budget_bytes=budget_bytes, progress=progress, grams=grams)
    log.info("captured %d tensors on %d samples in %.2fs", len(taps), view.n, time.perf_counter() - t0)
    return Activations.of(cap, time.perf_counter() - t0)


_SHAPE_OPS = ("Identity", "Cast", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose")
_EMBEDDING_OPS = ("LayerNormalization", "SimplifiedLayerNormalization", "SkipLayerNormalization",
                  "ReduceMean", "ReduceSum", "ReduceL2", "LpNormalization")


def embedding_outputs(model: onnx.ModelProto) -> dict[str, bool]:
    """Outputs that the classifier-shape rule would take for class vectors but that are embeddings:
    produced (through shape ops) by a normalization, a mean/sum pooling, or a Div by a computed
    tensor (L2 normalization, masked mean pooling), unless it divides an Exp (a softmax written out,
    as jax2tf writes magika's). Name -> False, for ``collect_gradients``'
    ``kinds``: these get the Gaussian likelihood, not cross-entropy against their argmax."""
    producer = {o: n for n in model.graph.node for o in n.output if o}
    inits = {t.name for t in model.graph.initializer}
    consts = {n.output[0] for n in model.graph.node if n.op_type == "Constant" and n.output}
    out: dict[str, bool] = {}
    for o in model.graph.output:
        node = producer.get(o.name)
        for _ in range(16):
            if node is None or node.op_type not in _SHAPE_OPS or not node.input:
                break
            node = producer.get(node.input[0])
        if node is None:
            continue
        num = producer.get(node.input[0]) if node.input else None
        if node.op_type in _EMBEDDING_OPS or (node.op_type == "Div" and len(node.input) > 1
                                              and node.input[1] not in inits | consts
                                              and (num is None or num.op_type != "Exp")):  # Exp / sum: a softmax
            out[o.name] = False
    return out


def _grad_groups(an: Analysis, opts: PlanOptions) -> list:
    """The groups a plan with ``opts`` may prune (any ratio): what gradients are collected for."""
    return [g for g in an.cg.groups if g.prunable and g.size > 1
            and (opts.allow_approximate or not g.is_approximate)]


def gradient_scores_for(an: Analysis, view: CalibView, opts: PlanOptions, settings: GradientSettings | None = None,
                        progress=None) -> GradScores:
    """Scores of ``opts.importance`` (a gradient criterion) for every group a plan with ``opts`` may
    prune, from one collection of gradients on ``view`` (the fit share) in the torch executor, on the
    analysed model (its tensor names are the coupling graph's). ``group-fisher --normalize flops``
    divides by MACs at the real input shapes (``measure.stats``). A model whose gradients cannot be
    had (an op without a torch forward, no torch) is scored by l2: ``GradScores.disabled`` says why."""
    from onnxprune.planning.grad_importance import gradient_request, gradient_scores  # optional torch
    from onnxprune.runtime.gradients import collect_gradients

    settings = settings or GradientSettings()
    t0 = time.perf_counter()
    groups = _grad_groups(an, opts)
    gopts = grad_options(opts)
    req = gradient_request(an.cg, groups, gopts)
    kinds = embedding_outputs(an.model) if settings.labels is None and settings.loss != "gaussian" else None
    grads = collect_gradients(an.model, an.registry, view, req, batch_size=settings.batch_size, loss=settings.loss,
                              labels=settings.labels, kinds=kinds or None, device=settings.device, seed=settings.seed,
                              max_samples=settings.samples_for(opts.importance), progress=progress)
    shape_of = real_shapes(an.model, an.shapes)
    cg = an.cg

    def macs_of(node: onnx.NodeProto) -> float:
        return float(node_macs(node, cg.opset, shape_of, cg.consts.get, an.registry))

    sc = gradient_scores(cg, groups, gopts, grads, macs_of=macs_of, seed=opts.seed)
    if sc.gradients is not None:
        sc.gradients["settings"] = settings.to_json(opts.importance)
        sc.gradients.setdefault("seconds", {})["total"] = round(time.perf_counter() - t0, 3)
    if sc.disabled:
        log.info("gradient criteria disabled for this model: %s", sc.disabled)
    return sc


def measure_holdout(res: Result, holdout: CalibView, ep: str = "auto", progress=None) -> Fidelity:
    """Fidelity of ``res.pruned`` against the analysed original on held-out calibration samples;
    kept in ``res.fidelity`` (and so in the report)."""
    t0 = time.perf_counter()
    res.fidelity = measure_fidelity(res.analysis.model, res.pruned, holdout, ep=ep, progress=progress)
    res.timings["fidelity"] = time.perf_counter() - t0
    return res.fidelity
