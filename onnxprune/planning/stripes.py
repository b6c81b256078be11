"""Stripe importance and selection (issue 12, Pruning Filter in Filter, Meng et al. 2020).

A K×K' filter ``W[f]`` of a 2-D Conv is read as K·K' *stripes* ``W[f, :, i, j]``: 1×1 filters over the
filter's input channels (all C of them for ``group=1``, its C/g channels in a grouped conv, whose
weight is ``[F, C/g, K, K']`` so a stripe is indexed the same way). Stripe pruning removes stripes
instead of whole filters; every filter keeps a dense "skeleton".

Terms. A *keep-mask* is a bool array ``[F, K, K']`` per conv (``True`` keeps the stripe). A *box* is
an axis-aligned sub-rectangle of the kernel, ``(i0, i1, j0, j1)`` half-open (rows ``i0..i1-1``,
columns ``j0..j1-1``); its *area* is its stripe count. A plan's *shape* says what the masks may be:
``"free"`` (any set of stripes per filter, the paper's selection) or ``"box"`` (every filter keeps
exactly one box, so the physical rewrite, which shrinks each filter to the bounding box of its kept
stripes, removes every stripe the plan removes). A plan's *scope* says how the removed counts were
decided: ``"conv"`` (the ratio per conv) or ``"global"`` (one ranking over every conv).

Built here (library level, no CLI):

- :func:`stripe_convs`: the 2-D Convs of a loaded ``onnx.ModelProto`` whose weight is a constant
  (an initializer, or a ``Constant`` node's ``value``) with K·K' > 1, found directly in the main
  graph; every other Conv is listed with the reason it is skipped (weight not constant, an
  overridable initializer, shared with another reader, 1×1, not 2-D, not float);
- importance: :func:`stripe_importance`, the L1 (or L2) norm of every stripe, an array ``[F, K, K']``;
  :func:`activation_stripe_importance`, the stripe's expected output energy on calibration data
  (below), from per-channel second moments captured at the taps :func:`stripe_taps` lists;
- free selection, :func:`select_stripes` / :func:`select_keep` / :func:`select_keep_count`: per conv
  the lowest scores removed first (ties by position, row-major ``(f, i, j)``), never the best stripe
  of a filter (so no filter is ever emptied: at most ``F·K·K' − F`` stripes go);
- box selection, :func:`select_boxes` / :func:`select_box_keep` (algorithm below);
- the global ratio, :func:`global_removed_counts` (below), for both selections;
- :class:`StripePlan`: per conv node a bool keep-mask ``[F, K, K']``, its shape and how it was
  selected, saved and loaded as JSON;
- :func:`stripe_macs`: the MACs a plan keeps per conv, counted by kept stripes.

Box selection (one conv). With ``n`` = :func:`removed_count` stripes to remove, the kept area may be
at most ``A = F·K·K' − n``. Every filter ``f`` is assigned one box ``b`` of a box set ``S`` with
``|S| ≤ max_boxes``; its gain ``G[f, b]`` is the sum of its stripe scores inside ``b``. The plan
maximizes ``Σ_f G[f, b_f]`` subject to ``Σ_f area(b_f) ≤ A`` (so at least ``n`` stripes go); among
(near-)equal gains (within ``1e-9`` of the conv's total score) the larger kept area wins (fewer
stripes removed beyond ``n``), then the first set in enumeration order (boxes ordered by area,
largest first, then ``(i0, j0, i1, j1)``; sets by their boxes' indices), then, inside a set, the
lower filter index: every tie is decided by position, never by chance. A 1×1 box fits any budget
(``A ≥ F``), so a solution always exists and no box is ever empty. The box areas available may
force more than ``n`` stripes out (``StripePlan.removed`` says how many went).

- ``|S| = 1``: box ``b`` is feasible iff ``F·area(b) ≤ A``; gain ``Σ_f G[f, b]``.
- ``|S| = 2``, ``S = {p, q}`` with ``area(p) ≥ area(q)``, feasible iff ``F·area(q) ≤ A``: at most
  ``m = ⌊(A − F·area(q)) / (area(p) − area(q))⌋`` filters (all, for equal areas) can take ``p``;
  the gain is ``Σ_f G[f, q]`` plus the ``m`` largest non-negative ``G[f, p] − G[f, q]``: a sort by
  gain, exact. Every single box and every pair of candidate boxes is evaluated (vectorized), so
  for ``max_boxes ≤ 2`` the result is the optimum over the candidates (all boxes, unless the kernel
  has more than ``max_candidates`` boxes, below).
- ``|S| ≥ 3`` (``max_boxes ≥ 3``): a multiple-choice knapsack per set. A set is solved exactly by
  dynamic programming over the kept area when ``F · (A + 1) · |S| ≤ EXACT_WORK``, else by a
  Lagrangian bisection (every filter takes ``argmax_b G[f, b] − λ·area(b)``; the smallest feasible
  λ, then the filters tied at the breakpoint upgraded while they fit: within one filter's gain of
  the set's LP bound); then a greedy local search (the best single-filter move that improves the
  gain and fits, until none), started both from that solution and from the parent set's. The sets
  are searched by a beam: the ``BEAM`` best sets of each size, starting from the exact singles and
  pairs, each extended by one box of a pool (every candidate up to ``POOL`` of them, else the boxes
  of the ``POOL`` best pairs). Not exact (on random 3-filter cases against brute force: optimal in
  34 of 40); never worse than the ``max_boxes = 2`` optimum, which is part of the search. Cost,
  measured: 0.2-0.4 s for a 3×3 conv of 64-512 filters, 1.6 s for 2048; 0.5-1.7 s for 5×5 to 11×11.
- Grouped convs (``group > 1``) always get one box for the whole conv (``groups=``), so the
  physical rewrite keeps one grouped Conv.
- Candidates: a K×K' kernel has ``K(K+1)/2 · K'(K'+1)/2`` boxes (36 for 3×3, 225 for 5×5, 784 for
  7×7); pairs cost ``F × boxes² / 2`` (a 5×5 conv of 512 filters: about 0.5 s). Above
  ``max_candidates`` (default 256) boxes, each box size ``(h, w)`` keeps only its best positions by
  gain summed over filters, ``max_candidates // sizes`` of them (at least one): every size,
  the full kernel and the 1×1 boxes among them, stays available.

Activation-weighted importance. A stripe's contribution to filter ``f``'s output at a position ``p``
is ``z(p) = Σ_c W[f, c, i, j] · x_c(q)``, ``q`` the input position tap ``(i, j)`` reads. Its energy
``E[z²] = Σ_{c,c'} W_c W_c' E[x_c x_c']``; keeping only the diagonal of the input's second-moment
matrix (exact when ``E[x_c x_c'] = 0`` for ``c ≠ c'``) and reading
``E[x_c(q)²]`` as the channel's second moment over all positions (as ``ChannelStats.mean_sq`` of
``onnxprune.runtime.capture`` measures it: border taps that read padding see a little less) gives
``E[z²] ≈ Σ_c W[f, c, i, j]² · E[x_c²]``; the score is its square root, the RMS amplitude the stripe
adds to the output. With ``E[x_c²] = 1`` for all ``c`` it is the L2 norm; a channel that is always
zero makes its weights irrelevant. In a grouped conv, ``c`` runs over the filter's conv group's
input channels: filter ``f`` of ``F`` in ``g`` groups reads channels ``(f // (F/g)) · C/g + c``.

Global ratio (``global_=True``). Every conv's stripe scores are divided by the conv's mean stripe
score, then all stripes of all convs are ranked together and the lowest ``⌊ratio · total⌋`` go,
never a filter's best stripe (nor a conv beyond ``max_ratio`` of its stripes). Why the mean: the
ranking must not depend on a conv's weight scale (a conv scaled by 1000, as folded BatchNorms or
an exporter's rescaling produce, would otherwise never lose a stripe, or lose them all), and the
mean, unlike the max (one outlier stripe rescales the whole conv) or the norm of all scores (which
shrinks with the conv's stripe count), makes every conv's normalized scores average 1: a stripe is
judged against its own conv's typical stripe, and a conv whose importance is concentrated in a few
stripes gives up more. The ranking decides only each conv's removed count; the stripes themselves
are then selected per conv with that count (free: the lowest ones, the same order as per conv;
box: the boxes above), so a global plan and a per-conv plan with the same counts agree.

Elsewhere: the rewrite (``onnxprune.rewrite.stripes``: mask and shrink), the latency gate
(``onnxprune.measure.stripes``), and the stage that composes them after channel pruning with its
verification and report (``pipeline.run_stripes``, ``prune --stripe-ratio``).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx

from onnxprune.errors import UserError
from onnxprune.ir.attrs import attr
from onnxprune.ir.graph import outer_refs
from onnxprune.ir.tensors import tensor_value

log = logging.getLogger(__name__)

NORMS = ("l1", "l2")
ACTIVATION = "activation"  # the plan's ``norm`` when scored by activation_stripe_importance
SHAPES = ("free", "box")
SCOPES = ("conv", "global")
NORMALIZE = ("mean", "none")  # how global selection makes convs comparable (module docstring)
DEFAULT_MAX_BOXES = 2
DEFAULT_MAX_RATIO = 0.9
MAX_CANDIDATES = 256  # boxes per conv considered for box selection (module docstring)
BEAM = 8  # box sets kept per size when max_boxes >= 3
POOL = 64  # boxes a set may grow by: all candidates up to POOL, else those of the POOL best pairs
EXACT_WORK = 1 << 21  # F x (kept area + 1) x |S| up to which a set of >= 3 boxes is solved exactly
TIE = 1e-9  # gains within TIE x the conv's total score are equal
_CHUNK = 1 << 22  # elements of a [F, pairs] block evaluated at a time
JSON_KIND = "onnxprune.stripes"
JSON_VERSION = 1  # keys shape, scope, max_boxes, max_ratio optional: absent (older files) = a free plan


@dataclass(frozen=True)
class StripeConv:
    """A prunable conv: its key (node name, else its first output), the weight tensor's name, and
    where the weight lives (``"initializer"`` or ``"constant"``, a Constant node's ``value``)."""

    key: str
    node: onnx.NodeProto = field(repr=False, compare=False)
    weight_name: str
    source: str
    shape: tuple[int, int, int, int]

    @property
    def group(self) -> int:
        """The node's ``group`` attribute (1, the schema's default, when absent)."""
        return int(attr(self.node, "group", 1))

    @property
    def input_name(self) -> str:
        """The tensor the conv reads (its input 0): where its activation statistics are captured."""
        return self.node.input[0]


def conv_key(node: onnx.NodeProto) -> str:
    """The name a plan knows a conv by: its node name, else its first output's name."""
    return node.name or node.output[0]


def _readers(graph: onnx.GraphProto) -> dict[str, int]:
    """Tensor name -> how many times the graph reads it (node inputs, subgraph references, outputs)."""
    count: dict[str, int] = {}
    for n in graph.node:
        for t in [*n.input, *outer_refs(n)]:
            if t:
                count[t] = count.get(t, 0) + 1
    for o in graph.output:
        count[o.name] = count.get(o.name, 0) + 1
    return count


def _constant_weights(graph: onnx.GraphProto) -> dict[str, tuple[str, onnx.TensorProto]]:
    """Tensor name -> (source, TensorProto) for initializers and Constant nodes with a ``value``."""
    out: dict[str, tuple[str, onnx.TensorProto]] = {t.name: ("initializer", t) for t in graph.initializer}
    for n in graph.node:
        if n.op_type == "Constant" and n.domain in ("", "ai.onnx"):
            for a in n.attribute:
                if a.name == "value":
                    out[n.output[0]] = ("constant", a.t)
    return out


def stripe_convs(model: onnx.ModelProto) -> tuple[list[StripeConv], dict[str, str]]:
    """The prunable 2-D convs of the main graph, and ``{conv key: reason}`` for every Conv skipped."""
    graph = model.graph
    weights = _constant_weights(graph)
    inputs = {i.name for i in graph.input}
    readers = _readers(graph)
    found: list[StripeConv] = []
    skipped: dict[str, str] = {}
    for node in graph.node:
        if node.op_type != "Conv" or node.domain not in ("", "ai.onnx"):
            continue
        key = conv_key(node)
        reason = _skip_reason(node, weights, inputs, readers)
        if reason:
            skipped[key] = reason
            continue
        source, t = weights[node.input[1]]
        found.append(StripeConv(key, node, node.input[1], source, tuple(int(d) for d in t.dims)))
    keys = [c.key for c in found]
    if len(set(keys)) != len(keys):
        raise UserError("two Convs share a name: stripe plans key convs by node name")
    return found, skipped


def _skip_reason(node, weights, inputs, readers) -> str | None:
    if len(node.input) < 2 or node.input[1] not in weights:
        return "weight is not a constant"
    w = node.input[1]
    if w in inputs:
        return "weight is an overridable initializer (also a graph input)"
    if readers.get(w, 0) > 1:
        return "weight is read by another node too"
    t = weights[w][1]
    if t.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE):
        return "weight is not float"
    if len(t.dims) != 4:
        return f"not a 2-D conv (weight rank {len(t.dims)})"
    if t.dims[2] * t.dims[3] <= 1:
        return "1x1 kernel: no stripes to prune"
    return None


