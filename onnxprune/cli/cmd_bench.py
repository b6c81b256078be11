"""``onnxprune bench MODEL [PRUNED]``: onnxruntime latency of one model or a pair, interleaved."""

from __future__ import annotations

from onnxprune.analysis.shapes import infer_shapes
from onnxprune.cli.args import ExecutionArgs, ModelInputArgs, ReportArgs, RoundsArgs, TimingArgs
from onnxprune.cli.common import console
from onnxprune.ir.io import load, write_json
from onnxprune.measure.latency import Runner, batch_of, measure_runners, round_ratio_spread, speedup
from onnxprune.measure.stats import human, model_stats
from onnxprune.runtime.inputs import make_inputs
from onnxprune.runtime.session import resolve_ep

INPUTS = ModelInputArgs()
EXECUTION = ExecutionArgs(tolerance=False)
TIMING = TimingArgs(warmup=5, repeat=30)
ROUNDS = RoundsArgs()
REPORT = ReportArgs()
GROUPS = (INPUTS, EXECUTION, TIMING, ROUNDS, REPORT)


NAME, HELP = "bench", "onnxruntime latency, interleaved"
POSITIONALS = (("model", {}), ("pruned", {"nargs": "?"}),)


def run(args) -> int:
    """``onnxprune bench MODEL [PRUNED]``: latency (and MACs) of one model or of a pair."""
    c = console()
    ep = resolve_ep(EXECUTION.parse(args).ep)  # fails loudly (exit 2, one line) when CUDA is asked for and missing
    timing, rounds = TIMING.parse(args), ROUNDS.parse(args)
    paths = [args.model] + ([args.pruned] if args.pruned else [])
    inputs = INPUTS.parse(args)
    report_path = REPORT.parse(args, protect=tuple(paths))
    models = [load(p) for p in paths]
    feeds = make_inputs(models[0], inputs.shapes, batch=timing.batch, arrays=inputs.arrays)
    in_shapes = {k: tuple(v.shape) for k, v in feeds.items()}
    if timing.batch != 1 and batch_of(feeds) != timing.batch:
        c.print(f"note: the inputs have a static batch of {batch_of(feeds)}; --batch {timing.batch} "
                f"does not apply (give shapes with --input-shape)")
    stats = []
    for m in models:
        sh = infer_shapes(m, in_shapes)
        stats.append(model_stats(m, sh))
    with c.status("measuring (interleaved runs)...", spinner="dots"):
        runners = [Runner(m, feeds, ep, timing.threads) for m in models]
        lats = measure_runners(runners, timing.warmup, timing.repeat, rounds.min_seconds, block=rounds.block)
    prov = lats[0].providers
    c.print(f"execution provider: {lats[0].ep.upper()} ({', '.join(prov)}"
            f"{'; IO binding' if lats[0].ep == 'cuda' else ''}), threads "
            f"{timing.threads or 'default'}, batch {lats[0].batch}")
    for name, lat, st in zip(paths, lats, stats, strict=True):
        c.print(f"  {name}: median {lat.median_ms:.3f} ms, p90 {lat.p90_ms:.3f} ms, "
                f"{lat.throughput:.1f} samples/s (batch {lat.batch}, {lat.runs} runs); "
                f"{human(st.macs)} MACs, {human(st.params)} parameters")
    report = {"ep": lats[0].ep, "providers": prov, "threads": timing.threads, "batch": lats[0].batch,
              "latency": [lat.to_json() for lat in lats],
              "stats": [{"model": p, "macs": s.macs, "params": s.params} for p, s in zip(paths, stats, strict=True)]}
    if len(lats) == 2:
        sp = speedup(lats[0], lats[1])
        lo, hi = round_ratio_spread(lats[0], lats[1])
        mac_ratio = stats[0].macs / stats[1].macs if stats[1].macs else float("nan")
        c.print(f"  speedup: {sp:.2f}x (ratio of medians, interleaved runs; per-round IQR {lo:.2f}-{hi:.2f}x)"
                f"; MACs {human(stats[0].macs)} -> {human(stats[1].macs)}: {mac_ratio:.2f}x fewer"
                f" (speedup / MAC ratio {sp / mac_ratio:.2f})")
        report.update({"speedup": sp, "speedup_iqr": [lo, hi], "mac_ratio": mac_ratio})
    if report_path:
        write_json(report_path, report)
    return 0
