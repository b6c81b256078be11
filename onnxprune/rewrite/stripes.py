"""Stripe pruning (issue 12): the stripes a :class:`~onnxprune.planning.stripes.StripePlan` removes
become zeros (soft mode, :func:`mask_stripes`) or smaller kernels (shrink mode, :func:`shrink_stripes`).

Soft mode: ``mask_stripes`` returns a copy of the model; the graph, its nodes and every tensor's shape
are unchanged, only the removed stripes ``W[f, :, i, j]`` of the planned convs are zeroed (the weight
written back as raw data, in its own dtype).

Shrink mode (Pruning Filter in Filter, Meng et al. 2020), terms:

- *box* of a filter: the bounding box ``(r0, r1, c0, c1)`` (inclusive, kernel coordinates) of its kept
  stripes. Removed stripes inside a box stay zero: every weight is cut from the masked weights.
- *box group*: the filters of one conv with the same box; one box group becomes one Conv.
- *crop*: one box for the whole conv. The weight becomes ``W[:, :, r0:r1+1, c0:c1+1]`` and the
  explicit pads move with it so that every output reads the same inputs: top pad
  ``pad_top − r0·dilation_h``, bottom pad ``pad_bottom − (K−1−r1)·dilation_h`` (width alike). The sum
  ``pads − dilation·(k−1)`` of the output-size formula is unchanged, so the output size is, for any
  stride and dilation. ``auto_pad`` is resolved to explicit pads first (with a stride above 1 that
  needs the input's spatial size). A pad that would be negative becomes 0 and a ``Slice`` of the
  input's spatial axis drops as many rows or columns. A grouped conv (``group > 1``, depthwise
  included) is always cropped to one box: the union of its filters' boxes.
- *split* (``group == 1``, several boxes): one Conv per box group, each on its own (possibly
  sliced) input, concatenated on axis 1 into the conv's output. The concatenation is ordered by box
  group, not by the original filter order.
- *permutation absorption*: instead of a Gather after the Concat, the new channel order is carried
  through the conv's channel *group* of the coupling graph (``analysis.coupling``): every constant
  member of the group (an initializer or a ``Constant`` node: the conv's own weight and bias, a BN's
  parameters, the consumer conv's weight on its input axis, ...) is reordered with ``np.take`` along
  its axis, and activations need nothing (their shapes do not change). The first conv split in a
  group fixes its order (by box label, stable); a later conv of that group is split only if its box
  groups are contiguous runs in that order, and otherwise cropped to its union box.
- *safety rules* for reordering a group (silent corruption is the one failure we never allow):
  the group is not frozen, approximate, or part of an activation x activation product; every space
  of the group has as many elements as the group has channels and maps 1:1 onto them (a bijective
  ``unit_index``); no tensor has two axes in the group; no tensor of the group is a graph input or
  output, is read inside a subgraph, or lives outside the main graph; every constant member has a
  single reader; and every node that reads or writes a tensor of the group does so through an op on
  the allowlist (:data:`PERMUTABLE_OPS`) for that axis. An allowlisted op is equivariant under one
  permutation applied at once to the axes it ties together (its *counterparts*: a Conv's input
  channels and its weight's axis 1; its output channels and its weight's axis 0 and bias; an
  elementwise op's aligned axes; a Gemm's contracted axis on both operands; ...). Each counterpart must
  be a space of the group whose ``unit_index`` equals the others' (the same permutation in index
  terms), or a broadcast axis of static size 1. A group that fails a rule is not reordered and the
  conv gets its union box, with the reason recorded.

``split`` (a set of conv keys) limits which convs change physically; the others stay dense with their
stripes zeroed (their constants are still reordered when an earlier split reorders their group).
:func:`micro_pairs` cuts one planned conv out into a pair of standalone models (dense masked conv vs
its shrunk form, the same filter order, so the outputs match) for ``measure.stripes.gate_splits``.

Every function validates the whole plan first (plan, validate, then mutate); a refused conv is
recorded with its reason, never an exception.

Not built yet: 1-D and 3-D convs, ConvTranspose, a Slice shared by convs reading the same input, boxes
chosen to balance MACs against conv count (the plan's boxes are used as they are), the ops left off
the allowlist (Concat, Split, Slice, Pad, Resize, Reduce*, LayerNormalization, Softmax, channel
shuffles: a group touching them keeps its order). The CLI stage is ``pipeline.run_stripes``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxprune.analysis.coupling import CouplingGraph, Group
from onnxprune.errors import RewriteError, UserError
from onnxprune.ir.attrs import get_attr
from onnxprune.ir.graph import all_names, default_opset, fresh_name, outer_refs, value_dims, weightless
from onnxprune.ir.tensors import constant_node_value, set_tensor, tensor_value
from onnxprune.planning.stripes import StripeConv, StripePlan, conv_key, stripe_convs

log = logging.getLogger(__name__)

Box = tuple[int, int, int, int]  # r0, r1, c0, c1 (inclusive)
INT64_MAX = 2**63 - 1


def validate_stripes(model: onnx.ModelProto, plan: StripePlan) -> dict[str, StripeConv]:
    """``{conv key: conv}`` for every conv the plan names; a UserError if one is not a prunable conv
    of ``model`` or its keep-mask does not match the weight's ``[F, K, K']``."""
    convs, skipped = stripe_convs(model)
    by_key = {c.key: c for c in convs}
    out: dict[str, StripeConv] = {}
    for key, mask in plan.keep.items():
        conv = by_key.get(key)
        if conv is None:
            why = skipped.get(key, "no Conv of that name")
            raise UserError(f"stripe plan names conv {key!r}, which cannot be stripe-pruned: {why}")
        f, _, k, k2 = conv.shape
        if mask.shape != (f, k, k2):
            raise UserError(f"stripe plan for {key!r}: keep-mask shape {mask.shape} does not match the "
                            f"weight {list(conv.shape)} (expected {(f, k, k2)})")
        out[key] = conv
    return out


def mask_stripes(model: onnx.ModelProto, plan: StripePlan) -> onnx.ModelProto:
    """A copy of ``model`` with every stripe the plan removes zeroed; the graph is unchanged."""
    masked = onnx.ModelProto()
    masked.CopyFrom(model)
    convs = validate_stripes(masked, plan)  # checked in full before any weight is written
    weights = _tensors(masked.graph)
    for key, conv in convs.items():
        t = weights[conv.weight_name]
        w = np.array(tensor_value(t))  # writable copy
        drop = ~plan.keep[key]  # [F, K, K']
        w[np.broadcast_to(drop[:, None, :, :], w.shape)] = 0
        set_tensor(t, w)
    return masked


def _tensors(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    out = {t.name: t for t in graph.initializer}
    for n in graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    out[n.output[0]] = a.t
    return out


# ------------------------------------------------------------------------------------------------
# results


@dataclass(frozen=True)
class BoxGroup:
    """Filters sharing one box ``(r0, r1, c0, c1)``; ``filters`` of them."""

    box: Box
    filters: int

    @property
    def kernel(self) -> tuple[int, int]:
        return self.box[1] - self.box[0] + 1, self.box[3] - self.box[2] + 1

    def to_json(self) -> dict:
        return {"box": list(self.box), "kernel": list(self.kernel), "filters": self.filters}


@dataclass(frozen=True)
class ShrunkConv:
    """What shrink mode did to one planned conv. ``boxes``: the distinct boxes of its filters (first
    appearance order); ``built``: the Convs built, in output channel order (one union box when
    cropped, nothing when kept dense); MACs per sample, None where the output size is unknown;
    ``permuted``: its output channels come out in a new order (absorbed by the consumers), fixed by
    the split of conv ``reordered_by`` (itself or an earlier conv of its channel group); ``sliced``:
    a Slice feeds one of its Convs; ``reason``: why it was not split or not changed at all (None when it was split, or cropped with
    nothing to say)."""

    key: str
    kernel: tuple[int, int]
    group: int
    boxes: tuple[BoxGroup, ...]
    built: tuple[BoxGroup, ...]
    macs_before: int | None
    macs_after: int | None
    shrunk: bool
    split: bool
    permuted: bool = False
    reordered_by: str | None = None
    sliced: bool = False
    reason: str | None = None

    def to_json(self) -> dict:
        return {"key": self.key, "kernel": list(self.kernel), "group": self.group,
                "boxes": [b.to_json() for b in self.boxes], "built": [b.to_json() for b in self.built],
                "macs_before": self.macs_before, "macs_after": self.macs_after, "shrunk": self.shrunk,
                "split": self.split, "permuted": self.permuted, "reordered_by": self.reordered_by,
                "sliced": self.sliced, "reason": self.reason}


@dataclass(frozen=True)
class ShrinkResult:
    """The shrunk model, one record per planned conv (graph order), one line per change."""

    model: onnx.ModelProto
    convs: list[ShrunkConv]
    changes: tuple[str, ...] = ()

    def conv(self, key: str) -> ShrunkConv:
        return next(c for c in self.convs if c.key == key)

    def to_json(self) -> dict:
        known = [c for c in self.convs if c.macs_before is not None and c.macs_after is not None]
        return {"convs": [c.to_json() for c in self.convs], "changes": list(self.changes),
                "shrunk": sum(c.shrunk for c in self.convs), "split": sum(c.split for c in self.convs),
                "macs_before": sum(c.macs_before for c in known), "macs_after": sum(c.macs_after for c in known)}


# ------------------------------------------------------------------------------------------------
# boxes


def filter_boxes(keep: np.ndarray) -> np.ndarray:
    """``[F, 4]``: the box ``(r0, r1, c0, c1)`` of every filter's kept stripes (each keeps one)."""
    keep = np.asarray(keep, dtype=bool)
    k, k2 = keep.shape[1:]
    rows, cols = keep.any(axis=2), keep.any(axis=1)
    r0, r1 = rows.argmax(axis=1), k - 1 - rows[:, ::-1].argmax(axis=1)
    c0, c1 = cols.argmax(axis=1), k2 - 1 - cols[:, ::-1].argmax(axis=1)
    return np.stack([r0, r1, c0, c1], axis=1).astype(np.int64)


