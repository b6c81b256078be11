"""Quantized ops: QDQ graphs (QuantizeLinear / DequantizeLinear around weights and activations) and
QOperator graphs (QLinearConv, QLinearMatMul, ConvInteger, MatMulInteger, DynamicQuantizeLinear, and
onnxruntime's com.microsoft QGemm, QLinearAdd, QLinearMul, QLinearGlobalAveragePool,
QLinearAveragePool, QLinearConcat, QLinearSigmoid, QLinearLeakyRelu).

Terms: a *quantized* tensor ``q`` stands for the real values ``(q - zero_point) * scale``; its scale and
zero point are *per tensor* (scalars, or 1-D of one element) or *per channel* (1-D along one axis). A
per-channel scale or zero point is a ``QUANT`` slot on that axis: sliced with the channels, never
zeroed. A per-tensor one stays as it is. A quantized constant is declared with ``ctx.quantized``: the
masked original sets its removed channels to its zero point (the value that dequantizes to exactly 0),
and weight importance scores its dequantized values. A quantized weight (int8/uint8/int32) is sliced
like a float one.

The semantics relied on (the ONNX spec; onnxruntime's contrib schemas and CPU kernels for
com.microsoft), each an elementwise map or a float op's channel flow with integer operands:

- QuantizeLinear ``y = saturate(round(x / scale) + zp)``, DequantizeLinear ``y = (x - zp) * scale``:
  elementwise, same shape; per tensor, or (opset 13+) 1-D along ``axis`` (default 1). Blocked
  quantization (opset 21+, ``block_size`` > 0) shares one scale among several channels: a barrier.
  onnxruntime's com.microsoft versions (16-bit types): the same, per axis only with an ``axis``.
  DequantizeLinear shows a constant (``shows_constant``): a weight slot of the op reading a dequantized
  weight reaches the quantized initializer, as through Cast.
- QLinearConv ``y = saturate(round((conv(x - x_zp, w - w_zp) + B) * x_scale * w_scale / y_scale) +
  y_zp)`` and ConvInteger ``y = conv(x - x_zp, w - w_zp)`` (int32): Conv's channel flow (``conv.Conv``,
  same ``group`` rewrite and MACs) over (x, w, B); ``w_scale``/``w_zp`` per tensor or per output channel
  (axis 0 of w); x and y parameters per tensor (the spec allows nothing else); B is int32 with zero
  point 0.
- MatMulInteger ``y = (a - a_zp) @ (b - b_zp)`` (int32) and QLinearMatMul (requantized like
  QLinearConv): MatMul's channel flow over (a, b). b's scale and zero point per tensor or per column
  (1-D along b's last axis, the output's last axis); a's and y's per tensor only: the spec's "per row"
  for a is laid out differently by its text ([M]) and by onnx's reference implementation (numpy
  broadcasting puts a 1-D vector on the last axis), so it is a barrier.
- QGemm (com.microsoft) ``Y = alpha * (A' - a_zp)(B' - b_zp) * a_scale * b_scale + C`` (C int32 in that
  scale), requantized when ``y_scale`` is given, else float: Gemm's channel flow over (A, B, C); b's
  parameters per tensor or 1-D of N (onnxruntime's ``QGemm::CheckInputs``: size 1 or N, N the output
  columns, axis 0 of B when ``transB``).
- QLinearAdd ``C = quantize(dq(A) + dq(B))`` and QLinearMul ``C = quantize(dq(A) * dq(B))`` with numpy
  broadcasting, every parameter per tensor: elementwise; a constant operand is a param slot.
- QLinearGlobalAveragePool, QLinearAveragePool: the channel average of AveragePool on dequantized
  values, requantized; batch and channel axes pass (the channel axis is the last with
  ``channels_last=1``), per-tensor parameters.
- QLinearConcat (inputs ``Y_scale, Y_zp, (X_i, X_i_scale, X_i_zp)...``): Concat of the requantized
  inputs along ``axis`` (``concat.link_parts``).
- QLinearSigmoid, QLinearLeakyRelu: ``quantize(f(dq(x)))`` elementwise, per-tensor parameters.
- DynamicQuantizeLinear ``scale = (max(0, max x) - min(0, min x)) / 255``, ``zp = round(-min(0, min x) /
  scale)``, ``y = saturate(round(x / scale) + zp)``: elementwise, but the range is taken over the whole
  tensor, so removing channels changes every other channel's quantization unless the removed channels
  are exactly 0 (the range always includes 0). Where the removed channels of its input are provably 0
  once the group's producers are masked too (``removed_stay_zero``: a constant-weight Conv, ConvInteger,
  MatMul, MatMulInteger or Gemm writes them, then ops that keep a zero channel zero), the group is
  marked to mask its producers (``ctx.mark_contraction``) and stays exact; otherwise it is approximate.

``integer_products`` (QLinearConv, ConvInteger, MatMulInteger, QLinearMatMul, QGemm): the inputs
(activation, weight, weight zero point) of each integer product; each op takes a uint8 weight as well as an
int8 one, which ``measure.verify.integer_exact`` uses to verify on the exact integers where u8s8 kernels
saturate.

Barriers (no handler, or a Barrier raised here): blocked quantization; per-row quantization of a
matrix product's first operand or output; N-D zero points of MatMulInteger; QLinearSoftmax,
QLinearReduceMean, QLinearWhere, QAttention, DynamicQuantizeMatMul, MatMulIntegerToFloat,
DynamicQuantizeLSTM and the other com.microsoft quantized ops (MatMulNBits: ``ms_transformer.py``) (their channel semantics is
not stated here).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnxprune.handlers.concat import link_parts
from onnxprune.handlers.conv import Conv
from onnxprune.handlers.elementwise import broadcast_links
from onnxprune.handlers.gemm import Gemm, MatMul
from onnxprune.handlers.reshape import factor_blocks, transpose_perm

from onnxprune.analysis.contract import (
    AnalysisCtx,
    ConstOf,
    Handler,
    Node,
    RewriteCtx,
    Role,
    ShapeOf,
    numel,
    register,
)
from onnxprune.errors import Barrier

DOMAIN = "com.microsoft"
# the float handlers whose channel flow the quantized ops share (handlers are stateless)
_CONV, _MATMUL, _GEMM = Conv(), MatMul(), Gemm()


def as_op(node: Node, op_type: str, inputs: list[str]) -> Node:
    """``node`` seen as the float op ``op_type`` on ``inputs``: same name, attributes and outputs."""
    view = onnx.helper.make_node(op_type, inputs, list(node.output), name=node.name)
    view.attribute.extend(node.attribute)
    return view


def _input(node: Node, i: int) -> str:
    return node.input[i] if len(node.input) > i else ""


def per_tensor(ctx: AnalysisCtx, *names: str) -> None:
    """Quantization parameters that must be per tensor (at most one element): covered, kept as they are."""
    for t in names:
        if not t:
            continue
        s = ctx.shape(t)
        if s is not None and numel(s) > 1:
            raise Barrier(f"'{t}' has shape {list(s)}: only a per-tensor scale or zero point is followed here")
        ctx.cover(t)


def per_channel(ctx: AnalysisCtx, x: str, axis: int, *names: str) -> int | None:
    """The scale and zero point of ``x``: per tensor, or 1-D along ``axis`` of ``x`` (``QUANT`` slots on
    it, sliced with its channels). Returns ``axis`` where they are per channel, else None."""
    along = None
    for t in names:
        if not t:
            continue
        s = ctx.shape(t)
        if s is None:
            raise Barrier(f"shape of '{t}' unknown")
        if numel(s) <= 1:
            ctx.cover(t)
            continue
        if len(s) != 1:
            raise Barrier(f"'{t}' has shape {list(s)}: neither per tensor nor 1-D per channel")
        if ctx.const_source(t) is not None:
            ctx.slot(t, 0, Role.QUANT)
        ctx.identity(t, 0, x, axis)
        along = axis
    return along


# -- QuantizeLinear / DequantizeLinear ------------------------------------------------------------


class _Linear10(Handler):
    """Elementwise (de)quantization; opset 10: scale and zero point per tensor."""

    since = 10
    dequantizes = False  # input 0 holds quantized values (DequantizeLinear)

    def analyze(self, node: Node, ctx: AnalysisCtx) -> None:
        x, y = node.input[0], node.output[0]
        r = ctx.rank(x)
        if r is None or ctx.rank(y) is None:
            return
        axis = self.param_axis(node, ctx, x, r)
        for ax in range(r):
            ctx.identity(x, ax, y, ax)
        if self.dequantizes:
            ctx.quantized(x, _input(node, 2) or None, node.input[1], axis)

    def param_axis(self, node: Node, ctx: AnalysisCtx, x: str, r: int) -> int | None:
        per_tensor(ctx, node.input[1], _input(node, 2))
        return None


class _Linear13(_Linear10):
    """Opset 13: per tensor, or 1-D along ``axis`` (default 1)."""

    since = 13

    def param_axis(self, node: Node, ctx: AnalysisCtx, x: str, r: int) -> int | None:
        axis = int(ctx.attr("axis") if ctx.attr("axis") is not None else 1)
        return per_channel(ctx, x, axis + r if axis < 0 else axis, node.input[1], _input(node, 2))


class _Linear21(_Linear13):
    """Opset 21: blocked quantization (``block_size`` > 0) shares a scale among channels: a barrier."""

    since = 21

    def param_axis(self, node: Node, ctx: AnalysisCtx, x: str, r: int) -> int | None:
        block = int(ctx.attr("block_size") or 0)
        if block > 0:
            raise Barrier(f"blocked quantization (block_size={block}): a scale is shared by {block} channels")
        return super().param_axis(node, ctx, x, r)


class _LinearContrib(_Linear13):
    """onnxruntime's com.microsoft QuantizeLinear / DequantizeLinear (what its quantizer writes for 16-bit
    types): the same formulas; per tensor, or 1-D along ``axis`` where the attribute is given (without
    it the spec says per tensor, so a 1-D scale there is a barrier)."""

    domain = DOMAIN
    since = 1

    def param_axis(self, node: Node, ctx: AnalysisCtx, x: str, r: int) -> int | None:
        if not any(a.name == "axis" for a in node.attribute):
            per_tensor(ctx, node.input[1], _input(node, 2))
            return None
        return super().param_axis(node, ctx, x, r)


class _Quantize:
    op_types = ("QuantizeLinear",)


class _Dequantize:
    op_types = ("DequantizeLinear",)
    dequantizes = True
    shows_constant = True  # a slot of the op reading a dequantized weight reaches the quantized constant


@register
class QuantizeLinear10(_Quantize, _Linear10):
    pass


@register
class QuantizeLinear13(_Quantize, _Linear13):
    pass


@register
class QuantizeLinear21(_Quantize, _Linear21):
    pass


@register
class DequantizeLinear10(_Dequantize, _Linear10):
    pass


@register
class DequantizeLinear13(_Dequantize, _Linear13):
    pass


@register
class DequantizeLinear21(_Dequantize, _Linear21):
    pass


@register
class QuantizeLinearContrib(_Quantize, _LinearContrib):
    pass


@register
class DequantizeLinearContrib(_Dequantize, _LinearContrib):
    pass


# -- convolutions ---------------------------------------------------------------------------------


class _QConv(Handler):
    """Conv's channel flow over (x, w, B); ``w_scale``/``w_zp`` per tensor or per output channel."""

    since = 10
    x_params: tuple[int, ...] = ()  # inputs that must be per tensor (x's and y's scales and zero points)
    w_scale: int | None = None
    w_zp: int | None = None
    bias: int | None = None

    def analyze(self, node: Node, ctx: AnalysisCtx) -> None:
        per_tensor(ctx, *(_input(node, i) for i in self.x_params))
        w = node.input[self.w_index]
        inputs = [node.input[0], w] + ([_input(node, self.bias)] if self.bias is not None and _input(node, self.bias)
                                       else [])
        if ctx.shape(node.input[0]) is None or ctx.shape(w) is None or ctx.shape(node.output[0]) is None:
            return
        _CONV.analyze(as_op(node, "Conv", inputs), ctx)
        zp = _input(node, self.w_zp) if self.w_zp is not None else ""
        scale = _input(node, self.w_scale) if self.w_scale is not None else ""
        axis = per_channel(ctx, w, 0, scale, zp)
        ctx.quantized(w, zp or None, scale or None, axis)

    def rewrite(self, node: Node, rw: RewriteCtx) -> None:
        _CONV.rewrite_group(node, rw, node.input[self.w_index])  # x's channels over w's in-group width

    def macs(self, node: Node, shape_of: ShapeOf, const_of: ConstOf) -> int:
        return _CONV.macs(as_op(node, "Conv", [node.input[0], node.input[self.w_index]]), shape_of, const_of)


