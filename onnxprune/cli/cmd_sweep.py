"""``onnxprune sweep MODEL --ratios 0,0.1,...,0.9``: MACs, parameters, latency, speedup and fidelity
against the pruning ratio, as a table, a JSON report and a PNG plot (see ``measure.sweep``). With
``--calib`` (or ``--calib-images``) every ratio is pruned as ``prune`` would prune it (data-aware
importance on one capture of the fit share, compensation, default lsq) and judged on the held-out
share; without, the last column is the relative error on generated inputs, and says so."""

from __future__ import annotations

from pathlib import Path

from rich.table import Table

from onnxprune import pipeline
from onnxprune.cli.args import (
    CalibArgs,
    CompensateArgs,
    ExecutionArgs,
    GradientArgs,
    ModelInputArgs,
    PlanArgs,
    ReportArgs,
    SweepArgs,
    TimingArgs,
    check_labels,
)
from onnxprune.cli.cmd_prune import holdout_trial
from onnxprune.cli.common import console
from onnxprune.cli.render import print_round_to, progress_bar
from onnxprune.ir.io import write_json
from onnxprune.measure.stats import human
from onnxprune.measure.sweep import Row, plot, sweep
from onnxprune.planning.importance import DATA_IMPORTANCES, GRADIENT_IMPORTANCES
from onnxprune.runtime.calib import open_calib
from onnxprune.runtime.inputs import calib_sample_shapes, use_data_sizes
from onnxprune.runtime.machine import describe
from onnxprune.runtime.session import resolve_ep

SWEEP = SweepArgs()
INPUTS = ModelInputArgs()
EXECUTION = ExecutionArgs(tolerance=False)
TIMING = TimingArgs(warmup=3, repeat=20)
PLAN = PlanArgs(amounts=False)  # --ratios says how much
REPORT = ReportArgs()
CALIB = CalibArgs()
COMPENSATE = CompensateArgs()
GRADIENTS = GradientArgs()
GROUPS = (SWEEP, INPUTS, EXECUTION, TIMING, PLAN, REPORT, CALIB, COMPENSATE, GRADIENTS)


TABLE_WIDTH = 132

NAME, HELP = "sweep", "MACs, parameters, latency and fidelity against the ratio"
POSITIONALS = (("model", {}),)


def _fmt(v: float | None, pct: bool = False) -> str:
    if v is None:
        return "-"
    return f"{100 * v:.1f}%" if pct else f"{v:.4f}"


def table(rows: list[Row], title: str) -> Table:
    """The sweep table: held-out fidelity columns with --calib, else the generated-input error."""
    t = Table(title=title)
    held = any(r.held_out is not None for r in rows)
    agree = held and any(r.agreement is not None for r in rows)
    cols = ["ratio", "MACs", "params", "latency", "p90", "speedup", "MAC ratio"]
    cols += ((["agreement"] if agree else []) + ["cosine", "rel. error (L2)"]) if held else ["rel. error (generated)"]
    for col in cols:
        t.add_column(col, justify="right", no_wrap=True)
    for r in rows:
        cells = [f"{r.ratio:g}", human(r.macs), human(r.params), f"{r.latency_ms:.2f} ms", f"{r.latency_p90_ms:.2f} ms",
                 f"{r.speedup:.2f}x", f"{r.mac_ratio:.2f}x"]
        if held:
            cells += ([_fmt(r.agreement, pct=True)] if agree else []) + [_fmt(r.cosine), f"{r.rel_error_l2:.3e}"]
        else:
            cells.append(f"{r.rel_error_generated:.2e}")
        t.add_row(*cells)
    return t


