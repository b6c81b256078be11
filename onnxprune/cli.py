"""Command line: inspect, groups, prune, verify, bench, demo.

User errors are one line on stderr with exit code 2 and no output file; verification failure exits
1; nothing to prune exits 3; a refused rewrite exits 4. The last line of prune/verify/demo says
PASSED or FAILED.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from pathlib import Path

import numpy as np

from onnxprune.errors import OnnxPruneError, UserError

EXIT_NOTHING_TO_PRUNE = 3


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2
        sys.stderr.write(f"onnxprune: error: {message}\n")
        raise SystemExit(2)


def _console():
    from rich.console import Console

    return Console(highlight=False, soft_wrap=True)


# ----------------------------------------------------------------------------------------------
# shared argument groups


def _model_args() -> argparse.ArgumentParser:
    p = _Parser(add_help=False)
    g = p.add_argument_group("model inputs")
    g.add_argument("--input-shape", action="append", default=[], metavar="NAME=1x3x224x224",
                   help="shape of a graph input (repeatable); dynamic dims otherwise: batch 1, "
                        "spatial 224, others 16")
    g.add_argument("--input", action="append", default=[], metavar="NAME=FILE.npy",
                   help="value of a graph input from a .npy file (repeatable)")
    return p


def _ep_args() -> argparse.ArgumentParser:
    p = _Parser(add_help=False)
    g = p.add_argument_group("execution")
    g.add_argument("--ep", default="auto", choices=["auto", "cpu", "cuda"],
                   help="onnxruntime execution provider (auto: CUDA when available)")
    g.add_argument("--tol", type=float, default=1e-4, help="relative-error tolerance (default 1e-4)")
    return p


def _plan_args() -> argparse.ArgumentParser:
    p = _Parser(add_help=False)
    g = p.add_argument_group("plan")
    g.add_argument("--ratio", type=float, default=None,
                   help="fraction of units removed per channel group (default 0.5; 0 when a head option is given). "
                        "Attention heads and head dimensions are only pruned by --head-ratio/--head-dim-ratio")
    g.add_argument("--head-ratio", type=float, default=None,
                   help="remove floor(H*R) whole heads of every attention block (never all)")
    g.add_argument("--head-dim-ratio", type=float, default=None,
                   help="remove the same head-dimension positions from q/k (and v/out) of every head")
    g.add_argument("--layer-ratio", action="append", default=[], metavar="REGEX=R",
                   help="ratio R for groups whose producing node matches REGEX (repeatable, first wins)")
    g.add_argument("--ignore", action="append", default=[], metavar="REGEX",
                   help="freeze groups touching a node matching REGEX (repeatable)")
    from onnxprune.hw import parse_round_to

    g.add_argument("--round-to", type=parse_round_to, default=1,
                   help="keep unit counts multiples of N (default 1); auto: the execution provider's channel "
                        "block (16 on AVX-512 CPUs, 8 on AVX2 and CUDA)")
    g.add_argument("--global", dest="global_", action="store_true", help="rank units across groups")
    g.add_argument("--max-ratio", type=float, default=0.9, help="per-group ceiling with --global (default 0.9)")
    g.add_argument("--importance", default="l2", choices=["l1", "l2", "bn", "random"])
    g.add_argument("--allow-approximate", action="store_true",
                   help="also prune groups mixed by LayerNorm/Softmax/reductions (changes the function)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--save-plan", metavar="FILE")
    g.add_argument("--load-plan", metavar="FILE")
    return p


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got '{text}'") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def add_timing_args(parser, warmup: int, repeat: int) -> None:
    """Execution provider and measurement options shared by bench and sweep (all validated)."""
    parser.add_argument("--ep", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--threads", type=_positive_int, default=None)
    parser.add_argument("--batch", type=_positive_int, default=1)
    parser.add_argument("--warmup", type=_positive_int, default=warmup)
    parser.add_argument("--repeat", type=_positive_int, default=repeat)


def _split_items(items: list[str], flag: str, form: str, parse):
    """NAME=VALUE options: {NAME: parse(VALUE)}; any failure is one line naming the option."""
    out = {}
    for it in items:
        if "=" not in it:
            raise UserError(f"{flag} {it}: expected {form}")
        name, value = it.rsplit("=", 1)
        try:
            out[name] = parse(value)
        except (ValueError, OSError) as exc:
            raise UserError(f"{flag} {it}: {exc}") from None
    return out


def _parse_dims(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(d) for d in text.lower().split("x"))
    except ValueError:
        raise ValueError("dims must be integers separated by 'x'") from None


def _load_npy(path: str) -> np.ndarray:
    try:
        return np.load(path)
    except Exception as exc:  # noqa: BLE001 - numpy raises several types
        raise ValueError(f"cannot read ({type(exc).__name__})") from None


def _parse_shapes(items: list[str]) -> dict[str, tuple[int, ...]]:
    return _split_items(items, "--input-shape", "NAME=DIMxDIMx...", _parse_dims)


def _parse_arrays(items: list[str]) -> dict[str, np.ndarray]:
    return _split_items(items, "--input", "NAME=FILE.npy", _load_npy)


def _parse_layer_ratios(items: list[str]) -> list[tuple[str, float]]:
    out = []
    for it in items:
        if "=" not in it:
            raise UserError(f"--layer-ratio {it}: expected REGEX=R")
        rx, r = it.rsplit("=", 1)
        try:
            out.append((rx, float(r)))
        except ValueError:
            raise UserError(f"--layer-ratio {it}: R must be a number") from None
    return out


def _probe_dir(parent: Path, what: str) -> None:
    """The directory must really take a file (os.access lies for root on /proc and /sys)."""
    import tempfile

    if not parent.is_dir():
        raise UserError(f"{what}: directory {parent} does not exist")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".onnxprune-probe.", dir=parent)
        os.close(fd)
        os.unlink(tmp)
    except OSError as exc:
        raise UserError(f"{what}: directory {parent} is not writable ({exc.strerror})") from None


def _same_file(a: str | Path, b: str | Path) -> bool:
    pa, pb = Path(a), Path(b)
    try:
        return pa.exists() and pb.exists() and pa.resolve() == pb.resolve() or (
            not pb.exists() and pa.exists() and pa.resolve() == pb.resolve())
    except OSError:
        return False


def _check_output(inp: str, out: str) -> None:
    if _same_file(inp, out):
        raise UserError("output path equals the input path; the input is never overwritten")
    po = Path(out)
    if po.exists() and po.is_dir():
        raise UserError(f"output {po} is a directory")
    _probe_dir(po.parent if str(po.parent) else Path("."), "output")


def _check_writable(path: str | None, what: str, protected: tuple[str, ...] = ()) -> None:
    if not path:
        return
    for other in protected:
        if other and _same_file(other, path):
            raise UserError(f"{what} {path} would overwrite {other}")
    p = Path(path)
    if p.exists() and p.is_dir():
        raise UserError(f"{what} {path} is a directory")
    _probe_dir(p.parent if str(p.parent) else Path("."), what)


def _write_json(path: str, data: dict) -> None:
    import tempfile

    p = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", dir=p.parent if str(p.parent) else ".")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1, default=_json_default)
    os.replace(tmp, p)


def _json_default(o):
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(type(o))


# ----------------------------------------------------------------------------------------------
# printing


def print_stats_table(console, before, after, latency=None, title="onnxprune") -> None:
    from rich.table import Table

    from onnxprune.stats import delta, human

    t = Table(title=title)
    t.add_column("")
    t.add_column("Original", justify="right")
    t.add_column("Pruned", justify="right")
    t.add_column("Δ", justify="right")
    t.add_row("nodes", str(before.nodes), str(after.nodes), delta(before.nodes, after.nodes))
    for op in sorted(set(before.ops) | set(after.ops), key=lambda o: -before.ops.get(o, 0))[:6]:
        b, a = before.ops.get(op, 0), after.ops.get(op, 0)
        t.add_row(f"  {op}", str(b), str(a), delta(b, a))
    t.add_row("parameters", human(before.params), human(after.params), delta(before.params, after.params))
    t.add_row("MACs", human(before.macs), human(after.macs), delta(before.macs, after.macs))
    t.add_row("size", human(before.size_bytes, "B"), human(after.size_bytes, "B"),
              delta(before.size_bytes, after.size_bytes))
    if latency is not None:
        lo, lp = latency
        t.add_row(f"latency median ({lo.ep}, batch {lo.batch})", f"{lo.median_ms:.2f} ms", f"{lp.median_ms:.2f} ms",
                  delta(lo.median_ms, lp.median_ms))
        t.add_row("latency p90", f"{lo.p90_ms:.2f} ms", f"{lp.p90_ms:.2f} ms", delta(lo.p90_ms, lp.p90_ms))
        t.add_row("speedup", "", f"{lo.median_ms / lp.median_ms:.2f}x", "")
    console.print(t)


def print_verification(console, v) -> None:
    scope = "pruned vs masked original" if v.exact else "EXACT GROUPS ONLY: pruned-by-exact-groups vs masked original"
    console.print(f"verification on {v.ep.upper()} ({scope}, tolerance {v.tol:g}):")
    for o in v.outputs:
        status = "PASSED" if o.passed else "FAILED"
        console.print(f"  {o.name} {list(o.shape)}: rel. error {o.rel_error:.3e} (min passing tol "
                      f"{o.rel_error:.1e}) {status}; fidelity vs original {o.fidelity:.3e}")
    if v.note:
        console.print(f"  note: {v.note}")
    if not v.exact:
        worst = max((o.fidelity for o in v.outputs), default=0.0)
        console.print(f"  APPROXIMATE: the pruned model changes the function (fidelity rel. error {worst:.3e}); "
                      "it is not exact")


def print_coverage(console, cg) -> None:
    prunable, total = cg.coverage()
    pct = 100.0 * prunable / total if total else 0.0
    console.print(f"coverage: {prunable}/{total} channels prunable ({pct:.1f}%), "
                  f"{sum(g.prunable for g in cg.groups)}/{len(cg.groups)} groups")
    if cg.unknown_ops:
        console.print("unknown ops (barriers): " + ", ".join(f"{k} x{len(v)}" for k, v in cg.unknown_ops.items()))


# ----------------------------------------------------------------------------------------------
# commands


def cmd_inspect(args) -> int:
    from onnxprune.pipeline import analyze_model
    from onnxprune.stats import human, model_stats

    an = analyze_model(args.model, _parse_shapes(args.input_shape))
    st = model_stats(an.model, an.shapes)
    report = {"model": args.model, "opset": an.cg.opset, "stats": st.to_json(),
              "groups": len(an.cg.groups), "prunable_groups": sum(g.prunable for g in an.cg.groups),
              "coverage": dict(zip(("prunable_channels", "channels"), an.cg.coverage(), strict=True)),
              "unknown_ops": {k: len(v) for k, v in an.cg.unknown_ops.items()}}
    if args.json:
        print(json.dumps(report, indent=1, default=_json_default))
        return 0
    c = _console()
    c.print(f"{args.model}: opset {an.cg.opset}, {st.nodes} nodes, {human(st.params)} parameters, "
            f"{human(st.macs)} MACs, {human(st.size_bytes, 'B')}")
    c.print("ops: " + ", ".join(f"{k} {v}" for k, v in st.ops.most_common()))
    print_coverage(c, an.cg)
    return 0


def cmd_groups(args) -> int:
    from onnxprune.api import DependencyGraph

    dg = DependencyGraph(args.model, _parse_shapes(args.input_shape))
    groups = dg.groups
    if args.json:
        print(json.dumps({"groups": [g.to_json() for g in groups]}, indent=1, default=_json_default))
        return 0
    c = _console()
    for g in groups:
        c.print(g.details(), markup=False)
        c.print()
    print_coverage(c, dg.analysis.cg)
    return 0


def _resolve_round_to(args) -> int:
    """``--round-to auto`` resolved for this run's --ep and CPU (the reason kept for the report)."""
    if args.round_to != "auto":
        return args.round_to
    from onnxprune.hw import auto_round_to

    value, args.round_to_auto = auto_round_to(getattr(args, "ep", "auto"))
    return value