def union_box(boxes: np.ndarray) -> Box:
    b = np.asarray(boxes)
    return int(b[:, 0].min()), int(b[:, 1].max()), int(b[:, 2].min()), int(b[:, 3].max())


def _labels(boxes: np.ndarray) -> tuple[list[Box], np.ndarray]:
    """The distinct boxes (first appearance order) and every filter's label (index into them)."""
    distinct: list[Box] = []
    index: dict[Box, int] = {}
    labels = np.empty(len(boxes), dtype=np.int64)
    for f, b in enumerate(tuple(int(v) for v in row) for row in boxes):
        if b not in index:
            index[b] = len(distinct)
            distinct.append(b)
        labels[f] = index[b]
    return distinct, labels


def _runs(labels: np.ndarray) -> list[tuple[int, int, int]] | None:
    """``(label, start, stop)`` of the runs of equal labels; None if a label has two runs."""
    runs: list[tuple[int, int, int]] = []
    start = 0
    for i in range(1, len(labels) + 1):
        if i == len(labels) or labels[i] != labels[start]:
            runs.append((int(labels[start]), start, i))
            start = i
    return runs if len({r[0] for r in runs}) == len(runs) else None


# ------------------------------------------------------------------------------------------------
# shapes and geometry


class _ShapeView:
    """Static dims of tensors: from the coupling graph's shapes (dynamic axes are None) or, without
    one, from onnx shape inference (symbolic dims are None); ``token`` names a dynamic dim."""

    def __init__(self, model: onnx.ModelProto, cg: CouplingGraph | None):
        self._cg = cg
        self._dims: dict[str, tuple[int | str | None, ...]] = {} if cg is not None else _inferred(model)

    def raw(self, name: str) -> tuple[int | str | None, ...] | None:
        return self._dims.get(name)

    def dims(self, name: str) -> tuple[int | None, ...] | None:
        if self._cg is not None:
            s = self._cg.shapes.get(name)
            if s is None:
                return None
            return tuple(None if self._cg.shapes.is_dynamic(name, i) else int(d) for i, d in enumerate(s))
        d = self._dims.get(name)
        return None if d is None else tuple(v if isinstance(v, int) else None for v in d)

    def token(self, name: str, axis: int):
        """A value equal for two dynamic dims known to be the same size (None: unknown)."""
        if self._cg is not None:
            a, b = self._cg.shapes.get(name), self._cg.shapes.concrete2.get(name)
            if a is None or b is None or axis >= len(a) or axis >= len(b):
                return None
            return ("probe", int(a[axis]), int(b[axis]))
        d = self._dims.get(name)
        v = d[axis] if d is not None and axis < len(d) else None
        return ("param", v) if isinstance(v, str) and v else None


