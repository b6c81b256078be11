"""Conv and ConvTranspose (1-D/2-D/3-D; dense, grouped and depthwise).

Dense: input channels are a consumer slot of W, output channels a producer slot (with the bias).
Depthwise-like (one input channel per group): each conv group is one unit; ``group`` is rewritten.
Grouped: the same in-group positions are removed from every group (equal counts), ``group`` stays;
or, in the analysis mode of ``--conv-groups whole`` (``AnalysisCtx.conv_groups``), each conv group is
one unit as in the depthwise case (its input and output channels go together, the kernel's in-group
axis stays whole) and ``group`` shrinks. Either way ``group`` is rewritten to the pruned channels over
the pruned in-group width.
"""

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
    Role,
    ShapeOf,
    numel,
    register,
)


def _by_position(ctx: AnalysisCtx, t: str, n: int, g: int, other: str, axis: int) -> None:
    """Grouped convs: element i of the ``n = g*k`` channels of ``t`` (axis 1) is linked to element
    ``i % k`` of (``other``, ``axis``), its position inside its group."""
    idx = np.arange(n)
    ctx.link(t, 1, idx, other, axis, idx % (n // g))


class _Convolution(Handler):
    """What Conv and ConvTranspose share: the batch axis (``channels``), the bias (``bias``), the
    depthwise-like link (``link_groups``), the ``group`` rewrite, MACs and Torch-Pruning's count.
    Subclasses place the channels on the axes of W, whose layout differs."""

    # MACs: |W[1:]| per element of this tensor (Conv: output 0, each output element; ConvTranspose:
    # input 0, each input element is scattered over the kernel)
    macs_per_element_of: ClassVar[str] = "output"

    @staticmethod
    def channels(node: Node, ctx: AnalysisCtx) -> tuple[str, str, str, int, int, int] | None:
        """(x, w, y, group, input channels, output channels) once the batch axis passes through;
        None where a shape is unknown (nothing covered)."""
        x, w, y = node.input[0], node.input[1], node.output[0]
        xs, ys = ctx.shape(x), ctx.shape(y)
        if xs is None or ctx.shape(w) is None or ys is None:
            return None
        ctx.identity(x, 0, y, 0)
        return x, w, y, int(ctx.attr("group") or 1), xs[1], ys[1]

    @staticmethod
    def bias(node: Node, ctx: AnalysisCtx) -> None:
        """The optional bias (input 2) is a param slot of the output channels."""
        b = node.input[2] if len(node.input) > 2 else ""
        if b:
            ctx.slot(b, 0, Role.PARAM)
            ctx.identity(b, 0, node.output[0], 1)

    @staticmethod
    def whole_groups(ctx: AnalysisCtx) -> bool:
        return ctx.conv_groups == "whole"

    @staticmethod
    def link_groups(ctx: AnalysisCtx, x: str, y: str, g: int, cin: int, cout: int) -> None:
        """Each conv group one unit: the ``k = cin/g`` input channels of group j (one, depthwise-like)
        and its ``m = cout/g`` outputs, j*k .. j*k+k-1 and j*m .. j*m+m-1."""
        k, m = cin // g, cout // g
        o = np.arange(cout)
        ctx.link(y, 1, o, x, 1, (o // m) * k)
        if k > 1:
            i = np.arange(cin)
            ctx.link(x, 1, i, x, 1, (i // k) * k)

    def rewrite(self, node: Node, rw: RewriteCtx) -> None:
        """``group``: the pruned input channels (Conv; ConvTranspose: output channels) over the pruned
        in-group width (W's axis 1). Depthwise-like convs and whole conv groups lose groups; grouped
        convs pruned by position keep them (each narrower)."""
        self.rewrite_group(node, rw, node.input[1])

    @staticmethod
    def rewrite_group(node: Node, rw: RewriteCtx, w: str) -> None:
        """The ``group`` rewrite with the kernel ``w`` (QLinearConv and ConvInteger name it elsewhere)."""
        g = int(rw.attr(node, "group") or 1)
        if g <= 1:
            return
        t = node.output[0] if node.op_type == "ConvTranspose" else node.input[0]
        new_c, new_w = rw.new_shape(t), rw.new_shape(w)
        if new_c is None or new_w is None or len(new_w) < 2 or not new_w[1]:
            return
        new_g = int(new_c[1]) // int(new_w[1])
        if new_g != g:
            rw.set_attr(node, "group", new_g)

    def torch_forward(self, node: Node, xs: list, op):
        """Torch forward (``onnxprune.runtime.torch_exec``): explicit zero padding (``pads`` or
        ``auto_pad``), then torch's convolution; ConvTranspose crops its full output instead."""
        return conv_transpose_forward(node, xs, op) if node.op_type == "ConvTranspose" else conv_forward(node, xs, op)

    def macs(self, node: Node, shape_of: ShapeOf, const_of: ConstOf) -> int:
        t = node.output[0] if self.macs_per_element_of == "output" else node.input[0]
        ts, ws = shape_of(t), shape_of(node.input[1])
        if ts is None or ws is None:
            return 0
        return int(np.prod(ts, dtype=np.int64) * np.prod(ws[1:], dtype=np.int64))

    def tp_ops(self, node: Node, shape_of: ShapeOf, const_of: ConstOf, graph: CountGraph) -> int:
        """Torch-Pruning's count: ``N·prod(out spatial)·|W|``, plus a bias add per output element."""
        out, w = shape_of(node.output[0]), shape_of(node.input[1])
        if out is None or w is None:
            return 0
        n = out[0] * numel(out[2:]) * numel(w)
        if len(node.input) > 2 and node.input[2]:
            n += numel(out)
        return n


@register
class Conv(_Convolution):
    """W is [C_out, C_in/group, k...]."""

    op_types = ("Conv",)

    def analyze(self, node: Node, ctx: AnalysisCtx) -> None:
        io = self.channels(node, ctx)
        if io is None:
            return
        x, w, y, g, cin, cout = io
        ctx.slot(w, 0, Role.PRODUCER)
        ctx.identity(w, 0, y, 1)
        self.bias(node, ctx)
        if g == 1:
            ctx.slot(w, 1, Role.CONSUMER)
            ctx.identity(x, 1, w, 1)
        elif cin // g == 1 or self.whole_groups(ctx):
            self.link_groups(ctx, x, y, g, cin, cout)
            if cin // g > 1:
                ctx.freeze(w, 1, f"Conv '{node.name}': in-group input position (--conv-groups whole keeps it)")
        else:
            ctx.slot(w, 1, Role.CONSUMER)
            _by_position(ctx, x, cin, g, w, 1)
            _by_position(ctx, y, cout, g, y, 1)


@register
class ConvTranspose(_Convolution):
    """W is [C_in, C_out/group, k...]."""

    op_types = ("ConvTranspose",)
    macs_per_element_of = "input"

    def analyze(self, node: Node, ctx: AnalysisCtx) -> None:
        io = self.channels(node, ctx)
        if io is None:
            return
        x, w, y, g, cin, cout = io
        ctx.identity(x, 1, w, 0)
        self.bias(node, ctx)
        if g == 1:
            ctx.slot(w, 0, Role.CONSUMER)
            ctx.slot(w, 1, Role.PRODUCER)
            ctx.identity(w, 1, y, 1)
        elif cin // g == 1 or self.whole_groups(ctx):
            ctx.slot(w, 0, Role.PRODUCER)
            self.link_groups(ctx, x, y, g, cin, cout)
            # W axis 1 is the per-group output position: keep it whole
            what = "depthwise kernel axis" if cin // g == 1 else "in-group output position (--conv-groups whole keeps it)"
            ctx.freeze(w, 1, f"ConvTranspose '{node.name}': {what}")
        else:
            ctx.slot(w, 0, Role.CONSUMER)
            ctx.slot(w, 1, Role.PRODUCER)
            _by_position(ctx, x, cin, g, x, 1)
            _by_position(ctx, y, cout, g, w, 1)


# -- torch forwards -------------------------------------------------------------------------------


def _geometry(op, w_shape, n_spatial: int):
    k = list(op.attr("kernel_shape") or w_shape[2:])
    strides = list(op.attr("strides") or [1] * n_spatial)
    dil = list(op.attr("dilations") or [1] * n_spatial)
    return k, strides, dil


def same_pads(in_sizes, k, strides, dil, lower: bool) -> list[int]:
    """``auto_pad`` SAME_UPPER / SAME_LOWER: the output is ceil(in / stride); the odd pixel of the
    total padding goes at the end (UPPER) or the start (LOWER). ONNX order: begins, then ends."""
    begins, ends = [], []
    for n, kk, s, d in zip(in_sizes, k, strides, dil, strict=True):
        out = -(-n // s)
        total = max(0, (out - 1) * s + (kk - 1) * d + 1 - n)
        small, big = total // 2, total - total // 2
        begins.append(big if lower else small)
        ends.append(small if lower else big)
    return begins + ends


def spatial_pads(op, in_sizes, k, strides, dil) -> list[int]:
    """The explicit pads (ONNX order: every begin, then every end) from ``auto_pad`` or ``pads``."""
    n = len(in_sizes)
    auto = op.attr("auto_pad", "NOTSET")
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        return same_pads(in_sizes, k, strides, dil, auto == "SAME_LOWER")
    if auto == "VALID":
        return [0] * (2 * n)
    return list(op.attr("pads") or [0] * (2 * n))


def torch_pad_order(pads: list[int]) -> list[int]:
    """ONNX pads (begins..., ends...) over the last axes -> F.pad's order (last axis first)."""
    n = len(pads) // 2
    out = []
    for i in reversed(range(n)):
        out += [pads[i], pads[i + n]]
    return out


def _operands(xs: list, op, what: str):
    """(x, w, b, spatial rank, kernel, strides, dilations) of a Conv or ConvTranspose."""
    x, w = xs[0], xs[1]
    b = xs[2] if len(xs) > 2 else None
    n = x.dim() - 2
    if n not in (1, 2, 3):
        op.refuse(f"{n}-D {what}")
    return (x, w, b, n, *_geometry(op, w.shape, n))


def conv_forward(node: Node, xs: list, op):
    x, w, b, n, k, strides, dil = _operands(xs, op, "convolution")
    pads = spatial_pads(op, list(x.shape[2:]), k, strides, dil)
    if any(pads):
        x = op.F.pad(x, torch_pad_order(pads))
    conv = (op.F.conv1d, op.F.conv2d, op.F.conv3d)[n - 1]
    return conv(x, w, b, stride=strides, dilation=dil, groups=int(op.attr("group", 1)))


def conv_transpose_forward(node: Node, xs: list, op):
    x, w, b, n, k, strides, dil = _operands(xs, op, "transposed convolution")
    out_pad = list(op.attr("output_padding") or [0] * n)
    full = [(i - 1) * s + (kk - 1) * d + 1 for i, s, kk, d in zip(x.shape[2:], strides, k, dil, strict=True)]
    out_shape = op.attr("output_shape")
    auto = op.attr("auto_pad", "NOTSET")
    if out_shape:
        out_shape = list(out_shape)[-n:]
        total = [f + p - o for f, p, o in zip(full, out_pad, out_shape, strict=True)]
        upper = auto == "SAME_UPPER"
        begins = [t // 2 if upper else t - t // 2 for t in total]
        pads = begins + [t - bb for t, bb in zip(total, begins, strict=True)]
    elif auto in ("SAME_UPPER", "SAME_LOWER"):
        total = [f + p - i * s for f, p, i, s in zip(full, out_pad, x.shape[2:], strides, strict=True)]
        upper = auto == "SAME_UPPER"
        begins = [t // 2 if upper else t - t // 2 for t in total]
        pads = begins + [t - bb for t, bb in zip(total, begins, strict=True)]
    elif auto == "VALID":
        pads = [0] * (2 * n)
    else:
        pads = list(op.attr("pads") or [0] * (2 * n))
    conv = (op.F.conv_transpose1d, op.F.conv_transpose2d, op.F.conv_transpose3d)[n - 1]
    y = conv(x, w, None, stride=strides, dilation=dil, groups=int(op.attr("group", 1)))
    # output_padding adds rows no input reaches (zeros) at the end; pads crop (negative: pad zeros)
    crop = [-p for p in pads[:n]] + [op_ - p for op_, p in zip(out_pad, pads[n:], strict=True)]
    if any(crop):
        y = op.F.pad(y, torch_pad_order(crop))
    if b is not None:
        y = y + b.reshape((1, -1) + (1,) * n)
    return y
