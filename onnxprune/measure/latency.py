"""onnxruntime latency, measured interleaved so that ratios survive a noisy machine.

Every model gets its own session on the same inputs; after a warm-up of each, the models run in
rounds, the order rotated every round (and reversed every other round) so that drift of the machine
(frequency, other load) hits all of them alike. In a round each model runs a short block of runs
(default 3) and all but the first are recorded: the first re-warms the caches the other model evicted,
so that the smaller model is not measured with the larger one's weights in its caches. The speedup is
the ratio of the medians; the spread of the per-round ratios says how noisy it was.
On the CPU each switch to another session waits ``SWITCH_PAUSE_S`` first: onnxruntime's intra-op
worker threads spin for a while after a run (``session.intra_op.allow_spinning``, on by default, as a
deployed session runs), so the session that ran before still holds the cores when the next one starts.
Measured on 2 cores, five sessions of the *same* mobilenet_v2 at batch 1, interleaved without the pause:
medians 8.0 to 12.5 ms (3.35 ms for the session alone), ratio noise 10-25%; with a 50 ms pause 3.8 to 4.0
ms, 2% (20 ms: 4.0 to 4.9 ms, 4-9%).
On CUDA the inputs are copied to the device once and the outputs stay there (IO binding), so a run
measures the model, not PCIe copies.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np
import onnx

from onnxprune.runtime.session import make_session, require_ort, run_session, run_with_iobinding


@dataclass
class Latency:
    ep: str
    batch: int
    median_ms: float
    p90_ms: float
    runs: int
    providers: list[str] = field(default_factory=list)
    samples_ms: list[float] = field(default_factory=list, repr=False)

    @property
    def throughput(self) -> float:
        return self.batch / (self.median_ms / 1e3) if self.median_ms > 0 else 0.0

    def to_json(self) -> dict:
        return {"ep": self.ep, "providers": self.providers, "batch": self.batch, "median_ms": self.median_ms,
                "p90_ms": self.p90_ms, "runs": self.runs, "throughput_per_s": self.throughput}


class Runner:
    """One onnxruntime session on fixed inputs; calling it times one run (seconds)."""

    def __init__(self, model, feeds: dict[str, np.ndarray], ep: str = "auto", threads: int | None = None):
        self.sess, self.ep = make_session(model, ep, threads)
        self.providers = list(self.sess.get_providers())
        self.feeds = feeds
        self.binding = None
        if self.ep == "cuda":
            ort = require_ort()
            self.binding = self.sess.io_binding()
            self._device_inputs = {}
            for name, arr in feeds.items():
                self._device_inputs[name] = ort.OrtValue.ortvalue_from_numpy(arr, "cuda", 0)
                self.binding.bind_ortvalue_input(name, self._device_inputs[name])
            for out in self.sess.get_outputs():
                self.binding.bind_output(out.name, "cuda")

    def __call__(self) -> float:
        if self.binding is not None:
            t = time.perf_counter()
            run_with_iobinding(self.sess, self.binding)
            self.binding.synchronize_outputs()
            return time.perf_counter() - t
        t = time.perf_counter()
        run_session(self.sess, self.feeds)
        return time.perf_counter() - t

    def outputs(self) -> list[np.ndarray]:
        """The model's outputs on the inputs (copied to the host)."""
        return [np.asarray(o) for o in run_session(self.sess, self.feeds)]


def batch_of(feeds: dict[str, np.ndarray]) -> int:
    for v in feeds.values():
        if v.ndim:
            return int(v.shape[0])
    return 1


DEFAULT_BLOCK = 3
SWITCH_PAUSE_S = 0.05  # before a CPU session's block when another session ran last (module docstring)


