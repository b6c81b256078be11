"""``onnxprune sweep MODEL --ratios 0,0.1,...,0.9``: MACs, parameters, latency, speedup and fidelity
against the pruning ratio, as a table, a JSON report and a PNG plot.

The model is analyzed once; every ratio is planned and rewritten from that analysis, and each pruned
model is timed interleaved with the original (one original session, warmed once), so every speedup is
a ratio of medians taken under the same conditions. Ratio 0 times the original against a second
session of itself: its speedup is the noise floor. Fidelity is the relative error of the pruned
model's output against the original's on the same (generated or given) inputs: max|P - O| / max|O|,
worst output. MACs and parameters are those of one inference at the analysis shapes (batch 1 unless
``--input-shape`` says otherwise), whatever ``--batch`` the latency is measured at.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

from onnxprune.errors import UserError

log = logging.getLogger(__name__)

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


@dataclass
class Row:
    ratio: float
    macs: int
    params: int
    latency_ms: float
    latency_p90_ms: float
    original_ms: float
    speedup: float
    mac_ratio: float  # original / pruned
    fidelity: float  # relative error of the pruned output vs the original's
    pruned_groups: int

    def to_json(self) -> dict:
        return dict(self.__dict__)


def sweep(an, opts, ratios: list[float], *, ep: str = "auto", threads: int | None = None, batch: int = 1,
          input_shapes=None, input_arrays=None, warmup: int = 3, repeat: int = 20, progress=None) -> list[Row]:
    from onnxprune import model as io
    from onnxprune.bench import Runner, measure_runners, rel_error, speedup
    from onnxprune.stats import model_stats
    from onnxprune.targets import prune_at

    feeds = io.make_inputs(an.model, input_shapes, batch=batch, arrays=input_arrays)
    base = model_stats(an.model, an.shapes)  # MACs at the analysis shapes (batch 1 unless given)
    original = Runner(an.model, feeds, ep, threads)
    reference = original.outputs()
    rows: list[Row] = []
    for r in ratios:
        if r == 0.0:
            pruned, st, groups = an.model, base, 0
        else:
            pruned, shapes, plan = prune_at(an, opts, r)
            st = model_stats(pruned, shapes)
            groups = len(plan.pruned())
        other = Runner(pruned, feeds, ep, threads)
        fid = rel_error(reference, other.outputs())
        lo, lp = measure_runners([original, other], warmup, repeat)
        row = Row(r, st.macs, st.params, lp.median_ms, lp.p90_ms, lo.median_ms, speedup(lo, lp),
                  base.macs / st.macs if st.macs else float("nan"), fid, groups)
        rows.append(row)
        if progress is not None:
            progress(row)
    return rows


def plot(rows: list[Row], path: str, title: str) -> None:
    try:
        import matplotlib
    except ImportError:
        raise UserError("--plot needs matplotlib: pip install 'onnxprune[bench]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [r.ratio for r in rows]
    fig, ax1 = plt.subplots(figsize=(7, 4.2), dpi=110)
    ax1.plot(x, [r.latency_ms for r in rows], "o-", color="tab:blue", label="latency (median)")
    ax1.plot(x, [r.original_ms for r in rows], ":", color="tab:blue", alpha=0.6, label="original latency")
    ax1.set_xlabel("pruning ratio")
    ax1.set_ylabel("latency [ms]", color="tab:blue")
    ax1.set_ylim(bottom=0)
    ax2 = ax1.twinx()
    ax2.plot(x, [r.macs / 1e9 for r in rows], "s--", color="tab:red", label="MACs")
    ax2.set_ylabel("GMACs", color="tab:red")
    ax2.set_ylim(bottom=0)
    lines = ax1.get_lines() + ax2.get_lines()
    ax1.legend(lines, [ln.get_label() for ln in lines], loc="upper right", fontsize=8)
    ax1.set_title(title, fontsize=9)
    ax1.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def add_sweep_parser(sub, parents) -> None:
    from onnxprune.cli import add_timing_args
    from onnxprune.hw import parse_round_to

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
    s.set_defaults(fn=run_sweep)


def run_sweep(args) -> int:
    from rich.table import Table

    from onnxprune import pipeline
    from onnxprune.cli import _check_writable, _console, _parse_arrays, _parse_shapes, _write_json
    from onnxprune.hw import auto_round_to, describe
    from onnxprune.plan import PlanOptions
    from onnxprune.runtime import resolve_ep
    from onnxprune.stats import human

    ratios = parse_ratios(args.ratios)
    ep = resolve_ep(args.ep)
    if args.batch < 1:
        raise UserError(f"--batch must be >= 1, got {args.batch}")
    _check_writable(args.plot, "--plot")
    _check_writable(args.report, "--report")
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise UserError("--plot needs matplotlib: pip install 'onnxprune[bench]'") from None
    round_to, why = (auto_round_to(ep) if args.round_to == "auto" else (args.round_to, ""))
    opts = PlanOptions(ratio=max(ratios), ignore=args.ignore, round_to=round_to, global_=args.global_,
                       importance=args.importance, allow_approximate=args.allow_approximate)
    opts.validate()
    c = _console()
    shapes = _parse_shapes(args.input_shape)
    if why:
        c.print(f"--round-to auto: {round_to} ({why})")
    with c.status("analyzing...", spinner="dots") as status:
        an = pipeline.analyze_model(args.model, shapes)

        def progress(row: Row) -> None:
            status.update(f"ratio {row.ratio:g}: {row.speedup:.2f}x; measuring the next ratio...")

        status.update("pruning and measuring (interleaved with the original)...")
        rows = sweep(an, opts, ratios, ep=ep, threads=args.threads, batch=args.batch, input_shapes=shapes,
                     input_arrays=_parse_arrays(args.input), warmup=args.warmup, repeat=args.repeat,
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
        _write_json(args.report, {"model": args.model, "ep": ep, "batch": args.batch, "threads": args.threads,
                                  "round_to": round_to, "importance": args.importance, "machine": describe(),
                                  "rows": [r.to_json() for r in rows]})
        c.print(f"wrote {args.report}")
    return 0
