"""Resize/Upsample and Pad: axes whose size (or padding) does not change pass through; a
constant `sizes` input is rewritten when its channel entry changes."""

from __future__ import annotations

import numpy as np

from onnxprune.analysis.contract import Handler, register


@register
class Resize(Handler):
    op_types = ("Resize", "Upsample")

    def analyze(self, node, ctx):
        x, y = node.input[0], node.output[0]
        xs, ys = ctx.shape(x), ctx.shape(y)
        if xs is None or ys is None:
            return
        sizes_t = node.input[3] if node.op_type == "Resize" and len(node.input) > 3 else ""
        for t in node.input[1:]:
            ctx.cover(t)
        for ax in range(len(xs)):
            if xs[ax] == ys[ax]:
                if sizes_t and ctx.const(sizes_t) is None and ctx.has_space(x, ax):
                    ctx.freeze(x, ax, f"Resize '{node.name}': sizes are computed")
                    ctx.freeze(y, ax, f"Resize '{node.name}': sizes are computed")
                    continue
                ctx.identity(x, ax, y, ax)

    def rewrite(self, node, rw):
        sizes_t = node.input[3] if node.op_type == "Resize" and len(node.input) > 3 else ""
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


@register
class Pad(Handler):
    op_types = ("Pad",)

    def analyze(self, node, ctx):
        x, y = node.input[0], node.output[0]
        xs, ys = ctx.shape(x), ctx.shape(y)
        if xs is None or ys is None:
            return
        for t in node.input[1:]:
            ctx.cover(t)
        r = len(xs)
        if ctx.opset >= 11:
            pads = ctx.value(node.input[1]) if len(node.input) > 1 and node.input[1] else None
        else:
            pads = ctx.attr("pads")
        if pads is None:
            return
        pads = [int(p) for p in np.asarray(pads).reshape(-1)]
        axes = list(range(r))
        if ctx.opset >= 18 and len(node.input) > 3 and node.input[3]:
            a = ctx.value(node.input[3])
            if a is None:
                return
            axes = [int(v) + r if int(v) < 0 else int(v) for v in a.reshape(-1)]
        n = len(axes)
        padded = {ax for i, ax in enumerate(axes) if pads[i] != 0 or pads[i + n] != 0}
        for ax in range(r):
            if ax not in padded and xs[ax] == ys[ax]:
                ctx.identity(x, ax, y, ax)
