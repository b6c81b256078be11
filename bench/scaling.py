"""Analysis time against graph size, on generated graphs from 100 to 20,000 nodes.

    python bench/scaling.py [--sizes 100,500,1000,2000,5000,10000,20000] [--no-profile] [--no-write]

Two families, built with onnx.helper (opset 17, small tensors so that onnxruntime's shape probing
costs little):

- ``cnn``: a chain of blocks Conv 3x3 (16 -> 16 channels, 8x8 maps, bias) -> BatchNormalization -> Relu,
  every other block with a residual Add (so the residual channels form one long coupled group, the
  others one group per block);
- ``mlp``: transformer-like MLP stacks, blocks LayerNormalization -> MatMul (32 -> 64) -> Add bias ->
  Relu -> MatMul (64 -> 32) -> Add bias -> Add residual, on a (1, 16, 32) sequence.

Timed: ``pipeline.analyze_model`` (normalize, shape inference/probing, coupling graph) and plan +
rewrite (``pipeline.build_plan`` at ratio 0.5 + ``pipeline.apply_plan``: rewrite, ONNX checker, shape
inference, shape check), the best of ``--repeat`` runs (1 for the large sizes). Acceptance: analysis
time from 5,000 to 10,000 nodes grows by less than 2.3x. With profiling on, cProfile runs the analysis
at 5,000 and 10,000 nodes and the functions whose own time grows the most are listed: a superlinear
one shows a growth well above 2x. Writes the ``scaling`` section of bench/RESULTS.md and
bench/results/scaling.json.
"""

from __future__ import annotations

import argparse
import cProfile
import datetime as _dt
import gc
import pstats
import sys
import time

import numpy as np
import onnx
from _common import machine_line, md_table, publish
from onnx import TensorProto, helper, numpy_helper

from onnxprune import pipeline
from onnxprune.planning.options import PlanOptions

OPSET = 17


def _init(inits: list, name: str, arr: np.ndarray) -> str:
    inits.append(numpy_helper.from_array(arr.astype(np.float32), name))
    return name


def cnn_chain(n_nodes: int, c: int = 16, hw: int = 8, seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    x = "x"
    skip = x
    i = 0
    while len(nodes) < n_nodes:
        w = _init(inits, f"w{i}", rng.standard_normal((c, c, 3, 3)) * 0.1)
        b = _init(inits, f"b{i}", rng.standard_normal(c) * 0.1)
        nodes.append(helper.make_node("Conv", [x, w, b], [f"c{i}"], name=f"conv{i}", pads=[1, 1, 1, 1]))
        bn = [_init(inits, f"{k}{i}", v) for k, v in (("s", rng.uniform(0.5, 1.5, c)), ("o", rng.standard_normal(c)),
                                                      ("m", rng.standard_normal(c) * 0.1), ("v", rng.uniform(0.5, 1.5, c)))]
        nodes.append(helper.make_node("BatchNormalization", [f"c{i}", *bn], [f"n{i}"], name=f"bn{i}"))
        y = f"r{i}"
        nodes.append(helper.make_node("Relu", [f"n{i}"], [y], name=f"relu{i}"))
        if i % 2 == 1:
            nodes.append(helper.make_node("Add", [y, skip], [f"a{i}"], name=f"add{i}"))
            y = f"a{i}"
            skip = y
        x = y
        i += 1
    graph = helper.make_graph(nodes, "cnn_chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, hw, hw])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, c, hw, hw])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=8)


def mlp_stack(n_nodes: int, d: int = 32, hidden: int = 64, seq: int = 16, seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    x = "x"
    i = 0
    while len(nodes) < n_nodes:
        g = _init(inits, f"g{i}", rng.uniform(0.5, 1.5, d))
        be = _init(inits, f"be{i}", rng.standard_normal(d) * 0.1)
        w1 = _init(inits, f"w1_{i}", rng.standard_normal((d, hidden)) / np.sqrt(d))
        b1 = _init(inits, f"b1_{i}", rng.standard_normal(hidden) * 0.1)
        w2 = _init(inits, f"w2_{i}", rng.standard_normal((hidden, d)) / np.sqrt(hidden))
        b2 = _init(inits, f"b2_{i}", rng.standard_normal(d) * 0.1)
        nodes += [
            helper.make_node("LayerNormalization", [x, g, be], [f"ln{i}"], name=f"ln{i}", axis=-1),
            helper.make_node("MatMul", [f"ln{i}", w1], [f"h{i}"], name=f"fc1_{i}"),
            helper.make_node("Add", [f"h{i}", b1], [f"hb{i}"], name=f"fc1b_{i}"),
            helper.make_node("Relu", [f"hb{i}"], [f"hr{i}"], name=f"act{i}"),
            helper.make_node("MatMul", [f"hr{i}", w2], [f"o{i}"], name=f"fc2_{i}"),
            helper.make_node("Add", [f"o{i}", b2], [f"ob{i}"], name=f"fc2b_{i}"),
            helper.make_node("Add", [f"ob{i}", x], [f"res{i}"], name=f"res{i}"),
        ]
        x = f"res{i}"
        i += 1
    graph = helper.make_graph(nodes, "mlp_stack", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, seq, d])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, seq, d])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=8)


