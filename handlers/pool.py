"""Pooling and reductions: the batch and channel axes pass through; spatial axes are not carried.
A reduction over a channel axis mixes channels without weights (approximate). Its ``axes`` moved
from attribute to input at opset 13 (ReduceSum) or 18 (the others): one class per side."""

from __future__ import annotations

from onnxprune.analysis.contract import AnalysisCtx, Handler, Node, register
from onnxprune.errors import Barrier


class _Pooling(Handler):
    """Batch and channel axes pass through; the spatial axes are not carried."""

    def analyze(self, node: Node, ctx: AnalysisCtx) -> None:
        x = node.input[0]
        for k, y in enumerate(node.output):
            if not y:
                continue
            ctx.identity(x, 0, y, 0)
            ctx.identity(x, 1, y, 1)
            if k == 1 and ctx.consumers(y):  # Indices encode flattened (N, C, H, W) positions
                ctx.approximate(y, 1, f"{node.op_type} '{node.name}' Indices encode channel positions")


@register
class Pool(_Pooling):
    """The poolings Torch-Pruning counts, 1 per input element (nn.MaxPool, nn.AvgPool, adaptive ones)."""

    op_types = ("MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool")
    tp_per_input = 1


@register
class LpPool(_Pooling):
    op_types = ("LpPool", "GlobalLpPool")


@register
class MaxRoiPool(_Pooling):
    op_types = ("MaxRoiPool",)

    def analyze(self, node: Node, ctx: AnalysisCtx) -> None:
        super().analyze(node, ctx)
        ctx.cover(node.input[1])


class _Reduce(Handler):
    """A reduction: the reduced axes are covered and approximate, the others pass through."""

    def analyze(self, node: Node, ctx: AnalysisCtx) -> None:
        x, y = node.input[0], node.output[0]
        r = ctx.rank(x)
        if r is None:
            return
        axes = self.axes(node, ctx)
        if axes is None:  # no axes and noop_with_empty_axes: the identity
            for ax in range(r):
                ctx.identity(x, ax, y, ax)
            return
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

    def axes(self, node: Node, ctx: AnalysisCtx) -> list[int] | None:
        """The ``axes`` attribute ([]: all axes)."""
        return list(ctx.attr("axes") or [])


class _AxesInput(_Reduce):
    """``axes`` as input 1, which must be constant; none: all axes, or none with
    ``noop_with_empty_axes``."""

    def axes(self, node: Node, ctx: AnalysisCtx) -> list[int] | None:
        axes_t = node.input[1] if len(node.input) > 1 else ""
        if axes_t:
            v = ctx.value(axes_t)
            if v is None:
                raise Barrier("reduction axes are not constant")
            axes = [int(a) for a in v.reshape(-1)]
            ctx.cover(axes_t)
        else:
            axes = []
        if not axes and int(ctx.attr("noop_with_empty_axes") or 0):
            return None
        return axes


REDUCE = ("ReduceMean", "ReduceMax", "ReduceMin", "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp",
          "ReduceSumSquare")


@register
class Reduce1(_Reduce):
    op_types = REDUCE


@register
class Reduce18(_AxesInput):
    op_types = REDUCE
    since = 18


@register
class ReduceProd1(_Reduce):
    """ReduceProd is also integer arithmetic on shape vectors."""

    op_types = ("ReduceProd",)
    shape_arith = True


@register
class ReduceProd18(_AxesInput):
    op_types = ("ReduceProd",)
    since = 18
    shape_arith = True


@register
class ReduceSum1(_Reduce):
    """ReduceSum is also integer arithmetic on shape vectors; its ``axes`` became an input at 13."""

    op_types = ("ReduceSum",)
    shape_arith = True


@register
class ReduceSum13(_AxesInput):
    op_types = ("ReduceSum",)
    since = 13
    shape_arith = True
