"""Resize/Upsample and Pad: axes whose size (or padding) does not change pass through; a
constant `sizes` input is rewritten when its channel entry changes."""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from onnxprune.analysis.contract import (
    AnalysisCtx,
    ConstOf,
    CountGraph,
    Handler,
    Node,
    RewriteCtx,
    ShapeOf,
    numel,
    register,
)


@register
class Resize(Handler):
    """Resize: input 3 (``sizes``) only sets the output shape. Torch-Pruning counts the output
    elements of one sample (nn.Upsample)."""

    op_types = ("Resize",)
    sizes_input: ClassVar[int | None] = 3  # the input that gives the output sizes
    shape_sinks = frozenset({3})

    def _sizes(self, node: Node) -> str:
        i = self.sizes_input
        return node.input[i] if i is not None and len(node.input) > i else ""

    def analyze(self, node: Node, ctx: AnalysisCtx) -> None:
        x, y = node.input[0], node.output[0]
        xs, ys = ctx.shape(x), ctx.shape(y)
        if xs is None or ys is None:
            return
        sizes_t = self._sizes(node)
        for t in node.input[1:]:
            ctx.cover(t)
        for ax in range(len(xs)):
            if xs[ax] == ys[ax]:
                if sizes_t and ctx.const(sizes_t) is None and ctx.has_space(x, ax):
                    ctx.freeze(x, ax, f"Resize '{node.name}': sizes are computed")
                    ctx.freeze(y, ax, f"Resize '{node.name}': sizes are computed")
                    continue
                ctx.identity(x, ax, y, ax)

    def rewrite(self, node: Node, rw: RewriteCtx) -> None:
        sizes_t = self._sizes(node)
        if not sizes_t:
            return
        old = rw.const(sizes_t)
        if old is None:
            return
        new = np.array(rw.new_shape(node.output[0]), dtype=old.dtype)
        axes = rw.attr(node, "axes")
        if axes:
            new = new[list(axes)]
        if not np.array_equal(new, old):
            rw.set_input_const(node, 3, new)

    def tp_ops(self, node: Node, shape_of: ShapeOf, const_of: ConstOf, graph: CountGraph) -> int:
        out = shape_of(node.output[0])
        return numel(out[1:]) if out else 0


@register
class Upsample(Resize):
    """Upsample (deprecated at opset 10): scales only."""

    op_types = ("Upsample",)
    sizes_input = None
    shape_sinks = frozenset()


@register
class Pad11(Handler):
    """Pad with ``pads`` as input 1 (opset 11); constant pads carry the unpadded axes."""

    op_types = ("Pad",)
    since = 11
    shape_sinks = frozenset({1})

    def analyze(self, node: Node, ctx: AnalysisCtx) -> None:
        x, y = node.input[0], node.output[0]
        xs, ys = ctx.shape(x), ctx.shape(y)
        if xs is None or ys is None:
            return
        for t in node.input[1:]:
            ctx.cover(t)
        r = len(xs)
        pads = ctx.value(node.input[1]) if len(node.input) > 1 and node.input[1] else None
        if pads is None:
            return
        pads = [int(p) for p in np.asarray(pads).reshape(-1)]
        axes = self.axes(node, ctx, r)
        if axes is None:
            return
        n = len(axes)
        padded = {ax for i, ax in enumerate(axes) if pads[i] != 0 or pads[i + n] != 0}
        for ax in range(r):
            if ax not in padded and xs[ax] == ys[ax]:
                ctx.identity(x, ax, y, ax)

    def axes(self, node: Node, ctx: AnalysisCtx, rank: int) -> list[int] | None:
        """The axes ``pads`` refers to (None: not constant)."""
        return list(range(rank))


@register
class Pad18(Pad11):
    """Opset 18: optional input 3 names the padded axes."""

    since = 18

    def axes(self, node: Node, ctx: AnalysisCtx, rank: int) -> list[int] | None:
        if len(node.input) > 3 and node.input[3]:
            a = ctx.value(node.input[3])
            if a is None:
                return None
            return [int(v) + rank if int(v) < 0 else int(v) for v in a.reshape(-1)]
        return list(range(rank))
