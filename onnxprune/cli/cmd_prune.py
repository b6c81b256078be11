"""``onnxprune prune MODEL -o PRUNED``: plan, rewrite, check, (verify), save; with ``--target-macs`` or
``--target-latency`` the ratio is searched first, on the same analysis that is then pruned."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from onnxprune import pipeline
from onnxprune.cli.args import (
    ExecutionArgs,
    ModelInputArgs,
    OutputArgs,
    PlanArgs,
    PlanFileArgs,
    ReportArgs,
    TargetArgs,
    Targets,
    Timing,
    TimingArgs,
    VerbosityArgs,
    VerifyArgs,
)
from onnxprune.cli.common import console
from onnxprune.cli.render import print_coverage, print_round_to, print_stats_table, print_verification
from onnxprune.errors import UserError
from onnxprune.ir.io import save_atomic, write_json
from onnxprune.measure.targets import Evaluation, RatioSearch
from onnxprune.planning.options import PlanOptions
from onnxprune.runtime.session import resolve_ep

OUTPUT = OutputArgs(required=True)
VERIFY = VerifyArgs()
REPORT = ReportArgs()
INPUTS = ModelInputArgs()
EXECUTION = ExecutionArgs()
PLAN = PlanArgs()
PLAN_FILES = PlanFileArgs()
TARGETS = TargetArgs()
TIMING = TimingArgs(warmup=3, repeat=20)  # for --target-latency
GROUPS = (OUTPUT, VERIFY, REPORT, INPUTS, EXECUTION, PLAN, PLAN_FILES, TARGETS, TIMING)
VERBOSITY = VerbosityArgs()  # on the root parser (cli/__init__.py)


NAME, HELP = "prune", "prune a model"
POSITIONALS = (("model", {}),)


def search_target(model: str, opts: PlanOptions, targets: Targets, timing: Timing, ep: str, shapes,
                  c, arrays=None) -> tuple[PlanOptions, dict, pipeline.Analysis]:
    """Searches the uniform ratio for ``targets`` on one analysis. Returns (the options at the ratio
    found, what goes into the report, the analysis, for ``pipeline.run`` to prune)."""
    if targets.latency is not None:
        ep = resolve_ep(ep)
    with c.status("searching the ratio for the target...", spinner="dots") as status:
        an = pipeline.analyze_model(model, shapes, head_mode=pipeline.head_mode_for(opts), input_arrays=arrays)

        def progress(ev: Evaluation) -> None:
            lat = f", latency {ev.latency_ratio:.3f}x" if ev.latency_ratio is not None else ""
            status.update(f"searching the ratio: {ev.ratio:.4f} -> MACs {ev.mac_ratio:.3f}x{lat}")

        search = RatioSearch(an, opts, target_macs=targets.macs, target_latency=targets.latency, ep=ep,
                             threads=timing.threads, batch=timing.batch, input_shapes=shapes,
                             warmup=timing.warmup, repeat=timing.repeat, progress=progress)
        res = search.search()
    c.print(res.summary())
    return dataclasses.replace(opts, ratio=res.ratio), {"target": res.to_json()}, an


def run(args) -> int:
    ex = EXECUTION.parse(args)
    req = PLAN.parse(args, ep=ex.ep)
    output = OUTPUT.parse(args, source=args.model)
    report = REPORT.parse(args, protect=(args.model, output))
    files = PLAN_FILES.parse(args, protect=(args.model, output, report))
    inputs = INPUTS.parse(args)
    targets, timing, verify = TARGETS.parse(args), TIMING.parse(args), VERIFY.parse(args)
    if targets.given and files.load is not None:
        raise UserError("--target-macs/--target-latency search a plan; they cannot be used with --load-plan")
    c = console()
    print_round_to(c, req)
    opts, extra, an = req.options, req.report(), None
    if targets.given:
        opts, found, an = search_target(args.model, opts, targets, timing, ex.ep, inputs.shapes, c, inputs.arrays)
        extra.update(found)
    with c.status("pruning...", spinner="dots"):
        res = pipeline.run(args.model, opts, input_shapes=inputs.shapes, input_arrays=inputs.arrays,
                           plan_json=files.load, verify=verify, ep=ex.ep, tol=ex.tol, analysis=an)
    ok = res.verification is None or res.verification.passed
    if VERBOSITY.parse(args) and res.analysis.changes:
        c.print("normalization:", markup=False)
        for line in res.analysis.changes:
            c.print(f"  {line}", markup=False)
    print_stats_table(c, res.before, res.after, title=f"onnxprune: {Path(args.model).name}")
    print_coverage(c, res.analysis.cg)
    c.print(f"pruned {len(res.plan.pruned())} groups; {len(res.plan.frozen)} frozen"
            + (f" (e.g. {res.plan.frozen[next(iter(res.plan.frozen))][0]})" if res.plan.frozen else ""))
    if res.verification is not None:
        print_verification(c, res.verification)
    if report:
        write_json(report, {"model": args.model, "output": output if ok else None, **res.to_json(), **extra})
    if files.save:
        write_json(files.save, res.plan.to_json(res.analysis.cg))
    if not ok:
        c.print("FAILED: verification failed; no output written")
        return 1
    save_atomic(res.pruned, output, data=res.serialized)
    c.print(f"wrote {output}")
    c.print("PASSED" if res.verification is not None else "DONE (not verified; add --verify)")
    return 0