def _inferred(model: onnx.ModelProto) -> dict[str, tuple[int | str | None, ...]]:
    try:
        g = onnx.shape_inference.infer_shapes(weightless(model), data_prop=True).graph
    except Exception as exc:  # noqa: BLE001 - shape inference raises many types
        log.debug("shape inference failed: %s", exc)
        g = model.graph
    out: dict[str, tuple[int | str | None, ...]] = {}
    for vi in [*g.input, *g.value_info, *g.output]:
        d = value_dims(vi)
        if d is not None:
            out[vi.name] = tuple(d)
    for t in model.graph.initializer:
        out[t.name] = tuple(int(v) for v in t.dims)
    for n in model.graph.node:
        if n.op_type == "Constant" and n.output:
            v = constant_node_value(n)
            if v is not None:
                out[n.output[0]] = tuple(int(x) for x in v.shape)
    return out


@dataclass(frozen=True)
class _Geom:
    """A 2-D conv's geometry with explicit pads ``(top, left, bottom, right)``."""

    kernel: tuple[int, int]
    strides: tuple[int, int]
    dilations: tuple[int, int]
    pads: tuple[int, int, int, int]
    in_hw: tuple[int | None, int | None]
    out_hw: tuple[int | None, int | None]
    group: int
    c_per_group: int

    def macs(self, filters: int, kh: int, kw: int) -> int | None:
        ho, wo = self.out_hw
        if ho is None or wo is None:
            return None
        return int(filters) * self.c_per_group * kh * kw * ho * wo

    def layout(self, box: Box) -> tuple[tuple[int, int, int, int], tuple[int, int, int, int]]:
        """(new pads, input cut) for a box: pads ``(top, left, bottom, right)`` all >= 0 and how many
        rows/columns a Slice drops on each side where a pad would have been negative."""
        r0, r1, c0, c1 = box
        (k, k2), (dh, dw) = self.kernel, self.dilations
        pt, pl, pb, pr = self.pads
        raw = (pt - r0 * dh, pl - c0 * dw, pb - (k - 1 - r1) * dh, pr - (k2 - 1 - c1) * dw)
        return tuple(max(0, p) for p in raw), tuple(max(0, -p) for p in raw)

    def cut_reason(self, box: Box) -> str | None:
        """Why a Slice for ``box`` could empty the input (None: it cannot)."""
        _, (ct, cl, cb, cr) = self.layout(box)
        for axis, size, k, d, p0, p1, a, b in ((2, self.in_hw[0], self.kernel[0], self.dilations[0], self.pads[0],
                                                self.pads[2], ct, cb),
                                               (3, self.in_hw[1], self.kernel[1], self.dilations[1], self.pads[1],
                                                self.pads[3], cl, cr)):
            if not (a or b):
                continue
            smallest = size if size is not None else max(1, d * (k - 1) + 1 - p0 - p1)  # smallest valid input
            if smallest - a - b < 1:
                return f"box {list(box)} would slice away the whole input axis {axis} (pads larger than the kernel)"
        return None


