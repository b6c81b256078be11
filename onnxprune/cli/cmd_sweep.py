"""``onnxprune sweep MODEL --ratios 0,0.1,...,0.9``: MACs, parameters, latency, speedup and fidelity
against the pruning ratio, as a table, a JSON report and a PNG plot (see ``measure.sweep``)."""

from __future__ import annotations

import math
from pathlib import Path

from rich.table import Table

from onnxprune import pipeline
from onnxprune.cli.common import (
    add_timing_args,
    check_writable,
    console,
    parse_arrays,
    parse_round_to,
    parse_shapes,
)
from onnxprune.errors import UserError
from onnxprune.ir.io import write_json
from onnxprune.measure.stats import human
from onnxprune.measure.sweep import Row, plot, sweep
from onnxprune.planning.options import PlanOptions
from onnxprune.runtime.machine import auto_round_to, describe
from onnxprune.runtime.session import resolve_ep

DEFAULT_RATIOS = "0,0.1,...,0.9"


def parse_ratios(text: str) -> list[float]:
    """``0,0.25,0.5`` or an arithmetic progression written ``first,second,...,last``."""
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    try:
        if "..." in items:
            i = items.index("...")
            if i < 2 or i != len(items) - 2:
                raise ValueError
            head = [float(x) for x in items[:i]]
            last = float(items[-1])
            step = head[-1] - head[-2]
            if step <= 0:
                raise ValueError
            n = int(math.floor((last - head[0]) / step + 1e-9))
            vals = [round(head[0] + k * step, 10) for k in range(n + 1)]
            if abs(vals[-1] - last) > 1e-9:
                vals.append(last)
        else:
            vals = [float(x) for x in items]
    except ValueError:
        raise UserError(f"--ratios {text}: expected numbers separated by commas, or 'a,b,...,z'") from None
    if not vals:
        raise UserError("--ratios: no ratio given")
    for v in vals:
        if not 0.0 <= v < 1.0:
            raise UserError(f"--ratios: every ratio must be in [0, 1), got {v}")
    return sorted(set(vals))


def add(sub, parents) -> None:
    s = sub.add_parser("sweep", parents=parents, help="MACs, parameters, latency and fidelity against the ratio")
    s.add_argument("model")
    s.add_argument("--ratios", default=DEFAULT_RATIOS, help=f"ratios to try (default {DEFAULT_RATIOS})")
    add_timing_args(s, warmup=3, repeat=20)
    s.add_argument("--round-to", type=parse_round_to, default=1, help="as for prune (auto: by --ep and CPU)")
    s.add_argument("--importance", default="l2", choices=["l1", "l2", "bn", "random"])
    s.add_argument("--global", dest="global_", action="store_true")
    s.add_argument("--ignore", action="append", default=[], metavar="REGEX")
    s.add_argument("--allow-approximate", action="store_true")
    s.add_argument("--plot", metavar="FILE.png")
    s.add_argument("--report", metavar="FILE.json")
    s.set_defaults(fn=run)


def run(args) -> int:
    ratios = parse_ratios(args.ratios)
    ep = resolve_ep(args.ep)
    check_writable(args.plot, "--plot")
    check_writable(args.report, "--report")
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise UserError("--plot needs matplotlib: pip install 'onnxprune[bench]'") from None
    round_to, why = (auto_round_to(ep) if args.round_to == "auto" else (args.round_to, ""))
    opts = PlanOptions(ratio=max(ratios), ignore=args.ignore, round_to=round_to, global_=args.global_,
                       importance=args.importance, allow_approximate=args.allow_approximate)
    opts.validate()
    c = console()
    shapes = parse_shapes(args.input_shape)
    if why:
        c.print(f"--round-to auto: {round_to} ({why})")
    with c.status("analyzing...", spinner="dots") as status:
        an = pipeline.analyze_model(args.model, shapes)

        def progress(row: Row) -> None:
            status.update(f"ratio {row.ratio:g}: {row.speedup:.2f}x; measuring the next ratio...")

        status.update("pruning and measuring (interleaved with the original)...")
        rows = sweep(an, opts, ratios, ep=ep, threads=args.threads, batch=args.batch, input_shapes=shapes,
                     input_arrays=parse_arrays(args.input), warmup=args.warmup, repeat=args.repeat,
                     progress=progress)
    name = Path(args.model).name
    t = Table(title=f"onnxprune sweep: {name} ({ep.upper()}, batch {args.batch}, threads "
                    f"{args.threads or 'default'}, round-to {round_to})")
    for col in ("ratio", "MACs", "params", "latency", "p90", "speedup", "MAC ratio", "rel. error"):
        t.add_column(col, justify="right")
    for r in rows:
        t.add_row(f"{r.ratio:g}", human(r.macs), human(r.params), f"{r.latency_ms:.2f} ms", f"{r.latency_p90_ms:.2f} ms",
                  f"{r.speedup:.2f}x", f"{r.mac_ratio:.2f}x", f"{r.fidelity:.2e}")
    c.print(t)
    if args.plot:
        plot(rows, args.plot, f"{name}: {ep.upper()}, batch {args.batch}, round-to {round_to}")
        c.print(f"wrote {args.plot}")
    if args.report:
        write_json(args.report, {"model": args.model, "ep": ep, "batch": args.batch, "threads": args.threads,
                                  "round_to": round_to, "importance": args.importance, "machine": describe(),
                                  "rows": [r.to_json() for r in rows]})
        c.print(f"wrote {args.report}")
    return 0