def _plan_options(args):
    from onnxprune.plan import PlanOptions

    ratio = args.ratio
    if ratio is None:
        ratio = 0.0 if (args.head_ratio is not None or args.head_dim_ratio is not None) else 0.5
    return PlanOptions(ratio=ratio, layer_ratios=_parse_layer_ratios(args.layer_ratio), ignore=args.ignore,
                       head_ratio=args.head_ratio, head_dim_ratio=args.head_dim_ratio,
                       round_to=_resolve_round_to(args), global_=args.global_, max_ratio=args.max_ratio,
                       importance=args.importance, allow_approximate=args.allow_approximate, seed=args.seed)


def _load_plan_file(path: str | None) -> dict | None:
    if not path:
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise UserError(f"no such plan file: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"plan file {path} is not JSON") from None


def cmd_prune(args) -> int:
    from onnxprune import model as io
    from onnxprune import pipeline

    opts = _plan_options(args)
    opts.validate()
    _check_output(args.model, args.output)
    _check_writable(args.report, "--report", (args.model, args.output))
    _check_writable(args.save_plan, "--save-plan", (args.model, args.output, args.report))
    plan_json = _load_plan_file(args.load_plan)
    c = _console()
    from onnxprune.targets import before_prune

    speed_report = before_prune(args, opts, c)  # --round-to auto, --target-macs/--target-latency
    with c.status("pruning...", spinner="dots"):
        res = pipeline.run(args.model, opts, input_shapes=_parse_shapes(args.input_shape),
                           input_arrays=_parse_arrays(args.input), plan_json=plan_json,
                           verify=args.verify, ep=args.ep, tol=args.tol)
    ok = res.verification is None or res.verification.passed
    print_stats_table(c, res.before, res.after, title=f"onnxprune: {Path(args.model).name}")
    print_coverage(c, res.analysis.cg)
    c.print(f"pruned {len(res.plan.pruned())} groups; {len(res.plan.frozen)} frozen"
            + (f" (e.g. {res.plan.frozen[next(iter(res.plan.frozen))][0]})" if res.plan.frozen else ""))
    if res.verification is not None:
        print_verification(c, res.verification)
    if args.report:
        _write_json(args.report, {"model": args.model, "output": args.output if ok else None, **res.to_json(),
                                  **speed_report})
    if args.save_plan:
        _write_json(args.save_plan, res.plan.to_json(res.analysis.cg))
    if not ok:
        if os.path.exists(args.output) and Path(args.output).resolve() != Path(args.model).resolve():
            pass  # never written: we only save after verification
        c.print("FAILED: verification failed; no output written")
        return 1
    io.save_atomic(res.pruned, args.output, data=res.serialized)
    c.print(f"wrote {args.output}")
    c.print("PASSED" if res.verification is not None else "DONE (not verified; add --verify)")
    return 0


def cmd_verify(args) -> int:
    from onnxprune import model as io
    from onnxprune import pipeline
    from onnxprune.plan import PlanOptions

    _check_writable(args.report, "--report", (args.original, args.pruned))
    plan_json = _load_plan_file(args.plan)
    shapes = _parse_shapes(args.input_shape)
    an = pipeline.analyze_model(args.original, shapes)
    plan = pipeline.build_plan(an, PlanOptions(), plan_json)
    pruned = io.load(args.pruned)
    feeds = io.make_inputs(an.model, shapes, arrays=_parse_arrays(args.input))
    v = pipeline.verify_plan(an, plan, pruned, feeds, args.ep, args.tol)
    c = _console()
    print_verification(c, v)
    if args.report:
        _write_json(args.report, {"verification": v.to_json()})
    c.print("PASSED" if v.passed else "FAILED")
    return 0 if v.passed else 1


def cmd_bench(args) -> int:
    from onnxprune.bench import run_bench

    return run_bench(args, _console())


def cmd_demo(args) -> int:
    import tempfile

    from onnxprune import pipeline
    from onnxprune.bench import measure
    from onnxprune.model import make_inputs
    from onnxprune.plan import PlanOptions

    try:
        from onnxprune.models import zoo
    except ImportError as exc:
        raise UserError(f"the demo needs torch and torchvision: pip install 'onnxprune[zoo]' ({exc})") from None
    c = _console()
    with c.status(f"building and exporting torchvision {args.arch} (random weights, calibrated BatchNorm)..."):
        path = zoo.export(args.arch, "legacy")
    c.print(f"model: {path}")
    with c.status(f"pruning {args.ratio:.0%} of every group and verifying..."):
        res = pipeline.run(str(path), PlanOptions(ratio=args.ratio), verify=True, ep=args.ep)
    out = Path(args.output) if args.output else Path(tempfile.gettempdir()) / f"{args.arch}_pruned.onnx"
    feeds = make_inputs(res.analysis.model)
    with c.status("benchmarking (interleaved runs)..."):
        lat = measure([res.analysis.model, res.pruned], feeds, args.ep, warmup=3, repeat=20)
    print_stats_table(c, res.before, res.after, latency=lat, title=f"onnxprune demo: {args.arch}, ratio {args.ratio}")
    print_coverage(c, res.analysis.cg)
    print_verification(c, res.verification)
    if not res.verification.passed:
        c.print("FAILED")
        return 1
    from onnxprune.model import save_atomic

    save_atomic(res.pruned, out)
    c.print(f"wrote {out}")
    c.print("PASSED")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="onnxprune", description="Structural pruning of ONNX models, verified with onnxruntime.")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)
    m, e, pl = _model_args(), _ep_args(), _plan_args()

    s = sub.add_parser("inspect", parents=[m], help="summary: ops, parameters, MACs, coverage")
    s.add_argument("model")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_inspect)

    s = sub.add_parser("groups", parents=[m], help="every group with its members (like group.details())")
    s.add_argument("model")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_groups)

    s = sub.add_parser("prune", parents=[m, e, pl], help="prune a model")
    s.add_argument("model")
    s.add_argument("-o", "--output", required=True)
    s.add_argument("--verify", action="store_true", help="verify against the masked original (exit 1 on failure)")
    s.add_argument("--report", metavar="FILE.json")
    from onnxprune.targets import add_target_args

    add_target_args(s)
    s.set_defaults(fn=cmd_prune)

    s = sub.add_parser("verify", parents=[m, e], help="verify a pruned model against its original and plan")
    s.add_argument("original")
    s.add_argument("pruned")
    s.add_argument("--plan", required=True)
    s.add_argument("--report", metavar="FILE.json")
    s.set_defaults(fn=cmd_verify)

    s = sub.add_parser("bench", parents=[m], help="onnxruntime latency, interleaved")
    s.add_argument("model")
    s.add_argument("pruned", nargs="?")
    add_timing_args(s, warmup=5, repeat=30)
    s.add_argument("--min-seconds", type=float, default=0.0, help="keep measuring at least this long")
    s.add_argument("--block", type=int, default=3,
                   help="runs per model per round, the first of each block not recorded (default 3; "
                        "1: strict alternation, each run after the other model's)")
    s.add_argument("--report", metavar="FILE.json")
    s.set_defaults(fn=cmd_bench)

    from onnxprune.sweep import add_sweep_parser

    add_sweep_parser(sub, [m])

    s = sub.add_parser("demo", help="build ResNet-18, prune 50%%, verify, benchmark, print the table")
    s.add_argument("--arch", default="resnet18")
    s.add_argument("--ratio", type=float, default=0.5)
    s.add_argument("--ep", default="auto", choices=["auto", "cpu", "cuda"])
    s.add_argument("-o", "--output")
    s.set_defaults(fn=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    warnings.filterwarnings("ignore")
    try:
        return args.fn(args)
    except OnnxPruneError as exc:
        sys.stderr.write(f"onnxprune: error: {exc}\n")
        return exc.exit_code
    except KeyboardInterrupt:
        sys.stderr.write("onnxprune: interrupted\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
