"""``onnxprune sweep MODEL --ratios 0,0.1,...,0.9``: MACs, parameters, latency, speedup and fidelity
against the pruning ratio, as a table, a JSON report and a PNG plot (see ``measure.sweep``)."""

from __future__ import annotations

from pathlib import Path

from rich.table import Table

from onnxprune import pipeline
from onnxprune.cli.args import (
    ExecutionArgs,
    ModelInputArgs,
    PlanArgs,
    ReportArgs,
    SweepArgs,
    TimingArgs,
)
from onnxprune.cli.common import console
from onnxprune.cli.render import print_round_to
from onnxprune.ir.io import write_json
from onnxprune.measure.stats import human
from onnxprune.measure.sweep import Row, plot, sweep
from onnxprune.runtime.machine import describe
from onnxprune.runtime.session import resolve_ep

SWEEP = SweepArgs()
INPUTS = ModelInputArgs()
EXECUTION = ExecutionArgs(tolerance=False)
TIMING = TimingArgs(warmup=3, repeat=20)
PLAN = PlanArgs(amounts=False)  # --ratios says how much
REPORT = ReportArgs()
GROUPS = (SWEEP, INPUTS, EXECUTION, TIMING, PLAN, REPORT)


NAME, HELP = "sweep", "MACs, parameters, latency and fidelity against the ratio"
POSITIONALS = (("model", {}),)


def run(args) -> int:
    spec = SWEEP.parse(args, protect=(args.model,))
    ep = resolve_ep(EXECUTION.parse(args).ep)
    report_path = REPORT.parse(args, protect=(args.model, spec.plot))
    timing = TIMING.parse(args)
    req = PLAN.parse(args, ep=ep, ratio=max(spec.ratios))
    opts = req.options
    inputs = INPUTS.parse(args)
    c = console()
    print_round_to(c, req)
    with c.status("analyzing...", spinner="dots") as status:
        an = pipeline.analyze_model(args.model, inputs.shapes, input_arrays=inputs.arrays)

        def progress(row: Row) -> None:
            status.update(f"ratio {row.ratio:g}: {row.speedup:.2f}x; measuring the next ratio...")

        status.update("pruning and measuring (interleaved with the original)...")
        rows = sweep(an, opts, list(spec.ratios), ep=ep, threads=timing.threads, batch=timing.batch,
                     input_shapes=inputs.shapes, input_arrays=inputs.arrays, warmup=timing.warmup,
                     repeat=timing.repeat, progress=progress)
    name = Path(args.model).name
    t = Table(title=f"onnxprune sweep: {name} ({ep.upper()}, batch {timing.batch}, threads "
                    f"{timing.threads or 'default'}, round-to {opts.round_to})")
    for col in ("ratio", "MACs", "params", "latency", "p90", "speedup", "MAC ratio", "rel. error"):
        t.add_column(col, justify="right")
    for r in rows:
        t.add_row(f"{r.ratio:g}", human(r.macs), human(r.params), f"{r.latency_ms:.2f} ms", f"{r.latency_p90_ms:.2f} ms",
                  f"{r.speedup:.2f}x", f"{r.mac_ratio:.2f}x", f"{r.fidelity:.2e}")
    c.print(t)
    if spec.plot:
        plot(rows, spec.plot, f"{name}: {ep.upper()}, batch {timing.batch}, round-to {opts.round_to}")
        c.print(f"wrote {spec.plot}")
    if report_path:
        write_json(report_path, {"model": args.model, "ep": ep, "batch": timing.batch, "threads": timing.threads,
                                 "round_to": opts.round_to, "importance": opts.importance, "machine": describe(),
                                 "rows": [r.to_json() for r in rows]})
        c.print(f"wrote {report_path}")
    return 0
