"""Gemm and MatMul; Einsum and Attention for their MACs only.

The contraction axis couples the two operands: where one side is a constant it is a consumer slot
(exact under masking); between two activations it is approximate. The free axis of a constant
operand is a producer slot. Batch axes of MatMul broadcast like elementwise ops.

Einsum and Attention (opset 23) are not followed: their handlers declare only MACs
(``follows_channels = False``), so the analysis freezes every tensor they touch and reports them as
unknown ops, as it does for an op without a handler.
"""

from __future__ import annotations

import numpy as np

from onnxprune.analysis.contract import (
    AnalysisCtx,
    ConstOf,
    CountGraph,
    Handler,
    Node,
    Role,
    ShapeOf,
    numel,
    register,
)
from onnxprune.errors import Barrier
from onnxprune.ir.attrs import attr


def zero_preserving(ctx: AnalysisCtx, t: str, depth: int = 0) -> bool:
    """True if ``t`` is a linear, zero-preserving function of a weight-producing op's output
    (MatMul/Gemm/Conv with a constant weight, then bias adds, scalings and layout ops): zeroing the
    producer's weights and biases at a position then makes ``t`` zero there."""
    if depth > 40 or ctx.const_source(t) is not None:
        return False
    prod = ctx.producer(t)
    if prod is None or prod.domain not in ("", "ai.onnx"):
        return False
    op = prod.op_type
    if op in ("MatMul", "Gemm", "Conv"):
        return any(ctx.const_source(i) is not None for i in prod.input[:2])
    if ctx.handler_of(prod).moves_values:
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


def _contract(node: Node, ctx: AnalysisCtx, a: str, a_axis: int, b: str, b_axis: int) -> None:
    a_const = ctx.const_source(a) is not None
    b_const = ctx.const_source(b) is not None
    if b_const:
        ctx.slot(b, b_axis, Role.CONSUMER)
    if a_const:
        ctx.slot(a, a_axis, Role.CONSUMER)
    if not a_const and not b_const:
        ctx.mark_attention(a, a_axis, "dim")
        ctx.mark_attention(b, b_axis, "dim")
        if zero_preserving(ctx, a) and zero_preserving(ctx, b):
            ctx.mark_contraction(a, a_axis)
        else:
            ctx.approximate(a, a_axis, f"{node.op_type} '{node.name}' contracts two activations")
    ctx.identity(a, a_axis, b, b_axis)


def _free(ctx: AnalysisCtx, t: str, axis: int, y: str, y_axis: int) -> None:
    if ctx.const_source(t) is not None:
        ctx.slot(t, axis, Role.PRODUCER)
    ctx.identity(t, axis, y, y_axis)


def is_linear(node: Node | None, graph: CountGraph) -> bool:
    """Torch-Pruning count: a MatMul or Gemm with a constant operand is an exported nn.Linear."""
    return node is not None and node.op_type in ("MatMul", "Gemm") and any(graph.is_const(i) for i in node.input[:2])


@register
class Gemm(Handler):
    op_types = ("Gemm",)

    def analyze(self, node: Node, ctx: AnalysisCtx) -> None:
        a, b = node.input[0], node.input[1]
        c = node.input[2] if len(node.input) > 2 else ""
        y = node.output[0]
        if ctx.shape(a) is None or ctx.shape(b) is None or ctx.shape(y) is None:
            return
        ta, tb = int(ctx.attr("transA") or 0), int(ctx.attr("transB") or 0)
        a_k, a_m = (0, 1) if ta else (1, 0)
        b_k, b_n = (1, 0) if tb else (0, 1)
        _contract(node, ctx, a, a_k, b, b_k)
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
                        ctx.slot(c, j, Role.PARAM)
                    ctx.identity(c, j, y, oa)

    def torch_forward(self, node: Node, xs: list, op):
        """alpha * A' B' + beta * C (unidirectional broadcast of C)."""
        return gemm_forward(xs, op)

    def macs(self, node: Node, shape_of: ShapeOf, const_of: ConstOf) -> int:
        ys, a = shape_of(node.output[0]), shape_of(node.input[0])
        if ys is None or a is None:
            return 0
        ta = 0
        for at in node.attribute:
            if at.name == "transA":
                ta = at.i
        k = a[0] if ta else a[1]
        return int(ys[0] * ys[1] * k)

    def linear_bias(self, node: Node, graph: CountGraph) -> str | None:
        return node.input[2] if is_linear(node, graph) and len(node.input) > 2 and node.input[2] else None

    def tp_ops(self, node: Node, shape_of: ShapeOf, const_of: ConstOf, graph: CountGraph) -> int:
        """The products, plus the bias once per element (an nn.Linear's bias, not per row)."""
        n = _gemm_products(node, shape_of)
        if len(node.input) > 2 and node.input[2] and not graph.bias_counted(node):
            n += numel(shape_of(node.input[2]))
        return n