@register
class QLinearConv(_QConv):
    """x, x_scale, x_zp, w, w_scale, w_zp, y_scale, y_zp[, B]."""

    op_types = ("QLinearConv",)
    integer_products = ((0, 3, 5),)
    w_index, w_scale, w_zp, bias = 3, 4, 5, 8
    x_params = (1, 2, 6, 7)


@register
class ConvInteger(_QConv):
    """x, w[, x_zp[, w_zp]] -> int32."""

    op_types = ("ConvInteger",)
    integer_products = ((0, 1, 3),)
    w_index, w_zp = 1, 3
    x_params = (2,)


# -- matrix products ------------------------------------------------------------------------------


class _QMatMul(Handler):
    """MatMul's channel flow over (a, b); b's parameters per tensor or per column (b's last axis)."""

    since = 10
    a, b = 0, 1
    a_scale: int | None = None
    a_zp: int | None = None
    b_scale: int | None = None
    b_zp: int | None = None
    y_params: tuple[int, ...] = ()

    def analyze(self, node: Node, ctx: AnalysisCtx) -> None:
        a, b = node.input[self.a], node.input[self.b]
        a_scale, a_zp, scale, zp = (_input(node, i) if i is not None else ""
                                    for i in (self.a_scale, self.a_zp, self.b_scale, self.b_zp))
        per_tensor(ctx, a_scale, a_zp, *(_input(node, i) for i in self.y_params))
        rb = ctx.rank(b)
        if ctx.rank(a) is None or rb is None or ctx.shape(node.output[0]) is None:
            return
        _MATMUL.analyze(as_op(node, "MatMul", [a, b]), ctx)
        axis = per_channel(ctx, b, rb - 1, scale, zp)
        ctx.quantized(b, zp or None, scale or None, axis)
        ctx.quantized(a, a_zp or None, a_scale or None, None)

    def macs(self, node: Node, shape_of: ShapeOf, const_of: ConstOf) -> int:
        return _MATMUL.macs(as_op(node, "MatMul", [node.input[self.a], node.input[self.b]]), shape_of, const_of)


