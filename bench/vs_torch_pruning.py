"""onnxprune vs Torch-Pruning: wall time of one structural pruning pass, side by side.

    python bench/vs_torch_pruning.py [--arch resnet50] [--repeat 3] [--ratio 0.5] [--threads 1]

Both tools prune the same network (random-init torchvision weights from ``onnxprune.models.zoo``)
at the same channel ratio with an L2 magnitude importance, in this process, on the CPU:

(a) onnxprune, on the ONNX export: load the file, analyze (normalize, shapes, coupling graph), plan,
    rewrite (+ the ONNX checker and shape check of ``pipeline.apply_plan``), atomic save to a temp file.
(b) Torch-Pruning, on the torch module (built once, deep-copied per repeat, neither timed):
    ``BasePruner(...)`` (its constructor builds the DependencyGraph) + one ``step()``.
    A bare ``DependencyGraph().build_dependency`` is timed too, on its own copy, for information only.

The two tools run alternately (a, b, a, b, ...) after one untimed warm-up of each, so slow drift of the
machine hits both; the median of ``--repeat`` runs is reported. MACs before/after come from
``onnxprune.measure.stats`` (the pipeline's stats) and ``tp.utils.count_ops_and_params``, plus a conv+linear
only count of the torch model that is directly comparable with onnxprune's (BatchNorm is folded into
the convolutions of the ONNX export, and onnxprune counts conv/gemm MACs only).

Threads: ``--threads N`` (default 1) gives torch and onnxprune's onnxruntime sessions N intra-op threads;
``--threads 0`` keeps the libraries' defaults. On a shared machine whose cores are oversubscribed, torch's
multi-threaded kernels (OpenMP barriers) make Torch-Pruning ~10x slower and the comparison meaningless,
hence the default of one thread for both.

Writes a rich table to the terminal, a section of ``bench/RESULTS.md`` (replaced in place on re-runs)
and ``bench/results/vs_torch_pruning.json``; a non-default ``--threads`` gets its own section and file
(``vs_torch_pruning-threads{N|default}``).
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import gc
import importlib.metadata as md
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_MD = BENCH_DIR / "RESULTS.md"
RESULTS_DIR = BENCH_DIR / "results"
DEFAULT_THREADS = 1


def _key(threads: int) -> str:
    """Name of this configuration's RESULTS.md section and JSON file (the default has no suffix)."""
    if threads == DEFAULT_THREADS:
        return "vs_torch_pruning"
    return f"vs_torch_pruning-threads{threads if threads > 0 else 'default'}"


def _markers(threads: int) -> tuple[str, str]:
    return f"<!-- BEGIN {_key(threads)} -->", f"<!-- END {_key(threads)} -->"

OP_STAGES = ("load", "analyze", "plan", "rewrite_and_check", "save")
TP_STAGES = ("pruner_init", "step")
TP_INFO_STAGES = ("dependency_graph_only",)
STAGE_LABEL = {
    "load": "load (onnxprune.ir.io.load)",
    "analyze": "analyze (normalize, shapes, coupling graph)",
    "plan": "plan (l2)",
    "rewrite_and_check": "rewrite + checker + shape check",
    "save": "save_atomic (temp file)",
    "pruner_init": "BasePruner.__init__ (builds DependencyGraph)",
    "step": "step() (importance + prune)",
    "dependency_graph_only": "DependencyGraph.build_dependency alone (info, inside __init__)",
}


# ----------------------------------------------------------------------------------------------
# machine / versions


