"""Concat, Split and Slice: offsets along one axis, identity on the others.
Split sizes and Slice bounds are rewritten from the kept counts."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from onnxprune.analysis.contract import AnalysisCtx, Handler, Node, RewriteCtx, register


def _norm(axis: int, r: int) -> int:
    return axis + r if axis < 0 else axis


def link_parts(node: Node, ctx: AnalysisCtx, whole: str, parts: Sequence[str],
               default_axis: int | None = None) -> bool:
    """Concat and Split: ``parts`` lie one after the other along axis ``axis`` (the attribute, else
    ``default_axis``) of ``whole``: a part's elements are linked at its offset where either side has a
    space there, every other axis is the same. Stops at the first part of unknown shape; False where
    the shape of ``whole`` is unknown (nothing covered)."""
    ws = ctx.shape(whole)
    if ws is None:
        return False
    r = len(ws)
    a = ctx.attr("axis")
    axis = _norm(int(default_axis if a is None else a), r)
    off = 0
    for t in parts:
        s = ctx.shape(t)
        if s is None:
            return True
        for ax in range(r):
            if ax != axis:
                ctx.identity(t, ax, whole, ax)
            elif ctx.has_space(t, ax) or ctx.has_space(whole, ax):
                i = np.arange(s[ax])
                ctx.link(t, ax, i, whole, ax, off + i)
            else:
                ctx.cover(t, ax)
        off += s[axis]
    return True


@register
class Concat(Handler):
    op_types = ("Concat",)
    shape_arith = True

    def analyze(self, node: Node, ctx: AnalysisCtx) -> None:
        link_parts(node, ctx, node.output[0], node.input)  # ``axis`` is required

    def torch_forward(self, node: Node, xs: list, op):
        return op.torch.cat([x for x in xs if x is not None], dim=int(op.attr("axis")))


@register
class Split1(Handler):
    """Split; the sizes are the ``split`` attribute (opset 1-12)."""

    op_types = ("Split",)
    moves_values = True
    carries_tensor = True

    def analyze(self, node: Node, ctx: AnalysisCtx) -> None:
        if link_parts(node, ctx, node.input[0], node.output, default_axis=0):
            for t in node.input[1:]:
                ctx.cover(t)  # the sizes

    def rewrite(self, node: Node, rw: RewriteCtx) -> None:
        x = node.input[0]
        r = len(rw.old_shape(x))
        axis = _norm(int(rw.attr(node, "axis") or 0), r)
        old = [rw.old_shape(y)[axis] for y in node.output]
        new = [rw.new_shape(y)[axis] for y in node.output]
        if old != new:
            self._set_sizes(node, rw, np.array(new, dtype=np.int64))

    def _set_sizes(self, node: Node, rw: RewriteCtx, sizes: np.ndarray) -> None:
        rw.set_attr(node, "split", [int(v) for v in sizes])

    def torch_forward(self, node: Node, xs: list, op):
        x = xs[0]
        axis = _norm(int(op.attr("axis", 0) or 0), x.dim())
        sizes = self.torch_sizes(xs, op)
        n = x.shape[axis]
        k = len(node.output)
        if sizes is None:
            if n % k:
                op.refuse(f"axis of size {n} does not split into {k} equal parts")
            sizes = [n // k] * k
        return list(op.torch.split(x, sizes, dim=axis))

    def torch_sizes(self, xs: list, op) -> list[int] | None:
        """The sizes of the parts (None: equal parts); opset 1 also took them as input 1."""
        if len(xs) > 1 and xs[1] is not None:
            return op.ints(xs[1], "split")
        split = op.attr("split")
        return list(split) if split else None


@register
class Split13(Split1):
    """The sizes are input 1 (opset 13; ``num_outputs`` instead of sizes is opset 18)."""

    since = 13
    shape_sinks = frozenset({1})

    def torch_sizes(self, xs: list, op) -> list[int] | None:
        if len(xs) > 1 and xs[1] is not None:
            return op.ints(xs[1], "split")
        k = op.attr("num_outputs")  # opset 18: the last part may be smaller
        if k:
            n = int(xs[0].shape[_norm(int(op.attr("axis", 0) or 0), xs[0].dim())])
            size = -(-n // int(k))
            return [min(size, n - i * size) for i in range(int(k))]
        return None

    def _set_sizes(self, node: Node, rw: RewriteCtx, sizes: np.ndarray) -> None:
        rw.remove_attr(node, "num_outputs")
        if len(node.input) > 1 and node.input[1]:
            rw.set_input_const(node, 1, sizes)
        else:
            rw.add_input_const(node, 1, sizes)


@register
class Slice(Handler):
    op_types = ("Slice",)
    since = 10
    moves_values = True
    keeps_zeros = True
    carries_tensor = True
    shape_arith = True
    shape_sinks = frozenset({1, 2, 3, 4})

    def analyze(self, node: Node, ctx: AnalysisCtx) -> None:
        x, y = node.input[0], node.output[0]
        xs, ys = ctx.shape(x), ctx.shape(y)
        if xs is None or ys is None:
            return
        r = len(xs)
        for t in node.input[1:]:
            ctx.cover(t)
        vals = [ctx.value(t) if t else None for t in node.input[1:5]]
        while len(vals) < 4:
            vals.append(None)
        starts, ends, axes, steps = vals
        if starts is None or ends is None or (len(node.input) > 3 and node.input[3] and axes is None) \
                or (len(node.input) > 4 and node.input[4] and steps is None):
            # can't tell which axes are sliced: nothing covered, all spaces frozen by the coverage rule
            return
        starts, ends = starts.reshape(-1), ends.reshape(-1)
        axes = list(range(len(starts))) if axes is None else [_norm(int(a), r) for a in axes.reshape(-1)]
        steps = np.ones(len(starts), dtype=np.int64) if steps is None else steps.reshape(-1)
        sliced = {}
        for k, ax in enumerate(axes):
            st, en, sp = int(starts[k]), int(ends[k]), int(steps[k])
            s0, _, _ = slice(st, en, sp).indices(xs[ax])
            sliced[ax] = (s0, sp)
        for ax in range(r):
            if ax not in sliced:
                ctx.identity(x, ax, y, ax)
                continue
            s0, sp = sliced[ax]
            if sp != 1:
                continue  # strided slice of an axis: not carried
            if ys[ax] == xs[ax]:
                ctx.identity(x, ax, y, ax)
            elif ctx.has_space(x, ax) and ctx.has_space(y, ax):
                i = np.arange(ys[ax])
                ctx.link(y, ax, i, x, ax, s0 + i)
            elif ctx.has_space(x, ax):
                ctx.cover(y, ax)  # a single index out of a channel axis: not carried

    def torch_forward(self, node: Node, xs: list, op):
        """Python's slice semantics (which the spec's clamping follows); negative steps by indices."""
        x = xs[0]
        starts, ends = op.ints(xs[1], "starts"), op.ints(xs[2], "ends")
        axes = op.ints(xs[3], "axes") if len(xs) > 3 and xs[3] is not None else list(range(len(starts)))
        steps = op.ints(xs[4], "steps") if len(xs) > 4 and xs[4] is not None else [1] * len(starts)
        for st, en, ax, sp in zip(starts, ends, axes, steps, strict=True):
            ax = _norm(ax, x.dim())
            if sp == 0:
                op.refuse("a step of 0")
            lo, hi, sp = slice(st, en, sp).indices(int(x.shape[ax]))
            if sp > 0:
                index = [slice(None)] * ax + [slice(lo, hi, sp)]
                x = x[tuple(index)]
            else:
                idx = op.torch.arange(lo, hi, sp, device=x.device)
                x = x.index_select(ax, idx)
        return x

    def rewrite(self, node: Node, rw: RewriteCtx) -> None:
        x, y = node.input[0], node.output[0]
        if rw.old_shape(x) == rw.new_shape(x):
            return
        r = len(rw.old_shape(x))
        starts = rw.value(node.input[1]).reshape(-1).copy()
        ends = rw.value(node.input[2]).reshape(-1).copy()
        axes_t = node.input[3] if len(node.input) > 3 and node.input[3] else ""
        axes = list(range(len(starts))) if not axes_t else [_norm(int(a), r) for a in rw.value(axes_t).reshape(-1)]
        changed = False
        for k, ax in enumerate(axes):
            old_in = rw.old_shape(x)[ax]
            if rw.new_shape(x)[ax] == old_in:
                continue
            s0, _, _ = slice(int(starts[k]), int(ends[k]), 1).indices(old_in)
            kept_in = rw.kept(x, ax)
            new_start = int(np.searchsorted(kept_in, s0))
            new_end = new_start + rw.new_shape(y)[ax]
            starts[k], ends[k] = new_start, new_end
            changed = True
        if changed:
            dtype = rw.value(node.input[1]).dtype  # int32 or int64, the same for every index input
            rw.set_input_const(node, 1, starts.astype(dtype))
            rw.set_input_const(node, 2, ends.astype(dtype))
            if axes_t and rw.const(axes_t) is None:
                rw.set_input_const(node, 3, rw.value(axes_t).astype(dtype))
            if len(node.input) > 4 and node.input[4] and rw.const(node.input[4]) is None:
                rw.set_input_const(node, 4, rw.value(node.input[4]).astype(dtype))
