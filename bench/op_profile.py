"""Where the time goes: onnxruntime's per-node profile of an original and its pruned model, by op type.

    python bench/op_profile.py [--arch resnet50] [--ratio 0.5] [--threads 2] [--batches 1,8] [--no-write]
    python bench/op_profile.py --archs mobilenet_v2,efficientnet_b0,... [--batches 8]

``--archs`` (several models, issue 14): per model and batch, the time of each *kind* of node --
convolutions split into stem (<= 4 input channels), depthwise, grouped, pointwise (1x1) and K×K dense,
Gemm/MatMul, and every other op type -- with its MACs before and after (counted from the shapes the
profiler records), so that the gap between the measured speedup and the MAC ratio is read off kind by
kind: a kind whose time falls by less than its MACs is where the remaining time goes. Writes the
``op_profile_models`` section of bench/RESULTS.md and bench/results/op_profile_models.json.

Explains a measured speedup that differs from the MAC ratio: after onnxruntime's graph optimizations
(NCHWc convolutions with fused Add/Relu, reorders), each op type's share of the run time before and
after pruning, and its own speedup. Both models run in alternation with profiling on (warm-up runs
excluded from the profile by starting it after them is not possible in onnxruntime, so the first
``--warmup`` runs of each are subtracted by skipping their events). Writes the ``op_profile`` section of
bench/RESULTS.md and bench/results/op_profile.json.
"""

from __future__ import annotations

import argparse
import collections
import datetime as _dt
import json
import os
import sys
import tempfile

import numpy as np
import onnxruntime as ort
from _common import machine_line, md_table, publish
from onnxprune.models import zoo

from onnxprune import pipeline
from onnxprune.measure.stats import model_stats
from onnxprune.planning.options import PlanOptions
from onnxprune.runtime.inputs import make_inputs
from onnxprune.runtime.machine import auto_round_to


