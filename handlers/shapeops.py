"""Ops that read shapes or index tensors: Shape and Size only read the (new) sizes at run time,
so they carry every axis of their input passively; Gather, Expand and Tile carry the axes they do
not touch."""

from __future__ import annotations

import numpy as np

from onnxprune.registry import Handler, register


@register
class Shape(Handler):
    op_types = ("Shape", "Size")

    def analyze(self, node, ctx):
        ctx.cover(node.input[0])


@register
class ConstantOfShape(Handler):
    op_types = ("ConstantOfShape", "Range", "NonZero")

    def analyze(self, node, ctx):
        for t in node.input:
            ctx.cover(t)
        # outputs are not carried: any channel space there stays frozen


@register
class Gather(Handler):
    op_types = ("Gather",)

    def analyze(self, node, ctx):
        data, idx, y = node.input[0], node.input[1], node.output[0]
        ds, is_, ys = ctx.shape(data), ctx.shape(idx), ctx.shape(y)
        if ds is None or is_ is None or ys is None:
            return
        r = len(ds)
        axis = int(ctx.attr("axis") or 0)
        axis = axis + r if axis < 0 else axis
        ctx.cover(idx)
        ctx.cover(data, axis)
        q = len(is_)
        for ax in range(r):
            if ax < axis:
                ctx.identity(data, ax, y, ax)
            elif ax > axis:
                ctx.identity(data, ax, y, ax - 1 + q)
        if ctx.const_source(data) is not None:
            for ax in range(r):
                if ax != axis and ctx.has_space(data, ax):
                    ctx.slot(data, ax, "param")


@register
class Expand(Handler):
    op_types = ("Expand",)

    def analyze(self, node, ctx):
        x, y = node.input[0], node.output[0]
        xs, ys = ctx.shape(x), ctx.shape(y)
        if xs is None or ys is None:
            return
        ctx.cover(node.input[1])
        R, r = len(ys), len(xs)
        for j in range(r):
            if xs[j] == ys[j + R - r]:
                ctx.identity(x, j, y, j + R - r)
            else:
                ctx.cover(x, j)

    def rewrite(self, node, rw):
        from onnxprune.handlers.reshape import rewrite_target

        # an entry that broadcast a channel axis becomes 1: the input's own size then wins
        rewrite_target(rw, node, 1, lambda pos, cur, n: 1 if cur != 1 else None)


@register
class Tile(Handler):
    op_types = ("Tile",)

    def analyze(self, node, ctx):
        x, y = node.input[0], node.output[0]
        xs = ctx.shape(x)
        reps = ctx.value(node.input[1])
        ctx.cover(node.input[1])
        if xs is None or reps is None:
            return
        for ax, rep in enumerate(np.asarray(reps).reshape(-1)):
            if int(rep) == 1:
                ctx.identity(x, ax, y, ax)