def run(args) -> int:
    spec = SWEEP.parse(args, protect=(args.model,))
    ep = resolve_ep(EXECUTION.parse(args).ep)
    report_path = REPORT.parse(args, protect=(args.model, spec.plot))
    timing = TIMING.parse(args)
    calib_spec = CALIB.parse(args)
    comp = COMPENSATE.parse(args, data=calib_spec is not None)
    req = PLAN.parse(args, ep=ep, ratio=max(spec.ratios), data=calib_spec is not None, compensated=comp.mode if comp is not None else None)
    opts = req.options
    grad_settings = GRADIENTS.parse(args, opts.importance, EXECUTION.parse(args).ep, opts.seed)
    inputs = INPUTS.parse(args)
    c = console()
    print_round_to(c, req)
    if calib_spec is not None and calib_spec.path is not None:  # tried first where the default sizes fail
        use_data_sizes(calib_sample_shapes(calib_spec.path))
    with c.status("analyzing...", spinner="dots"):
        an = pipeline.analyze_model(args.model, inputs.shapes, head_mode=pipeline.head_mode_for(opts),
                                     input_arrays=inputs.arrays, bias_inputs=comp is not None)
    trial, calib = None, None
    if calib_spec is not None:
        calib = open_calib(an.model, calib_spec)
        acts = None
        if opts.importance in DATA_IMPORTANCES:
            with progress_bar(c, f"activations on {calib.fit.n} fit samples") as bar:
                acts = pipeline.capture_activations(an, calib.fit, ep, bar, opts=opts)
        grads = None
        if opts.importance in GRADIENT_IMPORTANCES:  # one collection for every ratio
            check_labels(grad_settings.labels, calib.available, args.labels)
            with progress_bar(c, f"gradients ({opts.importance}) on the fit samples") as bar:
                grads = pipeline.gradient_scores_for(an, calib.fit, opts, grad_settings, bar, ep=ep)
            if grads.disabled:
                c.print(f"warning: gradient criteria disabled for this model: {grads.disabled}; scored by l2",
                        markup=False)
        trial = holdout_trial(args.model, opts, an, calib, acts, comp, ep=ep, input_shapes=inputs.shapes,
                              input_arrays=inputs.arrays, c=c, grads=grads)

    def progress(row: Row) -> None:
        fid = (f", held-out agreement {_fmt(row.agreement, pct=True)}, cosine {_fmt(row.cosine)}"
               if row.held_out is not None else "")
        c.print(f"ratio {row.ratio:g}: MACs {row.mac_ratio:.2f}x fewer, speedup {row.speedup:.2f}x{fid}", markup=False)

    rows = sweep(an, opts, list(spec.ratios), ep=ep, threads=timing.threads, batch=timing.batch,
                 input_shapes=inputs.shapes, input_arrays=inputs.arrays, warmup=timing.warmup,
                 repeat=timing.repeat, progress=progress, trial=trial)
    name = Path(args.model).name
    if not c.is_terminal:  # a log or a pipe: wide enough that no figure is cut to fit 80 columns
        c.width = max(c.width, TABLE_WIDTH)
    c.print(table(rows, f"onnxprune sweep: {name} ({ep.upper()}, batch {timing.batch}, threads "
                        f"{timing.threads or 'default'}, round-to {opts.round_to})"))
    if calib is not None:
        c.print(f"fidelity on {calib.holdout.n} held-out samples (never fitted on), worst output; importance "
                f"{opts.importance}, compensation {comp.mode if comp is not None else 'none'}: the figures prune "
                "reports at each ratio", markup=False)
    else:
        c.print("rel. error (generated): max|P-O|/max|O| on generated inputs, not fidelity; give --calib for "
                "held-out fidelity", markup=False)
    if spec.plot:
        plot(rows, spec.plot, f"{name}: {ep.upper()}, batch {timing.batch}, round-to {opts.round_to}")
        c.print(f"wrote {spec.plot}")
    if report_path:
        write_json(report_path, {"model": args.model, "ep": ep, "batch": timing.batch, "threads": timing.threads,
                                 "round_to": opts.round_to, "importance": opts.importance, "machine": describe(),
                                 "compensation": comp.mode if comp is not None else "none",
                                 "calibration": calib.to_json() if calib is not None else None,
                                 "rows": [r.to_json() for r in rows]})
        c.print(f"wrote {report_path}")
    return 0
