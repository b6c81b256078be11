"""Normalizations. BatchNormalization and InstanceNormalization are per channel (exact);
LayerNormalization over a channel axis mixes channels without weights (approximate)."""

from __future__ import annotations

from onnxprune.analysis.contract import Handler, register


@register
class ChannelNormalization(Handler):
    """BatchNormalization (scale, bias, mean, var) and InstanceNormalization (scale, bias): one
    parameter per channel of axis 1, every axis carried."""

    op_types = ("BatchNormalization", "InstanceNormalization")
    ROLES = {"BatchNormalization": ("scale", "param", "stat", "stat"), "InstanceNormalization": ("scale", "param")}

    def analyze(self, node, ctx):
        x, y = node.input[0], node.output[0]
        r = ctx.rank(x)
        if r is None:
            return
        for ax in range(r):
            ctx.identity(x, ax, y, ax)
        for t, role in zip(node.input[1:], self.ROLES[node.op_type], strict=False):
            if t:
                ctx.slot(t, 0, role)
                ctx.identity(t, 0, y, 1)
        for extra in node.output[1:]:  # training-mode running mean / var
            if extra:
                ctx.identity(extra, 0, y, 1)


@register
class LayerNormalization(Handler):
    op_types = ("LayerNormalization",)
    since = 17

    def analyze(self, node, ctx):
        x, y = node.input[0], node.output[0]
        r = ctx.rank(x)
        if r is None:
            return
        axis = int(ctx.attr("axis") if ctx.attr("axis") is not None else -1)
        axis = axis + r if axis < 0 else axis
        for ax in range(r):
            ctx.identity(x, ax, y, ax)
            if ax >= axis:
                ctx.approximate(x, ax, f"LayerNormalization '{node.name}' normalizes over the channels")
        for t, role in zip(node.input[1:3], ("scale", "param"), strict=False):
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
class Softmax(Handler):
    op_types = ("Softmax", "LogSoftmax")

    def analyze(self, node, ctx):
        x, y = node.input[0], node.output[0]
        r = ctx.rank(x)
        if r is None:
            return
        axis = ctx.attr("axis")
        axis = int(axis if axis is not None else -1)
        axis = axis + r if axis < 0 else axis
        for ax in range(r):
            ctx.identity(x, ax, y, ax)
        if ctx.opset < 13:
            mixed = range(axis, r)
        else:
            mixed = [axis]
        for ax in mixed:
            ctx.approximate(x, ax, f"{node.op_type} '{node.name}' mixes the channels of axis {ax}")
