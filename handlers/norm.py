"""Normalizations. BatchNormalization and InstanceNormalization are per channel (exact);
LayerNormalization over a channel axis mixes channels without weights (approximate), and so do
Softmax and LogSoftmax over theirs. GroupNormalization is not followed (a barrier); its handler
only declares Torch-Pruning's count. Torch-Pruning counts every normalization 2 per input element."""

from __future__ import annotations

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


@register
class LayerNormalization(Handler):
    op_types = ("LayerNormalization",)
    since = 17
    tp_per_input = 2

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


@register
class Softmax1(Handler):
    """Softmax and LogSoftmax below opset 13: the input is coerced to 2-D at ``axis``, so every
    axis from ``axis`` on is mixed."""

    op_types = ("Softmax", "LogSoftmax")

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

    def mixed_axes(self, axis: int, rank: int) -> list[int]:
        return [axis]
