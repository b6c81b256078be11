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
samples (``k x samples x (channels x 4 + 8)`` bytes per sampled tap: the float32 rows and their
sample's index), plus the temporaries of folding one array in: ``2 x max(STATS_CHUNK, channels) x 8``
bytes (1 MiB; rows are copied one sample at a time), plus Python's bookkeeping (tens of KiB).
Measured with tracemalloc plus the fetched arrays (``tests/test_capture_memory.py``). onnxruntime's own working memory
(intermediate activations of the batch) comes on top and grows linearly with ``b``; lower the budget
to lower it. ``Capture.batches`` and ``Capture.peak_bytes`` say what was used.

Gram matrices (``GramSpec``, ``GramSum``; what ``--importance recon`` reads). A spec names the
*features* one linear consumer sees: the channels of a tensor at one position (a dense consumer:
Gemm, MatMul), or a Conv's input patch (per conv group: in-group channels x kernel taps, read from
the zero-padded input at each output position, features ordered channel-major then tap). Rows are
positions, subsampled like ``RowSample`` (up to ``rows`` per sample, seeded by the sample's global
index); each row goes to one of two *folds* by the parity of its sample's index (alternating rows
without a sample axis), so a ridge can be cross-validated. Per fold and conv group ``GramSum``
keeps float64 sums: the row count, sum f and sum f fᵀ. Memory: ``2 x groups x (F² + F) x 8`` bytes
per spec (``GramSpec.nbytes``), plus the features of at most ``GRAM_CHUNK`` values at a time in
float64 (about 3 copies: 24 MiB), read from the fetched array by index (no padded copy);
``capture_grams`` fits the specs into passes of at most ``gram_budget`` bytes (a spec larger than
the budget gets a pass alone), one model run over the view per pass, one batch alive at a time as above.
"""

from __future__ import annotations

import itertools
import logging
import time
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
STATS_CHUNK = 1 << 16  # elements ChannelStats.update converts to float64 at a time
GRAM_ROWS = 64  # positions per sample a Gram matrix is taken on
GRAM_BUDGET = 1 << 30  # bytes of Gram sums held at once (both folds)
GRAM_CHUNK = 1 << 20  # features (rows x channels x taps) a Gram update holds in float64 at a time
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


def _rows_at(a: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """Rows ``pos`` (flat positions over every axis but the last, the channel axis) of ``a``, float32
    [len(pos), channels], without copying the rest of ``a``."""
    if a.ndim == 1:
        return a[None][pos].astype(np.float32)
    return a[np.unravel_index(pos, a.shape[:-1])].astype(np.float32)


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
        """Fold ``arr`` in, at most ``STATS_CHUNK`` elements (or one channel column) in float64 at a time."""
        a = np.asarray(arr)
        pre, post = int(np.prod(a.shape[:self.axis])), int(np.prod(a.shape[self.axis + 1:]))
        a = a.reshape(pre, self.channels, post)  # a view of a contiguous array
        cols = max(1, min(post, STATS_CHUNK // max(self.channels, 1)))
        lead = max(1, STATS_CHUNK // max(self.channels * cols, 1))
        for i in range(0, pre, lead):
            for j in range(0, post, cols):
                b = a[i:i + lead, :, j:j + cols].astype(np.float64)
                self.sum += b.sum(axis=(0, 2))
                self.sum_sq += np.einsum("icj,icj->c", b, b)
                self.sum_abs += np.abs(b, out=b).sum(axis=(0, 2))
        self.count += pre * post

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
            parts, origin = [], []
            for j, g in enumerate(batch.indices):
                a = np.moveaxis(arr[j], self.axis - 1, -1)  # a view: only the rows taken are copied
                pos = self._positions(int(np.prod(a.shape[:-1])), int(g))
                parts.append(_rows_at(a, pos))
                origin.append(np.full(len(pos), int(g), np.int64))
            self.parts.append(np.concatenate(parts))  # one array per batch, not per sample
            self.origin.append(np.concatenate(origin))
        else:
            a = np.moveaxis(arr, self.axis, -1)
            p = int(np.prod(a.shape[:-1]))
            rng = np.random.default_rng([self.seed, int(batch.indices[0]), 1])
            take = min(p, self.k * batch.n)
            pos = np.sort(rng.choice(p, size=take, replace=False))
            self.parts.append(_rows_at(a, pos))
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
# Gram matrices of consumer features


@dataclass(frozen=True)
class GramSpec:
    """The features of one linear consumer's input (module docstring): ``tensor`` with ``channels``
    on ``axis``; ``kernel`` empty: one feature per channel, else a Conv's patches (``axis`` 1, the
    Conv's strides, dilations, ``pads`` begin+end, ``auto_pad`` and ``groups``)."""

    tensor: str
    axis: int
    channels: int
    kernel: tuple[int, ...] = ()
    strides: tuple[int, ...] = ()
    dilations: tuple[int, ...] = ()
    pads: tuple[int, ...] = ()
    auto_pad: str = "NOTSET"
    groups: int = 1

    @property
    def taps(self) -> int:
        return int(np.prod(self.kernel)) if self.kernel else 1

    @property
    def features(self) -> int:
        """Features of one conv group: in-group channels x kernel taps."""
        return self.channels // max(self.groups, 1) * self.taps

    @property
    def nbytes(self) -> int:
        f = self.features
        return 2 * self.groups * (f * f + f) * 8


