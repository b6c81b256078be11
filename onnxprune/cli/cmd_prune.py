"""``onnxprune prune MODEL -o PRUNED``: plan, rewrite, check, (verify), save; with ``--target-macs`` or
``--target-latency`` the ratio is searched first, on the same analysis that is then pruned. With
``--calib`` (or ``--calib-images``) the data is checked against the model before planning, units are
scored on activations captured on its fit share (the data-aware importance, unless ``--importance``
names a weight criterion), and the pruned model's fidelity on the held-out share goes into the table
and the report. ``--target-fidelity`` searches the largest ratio keeping that fidelity
(``measure.targets.FidelitySearch``): every evaluation is a whole run here (``holdout_trial``) on the
one analysis and the one capture, and the chosen ratio's run is the result (not run again).
``--finetune N`` distils the original into the final pruned model only (a target search evaluates its
ratios without it), then verifies it against the masked original rebuilt from its trained weights."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from pathlib import Path

import onnx

from onnxprune import pipeline
from onnxprune.cli.args import (
    CalibArgs,
    CompensateArgs,
    ExecutionArgs,
    FinetuneArgs,
    GradientArgs,
    ModelInputArgs,
    OutputArgs,
    PlanArgs,
    PlanFileArgs,
    ReportArgs,
    StepsArgs,
    StripeArgs,
    TargetArgs,
    Targets,
    Timing,
    TimingArgs,
    VerbosityArgs,
    VerifyArgs,
    check_labels,
)
from onnxprune.cli.common import console
from onnxprune.cli.render import (
    print_coverage,
    print_finetune,
    print_round_to,
    print_stats_table,
    print_stripes,
    print_verification,
    progress_bar,
)
from onnxprune.errors import RewriteError, UserError
from onnxprune.ir.io import save_atomic, write_json
from onnxprune.measure.allocation import AllocationSearch, CalibSource
from onnxprune.measure.fidelity import choose_metric, output_kinds
from onnxprune.measure.stats import model_stats
from onnxprune.measure.targets import (
    SELECTION_NOTE,
    Evaluation,
    FidelityEvaluation,
    FidelitySearch,
    RatioSearch,
    evaluation_line,
)
from onnxprune.measure.verify import DEFAULT_TOL, compare
from onnxprune.planning.importance import DATA_IMPORTANCES, GRAD_CRITERIA, GRADIENT_IMPORTANCES
from onnxprune.planning.options import PlanOptions, StripeOptions
from onnxprune.planning.stripes import StripePlan
from onnxprune.rewrite.check import full_check
from onnxprune.rewrite.compensate import CompensateOptions
from onnxprune.rewrite.soft import soft_prune
from onnxprune.runtime.calib import CalibData, open_calib
from onnxprune.runtime.inputs import (
    calib_sample_shapes,
    describe_probe_sizes,
    make_inputs,
    probe_sizes,
    use_data_sizes,
)
from onnxprune.runtime.session import resolve_ep

OUTPUT = OutputArgs(required=True, soft=True)
VERIFY = VerifyArgs()
REPORT = ReportArgs()
INPUTS = ModelInputArgs()
EXECUTION = ExecutionArgs()
PLAN = PlanArgs()
STEPS = StepsArgs()  # --steps K: iterative pruning (prune_steps)
PLAN_FILES = PlanFileArgs()
TARGETS = TargetArgs()
TIMING = TimingArgs(warmup=3, repeat=20)  # for --target-latency
CALIB = CalibArgs()
COMPENSATE = CompensateArgs()
GRADIENTS = GradientArgs()
FINETUNE = FinetuneArgs()
STRIPES = StripeArgs()  # --stripe-ratio: stripe pruning after (or instead of) the channel stage
GROUPS = (OUTPUT, VERIFY, REPORT, INPUTS, EXECUTION, PLAN, STEPS, PLAN_FILES, TARGETS, TIMING, CALIB, COMPENSATE, GRADIENTS,
          FINETUNE, STRIPES)
VERBOSITY = VerbosityArgs()  # on the root parser (cli/__init__.py)


NAME, HELP = "prune", "prune a model"
POSITIONALS = (("model", {}),)


def search_target(model: str, opts: PlanOptions, targets: Targets, timing: Timing, ep: str, shapes,
                  c, arrays=None, an: pipeline.Analysis | None = None,
                  acts: pipeline.Activations | None = None, grads=None) -> tuple[PlanOptions, dict, pipeline.Analysis]:
    """Searches the uniform ratio for the MAC/latency ``targets`` on one analysis (``an``, or made here).
    Returns (the options at the ratio found, what goes into the report, the analysis, for
    ``pipeline.run`` to prune). A data-aware importance plans on ``acts`` (captured before the search),
    so every ratio is planned as the run prunes it, with ``--global`` too; a gradient one on ``grads``
    (``pipeline.gradient_scores_for``, collected once)."""
    if targets.latency is not None:
        ep = resolve_ep(ep)
    with c.status("searching the ratio for the target...", spinner="dots") as status:
        if an is None:
            an = pipeline.analyze_model(model, shapes, head_mode=pipeline.head_mode_for(opts), input_arrays=arrays)

        def progress(ev: Evaluation) -> None:
            lat = f", latency {ev.latency_ratio:.3f}x" if ev.latency_ratio is not None else ""
            status.update(f"searching the ratio: {ev.ratio:.4f} -> MACs {ev.mac_ratio:.3f}x{lat}")

        search = RatioSearch(an, opts, target_macs=targets.macs, target_latency=targets.latency, ep=ep,
                             threads=timing.threads, batch=timing.batch, input_shapes=shapes,
                             warmup=timing.warmup, repeat=timing.repeat, progress=progress, activations=acts,
                             gradients=grads)
        res = search.search()
    c.print(res.summary())
    return dataclasses.replace(opts, ratio=res.ratio), {"target": res.to_json()}, an


def search_allocation(model: str, opts: PlanOptions, targets: Targets, timing: Timing, ep: str, shapes, c, arrays=None,
                      an: pipeline.Analysis | None = None, acts=None, grads=None, *, calib: CalibData | None = None,
                      comp: CompensateOptions | None = None) -> tuple[PlanOptions, dict, pipeline.Analysis]:
    """``--allocate latency``: per-group kept counts for the latency or MAC budget
    (``measure.allocation.AllocationSearch``: tables, knapsack, the pruned model measured, refined).
    With ``calib``, the candidate allocations are pruned as the run prunes (``acts``, ``grads``,
    ``comp``) and judged on the fit share (and with ``targets.value`` sensitivity each group's cut is
    measured first). Returns (the options carrying the
    counts, the report's ``allocation`` section, the analysis)."""
    with c.status("allocating the budget...", spinner="dots") as status:
        if an is None:
            an = pipeline.analyze_model(model, shapes, head_mode=pipeline.head_mode_for(opts), input_arrays=arrays)
        data = None
        if calib is not None:
            def prune(o: PlanOptions):
                return pipeline.run(model, o, input_shapes=shapes, input_arrays=arrays, ep=ep, analysis=an,
                                    calib=acts, compensation=comp, fit=calib.fit, gradients=grads).pruned

            def prune_many(options: list[PlanOptions]):
                return pipeline.prune_many(an, options, activations=acts, gradients=grads, compensation=comp,
                                           fit=calib.fit, ep=ep)

            def data_progress(what: str) -> None:
                status.update(f"allocating the budget: {what}...")

            # the damage curves are cached by what the pruning depends on (gradient scores: not cached)
            key = None if grads is not None else {"compensation": dataclasses.asdict(comp) if comp else None}
            data = CalibSource(prune, calib.fit, ep=ep, progress=data_progress, prune_many=prune_many, key=key)

        def table_progress(done: int, runs: int) -> None:
            status.update(f"measuring the latency table: round {done}/{runs}")

        def progress(r) -> None:
            m = r.measured
            c.print(f"  allocation round {r.index}: budget {r.budget:.3f}x, predicted {r.allocation.predicted:.3f}x -> "
                    f"measured {m.ratio:.3f}x" + (f" ± {m.noise * 100:.1f}%" if m.noise else "")
                    + (f" ({m.pruned_ms:.2f} / {m.original_ms:.2f} ms)" if m.original_ms else "")
                    + f", importance kept {r.allocation.kept_importance:.3f}", markup=False)
            status.update("allocating the budget: refining...")

        search = AllocationSearch(an, opts, target_latency=targets.latency, target_macs=targets.macs, ep=ep,
                                  threads=timing.threads, batch=timing.batch, input_shapes=shapes,
                                  warmup=timing.warmup, repeat=timing.repeat, activations=acts, gradients=grads,
                                  progress=progress, table_progress=table_progress, data=data,
                                  value=targets.value,
                                  **({} if targets.exchange is None else {"exchange_evals": targets.exchange}))
        res = search.search()
    c.print(res.summary(), markup=False)
    return dataclasses.replace(opts, keep_counts=res.keep_counts), {"allocation": res.to_json()}, an


def holdout_trial(model: str, opts: PlanOptions, an: pipeline.Analysis, calib: CalibData,
                  acts: pipeline.Activations | None, comp: CompensateOptions | None, *, ep: str = "auto",
                  tol: float = DEFAULT_TOL, verify: bool = False, input_shapes=None, input_arrays=None, c=None,
                  grads=None):
    """``trial(ratio)``: the run ``prune`` makes at ``ratio`` (``opts`` otherwise) on the analysis
    ``an``, units scored on ``acts``, the consumers refitted on the fit share, then its fidelity on
    the held-out share (``Result.fidelity``). ``sweep --calib`` and ``--target-fidelity`` evaluate
    ratios with it, so their figures are prune's. ``grads``: a gradient criterion's scores, collected
    once for every ratio (``pipeline.gradient_scores_for``)."""

    def trial(ratio: float) -> pipeline.Result:
        o = dataclasses.replace(opts, ratio=float(ratio))
        what = f"ratio {ratio:.4f}: " + (f"compensating ({comp.mode}), " if comp is not None else "") + \
            f"held-out fidelity on {calib.holdout.n} samples..."
        with c.status(what, spinner="dots") if c is not None else contextlib.nullcontext():
            res = pipeline.run(model, o, input_shapes=input_shapes, input_arrays=input_arrays, verify=verify, ep=ep,
                               tol=tol, analysis=an, calib=acts, compensation=comp, fit=calib.fit, gradients=grads)
            pipeline.measure_holdout(res, calib.holdout, ep)
        return res

    return trial


def search_fidelity(model: str, opts: PlanOptions, targets: Targets, metric: str, an: pipeline.Analysis,
                    calib: CalibData, acts, comp: CompensateOptions | None, c, *, ep: str, tol: float, verify: bool,
                    shapes=None, arrays=None, grads=None) -> tuple[dict, pipeline.Result]:
    """``--target-fidelity``: the largest ratio whose held-out ``metric`` stays >= the target (with
    ``--target-macs`` as a cap). Returns (what goes into the report, the chosen ratio's run)."""
    trial = holdout_trial(model, opts, an, calib, acts, comp, ep=ep, tol=tol, verify=verify, input_shapes=shapes,
                          input_arrays=arrays, c=c, grads=grads)

    def progress(ev: FidelityEvaluation) -> None:
        took = f" ({ev.seconds:.1f}s)" if not ev.same_plan_as else ""
        c.print(f"  ratio {evaluation_line(ev)}{took}", markup=False)

    cap = f" with MACs <= {targets.macs:g}x" if targets.macs is not None else ""
    c.print(f"searching the largest ratio keeping held-out {metric} >= {targets.fidelity:g}{cap} "
            f"({calib.holdout.n} held-out samples; every ratio "
            + (f"compensated ({comp.mode}) and " if comp is not None else "") + "measured):", markup=False)
    search = FidelitySearch(an, opts, trial, target=targets.fidelity, metric=metric, target_macs=targets.macs,
                            activations=acts, progress=progress, gradients=grads)
    found = search.search()
    c.print(found.summary(), markup=False)
    c.print(f"note: {SELECTION_NOTE}", markup=False)
    res = search.best
    res.timings["target_search"] = found.seconds
    return {"target": found.to_json()}, res


def print_compensation(c, comp) -> None:
    """One line: what compensation did, and the consumers' fit error before and after."""
    done = [r for r in comp.consumers if r.how != "skipped"]
    errs = [(r.fit_rel_error_before, r.fit_rel_error_after) for r in done if r.fit_rel_error_after is not None]
    counts = ", ".join(f"{n} {k}" for k, n in sorted(comp.counts().items()))
    fit = (f"; fit rel. error {max(b for b, _ in errs):.3f} -> {max(a for _, a in errs):.3f} (worst consumer)"
           if errs else "")
    skipped = next((r for r in comp.consumers if r.how == "skipped"), None)
    c.print(f"compensation {comp.mode}: {len(comp.consumers)} consumers ({counts}) on {comp.samples} fit samples in "
            f"{comp.seconds:.1f}s, {comp.passes} passes{fit}"
            + (f"; skipped e.g. {skipped.node}: {skipped.reason}" if skipped else "")
            + ("; --verify checks the pruned model against the compensated original" if comp.consumers else ""),
            markup=False)


def print_batchnorms(c, comp) -> None:
    """One line: the BatchNorm statistics compensation set (``--bn-stats``), when it touched any."""
    if not comp.batchnorms:
        return
    done = [b for b in comp.batchnorms if b.how != "skipped"]
    skipped = [b for b in comp.batchnorms if b.how == "skipped"]
    shifts = [b.mean_shift for b in done if b.mean_shift is not None]
    c.print(f"BatchNorm statistics ({comp.bn_stats}): {len(done)} "
            + ("matched" if comp.bn_stats == "match" else "recomputed")
            + (f" (largest mean shift {max(shifts):.3f} std)" if shifts else "")
            + (f"; {len(skipped)} skipped (e.g. {skipped[0].node}: {skipped[0].reason})" if skipped else ""),
            markup=False)


def finetune_final(c, res: pipeline.Result, calib: CalibData, ft, *, ep: str, tol: float, verify: bool,
                   shapes=None, arrays=None) -> None:
    """``--finetune N`` on the final result (searched or not): its held-out fidelity first (the
    "before"), then the distillation with a progress bar, then verification against the masked
    original rebuilt from the trained weights."""
    if calib.holdout.n and res.fidelity is None:
        with progress_bar(c, f"fidelity before finetuning on {calib.holdout.n} held-out samples") as progress:
            pipeline.measure_holdout(res, calib.holdout, ep, progress)
    with progress_bar(c, f"finetuning ({ft.steps} steps on {calib.fit.n} fit samples)") as progress:
        pipeline.finetune_result(res, calib.fit, ft, ep=ep, progress=progress)
    if verify and res.verification is None:
        with c.status("verifying...", spinner="dots"):
            pipeline.verify_result(res, shapes, arrays, ep, tol)


def print_grad_importance(c, imp: dict) -> None:
    """One line: the criterion, how many groups it scored, the gradient pass, and any l2 fallback."""
    n_l2 = int(imp.get("fallback_l2") or 0)
    groups = int(imp.get("groups") or 0)
    g = imp.get("gradients") or {}
    how = ""
    if g and not imp.get("disabled"):
        total = (g.get("seconds") or {}).get("total")
        how = (f" on gradients of {g.get('samples')} fit samples ({g.get('batches')} passes on {g.get('device')}"
               + (f", {total:.1f}s" if total is not None else "") + ")")
        losses = sorted(set((g.get("loss") or {}).values()))
        if losses:
            how += "; loss: " + ", ".join(losses)
    line = f"importance {imp['criterion']}: {groups - n_l2} of {groups} groups scored{how}"
    if imp.get("disabled"):
        line += f"; disabled ({imp['disabled']}): all {n_l2} by l2"
    elif n_l2:
        line += f"; {n_l2} by l2 (e.g. {imp['fallback'][0]['reason']})"
    c.print(line, markup=False)


def soft_model(res: pipeline.Result, ep: str, inputs) -> tuple[onnx.ModelProto, float]:
    """``--soft``: the plan as zeroed weights of the model P was cut from (O, O' or the rebuilt trained
    original: ``res.reference``), fully checked, and the largest relative difference of its outputs
    from P's on generated inputs (exit 4 when it does not compute what P computes)."""
    ref = res.reference if res.reference is not None else res.analysis
    soft = soft_prune(ref, res.plan)
    full_check(soft)
    feeds = make_inputs(res.analysis.model, inputs.shapes, arrays=inputs.arrays)
    check = compare(soft, soft, res.pruned, feeds, ep)
    err = max((o.rel_error for o in check.outputs), default=0.0)
    if not all(o.passed for o in check.outputs):
        raise RewriteError(f"--soft: the zeroed model does not compute what the pruned one does (relative error "
                           f"{err:.2e}); nothing written")
    return soft, err


def prune_steps(c, model: str, opts: PlanOptions, steps: int, *, an: pipeline.Analysis | None, calib: CalibData | None,
                acts, grads, comp: CompensateOptions | None, grad_settings, shapes=None, arrays=None,
                ep: str = "auto", tol: float = DEFAULT_TOL, verify: bool = False) -> tuple[pipeline.Result, list]:
    """``--steps K``: ``pipeline.run`` K times, step k on the model step k-1 left (analysed anew, with
    zero biases when compensating), with the options of ``pipeline.step_options`` (each group left
    with (1 - R*k/K) of its original units), activations or gradients captured again on the fit share
    for a data or gradient criterion (``acts``/``grads``: step 1's, captured on ``an``), the
    consumers compensated again, and each step verified against its own masked original (the run
    stops at a step that fails). Returns the last step's result, its ``before`` the original's stats
    and its ``fidelity`` (with calibration data) measured against the original on the held-out share,
    and the report's rows, one per step."""
    bias = comp is not None
    if an is None:
        with c.status("analyzing...", spinner="dots"):
            an = pipeline.analyze_model(model, shapes, head_mode=pipeline.head_mode_for(opts), input_arrays=arrays,
                                        bias_inputs=bias)
    original, res, first, rows = an, None, None, []
    for k in range(1, steps + 1):
        t0 = time.perf_counter()
        if k > 1:
            with c.status(f"step {k}/{steps}: analyzing...", spinner="dots"):
                an = pipeline.analyze_model(res.pruned, shapes, head_mode=pipeline.head_mode_for(opts),
                                            input_arrays=arrays, bias_inputs=bias)
            acts = grads = None
            if calib is not None and opts.importance in DATA_IMPORTANCES:
                with progress_bar(c, f"step {k}/{steps}: activations on {calib.fit.n} fit samples") as progress:
                    acts = pipeline.capture_activations(an, calib.fit, ep, progress, opts=opts)
            if calib is not None and opts.importance in GRADIENT_IMPORTANCES:
                with progress_bar(c, f"step {k}/{steps}: gradients ({opts.importance})") as progress:
                    grads = pipeline.gradient_scores_for(an, calib.fit, opts, grad_settings, progress, ep=ep)
        o = pipeline.step_options(original, an, opts, k, steps)
        with c.status(f"step {k}/{steps}: pruning...", spinner="dots"):
            res = pipeline.run(an.model, o, input_shapes=shapes, input_arrays=arrays, verify=verify, ep=ep, tol=tol,
                               analysis=an, calib=acts, compensation=comp,
                               fit=calib.fit if calib is not None else None, gradients=grads)
        first = first or res
        v = res.verification
        err = max((x.rel_error for x in v.outputs), default=0.0) if v is not None else None
        row = {"step": k, "ratio": o.ratio, "cumulative_ratio": opts.ratio * k / steps,
               "macs_before": res.before.macs, "macs_after": res.after.macs,
               "verification": None if v is None else {"passed": v.passed, "rel_error": err},
               "importance": res.plan.importance.get("criterion"), "seconds": time.perf_counter() - t0}
        rows.append(row)
        checked = "" if v is None else f", verification {'PASSED' if v.passed else 'FAILED'} (rel. error {err:.2e})"
        c.print(f"step {k}/{steps}: ratio {o.ratio:.4f}, MACs {res.before.macs:,} -> {res.after.macs:,} "
                f"({res.after.macs / max(1, first.before.macs):.3f}x of the original){checked}, importance "
                f"{row['importance']}, {row['seconds']:.1f}s", markup=False)
        if v is not None and not v.passed:
            break
    res.before = first.before
    if res.verification is not None:  # its fidelity column: against the original, not the step's own
        feeds = make_inputs(original.model, shapes, arrays=arrays)
        for out, f in zip(res.verification.outputs,
                          compare(original.model, original.model, res.pruned, feeds, ep, tol).outputs, strict=True):
            out.fidelity = f.fidelity
    res.timings["steps_total"] = sum(r["seconds"] for r in rows)
    if calib is not None:
        with progress_bar(c, f"fidelity against the original on {calib.holdout.n} held-out samples") as progress:
            t0 = time.perf_counter()
            res.fidelity = pipeline.measure_fidelity(original.model, res.pruned, calib.holdout, ep=ep,
                                                     progress=progress)
            res.timings["fidelity"] = time.perf_counter() - t0
    return res, rows


def channels_off(args, files) -> bool:
    """With ``--stripe-ratio`` and no channel amount (``--ratio``, head or layer ratios, a plan file
    with channel groups), the channel stage prunes nothing (ratio 0, weight importance: no capture)."""
    loaded = files.load is not None and any(
        not isinstance(e, dict) or e.get("kept_units") != e.get("units") for e in files.load.get("groups", []))
    return (args.ratio is None and args.head_ratio is None and args.head_dim_ratio is None and not args.layer_ratio
            and not loaded)


def loaded_stripe_plan(files) -> StripePlan | None:
    """The stripe plan a ``--load-plan`` file carries (its ``stripes`` entry), if any."""
    if files.load is None or files.load.get("stripes") is None:
        return None
    return StripePlan.from_json(json.dumps(files.load["stripes"]))


def stripe_stage(c, res: pipeline.Result, sopts: StripeOptions, files, calib: CalibData | None, timing: Timing, *,
                 ep: str, tol: float, verify: bool, shapes=None, arrays=None,
                 comp: CompensateOptions | None = None) -> pipeline.StripeStage:
    """``--stripe-ratio``: stripes of P (the channel stage's result, or the original) pruned, P
    replaced by the result in ``res`` (its stats, shapes and serialization); the stage's own
    verification is against P with the stripes zeroed. ``comp`` (lsq, with calibration data): the
    kept stripes are refitted on the fit share first (``rewrite/stripe_refit.py``)."""
    fit = calib.fit if calib is not None else None
    what = (f"stripes: scoring on {fit.n} fit samples, " if fit is not None else "stripes: ") + (
        "timing shrunk vs dense convs..." if sopts.mode == "shrink" and sopts.gate == "latency" else "selecting...")
    with c.status(what, spinner="dots"):
        stage = pipeline.run_stripes(res.pruned, sopts, original=res.analysis.model, plan=loaded_stripe_plan(files),
                                     fit=fit, ep=ep, threads=timing.threads, batch=timing.batch, verify=verify,
                                     tol=tol, input_shapes=shapes, input_arrays=arrays, compensation=comp)
    res.pruned, res.pruned_shapes, res.serialized = stage.model, stage.shapes, stage.serialized
    res.after = model_stats(stage.model, stage.shapes, registry=res.analysis.registry)
    res.fidelity = None
    res.timings.update({f"stripes_{k}": v for k, v in stage.timings.items()})
    return stage


def run(args) -> int:
    ex = EXECUTION.parse(args)
    calib_spec = CALIB.parse(args)
    targets = TARGETS.parse(args, data=calib_spec is not None)
    comp = COMPENSATE.parse(args, data=calib_spec is not None)
    req = PLAN.parse(args, ep=ex.ep, data=calib_spec is not None, compensated=comp.mode if comp is not None else None)
    output = OUTPUT.parse(args, source=args.model)
    report = REPORT.parse(args, protect=(args.model, output))
    files = PLAN_FILES.parse(args, protect=(args.model, output, report))
    inputs = INPUTS.parse(args)
    timing, verify = TIMING.parse(args), VERIFY.parse(args)
    grad_settings = GRADIENTS.parse(args, req.options.importance, ex.ep, req.options.seed)
    ft = FINETUNE.parse(args, data=calib_spec is not None, ep=ex.ep, seed=req.options.seed)
    steps = STEPS.parse(args)
    sopts = STRIPES.parse(args)
    if sopts is None and loaded_stripe_plan(files) is not None:  # the plan file decides the stripes
        sopts = STRIPES.parse(args, ratio=loaded_stripe_plan(files).ratio or 0.0)
    chan_off = sopts is not None and channels_off(args, files)
    stripe_comp = comp  # the stripe stage's refit: the parsed mode, also when the channel stage is off
    if chan_off:
        req = dataclasses.replace(req, options=dataclasses.replace(req.options, ratio=0.0, importance="l2"))
        comp = None
    if targets.given and files.load is not None:
        raise UserError("--target-macs/--target-latency/--target-fidelity search a plan; they cannot be used with "
                        "--load-plan")
    c = console()
    print_round_to(c, req)
    if calib_spec is not None and calib_spec.path is not None:  # tried first where the default sizes fail
        use_data_sizes(calib_sample_shapes(calib_spec.path))
    opts, extra, an = req.options, req.report(), None
    calib, analyzed, acts = None, 0.0, None
    if calib_spec is not None:  # checked against the model before any planning
        t0 = time.perf_counter()
        with c.status("analyzing...", spinner="dots"):
            an = pipeline.analyze_model(args.model, inputs.shapes, head_mode=pipeline.head_mode_for(opts, files.load),
                                        input_arrays=inputs.arrays, bias_inputs=comp is not None)
        analyzed = time.perf_counter() - t0
        calib = open_calib(an.model, calib_spec)
        check_labels(grad_settings.labels if grad_settings is not None else None, calib.available, args.labels)
    metric = None
    if targets.fidelity is not None:  # before any capture: --metric agreement on a non-classifier fails here
        with c.status("reading the outputs on the held-out share...", spinner="dots"):
            metric = choose_metric(output_kinds(an.model, calib.holdout, ep=ex.ep), targets.metric)
    if calib is not None and files.load is None and opts.importance in DATA_IMPORTANCES:
        with progress_bar(c, f"activations on {calib.fit.n} fit samples") as progress:
            acts = pipeline.capture_activations(an, calib.fit, ex.ep, progress, opts=opts)
    grads = None
    if calib is not None and files.load is None and opts.importance in GRADIENT_IMPORTANCES:
        limit = grad_settings.samples_for(opts.importance)
        n = calib.fit.n if limit is None else min(limit, calib.fit.n)
        with progress_bar(c, f"gradients ({opts.importance}) on {n} fit samples") as progress:
            grads = pipeline.gradient_scores_for(an, calib.fit, opts, grad_settings, progress, ep=ex.ep)
        if grads.disabled:
            c.print(f"warning: gradient criteria disabled for this model: {grads.disabled}; scored by l2", markup=False)
    res = None
    if steps > 1:
        res, extra["steps"] = prune_steps(c, args.model, opts, steps, an=an, calib=calib, acts=acts, grads=grads,
                                          comp=comp, grad_settings=grad_settings, shapes=inputs.shapes,
                                          arrays=inputs.arrays, ep=ex.ep, tol=ex.tol, verify=verify)
    elif targets.fidelity is not None:
        found, res = search_fidelity(args.model, opts, targets, metric, an, calib, acts, comp, c, ep=ex.ep,
                                     tol=ex.tol, verify=verify, shapes=inputs.shapes, arrays=inputs.arrays,
                                     grads=grads)
        extra.update(found)
    elif targets.given:
        if targets.allocate == "latency":
            opts, found, an = search_allocation(args.model, opts, targets, timing, ex.ep, inputs.shapes, c, inputs.arrays,
                                                an, acts, grads, calib=calib, comp=comp)
        else:
            opts, found, an = search_target(args.model, opts, targets, timing, ex.ep, inputs.shapes, c, inputs.arrays,
                                            an, acts, grads)
        extra.update(found)
    if res is None:
        with c.status("pruning...", spinner="dots"):
            res = pipeline.run(args.model, opts, input_shapes=inputs.shapes, input_arrays=inputs.arrays,
                               plan_json=files.load, verify=verify and ft is None and not chan_off, ep=ex.ep,
                               tol=ex.tol, analysis=an,
                               calib=acts, compensation=comp, fit=calib.fit if calib is not None else None,
                               gradients=grads)
    if ft is not None:
        finetune_final(c, res, calib, ft, ep=ex.ep, tol=ex.tol, verify=verify, shapes=inputs.shapes,
                       arrays=inputs.arrays)
    if analyzed:
        res.timings["analyze"] = analyzed
    stage = None
    if sopts is not None and (res.verification is None or res.verification.passed):
        stage = stripe_stage(c, res, sopts, files, calib, timing, ep=ex.ep, tol=ex.tol, verify=verify,
                             shapes=inputs.shapes, arrays=inputs.arrays, comp=stripe_comp)
        extra["stripes"] = stage.to_json()
    if calib is not None and res.fidelity is None:
        with progress_bar(c, f"fidelity on {calib.holdout.n} held-out samples") as progress:
            pipeline.measure_holdout(res, calib.holdout, ex.ep, progress)
    ok = (res.verification is None or res.verification.passed) and (
        stage is None or stage.verification is None or stage.verification.passed)
    if VERBOSITY.parse(args) and res.analysis.changes:
        c.print("normalization:", markup=False)
        for line in res.analysis.changes:
            c.print(f"  {line}", markup=False)
    sizes_line = describe_probe_sizes(probe_sizes(res.analysis.model, res.analysis.input_shapes,
                                                  res.analysis.input_arrays))
    if sizes_line:
        c.print(sizes_line, markup=False)
    print_stats_table(c, res.before, res.after, title=f"onnxprune: {Path(args.model).name}", fidelity=res.fidelity)
    print_coverage(c, res.analysis.cg)
    c.print(f"pruned {len(res.plan.pruned())} groups; {len(res.plan.frozen)} frozen"
            + (f" (e.g. {res.plan.frozen[next(iter(res.plan.frozen))][0]})" if res.plan.frozen else ""))
    imp = res.plan.importance
    if imp.get("criterion") in DATA_IMPORTANCES:
        c.print(f"importance {imp['criterion']}: {imp['groups']} groups scored on {imp['samples']} fit samples "
                f"({imp['tapped_tensors']} tensors captured in {imp['capture_s'] or 0:.1f}s)"
                + (f"; {imp['fallback_l2']} by l2 (e.g. {imp['fallback'][0]['reason']})" if imp["fallback_l2"] else ""),
                markup=False)
    if imp.get("criterion") in GRAD_CRITERIA:
        print_grad_importance(c, imp)
    if res.compensation is not None:
        print_compensation(c, res.compensation)
        print_batchnorms(c, res.compensation)
    if res.distillation is not None:
        print_finetune(c, res.distillation, res.fidelity_before, res.fidelity)
    if stage is not None:
        print_stripes(c, stage)
    if res.verification is not None:
        print_verification(c, res.verification)
    if stage is not None and stage.verification is not None:
        c.print("stripes: " + ("the model with the channel plan's stripes zeroed" if res.plan.pruned()
                               else "the original with the planned stripes zeroed") + " is the masked original here",
                markup=False)
        print_verification(c, stage.verification)
    if report:
        write_json(report, {"model": args.model, "output": output if ok else None, **res.to_json(), **extra})
    if files.save:
        saved = res.plan.to_json(res.analysis.cg)
        if stage is not None:
            saved["stripes"] = json.loads(stage.plan.to_json())
        write_json(files.save, saved)
    if not ok:
        c.print("FAILED: verification failed; no output written")
        return 1
    if args.soft:
        soft, err = soft_model(res, ex.ep, inputs)
        c.print(f"--soft: the plan written as zeroed weights in the unchanged graph (MACs and shapes of the "
                f"original); its outputs differ from the pruned model's by {err:.2e} (relative)", markup=False)
        save_atomic(soft, output)
    else:
        save_atomic(res.pruned, output, data=res.serialized)
    c.print(f"wrote {output}")
    verified = res.verification is not None or (stage is not None and stage.verification is not None)
    c.print("PASSED" if verified else "DONE (not verified; add --verify)")
    return 0