def weight_of(model: onnx.ModelProto, conv: StripeConv) -> np.ndarray:
    """The conv's weight value ``[F, C/g, K, K']``."""
    return tensor_value(_weight_tensor(model.graph, conv))


def _weight_tensor(graph: onnx.GraphProto, conv: StripeConv) -> onnx.TensorProto:
    return _constant_weights(graph)[conv.weight_name][1]


def stripe_importance(weight: np.ndarray, norm: str = "l1") -> np.ndarray:
    """The norm of every stripe ``weight[f, :, i, j]``: an array ``[F, K, K']`` (float64)."""
    if norm not in NORMS:
        raise UserError(f"stripe norm must be one of {', '.join(NORMS)}, not {norm!r}")
    w = np.asarray(weight, dtype=np.float64)
    if w.ndim != 4:
        raise UserError(f"stripe importance needs a 2-D conv weight [F, C/g, K, K'], got shape {w.shape}")
    if norm == "l1":
        return np.abs(w).sum(axis=1)
    return np.sqrt(np.square(w).sum(axis=1))


def conv_stripe_scores(model: onnx.ModelProto, norm: str = "l1") -> dict[str, np.ndarray]:
    """``{conv key: stripe importance [F, K, K']}`` for every prunable conv of ``model``."""
    convs, _ = stripe_convs(model)
    table = _constant_weights(model.graph)  # one walk of the graph, not one per conv
    return {c.key: stripe_importance(tensor_value(table[c.weight_name][1]), norm) for c in convs}


