"""Ops that read shapes or index tensors: Shape and Size only read the (new) sizes at run time,
so they carry every axis of their input passively; Gather, Expand and Tile carry the axes they do
not touch."""

from __future__ import annotations

import numpy as np
import onnx
from onnxprune.handlers.reshape import rewrite_target

from onnxprune.analysis.contract import AnalysisCtx, Handler, Node, RewriteCtx, Role, register


@register
class Shape1(Handler):
    """Shape (every axis, below opset 15) and Size."""

    op_types = ("Shape", "Size")

    def torch_forward(self, node: Node, xs: list, op):
        x = xs[0]
        if node.op_type == "Size":
            return op.torch.tensor(x.numel(), dtype=op.torch.int64, device=x.device)
        start, end = self.torch_range(op)
        return op.torch.tensor(list(x.shape)[start:end], dtype=op.torch.int64, device=x.device)

    def torch_range(self, op) -> tuple[int, int | None]:
        return 0, None

    def analyze(self, node: Node, ctx: AnalysisCtx) -> None:
        """Sizes that reach run-time arithmetic must not change: the axes this node's value reads
        (through Gather/Slice with constant indices, else all of them) are frozen; the others are
        carried passively. Static shape computations were already folded into constants."""
        x = node.input[0]
        r = ctx.rank(x)
        if r is None:
            return
        ctx.cover(x)
        if _only_shapes(ctx, node.output[0]):
            return  # sizes only shape other tensors: the rewrite's shape check covers that
        read = set(range(r)) if node.op_type == "Size" else self._read_axes(node, ctx, r)
        for ax in sorted(read):
            if ctx.has_space(x, ax):
                ctx.freeze(x, ax, f"{node.op_type} '{node.name}' reads the size of axis {ax} at run time")

    def _range(self, ctx: AnalysisCtx) -> tuple[int, int | None]:
        """(start, end) of the axes whose sizes the value holds (end None: to the last)."""
        return 0, None

    def _read_axes(self, node: Node, ctx: AnalysisCtx, r: int) -> set[int]:
        start, end = self._range(ctx)
        start = start + r if start < 0 else start
        end = r if end is None else (int(end) + r if int(end) < 0 else int(end))
        axes = list(range(max(0, start), min(r, end)))
        read: set[int] = set()
        for c in ctx.consumers(node.output[0]):
            if c.op_type == "Gather" and int(ctx.attr("axis", c) or 0) == 0:
                idx = ctx.value(c.input[1])
                if idx is not None:
                    read.update(axes[int(i)] for i in np.asarray(idx).reshape(-1) if -len(axes) <= int(i) < len(axes))
                    continue
            if c.op_type == "Slice" and c.input[0] == node.output[0]:
                st = ctx.value(c.input[1]) if len(c.input) > 1 else None
                en = ctx.value(c.input[2]) if len(c.input) > 2 else None
                ok_axes = len(c.input) <= 3 or not c.input[3] or ctx.value(c.input[3]) is not None
                steps_ok = len(c.input) <= 4 or not c.input[4] or ctx.value(c.input[4]) is not None
                if st is not None and en is not None and ok_axes and steps_ok:
                    sl = slice(int(np.asarray(st).reshape(-1)[0]), int(np.asarray(en).reshape(-1)[0]))
                    read.update(axes[sl])
                    continue
            return set(axes)
        return read


@register
class Shape15(Shape1):
    """Shape with ``start`` and ``end`` (opset 15): the value holds the sizes of those axes only."""

    op_types = ("Shape",)
    since = 15

    def _range(self, ctx: AnalysisCtx) -> tuple[int, int | None]:
        end = ctx.attr("end")
        return int(ctx.attr("start") or 0), None if end is None else int(end)

    def torch_range(self, op) -> tuple[int, int | None]:
        end = op.attr("end")
        return int(op.attr("start", 0) or 0), None if end is None else int(end)


def _only_shapes(ctx: AnalysisCtx, t: str, depth: int = 0) -> bool:
    """True if value ``t`` (derived from a Shape) only ever sets shapes or indexes, never data: it
    reaches only ``shape_sinks`` inputs, through integer ``shape_arith`` ops."""
    if depth > 32:
        return False
    if ctx.is_graph_output(t):
        return False
    for c in ctx.consumers(t):
        idxs = [i for i, n in enumerate(c.input) if n == t]
        h = ctx.handler_of(c)
        if all(i in h.shape_sinks for i in idxs):
            continue
        if h.shape_arith and all(_is_int(ctx, o) for o in c.output if o):
            if all(_only_shapes(ctx, o, depth + 1) for o in c.output if o):
                continue
        return False
    return True


