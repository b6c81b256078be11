"""Latency tables (``--allocate latency``): for every prunable group, the time of the kernels it touches
as a function of its kept count, measured on the deployment runtime (``planning.allocate`` reads them).

How it is measured, cheaply: not one group at a time (hundreds of models) but every measured group
at once, at a few kept shares f (``FRACTIONS``; each group's count ``ceil(f x size)`` rounded up to
``--round-to``, as the plans round, so the samples sit on the alignment steps the plans will use),
plus two samples that cut one side of ``allocate.split_groups`` each to ``SPLIT_FRACTION`` (the
other side whole), so that a convolution between two groups is also seen with only its input or
only its output narrowed: one pruned model per sample (10), each profiled by onnxruntime with the
session the deployment would use (graph optimizations on: fused and NCHWc kernels, as served), the
models' runs interleaved (rounds, the order rotated; in a round each model runs ``BLOCK`` times and
all but the first run are recorded, so the caches hold its own weights), a low percentile
(``QUANTILE``) of every kernel's times and of the whole run kept: on a shared machine other
processes only ever add time to a kernel, in bursts that a median of a dozen runs does not remove.
The whole run's time is measured apart, on the same models without the profiler (interleaved
too: the profiler costs tens of microseconds a kernel, most of a small model's run).
``planning.allocate`` then attributes each kernel to the groups whose channel axes its nodes have
and models a kernel of two groups by a surface fitted to its samples (see its docstring for the
approximations).

Cache: a table is stored as JSON under ``$ONNXPRUNE_LATENCY_CACHE`` (default
``~/.cache/onnxprune/latency``), named by a hash of its key: the analysed model's hash, execution
provider, threads, batch, input shapes, round-to, the samples, runs and statistic, whether the
session optimizes, and the machine (``runtime.machine.machine_facts``: CPU model, cores, SIMD flags,
onnxruntime version). Any change of those measures anew.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx

from onnxprune.analysis.analyze import Analysis
from onnxprune.analysis.coupling import CouplingGraph, Group
from onnxprune.measure import cache
from onnxprune.measure.latency import Runner, measure_runners
from onnxprune.planning.allocate import TableData, TableSample, anchor_key, split_groups, table_groups
from onnxprune.planning.plan import GroupPlan, Plan, select_units
from onnxprune.planning.rounding import round_keep, step_of, unit_steps
from onnxprune.rewrite.apply import rewrite
from onnxprune.runtime.inputs import make_inputs
from onnxprune.runtime.machine import machine_facts
from onnxprune.runtime.session import make_session, resolve_ep, run_session

CACHE_ENV = "ONNXPRUNE_LATENCY_CACHE"
FRACTIONS = (1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125)
SPLIT_FRACTION = 0.5  # the two extra samples: each side of allocate.split_groups cut to this alone
RUNS = 6  # recorded profiled runs per sample (the kernels' times)
TOTAL_RUNS = 4  # recorded plain runs per sample (the whole run's time)
WARMUP = 2
BLOCK = 3  # runs of a model in a row per round; the first re-warms the caches and is not recorded
QUANTILE = 25  # percentile of a kernel's recorded times kept: other processes only ever add time
_SUFFIX = "_kernel_time"


def cache_dir(path: str | os.PathLike | None = None) -> Path:
    """``path``, else ``$ONNXPRUNE_LATENCY_CACHE``, else ``~/.cache/onnxprune/latency``."""
    return cache.cache_dir(CACHE_ENV, "latency", path)


def table_key(model: onnx.ModelProto, *, ep: str, threads: int | None, batch: int, round_to: int,
              input_shapes=None, fractions=FRACTIONS, runs: int = RUNS, optimize: bool = True,
              machine: dict | None = None, block: int = BLOCK, split: bool = True,
              total_runs: int = TOTAL_RUNS, mode: str = "dim") -> dict:
    """What a table depends on (module docstring); ``machine``: ``machine_facts`` (default: this one's);
    ``mode``: the analysis mode, which decides the groups (``pipeline.head_mode_for``)."""
    return {"model": cache.model_digest(model), **({"mode": mode} if mode != "dim" else {}), "ep": ep, "threads": threads, "batch": int(batch),
            "round_to": int(round_to), "input_shapes": {k: list(v) for k, v in sorted((input_shapes or {}).items())},
            "fractions": [float(f) for f in fractions], "runs": int(runs), "total_runs": int(total_runs),
            "block": int(block), "quantile": QUANTILE,
            "split": SPLIT_FRACTION if split else None, "optimize": bool(optimize),
            "machine": machine if machine is not None else machine_facts(ep)}


def key_file(key: dict, directory: str | os.PathLike | None = None) -> Path:
    return cache_dir(directory) / cache.key_name(key)


def load_cached(key: dict, directory=None) -> TableData | None:
    j = cache.read_json(key_file(key, directory))
    try:
        data = TableData.from_json(j)
    except (ValueError, KeyError, TypeError):
        return None
    if data.key != key:
        return None
    data.cached = True
    return data


def store(data: TableData, directory=None) -> Path | None:
    """Write ``data`` to the cache atomically; None (and a log line) when the cache is not writable."""
    return cache.write_json(key_file(data.key, directory), data.to_json(), "latency table")


def sample_counts(groups: list[Group], fraction: float, steps: int | Mapping[int, int]) -> dict[int, int]:
    """Kept count of every group at ``fraction``: ``ceil(f x size)``, rounded up to the group's step
    (``steps``: one for all, or per group id, ``planning.rounding.unit_steps``)."""
    return {g.id: round_keep(g.size, int(math.ceil(fraction * g.size - 1e-9)), step_of(steps, g.id)) for g in groups}


def sample_model(an: Analysis, groups: list[Group], counts: dict[int, int]) -> onnx.ModelProto:
    """The analysed model with every group of ``groups`` cut to its count (which units: any; a group
    of entangled units balanced as plans balance it)."""
    cg: CouplingGraph = an.cg
    plan = Plan({g.id: GroupPlan(g.id, g.size, select_units(cg, g, -np.arange(g.size, dtype=np.float64), counts[g.id]),
                                 g.is_approximate) for g in groups if counts[g.id] < g.size}, {}, {})
    return rewrite(an.model, cg, plan) if plan.groups else an.model


def profile_interleaved(models: list[onnx.ModelProto], feeds: dict[str, np.ndarray], ep: str = "auto",
                        threads: int | None = None, runs: int = RUNS, warmup: int = WARMUP, optimize: bool = True,
                        progress=None, block: int = BLOCK) -> list[tuple[dict[str, float], float]]:
    """Per model: (seconds of every profiled kernel, of the whole run: the ``QUANTILE`` percentile) over at least ``runs``
    recorded runs, the models' runs interleaved: rounds with the order rotated, in each a block of
    ``block`` runs per model of which all but the first are recorded (module docstring)."""
    block = max(2, int(block))
    rounds = int(math.ceil(runs / (block - 1)))
    with tempfile.TemporaryDirectory() as tmp:
        sessions = [make_session(m, ep, threads, optimize=optimize, profile_prefix=os.path.join(tmp, f"p{i}"))[0]
                    for i, m in enumerate(models)]
        for s in sessions:
            for _ in range(warmup):
                run_session(s, feeds)
        n = len(sessions)
        for r in range(rounds):
            order = list(range(n))
            order = order[r % n:] + order[:r % n]
            if (r // n) % 2:
                order.reverse()
            for i in order:
                for _ in range(block):  # the first re-warms the caches the others evicted
                    run_session(sessions[i], feeds)
            if progress is not None:
                progress(r + 1, rounds)
        out = []
        for s in sessions:
            with open(s.end_profiling()) as f:
                out.append(_recorded(json.load(f), warmup, block))
    return out


def whole_runs(models: list[onnx.ModelProto], feeds: dict[str, np.ndarray], ep: str = "auto",
               threads: int | None = None, runs: int = TOTAL_RUNS, warmup: int = WARMUP) -> list[float]:
    """The ``QUANTILE`` percentile of each model's whole run (seconds) without the profiler, the models
    interleaved (``measure.latency.measure_runners``): the profiler costs tens of microseconds a
    kernel, which on a small model is most of a run."""
    lat = measure_runners([Runner(m, feeds, ep, threads) for m in models], warmup, runs, block=BLOCK)
    return [float(np.percentile(x.samples_ms, QUANTILE)) / 1e3 for x in lat]


def _recorded(events: list[dict], warmup: int, block: int = BLOCK) -> tuple[dict[str, float], float]:
    """The ``QUANTILE`` percentile of every kernel's time and of the whole run over the recorded runs of
    one profile (after ``warmup``, all but the first of every ``block``)."""
    runs = sorted((e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"),
                  key=lambda e: e["ts"])
    keep = [i for i in range(len(runs)) if i >= warmup and (i - warmup) % block != 0]
    starts = np.asarray([r["ts"] for r in runs], dtype=np.float64)
    per: list[dict[str, float]] = [{} for _ in runs]
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith(_SUFFIX):
            continue
        i = int(np.searchsorted(starts, e["ts"], side="right")) - 1
        if 0 <= i < len(runs):
            name = e["name"][: -len(_SUFFIX)]
            per[i][name] = per[i].get(name, 0.0) + e["dur"] / 1e6
    names = sorted({k for i in keep for k in per[i]})
    kernels = {k: float(np.percentile([per[i].get(k, 0.0) for i in keep], QUANTILE)) for k in names}
    total = float(np.percentile([runs[i]["dur"] / 1e6 for i in keep], QUANTILE)) if keep else 0.0
    return kernels, total


def build_table(an: Analysis, *, ep: str = "auto", threads: int | None = None, batch: int = 1, round_to: int = 1,
                input_shapes=None, input_arrays=None, fractions=FRACTIONS, runs: int = RUNS,
                total_runs: int = TOTAL_RUNS, warmup: int = WARMUP,
                optimize: bool = True, split: bool = True, cache: bool = True, directory=None,
                progress=None) -> TableData:
    """The latency table of ``an`` (every group of ``allocate.table_groups``) at ``batch`` on ``ep``
    with ``threads``: from the cache when its key matches, else measured (and cached)."""
    ep = resolve_ep(ep)
    key = table_key(an.model, ep=ep, threads=threads, batch=batch, round_to=round_to,
                    input_shapes=input_shapes, fractions=fractions, runs=runs, optimize=optimize, split=split,
                    total_runs=total_runs, mode=an.cg.head_mode)
    groups = table_groups(an.cg)
    sizes = {anchor_key(an.cg, g): g.size for g in groups}
    if cache:
        hit = load_cached(key, directory)
        if hit is not None and hit.sizes == sizes:
            return hit
    t0 = time.perf_counter()
    steps = unit_steps(an.cg, groups, round_to)
    plan = [(float(f), "all", sample_counts(groups, f, steps)) for f in fractions]
    if split and len(groups) > 1:
        half = sample_counts(groups, SPLIT_FRACTION, steps)
        for part, side in zip("AB", split_groups(an.cg, groups), strict=True):
            plan.append((SPLIT_FRACTION, part, {g.id: half[g.id] if g.id in side else g.size for g in groups}))
    models = [sample_model(an, groups, c) for _, _, c in plan]
    feeds = make_inputs(an.model, input_shapes, batch=batch, arrays=input_arrays)
    measured = profile_interleaved(models, feeds, ep, threads, runs, warmup, optimize, progress)
    totals = whole_runs(models, feeds, ep, threads, total_runs, warmup)
    samples = [TableSample(f, {anchor_key(an.cg, g): c[g.id] for g in groups}, kernels, total, part, profiled)
               for (f, part, c), (kernels, profiled), total in zip(plan, measured, totals, strict=True)]
    data = TableData(key, sizes, samples, time.perf_counter() - t0)
    if cache:
        store(data, directory)
    return data
