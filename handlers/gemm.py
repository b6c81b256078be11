"""Gemm and MatMul.

The contraction axis couples the two operands: where one side is a constant it is a consumer slot
(exact under masking); between two activations it is approximate. The free axis of a constant
operand is a producer slot. Batch axes of MatMul broadcast like elementwise ops.
"""

from __future__ import annotations

import numpy as np

from onnxprune.analysis.contract import Handler, register
from onnxprune.errors import Barrier

_LAYOUT = ("Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Cast", "Slice", "Split",
           "Expand", "Gather")


def zero_preserving(ctx, t: str, depth: int = 0) -> bool:
    """True if ``t`` is a linear, zero-preserving function of a weight-producing op's output
    (MatMul/Gemm/Conv with a constant weight, then bias adds, scalings and layout ops): zeroing the
    producer's weights and biases at a position then makes ``t`` zero there."""
    if depth > 40 or ctx.const_source(t) is not None:
        return False
    prod = ctx.cg.producer_of.get(t)
    if prod is None or prod.domain not in ("", "ai.onnx"):
        return False
    op = prod.op_type
    if op in ("MatMul", "Gemm", "Conv"):
        return any(ctx.const_source(i) is not None for i in prod.input[:2])
    if op in _LAYOUT:
        return zero_preserving(ctx, prod.input[0], depth + 1)
    if op in ("Mul", "Div", "Add", "Sub"):
        a, b = prod.input[0], prod.input[1]
        ca, cb = ctx.value(a), ctx.value(b)
        if op in ("Mul", "Div") and cb is not None:
            return zero_preserving(ctx, a, depth + 1)
        if op == "Mul" and ca is not None:
            return zero_preserving(ctx, b, depth + 1)
        if op in ("Add", "Sub"):
            bias = cb if cb is not None else ca
            act = a if cb is not None else b
            # a per-channel bias is a param slot of the group (zeroed with it); a scalar is not
            return bias is not None and bias.size > 1 and zero_preserving(ctx, act, depth + 1)
        return False
    if op == "Concat":
        return all(zero_preserving(ctx, i, depth + 1) for i in prod.input)
    return False


def _contract(ctx, a: str, a_axis: int, b: str, b_axis: int) -> None:
    a_const = ctx.const_source(a) is not None
    b_const = ctx.const_source(b) is not None
    if b_const:
        ctx.slot(b, b_axis, "consumer")
    if a_const:
        ctx.slot(a, a_axis, "consumer")
    if not a_const and not b_const:
        ctx.mark_attention(a, a_axis, "dim")
        ctx.mark_attention(b, b_axis, "dim")
        if zero_preserving(ctx, a) and zero_preserving(ctx, b):
            ctx.mark_contraction(a, a_axis)
        else:
            ctx.approximate(a, a_axis, f"{ctx.node.op_type} '{ctx.node.name}' contracts two activations")
    ctx.identity(a, a_axis, b, b_axis)


def _free(ctx, t: str, axis: int, y: str, y_axis: int) -> None:
    if ctx.const_source(t) is not None:
        ctx.slot(t, axis, "producer")
    ctx.identity(t, axis, y, y_axis)


@register
class Gemm(Handler):
    op_types = ("Gemm",)

    def analyze(self, node, ctx):
        a, b = node.input[0], node.input[1]
        c = node.input[2] if len(node.input) > 2 else ""
        y = node.output[0]
        if ctx.shape(a) is None or ctx.shape(b) is None or ctx.shape(y) is None:
            return
        ta, tb = int(ctx.attr("transA") or 0), int(ctx.attr("transB") or 0)
        a_k, a_m = (0, 1) if ta else (1, 0)
        b_k, b_n = (1, 0) if tb else (0, 1)
        _contract(ctx, a, a_k, b, b_k)
        _free(ctx, a, a_m, y, 0)
        _free(ctx, b, b_n, y, 1)
        if c:
            cs = ctx.shape(c)
            if cs is not None:
                r = len(cs)
                for j in range(r):
                    oa = j + 2 - r
                    if cs[j] == 1:
                        ctx.cover(c, j)
                        continue
                    if ctx.const_source(c) is not None:
                        ctx.slot(c, j, "param")
                    ctx.identity(c, j, y, oa)

    def macs(self, node, shape_of, const_of):
        ys, a = shape_of(node.output[0]), shape_of(node.input[0])
        if ys is None or a is None:
            return 0
        ta = 0
        for at in node.attribute:
            if at.name == "transA":
                ta = at.i
        k = a[0] if ta else a[1]
        return int(ys[0] * ys[1] * k)


@register
class MatMul(Handler):
    op_types = ("MatMul",)

    def analyze(self, node, ctx):
        a, b = node.input[0], node.input[1]
        y = node.output[0]
        sa, sb, sy = ctx.shape(a), ctx.shape(b), ctx.shape(y)
        if sa is None or sb is None or sy is None:
            return
        if len(sa) < 2 or len(sb) < 2:
            raise Barrier("1-D MatMul operands are not followed")
        ry = len(sy)
        act = ctx.const_source(a) is None and ctx.const_source(b) is None
        _contract(ctx, a, len(sa) - 1, b, len(sb) - 2)
        _free(ctx, a, len(sa) - 2, y, ry - 2)
        _free(ctx, b, len(sb) - 1, y, ry - 1)
        if act:
            ctx.mark_attention(b, len(sb) - 1, "dim")
        for t, s in ((a, sa), (b, sb)):
            r = len(s)
            for j in range(r - 2):
                oa = j + ry - r
                if s[j] == 1 and sy[oa] != 1:
                    ctx.cover(t, j)
                else:
                    if act:
                        ctx.mark_attention(t, j, "heads")
                    ctx.identity(t, j, y, oa)

    def macs(self, node, shape_of, const_of):
        ys, a = shape_of(node.output[0]), shape_of(node.input[0])
        if ys is None or a is None:
            return 0
        return int(np.prod(ys, dtype=np.int64) * a[-1])