def _is_int(ctx: AnalysisCtx, t: str) -> bool:
    return ctx.elem_type(t) in (onnx.TensorProto.INT64, onnx.TensorProto.INT32)


@register
class ConstantOfShape(Handler):
    """A tensor made from a shape (input 0); the output is not carried (its channel spaces stay
    frozen)."""

    op_types = ("ConstantOfShape",)
    shape_sinks = frozenset({0})

    def torch_forward(self, node: Node, xs: list, op):
        shape = op.ints(xs[0], "shape")
        value = op.tensor_attr("value")
        if value is None:
            value = op.tensor(np.zeros(1, dtype=np.float32))
        return value.reshape(()).expand(shape).clone()

    def analyze(self, node: Node, ctx: AnalysisCtx) -> None:
        for t in node.input:
            ctx.cover(t)


@register
class Range(ConstantOfShape):
    """start, limit, delta: scalars that only set the output's length and values."""

    op_types = ("Range",)
    shape_sinks = frozenset({0, 1, 2})

    def torch_forward(self, node: Node, xs: list, op):
        start, limit, delta = xs
        if any(t.requires_grad for t in xs):
            op.refuse("its start, limit or delta carries a gradient")
        n = max(int(np.ceil((limit.item() - start.item()) / delta.item())), 0)
        return start + op.torch.arange(n, device=start.device).to(start.dtype) * delta


@register
class NonZero(ConstantOfShape):
    op_types = ("NonZero",)
    shape_sinks = frozenset()

    def torch_forward(self, node: Node, xs: list, op):
        return op.torch.nonzero(xs[0]).T.contiguous()


@register
class OneHot(Handler):
    """Not followed (a barrier); ``depth`` (input 1) only sets the output's size."""

    op_types = ("OneHot",)
    since = 9
    follows_channels = False
    shape_sinks = frozenset({1})

    def torch_forward(self, node: Node, xs: list, op):
        indices, depth_t, values = xs
        depth = int(op.floats(depth_t, "depth")[0])
        axis = int(op.attr("axis", -1))
        idx = indices.long()
        idx = op.torch.where(idx < 0, idx + depth, idx)
        valid = (idx >= 0) & (idx < depth)
        hot = op.F.one_hot(op.torch.where(valid, idx, 0), depth) * valid.unsqueeze(-1)
        out = op.torch.where(hot.bool(), values[1], values[0])
        r = out.dim()
        axis = axis + r if axis < 0 else axis
        return out.movedim(-1, axis)


@register
class Gather(Handler):
    op_types = ("Gather",)
    moves_values = True
    keeps_zeros = True
    carries_tensor = True
    shape_arith = True

    def torch_forward(self, node: Node, xs: list, op):
        """Negative indices count from the end of the axis."""
        data, idx = xs
        axis = int(op.attr("axis", 0) or 0)
        axis = axis + data.dim() if axis < 0 else axis
        n = data.shape[axis]
        flat = idx.reshape(-1).long()
        flat = op.torch.where(flat < 0, flat + n, flat)
        out = data.index_select(axis, flat)
        return out.reshape(tuple(data.shape[:axis]) + tuple(idx.shape) + tuple(data.shape[axis + 1:]))

    def analyze(self, node: Node, ctx: AnalysisCtx) -> None:
        data, idx, y = node.input[0], node.input[1], node.output[0]
        ds, is_, ys = ctx.shape(data), ctx.shape(idx), ctx.shape(y)
        if ds is None or is_ is None or ys is None:
            return
        r = len(ds)
        axis = int(ctx.attr("axis") or 0)
        axis = axis + r if axis < 0 else axis
        ctx.cover(idx)
        q = len(is_)
        for ax in range(r):
            if ax < axis:
                ctx.identity(data, ax, y, ax)
            elif ax > axis:
                ctx.identity(data, ax, y, ax - 1 + q)
        if ctx.const_source(data) is not None:
            for ax in range(r):
                if ax != axis and ctx.has_space(data, ax):
                    ctx.slot(data, ax, Role.PARAM)
        # the gathered axis is carried only for constant, distinct indices along one index axis
        # (a channel subset or permutation): output element j is data element indices[j], and the
        # rewrite renumbers the indices; anything else leaves the axis frozen
        sel = _selection(ctx.value(idx), ds[axis])
        if sel is not None and ctx.has_space(data, axis):
            k, values = sel
            if ctx.has_space(y, axis + k):
                ctx.link(y, axis + k, np.arange(len(values)), data, axis, values)

    def rewrite(self, node: Node, rw: RewriteCtx) -> None:
        data, idx = node.input[0], node.input[1]
        r = len(rw.old_shape(data))
        axis = int(rw.attr(node, "axis") or 0)
        axis = axis + r if axis < 0 else axis
        if rw.old_shape(data)[axis] == rw.new_shape(data)[axis]:
            return
        old = rw.value(idx)
        k, values = _selection(old, rw.old_shape(data)[axis])
        kept_out = rw.kept(node.output[0], axis + k)
        new_vals = np.searchsorted(rw.kept(data, axis), values[kept_out])
        shape = list(np.shape(old))
        shape[k] = len(new_vals)
        rw.set_input_const(node, 1, new_vals.astype(old.dtype).reshape(shape))


