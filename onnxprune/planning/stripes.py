"""Stripe importance and selection (issue 12, Pruning Filter in Filter, Meng et al. 2020).

A K×K' filter ``W[f]`` of a 2-D Conv is read as K·K' *stripes* ``W[f, :, i, j]``: 1×1 filters over the
filter's input channels (all C of them for ``group=1``, its C/g channels in a grouped conv, whose
weight is ``[F, C/g, K, K']`` so a stripe is indexed the same way). Stripe pruning removes stripes
instead of whole filters; every filter keeps a dense "skeleton".

Built here (library level, no CLI):

- :func:`stripe_convs`: the 2-D Convs of a loaded ``onnx.ModelProto`` whose weight is a constant
  (an initializer, or a ``Constant`` node's ``value``) with K·K' > 1, found directly in the main
  graph; every other Conv is listed with the reason it is skipped (weight not constant, an
  overridable initializer, shared with another reader, 1×1, not 2-D, not float);
- :func:`stripe_importance`: the L1 (or L2) norm of every stripe, an array ``[F, K, K']``;
- :func:`select_stripes`: per conv, removes ``floor(ratio · F·K·K')`` stripes, the lowest scores first
  (ties by position, row-major ``(f, i, j)``), never the best stripe of a filter (so no filter is
  ever emptied: at most ``F·K·K' − F`` stripes go);
- :class:`StripePlan`: per conv node a bool keep-mask ``[F, K, K']``, saved and loaded as JSON.

``onnxprune.rewrite.stripes.mask_stripes`` applies a plan as zeroed stripes (soft mode).

Not built yet (issue 12 items 1, 3-5): the activation-weighted (``--calib``) importance and a global
ratio across convs; physical shrink mode (filters grouped by the bounding box of their kept stripes,
smaller kernels, pads/Slices, concatenation with the permutation absorbed by the consumers) and its
latency-driven grouping; composing with channel pruning; the CLI options (``--stripe-ratio``,
``--stripe-mode``), ``--verify`` against the masked original, and the report.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import numpy as np
import onnx

from onnxprune.errors import UserError
from onnxprune.ir.graph import outer_refs
from onnxprune.ir.tensors import tensor_value

NORMS = ("l1", "l2")
JSON_KIND = "onnxprune.stripes"
JSON_VERSION = 1


@dataclass(frozen=True)
class StripeConv:
    """A prunable conv: its key (node name, else its first output), the weight tensor's name, and
    where the weight lives (``"initializer"`` or ``"constant"``, a Constant node's ``value``)."""

    key: str
    node: onnx.NodeProto = field(repr=False, compare=False)
    weight_name: str
    source: str
    shape: tuple[int, int, int, int]


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


def removed_count(n_filters: int, n_stripes: int, ratio: float) -> int:
    """How many stripes ``ratio`` removes from a conv: ``floor(ratio · n_stripes)``, capped so that
    every filter keeps one stripe (at most ``n_stripes − n_filters``)."""
    return min(math.floor(ratio * n_stripes + 1e-9), n_stripes - n_filters)


def select_keep(scores: np.ndarray, ratio: float) -> np.ndarray:
    """The keep-mask ``[F, K, K']`` of one conv: the lowest-scoring stripes removed (ties by
    row-major position), each filter's best stripe (its first, on ties) protected."""
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 3:
        raise UserError(f"stripe scores must be [F, K, K'], got shape {s.shape}")
    f = s.shape[0]
    flat = s.reshape(f, -1)
    keep = np.ones(flat.shape, dtype=bool)
    n = removed_count(f, flat.size, ratio)
    if n > 0:
        protected = np.zeros(flat.shape, dtype=bool)
        protected[np.arange(f), np.argmax(flat, axis=1)] = True
        ranked = np.where(protected, np.inf, flat).ravel()
        order = np.argsort(ranked, kind="stable")[:n]
        keep.ravel()[order] = False
    return keep.reshape(s.shape)


def _check_ratio(ratio: float) -> float:
    r = float(ratio)
    if not 0.0 <= r < 1.0 or math.isnan(r):
        raise UserError(f"stripe ratio must be in [0, 1), not {ratio}")
    return r


def select_stripes(scores: dict[str, np.ndarray], ratio: float, norm: str = "l1") -> StripePlan:
    """A :class:`StripePlan` removing the share ``ratio`` of stripes per conv (see
    :func:`removed_count` for the rounding and :func:`select_keep` for the order)."""
    r = _check_ratio(ratio)
    return StripePlan({k: select_keep(s, r) for k, s in scores.items()}, ratio=r, norm=norm)


def plan_stripes(model: onnx.ModelProto, ratio: float, norm: str = "l1") -> StripePlan:
    """Score every prunable conv of ``model`` and select: ``select_stripes(conv_stripe_scores(...))``."""
    return select_stripes(conv_stripe_scores(model, norm), ratio, norm)


@dataclass
class StripePlan:
    """Per conv key (node name, else first output) a bool keep-mask ``[F, K, K']``; ``True`` keeps
    the stripe ``W[f, :, i, j]``. ``ratio`` and ``norm`` record how it was selected (None if by hand)."""

    keep: dict[str, np.ndarray]
    ratio: float | None = None
    norm: str | None = None

    def __post_init__(self):
        for k, m in self.keep.items():
            m = np.asarray(m, dtype=bool)
            if m.ndim != 3:
                raise UserError(f"stripe plan for {k!r}: keep-mask must be [F, K, K'], got shape {m.shape}")
            if not m.reshape(m.shape[0], -1).any(axis=1).all():
                raise UserError(f"stripe plan for {k!r}: a filter keeps no stripe")
            self.keep[k] = m

    def removed(self) -> dict[str, int]:
        """``{conv key: stripes removed}``."""
        return {k: int(m.size - m.sum()) for k, m in self.keep.items()}

    def to_json(self) -> str:
        convs = {k: {"shape": list(m.shape), "keep": m.astype(int).tolist()} for k, m in self.keep.items()}
        return json.dumps({"kind": JSON_KIND, "version": JSON_VERSION, "ratio": self.ratio, "norm": self.norm,
                           "convs": convs}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> StripePlan:
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
        return cls(keep, ratio=d.get("ratio"), norm=d.get("norm"))
