"""Budget allocation (``--allocate latency``): how many units each group keeps, chosen to keep the most
importance under a latency budget (``--target-latency F``) or a MAC budget (``--target-macs F``), in
place of one uniform ratio. HALP's knapsack (Shen et al., NeurIPS 2022) over latency tables measured
on the deployment runtime; nothing here runs a model: the tables arrive as plain data
(``TableData``, measured by ``measure.latency_table``).

Terms.
- A *sample* of a table is one run of the model with every measured group cut to about the same
  kept share f (its count rounded to the run's ``--round-to``), or with one side of
  ``split_groups`` cut and the other whole: the time of every kernel of onnxruntime's profile and
  of the whole run.
- A kernel is *attributed* to the groups whose channel axes its node has (its inputs and outputs;
  a fused kernel, named after the tensor it writes, to the chain of nodes it fused, back to the
  convolution or matrix product that heads it). Kernels with the same set of groups are one *term*.
  A kernel no node owns (NCHWc reorders, fusions named after nothing) is spread over the terms in
  proportion to their time in that sample. The time outside kernels (the executor between them,
  and on a busy machine the waits for a core, which do not shrink with the work) is one more curve,
  of the share of kernel time left; so the model at every sample adds up to the measured whole run.
- The latency model: a term's time is a function of one equivalent share, interpolated (piecewise
  linear, made non-decreasing) between the samples. A term of one group: its share, measured along
  its own axis exactly. A term of two groups (a convolution between them: its input and output
  channels): the pair (a, b) is placed by a surface ``c0 + ca a + cb b + cab a b`` fitted (non-negative
  least squares) to all its samples, the split ones included, at the diagonal share that the surface
  gives the same time; so its MACs (in ``a b``) and its reads and writes (in ``a``, in ``b``) are
  told apart, and the approximation is that the two axes interact only through that surface. A term
  of three or more groups: the geometric mean. Groups held at full width (frozen, or not measured)
  count with share 1. Kept counts between samples are interpolated, so alignment effects at counts
  the table did not sample are not seen (sample at the run's ``--round-to``).
- *Importance* of a unit: its score by the run's criterion divided by its group's mean score
  (Torch-Pruning's mean normalizer: which units of a group matter), times the weights a unit of
  that group owns (``group_weights``: how much a unit of this group carries against one of another;
  HALP's group Taylor score sums over the group's parameters the same way). Without that factor a
  channel of MobileNetV2's thin residual stream, which feeds every block of its stage, would count
  as little as one of a block's expansion, and the allocation would cut the streams to a few
  channels. ``group-fisher`` is the exception: its Δ (the Fisher value before any division by a
  saving) is compared as it is, as GroupFisher does. The kept importance of an allocation is the
  sum over kept units, as a share of the whole.

The knapsack (``knapsack``): greedy, each step the move of one group to a lower allowed count
(looking ``LOOKAHEAD`` counts ahead, and on past them until a count saves something, so that a
plateau of the table is crossed however many counts it spans: between two samples an eighth of a
group apart, a 3072-unit group at ``--round-to 8`` has 48 counts) with the least importance
lost per unit of cost saved, the savings recomputed at the widths left (a convolution's cost falls
as either of its groups narrows); then an exchange pass: put one step of a group back and remove
elsewhere what the budget needs, kept when that keeps more importance. Allowed counts respect
``--round-to`` (multiples of it, or the group's size), ``--max-ratio`` (the most a group may lose)
and the grouped-convolution constraints (a group's units, each possibly several channels, are
what is counted). The uniform plan that meets the same predicted budget is computed too, and taken
when it keeps more (on the zoo tables measured so far it never did; it guarantees that the
allocation never keeps less than the uniform ratio at equal predicted cost). The cost model is
``costs.CostModel`` for MACs (exact: MACs are linear in each axis) and ``LatencyModel`` here for
tables; both answer ``saving_of``, ``remove``, ``restore`` and ``total``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import onnx

from onnxprune.analysis.contract import Role
from onnxprune.analysis.coupling import CouplingGraph, Group
from onnxprune.errors import UserError
from onnxprune.planning.costs import CostModel, handler_macs
from onnxprune.planning.options import ALLOCATE_CHOICES, PlanOptions  # noqa: F401 (the choices, re-exported)
from onnxprune.planning.rounding import round_keep, step_of, unit_step, unit_steps

TABLE_FORMAT = 3  # 2: grouped-conv groups sampled at unit steps of rounding.unit_step; 3: timed with the switch pause (measure.latency)
LOOKAHEAD = 8  # allowed counts a greedy move compares (further only while none of them saves anything)
EXCHANGE_SWEEPS = 3
_EPS = 1e-12
_WEIGHTED = ("Conv", "ConvTranspose", "Gemm", "MatMul", "FusedConv", "FusedGemm", "FusedMatMul", "MatMulNBits",
             "QLinearConv", "ConvInteger", "MatMulInteger")


# ----------------------------------------------------------------------------------------------
# measurements (plain data; measure.latency_table makes them)


@dataclass
class TableSample:
    """One profiled run of the model cut to about ``fraction`` of the units of every measured group
    (``part`` "all"), or of one side of ``split_groups`` only ("A", "B"; the other side at full width)."""

    fraction: float
    kept: dict[str, int]  # group anchor (``anchor_key``) -> kept units
    kernels: dict[str, float]  # profiled kernel name -> seconds
    total_s: float  # whole run (seconds), without the profiler
    part: str = "all"
    profiled_s: float | None = None  # whole run with the profiler on (for the record)

    def to_json(self) -> dict:
        return {"fraction": self.fraction, "part": self.part, "kept": self.kept, "kernels": self.kernels,
                "total_s": self.total_s, "profiled_s": self.profiled_s}

    @classmethod
    def from_json(cls, d: dict) -> TableSample:
        prof = d.get("profiled_s")
        return cls(float(d["fraction"]), {str(k): int(v) for k, v in d["kept"].items()},
                   {str(k): float(v) for k, v in d["kernels"].items()}, float(d["total_s"]), str(d.get("part", "all")),
                   float(prof) if prof is not None else None)


@dataclass
class TableData:
    """The samples of one latency table and what they were measured with (``key``: model hash,
    execution provider, threads, batch, round-to, machine facts; the cache key)."""

    key: dict
    sizes: dict[str, int]  # group anchor -> units (checks that a cached table fits the analysis)
    samples: list[TableSample]
    seconds: float = 0.0  # time it took to measure
    cached: bool = False  # read from the cache (not measured in this run)

    def to_json(self) -> dict:
        return {"format": TABLE_FORMAT, "key": self.key, "sizes": self.sizes, "seconds": self.seconds,
                "samples": [s.to_json() for s in self.samples]}

    @classmethod
    def from_json(cls, d: dict) -> TableData:
        if not isinstance(d, dict) or d.get("format") != TABLE_FORMAT:
            raise ValueError("not a latency table of this format")
        return cls(dict(d["key"]), {str(k): int(v) for k, v in d["sizes"].items()},
                   [TableSample.from_json(s) for s in d["samples"]], float(d.get("seconds", 0.0)))

    def summary(self) -> dict:
        return {"samples": len(self.samples), "fractions": [s.fraction for s in self.samples],
                "parts": [s.part for s in self.samples],
                "groups": len(self.sizes), "seconds": round(self.seconds, 2), "cache_hit": self.cached,
                "key": self.key}


def anchor_key(cg: CouplingGraph, g: Group) -> str:
    """A group's name in a table: its anchor tensor and axis (a producer weight's output axis if any)."""
    sid = next((s.space for s in g.slots if s.role == Role.PRODUCER), g.spaces[0])
    tensor, axis = cg.space_key[sid]
    return f"{tensor}:{axis}"


def table_groups(cg: CouplingGraph) -> list[Group]:
    """The groups a table measures: every prunable group (approximate ones too) that is not attention
    (heads are pruned by their own options, not allocated)."""
    return [g for g in cg.groups if g.prunable and not g.attention]


# ----------------------------------------------------------------------------------------------
# attribution: profiled kernels -> nodes -> groups


class _Resolver:
    """Kernel names of onnxruntime's profile -> the nodes of the analysed graph they ran."""

    def __init__(self, model: onnx.ModelProto):
        self.nodes = {n.name: n for n in model.graph.node if n.name}
        self.producer = {o: n for n in model.graph.node for o in n.output if o}
        self.consts = {t.name for t in model.graph.initializer} | {
            n.output[0] for n in model.graph.node if n.op_type == "Constant" and n.output}

    def __call__(self, name: str) -> list[onnx.NodeProto]:
        base = re.sub(r"_token_\d+$", "", name)  # onnxruntime's suffix for a second kernel of one name
        if base in self.nodes:
            return [self.nodes[base]]
        for tensor in (base[: -len("_nchwc")] if base.endswith("_nchwc") else None, base):
            if tensor in self.producer:  # a fused kernel named after the tensor it writes
                return self._chain(self.producer[tensor])
        parts = base.rstrip("/").split("/")  # "<node>/QuickGeluFusion/": a fusion named after its first node
        for i in range(len(parts) - 1, 0, -1):
            head = "/".join(parts[:i])
            if head in self.nodes:
                return [self.nodes[head]]
        return []

    def _chain(self, node: onnx.NodeProto) -> list[onnx.NodeProto]:
        """The nodes a kernel named after ``node``'s output fused: back through its data inputs to the
        convolution or matrix product that heads the chain (a few nodes at most)."""
        chain = [node]
        cur = node
        for _ in range(6):
            if cur.op_type in _WEIGHTED:
                return chain
            ins = [self.producer[t] for t in cur.input if t and t not in self.consts and t in self.producer]
            if not ins:
                break
            cur = next((p for p in ins if p.op_type in _WEIGHTED), ins[0])
            chain.append(cur)
        return chain if any(n.op_type in _WEIGHTED for n in chain) else [node]