FAMILIES = {"cnn": cnn_chain, "mlp": mlp_stack}


def time_once(model: onnx.ModelProto) -> dict:
    gc.collect()
    c0 = time.process_time()
    t0 = time.perf_counter()
    an = pipeline.analyze_model(model)
    t1 = time.perf_counter()
    c1 = time.process_time()
    plan = pipeline.build_plan(an, PlanOptions(ratio=0.5))
    pipeline.apply_plan(an, plan)
    t2 = time.perf_counter()
    return {"analyze_s": t1 - t0, "analyze_cpu_s": c1 - c0, "plan_rewrite_s": t2 - t1, "groups": len(an.cg.groups),
            "pruned_groups": len(plan.pruned())}


def profile_growth(family: str, small: int, large: int, top: int = 12) -> list[dict]:
    """Own time (tottime) of every function in the analysis at two sizes; the biggest growers."""
    stats = {}
    for n in (small, large):
        model = FAMILIES[family](n)
        prof = cProfile.Profile(time.process_time)  # CPU time: steadier than wall time on a busy machine
        prof.enable()
        pipeline.analyze_model(model)
        prof.disable()
        st = pstats.Stats(prof)
        stats[n] = {f"{k[0].split('site-packages/')[-1].split('/work/main/')[-1]}:{k[1]}({k[2]})": (v[2], v[3], v[1])
                    for k, v in st.stats.items()}
    total_large = sum(v[0] for v in stats[large].values())
    rows = []
    for fn, (tt, ct, calls) in stats[large].items():
        tt0, ct0, calls0 = stats[small].get(fn, (0.0, 0.0, 0))
        if tt < 0.02 * total_large:
            continue
        rows.append({"function": fn, f"tottime_{small}": tt0, f"tottime_{large}": tt,
                     "growth": tt / tt0 if tt0 > 0 else float("inf"), "calls_growth": calls / calls0 if calls0 else None,
                     "share": tt / total_large, f"cumtime_{large}": ct})
    rows.sort(key=lambda r: -r[f"tottime_{large}"])
    return rows[:top]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="100,500,1000,2000,5000,10000,20000")
    ap.add_argument("--families", default="cnn,mlp")
    ap.add_argument("--repeat", type=int, default=3, help="runs per size up to 2,000 nodes (best kept)")
    ap.add_argument("--max-seconds", type=float, default=240, help="stop a family once one size takes longer")
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    started = _dt.datetime.now().isoformat(timespec="seconds")
    machine = machine_line()
    t_all = time.perf_counter()
    results: dict = {"machine": machine, "families": {}}
    rows = []
    for fam in args.families.split(","):
        res = []
        for n in sizes:
            model = FAMILIES[fam](n)
            nodes = len(model.graph.node)
            runs = [time_once(model) for _ in range(args.repeat if nodes <= 2000 else 1)]
            best = {k: min(r[k] for r in runs) if k.endswith("_s") else runs[0][k] for k in runs[0]}
            best["nodes"] = nodes
            res.append(best)
            print(f"{fam} {nodes} nodes: analyze {best['analyze_s']:.3f} s, plan+rewrite {best['plan_rewrite_s']:.3f} s, "
                  f"{best['groups']} groups", file=sys.stderr)
            if best["analyze_s"] + best["plan_rewrite_s"] > args.max_seconds:
                print(f"{fam}: stopping, {nodes} nodes took over {args.max_seconds} s", file=sys.stderr)
                break
        results["families"][fam] = res
        prev = None
        for r in res:
            grow_a = f"{r['analyze_s'] / prev['analyze_s']:.2f}x" if prev else ""
            grow_p = f"{r['plan_rewrite_s'] / prev['plan_rewrite_s']:.2f}x" if prev else ""
            node_grow = f"{r['nodes'] / prev['nodes']:.2f}x" if prev else ""
            grow_c = f"{r['analyze_cpu_s'] / prev['analyze_cpu_s']:.2f}x" if prev else ""
            rows.append([fam, r["nodes"], node_grow, r["groups"], f"{r['analyze_s']:.3f}", grow_a,
                         f"{r['analyze_cpu_s']:.3f}", grow_c,
                         f"{r['plan_rewrite_s']:.3f}", grow_p, f"{1e3 * r['analyze_s'] / r['nodes']:.3f}"])
            prev = r
    accept = []
    for fam, res in results["families"].items():
        by = {r["nodes"]: r for r in res}
        n5 = min(by, key=lambda n: abs(n - 5000)) if by else None
        n10 = min(by, key=lambda n: abs(n - 10000)) if by else None
        if n5 and n10 and n10 > n5:
            g = by[n10]["analyze_s"] / by[n5]["analyze_s"]
            gp = by[n10]["plan_rewrite_s"] / by[n5]["plan_rewrite_s"]
            gc_ = by[n10]["analyze_cpu_s"] / by[n5]["analyze_cpu_s"]
            accept.append([fam, f"{n5} -> {n10}", f"{g:.2f}x", "yes" if g < 2.3 else "**no**", f"{gc_:.2f}x",
                           f"{gp:.2f}x"])
            results.setdefault("growth_5k_10k", {})[fam] = {"analyze": g, "analyze_cpu": gc_, "plan_rewrite": gp}
    prof_lines = []
    if not args.no_profile:
        for fam in results["families"]:
            grow = profile_growth(fam, 5000, 10000)
            results.setdefault("profile", {})[fam] = grow
            prof_lines += [f"cProfile of `analyze_model` on `{fam}` at 5,000 and 10,000 nodes (CPU-time profile; functions with >= 2% "
                           "of the own time at 10,000; growth = own time 10k / 5k; linear is about 2x):", ""]
            prof_lines += md_table(["function", "own s at 5k", "own s at 10k", "growth", "calls growth", "share at 10k"],
                                   [[f"`{r['function']}`", f"{r['tottime_5000']:.3f}", f"{r['tottime_10000']:.3f}",
                                     f"{r['growth']:.2f}x", f"{r['calls_growth']:.2f}x" if r["calls_growth"] else "-",
                                     f"{100 * r['share']:.0f}%"] for r in grow], "lrrrrr")
            prof_lines.append("")
    cmd = "python bench/scaling.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = ["## Analysis time against graph size", "",
             f"Run {started} with `{cmd.strip()}` ({time.perf_counter() - t_all:.0f} s). {machine}", "",
             "Generated graphs (onnx.helper, opset 17): `cnn` = Conv 3x3 16->16 + BatchNormalization + Relu blocks, "
             "a residual Add every other block; `mlp` = LayerNorm, MatMul 32->64, Add, Relu, MatMul 64->32, Add, "
             "residual Add per block. Times in seconds (wall; CPU = process time, all threads), best of 3 runs up to 2,000 nodes, one run above. "
             "analyze = `pipeline.analyze_model` (normalize, shapes, coupling graph); plan+rewrite = "
             "`build_plan` (ratio 0.5) + `apply_plan` (rewrite, checker, shape inference and check).", ""]
    lines += md_table(["family", "nodes", "x nodes", "groups", "analyze s", "x analyze", "analyze CPU s", "x CPU",
                       "plan+rewrite s",
                       "x plan+rewrite", "analyze ms/node"], rows)
    lines += ["", "Acceptance: analysis time from 5,000 to 10,000 nodes grows by less than 2.3x.", ""]
    lines += md_table(["family", "nodes", "analyze growth (wall)", "< 2.3x", "analyze growth (CPU time)",
                       "plan+rewrite growth"], accept)
    lines.append("")
    lines += prof_lines
    return publish("scaling", lines, results, write=not args.no_write)


if __name__ == "__main__":
    sys.exit(main())
