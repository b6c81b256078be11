"""Conv and ConvTranspose (1-D/2-D/3-D; dense, grouped and depthwise).

Dense: input channels are a consumer slot of W, output channels a producer slot (with the bias).
Depthwise-like (one input channel per group): each conv group is one unit; ``group`` is rewritten.
Grouped: the same in-group positions are removed from every group (equal counts), ``group`` stays.
"""

from __future__ import annotations

import numpy as np

from onnxprune.analysis.contract import (
    AnalysisCtx,
    ConstOf,
    CountGraph,
    Handler,
    Node,
    RewriteCtx,
    Role,
    ShapeOf,
    numel,
    register,
)


def _group_blocks(n: int, g: int) -> tuple[np.ndarray, np.ndarray]:
    """For a space of n = g*k elements: (element index, its position inside its group)."""
    k = n // g
    idx = np.arange(n)
    return idx, idx % k


def rewrite_group(node: Node, rw: RewriteCtx) -> None:
    """Depthwise-like convs (one input channel per group) lose whole groups: ``group`` follows the
    input channel count. Grouped convs keep their groups (same in-group positions removed)."""
    g = int(rw.attr(node, "group") or 1)
    x = node.input[0]
    if g > 1 and rw.old_shape(x)[1] // g == 1:
        rw.set_attr(node, "group", int(rw.new_shape(x)[1]))


def tp_conv(node: Node, shape_of: ShapeOf) -> int:
    """Torch-Pruning count of Conv and ConvTranspose: ``N·prod(out spatial)·|W|``, plus a bias add
    per output element."""
    out, w = shape_of(node.output[0]), shape_of(node.input[1])
    if out is None or w is None:
        return 0
    n = out[0] * numel(out[2:]) * numel(w)
    if len(node.input) > 2 and node.input[2]:
        n += numel(out)
    return n


@register
class Conv(Handler):
    op_types = ("Conv",)

    def analyze(self, node: Node, ctx: AnalysisCtx) -> None:
        x, w = node.input[0], node.input[1]
        b = node.input[2] if len(node.input) > 2 else ""
        y = node.output[0]
        xs, ws, ys = ctx.shape(x), ctx.shape(w), ctx.shape(y)
        if xs is None or ws is None or ys is None:
            return
        g = int(ctx.attr("group") or 1)
        cin, cout = xs[1], ys[1]
        ctx.identity(x, 0, y, 0)
        ctx.slot(w, 0, Role.PRODUCER)
        ctx.identity(w, 0, y, 1)
        if b:
            ctx.slot(b, 0, Role.PARAM)
            ctx.identity(b, 0, y, 1)
        if g == 1:
            ctx.slot(w, 1, Role.CONSUMER)
            ctx.identity(x, 1, w, 1)
        elif cin // g == 1:
            # depthwise-like: input channel c owns outputs c*m .. c*m+m-1
            m = cout // g
            o = np.arange(cout)
            ctx.link(y, 1, o, x, 1, o // m)
        else:
            ctx.slot(w, 1, Role.CONSUMER)
            idx, pos = _group_blocks(cin, g)
            ctx.link(x, 1, idx, w, 1, pos)
            oidx, opos = _group_blocks(cout, g)
            ctx.link(y, 1, oidx, y, 1, opos)

    def rewrite(self, node: Node, rw: RewriteCtx) -> None:
        rewrite_group(node, rw)

    def macs(self, node: Node, shape_of: ShapeOf, const_of: ConstOf) -> int:
        ys, ws = shape_of(node.output[0]), shape_of(node.input[1])
        if ys is None or ws is None:
            return 0
        return int(np.prod(ys, dtype=np.int64) * np.prod(ws[1:], dtype=np.int64))


    def tp_ops(self, node: Node, shape_of: ShapeOf, const_of: ConstOf, graph: CountGraph) -> int:
        return tp_conv(node, shape_of)

@register
class ConvTranspose(Handler):
    op_types = ("ConvTranspose",)

    def analyze(self, node: Node, ctx: AnalysisCtx) -> None:
        x, w = node.input[0], node.input[1]
        b = node.input[2] if len(node.input) > 2 else ""
        y = node.output[0]
        xs, ws, ys = ctx.shape(x), ctx.shape(w), ctx.shape(y)
        if xs is None or ws is None or ys is None:
            return
        g = int(ctx.attr("group") or 1)
        cin, cout = xs[1], ys[1]
        ctx.identity(x, 0, y, 0)
        ctx.identity(x, 1, w, 0)
        if b:
            ctx.slot(b, 0, Role.PARAM)
            ctx.identity(b, 0, y, 1)
        if g == 1:
            ctx.slot(w, 0, Role.CONSUMER)
            ctx.slot(w, 1, Role.PRODUCER)
            ctx.identity(w, 1, y, 1)
        elif cin // g == 1:
            ctx.slot(w, 0, Role.PRODUCER)
            m = cout // g
            o = np.arange(cout)
            ctx.link(y, 1, o, x, 1, o // m)
            # W axis 1 is the per-group output position: keep it whole
            ctx.freeze(w, 1, f"ConvTranspose '{node.name}': depthwise kernel axis")
        else:
            ctx.slot(w, 0, Role.CONSUMER)
            ctx.slot(w, 1, Role.PRODUCER)
            idx, pos = _group_blocks(cin, g)
            ctx.link(x, 1, idx, x, 1, pos)
            oidx, opos = _group_blocks(cout, g)
            ctx.link(y, 1, oidx, w, 1, opos)

    def rewrite(self, node: Node, rw: RewriteCtx) -> None:
        rewrite_group(node, rw)

    def macs(self, node: Node, shape_of: ShapeOf, const_of: ConstOf) -> int:
        xs, ws = shape_of(node.input[0]), shape_of(node.input[1])
        if xs is None or ws is None:
            return 0
        return int(np.prod(xs, dtype=np.int64) * np.prod(ws[1:], dtype=np.int64))

    def tp_ops(self, node: Node, shape_of: ShapeOf, const_of: ConstOf, graph: CountGraph) -> int:
        return tp_conv(node, shape_of)