def _version(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def machine_info() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": _version("torch"),
        "torchvision": _version("torchvision"),
        "onnx": _version("onnx"),
        "onnxruntime": _version("onnxruntime") or _version("onnxruntime-gpu"),
        "torch_pruning": _version("torch-pruning"),
        "onnxprune": _version("onnxprune"),
    }
    try:
        import torch

        info["torch_threads"] = torch.get_num_threads()
    except Exception:  # noqa: BLE001
        pass
    try:
        info["loadavg_at_start"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    return info


# ----------------------------------------------------------------------------------------------
# threads

ORT_SESSIONS = {"count": 0}


def set_threads(n: int) -> str:
    """Give both tools ``n`` intra-op threads (0: leave the libraries' defaults). Returns a description.

    torch: ``torch.set_num_threads``. onnxruntime (onnxprune's shape/value probes): the bench wraps
    ``onnxprune.runtime.session.make_session`` (and the probes' reference to it) so a session made
    without an explicit thread count gets ``n``. Sessions are
    counted either way.
    """
    import onnxprune.runtime.probe as probe
    import onnxprune.runtime.session as rt

    orig = rt.make_session

    def make_session(model, ep="auto", threads=None, optimize=True):
        ORT_SESSIONS["count"] += 1
        return orig(model, ep, threads or (n if n > 0 else None), optimize)

    make_session.__wrapped__ = orig
    rt.make_session = make_session
    probe.make_session = make_session  # the shape/value probes import it by name
    try:
        import torch

        if n > 0:
            torch.set_num_threads(n)
        tdesc = f"torch {torch.get_num_threads()} intra-op thread(s)"
    except Exception:  # noqa: BLE001
        tdesc = "torch unavailable"
    odesc = f"onnxruntime {n} intra-op thread(s)" if n > 0 else "onnxruntime default threads"
    return f"{tdesc}, {odesc}" + (" (library defaults)" if n <= 0 else "")


# ----------------------------------------------------------------------------------------------
# timing


class _Clock:
    """Wall (perf_counter) and process CPU time (all threads) of consecutive stages."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self.start()

    def start(self) -> None:
        self._w, self._c = time.perf_counter(), time.process_time()

    def lap(self, name: str) -> None:
        w, c = time.perf_counter(), time.process_time()
        self.wall[name], self.cpu[name] = w - self._w, c - self._c
        self._w, self._c = w, c


# ----------------------------------------------------------------------------------------------
# (a) onnxprune


def run_onnxprune(path: Path, ratio: float, out_dir: Path) -> dict:
    from onnxprune import pipeline
    from onnxprune.ir import io
    from onnxprune.planning.options import PlanOptions

    sessions0 = ORT_SESSIONS["count"]
    clock = _Clock()
    m = io.load(path)
    clock.lap("load")
    an = pipeline.analyze_model(m, owned=True)  # the model was loaded here: normalize it in place
    clock.lap("analyze")
    plan = pipeline.build_plan(an, PlanOptions(ratio=ratio, importance="l2"))
    clock.lap("plan")
    pruned, new_shapes, data = pipeline.apply_plan(an, plan, keep_bytes=True)
    clock.lap("rewrite_and_check")
    io.save_atomic(pruned, out_dir / "pruned.onnx", data=data)  # what `onnxprune prune` does
    clock.lap("save")
    t, cpu = clock.wall, clock.cpu
    return {"times": t, "cpu": cpu, "objects": (an, plan, pruned, new_shapes),
            "ort_sessions": ORT_SESSIONS["count"] - sessions0}


def onnxprune_work(objects, saved: Path) -> dict:
    from onnxprune.measure.stats import model_stats

    an, plan, pruned, new_shapes = objects
    before = model_stats(an.model, an.shapes)
    after = model_stats(pruned, new_shapes)
    prunable, total = an.cg.coverage()
    return {
        "macs_before": int(before.macs), "macs_after": int(after.macs),
        "params_before": int(before.params), "params_after": int(after.params),
        "groups_total": len(an.cg.groups), "groups_pruned": len(plan.pruned()), "groups_frozen": len(plan.frozen),
        "prunable_channels": prunable, "channels": total,
        "file_bytes_after": saved.stat().st_size if saved.exists() else None,
        "macs_counter": "onnxprune.measure.stats.model_stats (handler MACs: Conv/Gemm; BN folded by the export)",
    }


# ----------------------------------------------------------------------------------------------
# (b) Torch-Pruning


def run_torch_pruning(base, x, ratio: float, with_dg_only: bool) -> dict:
    import torch_pruning as tp

    clock = _Clock()
    if with_dg_only:
        m0 = copy.deepcopy(base)
        gc.collect()
        clock.start()
        tp.DependencyGraph().build_dependency(m0, example_inputs=x)
        clock.lap("dependency_graph_only")
        del m0
    model = copy.deepcopy(base)
    gc.collect()
    pruner_cls = getattr(tp.pruner, "BasePruner", None) or tp.pruner.MetaPruner
    imp_cls = getattr(tp.importance, "GroupMagnitudeImportance", None) or tp.importance.MagnitudeImportance
    clock.start()
    pruner = pruner_cls(model, x, importance=imp_cls(p=2), pruning_ratio=ratio, ignored_layers=[model.fc])
    clock.lap("pruner_init")
    # step(interactive=True) + group.prune() is exactly what step() does; iterating lets us count groups
    n_groups = 0
    for group in pruner.step(interactive=True):
        group.prune()
        n_groups += 1
    clock.lap("step")
    times, cpu = clock.wall, clock.cpu
    return {"times": times, "cpu": cpu, "model": model, "groups_pruned": n_groups}


def conv_linear_macs(model, x) -> int:
    """MACs of Conv and Linear layers only (what onnxprune's stats count on a BN-folded graph)."""
    import torch
    from torch import nn

    total = 0

    def hook(mod, inp, out):
        nonlocal total
        if isinstance(mod, nn.modules.conv._ConvNd):
            k = 1
            for s in mod.kernel_size:
                k *= s
            total += out.numel() * (mod.in_channels // mod.groups) * k
        elif isinstance(mod, nn.Linear):
            total += out.numel() * mod.in_features

    hs = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hs:
            h.remove()
    return int(total)


def torch_work(model, x) -> dict:
    import torch
    import torch_pruning as tp

    macs, params = tp.utils.count_ops_and_params(model, x)
    with torch.no_grad():
        out_shape = list(model(x).shape)
    return {"macs": int(macs), "params": int(params), "conv_linear_macs": conv_linear_macs(model, x),
            "output_shape": out_shape}


# ----------------------------------------------------------------------------------------------
# stats / report


def summarize(runs: list[dict], cpu_runs: list[dict], stages) -> dict:
    """Per stage: wall-time median/min/max/all and the median process CPU time."""
    out = {}
    for s in stages:
        vals = [r[s] for r in runs if s in r]
        cpu = [r[s] for r in cpu_runs if s in r]
        if vals:
            out[s] = {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "all": vals,
                      "cpu_median": statistics.median(cpu) if cpu else None, "cpu_all": cpu}
    return out


def _fmt_s(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def _fmt_n(n: int | None, unit: str = "") -> str:
    if n is None:
        return "-"
    for div, suf in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= div:
            return f"{n / div:.3f}{suf}{unit}"
    return f"{n}{unit}"


def _pct(after, before) -> str:
    return "-" if not before or after is None else f"{100.0 * after / before:.1f}%"


def build_rows(res: dict) -> tuple[list[list[str]], list[list[str]], list[str]]:
    """(timing rows, work rows, notes) shared by the terminal table and the markdown."""
    op, tpr = res["onnxprune"], res["torch_pruning"]
    rows: list[list[str]] = []

    def row(tool: str, label: str, st: dict | None) -> list[str]:
        if not st:
            return [tool, label, "-", "-", "-", "-"]
        return [tool, label, _fmt_s(st["median"]), _fmt_s(st["min"]), _fmt_s(st["max"]), _fmt_s(st["cpu_median"])]

    def stage_rows(tool: str, summ: dict, stages, total_key: str, info=()):
        for s in stages:
            rows.append(row(tool, STAGE_LABEL[s], summ.get(s)))
        rows.append(row(tool, "**total**", summ.get(total_key)))
        for s in info:
            if summ.get(s):
                rows.append(row(tool, STAGE_LABEL[s], summ[s]))

    if op.get("error"):
        rows.append(["onnxprune", f"FAILED: {op['error']}", "-", "-", "-", "-"])
    else:
        stage_rows("onnxprune", op["summary"], OP_STAGES, "total")
        rows.append(row("onnxprune", "analyze + plan + rewrite (no file I/O)", op["summary"].get("in_memory")))
    if tpr.get("error"):
        rows.append(["Torch-Pruning", f"FAILED: {tpr['error']}", "-", "-", "-", "-"])
    if tpr.get("summary"):
        stage_rows("Torch-Pruning", tpr["summary"], TP_STAGES, "total", TP_INFO_STAGES)
    r = res.get("ratio") or {}
    if r.get("total") is not None:
        rows.append(["ratio", "Torch-Pruning total / onnxprune total", f"{r['total']:.2f}x", "", "",
                     f"{r['total_cpu']:.2f}x" if r.get("total_cpu") else "-"])
    if r.get("total_min") is not None:
        rows.append(["ratio", "same, of the fastest runs (min / min)", "", f"{r['total_min']:.2f}x", "", ""])
    if r.get("in_memory") is not None:
        rows.append(["ratio", "Torch-Pruning total / onnxprune without file I/O", f"{r['in_memory']:.2f}x",
                     "", "", ""])

    work: list[list[str]] = []
    ow = op.get("work") or {}
    if ow:
        work.append(["onnxprune", "onnxprune stats (Conv/Gemm, BN folded)", _fmt_n(ow["macs_before"]),
                     _fmt_n(ow["macs_after"]), _pct(ow["macs_after"], ow["macs_before"]),
                     _fmt_n(ow["params_before"]), _fmt_n(ow["params_after"]),
                     f"{ow['groups_pruned']} pruned / {ow['groups_total']} ({ow['groups_frozen']} frozen)"])
    tb, ta = tpr.get("work_before") or {}, tpr.get("work_after") or {}
    if tb:
        groups = str(tpr.get("groups_pruned", "-"))
        work.append(["Torch-Pruning", "tp.utils.count_ops_and_params (incl. BN/ReLU/pool)", _fmt_n(tb["macs"]),
                     _fmt_n(ta.get("macs")), _pct(ta.get("macs"), tb["macs"]), _fmt_n(tb["params"]),
                     _fmt_n(ta.get("params")), groups + " pruned"])
        work.append(["Torch-Pruning", "conv+linear hooks (comparable with onnxprune)",
                     _fmt_n(tb["conv_linear_macs"]), _fmt_n(ta.get("conv_linear_macs")),
                     _pct(ta.get("conv_linear_macs"), tb["conv_linear_macs"]), "", "", ""])
    return rows, work, res.get("notes", [])


def print_table(res: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    rows, work, notes = build_rows(res)
    c = Console(width=None if sys.stdout.isatty() else 150)
    t = Table(title=f"onnxprune vs Torch-Pruning: {res['arch']}, ratio {res['ratio_pruned']}, "
                    f"{res['repeat']} repeats (seconds)")
    for col, just in (("tool", "left"), ("stage", "left"), ("median s", "right"), ("min", "right"),
                      ("max", "right"), ("CPU s (median)", "right")):
        t.add_column(col, justify=just)
    for r in rows:
        t.add_row(*[x.replace("**", "") for x in r], style="bold" if "total" in r[1] or r[0] == "ratio" else None)
    c.print(t)
    w = Table(title="Work done (batch 1, 224x224)")
    for col in ("tool", "counter", "MACs before", "MACs after", "kept", "params before", "params after", "groups"):
        w.add_column(col, justify="left" if col in ("tool", "counter", "groups") else "right")
    for r in work:
        w.add_row(*r)
    c.print(w)
    for n in notes:
        c.print(f"[dim]- {n}[/dim]")


def markdown_section(res: dict) -> str:
    rows, work, notes = build_rows(res)
    mi = res["machine"]
    begin, end = _markers(res["threads"])
    lines = [begin, f"## onnxprune vs Torch-Pruning ({res['arch']}, ratio {res['ratio_pruned']}, L2 magnitude, "
                    f"{res['threads_desc'].split(',')[0].replace('torch ', '')})", ""]
    lines.append(f"Run {res['timestamp']} with `python bench/vs_torch_pruning.py --arch {res['arch']} "
                 f"--repeat {res['repeat']} --threads {res['threads']}`; median of {res['repeat']} alternating "
                 f"runs after one warm-up each, one process, CPU only, {res['threads_desc']}.")
    lines.append("")
    lines.append(f"Machine: {mi['cpu']}, {mi['cores']} cores ({mi.get('torch_threads')} torch threads), "
                 f"1-min load average before each run {mi.get('loadavg_during')}; Python {mi['python']}, torch {mi['torch']}, "
                 f"torchvision {mi['torchvision']}, onnx {mi['onnx']}, onnxruntime {mi['onnxruntime']}, "
                 f"torch-pruning {mi['torch_pruning']}.")
    lines.append("")
    lines.append("| tool | stage | median s | min s | max s | CPU s (median) |")
    lines.append("|---|---|---:|---:|---:|---:|")
    for r in rows:
        lines.append("| " + " | ".join(x.replace("|", "/") for x in r) + " |")
    lines.append("")
    lines.append("| tool | MACs counter | MACs before | MACs after | kept | params before | params after | groups |")
    lines.append("|---|---|---:|---:|---:|---:|---:|---|")
    for r in work:
        lines.append("| " + " | ".join(r) + " |")
    lines.append("")
    for n in notes:
        lines.append(f"- {n}")
    lines.append(end)
    return "\n".join(lines) + "\n"


def results_header(mi: dict) -> str:
    return (
        "# Benchmark results\n\n"
        "Sections are appended by the scripts in `bench/`; each names the command that produced it.\n\n"
        f"Machine: {mi['cpu']}, {mi['cores']} cores; Python {mi['python']}, torch {mi['torch']}, "
        f"onnxruntime {mi['onnxruntime']}.\n\n"
    )


def write_markdown(res: dict, path: Path = RESULTS_MD) -> None:
    from _common import replace_section

    begin, end = _markers(res["threads"])
    replace_section(begin, end, markdown_section(res), path, header=results_header(res["machine"]))


def write_json(res: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=2, default=str) + "\n")


# ----------------------------------------------------------------------------------------------
# main


def _short_error(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {msg}"[:200]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="resnet50")
    ap.add_argument("--exporter", default="legacy", choices=("legacy", "dynamo"))
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--threads", type=int, default=DEFAULT_THREADS,
                    help="intra-op threads of torch and of onnxprune's onnxruntime sessions (0: library defaults). "
                         "Default 1: on a shared, oversubscribed machine torch's multi-threaded kernels slow "
                         "Torch-Pruning ~10x; results of other values go to their own section and JSON file")
    ap.add_argument("--no-dg-only", action="store_true", help="skip the informational bare DependencyGraph timing")
    ap.add_argument("--no-write", action="store_true", help="print only; do not touch RESULTS.md or the JSON")
    args = ap.parse_args(argv)
    if args.repeat < 1:
        ap.error("--repeat must be >= 1")

    import onnxprune.models.zoo as zoo

    threads_desc = set_threads(args.threads)
    mi = machine_info()
    res: dict = {
        "arch": args.arch, "exporter": args.exporter, "ratio_pruned": args.ratio, "repeat": args.repeat,
        "threads": args.threads, "threads_desc": threads_desc,
        "timestamp": _dt.datetime.now().isoformat(timespec="seconds"), "machine": mi,
        "onnxprune": {}, "torch_pruning": {}, "notes": [],
    }
    onnx_path = zoo.export(args.arch, args.exporter)
    res["onnx_file"] = str(onnx_path)
    print(f"ONNX: {onnx_path}", file=sys.stderr)

    # Torch side setup (not timed): model, example input, MACs before.
    tp_ok = True
    base = x = None
    try:
        import torch_pruning

        base = zoo.build_model(args.arch)
        if not hasattr(base, "fc"):
            raise RuntimeError(f"{args.arch} has no .fc classifier to ignore")
        x = zoo.example_input(args.arch, batch=1)
        res["torch_pruning"]["work_before"] = torch_work(base, x)
        res["torch_pruning"]["version_module"] = getattr(torch_pruning, "__version__", None)
    except Exception as exc:  # noqa: BLE001
        tp_ok = False
        res["torch_pruning"]["error"] = "setup: " + _short_error(exc)
        res["torch_pruning"]["traceback"] = traceback.format_exc()

    op_runs: list[dict] = []
    tp_runs: list[dict] = []
    op_cpu: list[dict] = []
    tp_cpu: list[dict] = []
    load_seen: list[float] = []
    last_op = last_tp = None
    with tempfile.TemporaryDirectory(prefix="vs_tp_") as tmpd:
        out_dir = Path(tmpd)
        for i in range(args.repeat + 1):  # run 0 is the untimed warm-up
            label = "warm-up" if i == 0 else f"run {i}/{args.repeat}"
            load_seen.append(round(os.getloadavg()[0], 2))
            if not res["onnxprune"].get("error"):
                gc.collect()
                try:
                    r = run_onnxprune(onnx_path, args.ratio, out_dir)
                    last_op = r
                    if i:
                        op_runs.append(r["times"])
                        op_cpu.append(r["cpu"])
                    print(f"{label}: onnxprune {sum(r['times'].values()):.3f}s", file=sys.stderr)
                except Exception as exc:  # noqa: BLE001
                    res["onnxprune"]["error"] = _short_error(exc)
                    res["onnxprune"]["traceback"] = traceback.format_exc()
            if tp_ok:
                last_tp = None  # drop the previous pruned model before building another
                gc.collect()
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        r = run_torch_pruning(base, x, args.ratio, with_dg_only=not args.no_dg_only)
                    last_tp = r
                    if i:
                        tp_runs.append(r["times"])
                        tp_cpu.append(r["cpu"])
                    tot = sum(r["times"][s] for s in TP_STAGES)
                    print(f"{label}: Torch-Pruning {tot:.3f}s", file=sys.stderr)
                except Exception as exc:  # noqa: BLE001
                    tp_ok = False
                    res["torch_pruning"]["error"] = f"{label}: " + _short_error(exc)
                    res["torch_pruning"]["traceback"] = traceback.format_exc()
        if last_op is not None:
            res["onnxprune"]["work"] = onnxprune_work(last_op["objects"], out_dir / "pruned.onnx")
            res["onnxprune"]["work"]["ort_sessions_per_run"] = last_op["ort_sessions"]

    for r in op_runs + op_cpu:
        r["total"] = sum(r[s] for s in OP_STAGES)
        r["in_memory"] = r["analyze"] + r["plan"] + r["rewrite_and_check"]
    for r in tp_runs + tp_cpu:
        r["total"] = sum(r[s] for s in TP_STAGES)
    if op_runs:
        res["onnxprune"]["summary"] = summarize(op_runs, op_cpu, (*OP_STAGES, "total", "in_memory"))
    if tp_runs:
        res["torch_pruning"]["summary"] = summarize(tp_runs, tp_cpu, (*TP_STAGES, "total", *TP_INFO_STAGES))
    mi["loadavg_during"] = load_seen
    if last_tp is not None:
        res["torch_pruning"]["groups_pruned"] = last_tp["groups_pruned"]
        try:
            res["torch_pruning"]["work_after"] = torch_work(last_tp["model"], x)
        except Exception as exc:  # noqa: BLE001
            res["torch_pruning"].setdefault("error", "after pruning: " + _short_error(exc))
    if op_runs and tp_runs:
        om, tm = res["onnxprune"]["summary"], res["torch_pruning"]["summary"]
        res["ratio"] = {"total": tm["total"]["median"] / om["total"]["median"],
                        "in_memory": tm["total"]["median"] / om["in_memory"]["median"],
                        "total_cpu": tm["total"]["cpu_median"] / om["total"]["cpu_median"],
                        "total_min": tm["total"]["min"] / om["total"]["min"]}

    notes = res["notes"]
    notes.append("ratio = Torch-Pruning median / onnxprune median; above 1 means onnxprune is faster.")
    notes.append("onnxprune's total includes reading and writing the ONNX file; Torch-Pruning works on a module "
                 "already in memory and saves nothing, hence the second ratio without onnxprune's file I/O.")
    notes.append(f"onnxprune input: {Path(onnx_path).name} (BatchNorm folded into Conv by the export); "
                 "Torch-Pruning input: the same network as a torch module with BatchNorm layers, fc ignored.")
    notes.append("Both tools prune every prunable channel group to 50% locally (onnxprune: PlanOptions(ratio, "
                 "importance='l2'); Torch-Pruning: BasePruner + GroupMagnitudeImportance(p=2), pruning_ratio).")
    mod_v, dist_v = res["torch_pruning"].get("version_module"), mi.get("torch_pruning")
    if mod_v and dist_v and mod_v != dist_v:
        notes.append(f"torch_pruning.__version__ says {mod_v} while the installed distribution is {dist_v} "
                     "(the package does not bump its own __version__).")
    ort_n = (res["onnxprune"].get("work") or {}).get("ort_sessions_per_run")
    if ort_n == 0:
        ort_txt = ("; onnxprune opened no onnxruntime session (it probes with onnxruntime only where ONNX shape "
                   "inference leaves shapes or shape-derived values unknown), so the setting matters to torch only")
    elif ort_n:
        ort_txt = f"; onnxprune opened {ort_n} onnxruntime sessions per run (shape and static-value probes)"
    else:
        ort_txt = ""
    notes.append(f"Threads: {threads_desc}{ort_txt}.")
    notes.append("CPU s = process CPU time (time.process_time, all threads of this process), less sensitive than "
                 "wall time to other processes competing for the cores; the CPU ratio is that of the totals.")
    busiest = max(load_seen, default=0.0)
    if mi["cores"] and busiest > 0.5 * mi["cores"]:
        notes.append(f"The machine was shared and busy (1-min load average up to {busiest} on {mi['cores']} "
                     f"cores during the runs: {load_seen}): wall times are noisy; alternating runs keep the "
                     "ratio fairer than the absolute numbers.")

    print_table(res)
    if not args.no_write:
        json_path = RESULTS_DIR / f"{_key(args.threads)}.json"
        write_json(res, json_path)
        write_markdown(res)
        print(f"wrote {json_path} and the {_key(args.threads)} section of {RESULTS_MD}", file=sys.stderr)
    return 1 if res["onnxprune"].get("error") else 0


if __name__ == "__main__":
    sys.exit(main())
