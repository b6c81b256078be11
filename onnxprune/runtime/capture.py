"""Activation capture: run a model on a calibration view in batches, with chosen intermediate
tensors added as graph outputs, and fold each batch into streaming per-channel statistics (and,
optionally, a bounded subsample of rows for least-squares fits) before the next batch runs.

Terms: a *tap* is (tensor name, channel axis). A tensor's *positions* are its elements along every
axis but the channel axis; per channel, ``ChannelStats`` keeps the count of positions seen and the
sums of a, |a| and a² (float64), so ``mean``, ``mean_abs`` and ``mean_sq`` (E[a²]) are exact over
the whole view whatever the batching. When a tensor's axis 0 has one entry per sample of the batch
(and is not the channel axis), it is the *sample axis*; ``RowSample`` then keeps up to ``k``
positions per sample as rows of a float32 matrix [rows, channels], chosen by a seed derived from
(seed, the sample's global index) alone, so two captures of same-shaped tensors (an original
and a pruned model) pick the same positions of the same samples. Without a sample axis, up to
``k * samples`` positions of each run are kept.

Batch size and memory. ``run_batched`` runs one sample first and measures the bytes one sample
costs: its inputs plus every fetched array (``per_sample``). Every later run takes
``b = clamp(budget_bytes // per_sample, 1, max_batch)`` samples (exactly the model's fixed batch,
when it fixes one). Only the current batch is alive: its inputs and fetched arrays are dropped
before the next batch is read, so the arrays this module holds are at most
``max(budget_bytes, per_sample)`` for the batch, plus 3 x channels float64 per tap, plus the row
samples (``k x samples x channels x 4`` bytes per sampled tap). onnxruntime's own working memory
(intermediate activations of the batch) comes on top and grows linearly with ``b``; lower the budget
to lower it. ``Capture.batches`` and ``Capture.peak_bytes`` say what was used.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx

from onnxprune.errors import UserError
from onnxprune.runtime.calib import Batch, CalibView
from onnxprune.runtime.session import make_session, run_session

log = logging.getLogger(__name__)

DEFAULT_BUDGET = 256 * 2**20  # bytes of inputs + fetched arrays of one batch
MAX_BATCH = 256
Progress = Callable[[int, int], None]  # (samples done, samples in the view)


# ----------------------------------------------------------------------------------------------
# batched runs


@dataclass
class RunStats:
    """What ``run_batched`` did: samples per run, and the largest bytes one run held."""

    batches: list[int] = field(default_factory=list)
    peak_bytes: int = 0
    per_sample: int = 0


def _nbytes(arrays) -> int:
    return sum(int(np.asarray(a).nbytes) for a in arrays)


def batch_size(per_sample: int, budget_bytes: int, max_batch: int = MAX_BATCH) -> int:
    """Samples per run: as many as ``budget_bytes`` holds at ``per_sample`` bytes each, in [1, max_batch]."""
    return int(max(1, min(max_batch, budget_bytes // max(1, per_sample))))


def run_batched(sessions: Sequence, view: CalibView, fetch: Sequence[Sequence[str] | None],
                consume: Callable[[Batch, list[list[np.ndarray]]], None], *, budget_bytes: int = DEFAULT_BUDGET,
                max_batch: int = MAX_BATCH, progress: Progress | None = None) -> RunStats:
    """Run every session on each batch of ``view`` (session i fetching ``fetch[i]``; None: all its
    outputs) and hand the batch and the outputs to ``consume`` before the next batch is read. The
    first run takes one sample (or the model's fixed batch); later ones are sized from the bytes it
    measured (module docstring)."""
    if budget_bytes < 1 or max_batch < 1:
        raise ValueError("budget_bytes and max_batch must be >= 1")
    stats = RunStats()
    fixed = view.batch_rows
    start, size = 0, fixed or 1
    while start < view.n:
        batch = view.read(start, min(start + size, view.n))
        outs = [run_session(s, batch.feeds, list(f) if f is not None else None) for s, f in zip(sessions, fetch, strict=True)]
        held = _nbytes(batch.feeds.values()) + sum(_nbytes(o) for o in outs)
        stats.batches.append(batch.n)
        stats.peak_bytes = max(stats.peak_bytes, held)
        stats.per_sample = max(stats.per_sample, -(-held // batch.n))
        consume(batch, outs)
        start += batch.n
        del batch, outs  # only one batch alive: dropped before the next is read
        if progress is not None:
            progress(start, view.n)
        if not fixed:
            size = batch_size(stats.per_sample, budget_bytes, max_batch)
    log.info("ran %d samples in %d batches (largest %d; %d bytes per sample, peak %d bytes)",
             view.n, len(stats.batches), max(stats.batches, default=0), stats.per_sample, stats.peak_bytes)
    return stats


# ----------------------------------------------------------------------------------------------
# accumulators


def _sample_axis(arr: np.ndarray, axis: int, n: int) -> bool:
    return arr.ndim >= 2 and axis != 0 and arr.shape[0] == n


@dataclass
class ChannelStats:
    """Streaming per-channel statistics of one tensor: ``count`` positions per channel and float64
    sums; ``mean``, ``mean_abs``, ``mean_sq`` (E[a²]) and ``var`` over everything seen."""

    name: str
    axis: int  # normalized (>= 0)
    channels: int
    count: int = 0
    sum: np.ndarray = field(default=None, repr=False)  # type: ignore[assignment]
    sum_abs: np.ndarray = field(default=None, repr=False)  # type: ignore[assignment]
    sum_sq: np.ndarray = field(default=None, repr=False)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        for k in ("sum", "sum_abs", "sum_sq"):
            if getattr(self, k) is None:
                setattr(self, k, np.zeros(self.channels, np.float64))

    def update(self, arr: np.ndarray) -> None:
        a = np.moveaxis(np.asarray(arr), self.axis, -1).reshape(-1, self.channels).astype(np.float64, copy=False)
        self.count += a.shape[0]
        self.sum += a.sum(axis=0)
        self.sum_abs += np.abs(a).sum(axis=0)
        self.sum_sq += np.einsum("ij,ij->j", a, a)

    @property
    def mean(self) -> np.ndarray:
        return self.sum / max(self.count, 1)

    @property
    def mean_abs(self) -> np.ndarray:
        return self.sum_abs / max(self.count, 1)

    @property
    def mean_sq(self) -> np.ndarray:
        return self.sum_sq / max(self.count, 1)

    @property
    def var(self) -> np.ndarray:
        return np.maximum(self.mean_sq - self.mean**2, 0.0)

    def to_json(self) -> dict:
        return {"name": self.name, "axis": self.axis, "channels": self.channels, "count": self.count,
                "mean": self.mean, "mean_abs": self.mean_abs, "mean_sq": self.mean_sq}


@dataclass
class RowSample:
    """Up to ``k`` positions per sample of one tensor, as float32 rows [rows, channels] (module
    docstring); ``sources`` gives, per row, the global sample index (-1: no sample axis)."""

    name: str
    axis: int
    channels: int
    k: int
    seed: int = 0
    parts: list[np.ndarray] = field(default_factory=list, repr=False)
    origin: list[np.ndarray] = field(default_factory=list, repr=False)

    def update(self, arr: np.ndarray, batch: Batch) -> None:
        arr = np.asarray(arr)
        if _sample_axis(arr, self.axis, batch.n):
            a = np.moveaxis(arr, self.axis, -1).reshape(batch.n, -1, self.channels)
            for j, g in enumerate(batch.indices):
                pos = self._positions(a.shape[1], int(g))
                self.parts.append(a[j, pos].astype(np.float32))
                self.origin.append(np.full(len(pos), int(g), np.int64))
        else:
            a = np.moveaxis(arr, self.axis, -1).reshape(-1, self.channels)
            rng = np.random.default_rng([self.seed, int(batch.indices[0]), 1])
            take = min(a.shape[0], self.k * batch.n)
            pos = np.sort(rng.choice(a.shape[0], size=take, replace=False))
            self.parts.append(a[pos].astype(np.float32))
            self.origin.append(np.full(take, -1, np.int64))

    def _positions(self, p: int, sample: int) -> np.ndarray:
        if p <= self.k:
            return np.arange(p)
        return np.sort(np.random.default_rng([self.seed, sample]).choice(p, size=self.k, replace=False))

    @property
    def rows(self) -> np.ndarray:
        if not self.parts:
            return np.zeros((0, self.channels), np.float32)
        return np.concatenate(self.parts, axis=0)

    @property
    def sources(self) -> np.ndarray:
        return np.concatenate(self.origin) if self.origin else np.zeros(0, np.int64)


# ----------------------------------------------------------------------------------------------
# capture


@dataclass
class Capture:
    """The result of ``capture``: statistics per tapped tensor, row samples for the tensors asked,
    the samples per run (``batches``), the largest bytes one run held and the budget."""

    stats: dict[str, ChannelStats]
    rows: dict[str, RowSample]
    samples: int
    batches: tuple[int, ...]
    peak_bytes: int
    per_sample_bytes: int
    budget_bytes: int


def with_outputs(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """A copy of ``model`` whose graph outputs also include ``names`` (tensors computed by nodes)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    existing = {o.name for o in m.graph.output}
    for n in names:
        if n not in existing:
            m.graph.output.append(onnx.ValueInfoProto(name=n))
            existing.add(n)
    return m


def _check_taps(model: onnx.ModelProto, taps: Sequence[tuple[str, int]], rows: dict[str, int]) -> None:
    produced = {o for n in model.graph.node for o in n.output if o}
    inputs = {i.name for i in model.graph.input}
    for name, _axis in taps:
        if name not in produced and name not in inputs:
            raise UserError(f"capture: no tensor named '{name}' is computed in the model")
    tapped = {n for n, _ in taps}
    for name, k in rows.items():
        if name not in tapped:
            raise UserError(f"capture: rows asked for '{name}', which is not tapped")
        if k < 1:
            raise UserError(f"capture: rows per sample for '{name}' must be >= 1, got {k}")


def capture(model: onnx.ModelProto, taps: Sequence[tuple[str, int]], view: CalibView, *,
            rows: dict[str, int] | None = None, ep: str = "auto", budget_bytes: int = DEFAULT_BUDGET,
            max_batch: int = MAX_BATCH, seed: int = 0, progress: Progress | None = None) -> Capture:
    """Per-channel statistics of every tap ``(tensor, channel axis)`` over the samples of ``view``;
    ``rows``: {tensor: k} keeps up to k positions per sample of those tensors (``RowSample``).
    Graph inputs may be tapped (read from the feeds). Memory: module docstring."""
    rows = dict(rows or {})
    _check_taps(model, taps, rows)
    inputs = {i.name for i in model.graph.input}
    fetched = list(dict.fromkeys(n for n, _ in taps if n not in inputs))
    fetch = fetched or [model.graph.output[0].name]  # onnxruntime runs nothing without an output asked
    sess, _ = make_session(with_outputs(model, fetched), ep, precise=True)
    stats: dict[str, ChannelStats] = {}
    samples: dict[str, RowSample] = {}
    axes = dict(taps)

    def consume(batch: Batch, outs: list[list[np.ndarray]]) -> None:
        values = dict(zip(fetch, outs[0], strict=True))
        for name in axes:
            arr = np.asarray(batch.feeds[name] if name in inputs else values[name])
            if name not in stats:
                ax = axes[name] + arr.ndim if axes[name] < 0 else axes[name]
                if not 0 <= ax < arr.ndim:
                    raise UserError(f"capture: '{name}' has rank {arr.ndim}; channel axis {axes[name]} is out of range")
                stats[name] = ChannelStats(name, ax, int(arr.shape[ax]))
                if name in rows:
                    samples[name] = RowSample(name, ax, int(arr.shape[ax]), rows[name], seed)
            st = stats[name]
            if arr.ndim <= st.axis or arr.shape[st.axis] != st.channels:
                raise UserError(f"capture: '{name}' changed its channel count between batches "
                                f"({st.channels} -> {arr.shape[st.axis] if arr.ndim > st.axis else '?'})")
            st.update(arr)
            if name in samples:
                samples[name].update(arr, batch)

    run = run_batched([sess], view, [fetch], consume, budget_bytes=budget_bytes, max_batch=max_batch,
                      progress=progress)
    return Capture(stats, samples, view.n, tuple(run.batches), run.peak_bytes, run.per_sample, budget_bytes)