def split_groups(cg: CouplingGraph, groups: list[Group]) -> tuple[list[int], list[int]]:
    """Two sides of ``groups`` such that most convolutions and matrix products between two of them
    have their input on one side and their output on the other (a 2-colouring, breadth first, of the
    graph whose edges are those nodes): a table cuts each side alone once, so that a node of two
    groups is also measured with one of them cut and the other whole."""
    gid_of_space = {sid: g.id for g in groups for sid in g.spaces}
    edges: dict[int, set[int]] = {g.id: set() for g in groups}
    for n in cg.model.graph.node:
        if n.op_type in _WEIGHTED:
            mine = sorted(_node_groups(cg, n, gid_of_space))
            if len(mine) == 2:
                edges[mine[0]].add(mine[1])
                edges[mine[1]].add(mine[0])
    side: dict[int, int] = {}
    for g in groups:
        if g.id in side:
            continue
        side[g.id] = 0
        queue = [g.id]
        while queue:
            cur = queue.pop(0)
            for nb in sorted(edges[cur]):
                if nb not in side:
                    side[nb] = 1 - side[cur]
                    queue.append(nb)
    return [g for g, v in side.items() if v == 0], [g for g, v in side.items() if v == 1]


def _node_groups(cg: CouplingGraph, node: onnx.NodeProto, gid_of_space: dict[int, int]) -> set[int]:
    out: set[int] = set()
    for t in list(node.input) + list(node.output):
        if not t or t in cg.consts:
            continue
        shape = cg.shapes.get(t)
        for ax in range(len(shape or ())):
            sid = cg.space_ids.get((t, ax))
            if sid is not None and sid in gid_of_space:
                out.add(gid_of_space[sid])
    return out


