"""The pipeline: load -> normalize -> analyze -> plan -> (compensate) -> rewrite -> check -> (finetune)
-> verify -> save.

Each stage lives on its floor (analysis, planning, rewrite, measure); ``run`` composes them and keeps
every intermediate result for the report in a ``Result``. Nothing is written here.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import onnx

from onnxprune.analysis.analyze import Analysis, barrier_summary
from onnxprune.analysis.analyze import analyze_model as _analyze
from onnxprune.analysis.contract import Registry
from onnxprune.analysis.coupling import CouplingGraph
from onnxprune.analysis.shapes import Shapes, infer_shapes
from onnxprune.analysis.subgraphs import with_body_shapes
from onnxprune.errors import UserError
from onnxprune.handlers import REGISTRY
from onnxprune.measure.fidelity import Fidelity, measure_fidelity
from onnxprune.measure.latency import Runner, measure_runners, node_latencies
from onnxprune.measure.stats import ModelStats, model_stats, node_macs, real_shapes
from onnxprune.measure.stripes import SplitTiming, gate_splits, gated, immaterial_crops
from onnxprune.measure.verify import DEFAULT_TOL, Verification, compare, verify_plan
from onnxprune.planning.data_importance import Activations, consumer_taps, recon_specs
from onnxprune.planning.importance import DATA_IMPORTANCES, GRADIENT_IMPORTANCES
from onnxprune.planning.options import GradientSettings, PlanOptions, StripeOptions
from onnxprune.planning.plan import Plan, build_plan, grad_options, group_ratio
from onnxprune.planning.stripes import (
    StripeMacs,
    StripePlan,
    conv_activation_scores,
    conv_out_hw,
    conv_stripe_scores,
    distinct_boxes,
    select_boxes,
    select_stripes,
    stripe_convs,
    stripe_macs,
    stripe_taps,
)
from onnxprune.rewrite.check import apply_plan, check_shapes, checked_rewrite
from onnxprune.rewrite.compensate import Compensated, CompensateOptions, compensate, compensate_many
from onnxprune.rewrite.stripe_refit import StripeRefit, refit_stripes, stripe_gram_specs
from onnxprune.rewrite.stripes import ShrinkResult, mask_stripes, shrink_stripes
from onnxprune.runtime.calib import CalibView
from onnxprune.runtime.capture import DEFAULT_BUDGET, Capture, capture, capture_grams
from onnxprune.runtime.inputs import make_inputs, probe_sizes

if TYPE_CHECKING:
    from onnxprune.planning.grad_importance import GradScores
    from onnxprune.rewrite.distill import Distilled, DistillOptions

__all__ = ["Activations", "Analysis", "Result", "analyze_model", "apply_plan", "barrier_summary", "build_plan",
           "capture_activations", "finetune_result", "gradient_scores_for", "prune_many", "run", "step_options", "step_ratio",
           "verify_plan"]

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
    distillation: Distilled | None = None  # ``--finetune``: what training did (``finetune_result``)
    fidelity_before: Fidelity | None = None  # ``--finetune``: held-out fidelity of P before training
    reference: Analysis | None = None  # what ``--verify`` checks P against (masked): O, O', or rebuilt after training

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
            "probe_sizes": probe_sizes(self.analysis.model, self.analysis.input_shapes, self.analysis.input_arrays),
            "plan": self.plan.to_json(cg),
            "verification": self.verification.to_json() if self.verification else None,
            "importance": self.plan.importance,
            "timings_s": self.timings,
            **({"fidelity": self.fidelity.to_json()} if self.fidelity is not None else {}),
            **({"compensation": self.compensation.to_json()} if self.compensation is not None else {}),
            **({"finetune": finetune_json(self.distillation)} if self.distillation is not None else {}),
            **({"fidelity_before": self.fidelity_before.to_json()} if self.fidelity_before is not None else {}),
        }


FROZEN_SHOWN = 5  # frozen constants listed (with their reason) in the report's finetune section


def finetune_json(d: Distilled) -> dict:
    """The report's ``finetune`` section: ``Distilled.to_json`` with the frozen constants counted
    and a few listed (a big model freezes hundreds: every BatchNorm statistic)."""
    out = d.to_json()
    # step 0 has no training loss (NaN): null, so that strict JSON readers (jq) take the report
    out["history"] = [[None if isinstance(v, float) and not math.isfinite(v) else v for v in h]
                      for h in out.get("history", [])]
    frozen = out.pop("frozen", {})
    out["frozen_constants"] = len(frozen)
    out["frozen"] = dict(list(frozen.items())[:FROZEN_SHOWN])
    reasons: dict[str, int] = {}
    for why in frozen.values():
        reasons[why] = reasons.get(why, 0) + 1
    out["frozen_reasons"] = reasons
    out["changed"] = d.changed
    return out


def head_mode_for(opts: PlanOptions, plan_json: dict | None = None) -> str:
    """The analysis mode a run needs: whole heads for ``--head-ratio``, whole conv groups for
    ``--conv-groups whole`` (or a plan made with them; ``PlanOptions.head_mode``)."""
    if plan_json is not None:
        o = plan_json.get("options", {}) if isinstance(plan_json, dict) else {}
        o = o if isinstance(o, dict) else {}
        return PlanOptions(head_ratio=o.get("head_ratio"), gqa="query" if o.get("gqa") == "query" else "kv",
                           conv_groups="whole" if o.get("conv_groups") == "whole" else "positions").head_mode
    return opts.head_mode


def run(model: onnx.ModelProto | str, opts: PlanOptions, *, input_shapes=None, input_arrays=None,
        plan_json: dict | None = None, verify: bool = False, ep: str = "auto", tol: float = DEFAULT_TOL,
        analysis: Analysis | None = None, calib: CalibView | Capture | Activations | None = None,
        compensation: CompensateOptions | None = None, fit: CalibView | None = None, progress=None,
        gradients: GradScores | None = None, grad_settings: GradientSettings | None = None,
        finetune: DistillOptions | None = None, holdout: CalibView | None = None) -> Result:
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
    collected here on ``fit`` as ``grad_settings`` say. ``finetune`` (``steps`` > 0): P is then
    distilled from O on ``fit`` (``finetune_result``; ``holdout``: P's held-out fidelity before
    training goes into ``Result.fidelity_before``) and verified against the masked original rebuilt
    from its trained weights."""
    t0 = time.perf_counter()
    opts.validate()
    mode = head_mode_for(opts, plan_json)
    comp_on = compensation is not None and compensation.mode != "none"
    fit = fit if fit is not None else calib if isinstance(calib, CalibView) else None
    if comp_on and fit is None:
        raise UserError(f"compensation '{compensation.mode}' needs calibration data (--calib or --calib-images)")
    if finetune is not None:
        finetune.validate()
        if finetune.steps > 0 and fit is None:
            raise UserError(NEEDS_FIT)
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
        gradients = gradient_scores_for(an, fit, opts, grad_settings, progress=progress, ep=ep)
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
                          "rewrite_and_check": t3 - t2}, serialized=data, compensation=comp, reference=cut)
    if comp is not None:
        res.timings["compensate"] = comp.seconds
    if acts is not None and acts.seconds is not None:
        res.timings["capture"] = acts.seconds
    if gradients is not None and gradients.gradients is not None:
        res.timings["gradients"] = float(gradients.gradients.get("seconds", {}).get("total", 0.0))
    if finetune is not None and finetune.steps > 0:
        finetune_result(res, fit, finetune, ep=ep, holdout=holdout, progress=progress)
    if verify:
        verify_result(res, input_shapes, input_arrays, ep, tol)
    return res