def measure_runners(runners: list[Runner], warmup: int = 5, repeat: int = 30, min_seconds: float = 0.0,
                    progress=None, block: int = DEFAULT_BLOCK, pause: float | None = None) -> list[Latency]:
    """Interleaved timing of prepared runners (see the module docstring).

    At least ``repeat`` recorded runs per model (exactly ``repeat`` without ``min_seconds``) and at least
    ``min_seconds``. In a round every model runs ``block`` times in a row and all but the first of those
    runs are recorded: the first re-warms the caches that the other model's run evicted, so the
    latencies are steady-state ones, as in a serving loop, while the models still alternate every few
    runs. ``block=1`` alternates single runs (each run then starts with the other model's data in the
    caches, which penalizes the smaller model). ``pause``: seconds slept before a block whose runner
    is not the one that ran last (default ``SWITCH_PAUSE_S`` when several runners run on the CPU)."""
    block = max(1, int(block))
    if pause is None:
        pause = SWITCH_PAUSE_S if len(runners) > 1 and any(getattr(r, "ep", None) == "cpu" for r in runners) else 0.0
    last = None
    for r in runners:
        for _ in range(warmup):
            r()
    n = len(runners)
    times: list[list[float]] = [[] for _ in runners]
    t_end = time.perf_counter() + min_seconds
    k = 0
    while (times and len(times[0]) < repeat) or time.perf_counter() < t_end:
        order = list(range(n))
        order = order[k % n:] + order[:k % n]
        if (k // n) % 2 == 1:
            order.reverse()
        for i in order:
            if pause > 0 and last is not None and last != i:
                time.sleep(pause)
            last = i
            for j in range(block):
                t = runners[i]()
                if block == 1 or j > 0:
                    times[i].append(t)
        k += 1
        if progress is not None:
            progress(k)
    if min_seconds <= 0:
        times = [ts[:repeat] for ts in times]  # the same count for every model: drops the same positions
    batch = batch_of(runners[0].feeds) if runners else 1
    out = []
    for r, ts in zip(runners, times, strict=True):
        a = np.asarray(ts) * 1e3
        out.append(Latency(r.ep, batch, float(np.median(a)), float(np.percentile(a, 90)), len(a),
                           r.providers, a.tolist()))
    return out


def measure(models: list[onnx.ModelProto | str], feeds: dict[str, np.ndarray], ep: str = "auto",
            threads: int | None = None, warmup: int = 5, repeat: int = 30, min_seconds: float = 0.0,
            progress=None, block: int = DEFAULT_BLOCK) -> list[Latency]:
    """Median and p90 latency of each model on the same inputs, runs interleaved."""
    runners = [Runner(m, feeds, ep, threads) for m in models]
    return measure_runners(runners, warmup, repeat, min_seconds, progress, block)


def speedup(original: Latency, pruned: Latency) -> float:
    """Ratio of the medians (original / pruned)."""
    return original.median_ms / pruned.median_ms if pruned.median_ms > 0 else float("nan")


def round_ratio_spread(original: Latency, pruned: Latency) -> tuple[float, float]:
    """25th and 75th percentile of the per-round ratios original/pruned: how noisy the speedup is."""
    m = min(len(original.samples_ms), len(pruned.samples_ms))
    if m == 0:
        return float("nan"), float("nan")
    r = np.asarray(original.samples_ms[:m]) / np.asarray(pruned.samples_ms[:m])
    return float(np.percentile(r, 25)), float(np.percentile(r, 75))


@dataclass
class NodeLatencies:
    """Median kernel time of every node of a model, by node name (seconds), from onnxruntime's profiler."""

    ep: str
    seconds: dict[str, float]
    runs: int
    total_s: float  # the median whole run, for scale

    def __call__(self, node: onnx.NodeProto) -> float:
        return self.seconds.get(node.name, 0.0)

    def to_json(self) -> dict:
        return {"ep": self.ep, "runs": self.runs, "nodes": len(self.seconds), "median_run_ms": self.total_s * 1e3}


def node_latencies(model: onnx.ModelProto, feeds: dict[str, np.ndarray], ep: str = "auto", threads: int | None = None,
                   warmup: int = 3, runs: int = 10) -> NodeLatencies:
    """A per-layer latency table on ``ep`` (``group-fisher --normalize latency``): onnxruntime's node
    profile of ``runs`` runs after ``warmup``, the median kernel time of each node by its name. Graph
    optimizations are off so that every profiled kernel is one node of ``model`` under its own name
    (an optimized session fuses Conv+Relu into kernels named after tensors, which no node owns); the
    table therefore ranks nodes by their unfused cost. On CUDA the profiler records each kernel as
    onnxruntime sees it from the host. Nodes need names (the analysis names every node)."""
    with tempfile.TemporaryDirectory() as tmp:
        sess, used = make_session(model, ep, threads, optimize=False, profile_prefix=os.path.join(tmp, "p"))
        for _ in range(warmup + runs):
            run_session(sess, feeds)
        path = sess.end_profiling()
        with open(path) as f:
            events = json.load(f)
    per_node: dict[str, list[float]] = {}
    whole: list[float] = []
    suffix = "_kernel_time"
    for ev in events:
        if ev.get("cat") == "Session" and ev.get("name") == "model_run":
            whole.append(ev["dur"] / 1e6)
        elif ev.get("cat") == "Node" and ev.get("name", "").endswith(suffix):
            per_node.setdefault(ev["name"][: -len(suffix)], []).append(ev["dur"] / 1e6)
    table = {name: float(np.median(d[warmup:] if len(d) > warmup else d)) for name, d in per_node.items() if name}
    whole = whole[warmup:] or whole
    return NodeLatencies(used, table, runs, float(np.median(whole)) if whole else 0.0)
