"""Measured speedup of pruned models on onnxruntime (CPU), side by side in one process.

    python bench/speed.py [--threads 2] [--batches 1,8] [--min-seconds 8] [--no-write]

(a) MobileNetV2 and EfficientNet-B0 (legacy export, BN folded) pruned at 0.5 twice, with
    ``--round-to auto`` (the CPU's NCHWc block: 16 with AVX-512F, 8 with AVX2) and ``--round-to 1``;
    the original and both pruned models are timed interleaved in one measurement.
(b) ResNet-50 (legacy export) pruned at 0.5 with ``--round-to auto``: measured speedup against the MAC
    ratio (MACs before / MACs after); acceptance: speedup >= 0.9 x MAC ratio at batch 1 and 8.

Every measurement: one onnxruntime session per model, ``--threads`` intra-op threads, 5 warm-up runs
each, then rounds of a block of 3 runs per model (the first of each block, which re-warms the caches
after the other model, not recorded) with the order rotated every round, for at least ``--repeat``
rounds and ``--min-seconds``; speedup = ratio of the medians. ResNet-50 is also timed with strictly
alternating single runs, for comparison. Writes the ``speed`` section of
bench/RESULTS.md and bench/results/speed.json.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import sys
import time

from _common import machine_line, md_table, publish
from onnxprune.models import zoo

from onnxprune import pipeline
from onnxprune.measure.latency import DEFAULT_BLOCK, Runner, measure_runners
from onnxprune.measure.stats import model_stats
from onnxprune.planning.options import PlanOptions
from onnxprune.runtime.inputs import make_inputs
from onnxprune.runtime.machine import auto_round_to, describe


def prune(an, ratio: float, round_to: int):
    plan = pipeline.build_plan(an, PlanOptions(ratio=ratio, round_to=round_to))
    pruned, shapes = pipeline.apply_plan(an, plan)
    return pruned, model_stats(pruned, shapes)


def measure(models: dict, batch: int, threads: int, repeat: int, min_seconds: float, ep: str,
            block: int = DEFAULT_BLOCK) -> dict:
    names = list(models)
    feeds = make_inputs(models[names[0]], batch=batch)
    runners = [Runner(models[n], feeds, ep, threads) for n in names]
    lats = measure_runners(runners, warmup=5, repeat=repeat, min_seconds=min_seconds, block=block)
    return {n: lat for n, lat in zip(names, lats, strict=True)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--min-seconds", type=float, default=8.0)
    ap.add_argument("--ep", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--archs", default="mobilenet_v2,efficientnet_b0")
    ap.add_argument("--reference", default="resnet50")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    auto, why = auto_round_to(args.ep)
    started = _dt.datetime.now().isoformat(timespec="seconds")
    machine = machine_line(f"onnxruntime with {args.threads} intra-op threads.")
    print(machine, file=sys.stderr)
    rows_a, rows_b, data = [], [], {"machine": describe(), "round_to_auto": auto, "why": why, "runs": []}
    t0 = time.perf_counter()

    for arch in [a for a in args.archs.split(",") if a]:
        an = pipeline.analyze_model(str(zoo.export(arch, "legacy")))
        base = model_stats(an.model, an.shapes)
        p_auto, s_auto = prune(an, args.ratio, auto)
        p_one, s_one = prune(an, args.ratio, 1)
        for b in batches:
            lat = measure({"original": an.model, "auto": p_auto, "one": p_one}, b, args.threads, args.repeat,
                          args.min_seconds, args.ep)
            o = lat["original"].median_ms
            sp_auto, sp_one = o / lat["auto"].median_ms, o / lat["one"].median_ms
            rows_a.append([arch, b, f"{o:.2f}", f"{lat['auto'].median_ms:.2f}", f"{lat['one'].median_ms:.2f}",
                           f"{base.macs / s_auto.macs:.2f}x", f"{base.macs / s_one.macs:.2f}x",
                           f"**{sp_auto:.2f}x**", f"{sp_one:.2f}x",
                           f"{lat['one'].median_ms / lat['auto'].median_ms:.2f}x", lat["original"].runs])
            data["runs"].append({"arch": arch, "batch": b, "macs": {"original": base.macs, "auto": s_auto.macs,
                                                                     "one": s_one.macs},
                                 "latency": {k: v.to_json() for k, v in lat.items()},
                                 "speedup": {"auto": sp_auto, "one": sp_one}})
            print(f"{arch} b{b}: original {o:.2f} ms, auto({auto}) {sp_auto:.2f}x, round-to 1 {sp_one:.2f}x",
                  file=sys.stderr)

    if args.reference:
        arch = args.reference
        an = pipeline.analyze_model(str(zoo.export(arch, "legacy")))
        base = model_stats(an.model, an.shapes)
        p_auto, s_auto = prune(an, args.ratio, auto)
        mac_ratio = base.macs / s_auto.macs
        for b in batches:
            lat = measure({"original": an.model, "auto": p_auto}, b, args.threads, args.repeat, args.min_seconds,
                          args.ep)
            o, p = lat["original"].median_ms, lat["auto"].median_ms
            sp = o / p
            ok = sp >= 0.9 * mac_ratio
            strict = measure({"original": an.model, "auto": p_auto}, b, args.threads, args.repeat,
                             args.min_seconds / 2, args.ep, block=1)
            sp1 = strict["original"].median_ms / strict["auto"].median_ms
            rows_b.append([arch, b, f"{base.macs / 1e9:.3f}G", f"{s_auto.macs / 1e9:.3f}G", f"{mac_ratio:.2f}x",
                           f"{o:.2f}", f"{p:.2f}", f"**{sp:.2f}x**", f"{sp / mac_ratio:.2f}",
                           "yes" if ok else "**no**", lat["original"].runs,
                           f"{sp1:.2f}x ({sp1 / mac_ratio:.2f})"])
            data["runs"].append({"arch": arch, "batch": b, "macs": {"original": base.macs, "auto": s_auto.macs},
                                 "latency": {k: v.to_json() for k, v in lat.items()}, "speedup": sp,
                                 "mac_ratio": mac_ratio, "speedup_over_mac_ratio": sp / mac_ratio,
                                 "acceptance": ok, "strict_alternation": {k: v.to_json() for k, v in strict.items()},
                                 "strict_speedup": sp1})
            print(f"{arch} b{b}: speedup {sp:.2f}x, MAC ratio {mac_ratio:.2f}x -> {sp / mac_ratio:.2f}", file=sys.stderr)

    cmd = "python bench/speed.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [f"## Measured speedup on onnxruntime {args.ep.upper()} (ratio {args.ratio})", "",
             f"Run {started} with `{cmd.strip()}` ({time.perf_counter() - t0:.0f} s). {machine}", "",
             f"Every cell is one interleaved measurement in one process: a session per model, 5 warm-up runs "
             f"each, then >= {args.repeat} rounds and >= {args.min_seconds:g} s; in a round each model runs "
             f"{DEFAULT_BLOCK} times in a row, the first run of the block (re-warming the caches after the other "
             f"model) not recorded; order rotated every round; latency = median ms, speedup = ratio of medians. Models: the zoo's legacy "
             f"exports (random weights, BN folded), pruned with L2 magnitude at ratio {args.ratio}.", ""]
    if rows_a:
        lines += [f"### `--round-to auto` ({auto}: {why}) vs `--round-to 1`", ""]
        lines += md_table(["model", "batch", "original ms", f"auto ({auto}) ms", "round-to 1 ms",
                           "MAC ratio auto", "MAC ratio 1", "speedup auto", "speedup 1",
                           "auto faster than 1 by", "runs timed"], rows_a)
        lines.append("")
    if rows_b:
        lines += [f"### {args.reference}: measured speedup vs MAC ratio (`--round-to auto`, acceptance: "
                  "speedup >= 0.9 x MAC ratio)", ""]
        lines += md_table(["model", "batch", "MACs before", "MACs after", "MAC ratio", "original ms", "pruned ms",
                           "speedup", "speedup / MAC ratio", ">= 0.9", "runs timed",
                           "strict alternation: speedup (/ MAC ratio)"], rows_b)
        lines += ["", "The last column times the same pair with single runs strictly alternating (`--block 1`): "
                  "every run then starts with the other model's weights in the caches, which costs the "
                  "smaller model relatively more; it is shown for transparency, the acceptance uses the "
                  "steady-state (block) measurement."]
        lines.append("")
    return publish("speed", lines, data, write=not args.no_write)


if __name__ == "__main__":
    sys.exit(main())