def _choose_rows(p: int, k: int, seed: int, sample: int) -> np.ndarray:
    if p <= k:
        return np.arange(p)
    return np.sort(np.random.default_rng([seed, sample, 11]).choice(p, size=k, replace=False))


def _row_picks(batch: Batch, n_pos: int, per_sample: bool, k: int, seed: int):
    """(sample row in the array, position, fold) of the subsampled rows of one batch."""
    if not per_sample:
        pos = _choose_rows(n_pos, k * batch.n, seed, int(batch.indices[0]))
        return np.zeros(len(pos), np.int64), pos, np.arange(len(pos)) % 2
    picks = [_choose_rows(n_pos, k, seed, int(g)) for g in batch.indices]
    rows = np.concatenate([np.full(len(p), j, np.int64) for j, p in enumerate(picks)])
    return rows, np.concatenate(picks), np.asarray(batch.indices, np.int64)[rows] % 2


def conv_pads(spec: GramSpec, spatial: Sequence[int]) -> tuple[list[int], list[int]]:
    """(pads at the beginning, pads at the end) of every spatial axis, ``auto_pad`` resolved."""
    nd = len(spec.kernel)
    strides = spec.strides or (1,) * nd
    dil = spec.dilations or (1,) * nd
    if spec.auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        begin, end = [], []
        for i in range(nd):
            out = -(-spatial[i] // strides[i])
            total = max(0, (out - 1) * strides[i] + (spec.kernel[i] - 1) * dil[i] + 1 - spatial[i])
            small, big = total // 2, total - total // 2
            b, e = (small, big) if spec.auto_pad == "SAME_UPPER" else (big, small)
            begin.append(b)
            end.append(e)
        return begin, end
    if spec.auto_pad == "VALID" or not spec.pads:
        return [0] * nd, [0] * nd
    return list(spec.pads[:nd]), list(spec.pads[nd:])


def _picks(spec: GramSpec, arr: np.ndarray, batch: Batch, k: int, seed: int):
    """(sample row in the array, position, fold) of the subsampled rows of one batch, and the
    positions' grid (dense: [positions]; Conv: the output's spatial shape)."""
    if not spec.kernel:
        n_pos = arr.size // spec.channels
        per_sample = arr.ndim >= 2 and spec.axis != 0 and arr.shape[0] == batch.n
        grid = (n_pos // batch.n,) if per_sample else (n_pos,)
        return (*_row_picks(batch, grid[0], per_sample, k, seed), grid)
    nd = len(spec.kernel)
    strides = spec.strides or (1,) * nd
    dil = spec.dilations or (1,) * nd
    begin, end = conv_pads(spec, arr.shape[2:])
    grid = tuple((arr.shape[2 + i] + begin[i] + end[i] - dil[i] * (spec.kernel[i] - 1) - 1) // strides[i] + 1
                 for i in range(nd))
    return (*_row_picks(batch, int(np.prod(grid)), arr.shape[0] == batch.n, k, seed), grid)


def gram_features(spec: GramSpec, arr: np.ndarray, rows: np.ndarray, pos: np.ndarray, grid) -> np.ndarray:
    """The features of the rows ``(rows, pos)`` (from ``_picks``), float64 [R, groups, features]:
    read from ``arr`` by index, zeros where a Conv's patch falls in its padding (no padded copy)."""
    if not spec.kernel:
        a = np.moveaxis(arr, spec.axis, -1)
        a = a.reshape(-1, spec.channels) if len(grid) == 1 and a.size == grid[0] * spec.channels \
            else a.reshape(-1, grid[0], spec.channels)
        f = a[pos] if a.ndim == 2 else a[rows, pos]
        return f.astype(np.float64)[:, None, :]
    nd = len(spec.kernel)
    strides = spec.strides or (1,) * nd
    dil = spec.dilations or (1,) * nd
    begin, _ = conv_pads(spec, arr.shape[2:])
    where = np.unravel_index(pos, grid)
    out = np.zeros((len(rows), spec.channels, spec.taps))
    for t, tap in enumerate(itertools.product(*[range(kk) for kk in spec.kernel])):
        coords = [where[i] * strides[i] + tap[i] * dil[i] - begin[i] for i in range(nd)]
        ok = np.logical_and.reduce([(c >= 0) & (c < arr.shape[2 + i]) for i, c in enumerate(coords)])
        sel = np.flatnonzero(ok)
        out[sel, :, t] = arr[(rows[sel], slice(None), *[c[sel] for c in coords])]
    return out.reshape(len(rows), spec.groups, spec.features)


@dataclass
class GramSum:
    """Float64 sums over the rows of one spec, per fold and conv group: ``n`` [2], ``s`` [2, G, F]
    (sum f), ``ss`` [2, G, F, F] (sum f fᵀ)."""

    spec: GramSpec
    n: np.ndarray = field(default=None, repr=False)  # type: ignore[assignment]
    s: np.ndarray = field(default=None, repr=False)  # type: ignore[assignment]
    ss: np.ndarray = field(default=None, repr=False)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        g, f = self.spec.groups, self.spec.features
        if self.n is None:
            self.n = np.zeros(2, np.int64)
            self.s = np.zeros((2, g, f))
            self.ss = np.zeros((2, g, f, f))

    def update(self, arr: np.ndarray, batch: Batch, k: int, seed: int) -> None:
        arr = np.asarray(arr)
        if arr.ndim <= self.spec.axis or arr.shape[self.spec.axis] != self.spec.channels:
            raise UserError(f"capture: '{self.spec.tensor}' has shape {arr.shape}; its Gram matrix expects "
                            f"{self.spec.channels} channels on axis {self.spec.axis}")
        rows, pos, fold, grid = _picks(self.spec, arr, batch, k, seed)
        step = max(1, GRAM_CHUNK // max(self.spec.channels * self.spec.taps, 1))
        for i in range(0, len(rows), step):  # at most GRAM_CHUNK float64 features (x3) at a time
            f = gram_features(self.spec, arr, rows[i:i + step], pos[i:i + step], grid)
            fd = fold[i:i + step]
            for j in (0, 1):
                fj = f[fd == j]
                if not len(fj):
                    continue
                self.n[j] += len(fj)
                self.s[j] += fj.sum(axis=0)
                t = fj.transpose(1, 0, 2)  # [G, R, F]
                self.ss[j] += np.matmul(t.transpose(0, 2, 1), t)

    @property
    def rows(self) -> int:
        return int(self.n.sum())

    def moments(self, fold: int | None = None) -> tuple[int, np.ndarray, np.ndarray]:
        """(rows, mean [G, F], centered covariance [G, F, F]) of one fold, or of both (None)."""
        if fold is None:
            n, s, ss = int(self.n.sum()), self.s.sum(axis=0), self.ss.sum(axis=0)
        else:
            n, s, ss = int(self.n[fold]), self.s[fold], self.ss[fold]
        mu = s / max(n, 1)
        cov = ss / max(n, 1) - mu[:, :, None] * mu[:, None, :]
        return n, mu, cov


def gram_passes(specs: Sequence[GramSpec], gram_budget: int) -> list[list[GramSpec]]:
    """``specs`` in passes of at most ``gram_budget`` bytes of sums each (a larger spec: a pass alone)."""
    out: list[list[GramSpec]] = []
    cur: list[GramSpec] = []
    used = 0
    for sp in dict.fromkeys(specs):
        if cur and used + sp.nbytes > gram_budget:
            out.append(cur)
            cur, used = [], 0
        cur.append(sp)
        used += sp.nbytes
    return out + ([cur] if cur else [])


@dataclass(frozen=True, eq=False)
class CaptureSource:
    """What a capture ran on, so a later pass (``capture_grams``) can run on the same samples."""

    model: onnx.ModelProto
    view: CalibView
    ep: str = "auto"
    budget_bytes: int = DEFAULT_BUDGET
    max_batch: int = MAX_BATCH
    seed: int = 0

    def grams(self, specs: Sequence[GramSpec], *, rows: int = GRAM_ROWS, gram_budget: int = GRAM_BUDGET,
              progress: Progress | None = None) -> GramCapture:
        return capture_grams(self.model, specs, self.view, rows=rows, ep=self.ep, budget_bytes=self.budget_bytes,
                             max_batch=self.max_batch, seed=self.seed, gram_budget=gram_budget, progress=progress)


@dataclass
class GramCapture:
    """Gram sums per spec, the passes over the view they took and the seconds."""

    grams: dict[GramSpec, GramSum]
    passes: int
    seconds: float
    rows_per_sample: int


def _gram_consume(sums: dict[GramSpec, GramSum], inputs: set[str], fetch: list[str], k: int, seed: int):
    def consume(batch: Batch, outs: list[list[np.ndarray]]) -> None:
        values = dict(zip(fetch, outs[0], strict=True))
        for sp, acc in sums.items():
            acc.update(batch.feeds[sp.tensor] if sp.tensor in inputs else values[sp.tensor], batch, k, seed)
    return consume


def capture_grams(model: onnx.ModelProto, specs: Sequence[GramSpec], view: CalibView, *, rows: int = GRAM_ROWS,
                  ep: str = "auto", budget_bytes: int = DEFAULT_BUDGET, max_batch: int = MAX_BATCH, seed: int = 0,
                  gram_budget: int = GRAM_BUDGET, progress: Progress | None = None) -> GramCapture:
    """The Gram sums of every spec over ``view``, in passes of at most ``gram_budget`` bytes
    (module docstring)."""
    t0 = time.perf_counter()
    if rows < 1:
        raise UserError(f"capture: Gram rows per sample must be >= 1, got {rows}")
    _check_taps(model, [(sp.tensor, sp.axis) for sp in specs], {})
    inputs = {i.name for i in model.graph.input}
    out: dict[GramSpec, GramSum] = {}
    passes = gram_passes(specs, gram_budget)
    for chunk in passes:
        sums = {sp: GramSum(sp) for sp in chunk}
        fetch = list(dict.fromkeys(sp.tensor for sp in chunk if sp.tensor not in inputs)) or [model.graph.output[0].name]
        sess, _ = make_session(with_outputs(model, fetch), ep, precise=True)
        run_batched([sess], view, [fetch], _gram_consume(sums, inputs, fetch, rows, seed), budget_bytes=budget_bytes,
                    max_batch=max_batch, progress=progress)
        out.update(sums)
        del sess
    log.info("Gram matrices of %d specs on %d samples in %d passes, %.2fs", len(out), view.n, len(passes),
             time.perf_counter() - t0)
    return GramCapture(out, len(passes), time.perf_counter() - t0, rows)


# ----------------------------------------------------------------------------------------------
# capture


@dataclass
class Capture:
    """The result of ``capture``: statistics per tapped tensor, row samples for the tensors asked,
    the samples per run (``batches``), the largest bytes one run held and the budget; the Gram sums
    asked for and what it ran on (``source``)."""

    stats: dict[str, ChannelStats]
    rows: dict[str, RowSample]
    samples: int
    batches: tuple[int, ...]
    peak_bytes: int
    per_sample_bytes: int
    budget_bytes: int
    grams: GramCapture | None = None  # the Gram sums asked for (``grams=``), None when none were
    source: CaptureSource | None = None  # what it ran on, for a later Gram pass


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
            max_batch: int = MAX_BATCH, seed: int = 0, progress: Progress | None = None,
            grams: Sequence[GramSpec] = (), gram_rows: int = GRAM_ROWS, gram_budget: int = GRAM_BUDGET) -> Capture:
    """Per-channel statistics of every tap ``(tensor, channel axis)`` over the samples of ``view``;
    ``rows``: {tensor: k} keeps up to k positions per sample of those tensors (``RowSample``).
    ``grams``: Gram sums of these specs too, in the same run, as many as ``gram_budget`` bytes hold
    (the first pass of ``gram_passes``; the rest are left to ``capture_grams``, from
    ``Capture.source``). Graph inputs may be tapped (read from the feeds). Memory: module docstring."""
    t0 = time.perf_counter()
    rows = dict(rows or {})
    _check_taps(model, taps, rows)
    if grams and gram_rows < 1:
        raise UserError(f"capture: Gram rows per sample must be >= 1, got {gram_rows}")
    _check_taps(model, [(sp.tensor, sp.axis) for sp in grams], {})
    passes = gram_passes(grams, gram_budget)
    first = {sp: GramSum(sp) for sp in (passes[0] if passes else [])}
    inputs = {i.name for i in model.graph.input}
    fetched = list(dict.fromkeys([n for n, _ in taps if n not in inputs] + [sp.tensor for sp in first if sp.tensor not in inputs]))
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
        grams_of(batch, outs)

    grams_of = _gram_consume(first, inputs, fetch, gram_rows, seed)
    run = run_batched([sess], view, [fetch], consume, budget_bytes=budget_bytes, max_batch=max_batch,
                      progress=progress)
    source = CaptureSource(model, view, ep, budget_bytes, max_batch, seed)
    gc = GramCapture(first, 1, time.perf_counter() - t0, gram_rows) if grams else None
    return Capture(stats, samples, view.n, tuple(run.batches), run.peak_bytes, run.per_sample, budget_bytes,
                   gc, source)
