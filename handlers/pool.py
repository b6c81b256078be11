"""Pooling and reductions: the batch and channel axes pass through; spatial axes are not carried.
A reduction over a channel axis mixes channels without weights (approximate). Its ``axes`` moved
from attribute to input at opset 13 (ReduceSum) or 18 (the others): one class per side."""

from __future__ import annotations

import numpy as np
from onnxprune.handlers.conv import spatial_pads, torch_pad_order

from onnxprune.analysis.contract import AnalysisCtx, Handler, Node, register
from onnxprune.errors import Barrier

# op type -> torch forward of the poolings, ``fn(node, inputs, op)``, and of the reductions,
# ``fn(torch, x, axes, keepdims)`` (both filled at the end of the module)
POOL_TORCH: dict = {}
REDUCE_TORCH: dict = {}


class _Pooling(Handler):
    """Batch and channel axes pass through; the spatial axes are not carried."""

    torch_table = POOL_TORCH

    def torch_forward(self, node: Node, xs: list, op):
        return POOL_TORCH[node.op_type](node, xs, op)

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

    torch_table = REDUCE_TORCH

    def torch_forward(self, node: Node, xs: list, op):
        x = xs[0]
        axes = self.torch_axes(xs, op)
        if axes is None:
            return x
        r = x.dim()
        axes = sorted({a + r if a < 0 else a for a in axes} if axes else range(r))
        keep = bool(int(op.attr("keepdims", 1)))
        return REDUCE_TORCH[node.op_type](op.torch, x, axes, keep)

    def torch_axes(self, xs: list, op) -> list[int] | None:
        """The reduced axes ([]: all; None: none, the identity)."""
        return list(op.attr("axes") or [])

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

    def torch_axes(self, xs: list, op) -> list[int] | None:
        axes = op.ints(xs[1], "axes") if len(xs) > 1 and xs[1] is not None else []
        if not axes and int(op.attr("noop_with_empty_axes", 0) or 0):
            return None
        return axes

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


# -- torch forwards -------------------------------------------------------------------------------


def _window(op, x):
    n = x.dim() - 2
    if n not in (1, 2, 3):
        op.refuse(f"{n}-D pooling")
    k = list(op.attr("kernel_shape"))
    strides = list(op.attr("strides") or [1] * n)
    dil = list(op.attr("dilations") or [1] * n)
    pads = spatial_pads(op, list(x.shape[2:]), k, strides, dil)
    return n, k, strides, dil, pads