NEEDS_FIT = "--finetune needs calibration data (--calib or --calib-images)"

#: bytes of model copies ``prune_many`` holds at once (each variant: its compensated original and its
#: pruned model); more variants are made in several rounds of shared passes
VARIANT_BYTES = 2 << 30


def prune_many(an: Analysis, options: list[PlanOptions], *, activations: Activations | None = None,
               gradients: GradScores | None = None, compensation: CompensateOptions | None = None,
               fit: CalibView | None = None, ep: str = "auto", progress=None) -> list[onnx.ModelProto]:
    """The pruned model ``run`` makes at each of ``options`` from ``an`` (made as ``run`` makes it:
    with zero biases when compensating), scored on ``activations`` and ``gradients`` captured before,
    compensated on ``fit`` with the flat fits of all of them in shared passes over the data
    (``rewrite.compensate.compensate_many``), rewritten and checked; no statistics, verification or
    report. For searches that only run the results: the sensitivity cuts of one group at several
    counts, the allocation's candidate plans."""
    comp_on = compensation is not None and compensation.mode != "none"
    if comp_on and fit is None:
        raise UserError(f"compensation '{compensation.mode}' needs calibration data (--calib or --calib-images)")
    for o in options:
        o.validate()
        if o.importance in GRADIENT_IMPORTANCES and gradients is None:
            raise UserError(f"--importance {o.importance} needs gradients on calibration data (--calib or "
                            "--calib-images)")
    per_round = max(1, VARIANT_BYTES // max(1, 2 * an.model.ByteSize()))
    out: list[onnx.ModelProto] = []
    for i in range(0, len(options), per_round):
        part = options[i:i + per_round]
        plans = [build_plan(an, o, None, activations if o.importance in DATA_IMPORTANCES else None, gradients)
                 for o in part]
        comps = compensate_many(an, plans, fit, compensation, ep, progress) if comp_on else [None] * len(plans)
        out += [apply_plan(c.analysis if c is not None else an, p)[0] for p, c in zip(plans, comps, strict=True)]
    return out


def verify_result(res: Result, input_shapes=None, input_arrays=None, ep: str = "auto",
                  tol: float = DEFAULT_TOL) -> Verification:
    """``res.verification``: P against the masked ``res.reference`` (O, O' after compensation, or the
    original rebuilt from P's trained weights after finetuning); the fidelity column is always
    against the untouched original O."""
    t0 = time.perf_counter()
    an = res.analysis
    ref = res.reference if res.reference is not None else an
    feeds = make_inputs(an.model, input_shapes, arrays=input_arrays)
    res.verification = verify_plan(ref, res.plan, res.pruned, feeds, ep, tol)
    if ref is not an:
        for o, f in zip(res.verification.outputs, compare(an.model, an.model, res.pruned, feeds, ep, tol).outputs,
                        strict=True):
            o.fidelity = f.fidelity
    res.timings["verify"] = time.perf_counter() - t0
    return res.verification


def finetune_result(res: Result, fit: CalibView | None, opts: DistillOptions, *, ep: str = "auto",
                    holdout: CalibView | None = None, progress=None) -> Distilled:
    """Distil the original O into ``res.pruned`` on ``fit`` (the fit share) for ``opts.steps`` steps
    (``rewrite.distill.finetune``), in place: the trained P passes the full ONNX check and the
    plan's shapes again, its serialization is kept, ``res.reference`` becomes the cut model rebuilt
    with the trained values (``distill.rebuild_original``: what ``verify_result`` masks) and
    ``res.verification`` is dropped (it was of the old P; verify again). ``res.fidelity_before``:
    ``res.fidelity`` when measured, else measured here on ``holdout`` (when given); ``res.fidelity``
    is dropped when P changed. A target search runs this once, on the chosen plan's result."""
    from onnxprune.rewrite import distill  # torch is optional: distill says so when it is missing

    opts.validate()
    if opts.steps > 0 and fit is None:
        raise UserError(NEEDS_FIT)
    an = res.analysis
    cut = res.reference if res.reference is not None else (res.compensation.analysis if res.compensation else an)
    if res.fidelity is None and holdout is not None and holdout.n:
        res.fidelity = measure_fidelity(an.model, res.pruned, holdout, ep=ep)
    res.fidelity_before = res.fidelity
    dist = distill.finetune(an, cut, res.plan, res.pruned, fit, opts, ep, progress)
    res.distillation = dist
    res.timings["finetune"] = dist.seconds
    if dist.changed:
        t0 = time.perf_counter()
        pruned = dist.model
        data, shapes = checked(an, res.plan, pruned)
        res.pruned, res.pruned_shapes, res.serialized = pruned, shapes, data
        res.after = model_stats(pruned, shapes, registry=an.registry)
        res.reference = distill.rebuild_original(cut, res.plan, pruned)
        res.fidelity = None
        res.verification = None
        res.timings["finetune_check"] = time.perf_counter() - t0
    return dist


def checked(an: Analysis, plan: Plan, model: onnx.ModelProto) -> tuple[bytes | None, Shapes]:
    """The checks ``apply_plan`` makes of a rewritten model, for one whose values changed after it
    (finetuning): the full ONNX checker (its serialization, None with external data) and every
    static axis against the plan (the shapes inferred anew)."""
    data = checked_rewrite(model, "finetuned")
    shapes = infer_shapes(model, an.input_shapes, arrays=an.input_arrays)
    shapes = with_body_shapes(model, shapes, an.registry, an.input_shapes, an.input_arrays)
    check_shapes(model, an.cg, plan, shapes)
    return data, shapes


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
                        progress=None, ep: str = "auto") -> GradScores:
    """Scores of ``opts.importance`` (a gradient criterion) for every group a plan with ``opts`` may
    prune, from one collection of gradients on ``view`` (the fit share) in the torch executor, on the
    analysed model (its tensor names are the coupling graph's). ``group-fisher --normalize flops``
    divides by MACs at the real input shapes (``measure.stats``), ``--normalize latency`` by each node's
    time in onnxruntime's profile on ``ep`` (``measure.latency.node_latencies``, at the analysis input
    shapes, generated inputs; graph optimizations off so each kernel is one node). A model whose gradients cannot be
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

    table = None
    if opts.importance == "group-fisher" and opts.normalize == "latency":
        table = node_latencies(an.model, make_inputs(an.model, an.input_shapes, arrays=an.input_arrays), ep)
    sc = gradient_scores(cg, groups, gopts, grads, macs_of=macs_of, latency_of=table, seed=opts.seed)
    if sc.gradients is not None:
        sc.gradients["settings"] = settings.to_json(opts.importance)
        if table is not None:
            sc.gradients["latency_table"] = table.to_json()
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


# ----------------------------------------------------------------------------------------------
# iterative pruning (``prune --steps K``): Torch-Pruning's ``iterative_steps``, linear schedule


def step_ratio(ratio: float, k: int, steps: int) -> float:
    """The share of the current units step ``k`` (1..``steps``) removes so that, after it, (1 - ratio*k/steps)
    of the original units are left: 1 - (1 - r*k/K) / (1 - r*(k-1)/K) (the last step ends at 1 - r
    exactly)."""
    if ratio <= 0.0:
        return 0.0
    left = (1.0 - ratio) if k >= steps else 1.0 - ratio * k / steps
    return min(max(0.0, 1.0 - left / (1.0 - ratio * (k - 1) / steps)), math.nextafter(1.0, 0.0))


def step_options(original: Analysis, an: Analysis, opts: PlanOptions, k: int, steps: int) -> PlanOptions:
    """The options of step ``k`` of ``steps`` on ``an`` (the model left by step k-1; ``original``: the
    analysis of the unpruned model). As Torch-Pruning counts from each layer's initial width, every
    group (found again by its producer nodes) gets the ratio that leaves it with what a one-shot plan
    would keep at the cumulative ratio r*k/K of its original size: floor(n0*r) removed in all after
    the last step, the one-shot counts. A group not found again (no unique producer), and every group
    with --global/--isomorphic/--greedy (which rank across groups), gets the scheduled ratio
    ``step_ratio`` of the current model (and --layer-ratio values the same schedule)."""
    uniform = dataclasses.replace(opts, ratio=step_ratio(opts.ratio, k, steps),
                                  layer_ratios=[(rx, step_ratio(v, k, steps)) for rx, v in opts.layer_ratios])
    if opts.global_ or opts.isomorphic or opts.greedy:
        return uniform
    layer = [(re.compile(r), v) for r, v in opts.layer_ratios]
    first: dict[tuple[str, ...], tuple[int, float] | None] = {}
    for g in original.cg.groups:
        key = tuple(sorted(g.producers))
        if key:
            first[key] = None if key in first else (g.size, group_ratio(g, opts, layer))
    owners: dict[str, int] = {}
    for g in an.cg.groups:
        for p in set(g.producers):
            owners[p] = owners.get(p, 0) + 1
    exact: list[tuple[str, float]] = []
    for g in an.cg.groups:
        known = first.get(tuple(sorted(g.producers)))
        name = next((p for p in sorted(g.producers) if owners[p] == 1), None)
        if known is None or name is None or g.size <= 1:
            continue
        n0, r = known
        keep = n0 - int(math.floor(n0 * (r if k >= steps else r * k / steps)))
        remove = g.size - max(1, keep)
        exact.append((r"\A" + re.escape(name) + r"\Z", (remove + 0.5) / g.size if remove > 0 else 0.0))
    return dataclasses.replace(uniform, layer_ratios=exact + uniform.layer_ratios)


# ----------------------------------------------------------------------------------------------
# stripe pruning (``prune --stripe-ratio R``, issue 12): after the channel stage, on its output


@dataclass
class StripeStage:
    """What the stripe stage did to ``source`` (the model it started from: the original, or the
    channel-pruned model P): the plan, the resulting model, per conv the stripe-counted MACs
    (``macs``), the shrink records and gate timings (shrink mode), the convs it skipped and why, and
    ``verification``: the result against ``mask_stripes(source, plan)`` (the masked original with
    its stripes zeroed), exactly, with the fidelity column against the untouched original."""

    options: StripeOptions
    plan: StripePlan
    source: onnx.ModelProto
    model: onnx.ModelProto
    shapes: Shapes
    macs: dict[str, StripeMacs]
    skipped: dict[str, str]
    shrink: ShrinkResult | None = None
    gate: dict[str, SplitTiming] = field(default_factory=dict)
    verification: Verification | None = None
    timings: dict[str, float] = field(default_factory=dict)
    serialized: bytes | None = None
    compensation: StripeRefit | None = None  # the kept stripes' least-squares refit (with fit data)

    def conv_macs(self) -> tuple[int, int]:
        """(K×K conv MACs before, after) per sample: physical (the shrunk convs') in shrink mode,
        counted by kept stripes in mask mode."""
        before = sum(m.dense for m in self.macs.values())
        if self.shrink is None:
            return before, sum(m.kept for m in self.macs.values())
        recs = {c.key: c for c in self.shrink.convs}
        after = 0
        for k, m in self.macs.items():
            r = recs.get(k)
            after += r.macs_after if r is not None and r.macs_after is not None else m.dense
        return before, after

    def to_json(self) -> dict:
        before, after = self.conv_macs()
        removed = self.plan.removed()
        total = sum(int(m.size) for m in self.plan.keep.values())
        return {"options": dataclasses.asdict(self.options), "mode": self.options.mode,
                "shape": self.plan.shape, "norm": self.plan.norm, "convs": len(self.plan.keep),
                "stripes": total, "stripes_removed": int(sum(removed.values())),
                "kxk_conv_macs": {"before": before, "after": after,
                                  "counted": "physical" if self.shrink is not None else "kept stripes"},
                "shrink": self.shrink.to_json() if self.shrink is not None else None,
                "gate": {k: t.to_json() for k, t in self.gate.items()},
                "skipped": self.skipped, "verification": self.verification.to_json() if self.verification else None,
                "compensation": self.compensation.to_json() if self.compensation is not None else None,
                "timings_s": self.timings}


def stripe_scores(model: onnx.ModelProto, norm: str, fit: CalibView | None = None, ep: str = "auto",
                  progress=None) -> tuple[dict, str]:
    """``({conv key: stripe scores [F, K, K']}, the norm used)``: with ``fit`` the activation-weighted
    scores (the conv inputs' E[x²] captured on it), else the weights' ``norm``."""
    if fit is None or not fit.n:
        return conv_stripe_scores(model, norm), norm
    taps = stripe_taps(model)
    cap = capture(model, taps, fit, ep=ep, progress=progress)
    return conv_activation_scores(model, {t: cap.stats[t].mean_sq for t, _ in taps}), "activation"


def select_stripe_plan(model: onnx.ModelProto, opts: StripeOptions, scores: dict, norm: str,
                       cg: CouplingGraph | None = None) -> StripePlan:
    """The stripe plan of ``opts`` on ``scores``. Box plans in shrink mode: a conv whose split
    ``shrink_stripes`` would refuse (its channel group cannot carry a new order) is selected again
    with one box, so its kernel shrinks instead of falling back to the union of its boxes."""
    if opts.stripe_shape == "free":
        return select_stripes(scores, opts.ratio, norm, global_=opts.global_, max_ratio=opts.max_ratio)
    groups = {c.key: c.group for c in stripe_convs(model)[0]}
    plan = select_boxes(scores, opts.ratio, opts.boxes, norm, groups=groups, global_=opts.global_,
                        max_ratio=opts.max_ratio)
    if opts.mode != "shrink" or opts.boxes == 1:
        return plan
    refused = {c.key for c in shrink_stripes(model, plan, cg).convs if len(c.boxes) > 1 and not c.split}
    if not refused:
        return plan
    per = {k: (1 if k in refused else opts.boxes) for k in scores}
    return select_boxes(scores, opts.ratio, per, norm, groups=groups, global_=opts.global_, max_ratio=opts.max_ratio)


def gate_batches(source: onnx.ModelProto, plan: StripePlan, ep: str, threads: int | None, batch: int,
                 cg: CouplingGraph | None, input_shapes=None, input_arrays=None) -> dict[str, SplitTiming]:
    """The latency gate at batch 1 and at ``batch`` (the deployment batch, when it is another): a
    conv's timing is the one at ``batch``, or the first batch at which its shrunk form does not
    pay, so a shrink is made only where it is faster at both; except the crops whose slowdowns are
    immaterial to the whole model (``measure.stripes.immaterial_crops``; the model is timed at each
    batch only when some crop was refused)."""
    out: dict[str, SplitTiming] = {}
    per_batch: dict[int, dict[str, SplitTiming]] = {}
    for b in sorted({1, int(batch)}, reverse=True):
        per_batch[b] = gate_splits(source, plan, ep, threads, b, cg=cg)
        for k, t in per_batch[b].items():
            if k not in out or (out[k].pays and not t.pays):
                out[k] = t
    if any(not t.pays and t.form.startswith("crop") for t in out.values()):
        model_ms = {b: model_latency_ms(source, ep, threads, b, input_shapes, input_arrays) for b in per_batch}
        for k, why in immaterial_crops(per_batch, model_ms).items():
            out[k] = dataclasses.replace(out[k], immaterial=why)
    return out


def model_latency_ms(model: onnx.ModelProto, ep: str, threads: int | None, batch: int, input_shapes=None,
                     input_arrays=None, repeat: int = 10) -> float | None:
    """The whole model's median latency (ms) at ``batch`` on generated inputs; None when it cannot run
    here (then no crop is taken as immaterial)."""
    try:
        feeds = make_inputs(model, input_shapes, batch=batch, arrays=input_arrays)
        (lat,) = measure_runners([Runner(model, feeds, ep, threads)], warmup=2, repeat=repeat)
    except Exception:  # noqa: BLE001 - a model the generated inputs cannot run: the strict rule stands
        return None
    return float(lat.median_ms)


def one_box_fallback(source: onnx.ModelProto, opts: StripeOptions, plan: StripePlan, gate: dict[str, SplitTiming],
                     scores: dict, norm: str, cg: CouplingGraph | None, ep: str, threads: int | None,
                     batch: int, input_shapes=None, input_arrays=None) -> tuple[StripePlan, dict[str, SplitTiming]]:
    """Box plans: a conv whose split measured slower than its dense form gets a second candidate,
    one box (a crop, selected at the same removed count), timed the same way; it replaces the split
    where it pays. Returns the plan and the gate's timings, updated."""
    if plan.shape != "box":
        return plan, gate
    retry = [k for k, t in gate.items() if not t.pays and distinct_boxes(plan.keep[k]) > 1]
    if not retry:
        return plan, gate
    per = dict(plan.max_boxes) if isinstance(plan.max_boxes, dict) else {k: int(plan.max_boxes or opts.boxes)
                                                                        for k in plan.keep}
    was = dict(per)
    per.update({k: 1 for k in retry})
    groups = {c.key: c.group for c in stripe_convs(source)[0]}
    crops = select_boxes(scores, opts.ratio, per, norm, groups=groups, global_=opts.global_, max_ratio=opts.max_ratio)
    timed = gate_batches(source, StripePlan({k: crops.keep[k] for k in retry}, shape="box"), ep, threads, batch, cg,
                         input_shapes, input_arrays)
    keep, gate = dict(plan.keep), dict(gate)
    for k in retry:
        if timed[k].pays:
            keep[k], gate[k] = crops.keep[k], timed[k]
        else:
            per[k] = was[k]
    return dataclasses.replace(plan, keep=keep, max_boxes=per), gate


def run_stripes(source: onnx.ModelProto, opts: StripeOptions, *, original: onnx.ModelProto | None = None,
                analysis: Analysis | None = None, plan: StripePlan | None = None, fit: CalibView | None = None,
                ep: str = "auto", threads: int | None = None, batch: int = 1, verify: bool = False,
                tol: float = DEFAULT_TOL, input_shapes=None, input_arrays=None, progress=None,
                compensation: CompensateOptions | None = None) -> StripeStage:
    """Stripe-prune ``source``: score (activation-weighted on ``fit`` when given), select (or take
    ``plan``, a loaded one), then mask or shrink (the latency gate timing each conv's dense and shrunk
    forms on ``ep`` at ``batch`` unless ``opts.gate`` is off), fully check, and with ``verify``
    compare with ``mask_stripes(source, plan)``; the fidelity column against ``original`` (default
    ``source``). ``analysis``: of ``source``, for the channel reordering of splits (made here when
    needed). ``compensation`` (lsq) with ``fit``: the kept stripes are refitted on the fit share first
    (``rewrite/stripe_refit.py``); the refitted source is masked or shrunk and verified against."""
    opts.validate()
    t0 = time.perf_counter()
    convs, skipped = stripe_convs(source)
    timings: dict[str, float] = {}
    cg = None
    if opts.mode == "shrink":
        an = analysis if analysis is not None and analysis.model is source else analyze_model(
            source, input_shapes, input_arrays=input_arrays)
        cg = an.cg
    ignore = [re.compile(r) for r in opts.ignore]
    for c in convs:
        hit = next((p.pattern for p in ignore if p.search(c.key)), None)
        if hit is not None:
            skipped[c.key] = f"ignored by --ignore {hit}"
    selected = plan is None
    if plan is None:
        scores, norm = stripe_scores(source, opts.norm, fit, ep, progress)
        scores = {k: v for k, v in scores.items() if k not in skipped}
        timings["score"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        plan = select_stripe_plan(source, opts, scores, norm, cg)
        timings["select"] = time.perf_counter() - t1
    refit = None
    if compensation is not None and compensation.mode == "lsq" and fit is not None and fit.n:
        source, refit = refit_source(source, plan, fit, compensation, ep, progress)
        timings["refit"] = refit.seconds + refit.capture_s
    gate: dict[str, SplitTiming] = {}
    shrink = None
    t2 = time.perf_counter()
    if opts.mode == "mask":
        model = mask_stripes(source, plan)
    else:
        split = None
        if opts.gate == "latency":
            gate = gate_batches(source, plan, ep, threads, batch, cg, input_shapes, input_arrays)
            if selected:
                plan, gate = one_box_fallback(source, opts, plan, gate, scores, norm, cg, ep, threads, batch,
                                              input_shapes, input_arrays)
            split = gated(gate)
            timings["gate"] = time.perf_counter() - t2
        shrink = shrink_stripes(source, plan, cg, split)
        model = shrink.model
    t3 = time.perf_counter()
    data = checked_rewrite(model, "stripe-pruned")
    shapes = infer_shapes(model, input_shapes, arrays=input_arrays)
    src_shapes = infer_shapes(source, input_shapes, arrays=input_arrays)
    macs = stripe_macs(plan, [c for c in convs if c.key in plan.keep], conv_out_hw(
        [c for c in convs if c.key in plan.keep], src_shapes.concrete))
    timings["rewrite_and_check"] = time.perf_counter() - t3
    stage = StripeStage(opts, plan, source, model, shapes, macs, skipped, shrink, gate, timings=timings,
                        serialized=data, compensation=refit)
    if verify:
        t4 = time.perf_counter()
        feeds = make_inputs(source, input_shapes, arrays=input_arrays)
        stage.verification = compare(original if original is not None else source, mask_stripes(source, plan),
                                     model, feeds, ep, tol)
        timings["verify"] = time.perf_counter() - t4
    return stage


def refit_source(source: onnx.ModelProto, plan: StripePlan, fit: CalibView, comp: CompensateOptions,
                 ep: str = "auto", progress=None) -> tuple[onnx.ModelProto, StripeRefit]:
    """``source`` with the kept stripes of ``plan`` refitted by least squares on the Gram matrices of
    the planned convs' input patches, captured here on ``fit`` (``rewrite/stripe_refit.py``)."""
    specs = stripe_gram_specs(source, plan, comp.max_features)
    t0 = time.perf_counter()
    grams = capture_grams(source, list(dict.fromkeys(specs.values())), fit, rows=comp.rows_per_sample, ep=ep,
                          budget_bytes=comp.budget_bytes, max_batch=comp.max_batch, seed=comp.seed,
                          gram_budget=comp.gram_budget, progress=progress).grams if specs else {}
    capture_s = time.perf_counter() - t0
    model, rep = refit_stripes(source, plan, grams, comp.ridge, comp.max_features)
    rep.capture_s = capture_s
    return model, rep