@register
class MatMulInteger(_QMatMul):
    """A, B[, a_zp[, b_zp]] -> int32."""

    op_types = ("MatMulInteger",)
    integer_products = ((0, 1, 3), (1, 0, 2))
    a_zp, b_zp = 2, 3


@register
class QLinearMatMul(_QMatMul):
    """a, a_scale, a_zp, b, b_scale, b_zp, y_scale, y_zp."""

    op_types = ("QLinearMatMul",)
    integer_products = ((0, 3, 5), (3, 0, 2))
    a, b = 0, 3
    a_scale, a_zp, b_scale, b_zp = 1, 2, 4, 5
    y_params = (6, 7)


@register
class QGemm(Handler):
    """A, a_scale, a_zp, B, b_scale, b_zp[, C[, y_scale, y_zp]] (com.microsoft)."""

    op_types = ("QGemm",)
    integer_products = ((0, 3, 5),)
    domain = DOMAIN

    def analyze(self, node: Node, ctx: AnalysisCtx) -> None:
        a, b, c = node.input[0], node.input[3], _input(node, 6)
        per_tensor(ctx, node.input[1], node.input[2], _input(node, 7), _input(node, 8))
        if ctx.shape(a) is None or ctx.shape(b) is None or ctx.shape(node.output[0]) is None:
            return
        _GEMM.analyze(as_op(node, "Gemm", [a, b] + ([c] if c else [])), ctx)
        n_axis = 0 if int(ctx.attr("transB") or 0) else 1
        axis = per_channel(ctx, b, n_axis, node.input[4], _input(node, 5))
        ctx.quantized(b, _input(node, 5) or None, node.input[4], axis)
        ctx.quantized(a, node.input[2] or None, node.input[1], None)

    def macs(self, node: Node, shape_of: ShapeOf, const_of: ConstOf) -> int:
        return _GEMM.macs(node, shape_of, const_of)  # A is input 0, transA an attribute, as in Gemm