def _isotonic(y: np.ndarray) -> np.ndarray:
    """Non-decreasing least-squares fit (pool adjacent violators)."""
    vals: list[float] = []
    wts: list[int] = []
    for v in y:
        vals.append(float(v))
        wts.append(1)
        while len(vals) > 1 and vals[-2] > vals[-1]:
            w = wts[-2] + wts[-1]
            vals[-2] = (vals[-2] * wts[-2] + vals[-1] * wts[-1]) / w
            wts[-2] = w
            vals.pop()
            wts.pop()
    return np.repeat(vals, wts)


@dataclass
class _Curve:
    """A term's time as a function of one *equivalent share* x (interpolated between the samples,
    non-decreasing). A term of two groups places a pair of shares (a, b) by its fitted surface
    ``F(a, b) = c0 + ca a + cb b + cab a b`` (non-negative least squares over every sample, those that
    cut one group and not the other included): x is the share with ``F(x, x) = F(a, b)``. Without a
    surface (one group: x = a; three or more, or nothing fitted: the geometric mean)."""

    groups: tuple[int, ...]
    xs: np.ndarray  # the samples' equivalent shares, ascending
    ys: np.ndarray  # seconds (residual spread in), non-decreasing
    surface: tuple[float, float, float, float] | None = None  # c0, ca, cb, cab

    def at(self, x: float) -> float:
        return float(np.interp(x, self.xs, self.ys))

    def equivalent(self, shares) -> float:
        k = len(shares)
        if k == 1:
            return float(shares[0])
        if self.surface is None or k != 2:
            return float(math.prod(shares)) ** (1.0 / k)
        c0, ca, cb, cab = self.surface
        a, b = shares
        want = ca * a + cb * b + cab * a * b  # F(x, x) - c0 = (ca + cb) x + cab x^2
        lin = ca + cb
        if cab > 0:
            return (-lin + math.sqrt(lin * lin + 4 * cab * want)) / (2 * cab)
        return want / lin if lin > 0 else math.sqrt(a * b)


