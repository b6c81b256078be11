"""Pooling and reductions: the batch and channel axes pass through; spatial axes are not carried.
A reduction over a channel axis mixes channels without weights (approximate)."""

from __future__ import annotations

from onnxprune.analysis.contract import Handler, register
from onnxprune.errors import Barrier


@register
class Pool(Handler):
    op_types = ("MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool",
                "MaxRoiPool")

    def analyze(self, node, ctx):
        x = node.input[0]
        for k, y in enumerate(node.output):
            if not y:
                continue
            ctx.identity(x, 0, y, 0)
            ctx.identity(x, 1, y, 1)
            if k == 1 and ctx.cg.consumers_of.get(y):  # Indices encode flattened (N, C, H, W) positions
                ctx.approximate(y, 1, f"{node.op_type} '{node.name}' Indices encode channel positions")
        if node.op_type == "MaxRoiPool":
            ctx.cover(node.input[1])


REDUCE = ("ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum", "ReduceProd", "ReduceL1", "ReduceL2",
          "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare")
# opset at which `axes` moved from attribute to input
_AXES_INPUT = {"ReduceSum": 13}


@register
class Reduce(Handler):
    op_types = REDUCE

    def analyze(self, node, ctx):
        x, y = node.input[0], node.output[0]
        r = ctx.rank(x)
        if r is None:
            return
        moved = _AXES_INPUT.get(node.op_type, 18)
        if ctx.opset >= moved:
            axes_t = node.input[1] if len(node.input) > 1 else ""
            if axes_t:
                v = ctx.value(axes_t)
                if v is None:
                    raise Barrier("reduction axes are not constant")
                axes = [int(a) for a in v.reshape(-1)]
                ctx.cover(axes_t)
            else:
                axes = []
            noop = int(ctx.attr("noop_with_empty_axes") or 0)
            if not axes and noop:
                for ax in range(r):
                    ctx.identity(x, ax, y, ax)
                return
        else:
            axes = list(ctx.attr("axes") or [])
        if not axes:
            axes = list(range(r))
        axes = sorted(a + r if a < 0 else a for a in axes)
        keep = int(ctx.attr("keepdims") if ctx.attr("keepdims") is not None else 1)
        oa = 0
        for ax in range(r):
            if ax in axes:
                ctx.cover(x, ax)
                ctx.approximate(x, ax, f"{node.op_type} '{node.name}' reduces over axis {ax}")
                if keep:
                    oa += 1
                continue
            ctx.identity(x, ax, y, oa)
            oa += 1