# -- elementwise, pooling, concatenation (com.microsoft) ------------------------------------------


@register
class QLinearBinary(Handler):
    """QLinearAdd, QLinearMul: A, A_scale, A_zp, B, B_scale, B_zp, C_scale[, C_zp]; broadcasting."""

    op_types = ("QLinearAdd", "QLinearMul")
    domain = DOMAIN

    def analyze(self, node: Node, ctx: AnalysisCtx) -> None:
        per_tensor(ctx, *(_input(node, i) for i in (1, 2, 4, 5, 6, 7)))
        a, b = node.input[0], node.input[3]
        broadcast_links(node, ctx, [a, b])
        ctx.quantized(a, _input(node, 2) or None, node.input[1], None)
        ctx.quantized(b, _input(node, 5) or None, node.input[4], None)


@register
class QLinearUnary(Handler):
    """QLinearSigmoid, QLinearLeakyRelu: X, X_scale, X_zp, Y_scale, Y_zp; elementwise."""

    op_types = ("QLinearSigmoid", "QLinearLeakyRelu")
    domain = DOMAIN

    def analyze(self, node: Node, ctx: AnalysisCtx) -> None:
        per_tensor(ctx, *(_input(node, i) for i in (1, 2, 3, 4)))
        broadcast_links(node, ctx, node.input[:1])


