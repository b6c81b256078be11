"""Issue 14: ``prune --target-latency 0.5`` with ``--allocate latency`` against the uniform ratio of equal
measured latency, per model and batch, CPU, 2 threads, ``--round-to auto``.

For each (model, batch): the latency table (timed; measured anew unless ``--use-cache``), the allocation
with its refine rounds (``measure.allocation.AllocationSearch``: each round measured interleaved
against the original), then the uniform plans at the latency the
allocated model measured: three uniform ratios whose predicted latency brackets it, timed with the
original and the allocated model in one interleaved run, and the uniform plans' importance
interpolated at the allocated model's latency of that run. Importance kept is the allocation's measure (``planning.allocate.allocation_values``:
l2 over the group mean, times the weights a unit owns) on both plans; the output error is the
relative error of each pruned model against the original on generated inputs (random-weight zoo
models: a proxy of how much function each keeps, not accuracy).

    python bench/latency_allocation.py mobilenet_v2 resnet50 --batch 1 8 [--write]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time

import numpy as np
from _common import machine_line, publish

from onnxprune import pipeline
from onnxprune.analysis.shapes import infer_shapes
from onnxprune.measure.allocation import AllocationSearch, ratio_noise
from onnxprune.measure.latency import measure
from onnxprune.measure.latency_table import build_table
from onnxprune.measure.stats import model_stats
from onnxprune.measure.targets import prune_at
from onnxprune.measure.verify import compare
from onnxprune.planning.allocate import LatencyModel, allocation_values, uniform_counts
from onnxprune.planning.options import PlanOptions
from onnxprune.planning.plan import candidate_scores, plan_candidates
from onnxprune.runtime.inputs import make_inputs
from onnxprune.runtime.machine import auto_round_to

TARGET = 0.5
THREADS = 2


def model_path(name: str) -> str:
    if name == "vit_b_16":
        from onnxprune.models.transformers import export_vision

        return str(export_vision(name, "legacy"))
    from onnxprune.models import zoo

    return str(zoo.export(name, "legacy"))


def kept_share(an, opts, plan) -> float:
    cands, _ = plan_candidates(an.cg, opts)
    scores, _, grads = candidate_scores(an.cg, opts, [g for g, _ in cands])
    values = allocation_values(an.cg, opts, scores, grads)
    total = sum(float(v.sum()) for v in values.values())
    kept = sum(float(values[gid][gp.keep].sum()) for gid, gp in plan.groups.items() if gid in values)
    kept += sum(float(values[g.id].sum()) for g, _ in cands if g.id not in plan.groups)
    return kept / total


def uniform_ratios(an, opts, table, shares) -> list[float]:
    """Uniform ratios whose predicted latency (the table's model) is nearest each of ``shares``."""
    lm = LatencyModel(an.cg, table)
    cands, _ = plan_candidates(an.cg, opts)
    groups = [g for g, _ in cands]
    full = lm.full()
    grid = {}
    for r in np.arange(0.0, opts.max_ratio + 1e-9, 0.0125):
        counts = uniform_counts(groups, float(r), opts.round_to)
        grid.setdefault(tuple(sorted(counts.items())), (float(r), lm.predict(counts) / full))
    points = sorted(grid.values())
    out = []
    for s in shares:
        r = min(points, key=lambda p: abs(p[1] - s))[0]
        if r not in out:
            out.append(r)
    return sorted(out)


def one(name: str, batch: int, use_cache: bool, repeat: int) -> dict:
    path = model_path(name)
    an = pipeline.analyze_model(path)
    opts = PlanOptions(round_to=auto_round_to("cpu")[0])
    load = open("/proc/loadavg").read().split()[:3]
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        table = build_table(an, ep="cpu", threads=THREADS, batch=batch, round_to=opts.round_to,
                            cache=True, directory=None if use_cache else tmp)
        table_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    search = AllocationSearch(an, opts, target_latency=TARGET, ep="cpu", threads=THREADS, batch=batch,
                              repeat=repeat, table=table)
    res = search.search()
    alloc_s = time.perf_counter() - t0
    a_model, _, a_plan = prune_at(an, dataclasses.replace(opts, keep_counts=res.keep_counts), 0.5)
    measured = res.rounds[res.chosen].measured.ratio
    ratios = uniform_ratios(an, opts, table, [measured * f for f in (0.85, 1.0, 1.15)])
    uniform = [prune_at(an, opts, r) for r in ratios]
    feeds = make_inputs(an.model, None, batch=batch)
    models = [a_model] + [u[0] for u in uniform]
    lat = measure([an.model, *models], feeds, "cpu", THREADS, warmup=3, repeat=repeat)
    ratio = [x.median_ms / lat[0].median_ms for x in lat[1:]]
    noise = [ratio_noise(lat[0].samples_ms, x.samples_ms) for x in lat[1:]]
    err = [max(o.rel_error for o in compare(an.model, an.model, m, feeds, "cpu").outputs) for m in models]
    base = model_stats(an.model, an.shapes).macs
    macs = [model_stats(m, infer_shapes(m)).macs / base for m in models]
    kept = [kept_share(an, opts, p) for p in [a_plan] + [u[2] for u in uniform]]
    u_pts = sorted(zip(ratio[1:], kept[1:], err[1:], strict=True))
    xs = [p[0] for p in u_pts]
    at = {"kept_importance": float(np.interp(ratio[0], xs, [p[1] for p in u_pts])),
          "output_rel_error": float(np.interp(ratio[0], xs, [p[2] for p in u_pts])),
          "inside": xs[0] <= ratio[0] <= xs[-1]}
    return {
        "model": name, "batch": batch, "round_to": opts.round_to, "load": load, "table_s": table_s,
        "table_cached": table.cached, "table_samples": len(table.samples), "allocation_s": alloc_s,
        "rounds": [r.to_json() for r in res.rounds], "chosen_round": res.chosen + 1,
        "allocated": {"measured_in_search": measured, "final_ratio": ratio[0], "noise": noise[0],
                      "kept_importance": kept[0], "mac_ratio": macs[0], "output_rel_error": err[0]},
        "uniform": [{"ratio": r, "final_ratio": x, "noise": n, "kept_importance": k, "mac_ratio": m,
                     "output_rel_error": e} for r, x, n, k, m, e in zip(ratios, ratio[1:], noise[1:], kept[1:],
                                                                         macs[1:], err[1:], strict=True)],
        "uniform_at_allocated_latency": at, "original_ms": lat[0].median_ms, "machine": machine_line(),
    }


NOTES = [
    "",
    "Rounds: each allocation round's budget (a share of the original's predicted latency) and the latency the "
    "pruned model then measured against the original (interleaved, ratio of medians, ± the standard error of that "
    "ratio), the chosen round in brackets. Allocated and uniform: one interleaved run of the original, the "
    "allocated model and three uniform ratios whose predicted latency brackets the allocated one's; the uniform "
    "plans' importance is interpolated at the allocated model's latency of that run. Importance: the allocation's "
    "measure (l2 over the group mean, times the weights a unit owns), a share of the whole; output err.: relative "
    "error against the original on generated inputs (random-weight zoo models: how much of the function survives, "
    "not accuracy). The load column is the 1/5/15-minute load average of this 2-core machine at the start: other "
    "work ran throughout, so a latency ratio moves by about ±10% between two runs of the same pair of models.",
    "",
    "The tables above were measured with 8 plain runs a sample for the whole-run times; the shipped constants take "
    "4 (`measure/latency_table.py`: 6 profiled and 4 plain runs a sample, 10 samples): ResNet-50's table then took "
    "20.6 s at batch 1 and 94.3 s at batch 8 (load 2.3 and 3.1), against the 3 minutes issue 14 allows.",
]


def render(rows: list[dict], models, batches) -> list[str]:
    lines = [f"## Latency allocation (issue 14): `--target-latency {TARGET}` CPU, {THREADS} threads, round-to auto",
             "", f"Command: `python bench/latency_allocation.py {' '.join(models)} --batch "
             f"{' '.join(map(str, batches))}`. {rows[0]['machine'] if rows else ''}", "",
             "| model | batch | load | table (s) | rounds: budget -> measured | allocated (one run): latency / MACs / "
             "importance / output err. | uniform ratios (same run): latency / importance | uniform at the allocated "
             "latency: importance / output err. |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        rounds = "; ".join(f"{x['budget']:.3f} -> {x['measured']:.3f}±{x['noise'] * 100:.1f}%" for x in r["rounds"])
        a, u = r["allocated"], r["uniform_at_allocated_latency"]
        unis = ", ".join(f"{x['ratio']:.3f}: {x['final_ratio']:.3f} / {x['kept_importance']:.3f}" for x in r["uniform"])
        lines.append(f"| {r['model']} | {r['batch']} | {' '.join(r['load'])} | {r['table_s']:.1f} | {rounds} "
                     f"(round {r['chosen_round']}) | {a['final_ratio']:.3f}±{a['noise'] * 100:.1f}% / {a['mac_ratio']:.3f} / "
                     f"{a['kept_importance']:.3f} / {a['output_rel_error']:.3f} | {unis} | {u['kept_importance']:.3f} / "
                     f"{u['output_rel_error']:.3f}{'' if u['inside'] else ' (extrapolated)'} |")
    return lines + NOTES


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="*")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--use-cache", action="store_true", help="read tables from the cache (no table timing)")
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--from-json", metavar="FILE", help="render the rows of an earlier run (no measurement)")
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    if args.from_json:
        with open(args.from_json) as f:
            data = json.load(f)
        rows = data["rows"]
        models = list(dict.fromkeys(r["model"] for r in rows))
        batches = list(dict.fromkeys(r["batch"] for r in rows))
        return publish("latency_allocation", render(rows, models, batches), data, write=args.write)
    rows = []
    for name in args.models:
        for b in args.batch:
            r = one(name, b, args.use_cache, args.repeat)
            rows.append(r)
            print(r, flush=True)
    return publish("latency_allocation", render(rows, args.models, args.batch), {"rows": rows}, write=args.write)


if __name__ == "__main__":
    raise SystemExit(main())
