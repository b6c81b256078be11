"""Resize/Upsample and Pad: axes whose size (or padding) does not change pass through; a
constant `sizes` input is rewritten when its channel entry changes."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
from onnxprune.handlers.conv import torch_pad_order

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

    def torch_forward(self, node: Node, xs: list, op):
        """Separable resampling, one axis at a time, with the coordinates onnxruntime computes
        (float32): nearest (every ``nearest_mode``), linear and cubic (``cubic_coeff_a``,
        ``exclude_outside``) under every ``coordinate_transformation_mode`` except
        tf_crop_and_resize and half_pixel_symmetric, which refuse, as do ``antialias`` and a
        ``keep_aspect_ratio_policy`` other than stretch."""
        x = xs[0]
        if node.op_type == "Upsample" or op.opset < 11:  # scales only (input 1, or an attribute at opset 7)
            scales = op.floats(xs[1], "scales") if len(xs) > 1 and xs[1] is not None else list(op.attr("scales"))
            sizes, axes, ctm = None, list(range(x.dim())), "asymmetric"
        else:
            scales = op.floats(xs[2], "scales") if len(xs) > 2 and xs[2] is not None else None
            sizes = op.ints(xs[3], "sizes") if len(xs) > 3 and xs[3] is not None else None
            axes = [a + x.dim() if a < 0 else a for a in (op.attr("axes") or range(x.dim()))]
            ctm = op.attr("coordinate_transformation_mode", "half_pixel")
            if not scales:
                scales = None
            if sizes and op.attr("keep_aspect_ratio_policy", "stretch") != "stretch":
                op.refuse(f"keep_aspect_ratio_policy={op.attr('keep_aspect_ratio_policy')}")
        return resample(x, axes, scales, sizes, ctm, op)


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

    def torch_forward(self, node: Node, xs: list, op):
        """constant (any pads, negative ones crop), reflect, edge and wrap (an index map per axis)."""
        x = xs[0]
        pads = op.ints(xs[1], "pads")
        axes = op.ints(xs[3], "axes") if len(xs) > 3 and xs[3] is not None else list(range(x.dim()))
        return pad_forward(x, pads, [a + x.dim() if a < 0 else a for a in axes],
                           xs[2] if len(xs) > 2 else None, op)


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


# -- torch forwards -------------------------------------------------------------------------------


def _source_coords(ctm: str, out_len: int, in_len: int, scale: np.float32) -> np.ndarray:
    """x_original of every output index, in float32 as onnxruntime computes it."""
    x = np.arange(out_len, dtype=np.float32)
    half = np.float32(0.5)
    if ctm == "half_pixel":
        return (x + half) / scale - half
    if ctm == "pytorch_half_pixel":
        return (x + half) / scale - half if out_len > 1 else np.zeros_like(x)
    if ctm == "align_corners":
        if out_len == 1:
            return np.zeros_like(x)
        return x * (np.float32(in_len - 1) / np.float32(out_len - 1))
    if ctm == "asymmetric":
        return x / scale
    if ctm == "tf_half_pixel_for_nn":
        return (x + half) / scale
    raise ValueError(ctm)


def _nearest(coords: np.ndarray, mode: str, scale: float) -> np.ndarray:
    fl = np.floor(coords)
    if mode == "round_prefer_floor":
        return np.where(coords == fl + 0.5, fl, np.floor(coords + 0.5))
    if mode == "round_prefer_ceil":
        return np.floor(coords + 0.5)
    if mode == "floor":
        return fl
    if mode == "ceil":
        return np.ceil(coords)
    if mode == "simple":  # Resize-10 and Upsample
        return np.ceil(coords) if scale < 1 else np.trunc(coords)
    raise ValueError(mode)


def _cubic_weights(t: np.ndarray, a: float) -> list[np.ndarray]:
    def f(s):
        s = np.abs(s)
        return np.where(s <= 1, ((a + 2) * s - (a + 3)) * s * s + 1,
                        np.where(s < 2, ((a * s - 5 * a) * s + 8 * a) * s - 4 * a, 0.0))
    return [f(1 + t), f(t), f(1 - t), f(2 - t)]


def _taps(mode: str, coords: np.ndarray, in_len: int, scale: float, op) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """(source indices, weights or None) per tap, for one axis."""
    if mode == "nearest":
        nm = "simple" if op.node.op_type == "Upsample" or op.opset < 11 else op.attr("nearest_mode", "round_prefer_floor")
        idx = np.clip(_nearest(coords.astype(np.float64), nm, scale), 0, in_len - 1).astype(np.int64)
        return [(idx, None)]
    if mode == "linear":
        c = np.clip(coords.astype(np.float64), 0, in_len - 1)
        i0 = np.floor(c).astype(np.int64)
        i1 = np.minimum(i0 + 1, in_len - 1)
        w = c - i0
        return [(i0, 1 - w), (i1, w)]
    if mode == "cubic":
        c = coords.astype(np.float64)
        fl = np.floor(c)
        ws = _cubic_weights(c - fl, float(op.attr("cubic_coeff_a", -0.75)))
        idx = [fl.astype(np.int64) + k for k in (-1, 0, 1, 2)]
        if int(op.attr("exclude_outside", 0) or 0):
            ws = [np.where((i >= 0) & (i < in_len), w, 0.0) for i, w in zip(idx, ws, strict=True)]
            total = sum(ws)
            ws = [w / total for w in ws]
        return [(np.clip(i, 0, in_len - 1), w) for i, w in zip(idx, ws, strict=True)]
    op.refuse(f"mode '{mode}'")


def resample(x, axes: list[int], scales: list[float] | None, sizes: list[int] | None, ctm: str, op):
    mode = op.attr("mode", "nearest")
    if ctm in ("tf_crop_and_resize", "half_pixel_symmetric"):
        op.refuse(f"coordinate_transformation_mode '{ctm}'")
    T = op.torch
    for k, ax in enumerate(axes):
        in_len = int(x.shape[ax])
        if sizes is not None:
            out_len = int(sizes[k])
            scale = np.float32(out_len) / np.float32(in_len)
        else:
            scale = np.float32(scales[k])
            out_len = int(np.floor(np.float32(in_len) * scale))
        if out_len == in_len and scale == 1:
            continue
        if scale < 1 and int(op.attr("antialias", 0) or 0):
            op.refuse("antialias")
        taps = _taps(mode, _source_coords(ctm, out_len, in_len, scale), in_len, float(scale), op)
        shape = [1] * x.dim()
        shape[ax] = out_len
        y = None
        for idx, w in taps:
            part = x.index_select(ax, T.from_numpy(idx).to(x.device))
            if w is not None:
                part = part * T.from_numpy(w).to(device=x.device, dtype=x.dtype).reshape(shape)
            y = part if y is None else y + part
        x = y
    return x


def _pad_index(mode: str, n: int, begin: int, end: int) -> np.ndarray:
    j = np.arange(-begin, n + end)
    if mode == "edge":
        return np.clip(j, 0, n - 1)
    if mode == "wrap":
        return np.mod(j, n)
    if n == 1:
        return np.zeros_like(j)
    m = np.mod(j, 2 * n - 2)  # reflect: the edge is not repeated
    return np.where(m < n, m, 2 * n - 2 - m)


def pad_forward(x, pads: list[int], axes: list[int], value, op):
    mode = op.attr("mode", "constant")
    n = len(axes)
    if mode == "constant":
        full = [0] * (2 * x.dim())
        for i, ax in enumerate(axes):
            full[ax], full[ax + x.dim()] = pads[i], pads[i + n]
        cv = op.floats(value, "constant_value")[0] if value is not None else 0.0
        if not x.is_floating_point():
            cv = int(cv)
        return op.F.pad(x, torch_pad_order(full), value=cv)
    if mode not in ("reflect", "edge", "wrap"):
        op.refuse(f"mode '{mode}'")
    for i, ax in enumerate(axes):
        if pads[i] or pads[i + n]:
            idx = _pad_index(mode, int(x.shape[ax]), pads[i], pads[i + n])
            x = x.index_select(ax, op.torch.from_numpy(idx).to(x.device))
    return x