@register
class QLinearPool(Handler):
    """QLinearGlobalAveragePool, QLinearAveragePool: X, x_scale, x_zp, y_scale, y_zp; the batch axis and
    the channel axis (1, or the last with ``channels_last=1``) pass, the spatial axes are not carried."""

    op_types = ("QLinearGlobalAveragePool", "QLinearAveragePool")
    domain = DOMAIN

    def analyze(self, node: Node, ctx: AnalysisCtx) -> None:
        per_tensor(ctx, *(_input(node, i) for i in (1, 2, 3, 4)))
        x, y = node.input[0], node.output[0]
        r = ctx.rank(x)
        if r is None or ctx.rank(y) != r:
            return
        c = r - 1 if int(ctx.attr("channels_last") or 0) else 1
        ctx.identity(x, 0, y, 0)
        ctx.identity(x, c, y, c)


@register
class QLinearConcat(Handler):
    """Y_scale, Y_zp, then (X_i, X_i_scale, X_i_zp) per input; Concat along ``axis``."""

    op_types = ("QLinearConcat",)
    domain = DOMAIN

    def analyze(self, node: Node, ctx: AnalysisCtx) -> None:
        if (len(node.input) - 2) % 3:
            raise Barrier("inputs are not (tensor, scale, zero point) triples")
        per_tensor(ctx, node.input[0], node.input[1], *node.input[3::3], *node.input[4::3])
        link_parts(node, ctx, node.output[0], node.input[2::3])


# -- dynamic quantization -------------------------------------------------------------------------


@register
class DynamicQuantizeLinear(Handler):
    """x -> (y, y_scale, y_zp): elementwise with a range over the whole tensor (module docstring)."""

    op_types = ("DynamicQuantizeLinear",)
    since = 11

    def analyze(self, node: Node, ctx: AnalysisCtx) -> None:
        x, y = node.input[0], node.output[0]
        r = ctx.rank(x)
        if r is None:
            return
        for t in node.output[1:]:
            ctx.cover(t)
        for ax in range(r):
            ctx.identity(x, ax, y, ax)
            if not ctx.has_space(x, ax):
                continue
            if removed_stay_zero(ctx, x, ax):
                ctx.mark_contraction(x, ax)
            else:
                ctx.approximate(x, ax, f"DynamicQuantizeLinear '{node.name}' takes its range over every channel "
                                       f"and its removed channels are not provably zero")


# ops after which a channel that is zero in the input is zero in the output (f(0) = 0 per element, or
# a pooling over one channel); Clip only when its bounds hold 0
_KEEP_ZERO_UNARY = frozenset({"Relu", "LeakyRelu", "Elu", "Gelu", "Tanh", "HardSwish", "Neg", "Cast", "Identity",
                              "Clip"})
_KEEP_ZERO_POOL = frozenset({"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool"})
_RESHAPES = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze"})


