"""``onnxprune prune MODEL -o PRUNED``: plan, rewrite, check, (verify), save; with ``--target-macs`` or
``--target-latency`` the ratio is searched first, on the same analysis that is then pruned."""

from __future__ import annotations

from pathlib import Path

from onnxprune import pipeline
from onnxprune.cli.common import (
    check_output,
    check_writable,
    console,
    load_plan_file,
    parse_arrays,
    parse_shapes,
    plan_options,
    positive_int,
)
from onnxprune.cli.render import print_coverage, print_stats_table, print_verification
from onnxprune.errors import UserError
from onnxprune.ir.io import save_atomic, write_json
from onnxprune.measure.targets import Evaluation, RatioSearch
from onnxprune.runtime.session import resolve_ep


def add(sub, parents) -> None:
    s = sub.add_parser("prune", parents=parents, help="prune a model")
    s.add_argument("model")
    s.add_argument("-o", "--output", required=True)
    s.add_argument("--verify", action="store_true", help="verify against the masked original (exit 1 on failure)")
    s.add_argument("--report", metavar="FILE.json")
    g = s.add_argument_group("targets (search the uniform --ratio)")
    g.add_argument("--target-macs", type=float, default=None, metavar="F",
                   help="prune until MACs <= F x original (bisection over the ratio)")
    g.add_argument("--target-latency", type=float, default=None, metavar="F",
                   help="prune until measured latency <= F x original on --ep (interleaved runs)")
    g.add_argument("--threads", type=positive_int, default=None, help="onnxruntime threads for --target-latency")
    g.add_argument("--batch", type=positive_int, default=1, help="batch for --target-latency (default 1)")
    s.set_defaults(fn=run)


def search_target(args, opts, c, shapes) -> tuple[dict, pipeline.Analysis | None]:
    """Says what ``--round-to auto`` resolved to and, with a target, searches the ratio and sets
    ``opts.ratio``. Returns (what goes into the report, the analysis the search made)."""
    extra: dict = {}
    why = getattr(args, "round_to_auto", None)
    if why:
        c.print(f"--round-to auto: {opts.round_to} ({why})")
        extra["round_to"] = {"requested": "auto", "resolved": opts.round_to, "why": why}
    tm, tl = args.target_macs, args.target_latency
    if tm is None and tl is None:
        return extra, None
    if args.load_plan:
        raise UserError("--target-macs/--target-latency search a plan; they cannot be used with --load-plan")
    ep = resolve_ep(args.ep) if tl is not None else args.ep
    with c.status("searching the ratio for the target...", spinner="dots") as status:
        an = pipeline.analyze_model(args.model, shapes, head_mode=pipeline.head_mode_for(opts))

        def progress(ev: Evaluation) -> None:
            lat = f", latency {ev.latency_ratio:.3f}x" if ev.latency_ratio is not None else ""
            status.update(f"searching the ratio: {ev.ratio:.4f} -> MACs {ev.mac_ratio:.3f}x{lat}")

        search = RatioSearch(an, opts, target_macs=tm, target_latency=tl, ep=ep, threads=args.threads,
                             batch=args.batch, input_shapes=shapes, progress=progress)
        res = search.search()
    opts.ratio = res.ratio
    c.print(res.summary())
    extra["target"] = res.to_json()
    return extra, an


def run(args) -> int:
    opts = plan_options(args)
    opts.validate()
    check_output(args.model, args.output)
    check_writable(args.report, "--report", (args.model, args.output))
    check_writable(args.save_plan, "--save-plan", (args.model, args.output, args.report))
    plan_json = load_plan_file(args.load_plan)
    shapes = parse_shapes(args.input_shape)
    arrays = parse_arrays(args.input)
    c = console()
    speed_report, an = search_target(args, opts, c, shapes)
    with c.status("pruning...", spinner="dots"):
        res = pipeline.run(args.model, opts, input_shapes=shapes, input_arrays=arrays, plan_json=plan_json,
                           verify=args.verify, ep=args.ep, tol=args.tol, analysis=an)
    ok = res.verification is None or res.verification.passed
    if args.verbose and res.analysis.changes:
        c.print("normalization:", markup=False)
        for line in res.analysis.changes:
            c.print(f"  {line}", markup=False)
    print_stats_table(c, res.before, res.after, title=f"onnxprune: {Path(args.model).name}")
    print_coverage(c, res.analysis.cg)
    c.print(f"pruned {len(res.plan.pruned())} groups; {len(res.plan.frozen)} frozen"
            + (f" (e.g. {res.plan.frozen[next(iter(res.plan.frozen))][0]})" if res.plan.frozen else ""))
    if res.verification is not None:
        print_verification(c, res.verification)
    if args.report:
        write_json(args.report, {"model": args.model, "output": args.output if ok else None, **res.to_json(),
                                 **speed_report})
    if args.save_plan:
        write_json(args.save_plan, res.plan.to_json(res.analysis.cg))
    if not ok:
        c.print("FAILED: verification failed; no output written")
        return 1
    save_atomic(res.pruned, args.output, data=res.serialized)
    c.print(f"wrote {args.output}")
    c.print("PASSED" if res.verification is not None else "DONE (not verified; add --verify)")
    return 0