def _gemm_products(node: Node, shape_of: ShapeOf) -> int:
    a, y = shape_of(node.input[0]), shape_of(node.output[0])
    if a is None or y is None or len(a) != 2:
        return 0
    k = a[0] if int(attr(node, "transA", 0) or 0) else a[1]
    return numel(y) * int(k)


@register
class MatMul(Handler):
    op_types = ("MatMul",)

    def analyze(self, node: Node, ctx: AnalysisCtx) -> None:
        a, b = node.input[0], node.input[1]
        y = node.output[0]
        sa, sb, sy = ctx.shape(a), ctx.shape(b), ctx.shape(y)
        if sa is None or sb is None or sy is None:
            return
        if len(sa) < 2 or len(sb) < 2:
            raise Barrier("1-D MatMul operands are not followed")
        ry = len(sy)
        act = ctx.const_source(a) is None and ctx.const_source(b) is None
        _contract(node, ctx, a, len(sa) - 1, b, len(sb) - 2)
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

    def torch_forward(self, node: Node, xs: list, op):
        """numpy's matmul, which torch.matmul follows (1-D operands, broadcast batch axes)."""
        return op.torch.matmul(xs[0], xs[1])

    def macs(self, node: Node, shape_of: ShapeOf, const_of: ConstOf) -> int:
        ys, a = shape_of(node.output[0]), shape_of(node.input[0])
        if ys is None or a is None:
            return 0
        return int(np.prod(ys, dtype=np.int64) * a[-1])

    def tp_ops(self, node: Node, shape_of: ShapeOf, const_of: ConstOf, graph: CountGraph) -> int:
        out, a = shape_of(node.output[0]), shape_of(node.input[0])
        if out is None or a is None:
            return 0
        return numel(out) * int(a[-1])


@register
class Einsum(Handler):
    """MACs of a two-operand Einsum: the product of the sizes of all indices (each output element
    sums over the contracted ones). Not followed: a barrier."""

    op_types = ("Einsum",)
    since = 12
    follows_channels = False

    def torch_forward(self, node: Node, xs: list, op):
        return op.torch.einsum(op.attr("equation"), *xs)

    def macs(self, node: Node, shape_of: ShapeOf, const_of: ConstOf) -> int:
        eq = attr(node, "equation", b"")
        eq = eq.decode() if isinstance(eq, bytes) else str(eq)
        if len(node.input) != 2 or "..." in eq or "->" not in eq:
            return 0
        lhs = eq.replace(" ", "").split("->")[0].split(",")
        sizes: dict[str, int] = {}
        for term, name in zip(lhs, node.input, strict=False):
            s = shape_of(name)
            if s is None or len(s) != len(term):
                return 0
            for ch, d in zip(term, s, strict=True):
                sizes[ch] = max(sizes.get(ch, 1), int(d))
        return int(np.prod(list(sizes.values()), dtype=np.int64)) if sizes else 0


@register
class Attention(Handler):
    """MACs of ai.onnx Attention (opset 23): Q·Kᵀ and probabilities·V. Not followed: a barrier."""

    op_types = ("Attention",)
    since = 23
    follows_channels = False

    def macs(self, node: Node, shape_of: ShapeOf, const_of: ConstOf) -> int:
        q, k, v = (shape_of(node.input[i]) if len(node.input) > i and node.input[i] else None for i in range(3))
        if q is None or k is None or v is None:
            return 0
        if len(q) == 4 and len(k) == 4 and len(v) == 4:  # (B, H, S, d)
            b, h, sq, dk = q
            skv, dv = k[2], v[3]
            return int(b * h * sq * skv * (dk + dv))
        if len(q) == 3 and len(k) == 3 and len(v) == 3:  # (B, S, H·d)
            hq = int(attr(node, "q_num_heads", 1) or 1)
            hkv = int(attr(node, "kv_num_heads", 1) or 1)
            b, sq, qd = q
            skv = k[1]
            dk, dv = qd // hq, v[2] // hkv
            return int(b * hq * sq * skv * (dk + dv))
        return 0


def gemm_forward(xs: list, op):
    a, b = xs[0], xs[1]
    c = xs[2] if len(xs) > 2 else None
    if int(op.attr("transA", 0)):
        a = a.transpose(0, 1)
    if int(op.attr("transB", 0)):
        b = b.transpose(0, 1)
    y = op.torch.matmul(a, b)
    alpha, beta = float(op.attr("alpha", 1.0)), float(op.attr("beta", 1.0))
    if alpha != 1.0:
        y = alpha * y
    if c is not None:
        y = y + (c if beta == 1.0 else beta * c)
    return y