def _session(model, threads: int, prefix: str):
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.enable_profiling = True
    so.profile_file_prefix = prefix
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _by_kind(path: str, warmup: int, runs: int, kinds: bool) -> dict[str, float]:
    with open(path) as f:
        events = json.load(f)
    whole = [ev["dur"] / 1e3 for ev in events if ev.get("cat") == "Session" and ev.get("name") == "model_run"]
    node_events = [ev for ev in events if ev.get("cat") == "Node" and ev.get("name", "").endswith("_kernel_time")]
    per_run = len(node_events) // (warmup + runs) if node_events else 0
    sums: dict[str, list[float]] = collections.defaultdict(lambda: [0.0] * runs)
    macs: dict[str, float] = collections.defaultdict(float)
    for i, ev in enumerate(node_events[per_run * warmup: per_run * (warmup + runs)]):
        key = node_kind(ev["args"]) if kinds else ev["args"].get("op_name", "?")
        sums[key][i // per_run] += ev["dur"] / 1e3
        if kinds and i < per_run:
            macs["macs:" + key] += node_macs(ev["args"])
    out = {k: float(np.median(v)) for k, v in sums.items()}  # median over runs of each kind's time
    out.update(macs)
    w = whole[warmup:] or whole
    out["(whole run, median)"] = float(np.median(w)) if w else 0.0
    return out


def profile_pair(original, pruned, feeds, threads: int, runs: int, warmup: int, tmp: str, tag: str,
                 kinds: bool = False) -> tuple[dict[str, float], dict[str, float]]:
    """Both models profiled in alternation (o, p, p, o, ...), so that drift of a shared machine hits both;
    per kind (or op type) the median over runs of its summed node time, ms."""
    so, sp = _session(original, threads, os.path.join(tmp, tag + "o")), _session(pruned, threads, os.path.join(tmp, tag + "p"))
    for i in range(warmup + runs):
        for sess in ((so, sp) if i % 2 == 0 else (sp, so)):
            sess.run(None, feeds)
    return _by_kind(so.end_profiling(), warmup, runs, kinds), _by_kind(sp.end_profiling(), warmup, runs, kinds)


def _shapes(args: dict, key: str) -> list[list[int]]:
    return [next(iter(d.values())) for d in args.get(key, []) if d]


def node_kind(args: dict) -> str:
    """A profiled node's kind: convolutions by their weight's shape (the profiler records the logical
    NCHW shapes also for NCHWc kernels), MatMul-like ops together, every other op by its type."""
    op = args.get("op_name", "?")
    ins = _shapes(args, "input_type_shape")
    if op in ("Conv", "FusedConv") and len(ins) >= 2 and len(ins[1]) == 4 and len(ins[0]) == 4:
        cin, (_, cpg, kh, kw) = ins[0][1], ins[1]
        if cin <= 4:
            return "Conv stem"
        if cpg == 1 and cin > 1:
            return "Conv depthwise"
        if cpg != cin:
            return "Conv grouped"
        return "Conv 1x1" if kh * kw == 1 else "Conv KxK"
    if op in ("Gemm", "MatMul", "FusedMatMul", "FusedGemm"):
        return "Gemm/MatMul"
    return op


def node_macs(args: dict) -> float:
    """Multiply-accumulates of a Conv or Gemm/MatMul node from its recorded shapes (0 for others)."""
    op = args.get("op_name", "?")
    ins, outs = _shapes(args, "input_type_shape"), _shapes(args, "output_type_shape")
    if not ins or not outs:
        return 0.0
    out = float(np.prod(outs[0]))
    if op in ("Conv", "FusedConv") and len(ins) >= 2 and len(ins[1]) >= 3:
        return out * float(np.prod(ins[1][1:]))
    if op in ("Gemm", "FusedGemm") and len(ins) >= 2:
        k = ins[0][0] if args.get("transA") else ins[0][-1]
        return out * k
    if op in ("MatMul", "FusedMatMul") and ins[0]:
        return out * ins[0][-1]
    return 0.0


def _export(arch: str):
    if arch in getattr(zoo, "ALL_ARCHS", zoo.ARCHS):
        return zoo.export(arch, "legacy")
    from onnxprune.models import transformers as tr
    if arch in tr.VISION_ARCHS:
        return tr.export_vision(arch, "legacy")
    raise SystemExit(f"op_profile: unknown arch {arch!r}")


def _interleaved_speedup(original, pruned, feeds, threads: int) -> tuple[float, float, float]:
    from onnxprune.measure.latency import Runner, measure_runners, round_ratio_spread
    o, p = measure_runners([Runner(original, feeds, "cpu", threads), Runner(pruned, feeds, "cpu", threads)],
                           repeat=20, min_seconds=8.0)
    lo, hi = round_ratio_spread(o, p)
    return o.median_ms / p.median_ms, lo, hi


def models_main(args, argv) -> int:
    started = _dt.datetime.now().isoformat(timespec="seconds")
    machine = machine_line(f"onnxruntime with {args.threads} intra-op threads.")
    r, _ = auto_round_to("cpu")
    batches = [int(x) for x in args.batches.split(",")]
    cmd = " ".join(argv if argv is not None else sys.argv[1:])
    lines = [f"## Where the time goes after `--ratio {args.ratio} --round-to auto` ({r}), by kind of node (issue 14)",
             "", f"Run {started} with `python bench/op_profile.py {cmd}`. {machine}", "",
             "Per model: onnxruntime's node profile (after its graph optimizations; per kind the median over "
             f"{args.runs} runs, after {args.warmup} warm-up runs, of its summed node time) of the original and "
             "the pruned model, run in alternation, nodes "
             "grouped by kind (convolutions by weight shape: stem = at most 4 input channels, depthwise, grouped, "
             "1x1, K×K), with the MACs each kind does (from the shapes the profiler records). `time ratio` is the "
             "kind's original / pruned time, `MAC ratio` its original / pruned MACs: a kind whose time ratio "
             "lies below its MAC ratio is where the measured speedup loses against the model's MAC ratio. "
             "`speedup` is an interleaved measurement without profiling (ratio of medians, per-round IQR). "
             "Models: random weights, L2 magnitude, groups through LayerNorm pruned with --allow-approximate.", ""]
    summary, data = [], {"machine": machine, "round_to": r, "models": {}}
    intro_end = len(lines)
    with tempfile.TemporaryDirectory() as tmp:
        for spec in [a for a in args.archs.split(",") if a]:
            # ARCH@whole: grouped convs pruned by whole conv groups (--conv-groups whole)
            name, _, unit = spec.partition("@")
            opts = PlanOptions(ratio=args.ratio, round_to=r, allow_approximate=True, conv_groups=unit or "positions")
            arch = name if not unit else f"{name} (--conv-groups {unit})"
            an = pipeline.analyze_model(str(_export(name)), head_mode=pipeline.head_mode_for(opts))
            plan = pipeline.build_plan(an, opts)
            pruned, shapes = pipeline.apply_plan(an, plan)
            mac_ratio = model_stats(an.model, an.shapes).macs / model_stats(pruned, shapes).macs
            data["models"][arch] = {"mac_ratio": mac_ratio, "batches": {}}
            for b in batches:
                feeds = make_inputs(an.model, batch=b)
                po, pp = profile_pair(an.model, pruned, feeds, args.threads, args.runs, args.warmup, tmp, f"{arch}{b}",
                                      kinds=True)
                sp, lo, hi = _interleaved_speedup(an.model, pruned, feeds, args.threads)
                data["models"][arch]["batches"][b] = {"original": po, "pruned": pp, "speedup": sp, "iqr": [lo, hi]}
                entry = data["models"][arch]["batches"][b]
                kinds = sorted({k for k in (*po, *pp) if not k.startswith(("(", "macs:"))}, key=lambda k: -pp.get(k, 0.0))
                tot_p = sum(pp.get(k, 0.0) for k in kinds)
                tot_o = sum(po.get(k, 0.0) for k in kinds)
                rows = []
                for k in kinds:
                    o, q = po.get(k, 0.0), pp.get(k, 0.0)
                    mo, mq = po.get("macs:" + k, 0.0), pp.get("macs:" + k, 0.0)
                    rows.append([k, f"{o:.2f}", f"{q:.2f}", f"{o / q:.2f}x" if q > 0 else "-",
                                 f"{mo / 1e6:.0f}M -> {mq / 1e6:.0f}M" if mo else "-",
                                 f"{mo / mq:.2f}x" if mq > 0 else "-",
                                 f"{100 * o / tot_o:.0f}% / {100 * q / tot_p:.0f}%"])
                rows.append(["(sum of nodes)", f"{tot_o:.2f}", f"{tot_p:.2f}", f"{tot_o / tot_p:.2f}x", "", "", ""])
                lines += [f"### {arch}, batch {b}: MAC ratio {mac_ratio:.2f}x, speedup {sp:.2f}x [{lo:.2f}-{hi:.2f}] "
                          f"= {sp / mac_ratio:.2f} of the MAC ratio", ""]
                lines += md_table(["kind", "original ms", "pruned ms", "time ratio", "MACs", "MAC ratio",
                                   "share of time orig / pruned"], rows)
                lines.append("")
                lagging = [k for k in kinds if pp.get(k, 0.0) > 0 and (
                    pp.get("macs:" + k, 0.0) == 0 or po.get(k, 0.0) / pp[k] < 0.9 * mac_ratio)]
                lag_share = sum(pp.get(k, 0.0) for k in lagging) / tot_p if tot_p else 0.0
                # every kind at its own MAC ratio (kinds without MACs at their measured time ratio)
                own = sum(po.get(k, 0.0) / (po["macs:" + k] / pp["macs:" + k]) if pp.get("macs:" + k) else pp.get(k, 0.0)
                          for k in kinds)
                bound = tot_o / own if own else float("nan")
                entry["kindwise_bound"] = bound
                summary.append([arch, str(b), f"{mac_ratio:.2f}x", f"{sp:.2f}x [{lo:.2f}-{hi:.2f}]",
                                f"{sp / mac_ratio:.2f}", "yes" if sp >= 0.9 * mac_ratio else "no",
                                f"{bound:.2f}x ({bound / mac_ratio:.2f})",
                                f"{100 * lag_share:.0f}%: " + ", ".join(
                                    f"{k} {po.get(k, 0.0) / pp[k]:.2f}x" for k in lagging[:4])])
                print(f"{arch} b{b}: MAC ratio {mac_ratio:.2f}, speedup {sp:.2f}", file=sys.stderr)
    head = ["model", "batch", "MAC ratio", "speedup [IQR]", "speedup / MAC ratio", ">= 0.9",
            "every kind at its own MAC ratio (/ model MAC ratio)",
            "pruned time in kinds slower than 0.9 x the MAC ratio (their time ratios)"]
    lines[intro_end:intro_end] = md_table(head, summary) + [""]
    return publish("op_profile_models", lines, data, write=not args.no_write)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", default=None, help="several models, by kind of node (see the module docstring); "
                    "ARCH@whole prunes ARCH's grouped convs by whole conv groups (--conv-groups whole)")
    ap.add_argument("--arch", default="resnet50")
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    if args.archs:
        return models_main(args, argv)
    started = _dt.datetime.now().isoformat(timespec="seconds")
    machine = machine_line(f"onnxruntime with {args.threads} intra-op threads.")
    an = pipeline.analyze_model(str(zoo.export(args.arch, "legacy")))
    r, _ = auto_round_to("cpu")
    plan = pipeline.build_plan(an, PlanOptions(ratio=args.ratio, round_to=r))
    pruned, shapes = pipeline.apply_plan(an, plan)
    mac_ratio = model_stats(an.model, an.shapes).macs / model_stats(pruned, shapes).macs
    lines = [f"## Where the time goes: {args.arch} at ratio {args.ratio} (`--round-to auto` = {r}), by op type", "",
             f"Run {started} with `python bench/op_profile.py {' '.join(argv if argv is not None else sys.argv[1:])}`."
             f" {machine}", "",
             f"onnxruntime's node profile after its graph optimizations (NCHWc convolutions with fused Add/Relu, "
             f"reorders), median ms per run over {args.runs} runs, the two models run in alternation, after {args.warmup} warm-up runs; MAC ratio "
             f"{mac_ratio:.2f}x. Node times exclude the executor's per-node overhead, which the whole-run median "
             f"includes.", ""]
    data = {"machine": machine, "mac_ratio": mac_ratio, "batches": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for b in [int(x) for x in args.batches.split(",")]:
            feeds = make_inputs(an.model, batch=b)
            po, pp = profile_pair(an.model, pruned, feeds, args.threads, args.runs, args.warmup, tmp, f"r{b}")
            data["batches"][b] = {"original": po, "pruned": pp}
            ops = sorted(set(po) | set(pp), key=lambda k: -po.get(k, 0.0))
            node_o = sum(v for k, v in po.items() if not k.startswith("("))
            node_p = sum(v for k, v in pp.items() if not k.startswith("("))
            rows = []
            for op in ops:
                o, p = po.get(op, 0.0), pp.get(op, 0.0)
                share = "" if op.startswith("(") else f"{100 * o / node_o:.0f}% / {100 * p / node_p:.0f}%"
                rows.append([op, f"{o:.3f}", f"{p:.3f}", f"{o / p:.2f}x" if p > 0 else "-", share])
            rows.append(["(sum of nodes)", f"{node_o:.3f}", f"{node_p:.3f}", f"{node_o / node_p:.2f}x", ""])
            lines += [f"Batch {b}:", ""]
            lines += md_table(["op type", "original ms", "pruned ms", "speedup", "share orig / pruned"], rows)
            lines.append("")
            print(f"batch {b}: " + ", ".join(f"{k} {po.get(k, 0):.2f}->{pp.get(k, 0):.2f}" for k in ops), file=sys.stderr)
    return publish("op_profile", lines, data, write=not args.no_write)


if __name__ == "__main__":
    sys.exit(main())