def _geometry(node: onnx.NodeProto, w_shape, shapes: _ShapeView, opset: int) -> _Geom | str:
    k, k2 = int(w_shape[2]), int(w_shape[3])
    ks = get_attr(node, "kernel_shape", opset)
    if ks and [int(v) for v in ks] != [k, k2]:
        return f"kernel_shape {list(ks)} differs from the weight's {[k, k2]}"
    strides = tuple(int(v) for v in (get_attr(node, "strides", opset) or (1, 1)))
    dil = tuple(int(v) for v in (get_attr(node, "dilations", opset) or (1, 1)))
    group = int(get_attr(node, "group", opset) or 1)
    xd, yd = shapes.dims(node.input[0]), shapes.dims(node.output[0])
    in_hw = (xd[2], xd[3]) if xd is not None and len(xd) == 4 else (None, None)
    out_hw = (yd[2], yd[3]) if yd is not None and len(yd) == 4 else (None, None)
    auto = get_attr(node, "auto_pad", opset) or "NOTSET"
    auto = auto.decode() if isinstance(auto, bytes) else str(auto)
    if auto == "NOTSET":
        pads = tuple(int(v) for v in (get_attr(node, "pads", opset) or (0, 0, 0, 0)))
    elif auto == "VALID":
        pads = (0, 0, 0, 0)
    elif auto in ("SAME_UPPER", "SAME_LOWER"):
        begin, end = [], []
        for size, kk, s, d in zip(in_hw, (k, k2), strides, dil, strict=True):
            if s != 1 and size is None:
                return f"auto_pad {auto} with stride {s} needs the input's spatial size, which is unknown"
            total = d * (kk - 1) if s == 1 else max(0, (-(-size // s) - 1) * s + d * (kk - 1) + 1 - size)
            head = total // 2 if auto == "SAME_UPPER" else total - total // 2
            begin.append(head)
            end.append(total - head)
        pads = (begin[0], begin[1], end[0], end[1])
    else:
        return f"unknown auto_pad {auto!r}"
    if len(strides) != 2 or len(dil) != 2 or len(pads) != 4:
        return "not a 2-D conv (strides, dilations or pads)"
    return _Geom((k, k2), strides, dil, pads, in_hw, out_hw, group, int(w_shape[1]))


# ------------------------------------------------------------------------------------------------
# the allowlist: ops equivariant under one permutation of the axes they tie together

_UNARY = frozenset({
    "Abs", "Acos", "Acosh", "Asin", "Asinh", "Atan", "Atanh", "Cast", "Ceil", "Celu", "Clip", "Cos", "Cosh",
    "Elu", "Erf", "Exp", "Floor", "Gelu", "HardSigmoid", "HardSwish", "Identity", "IsInf", "IsNaN", "LeakyRelu",
    "Log", "Mish", "Neg", "Not", "Reciprocal", "Relu", "Round", "Selu", "Shrink", "Sigmoid", "Sign", "Sin", "Sinh",
    "Softplus", "Softsign", "Sqrt", "Swish", "Tan", "Tanh", "ThresholdedRelu"})
_BROADCAST = frozenset({
    "Add", "And", "BitShift", "Div", "Equal", "Greater", "GreaterOrEqual", "Less", "LessOrEqual", "Max", "Mean",
    "Min", "Mod", "Mul", "Or", "Pow", "PRelu", "Sub", "Sum", "Where", "Xor"})
_POOLS = frozenset({"AveragePool", "GlobalAveragePool", "GlobalLpPool", "GlobalMaxPool", "LpPool", "MaxPool"})
_RESHAPES = frozenset({"Flatten", "Reshape", "Squeeze", "Unsqueeze"})
_SHAPE_ONLY = frozenset({"Shape", "Size"})
_NORMS = {"BatchNormalization": 4, "InstanceNormalization": 2}  # parameter inputs (axis 0 each)
_CONTRACTIONS = frozenset({"Conv", "Gemm", "MatMul"})

#: Ops a reordered channel group may pass through (see ``_counterparts`` for the axes each ties).
PERMUTABLE_OPS = (_UNARY | _BROADCAST | _POOLS | _RESHAPES | _SHAPE_ONLY | frozenset(_NORMS) | _CONTRACTIONS
                  | {"Transpose"})

Pair = tuple[str, int]


def _counterparts(node: onnx.NodeProto, t: str, ax: int, shapes: _ShapeView, opset: int) -> list[Pair] | str:
    """The (tensor, axis) pairs ``node`` permutes together with axis ``ax`` of ``t``, or why the node
    does not follow a reordering of that axis."""
    where = f"{node.op_type} '{node.name}'"
    if node.domain not in ("", "ai.onnx") or node.op_type not in PERMUTABLE_OPS:
        return f"{where} is not on the channel-reordering allowlist"
    op = node.op_type
    if op in _SHAPE_ONLY:
        return [] if t == node.input[0] else f"{where}: unexpected input"
    if op in _UNARY:
        return _unary(node, t, ax, shapes, where)
    if op in _BROADCAST:
        return _broadcast(node, t, ax, shapes, where)
    if op in _POOLS:
        if op == "MaxPool" and len(node.output) > 1 and node.output[1]:
            return f"{where}: its Indices output encodes channel positions"
        return _pick([[(node.input[0], 1), (node.output[0], 1)]], t, ax, where)
    if op in _NORMS:
        if any(node.output[1:]):
            return f"{where}: training-mode outputs"
        params = [(p, 0) for p in node.input[1:1 + _NORMS[op]] if p]
        if any(len(shapes.dims(p) or ()) != 1 for p, _ in params):
            return f"{where}: parameters are not vectors"
        return _pick([[(node.input[0], 1), (node.output[0], 1), *params]], t, ax, where)
    if op == "Conv":
        return _conv(node, t, ax, shapes, opset, where)
    if op in ("Gemm", "MatMul"):
        return _matmul(node, t, ax, shapes, opset, where)
    if op == "Transpose":
        return _transpose(node, t, ax, shapes, opset, where)
    return _reshape(node, t, ax, shapes, where)


def _pick(sets: list[list[Pair]], t: str, ax: int, where: str) -> list[Pair] | str:
    hits = [s for s in sets if (t, ax) in s]
    if len(hits) != 1:
        return f"{where} does not carry axis {ax} of '{t}' channel by channel"
    return hits[0]


def _unary(node, t, ax, shapes, where):
    for extra in node.input[1:]:  # Clip's min and max
        d = shapes.dims(extra) if extra else ()
        if d is None or int(np.prod([v if v is not None else 2 for v in d], dtype=np.int64)) != 1:
            return f"{where}: input '{extra}' is not a scalar"
    return _pick([[(node.input[0], ax)] + [(o, ax) for o in node.output if o]], t, ax, where)


def _broadcast(node, t, ax, shapes, where):
    out = node.output[0]
    ranks = {n: len(shapes.dims(n) or ()) for n in [*node.input, out] if n}
    if any(shapes.dims(n) is None for n in ranks):
        return f"{where}: a shape is unknown"
    r = ranks[out]
    oax = ax if t == out else ax + r - ranks[t]
    pairs = [(out, oax)] + [(i, oax - (r - ranks[i])) for i in node.input if i and oax - (r - ranks[i]) >= 0]
    return _pick([pairs], t, ax, where)


def _conv(node, t, ax, shapes, opset, where):
    x, w, y = node.input[0], node.input[1], node.output[0]
    b = [(node.input[2], 0)] if len(node.input) > 2 and node.input[2] else []
    group = int(get_attr(node, "group", opset) or 1)
    wd, xd = shapes.dims(w), shapes.dims(x)
    if group == 1:
        return _pick([[(x, 1), (w, 1)], [(y, 1), (w, 0), *b]], t, ax, where)
    if wd is not None and xd is not None and wd[1] == 1 and xd[1] == group == wd[0]:
        return _pick([[(x, 1), (y, 1), (w, 0), *b]], t, ax, where)  # depthwise, one filter per channel
    return f"{where} is a grouped conv"


def _matmul(node, t, ax, shapes, opset, where):
    a, b, y = node.input[0], node.input[1], node.output[0]
    da, db, dy = shapes.dims(a), shapes.dims(b), shapes.dims(y)
    if da is None or db is None or dy is None or len(da) < 2 or len(db) < 2:
        return f"{where}: operands are not matrices of known rank"
    ra, rb, ry = len(da), len(db), len(dy)
    if node.op_type == "Gemm":
        ta, tb = int(get_attr(node, "transA", opset) or 0), int(get_attr(node, "transB", opset) or 0)
        m_a, k_a = (1, 0) if ta else (0, 1)
        k_b, n_b = (1, 0) if tb else (0, 1)
        sets = [[(a, m_a), (y, 0)], [(a, k_a), (b, k_b)], [(b, n_b), (y, 1)]]
        c = node.input[2] if len(node.input) > 2 and node.input[2] else None
        if c is not None:
            rc = len(shapes.dims(c) or ())
            for s, yax in ((sets[0], 0), (sets[2], 1)):
                if yax - (2 - rc) >= 0:
                    s.append((c, yax - (2 - rc)))
        return _pick(sets, t, ax, where)
    sets = [[(a, ra - 2), (y, ry - 2)], [(a, ra - 1), (b, rb - 2)], [(b, rb - 1), (y, ry - 1)]]
    return _pick(sets, t, ax, where)  # batch axes are not on the list


def _transpose(node, t, ax, shapes, opset, where):
    x, y = node.input[0], node.output[0]
    rank = len(shapes.dims(x) or ())
    perm = [int(p) for p in (get_attr(node, "perm", opset) or range(rank - 1, -1, -1))]
    if t == x and ax in perm:
        return [(x, ax), (y, perm.index(ax))]
    if t == y and ax < len(perm):
        return [(x, perm[ax]), (y, ax)]
    return f"{where}: unexpected axis"


def _reshape(node, t, ax, shapes, where):
    """Flatten, Reshape, Squeeze, Unsqueeze: allowed where the channel index keeps its place in
    row-major order (the same product of sizes before it, the same size)."""
    x, y = node.input[0], node.output[0]
    if t not in (x, y):
        return f"{where}: reads the channel axis as a shape"
    src, dst = (x, y) if t == x else (y, x)
    b = _same_position(shapes, src, ax, dst)
    if b is None:
        return f"{where} moves axis {ax} of '{t}' to a different row-major position"
    return [(src, ax), (dst, b)]


def _same_position(shapes: _ShapeView, src: str, a: int, dst: str) -> int | None:
    sd, dd = shapes.dims(src), shapes.dims(dst)
    if sd is None or dd is None or a >= len(sd) or sd[a] is None:
        return None
    start = 0
    if sd and dd and (sd[0] is None or dd[0] is None):
        tok = shapes.token(src, 0)
        if a == 0 or tok is None or tok != shapes.token(dst, 0):
            return None  # a dynamic leading axis passes through only when it is provably the same
        start = 1
    if any(v is None for v in sd[start:]) or any(v is None for v in dd[start:]):
        return None
    pre = int(np.prod(sd[start:a], dtype=np.int64))
    acc = 1
    for b in range(start, len(dd)):
        if acc == pre and dd[b] == sd[a]:
            return b
        acc *= dd[b]
        if acc > pre:
            return None
    return None


# ------------------------------------------------------------------------------------------------
# the graph as the rewrite reads it


class _Index:
    """Constants, producers, readers and scope facts of a model's main graph."""

    def __init__(self, model: onnx.ModelProto):
        g = model.graph
        self.graph = g
        self.inputs = {i.name for i in g.input}
        self.outputs = {o.name for o in g.output}
        self.inits = {t.name: t for t in g.initializer}
        self.const_nodes = {n.output[0]: n for n in g.node
                            if n.op_type == "Constant" and n.domain in ("", "ai.onnx") and len(n.output) == 1}
        self.producer = {o: n for n in g.node for o in n.output if o}
        self.readers: dict[str, list[onnx.NodeProto]] = {}
        self.sub_refs: set[str] = set()
        for n in g.node:
            for t in n.input:
                if t:
                    self.readers.setdefault(t, []).append(n)
            self.sub_refs |= outer_refs(n)

    def is_const(self, name: str) -> bool:
        return (name in self.inits and name not in self.inputs) or name in self.const_nodes

    def shape(self, name: str) -> tuple[int, ...]:
        if name in self.inits:
            return tuple(int(d) for d in self.inits[name].dims)
        return tuple(constant_node_value(self.const_nodes[name]).shape)

    def value(self, name: str) -> np.ndarray:
        if name in self.inits:
            return tensor_value(self.inits[name])
        return constant_node_value(self.const_nodes[name])

    def write(self, name: str, arr: np.ndarray) -> None:
        arr = np.ascontiguousarray(arr)
        if name in self.inits:
            set_tensor(self.inits[name], arr)
            return
        node = self.const_nodes[name]
        t = next((a.t for a in node.attribute if a.name == "value"), None)
        if t is not None:
            set_tensor(t, arr)
            return
        del node.attribute[:]
        node.attribute.append(helper.make_attribute("value", numpy_helper.from_array(arr, name)))

    def n_readers(self, name: str) -> int:
        return len(self.readers.get(name, ())) + (name in self.outputs) + (name in self.sub_refs)


# ------------------------------------------------------------------------------------------------
# deciding (no mutation)


@dataclass
class _Decision:
    conv: StripeConv
    pos: int  # the node's index in the graph
    keep: np.ndarray
    geom: _Geom | None
    boxes: np.ndarray  # [F, 4], original filter order
    distinct: list[Box]
    labels: np.ndarray
    mode: str = "dense"  # "dense" | "crop" | "split"
    order: np.ndarray | None = None  # a split's output filter order (original indices); None: original
    runs: list[tuple[Box, int, int]] = field(default_factory=list)  # (box, start, stop) in output order
    permuted: bool = False
    reordered_by: str | None = None
    reason: str | None = None

    @property
    def node(self) -> onnx.NodeProto:
        return self.conv.node

    def record(self) -> ShrunkConv:
        f, _, k, k2 = self.conv.shape
        counts = np.bincount(self.labels, minlength=len(self.distinct))
        boxes = tuple(BoxGroup(b, int(n)) for b, n in zip(self.distinct, counts, strict=True))
        built = tuple(BoxGroup(b, stop - start) for b, start, stop in self.runs)
        g = self.geom
        before = g.macs(f, k, k2) if g is not None else None
        after = before
        if g is not None and built:
            parts = [g.macs(b.filters, *b.kernel) for b in built]
            after = None if any(p is None for p in parts) else sum(parts)
        sliced = g is not None and any(any(g.layout(b)[1]) for b, _, _ in self.runs)
        return ShrunkConv(self.conv.key, (k, k2), g.group if g is not None else 1, boxes, built, before, after,
                          self.mode != "dense", self.mode == "split", self.permuted, self.reordered_by, sliced,
                          self.reason)


class _Orders:
    """Which channel groups have a fixed order, set by which conv (``perm``: the unit at every new
    position; None: the original order, fixed because a conv was split in it)."""

    def __init__(self, model: onnx.ModelProto, cg: CouplingGraph | None, shapes: _ShapeView, index: _Index):
        self.cg = cg
        self.shapes = shapes
        self.index = index
        self.opset = default_opset(model) or 1
        self.fixed: dict[int, tuple[np.ndarray | None, str]] = {}
        self._why: dict[int, str | None] = {}
        self.group_of: dict[int, Group] = {}
        if cg is not None:
            self.group_of = {sid: g for g in cg.groups for sid in g.spaces}

    def output_group(self, d: _Decision) -> tuple[Group | None, int | None]:
        if self.cg is None:
            return None, None
        sid = self.cg.space_ids.get((d.node.output[0], 1))
        return (self.group_of.get(sid), sid) if sid is not None else (None, None)

    def reordered_by(self, d: _Decision) -> str | None:
        """The conv whose split gave ``d``'s output channels a new order (None: the original order)."""
        g, sid = self.output_group(d)
        perm, owner = self.fixed.get(g.id, (None, None)) if g is not None else (None, None)
        if perm is None or np.array_equal(np.argsort(self.cg.unit_index(g, sid))[perm], np.arange(g.size)):
            return None
        return owner

    def claim(self, d: _Decision) -> tuple[np.ndarray | None, str | None]:
        """(output filter order or None for the original, None) to split ``d``; else (None, reason)."""
        contiguous = _runs(d.labels) is not None
        g, sid = self.output_group(d)
        if g is None:
            if contiguous:
                return None, None  # nothing can reorder a channel axis outside every group
            if self.cg is None:
                return None, ("its box groups are not contiguous in filter order, and reordering the output "
                              "channels needs the coupling graph (cg)")
            return None, "its output channel axis is in no channel group of the coupling graph"
        if g.id in self.fixed:
            perm, owner = self.fixed[g.id]
            order = None if perm is None else np.argsort(self.cg.unit_index(g, sid))[perm]
            if _runs(d.labels if order is None else d.labels[order]) is None:
                return None, (f"conv {owner!r} fixed the order of its output channel group, and its box "
                              f"groups are not contiguous in that order")
            return order, None
        if contiguous:
            self.fixed[g.id] = (None, d.conv.key)
            return None, None
        why = self.permutable(g)
        if why is not None:
            return None, f"its output channels cannot be reordered: {why}"
        order = np.argsort(d.labels, kind="stable")
        self.fixed[g.id] = (self.cg.unit_index(g, sid)[order], d.conv.key)
        return order, None

    def permutable(self, g: Group) -> str | None:
        if g.id not in self._why:
            self._why[g.id] = self._permutable(g)
        return self._why[g.id]

    def _permutable(self, g: Group) -> str | None:
        cg = self.cg
        if g.frozen:
            return f"the channel group is frozen ({g.frozen[0]})"
        if g.is_approximate:
            return f"the channel group is approximate ({g.approximate[0]})"
        if g.attention or g.mask_producers:
            return "the channels take part in an activation x activation product"
        units: dict[Pair, np.ndarray] = {}
        tensors: set[str] = set()
        for sid in g.spaces:
            t, ax = cg.space_key[sid]
            u = cg.unit_index(g, sid)
            if cg.space_size[sid] != g.size or len(np.unique(u)) != g.size:
                return f"axis {ax} of '{t}' does not map 1:1 onto the group's {g.size} channels"
            if t in tensors:
                return f"'{t}' has two axes in the group"
            tensors.add(t)
            units[(t, ax)] = u
        for (t, ax), u in units.items():
            why = self._tensor_ok(t, ax, u, units)
            if why is not None:
                return why
        return None

    def _tensor_ok(self, t: str, ax: int, u: np.ndarray, units: dict[Pair, np.ndarray]) -> str | None:
        ix = self.index
        if t in ix.outputs:
            return f"'{t}' is a graph output (its channel order is seen by the caller)"
        if t in ix.inputs:
            return f"'{t}' is a graph input"
        if t in ix.sub_refs:
            return f"'{t}' is read inside a subgraph"
        if ix.is_const(t):
            nodes = ix.readers.get(t, [])
            if len(nodes) != 1:
                return f"constant '{t}' is read by {len(nodes)} nodes"
            if ix.shape(t) != tuple(self.cg.shapes.get(t) or ()):
                return f"constant '{t}' differs from the coupling graph's (was cg built on this model?)"
        elif t in ix.producer:
            nodes = [ix.producer[t], *ix.readers.get(t, [])]
        else:
            return f"'{t}' is not a tensor of the main graph"
        for n in nodes:
            pairs = _counterparts(n, t, ax, self.shapes, self.opset)
            if isinstance(pairs, str):
                return pairs
            for t2, ax2 in pairs:
                other = units.get((t2, ax2))
                if other is not None:
                    if not np.array_equal(other, u):
                        return f"{n.op_type} '{n.name}' ties '{t}' and '{t2}' in another channel order"
                    continue
                d2 = self.shapes.dims(t2)
                if d2 is None or ax2 >= len(d2) or d2[ax2] != 1:  # a static size-1 axis broadcasts
                    return f"{n.op_type} '{n.name}': axis {ax2} of '{t2}' is not in the channel group"
        return None

    def takes(self) -> dict[str, dict[int, np.ndarray]]:
        """``{constant: {axis: new element order}}`` for every reordered group."""
        out: dict[str, dict[int, np.ndarray]] = {}
        for gid, (perm, _) in self.fixed.items():
            if perm is None:
                continue
            g = self.cg.groups[gid]
            for sid in g.spaces:
                t, ax = self.cg.space_key[sid]
                if self.index.is_const(t):
                    out.setdefault(t, {})[ax] = np.argsort(self.cg.unit_index(g, sid))[perm]
        return out


def _check_cg(cg: CouplingGraph, convs: dict[str, StripeConv]) -> None:
    for key, c in convs.items():
        prod = cg.producer_of.get(c.node.output[0])
        if prod is None or prod.op_type != "Conv" or list(prod.input) != list(c.node.input):
            raise UserError(f"the coupling graph was not built on this model (conv {key!r} differs): pass the "
                            f"model the analysis holds (Analysis.model)")


def _decide(model: onnx.ModelProto, plan: StripePlan, cg: CouplingGraph | None,
            split: set[str] | None) -> tuple[list[_Decision], _Orders, _Index]:
    convs = validate_stripes(model, plan)
    if split is not None:
        unknown = sorted(set(split) - set(convs))
        if unknown:
            raise UserError(f"split names convs the stripe plan does not: {', '.join(map(repr, unknown))}")
    if cg is not None:
        _check_cg(cg, convs)
    shapes = _ShapeView(model, cg)
    index = _Index(model)
    orders = _Orders(model, cg, shapes, index)
    pos = {}
    for i, n in enumerate(model.graph.node):
        key = conv_key(n) if n.op_type == "Conv" else None
        if key in convs and key not in pos and n == convs[key].node:
            pos[key] = i
    decisions = []
    for key in sorted(convs, key=lambda k: pos[k]):
        c = convs[key]
        keep = plan.keep[key]
        boxes = filter_boxes(keep)
        distinct, labels = _labels(boxes)
        geom = _geometry(c.node, c.shape, shapes, orders.opset)
        d = _Decision(c, pos[key], keep, geom if isinstance(geom, _Geom) else None, boxes, distinct, labels)
        if isinstance(geom, str):
            d.reason = geom
        elif split is not None and key not in split:
            d.reason = "not in the split set: kept dense, its stripes zeroed"
        else:
            _decide_one(d, orders)
        decisions.append(d)
    for d in decisions:  # a later split may reorder the group of an earlier conv
        d.reordered_by = orders.reordered_by(d)
        d.permuted = d.reordered_by is not None
    return decisions, orders, index


def _decide_one(d: _Decision, orders: _Orders) -> None:
    union = union_box(d.boxes)
    if d.geom.group > 1 or len(d.distinct) == 1:
        note = "grouped conv: one box, the union of its filters' boxes" if len(d.distinct) > 1 else None
        _crop(d, union, note)
        return
    cut = next((r for r in map(d.geom.cut_reason, d.distinct) if r), None)
    if cut is not None:
        _crop(d, union, f"one box (union): {cut}")
        return
    order, why = orders.claim(d)
    if why is not None:
        _crop(d, union, f"one box (union): {why}")
        return
    labels = d.labels if order is None else d.labels[order]
    d.mode, d.order = "split", order
    d.runs = [(d.distinct[lab], start, stop) for lab, start, stop in _runs(labels)]


def _crop(d: _Decision, box: Box, note: str | None) -> None:
    k, k2 = d.conv.shape[2:]
    if box == (0, k - 1, 0, k2 - 1):
        d.reason = f"{note}; it spans the whole kernel" if note else "the kept stripes span the whole kernel"
        return
    cut = d.geom.cut_reason(box)
    if cut is not None:
        d.reason = f"{note}; {cut}" if note else cut
        return
    d.mode, d.runs, d.reason = "crop", [(box, 0, int(d.conv.shape[0]))], note


# ------------------------------------------------------------------------------------------------
# building


def _form(node: onnx.NodeProto, d: _Decision, w: np.ndarray, b: np.ndarray | None, w_base: str,
          taken: set[str], opset: int) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """The nodes and initializers replacing ``node``: [Slices], one Conv per run, [Concat]; ``w`` and
    ``b`` in output order. The last node writes ``node``'s output."""
    x, y = node.input[0], node.output[0]
    base = node.name or y
    attrs = [a for a in node.attribute if a.name not in ("kernel_shape", "pads", "auto_pad")]
    single = len(d.runs) == 1
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    sliced: dict[tuple[int, ...], str] = {}
    outs = []
    for i, (box, start, stop) in enumerate(d.runs):
        pads, cut = d.geom.layout(box)
        xin = x
        if any(cut):
            if cut not in sliced:
                sliced[cut] = _slice(x, cut, f"{base}__slice{len(sliced)}", taken, opset, nodes, inits)
            xin = sliced[cut]
        r0, r1, c0, c1 = box
        tag = "crop" if single else f"box{i}"
        wname = fresh_name(f"{w_base}__{tag}", taken)
        inits.append(numpy_helper.from_array(np.ascontiguousarray(w[start:stop, :, r0:r1 + 1, c0:c1 + 1]), wname))
        ins = [xin, wname]
        if b is not None:
            bname = fresh_name(f"{node.input[2]}__{tag}", taken)
            inits.append(numpy_helper.from_array(np.ascontiguousarray(b[start:stop]), bname))
            ins.append(bname)
        out = y if single else fresh_name(f"{y}__box{i}", taken)
        conv = helper.make_node("Conv", ins, [out], name=node.name if single else fresh_name(f"{base}__box{i}", taken),
                                domain=node.domain)
        conv.attribute.extend(attrs)
        conv.attribute.extend([helper.make_attribute("kernel_shape", [r1 - r0 + 1, c1 - c0 + 1]),
                               helper.make_attribute("pads", list(pads))])
        nodes.append(conv)
        outs.append(out)
    if not single:
        nodes.append(helper.make_node("Concat", outs, [y], name=fresh_name(f"{base}__concat", taken), axis=1))
    return nodes, inits


def _slice(x: str, cut: tuple[int, int, int, int], name: str, taken: set[str], opset: int,
           nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto]) -> str:
    top, left, bottom, right = cut
    axes, starts, ends = [], [], []
    for axis, a, b in ((2, top, bottom), (3, left, right)):
        if a or b:
            axes.append(axis)
            starts.append(a)
            ends.append(-b if b else INT64_MAX)
    out = fresh_name(f"{x}__sliced", taken)
    name = fresh_name(name, taken)
    if opset < 10:
        nodes.append(helper.make_node("Slice", [x], [out], name=name, axes=axes, starts=starts, ends=ends))
        return out
    ins = [x]
    for part, v in (("starts", starts), ("ends", ends), ("axes", axes)):
        n = fresh_name(f"{name}_{part}", taken)
        inits.append(numpy_helper.from_array(np.asarray(v, dtype=np.int64), n))
        ins.append(n)
    nodes.append(helper.make_node("Slice", ins, [out], name=name))
    return out


def _masked(index: _Index, d: _Decision) -> np.ndarray:
    w = np.array(index.value(d.conv.weight_name))
    w[np.broadcast_to(~d.keep[:, None, :, :], w.shape)] = 0
    return w


def _bias_name(node: onnx.NodeProto) -> str | None:
    return node.input[2] if len(node.input) > 2 and node.input[2] else None


def shrink_stripes(model: onnx.ModelProto, plan: StripePlan, cg: CouplingGraph | None = None,
                   split: set[str] | None = None) -> ShrinkResult:
    """A new model in which every planned conv is cropped to its box or split by box groups (see the
    module docstring); ``cg``: the coupling graph of ``model`` (``Analysis.cg`` with
    ``Analysis.model``), needed to reorder channels for a split; ``split``: the conv keys allowed to
    change physically (None: all). The outputs equal ``mask_stripes(model, plan)``'s."""
    decisions, orders, _ = _decide(model, plan, cg, split)
    new = onnx.ModelProto()
    new.CopyFrom(model)
    index = _Index(new)
    opset = default_opset(new) or 1
    take = orders.takes()
    values = {d.conv.weight_name: _masked(index, d) for d in decisions}
    for name, axes in take.items():
        arr = values[name] if name in values else index.value(name)
        for ax, order in sorted(axes.items()):
            arr = np.take(arr, order, axis=ax)
        values[name] = arr
    changes = [f"reordered the channel group of conv {owner!r} ({len(orders.cg.groups[gid].spaces)} spaces)"
               for gid, (perm, owner) in orders.fixed.items() if perm is not None]
    if take:
        changes.append(f"reordered {len(take)} constants: " + ", ".join(sorted(take)[:8]) + (" ..." if len(take) > 8
                                                                                             else ""))
    taken = all_names(new.graph)
    replace: dict[int, list[onnx.NodeProto]] = {}
    removed: set[str] = set()
    for d in decisions:
        if d.mode == "dense":
            continue
        node = new.graph.node[d.pos]
        wname, bname = d.conv.weight_name, _bias_name(node)
        w = values[wname]
        b = None if bname is None else (values[bname] if bname in values else index.value(bname))
        if d.mode == "split":
            ident = np.arange(len(d.labels))
            own = take.get(wname, {}).get(0, ident)
            if not np.array_equal(own, ident if d.order is None else d.order):
                raise RewriteError(f"conv {d.conv.key!r}: its weight was reordered unlike its output channels")
        nodes, inits = _form(node, d, w, b, wname, taken, opset)
        replace[d.pos] = nodes
        new.graph.initializer.extend(inits)
        removed.add(wname)
        if bname is not None and index.n_readers(bname) == 1:
            removed.add(bname)
        changes.append(f"{d.mode} {d.conv.key!r}: " + ", ".join(f"{stop - start}x{list(box)}"
                                                                for box, start, stop in d.runs))
    for name, arr in values.items():
        if name not in removed:
            index.write(name, arr)
    _replace_nodes(new.graph, replace, removed)
    return ShrinkResult(new, [d.record() for d in decisions], tuple(changes))


def _replace_nodes(g: onnx.GraphProto, replace: dict[int, list[onnx.NodeProto]], removed: set[str]) -> None:
    nodes: list[onnx.NodeProto] = []
    for i, n in enumerate(g.node):
        if i in replace:
            nodes.extend(replace[i])
        elif not (n.op_type == "Constant" and n.output and n.output[0] in removed):
            nodes.append(n)
    del g.node[:]
    g.node.extend(nodes)
    inits = [t for t in g.initializer if t.name not in removed]
    del g.initializer[:]
    g.initializer.extend(inits)
    vis = [vi for vi in g.value_info if vi.name not in removed]
    del g.value_info[:]
    g.value_info.extend(vis)


# ------------------------------------------------------------------------------------------------
# micro-models for latency


@dataclass(frozen=True)
class MicroPair:
    """One planned conv cut out: ``dense`` (the masked conv, filters in the shrunk form's output order)
    and ``shrunk`` (its crop or split; None when nothing would change, ``record.reason`` says why),
    both reading one input ``input_name`` of ``input_shape`` and ``dtype``, with equal outputs."""

    key: str
    dense: onnx.ModelProto | None
    shrunk: onnx.ModelProto | None
    input_name: str
    input_shape: tuple[int, ...] | None
    dtype: np.dtype
    record: ShrunkConv


def micro_pairs(model: onnx.ModelProto, plan: StripePlan, cg: CouplingGraph | None = None, batch: int = 1,
                keys: set[str] | None = None) -> dict[str, MicroPair]:
    """``{conv key: MicroPair}`` for every planned conv (or those in ``keys``), in the form
    ``shrink_stripes(model, plan, cg)`` builds with every conv allowed to change; the input's batch
    is ``batch``, its other sizes those shape inference (or ``cg``) gives."""
    decisions, orders, index = _decide(model, plan, cg, None)
    opset = max(default_opset(model) or 1, 10)
    out: dict[str, MicroPair] = {}
    for d in decisions:
        if keys is None or d.conv.key in keys:
            out[d.conv.key] = _micro(model, d, orders.shapes, index, batch, opset)
    return out


def micro_pair(model: onnx.ModelProto, plan: StripePlan, key: str, cg: CouplingGraph | None = None,
               batch: int = 1) -> MicroPair:
    """The :class:`MicroPair` of one planned conv (see :func:`micro_pairs`)."""
    if key not in plan.keep:
        raise UserError(f"stripe plan has no conv {key!r}")
    return micro_pairs(model, plan, cg, batch, {key})[key]


def _micro(model: onnx.ModelProto, d: _Decision, shapes: _ShapeView, index: _Index, batch: int,
           opset: int) -> MicroPair:
    node = d.node
    w = _masked(index, d)
    bname = _bias_name(node)
    b = None if bname is None else np.asarray(index.value(bname))
    if d.order is not None:
        w, b = w[d.order], (None if b is None else b[d.order])
    xd = shapes.dims(node.input[0])
    rec = d.record()
    if xd is None or len(xd) != 4 or any(v is None for v in xd[1:]):
        return MicroPair(d.conv.key, None, None, "X", None, w.dtype, rec)
    shape = (int(batch), *[int(v) for v in xd[1:]])
    elem = helper.np_dtype_to_tensor_dtype(w.dtype)
    y_shape = [shape[0], int(d.conv.shape[0]), *(d.geom.out_hw if d.geom is not None else (None, None))]
    inits = [numpy_helper.from_array(w, "W")] + ([] if b is None else [numpy_helper.from_array(b, "B")])
    conv = helper.make_node("Conv", ["X", "W"] + ([] if b is None else ["B"]), ["Y"], name="conv")
    conv.attribute.extend(node.attribute)

    def wrap(nodes, initializers):
        g = helper.make_graph(nodes, f"stripes_{d.conv.key}", [helper.make_tensor_value_info("X", elem, shape)],
                              [helper.make_tensor_value_info("Y", elem, y_shape)], initializers)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
        m.ir_version = model.ir_version or 8
        return m

    dense = wrap([conv], inits)
    shrunk = None
    if d.mode != "dense":
        nodes, more = _form(conv, d, w, b, "W", {"X", "W", "B", "Y", "conv"}, opset)
        shrunk = wrap(nodes, more)
    return MicroPair(d.conv.key, dense, shrunk, "X", shape, w.dtype, rec)