def _nnls(a: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Non-negative least squares for a few columns: the best of the least-squares fits on every subset
    of the columns whose coefficients are all >= 0."""
    n = a.shape[1]
    best, best_err = np.zeros(n), float(np.sum(y**2))
    for mask in range(1, 2**n):
        cols = [j for j in range(n) if mask >> j & 1]
        c, *_ = np.linalg.lstsq(a[:, cols], y, rcond=None)
        if np.all(c >= 0):
            err = float(np.sum((a[:, cols] @ c - y) ** 2))
            if err < best_err:
                best, best_err = np.zeros(n), err
                best[cols] = c
    return best


OFF_DIAGONAL = 1.3  # a sample whose two shares differ by more than this factor tells ca from cb


def _surface(sh: np.ndarray, ys: np.ndarray) -> tuple[float, float, float, float] | None:
    """``_Curve``'s surface of a two-group term from its samples (rows of ``sh``: the two shares)."""
    a, b = sh[:, 0], sh[:, 1]
    if len(ys) < 3 or not np.any(ys > 0):
        return None
    ratio = np.maximum(a, b) / np.maximum(np.minimum(a, b), 1e-9)
    one = np.ones_like(a)
    if np.any(ratio > OFF_DIAGONAL):
        c0, ca, cb, cab = _nnls(np.stack([one, a, b, a * b], axis=1), ys)
    else:  # only the diagonal: the two linear parts taken alike
        c0, c1, cab = _nnls(np.stack([one, (a + b) / 2, a * b], axis=1), ys)
        ca = cb = c1 / 2
    if ca + cb + cab <= 0:
        return None
    return float(c0), float(ca), float(cb), float(cab)


def _curve(key: tuple[int, ...], sh: np.ndarray, ys: np.ndarray) -> _Curve:
    """A term's curve from its groups' shares (one row a sample) and times."""
    c = _Curve(key, np.zeros(0), np.zeros(0), _surface(sh, ys) if len(key) == 2 else None)
    x = np.array([c.equivalent(row) for row in sh])
    order = np.argsort(x, kind="stable")
    c.xs, c.ys = x[order], _isotonic(ys[order])
    return c


class LatencyModel:
    """Predicted latency of the model at any kept counts, from a table (module docstring). As a cost
    of the knapsack it holds the current counts of ``groups`` (``remove``/``restore`` change them)."""

    def __init__(self, cg: CouplingGraph, data: TableData):
        self.cg = cg
        by_anchor = {anchor_key(cg, g): g for g in cg.groups}
        self.measured: dict[int, Group] = {}
        for a, n in data.sizes.items():
            g = by_anchor.get(a)
            if g is not None and g.size == n:
                self.measured[g.id] = g
        self.missing = [a for a in data.sizes if a not in by_anchor or by_anchor[a].size != data.sizes[a]]
        gid_of_space = {sid: gid for gid, g in self.measured.items() for sid in g.spaces}
        resolve = _Resolver(cg.model)
        cache: dict[str, tuple[int, ...] | None] = {}
        per: dict[tuple[int, ...], np.ndarray] = {}
        m = len(data.samples)
        shares = np.ones((m, max(self.measured, default=-1) + 1))
        for i, s in enumerate(data.samples):
            for a, k in s.kept.items():
                g = by_anchor.get(a)
                if g is not None and g.id in self.measured:
                    shares[i, g.id] = k / g.size
        attributed, unowned = np.zeros(m), np.zeros(m)
        for i, s in enumerate(data.samples):
            for name, sec in s.kernels.items():
                if name not in cache:
                    nodes = resolve(name)
                    cache[name] = tuple(sorted(set().union(*(_node_groups(cg, n, gid_of_space) for n in nodes)))) \
                        if nodes else None
                key = cache[name]
                if key is None:
                    unowned[i] += sec  # no node owns it: spread over the terms (below)
                    continue
                per.setdefault(key, np.zeros(m))[i] += sec
                attributed[i] += sec
        own = attributed + unowned
        totals = np.array([s.total_s for s in data.samples])
        # unowned kernels spread over the terms; where the kernels add up to more than the whole run
        # (the profiler lengthens them a little), scaled down to it
        scale = np.where(attributed > 0, own / np.maximum(attributed, 1e-30), 1.0) * np.where(
            own > totals, totals / np.maximum(own, 1e-30), 1.0)
        self.fixed = float(np.median(per.pop((), np.zeros(m)) * scale)) if m else 0.0
        self.curves: list[_Curve] = []
        for key, ys in per.items():
            self.curves.append(_curve(key, shares[:, list(key)], ys * scale))
        self.unresolved = sorted(n for n, k in cache.items() if k is None)
        self.count = {gid: g.size for gid, g in self.measured.items()}
        self.terms_of: dict[int, list[int]] = {gid: [] for gid in self.measured}
        for k, c in enumerate(self.curves):
            for gid in c.groups:
                self.terms_of[gid].append(k)
        self._value = [self._term(c, self.count) for c in self.curves]
        self._kernels = self.fixed + float(sum(self._value))  # the kernel time now (the state's)
        # the time outside kernels (the executor between them; waiting for the CPU on a busy machine),
        # as a function of the share of kernel time left, between the samples
        kern = np.array([self.fixed + sum(self._term(c, self._sample_counts(s, by_anchor)) for c in self.curves)
                         for s in data.samples])
        self.kernels_full = self._kernels
        rho = kern / self.kernels_full if self.kernels_full > 0 else np.ones(m)
        rest = np.maximum(0.0, totals - own)
        order = np.argsort(rho, kind="stable")
        self.rest_xs, self.rest_ys = rho[order], _isotonic(rest[order]) if m else np.zeros(0)

    def _sample_counts(self, s: TableSample, by_anchor: dict[str, Group]) -> dict[int, int]:
        return {by_anchor[a].id: k for a, k in s.kept.items() if a in by_anchor and by_anchor[a].id in self.measured}

    def rest(self, kernels: float) -> float:
        """Time outside kernels when ``kernels`` seconds of kernel time are left."""
        if not len(self.rest_xs) or self.kernels_full <= 0:
            return 0.0
        return float(np.interp(kernels / self.kernels_full, self.rest_xs, self.rest_ys))

    # -- prediction ----------------------------------------------------------------------------
    def _share(self, gid: int, counts: dict[int, int]) -> float:
        g = self.measured[gid]
        return counts.get(gid, g.size) / g.size

    def _term(self, c: _Curve, counts: dict[int, int]) -> float:
        return c.at(c.equivalent([self._share(gid, counts) for gid in c.groups]))

    def predict(self, counts: dict[int, int] | None = None) -> float:
        """Seconds at ``counts`` (group id -> kept units; every other group at full width)."""
        counts = counts or {}
        kernels = self.fixed + sum(self._term(c, counts) for c in self.curves)
        return kernels + self.rest(kernels)

    def full(self) -> float:
        return self.predict({})

    def curve(self, gid: int, counts: list[int] | None = None) -> tuple[list[int], list[float]]:
        """The latency of the nodes ``gid`` touches as a function of its kept count, every other group at
        full width (``counts``: the counts to evaluate; default its size in eighths)."""
        g = self.measured[gid]
        counts = counts or sorted({max(1, round(g.size * f / 8)) for f in range(1, 9)})
        return counts, [sum(self._term(self.curves[k], {gid: n}) for k in self.terms_of[gid]) for n in counts]

    # -- the knapsack's cost interface ---------------------------------------------------------
    def total(self) -> float:
        return self._kernels + self.rest(self._kernels)

    def saving_of(self, gid: int, units: np.ndarray) -> float:
        """What the move saves now; its share of the time outside kernels at the current kernel time
        (the other groups' cached savings are not recomputed for it: a small staleness)."""
        if gid not in self.count:
            return 0.0
        old = self.count[gid]
        self.count[gid] = old - len(units)
        try:
            dk = float(sum(self._value[k] - self._term(self.curves[k], self.count) for k in self.terms_of[gid]))
        finally:
            self.count[gid] = old
        return dk + self.rest(self._kernels) - self.rest(self._kernels - dk)

    def _set(self, gid: int, n: int) -> set[int]:
        if gid not in self.count:
            return {gid}
        self.count[gid] = n
        changed = {gid}
        for k in self.terms_of[gid]:
            v = self._term(self.curves[k], self.count)
            self._kernels += v - self._value[k]
            self._value[k] = v
            changed.update(self.curves[k].groups)
        return changed

    def remove(self, gid: int, units: np.ndarray) -> set[int]:
        return self._set(gid, self.count.get(gid, 0) - len(units))

    def restore(self, gid: int, units: np.ndarray) -> set[int]:
        return self._set(gid, self.count.get(gid, 0) + len(units))

    def summary(self, top: int = 8) -> dict:
        gains = []
        for gid, g in self.measured.items():
            _, ys = self.curve(gid, [g.size, max(1, g.size // 2)])
            gains.append((ys[0] - ys[1], gid))
        gains.sort(reverse=True)
        return {"terms": len(self.curves), "fixed_s": self.fixed, "full_s": self.full(),
                "outside_kernels_full_s": self.rest(self.kernels_full),
                "unresolved_kernels": len(self.unresolved), "groups_measured": len(self.measured),
                "groups_missing": len(self.missing),
                "largest_half_width_savings": [{"group": gid, "producers": self.measured[gid].producers[:2],
                                                "saved_ms": round(s * 1e3, 4)} for s, gid in gains[:top]]}


# ----------------------------------------------------------------------------------------------
# the knapsack


class StepCost(Protocol):
    """What the knapsack reads: ``costs.CostModel`` (MACs) or ``LatencyModel`` (a table)."""

    def total(self) -> float: ...
    def saving_of(self, gid: int, units: np.ndarray) -> float: ...
    def remove(self, gid: int, units: np.ndarray) -> set[int]: ...
    def restore(self, gid: int, units: np.ndarray) -> set[int]: ...


def allowed_counts(size: int, max_ratio: float, round_to: int) -> list[int]:
    """Kept counts a group of ``size`` units may end at, descending from ``size``: multiples of
    ``round_to`` units (the group's ``rounding.unit_step``; when the group has that many units, else
    any count) losing at most
    ``floor(size x max_ratio)`` units (and never all)."""
    lowest = size - min(size - 1, int(math.floor(size * max_ratio)))
    if round_to > 1 and size >= round_to:
        first = int(math.ceil(lowest / round_to)) * round_to
        return [size] + [k for k in range(first, size, round_to)][::-1]
    return list(range(size, lowest - 1, -1))


class _State:
    """Kept counts of the movable groups over a cost; moves by count, logged for undo."""

    def __init__(self, cost: StepCost, values: dict[int, np.ndarray], orders: dict[int, np.ndarray],
                 allowed: dict[int, list[int]], lookahead: int):
        self.cost, self.allowed, self.lookahead = cost, allowed, lookahead
        self.orders = orders
        self.size = {gid: len(v) for gid, v in values.items()}
        self.cum = {gid: np.concatenate([[0.0], np.cumsum(np.asarray(values[gid], dtype=np.float64)[orders[gid]])])
                    for gid in values}
        self.pos = {gid: 0 for gid in allowed}
        self.count = {gid: self.size[gid] for gid in values}
        self.best: dict[int, tuple[float, int, float]] = {}
        self.log: list[tuple[int, int]] = []

    def lost(self, gid: int, k_from: int, k_to: int) -> float:
        n = self.size[gid]
        return float(self.cum[gid][n - k_to] - self.cum[gid][n - k_from])

    def kept_value(self) -> float:
        return float(sum(self.cum[g][-1] - self.cum[g][self.size[g] - self.count[g]] for g in self.count))

    def set_count(self, gid: int, k: int, log: bool = True) -> set[int]:
        cur, n = self.count[gid], self.size[gid]
        if k == cur:
            return set()
        if log:
            self.log.append((gid, cur))
        order = self.orders[gid]
        changed = (self.cost.remove(gid, order[n - cur:n - k]) if k < cur
                   else self.cost.restore(gid, order[n - k:n - cur]))
        self.count[gid] = k
        if gid in self.allowed:
            al = self.allowed[gid]
            self.pos[gid] = al.index(k) if k in al else next((i for i, a in enumerate(al) if a < k), len(al)) - 1
        return changed

    def undo(self, mark: int) -> set[int]:
        changed: set[int] = set()
        while len(self.log) > mark:
            gid, k = self.log.pop()
            changed |= self.set_count(gid, k, log=False)
        return changed

    def rescore(self, gids) -> None:
        """The best move of each of ``gids``: (importance lost per cost saved, the count, the saving)."""
        for gid in gids:
            if gid not in self.allowed:
                continue
            best = (math.inf, -1, 0.0)
            al, p, n = self.allowed[gid], self.pos[gid], self.size[gid]
            cur = self.count[gid]
            j = p
            while j + 1 < len(al) and (j < p + self.lookahead or not math.isfinite(best[0])):
                j += 1  # past the lookahead only while nothing saved yet: a plateau wider than it is crossed
                saving = self.cost.saving_of(gid, self.orders[gid][n - cur:n - al[j]])
                if saving <= _EPS:
                    continue
                r = self.lost(gid, cur, al[j]) / saving
                if r < best[0] - _EPS:
                    best = (r, al[j], saving)
            self.best[gid] = best

    def greedy(self, budget: float, exclude: int | None = None) -> bool:
        """Moves (none of ``exclude``) until the cost is within ``budget``; False when no move helps
        any more. The best move of every group is kept current (``rescore`` after each change)."""
        ok = True
        while self.cost.total() > budget * (1 + 1e-12):
            gid = min((g for g in self.best if g != exclude), key=lambda g: (self.best[g][0], -self.best[g][2], g),
                      default=None)
            if gid is None or not math.isfinite(self.best[gid][0]):
                ok = False
                break
            self.rescore(self.set_count(gid, self.best[gid][1]))
        return ok


@dataclass
class KnapsackResult:
    counts: dict[int, int]
    reached: bool  # the cost is within the budget
    cost: float
    kept_value: float
    exchanges: int = 0


def knapsack(cost: StepCost, values: dict[int, np.ndarray], allowed: dict[int, list[int]], budget: float, *,
             orders: dict[int, np.ndarray] | None = None, fixed: dict[int, int] | None = None,
             lookahead: int = LOOKAHEAD, exchange: bool = True) -> KnapsackResult:
    """Kept counts for the groups of ``allowed`` (their allowed counts, descending from the start)
    keeping the most of ``values`` (per unit) with ``cost.total() <= budget`` (module docstring).
    ``fixed``: groups set to a count first and never moved; ``orders``: units in the order they go
    (default: ascending value)."""
    orders = orders or {gid: np.argsort(np.asarray(v), kind="stable") for gid, v in values.items()}
    st = _State(cost, values, orders, allowed, lookahead)
    for gid, k in (fixed or {}).items():
        st.set_count(gid, k)
    st.rescore(list(allowed))
    reached = st.greedy(budget)
    done = 0
    if reached and exchange:
        for _ in range(EXCHANGE_SWEEPS):
            improved = False
            for gid in [g for g in allowed if st.pos[g] > 0]:
                if st.pos[gid] == 0:
                    continue
                mark, before = len(st.log), st.kept_value()
                st.rescore(st.set_count(gid, allowed[gid][st.pos[gid] - 1]))
                ok = cost.total() <= budget * (1 + 1e-12) or st.greedy(budget, exclude=gid)
                if ok and st.kept_value() > before * (1 + 1e-9) + _EPS:
                    improved, done = True, done + 1
                else:
                    st.rescore(st.undo(mark))
            if not improved:
                break
    out = KnapsackResult(dict(st.count), cost.total() <= budget * (1 + 1e-9), cost.total(), st.kept_value(), done)
    st.undo(0)  # the cost as it came: every group at full width
    return out


# ----------------------------------------------------------------------------------------------
# the allocation of a plan


def group_weights(cg: CouplingGraph, g: Group) -> float:
    """Weights a unit of ``g`` owns on average: the elements of the group's weight constants (each
    once) per unit; at least 1."""
    seen, total = set(), 0
    for s in g.slots:
        if s.const in seen:
            continue
        seen.add(s.const)
        shape = cg.consts.shape(s.const)
        total += int(np.prod(shape, dtype=np.int64)) if shape else 0
    return max(1.0, total / max(1, g.size))


def allocation_values(cg: CouplingGraph, opts: PlanOptions, scores: dict[int, np.ndarray],
                      gradients=None) -> dict[int, np.ndarray]:
    """Per unit importance, comparable across groups (module docstring): the unit's score over its
    group's mean times the weights a unit of the group owns (``group_weights``); group-fisher's Δ as is."""
    deltas = getattr(gradients, "deltas", None) or {}
    out = {}
    for gid, s in scores.items():
        if opts.importance == "group-fisher" and gid in deltas:
            out[gid] = np.asarray(deltas[gid], dtype=np.float64)
            continue
        s = np.asarray(s, dtype=np.float64)
        if s.size and s.min() < 0:
            s = s - s.min()
        mean = float(s.mean()) if s.size else 0.0
        out[gid] = (s / mean if mean > 0 else np.ones_like(s)) * group_weights(cg, cg.groups[gid])
    return out


def uniform_counts(groups: list[Group], ratio: float, steps: int | Mapping[int, int]) -> dict[int, int]:
    """The counts the uniform plan at ``ratio`` keeps (``planning.plan.make_plan``); ``steps``: the
    rounding step of every group, or per group id (``rounding.unit_steps``)."""
    return {g.id: round_keep(g.size, g.size - int(math.floor(g.size * ratio)), step_of(steps, g.id)) for g in groups}


@dataclass
class Allocation:
    """Kept counts per group (``counts``: the movable and the fixed ones) and what they cost."""

    kind: str  # latency | macs
    target: float  # the budget as a share of the original (predicted)
    counts: dict[int, int]
    predicted: float  # predicted share of the original's cost
    kept_importance: float  # share of the movable groups' importance kept
    reached: bool
    uniform: dict = field(default_factory=dict)  # the uniform plan meeting the same predicted budget
    chose: str = "knapsack"  # or "uniform" (it kept more)
    exchanges: int = 0
    fixed: list[int] = field(default_factory=list)
    uniform_counts: dict[int, int] = field(default_factory=dict)  # the uniform plan's counts (not in the JSON)
    checked: list[dict] = field(default_factory=list)  # candidates measured on data (measure.allocation)
    exchange: dict = field(default_factory=dict)  # the measured exchange after the check (measure.exchange)

    def to_json(self) -> dict:
        return {"kind": self.kind, "budget": self.target, "predicted": self.predicted,
                "kept_importance": self.kept_importance, "reached": self.reached, "uniform": self.uniform,
                "chose": self.chose, "exchanges": self.exchanges, "fixed_groups": len(self.fixed),
                "groups": len(self.counts), **({"checked": self.checked} if self.checked else {}),
                **({"exchange": self.exchange} if self.exchange else {})}


def _fixed_groups(cg: CouplingGraph, opts: PlanOptions, candidates: list[tuple[Group, float]]) -> dict[int, int]:
    """Groups the allocation leaves at their own ratio: attention (head options) and --layer-ratio ones."""
    layer = [re.compile(r) for r, _ in opts.layer_ratios]
    out = {}
    for g, ratio in candidates:
        if g.attention or any(p.search(x) for p in layer for x in g.producers):
            out[g.id] = round_keep(g.size, g.size - int(math.floor(g.size * ratio)),
                                   unit_step(cg, g, opts.round_to))
    return out


def make_cost(cg: CouplingGraph, kind: str, groups: list[Group], table: TableData | None = None,
              macs_of: Callable[[onnx.NodeProto], float] | None = None) -> tuple[StepCost, float, float]:
    """(cost over ``groups``, its total at full width, what the rest of the model costs: the budget of
    a share F is ``F x (full + rest) - rest``)."""
    if kind == "latency":
        if table is None:
            raise UserError("--allocate latency with --target-latency needs a latency table (measure.latency_table)")
        model = LatencyModel(cg, table)
        return model, model.total(), 0.0
    if kind != "macs":
        raise UserError(f"unknown allocation budget '{kind}' (latency or macs)")
    macs_of = macs_of or handler_macs(cg)
    model = CostModel(cg, groups, "flops", macs_of)
    whole = float(sum(macs_of(n) for n in cg.model.graph.node))
    return model, model.total(), whole - model.total()


@dataclass
class AllocationSpace:
    """What an allocation chooses among: the movable groups with their allowed counts (descending
    from the size), the fixed ones with their counts, and every candidate's rounding step."""

    movable: list[Group]
    fixed: dict[int, int]
    allowed: dict[int, list[int]]
    steps: dict[int, int]


def allocation_space(cg: CouplingGraph, opts: PlanOptions, candidates: list[tuple[Group, float]]) -> AllocationSpace:
    fixed = _fixed_groups(cg, opts, candidates)
    groups = [g for g, _ in candidates]
    movable = [g for g in groups if g.id not in fixed]
    steps = unit_steps(cg, groups, opts.round_to)
    return AllocationSpace(movable, fixed, {g.id: allowed_counts(g.size, opts.max_ratio, steps[g.id]) for g in movable},
                           steps)


def removal_order(score: np.ndarray) -> np.ndarray:
    """The order in which a plan removes a group's units at falling counts (``plan.select_units``'
    top-k, ordinary groups: the lowest score first)."""
    return np.argsort(-np.asarray(score), kind="stable")[::-1]


def allocate(cg: CouplingGraph, opts: PlanOptions, candidates: list[tuple[Group, float]], scores: dict[int, np.ndarray],
             kind: str, target: float, *, table: TableData | None = None, gradients=None,
             macs_of: Callable[[onnx.NodeProto], float] | None = None, exchange: bool = True,
             values: Mapping[int, np.ndarray] | None = None) -> Allocation:
    """Kept counts for ``candidates`` (``plan.plan_candidates``; ``scores``: ``plan.candidate_scores``)
    keeping the most importance with the predicted ``kind`` cost (latency from ``table``, or MACs)
    at most ``target`` x the original's. ``values``: per-unit values of some groups in place of
    ``allocation_values`` (measured damage, ``measure.sensitivity``), summed in ``removal_order``."""
    if not 0.0 < target:
        raise UserError(f"the allocation budget must be > 0, got {target:g}")
    groups = [g for g, _ in candidates]
    space = allocation_space(cg, opts, candidates)
    fixed, movable, steps, allowed = space.fixed, space.movable, space.steps, space.allowed
    cost, full, rest = make_cost(cg, kind, groups, table, macs_of)
    budget = target * (full + rest) - rest
    values, orders = value_model(cg, opts, groups, scores, gradients, values)
    res = knapsack(cost, values, allowed, budget, orders=orders, fixed=fixed, exchange=exchange)
    ids = [g.id for g in movable]
    denom = _kept_value(values, {}, ids) or 1.0
    out = Allocation(kind, target, res.counts, (res.cost + rest) / (full + rest),
                     _kept_value(values, res.counts, ids, orders) / denom if movable else 1.0, res.reached,
                     exchanges=res.exchanges, fixed=sorted(fixed))
    uni = uniform_at(cost, values, movable, fixed, budget, opts, steps, orders)
    if uni is not None:
        u_counts, u_ratio, u_cost = uni
        u_kept = _kept_value(values, u_counts, ids, orders) / denom
        out.uniform = {"ratio": u_ratio, "predicted": (u_cost + rest) / (full + rest), "kept_importance": u_kept}
        out.uniform_counts = dict(u_counts)
        if u_kept > out.kept_importance + 1e-12 or not res.reached:
            out.counts, out.predicted, out.kept_importance = u_counts, out.uniform["predicted"], u_kept
            out.reached, out.chose = True, "uniform"
    return out


def value_model(cg: CouplingGraph, opts: PlanOptions, groups: list[Group], scores: Mapping[int, np.ndarray],
                gradients=None, values: Mapping[int, np.ndarray] | None = None
                ) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray]]:
    """(per-unit values, removal orders) of ``groups``: ``allocation_values``, those of ``values`` in
    their place (summed in the plan's ``removal_order``; the others' units go least valuable first)."""
    given = dict(values or {})
    out = allocation_values(cg, opts, {g.id: scores[g.id] for g in groups}, gradients)
    out.update(given)
    orders = {gid: (removal_order(scores[gid]) if gid in given else np.argsort(np.asarray(v), kind="stable"))
              for gid, v in out.items()}
    return out, orders


def kept_importance(cg: CouplingGraph, opts: PlanOptions, candidates: list[tuple[Group, float]],
                    scores: Mapping[int, np.ndarray], counts: Mapping[int, int], gradients=None,
                    values: Mapping[int, np.ndarray] | None = None) -> float:
    """The share of the movable groups' value (``value_model``) that ``counts`` keeps, as ``allocate``
    reports it."""
    space = allocation_space(cg, opts, candidates)
    vals, orders = value_model(cg, opts, [g for g, _ in candidates], scores, gradients, values)
    ids = [g.id for g in space.movable]
    if not ids:
        return 1.0
    return _kept_value(vals, dict(counts), ids, orders) / (_kept_value(vals, {}, ids) or 1.0)


def _kept_value(values: dict[int, np.ndarray], counts: dict[int, int], gids: list[int],
                orders: Mapping[int, np.ndarray] | None = None) -> float:
    """The value kept in ``gids`` at ``counts`` (absent: full): the units left when they go in
    ``orders`` (default: the least valuable first)."""
    out = 0.0
    for gid in gids:
        v = np.asarray(values[gid], dtype=np.float64)
        v = v[orders[gid]] if orders is not None and gid in orders else np.sort(v)
        out += float(v[len(v) - counts.get(gid, len(v)):].sum())
    return out


def uniform_at(cost: StepCost, values: dict[int, np.ndarray], movable: list[Group], fixed: dict[int, int],
               budget: float, opts: PlanOptions,
               steps: int | Mapping[int, int] | None = None,
               orders: Mapping[int, np.ndarray] | None = None) -> tuple[dict[int, int], float, float] | None:
    """The uniform plan (every movable group at one ratio, ``make_plan``'s counts) with the smallest
    ratio meeting ``budget`` on ``cost`` (bisection): (counts, ratio, cost); None when even
    ``opts.max_ratio`` does not meet it. ``cost`` is left as it came (every group at full width).
    ``orders``: the units' removal order (default: the least valuable first)."""
    orders = dict(orders) if orders is not None else {
        gid: np.argsort(np.asarray(v), kind="stable") for gid, v in values.items()}
    st = _State(cost, values, orders, {}, 0)
    for gid, k in fixed.items():
        st.set_count(gid, k)

    def meets(r: float) -> bool:
        for gid, k in uniform_counts(movable, r, opts.round_to if steps is None else steps).items():
            st.set_count(gid, k)
        return cost.total() <= budget * (1 + 1e-9)

    try:
        if not meets(opts.max_ratio):
            return None
        lo, hi = 0.0, opts.max_ratio
        if meets(0.0):
            hi = 0.0
        while hi - lo > 1e-5:
            mid = (lo + hi) / 2
            if meets(mid):
                hi = mid
            else:
                lo = mid
        meets(hi)
        counts = {gid: st.count[gid] for gid in list(fixed) + [g.id for g in movable]}
        return counts, hi, cost.total()
    finally:
        st.undo(0)


class Predictor:
    """The predicted share of the original's cost (latency from ``table``, or MACs) at any kept counts
    of ``candidates``' groups (absent: full width), on the allocation's own cost model; nothing is run.
    The measured exchange (``measure.exchange``) prices its moves with it."""

    def __init__(self, cg: CouplingGraph, kind: str, candidates: list[tuple[Group, float]],
                 scores: Mapping[int, np.ndarray], table: TableData | None = None,
                 macs_of: Callable[[onnx.NodeProto], float] | None = None):
        groups = [g for g, _ in candidates]
        self.cost, self.full, self.rest = make_cost(cg, kind, groups, table, macs_of)
        orders = {g.id: removal_order(scores[g.id]) for g in groups}
        self._st = _State(self.cost, {gid: np.zeros(len(o)) for gid, o in orders.items()}, orders, {}, 0)

    def __call__(self, counts: Mapping[int, int]) -> float:
        st = self._st
        for gid in st.count:
            st.set_count(gid, int(counts.get(gid, st.size[gid])), log=False)
        return (self.cost.total() + self.rest) / (self.full + self.rest)
