"""Normalizations. BatchNormalization and InstanceNormalization are per channel (exact);
LayerNormalization over a channel axis mixes channels without weights (approximate), and so do
Softmax and LogSoftmax over theirs. GroupNormalization is not followed (a barrier); its handler
only declares Torch-Pruning's count. Torch-Pruning counts every normalization 2 per input element."""

from __future__ import annotations

import numpy as np

from onnxprune.analysis.contract import AnalysisCtx, Handler, Node, Role, register


def _carry_all(node: Node, ctx: AnalysisCtx) -> int | None:
    """Every axis of input 0 is the same axis of output 0; returns the rank (None: unknown, nothing
    carried)."""
    x, y = node.input[0], node.output[0]
    r = ctx.rank(x)
    if r is None:
        return None
    for ax in range(r):
        ctx.identity(x, ax, y, ax)
    return r


def _axis(ctx: AnalysisCtx, rank: int) -> int:
    """The ``axis`` attribute (its schema default, else -1), counted from the front."""
    axis = ctx.attr("axis")
    axis = int(axis if axis is not None else -1)
    return axis + rank if axis < 0 else axis


@register
class ChannelNormalization(Handler):
    """BatchNormalization (scale, bias, mean, var) and InstanceNormalization (scale, bias): one
    parameter per channel of axis 1, every axis carried."""

    op_types = ("BatchNormalization", "InstanceNormalization")
    ROLES = {"BatchNormalization": (Role.SCALE, Role.PARAM, Role.STAT, Role.STAT),
             "InstanceNormalization": (Role.SCALE, Role.PARAM)}
    tp_per_input = 2

    def torch_forward(self, node: Node, xs: list, op):
        """Inference-mode BatchNormalization (running statistics); InstanceNormalization over each
        sample's spatial axes (biased variance)."""
        return batch_norm_forward(xs, op) if node.op_type == "BatchNormalization" else instance_norm_forward(xs, op)

    def analyze(self, node: Node, ctx: AnalysisCtx) -> None:
        if _carry_all(node, ctx) is None:
            return
        y = node.output[0]
        for t, role in zip(node.input[1:], self.ROLES[node.op_type], strict=False):
            if t:
                ctx.slot(t, 0, role)
                ctx.identity(t, 0, y, 1)
        for extra in node.output[1:]:  # training-mode running mean / var
            if extra:
                ctx.identity(extra, 0, y, 1)


@register
class LayerNormalization1(Handler):
    """LayerNormalization below opset 17 is onnxruntime's contrib op in the default domain (its
    optimizer writes it at any opset): not followed (a barrier, as an unknown op), but counted by
    Torch-Pruning like the standard one."""

    op_types = ("LayerNormalization",)
    follows_channels = False
    tp_per_input = 2

    def torch_forward(self, node: Node, xs: list, op):
        return layer_norm_forward(xs, op)


@register
class LayerNormalization(Handler):
    op_types = ("LayerNormalization",)
    since = 17
    tp_per_input = 2

    def torch_forward(self, node: Node, xs: list, op):
        return layer_norm_forward(xs, op)

    def analyze(self, node: Node, ctx: AnalysisCtx) -> None:
        r = _carry_all(node, ctx)
        if r is None:
            return
        x, y = node.input[0], node.output[0]
        axis = _axis(ctx, r)
        for ax in range(max(axis, 0), r):
            ctx.approximate(x, ax, f"LayerNormalization '{node.name}' normalizes over the channels")
        for t, role in zip(node.input[1:3], (Role.SCALE, Role.PARAM), strict=False):
            if t:
                s = ctx.shape(t) or ()
                for j in range(len(s)):
                    ctx.slot(t, j, role)
                    ctx.identity(t, j, y, r - len(s) + j)
        for extra in node.output[1:]:
            if extra:
                for ax in range(min(axis, ctx.rank(extra) or 0)):
                    ctx.identity(extra, ax, y, ax)


@register
class GroupNormalization(Handler):
    """Not followed (a barrier): declares Torch-Pruning's count only."""

    op_types = ("GroupNormalization",)
    since = 18
    follows_channels = False
    tp_per_input = 2

    def torch_forward(self, node: Node, xs: list, op):
        """Opset 18: scale and bias per group; opset 21: per channel."""
        return group_norm_forward(xs, op)