def _selection(indices, n: int):
    """(index axis, normalized values) for constant indices that are distinct along one axis."""
    if indices is None or np.ndim(indices) == 0:
        return None
    shape = np.shape(indices)
    big = [i for i, d in enumerate(shape) if d != 1]
    if len(big) > 1:
        return None
    k = big[0] if big else 0
    values = np.asarray(indices).reshape(-1).astype(np.int64)
    values = np.where(values < 0, values + n, values)
    if values.size == 0 or len(np.unique(values)) != values.size or values.min() < 0 or values.max() >= n:
        return None
    return k, values


@register
class Expand(Handler):
    op_types = ("Expand",)
    moves_values = True
    keeps_zeros = True
    shape_sinks = frozenset({1})

    def torch_forward(self, node: Node, xs: list, op):
        """Bidirectional broadcast of the input and the shape."""
        x = xs[0]
        shape = op.torch.broadcast_shapes(tuple(x.shape), tuple(op.ints(xs[1], "shape")))
        return x.expand(shape)

    def analyze(self, node: Node, ctx: AnalysisCtx) -> None:
        """Axes the input carries are identities. An axis the target broadcasts from size 1 (or
        creates) holds copies of one value (GQA's ``repeat_kv``: KV heads repeated for the query heads
        of their group): removing copies is exact, so it is a channel space of kind "repeat" where its
        target entry is a constant the rewrite can set (a computed entry leaves it frozen)."""
        x, y = node.input[0], node.output[0]
        xs, ys = ctx.shape(x), ctx.shape(y)
        if xs is None or ys is None:
            return
        ctx.cover(node.input[1])
        R, r = len(ys), len(xs)
        for j in range(r):
            if xs[j] == ys[j + R - r]:
                ctx.identity(x, j, y, j + R - r)
            else:
                ctx.cover(x, j)
        for oy in range(R):
            j = oy - (R - r)
            if (j < 0 or xs[j] == 1) and ys[oy] > 1 and const_entry(ctx, node.input[1], oy - R):
                ctx.cover(y, oy)
                ctx.mark_repeat(y, oy)

    def rewrite(self, node: Node, rw: RewriteCtx) -> None:
        # an entry that broadcast a channel axis becomes 1: the input's own size then wins; an entry
        # that made copies of a size-1 axis (a "repeat" space) becomes the number of copies kept
        xs, ys = rw.old_shape(node.input[0]), rw.old_shape(node.output[0])
        off = len(ys) - len(xs)

        def entry(pos, cur, n):
            j = pos - off
            if j < 0 or xs[j] == 1:
                return n
            return 1 if cur != 1 else None

        rewrite_target(rw, node, 1, entry)


def const_entry(ctx: AnalysisCtx, t: str, pos: int) -> bool:
    """Whether entry ``pos`` (negative: from the end) of the 1-D shape vector ``t`` is a constant the
    rewrite can set: ``t`` a constant, or a Concat (through Cast/Identity) whose part at ``pos`` is one."""
    for _ in range(8):
        if ctx.value(t) is not None:
            v = ctx.value(t).reshape(-1)
            return -v.size <= pos < 0
        p = ctx.producer(t)
        if p is None or p.op_type not in ("Cast", "Identity"):
            break
        t = p.input[0]
    p = ctx.producer(t)
    if p is None or p.op_type != "Concat":
        return False
    parts = []
    for part in p.input:
        s = ctx.shape(part)
        if s is None or len(s) != 1:
            return False
        parts.extend([part] * s[0])
    if not -len(parts) <= pos < 0:
        return False
    return ctx.value(parts[pos]) is not None


@register
class Tile(Handler):
    op_types = ("Tile",)
    keeps_zeros = True
    shape_sinks = frozenset({1})

    def torch_forward(self, node: Node, xs: list, op):
        return xs[0].repeat(op.ints(xs[1], "repeats"))

    def analyze(self, node: Node, ctx: AnalysisCtx) -> None:
        x, y = node.input[0], node.output[0]
        xs = ctx.shape(x)
        reps = ctx.value(node.input[1])
        ctx.cover(node.input[1])
        if xs is None or reps is None:
            return
        for ax, rep in enumerate(np.asarray(reps).reshape(-1)):
            if int(rep) == 1:
                ctx.identity(x, ax, y, ax)