def removed_stay_zero(ctx: AnalysisCtx, t: str, axis: int, depth: int = 0) -> bool:
    """Whether axis ``axis`` of ``t`` is exactly 0 at every removed channel in the masked original of a
    group whose producers and biases are masked too (``mark_contraction``). True where a Conv,
    ConvInteger, MatMul, MatMulInteger or Gemm with a constant weight writes the channels (its filters
    are producer slots, masked to their zero point, and its bias a param slot), followed by ops that keep
    a zero channel zero: Relu-like activations and Clip around 0, poolings, Mul by anything, Div by a
    constant, Add/Sub of two such tensors or of a per-channel constant (a param slot), reshapes,
    Transpose and Concat. Anything else: False."""
    r = ctx.rank(t)
    if depth > 64 or r is None or ctx.const_source(t) is not None:
        return False
    axis = axis + r if axis < 0 else axis
    p = ctx.producer(t)
    if p is None or p.domain not in ("", "ai.onnx"):
        return False
    op, ins = p.op_type, [i for i in p.input]

    def const(i: int) -> bool:
        return len(ins) > i and bool(ins[i]) and ctx.const_source(ins[i]) is not None

    def full(name: str) -> bool:  # a constant with a size > 1 on the aligned axis: a param slot there
        s = ctx.shape(name)
        k = axis - (r - len(s)) if s is not None else -1
        return ctx.const_source(name) is not None and 0 <= k < len(s) and s[k] > 1

    def zero(name: str) -> bool:
        s = ctx.shape(name)
        k = axis - (r - len(s)) if s is not None else -1
        return bool(name) and 0 <= k < len(s) and s[k] == ctx.shape(t)[axis] and removed_stay_zero(ctx, name, k, depth + 1)

    if op in ("Conv", "ConvInteger"):  # the filters and the bias (input 2 of Conv) are masked
        return axis == 1 and const(1) and (len(ins) < 3 or not ins[2] or op == "ConvInteger" or const(2))
    if op in ("MatMul", "MatMulInteger"):
        return (axis == r - 1 and const(1)) or (axis == r - 2 and const(0) and r >= 2)
    if op == "Gemm":
        n_axis_const = const(1)
        c = ins[2] if len(ins) > 2 else ""
        return axis == 1 and n_axis_const and (not c or full(c))
    if op in _KEEP_ZERO_UNARY:
        if op == "Clip" and not _clip_holds_zero(ctx, p):
            return False
        return removed_stay_zero(ctx, ins[0], axis, depth + 1)
    if op in _KEEP_ZERO_POOL:
        return axis == 1 and removed_stay_zero(ctx, ins[0], 1, depth + 1)
    if op == "Mul":
        return zero(ins[0]) or zero(ins[1])
    if op == "Div":
        v = ctx.value(ins[1])
        return v is not None and bool(np.all(v != 0)) and zero(ins[0])
    if op in ("Add", "Sub"):
        return all(zero(i) or full(i) for i in ins[:2]) and any(ctx.const_source(i) is None for i in ins[:2])
    if op == "Concat":
        return all(removed_stay_zero(ctx, i, axis, depth + 1) for i in ins if i)
    if op == "Transpose":
        rx = ctx.rank(ins[0])
        return rx is not None and removed_stay_zero(ctx, ins[0], transpose_perm(p, ctx, rx)[axis], depth + 1)
    if op in _RESHAPES:
        xs, ys = ctx.shape(ins[0]), ctx.shape(t)
        for ii, jj in (factor_blocks(xs, ys) or []) if xs is not None and ys is not None else []:
            if axis in jj:
                spaced = [i for i in ii if xs[i] > 1]
                return bool(spaced) and all(removed_stay_zero(ctx, ins[0], i, depth + 1) for i in spaced)
    return False


def _clip_holds_zero(ctx: AnalysisCtx, node: Node) -> bool:
    """Clip's bounds (attributes below opset 11, inputs since; absent: unbounded) hold 0."""
    lo, hi = ctx.attr("min", node), ctx.attr("max", node)
    for i, name in ((1, "lo"), (2, "hi")):
        if len(node.input) > i and node.input[i]:
            v = ctx.value(node.input[i])
            if v is None:
                return False
            if name == "lo":
                lo = float(np.asarray(v).reshape(-1)[0])
            else:
                hi = float(np.asarray(v).reshape(-1)[0])
    return (lo is None or lo <= 0.0) and (hi is None or hi >= 0.0)
