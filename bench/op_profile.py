"""Where the time goes: onnxruntime's per-node profile of an original and its pruned model, by op type.

    python bench/op_profile.py [--arch resnet50] [--ratio 0.5] [--threads 2] [--batches 1,8] [--no-write]

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

import onnxruntime as ort
from _common import machine_line, md_table, publish
from onnxprune.models import zoo

from onnxprune import pipeline
from onnxprune.measure.stats import model_stats
from onnxprune.planning.options import PlanOptions
from onnxprune.runtime.inputs import make_inputs
from onnxprune.runtime.machine import auto_round_to


def profile(model, feeds, threads: int, runs: int, warmup: int, tmp: str, tag: str) -> dict[str, float]:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.enable_profiling = True
    so.profile_file_prefix = os.path.join(tmp, tag)
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    for _ in range(warmup + runs):
        sess.run(None, feeds)
    path = sess.end_profiling()
    with open(path) as f:
        events = json.load(f)
    per_run: list[dict[str, float]] = []
    for ev in events:
        if ev.get("cat") == "Session" and ev.get("name") == "model_run":
            per_run.append({"__run__": ev["dur"]})
    by_op: dict[str, float] = collections.defaultdict(float)
    node_events = [ev for ev in events if ev.get("cat") == "Node" and ev.get("name", "").endswith("_kernel_time")]
    n_nodes_per_run = len(node_events) // (warmup + runs) if node_events else 0
    for ev in node_events[n_nodes_per_run * warmup:]:
        by_op[ev["args"].get("op_name", "?")] += ev["dur"] / 1e3 / runs
    runs_ms = sorted(r["__run__"] / 1e3 for r in per_run[warmup:])
    by_op["(whole run, median)"] = runs_ms[len(runs_ms) // 2] if runs_ms else 0.0
    return dict(by_op)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="resnet50")
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
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
             f"reorders), mean ms per run over {args.runs} runs after {args.warmup} warm-up runs; MAC ratio "
             f"{mac_ratio:.2f}x. Node times exclude the executor's per-node overhead, which the whole-run median "
             f"includes.", ""]
    data = {"machine": machine, "mac_ratio": mac_ratio, "batches": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for b in [int(x) for x in args.batches.split(",")]:
            feeds = make_inputs(an.model, batch=b)
            po = profile(an.model, feeds, args.threads, args.runs, args.warmup, tmp, f"o{b}")
            pp = profile(pruned, feeds, args.threads, args.runs, args.warmup, tmp, f"p{b}")
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