def activation_stripe_importance(weight: np.ndarray, mean_sq: np.ndarray, group: int = 1) -> np.ndarray:
    """``sqrt(Σ_c W[f, c, i, j]² · E[x_c²])`` for every stripe: an array ``[F, K, K']`` (float64).
    ``mean_sq``: the conv input's per-channel second moments, length ``C = group · C/g`` (what
    ``ChannelStats.mean_sq`` holds for the tap ``(conv input, 1)``); filter ``f`` reads its conv group's
    channels (module docstring)."""
    w = np.asarray(weight, dtype=np.float64)
    if w.ndim != 4:
        raise UserError(f"stripe importance needs a 2-D conv weight [F, C/g, K, K'], got shape {w.shape}")
    g = int(group)
    f, cg = w.shape[:2]
    if g < 1 or f % g:
        raise UserError(f"conv group {group} does not divide the conv's {f} filters")
    m = np.asarray(mean_sq, dtype=np.float64)
    if m.shape != (g * cg,):
        raise UserError(f"second moments of the conv input: expected {g * cg} channels "
                        f"(group {g} x {cg}), got shape {m.shape}")
    if not np.isfinite(m).all() or (m < 0).any():
        raise UserError("second moments of the conv input must be finite and >= 0")
    per_filter = m.reshape(g, cg)[np.arange(f) // (f // g)]  # [F, C/g]: filter f's conv group
    return np.sqrt(np.einsum("fcij,fc->fij", np.square(w), per_filter))


def stripe_taps(model: onnx.ModelProto) -> list[tuple[str, int]]:
    """The taps ``(tensor, channel axis 1)`` whose ``mean_sq`` :func:`conv_activation_scores` needs:
    every prunable conv's input, once each, in graph order (for ``onnxprune.runtime.capture``)."""
    convs, _ = stripe_convs(model)
    return [(t, 1) for t in dict.fromkeys(c.input_name for c in convs)]


def conv_activation_scores(model: onnx.ModelProto, mean_sq: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``{conv key: activation_stripe_importance [F, K, K']}`` for every prunable conv of ``model``;
    ``mean_sq``: ``{tensor name: E[x²] per channel}`` for the taps of :func:`stripe_taps`."""
    convs, _ = stripe_convs(model)
    table = _constant_weights(model.graph)
    out = {}
    for c in convs:
        if c.input_name not in mean_sq:
            raise UserError(f"stripe importance for {c.key!r}: no second moments of its input "
                            f"{c.input_name!r} (capture the taps of stripe_taps)")
        out[c.key] = activation_stripe_importance(tensor_value(table[c.weight_name][1]), mean_sq[c.input_name],
                                                  c.group)
    return out


# ---------------------------------------------------------------------------------------------
# free selection and removed counts


def removed_count(n_filters: int, n_stripes: int, ratio: float) -> int:
    """How many stripes ``ratio`` removes from a conv: ``floor(ratio · n_stripes)``, capped so that
    every filter keeps one stripe (at most ``n_stripes − n_filters``)."""
    return min(math.floor(ratio * n_stripes + 1e-9), n_stripes - n_filters)


def _scores3(scores: np.ndarray) -> np.ndarray:
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 3:
        raise UserError(f"stripe scores must be [F, K, K'], got shape {s.shape}")
    if not np.isfinite(s).all():
        raise UserError("stripe scores must be finite")
    return s


def _protected(flat: np.ndarray) -> np.ndarray:
    """Each filter's best stripe (its first, on ties): never removed."""
    p = np.zeros(flat.shape, dtype=bool)
    p[np.arange(flat.shape[0]), np.argmax(flat, axis=1)] = True
    return p


def _check_count(n: int, s: np.ndarray) -> int:
    f = s.shape[0]
    most = s.size - f
    if isinstance(n, bool) or int(n) != n or not 0 <= n <= most:
        raise UserError(f"stripes to remove must be an integer in [0, {most}] for {f} filters of "
                        f"{s.shape[1]}x{s.shape[2]}, not {n}")
    return int(n)


def select_keep_count(scores: np.ndarray, n_removed: int) -> np.ndarray:
    """The keep-mask ``[F, K, K']`` of one conv with ``n_removed`` stripes removed: the lowest scores
    (ties by row-major position), each filter's best stripe (its first, on ties) protected."""
    s = _scores3(scores)
    n = _check_count(n_removed, s)
    flat = s.reshape(s.shape[0], -1)
    keep = np.ones(flat.shape, dtype=bool)
    if n > 0:
        ranked = np.where(_protected(flat), np.inf, flat).ravel()
        keep.ravel()[np.argsort(ranked, kind="stable")[:n]] = False
    return keep.reshape(s.shape)


def select_keep(scores: np.ndarray, ratio: float) -> np.ndarray:
    """The keep-mask ``[F, K, K']`` of one conv: :func:`select_keep_count` with
    :func:`removed_count` stripes."""
    s = _scores3(scores)
    return select_keep_count(s, removed_count(s.shape[0], s.size, ratio))


def _check_ratio(ratio: float, what: str = "stripe ratio") -> float:
    r = float(ratio)
    if not 0.0 <= r < 1.0 or math.isnan(r):
        raise UserError(f"{what} must be in [0, 1), not {ratio}")
    return r


def _check_max_ratio(max_ratio: float) -> float:
    r = float(max_ratio)
    if not 0.0 < r <= 1.0 or math.isnan(r):
        raise UserError(f"stripe max ratio must be in (0, 1], not {max_ratio}")
    return r


def _normalized(s: np.ndarray, normalize: str) -> np.ndarray:
    if normalize == "none":
        return s
    mean = float(s.mean()) if s.size else 0.0
    return s / mean if mean > 0 else s


def global_removed_counts(scores: Mapping[str, np.ndarray], ratio: float, max_ratio: float = DEFAULT_MAX_RATIO,
                          normalize: str = "mean") -> dict[str, int]:
    """``{conv key: stripes to remove}`` ranking every conv's stripes together (module docstring):
    each conv's scores divided by its mean stripe score (``normalize="none"``: raw), the lowest
    ``⌊ratio · total⌋`` removed, never a filter's best stripe, no conv beyond ``⌊max_ratio · its
    stripes⌋``. Ties by conv order (``scores``'s), then row-major position. Where the caps leave the
    target out of reach, fewer go (logged)."""
    r, cap_ratio = _check_ratio(ratio), _check_max_ratio(max_ratio)
    if normalize not in NORMALIZE:
        raise UserError(f"stripe normalization must be one of {', '.join(NORMALIZE)}, not {normalize!r}")
    keys = list(scores)
    arrays = [_scores3(scores[k]) for k in keys]
    total = sum(a.size for a in arrays)
    target = math.floor(r * total + 1e-9)
    values, owner, caps = [], [], []
    for i, s in enumerate(arrays):
        flat = s.reshape(s.shape[0], -1)
        values.append(_normalized(flat, normalize)[~_protected(flat)])  # row-major order kept
        owner.append(np.full(values[-1].size, i))
        caps.append(min(math.floor(cap_ratio * s.size + 1e-9), s.size - s.shape[0]))
    if not keys or target == 0:
        return dict.fromkeys(keys, 0)
    order = np.argsort(np.concatenate(values), kind="stable")
    ranked_owner = np.concatenate(owner)[order]
    positions = [np.flatnonzero(ranked_owner == i) for i in range(len(keys))]  # each conv's ranks, ascending

    def counts(t: int) -> list[int]:  # removed per conv when the walk has passed the first t ranked stripes
        return [min(c, int(np.searchsorted(p, t))) for c, p in zip(caps, positions, strict=True)]

    lo, hi = 0, len(order)  # smallest t whose counts reach the target (each step adds at most one)
    if sum(counts(hi)) < target:
        log.info("global stripe selection: the per-conv caps leave %d of %d stripes removable",
                 sum(counts(hi)), target)
        return dict(zip(keys, counts(hi), strict=True))
    while lo < hi:
        mid = (lo + hi) // 2
        if sum(counts(mid)) >= target:
            hi = mid
        else:
            lo = mid + 1
    return dict(zip(keys, counts(lo), strict=True))


def _removed_counts(scores: Mapping[str, np.ndarray], ratio: float, global_: bool, max_ratio: float,
                    normalize: str) -> dict[str, int]:
    if global_:
        return global_removed_counts(scores, ratio, max_ratio, normalize)
    r = _check_ratio(ratio)
    return {k: removed_count(s.shape[0], s.size, r) for k, s in ((k, _scores3(v)) for k, v in scores.items())}


def select_stripes(scores: Mapping[str, np.ndarray], ratio: float, norm: str = "l1", *, global_: bool = False,
                   max_ratio: float = DEFAULT_MAX_RATIO, normalize: str = "mean") -> StripePlan:
    """A free :class:`StripePlan`: per conv the share ``ratio`` of its stripes removed (see
    :func:`removed_count` for the rounding and :func:`select_keep_count` for the order), or with
    ``global_`` the counts of :func:`global_removed_counts`. ``norm`` only records how ``scores``
    were made."""
    n = _removed_counts(scores, ratio, global_, max_ratio, normalize)
    keep = {k: select_keep_count(s, n[k]) for k, s in scores.items()}
    return StripePlan(keep, ratio=float(ratio), norm=norm, scope="global" if global_ else "conv",
                      max_ratio=float(max_ratio) if global_ else None)


# ---------------------------------------------------------------------------------------------
# box selection (module docstring: the algorithm and what is exact)


def kernel_boxes(k: int, k2: int) -> np.ndarray:
    """Every box of a ``k × k2`` kernel as rows ``(i0, i1, j0, j1)`` (half-open), largest area first,
    then by ``(i0, j0, i1, j1)``: the enumeration order that decides ties."""
    rows = [(i0, i1, j0, j1) for i0 in range(k) for i1 in range(i0 + 1, k + 1)
            for j0 in range(k2) for j1 in range(j0 + 1, k2 + 1)]
    rows.sort(key=lambda b: (-(b[1] - b[0]) * (b[3] - b[2]), b[0], b[2], b[1], b[3]))
    return np.array(rows, dtype=np.int64).reshape(-1, 4)


def box_areas(boxes: np.ndarray) -> np.ndarray:
    """Each box's stripe count."""
    b = np.asarray(boxes, dtype=np.int64).reshape(-1, 4)
    return (b[:, 1] - b[:, 0]) * (b[:, 3] - b[:, 2])


def box_masks(boxes: np.ndarray, k: int, k2: int) -> np.ndarray:
    """``[len(boxes), k, k2]`` bool: each box's stripes."""
    b = np.asarray(boxes, dtype=np.int64).reshape(-1, 4)
    i, j = np.arange(k)[None, :, None], np.arange(k2)[None, None, :]
    return ((b[:, 0, None, None] <= i) & (i < b[:, 1, None, None])
            & (b[:, 2, None, None] <= j) & (j < b[:, 3, None, None]))


def filter_boxes(mask: np.ndarray) -> np.ndarray:
    """The bounding box ``(i0, i1, j0, j1)`` of every filter's kept stripes: ``[F, 4]`` int64
    (``(0, 0, 0, 0)`` for a filter that keeps none)."""
    m = np.asarray(mask, dtype=bool)
    if m.ndim != 3:
        raise UserError(f"keep-mask must be [F, K, K'], got shape {m.shape}")
    rows, cols = m.any(axis=2), m.any(axis=1)  # [F, K], [F, K']
    out = np.zeros((m.shape[0], 4), dtype=np.int64)
    has = rows.any(axis=1)
    out[:, 0] = np.argmax(rows, axis=1)
    out[:, 1] = m.shape[1] - np.argmax(rows[:, ::-1], axis=1)
    out[:, 2] = np.argmax(cols, axis=1)
    out[:, 3] = m.shape[2] - np.argmax(cols[:, ::-1], axis=1)
    out[~has] = 0
    return out


def is_box_mask(mask: np.ndarray) -> bool:
    """Whether every filter keeps exactly one non-empty box (its bounding box, in full)."""
    m = np.asarray(mask, dtype=bool)
    boxes = filter_boxes(m)
    return bool(m.reshape(m.shape[0], -1).any(axis=1).all()
                and (box_masks(boxes, m.shape[1], m.shape[2]) == m).all())


def distinct_boxes(mask: np.ndarray) -> int:
    """How many distinct bounding boxes the filters of a keep-mask have (Convs in the physical rewrite)."""
    return len({tuple(b) for b in filter_boxes(mask).tolist()})


def _box_gains(s: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """``G[f, b]``: the sum of filter ``f``'s scores inside box ``b`` ([F, B], from 2-D prefix sums)."""
    f, k, k2 = s.shape
    p = np.zeros((f, k + 1, k2 + 1))
    p[:, 1:, 1:] = s.cumsum(axis=1).cumsum(axis=2)
    i0, i1, j0, j1 = boxes.T
    return p[:, i1, j1] - p[:, i0, j1] - p[:, i1, j0] + p[:, i0, j0]


def _candidates(gains: np.ndarray, boxes: np.ndarray, max_candidates: int) -> np.ndarray:
    """Indices (ascending, so in enumeration order) of the boxes considered (module docstring)."""
    if len(boxes) <= max_candidates:
        return np.arange(len(boxes))
    size = (boxes[:, 1] - boxes[:, 0]) * (int(boxes[:, 3].max()) + 1) + (boxes[:, 3] - boxes[:, 2])  # (h, w) as one int
    sizes = np.unique(size)
    per = max(1, max_candidates // len(sizes))
    total = gains.sum(axis=0)
    keep = []
    for sz in sizes:
        idx = np.flatnonzero(size == sz)
        keep.extend(idx[np.argsort(-total[idx], kind="stable")[:per]].tolist())
    return np.array(sorted(keep), dtype=np.int64)


@dataclass
class _Solution:
    gain: float
    area: int
    boxes: tuple[int, ...]  # candidate indices of the set
    assign: np.ndarray | None  # [F] candidate index per filter (None: not yet reconstructed)

    def better_than(self, other: _Solution | None, tol: float) -> bool:
        if other is None or self.gain > other.gain + tol:
            return True
        return self.gain >= other.gain - tol and self.area > other.area


def _best_index(gain: np.ndarray, area: np.ndarray, tol: float) -> int:
    """The first index of the best (gain within ``tol`` of the maximum, then the largest area)."""
    near = gain >= gain.max() - tol
    return int(np.flatnonzero(near & (area == area[near].max()))[0])


def _singles_and_pairs(g: np.ndarray, a: np.ndarray, budget: int, pairs: bool, tol: float):
    """Every feasible single box and (with ``pairs``) pair of boxes, solved exactly: arrays of
    (gain, area, p, q, m) where filters take ``p`` (the ``m`` best by ``G[:, p] − G[:, q]``) or ``q``."""
    f, b = g.shape
    col = g.sum(axis=0)
    single = np.flatnonzero(f * a <= budget)
    out = [(col[single], f * a[single], single, single, np.zeros(len(single), dtype=np.int64))]
    if pairs and b > 1:
        p, q = np.triu_indices(b, k=1)  # a[p] >= a[q]: the boxes are ordered by area
        ok = f * a[q] <= budget
        p, q = p[ok], q[ok]
        step = a[p] - a[q]
        m_max = np.where(step == 0, f, (budget - f * a[q]) // np.maximum(step, 1))
        m_max = np.minimum(m_max, f)
        ok = m_max >= 1  # m = 0 is the single box q, already listed
        p, q, m_max, step = p[ok], q[ok], m_max[ok], step[ok]
        rank = np.arange(f)[:, None]
        chunk = max(1, _CHUNK // max(f, 1))
        for lo in range(0, len(p), chunk):
            sl = slice(lo, lo + chunk)
            d = -np.sort(-(g[:, p[sl]] - g[:, q[sl]]), axis=0)  # [F, n] descending
            take = (d >= -tol) & (rank < m_max[sl][None, :])
            m = take.sum(axis=0)
            out.append((col[q[sl]] + np.where(take, d, 0.0).sum(axis=0), f * a[q[sl]] + m * step[sl],
                        p[sl], q[sl], m))
    return tuple(np.concatenate(x) for x in zip(*out, strict=True))


def _pair_assign(g: np.ndarray, p: int, q: int, m: int) -> np.ndarray:
    assign = np.full(g.shape[0], q, dtype=np.int64)
    if m:
        assign[np.argsort(-(g[:, p] - g[:, q]), kind="stable")[:m]] = p
    return assign


def _local_search(g: np.ndarray, a: np.ndarray, budget: int, c: np.ndarray, allowed: np.ndarray,
                  tol: float) -> np.ndarray:
    """Single-filter moves among ``allowed`` boxes: the best gain that fits (ties: the first), then,
    with none left, a move that keeps the gain and keeps more area; until neither exists."""
    c = c.copy()
    rows = np.arange(g.shape[0])
    ga, aa = g[:, allowed], a[allowed]
    for _ in range(8 * g.shape[0] + 8):
        dg = ga - g[rows, c][:, None]
        da = aa[None, :] - a[c][:, None]
        fits = da <= budget - int(a[c].sum())
        up = fits & (dg > tol)
        if not up.any():
            up = fits & (da > 0) & (dg >= -tol)
            if not up.any():
                break
        f, j = np.unravel_index(int(np.argmax(np.where(up, dg, -np.inf))), up.shape)
        c[f] = allowed[j]
    return c


def _lagrange(g: np.ndarray, a: np.ndarray, budget: int, allowed: np.ndarray, tol: float) -> np.ndarray | None:
    """Filters assigned to ``allowed`` boxes by a Lagrangian bisection (module docstring), or None
    if even the smallest box overflows ``budget``."""
    ga, aa = g[:, allowed], a[allowed]
    f = g.shape[0]
    if f * int(aa.min()) > budget:
        return None

    def pick(lam: float, large: bool) -> np.ndarray:
        order = np.argsort(-aa if large else aa, kind="stable")  # ties: the larger (smaller) area
        return order[np.argmax((ga - lam * aa[None, :])[:, order], axis=1)]

    c = pick(0.0, True)
    if aa[c].sum() <= budget:
        return allowed[c]
    lo, hi = 0.0, float(ga.max() - ga.min()) + 1.0  # at hi every filter takes a smallest box
    for _ in range(60):
        mid = (lo + hi) / 2
        if aa[pick(mid, False)].sum() <= budget:
            hi = mid
        else:
            lo = mid
    c, up = pick(hi, False), pick(lo, True)
    rows = np.arange(f)
    da, dg = aa[up] - aa[c], ga[rows, up] - ga[rows, c]
    slack = budget - int(aa[c].sum())
    for i in np.argsort(-dg / np.maximum(da, 1), kind="stable"):  # the filters tied at the breakpoint
        if 0 < da[i] <= slack and dg[i] > 0:
            c[i], slack = up[i], slack - int(da[i])
    return allowed[c]


def _knapsack(g: np.ndarray, a: np.ndarray, budget: int, allowed: np.ndarray, tol: float) -> np.ndarray | None:
    """Filters assigned to ``allowed`` boxes exactly, by dynamic programming over the kept area above
    every filter's smallest box (``F × (extra area + 1) × |S|`` steps), or None if even the smallest
    box overflows ``budget``. Ties: the larger area, then the first box of ``allowed``."""
    ga, aa = g[:, allowed], a[allowed]
    f, k = ga.shape
    extra = budget - f * int(aa.min())
    if extra < 0:
        return None
    d = aa - int(aa.min())
    top = min(extra, f * int(d.max()))
    value = np.full(top + 1, -np.inf)
    value[0] = 0.0
    choice = np.zeros((f, top + 1), dtype=np.int64)
    for i in range(f):
        shifted = np.full((k, top + 1), -np.inf)
        for j in range(k):
            if d[j] <= top:
                shifted[j, d[j]:] = value[:top + 1 - d[j]] + ga[i, j]
        choice[i] = np.argmax(shifted, axis=0)
        value = shifted[choice[i], np.arange(top + 1)]
    reach = np.isfinite(value)
    t = int(np.flatnonzero(reach & (value >= value[reach].max() - tol))[-1])
    out = np.zeros(f, dtype=np.int64)
    for i in range(f - 1, -1, -1):
        out[i] = choice[i, t]
        t -= int(d[out[i]])
    return allowed[out]


def _beam(g: np.ndarray, a: np.ndarray, budget: int, k: int, start: list[_Solution], pool: np.ndarray,
          tol: float) -> _Solution:
    """The best set of at most ``k`` boxes found by the beam over sets, each extended by the boxes of
    ``pool`` (module docstring)."""
    best = start[0]
    beam, seen = start[:BEAM], {s.boxes for s in start}
    for _ in range(3, k + 1):
        grown: list[_Solution] = []
        for parent in beam:
            for b in pool.tolist():
                boxes = tuple(sorted({*parent.boxes, b}))
                if len(boxes) == len(parent.boxes) or boxes in seen:
                    continue
                seen.add(boxes)
                allowed = np.array(boxes, dtype=np.int64)
                tries = [parent.assign]
                exact = g.shape[0] * (budget + 1) * len(boxes) <= EXACT_WORK
                first = (_knapsack if exact else _lagrange)(g, a, budget, allowed, tol)
                if first is not None:
                    tries.insert(0, first)
                for c in tries:
                    c = _local_search(g, a, budget, c, allowed, tol)
                    sol = _Solution(float(g[np.arange(g.shape[0]), c].sum()), int(a[c].sum()), boxes, c)
                    grown.append(sol)
                    if sol.better_than(best, tol):
                        best = sol
        if not grown:
            break
        grown.sort(key=lambda s: (-s.gain, -s.area))  # stable: evaluation order on ties
        beam = grown[:BEAM]
    return best


def select_box_keep(scores: np.ndarray, n_removed: int, max_boxes: int = DEFAULT_MAX_BOXES, *,
                    max_candidates: int = MAX_CANDIDATES) -> np.ndarray:
    """The keep-mask ``[F, K, K']`` of one conv in which every filter keeps one box, at most
    ``max_boxes`` distinct boxes in all, at least ``n_removed`` stripes removed, the kept score
    maximal (module docstring: exact for ``max_boxes ≤ 2``)."""
    s = _scores3(scores)
    n = _check_count(n_removed, s)
    k = _check_max_boxes(max_boxes)
    if isinstance(max_candidates, bool) or int(max_candidates) != max_candidates or max_candidates < 1:
        raise UserError(f"max candidate boxes must be an integer >= 1, not {max_candidates!r}")
    f, k1, k2 = s.shape
    budget = s.size - n
    all_boxes = kernel_boxes(k1, k2)
    cand = _candidates(_box_gains(s, all_boxes), all_boxes, int(max_candidates))
    boxes = all_boxes[cand]
    g, a = _box_gains(s, boxes), box_areas(boxes)
    tol = TIE * max(float(np.abs(s).sum()), 1e-300)
    gain, area, p, q, m = _singles_and_pairs(g, a, budget, k >= 2, tol)
    i = _best_index(gain, area, tol)
    best = _Solution(float(gain[i]), int(area[i]), tuple(sorted({int(p[i]), int(q[i])})),
                     _pair_assign(g, int(p[i]), int(q[i]), int(m[i])))
    if k >= 3:
        order = np.lexsort((np.arange(len(gain)), -area, -gain))[:POOL]
        start = [best] + [_Solution(float(gain[j]), int(area[j]), tuple(sorted({int(p[j]), int(q[j])})),
                                    _pair_assign(g, int(p[j]), int(q[j]), int(m[j]))) for j in order[:BEAM] if j != i]
        pool = np.arange(len(boxes)) if len(boxes) <= POOL else np.unique(np.concatenate([p[order], q[order]]))
        best = _beam(g, a, budget, k, start, pool, tol)
    return box_masks(boxes[best.assign], k1, k2)


def _check_max_boxes(k: int) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise UserError(f"max boxes per conv must be an integer >= 1, not {k!r}")
    return int(k)


def _boxes_per_conv(keys: Iterable[str], max_boxes: int | Mapping[str, int],
                    groups: Mapping[str, int] | None) -> dict[str, int]:
    keys = list(keys)
    if isinstance(max_boxes, Mapping):
        unknown = sorted(set(max_boxes) - set(keys))
        if unknown:
            raise UserError(f"max boxes given for convs that are not scored: {', '.join(unknown)}")
        out = {k: _check_max_boxes(max_boxes.get(k, DEFAULT_MAX_BOXES)) for k in keys}
    else:
        out = dict.fromkeys(keys, _check_max_boxes(max_boxes))
    for k, g in (groups or {}).items():
        if k in out and int(g) > 1:
            out[k] = 1  # one grouped Conv stays one Conv: one box for all its filters
    return out


def select_boxes(scores: Mapping[str, np.ndarray], ratio: float, max_boxes: int | Mapping[str, int] = DEFAULT_MAX_BOXES,
                 norm: str = "l1", *, groups: Mapping[str, int] | None = None, global_: bool = False,
                 max_ratio: float = DEFAULT_MAX_RATIO, normalize: str = "mean",
                 max_candidates: int = MAX_CANDIDATES) -> StripePlan:
    """A box :class:`StripePlan`: per conv :func:`select_box_keep` with the removed count of
    :func:`removed_count` (or, with ``global_``, of :func:`global_removed_counts`). ``max_boxes``: an
    int for every conv, or ``{conv key: int}`` (others: ``DEFAULT_MAX_BOXES``); ``groups``: ``{conv
    key: group}``, a grouped conv gets one box."""
    n = _removed_counts(scores, ratio, global_, max_ratio, normalize)
    per = _boxes_per_conv(scores, max_boxes, groups)
    keep = {k: select_box_keep(s, n[k], per[k], max_candidates=max_candidates) for k, s in scores.items()}
    recorded = dict(max_boxes) if isinstance(max_boxes, Mapping) else int(max_boxes)
    return StripePlan(keep, ratio=float(ratio), norm=norm, shape="box", scope="global" if global_ else "conv",
                      max_boxes=recorded, max_ratio=float(max_ratio) if global_ else None)


def plan_stripes(model: onnx.ModelProto, ratio: float, norm: str = "l1", *, shape: str = "free",
                 max_boxes: int | Mapping[str, int] = DEFAULT_MAX_BOXES, global_: bool = False,
                 max_ratio: float = DEFAULT_MAX_RATIO, normalize: str = "mean",
                 mean_sq: Mapping[str, np.ndarray] | None = None) -> StripePlan:
    """Score every prunable conv of ``model`` and select. ``norm``: ``"l1"``, ``"l2"`` or
    ``"activation"`` (needs ``mean_sq``, ``{tensor: E[x²] per channel}`` at :func:`stripe_taps`);
    ``shape``: ``"free"`` (:func:`select_stripes`) or ``"box"`` (:func:`select_boxes`, grouped convs
    read from the model)."""
    if shape not in SHAPES:
        raise UserError(f"stripe shape must be one of {', '.join(SHAPES)}, not {shape!r}")
    if norm == ACTIVATION:
        if mean_sq is None:
            raise UserError("activation stripe importance needs the second moments of the conv inputs (mean_sq)")
        scores = conv_activation_scores(model, mean_sq)
    else:
        scores = conv_stripe_scores(model, norm)
    if shape == "free":
        return select_stripes(scores, ratio, norm, global_=global_, max_ratio=max_ratio, normalize=normalize)
    groups = {c.key: c.group for c in stripe_convs(model)[0]}
    return select_boxes(scores, ratio, max_boxes, norm, groups=groups, global_=global_, max_ratio=max_ratio,
                        normalize=normalize)


# ---------------------------------------------------------------------------------------------
# the plan


@dataclass
class StripePlan:
    """Per conv key (node name, else first output) a bool keep-mask ``[F, K, K']``; ``True`` keeps
    the stripe ``W[f, :, i, j]``. ``shape``: ``"free"`` or ``"box"`` (every filter's mask one box,
    checked). How it was selected (None if by hand): ``ratio``, ``norm`` (``"l1"``, ``"l2"``,
    ``"activation"``), ``scope`` (``"conv"`` or ``"global"``), ``max_boxes`` (box plans: an int or
    ``{conv key: int}``, checked against the distinct boxes of each conv) and ``max_ratio``
    (global plans)."""

    keep: dict[str, np.ndarray]
    ratio: float | None = None
    norm: str | None = None
    shape: str = "free"
    scope: str | None = None
    max_boxes: int | dict[str, int] | None = None
    max_ratio: float | None = None

    def __post_init__(self):
        if self.shape not in SHAPES:
            raise UserError(f"stripe plan shape must be one of {', '.join(SHAPES)}, not {self.shape!r}")
        if self.scope is not None and self.scope not in SCOPES:
            raise UserError(f"stripe plan scope must be one of {', '.join(SCOPES)}, not {self.scope!r}")
        for k, m in self.keep.items():
            m = np.asarray(m, dtype=bool)
            if m.ndim != 3:
                raise UserError(f"stripe plan for {k!r}: keep-mask must be [F, K, K'], got shape {m.shape}")
            if not m.reshape(m.shape[0], -1).any(axis=1).all():
                raise UserError(f"stripe plan for {k!r}: a filter keeps no stripe")
            if self.shape == "box":
                self._check_box(k, m)
            self.keep[k] = m

    def _check_box(self, key: str, m: np.ndarray) -> None:
        if not is_box_mask(m):
            raise UserError(f"stripe plan for {key!r}: shape 'box' but a filter's kept stripes are not one box")
        most = self.max_boxes.get(key) if isinstance(self.max_boxes, Mapping) else self.max_boxes
        if most is not None and distinct_boxes(m) > int(most):
            raise UserError(f"stripe plan for {key!r}: {distinct_boxes(m)} distinct boxes, more than "
                            f"max_boxes {most}")

    def removed(self) -> dict[str, int]:
        """``{conv key: stripes removed}``."""
        return {k: int(m.size - m.sum()) for k, m in self.keep.items()}

    def boxes(self) -> dict[str, np.ndarray]:
        """``{conv key: [F, 4]}``: every filter's box ``(i0, i1, j0, j1)``, half-open (for a free plan,
        the bounding box of its kept stripes: what a physical rewrite keeps)."""
        return {k: filter_boxes(m) for k, m in self.keep.items()}

    def to_json(self) -> str:
        convs = {k: {"shape": list(m.shape), "keep": m.astype(int).tolist()} for k, m in self.keep.items()}
        return json.dumps({"kind": JSON_KIND, "version": JSON_VERSION, "ratio": self.ratio, "norm": self.norm,
                           "shape": self.shape, "scope": self.scope, "max_boxes": self.max_boxes,
                           "max_ratio": self.max_ratio, "convs": convs}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> StripePlan:
        """A plan from :meth:`to_json`'s text; files without ``shape``/``scope``/``max_boxes``/
        ``max_ratio`` (written before those keys) load as free plans."""
        try:
            d = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(f"stripe plan is not JSON: {exc}") from None
        if not isinstance(d, dict) or d.get("kind") != JSON_KIND or d.get("version") != JSON_VERSION:
            raise UserError(f"not a stripe plan (kind {JSON_KIND!r}, version {JSON_VERSION})")
        keep = {}
        for k, c in d.get("convs", {}).items():
            try:
                m = np.array(c["keep"], dtype=bool)
                shape = tuple(int(x) for x in c["shape"])
            except (KeyError, TypeError, ValueError):
                raise UserError(f"stripe plan for {k!r}: needs 'shape' and a nested 'keep' list") from None
            if m.shape != shape:
                raise UserError(f"stripe plan for {k!r}: keep-mask shape {m.shape} is not {shape}")
            keep[k] = m
        max_boxes = d.get("max_boxes")
        values = max_boxes.values() if isinstance(max_boxes, dict) else [] if max_boxes is None else [max_boxes]
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            raise UserError(f"stripe plan: max_boxes must be an integer or an object of integers, not {max_boxes!r}")
        return cls(keep, ratio=d.get("ratio"), norm=d.get("norm"), shape=d.get("shape", "free"),
                   scope=d.get("scope"), max_boxes=max_boxes, max_ratio=d.get("max_ratio"))


# ---------------------------------------------------------------------------------------------
# MACs


@dataclass(frozen=True)
class StripeMacs:
    """One conv's multiply-accumulates per sample: ``kept`` counted by the plan's kept stripes,
    ``dense`` by all of them."""

    kept: int
    dense: int

    @property
    def share(self) -> float:
        """``kept / dense``."""
        return self.kept / self.dense if self.dense else 1.0


def stripe_macs(plan: StripePlan, convs: Iterable[StripeConv],
                out_hw: Mapping[str, tuple[int, int]]) -> dict[str, StripeMacs]:
    """``{conv key: StripeMacs}`` for every conv of ``plan``: ``kept`` = kept stripes × C/g × Hout ×
    Wout, ``dense`` = F·K·K' × C/g × Hout × Wout, per sample (``C/g``: the weight's axis 1;
    ``out_hw``: ``{conv key: (Hout, Wout)}`` of its output). For a free plan in mask mode this counts
    the nonzero stripes' MACs; for a box plan it is also what the physical rewrite computes."""
    by_key = {c.key: c for c in convs}
    out = {}
    for key, m in plan.keep.items():
        conv = by_key.get(key)
        if conv is None:
            raise UserError(f"stripe MACs: the plan names conv {key!r}, which is not among the convs given")
        f, cg, k, k2 = conv.shape
        if m.shape != (f, k, k2):
            raise UserError(f"stripe MACs for {key!r}: keep-mask shape {m.shape} does not match the weight "
                            f"{list(conv.shape)}")
        if key not in out_hw:
            raise UserError(f"stripe MACs for {key!r}: its output spatial size is not given")
        h, w = (int(x) for x in out_hw[key])
        if h < 0 or w < 0:
            raise UserError(f"stripe MACs for {key!r}: output size ({h}, {w}) is negative")
        per_stripe = cg * h * w
        out[key] = StripeMacs(int(m.sum()) * per_stripe, int(m.size) * per_stripe)
    return out


def conv_out_hw(convs: Iterable[StripeConv], shapes: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, int]]:
    """``{conv key: (Hout, Wout)}`` from concrete tensor shapes (``{tensor: shape}``, e.g.
    ``analysis.shapes.Shapes.concrete``), read at each conv's output 0 ``[N, F, Hout, Wout]``."""
    out = {}
    for c in convs:
        shape = shapes.get(c.node.output[0])
        if shape is None or len(shape) != 4:
            raise UserError(f"stripe MACs for {c.key!r}: the shape of its output {c.node.output[0]!r} is "
                            f"not known as [N, F, H, W] (got {shape})")
        out[c.key] = (int(shape[2]), int(shape[3]))
    return out