@register
class Softmax1(Handler):
    """Softmax and LogSoftmax below opset 13: the input is coerced to 2-D at ``axis``, so every
    axis from ``axis`` on is mixed."""

    op_types = ("Softmax", "LogSoftmax")

    def torch_forward(self, node: Node, xs: list, op):
        """The input coerced to 2-D at ``axis`` (every axis from ``axis`` on is one row)."""
        x = xs[0]
        axis = _axis_of(op, x.dim())
        flat = x.reshape(int(np.prod(x.shape[:axis], dtype=np.int64)), -1)
        fn = op.F.softmax if node.op_type == "Softmax" else op.F.log_softmax
        return fn(flat, dim=1).reshape(x.shape)

    def analyze(self, node: Node, ctx: AnalysisCtx) -> None:
        r = _carry_all(node, ctx)
        if r is None:
            return
        x = node.input[0]
        for ax in self.mixed_axes(_axis(ctx, r), r):
            ctx.approximate(x, ax, f"{node.op_type} '{node.name}' mixes the channels of axis {ax}")

    def mixed_axes(self, axis: int, rank: int) -> list[int]:
        return list(range(axis, rank))


@register
class Softmax13(Softmax1):
    """Opset 13: one axis is mixed."""

    since = 13

    def torch_forward(self, node: Node, xs: list, op):
        x = xs[0]
        fn = op.F.softmax if node.op_type == "Softmax" else op.F.log_softmax
        return fn(x, dim=_axis_of(op, x.dim()))

    def mixed_axes(self, axis: int, rank: int) -> list[int]:
        return [axis]


# -- torch forwards -------------------------------------------------------------------------------


def _axis_of(op, rank: int) -> int:
    axis = op.attr("axis")
    axis = int(axis if axis is not None else -1)
    return axis + rank if axis < 0 else axis


def _per_channel(t, rank: int):
    """A [C] parameter shaped to broadcast on axis 1 of a rank-``rank`` tensor."""
    return t.reshape((1, -1) + (1,) * (rank - 2))


def batch_norm_forward(xs: list, op):
    x, scale, bias, mean, var = xs[:5]
    if int(op.attr("training_mode", 0) or 0):
        op.refuse("training_mode=1 (batch statistics)")
    if int(op.attr("spatial", 1) or 1) != 1:
        op.refuse("spatial=0")
    r = x.dim()
    inv = op.torch.rsqrt(_per_channel(var, r) + float(op.attr("epsilon", 1e-5)))
    return (x - _per_channel(mean, r)) * inv * _per_channel(scale, r) + _per_channel(bias, r)


def instance_norm_forward(xs: list, op):
    x, scale, bias = xs[:3]
    r = x.dim()
    axes = tuple(range(2, r))
    mean = x.mean(dim=axes, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=axes, keepdim=True)
    y = (x - mean) * op.torch.rsqrt(var + float(op.attr("epsilon", 1e-5)))
    return y * _per_channel(scale, r) + _per_channel(bias, r)


def layer_norm_forward(xs: list, op):
    x, scale = xs[0], xs[1]
    bias = xs[2] if len(xs) > 2 else None
    r = x.dim()
    axis = _axis_of(op, r)
    axes = tuple(range(axis, r))
    stash = int(op.attr("stash_type", 1) or 1)
    xc = x.to(op.torch.float32) if stash == 1 and x.dtype in (op.torch.float16, op.torch.bfloat16) else x
    mean = xc.mean(dim=axes, keepdim=True)
    d = xc - mean
    inv = op.torch.rsqrt((d * d).mean(dim=axes, keepdim=True) + float(op.attr("epsilon", 1e-5)))
    y = (d * inv).to(x.dtype) * scale
    if bias is not None:
        y = y + bias
    return y, mean, inv


def group_norm_forward(xs: list, op):
    x, scale, bias = xs[:3]
    n, c = x.shape[0], x.shape[1]
    g = int(op.attr("num_groups"))
    r = x.dim()
    xg = x.reshape(n, g, -1)
    mean = xg.mean(dim=2, keepdim=True)
    var = ((xg - mean) ** 2).mean(dim=2, keepdim=True)
    y = ((xg - mean) * op.torch.rsqrt(var + float(op.attr("epsilon", 1e-5)))).reshape(x.shape)
    if op.opset < 21:  # one scale and bias per group
        scale = scale.repeat_interleave(c // g)
        bias = bias.repeat_interleave(c // g)
    return y * _per_channel(scale, r) + _per_channel(bias, r)
