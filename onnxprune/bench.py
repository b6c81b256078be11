"""onnxruntime latency, measured interleaved so ratios survive a noisy machine."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import onnx

from onnxprune.runtime import make_session, require_ort


@dataclass
class Latency:
    ep: str
    batch: int
    median_ms: float
    p90_ms: float
    runs: int

    @property
    def throughput(self) -> float:
        return self.batch / (self.median_ms / 1e3) if self.median_ms > 0 else 0.0

    def to_json(self) -> dict:
        return {"ep": self.ep, "batch": self.batch, "median_ms": self.median_ms, "p90_ms": self.p90_ms,
                "runs": self.runs, "throughput_per_s": self.throughput}


class _Runner:
    def __init__(self, model, feeds: dict[str, np.ndarray], ep: str, threads: int | None):
        self.sess, self.ep = make_session(model, ep, threads)
        self.feeds = feeds
        self.binding = None
        if self.ep == "cuda":
            ort = require_ort()
            self.binding = self.sess.io_binding()
            for name, arr in feeds.items():
                self.binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(arr, "cuda", 0))
            for out in self.sess.get_outputs():
                self.binding.bind_output(out.name, "cuda")

    def __call__(self) -> float:
        t = time.perf_counter()
        if self.binding is not None:
            self.sess.run_with_iobinding(self.binding)
        else:
            self.sess.run(None, self.feeds)
        return time.perf_counter() - t


def measure(models: list[onnx.ModelProto | str], feeds: dict[str, np.ndarray], ep: str = "auto",
            threads: int | None = None, warmup: int = 5, repeat: int = 30, min_seconds: float = 0.0,
            progress=None) -> list[Latency]:
    """Median and p90 latency of each model on the same inputs, runs interleaved round-robin."""
    runners = [_Runner(m, feeds, ep, threads) for m in models]
    for r in runners:
        for _ in range(warmup):
            r()
    times: list[list[float]] = [[] for _ in runners]
    t_end = time.perf_counter() + min_seconds
    k = 0
    while k < repeat or time.perf_counter() < t_end:
        order = runners if k % 2 == 0 else runners[::-1]
        for r in order:
            times[runners.index(r)].append(r())
        k += 1
        if progress is not None:
            progress(k)
    batch = int(next(iter(feeds.values())).shape[0]) if feeds else 1
    out = []
    for r, ts in zip(runners, times, strict=True):
        a = np.asarray(ts) * 1e3
        out.append(Latency(r.ep, batch, float(np.median(a)), float(np.percentile(a, 90)), len(a)))
    return out