def _out_sizes(in_sizes, k, strides, dil, pads, ceil: bool) -> list[int]:
    """ONNX output sizes; with ``ceil_mode`` a last window that would start in the end padding is
    dropped (as onnxruntime does)."""
    n = len(in_sizes)
    out = []
    for i, (size, kk, s, d) in enumerate(zip(in_sizes, k, strides, dil, strict=True)):
        span = size + pads[i] + pads[i + n] - ((kk - 1) * d + 1)
        o = (-(-span // s) if ceil else span // s) + 1
        if ceil and (o - 1) * s >= size + pads[i]:
            o -= 1
        out.append(o)
    return out


def _crop(y, sizes):
    for ax, o in enumerate(sizes):
        if y.shape[2 + ax] > o:
            y = y.narrow(2 + ax, 0, o)
    return y


def _sum_pool(op, x, n, k, strides, ceil):
    """Sums over windows of an already padded ``x`` (a window off the end sums what it covers)."""
    if n == 1:
        return _sum_pool(op, x.unsqueeze(-1), 2, k + [1], strides + [1], ceil).squeeze(-1)
    pool = op.F.avg_pool2d if n == 2 else op.F.avg_pool3d
    return pool(x, k, strides, 0, ceil_mode=ceil, count_include_pad=True, divisor_override=1)


def max_pool(node, xs, op):
    x = xs[0]
    n, k, strides, dil, pads = _window(op, x)
    ceil = bool(int(op.attr("ceil_mode", 0) or 0))
    sizes = _out_sizes(list(x.shape[2:]), k, strides, dil, pads, ceil)
    xp = op.F.pad(x, torch_pad_order(pads), value=float("-inf")) if any(pads) else x
    pool = (op.F.max_pool1d, op.F.max_pool2d, op.F.max_pool3d)[n - 1]
    want_idx = len(node.output) > 1 and bool(node.output[1])
    res = pool(xp, k, strides, 0, dil, ceil_mode=ceil, return_indices=want_idx)
    if not want_idx:
        return _crop(res, sizes)
    y, idx = res
    y, idx = _crop(y, sizes), _crop(idx, sizes)
    return y, _onnx_indices(op, idx, list(x.shape), pads, list(xp.shape[2:]))


def _onnx_indices(op, idx, shape, pads, padded):
    """torch's indices (flat in each padded plane) -> ONNX's (flat over the whole unpadded tensor,
    row-major, or column-major over the spatial axes with ``storage_order=1``)."""
    T = op.torch
    n = len(padded)
    coords, rest = [], idx
    for ax in reversed(range(n)):
        coords.append(rest % padded[ax] - pads[ax])
        rest = rest // padded[ax]
    coords = coords[::-1]
    spatial = shape[2:]
    flat = T.zeros_like(idx)
    order = range(n) if not int(op.attr("storage_order", 0) or 0) else reversed(range(n))
    for ax in order:
        flat = flat * spatial[ax] + coords[ax]
    plane = int(np.prod(spatial, dtype=np.int64))
    nc = T.arange(shape[0] * shape[1], device=idx.device, dtype=idx.dtype).reshape(shape[0], shape[1], *([1] * n))
    return nc * plane + flat


def average_pool(node, xs, op):
    x = xs[0]
    n, k, strides, dil, pads = _window(op, x)
    if any(d != 1 for d in dil):
        op.refuse("dilations in an average pooling")
    ceil = bool(int(op.attr("ceil_mode", 0) or 0))
    sizes = _out_sizes(list(x.shape[2:]), k, strides, dil, pads, ceil)
    order = torch_pad_order(pads)
    xp = op.F.pad(x, order) if any(pads) else x
    total = _sum_pool(op, xp, n, k, strides, ceil)
    ones = op.torch.ones((1, 1, *x.shape[2:]), dtype=x.dtype, device=x.device)
    include = int(op.attr("count_include_pad", 0) or 0)
    ones = op.F.pad(ones, order, value=1.0 if include else 0.0) if any(pads) else ones
    count = _sum_pool(op, ones, n, k, strides, ceil)
    return _crop(total / count, sizes)


def lp_pool(node, xs, op):
    x = xs[0]
    n, k, strides, dil, pads = _window(op, x)
    if any(d != 1 for d in dil):
        op.refuse("dilations in an Lp pooling")
    p = float(op.attr("p", 2))
    ceil = bool(int(op.attr("ceil_mode", 0) or 0))
    sizes = _out_sizes(list(x.shape[2:]), k, strides, dil, pads, ceil)
    xp = op.F.pad(x, torch_pad_order(pads)) if any(pads) else x
    return _crop(_sum_pool(op, op.torch.abs(xp) ** p, n, k, strides, ceil) ** (1.0 / p), sizes)


def _spatial(x) -> tuple[int, ...]:
    return tuple(range(2, x.dim()))


POOL_TORCH.update({
    "MaxPool": max_pool,
    "AveragePool": average_pool,
    "GlobalAveragePool": lambda node, xs, op: xs[0].mean(dim=_spatial(xs[0]), keepdim=True),
    "GlobalMaxPool": lambda node, xs, op: xs[0].amax(dim=_spatial(xs[0]), keepdim=True),
    "LpPool": lp_pool,
    "GlobalLpPool": lambda node, xs, op: (op.torch.abs(xs[0]) ** float(op.attr("p", 2))).sum(
        dim=_spatial(xs[0]), keepdim=True) ** (1.0 / float(op.attr("p", 2))),
})


def _prod(T, x, axes, keep):
    for a in sorted(axes, reverse=True):
        x = T.prod(x, a, keepdim=keep) if keep else T.prod(x, a)
    return x


REDUCE_TORCH.update({
    "ReduceMean": lambda T, x, a, k: x.mean(dim=a, keepdim=k),
    "ReduceMax": lambda T, x, a, k: x.amax(dim=a, keepdim=k),
    "ReduceMin": lambda T, x, a, k: x.amin(dim=a, keepdim=k),
    "ReduceL1": lambda T, x, a, k: T.abs(x).sum(dim=a, keepdim=k).to(x.dtype),
    "ReduceL2": lambda T, x, a, k: T.sqrt((x * x).sum(dim=a, keepdim=k)),
    "ReduceLogSum": lambda T, x, a, k: T.log(x.sum(dim=a, keepdim=k)),
    "ReduceLogSumExp": lambda T, x, a, k: T.logsumexp(x, dim=a, keepdim=k),
    "ReduceSumSquare": lambda T, x, a, k: (x * x).sum(dim=a, keepdim=k).to(x.dtype),
    "ReduceProd": lambda T, x, a, k: _prod(T, x, a, k).to(x.dtype),
    "ReduceSum": lambda T, x, a, k: x.sum(dim=a, keepdim=k).to(x.dtype),
})
