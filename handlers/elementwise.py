"""Elementwise ops with numpy broadcasting: every output axis is the same index set in each input
whose aligned axis has the same size; constants on such axes are weight slots (sliced with it).

The channel flow is the same for every op here; the classes differ in the facts they declare:
Identity and Cast show a constant through them, Add/Sub/Mul/... are also integer arithmetic on
shape vectors, and Torch-Pruning counts some activations (1 per output element) but not others."""

from __future__ import annotations

import numpy as np
from onnxprune.handlers.gemm import is_linear

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
from onnxprune.ir.attrs import attr

# op type -> torch forward ``fn(inputs, op)`` of every op here (filled at the end of the module; read
# by ``onnxprune.runtime.torch_exec`` through each class's ``torch_forward``)
TORCH: dict = {}


def _torch_forward(self, node: Node, xs: list, op):
    """The torch forward of ``node`` (``onnxprune.runtime.torch_exec``): its entry of ``TORCH``."""
    return TORCH[node.op_type](xs, op)


def broadcast_links(node: Node, ctx: AnalysisCtx, inputs=None) -> None:
    """Link every input axis to the output axis it broadcasts to, where sizes match."""
    out = node.output[0]
    out_shape = ctx.shape(out)
    if out_shape is None:
        return
    R = len(out_shape)
    for t in (inputs if inputs is not None else node.input):
        if not t:
            continue
        s = ctx.shape(t)
        if s is None:
            continue
        r = len(s)
        for j in range(r):
            oa = j + R - r
            if s[j] == 1 and out_shape[oa] != 1:
                ctx.cover(t, j)
                continue
            if ctx.const_source(t) is not None and ctx.has_space(t, j):
                ctx.slot(t, j, Role.PARAM)
            ctx.identity(t, j, out, oa)


# -- one input ------------------------------------------------------------------------------------


@register
class Unary(Handler):
    op_types = ("Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Exp", "Log", "Sqrt", "Reciprocal", "Selu", "Celu",
                "Softplus", "Softsign", "Mish", "ThresholdedRelu", "Round", "Sign", "Sin", "Cos", "Not", "IsNaN",
                "Swish")
    torch_table = TORCH
    torch_forward = _torch_forward

    def analyze(self, node: Node, ctx: AnalysisCtx) -> None:
        broadcast_links(node, ctx, node.input[:1])


@register
class Activation(Unary):
    """The activations Torch-Pruning counts, 1 per output element: nn.ReLU, nn.LeakyReLU, nn.ELU,
    nn.GELU (Erf is the exact GELU as exported)."""

    op_types = ("Relu", "LeakyRelu", "Elu", "Gelu", "Erf")
    tp_per_output = 1


@register
class IntegerUnary(Unary):
    """Neg, Abs, Floor, Ceil: also integer arithmetic on shape vectors."""

    op_types = ("Neg", "Abs", "Floor", "Ceil")
    shape_arith = True


@register
class Passthrough(Unary):
    """Identity and Cast: the same values (cast) at the same positions; a constant is seen through."""

    op_types = ("Identity", "Cast")
    shows_constant = True
    moves_values = True
    keeps_zeros = True
    carries_tensor = True
    shape_arith = True


@register
class CastLike(Unary):
    """Cast to the element type of input 1 (whose values are not read)."""

    op_types = ("CastLike",)
    keeps_zeros = True

    def analyze(self, node: Node, ctx: AnalysisCtx) -> None:
        super().analyze(node, ctx)
        if len(node.input) > 1:
            ctx.cover(node.input[1])


# -- several inputs -------------------------------------------------------------------------------


@register
class Binary(Handler):
    op_types = ("Mean", "Pow", "Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "And", "Or", "Xor",
                "Where", "BitShift")
    torch_table = TORCH
    torch_forward = _torch_forward

    def analyze(self, node: Node, ctx: AnalysisCtx) -> None:
        broadcast_links(node, ctx)


@register
class IntegerBinary(Binary):
    """Sub, Mod, Max, Min, Sum: also integer arithmetic on shape vectors."""

    op_types = ("Sub", "Mod", "Max", "Min", "Sum")
    shape_arith = True


@register
class Scale(Binary):
    """Mul and Div: shape arithmetic too, and (Torch-Pruning count) the Q scaling on attention's path."""

    op_types = ("Mul", "Div")
    shape_arith = True
    carries_tensor = True


@register
class Add(Binary):
    """Add: shape arithmetic too; Torch-Pruning counts a constant bias after a weight MatMul (the
    bias of an nn.Linear) once per bias element."""

    op_types = ("Add",)
    shape_arith = True

    def linear_bias(self, node: Node, graph: CountGraph) -> str | None:
        if len(node.input) != 2:
            return None
        for b, x in ((node.input[0], node.input[1]), (node.input[1], node.input[0])):
            if graph.is_const(b) and not graph.is_const(x):
                p = graph.producer(x)
                if p is not None and p.op_type == "MatMul" and is_linear(p, graph):
                    return b
        return None

    def tp_ops(self, node: Node, shape_of: ShapeOf, const_of: ConstOf, graph: CountGraph) -> int:
        b = self.linear_bias(node, graph)
        if b is None or graph.bias_counted(node):
            return 0
        return numel(shape_of(b))


@register
class Clip(Binary):
    """Clip (bounds as attributes below opset 11, as inputs since). Torch-Pruning counts nn.ReLU6,
    exported as Clip(0, 6), 1 per output element."""

    op_types = ("Clip",)

    def tp_ops(self, node: Node, shape_of: ShapeOf, const_of: ConstOf, graph: CountGraph) -> int:
        return numel(shape_of(node.output[0])) if _is_relu6(node, const_of) else 0


def _is_relu6(node: Node, const_of: ConstOf) -> bool:
    lo, hi = attr(node, "min"), attr(node, "max")
    if len(node.input) > 1 and node.input[1]:
        c = const_of(node.input[1])
        lo = None if c is None else float(np.asarray(c).reshape(-1)[0])
    if len(node.input) > 2 and node.input[2]:
        c = const_of(node.input[2])
        hi = None if c is None else float(np.asarray(c).reshape(-1)[0])
    return lo == 0.0 and hi == 6.0


@register
class PRelu(Handler):
    """nn.PReLU: the slope is a param slot; Torch-Pruning counts 1 per output element."""

    op_types = ("PRelu",)
    torch_table = TORCH
    torch_forward = _torch_forward
    tp_per_output = 1

    def analyze(self, node: Node, ctx: AnalysisCtx) -> None:
        broadcast_links(node, ctx)


@register
class Dropout(Handler):
    op_types = ("Dropout",)
    torch_table = TORCH
    torch_forward = _torch_forward
    carries_tensor = True

    def analyze(self, node: Node, ctx: AnalysisCtx) -> None:
        broadcast_links(node, ctx, node.input[:1])
        for t in node.input[1:]:
            ctx.cover(t)
        if len(node.output) > 1 and node.output[1]:
            r = ctx.rank(node.output[1]) or 0
            for ax in range(r):
                ctx.identity(node.output[1], ax, node.output[0], ax)


# -- torch forwards -------------------------------------------------------------------------------


def _unary(fn):
    return lambda xs, op: fn(op.torch, xs[0], op)


def _variadic(fn):
    def forward(xs, op):
        out = xs[0]
        for x in xs[1:]:
            out = fn(op.torch, out, x)
        return out
    return forward


def _div(xs, op):
    a, b = xs
    if a.is_floating_point():
        return a / b
    return op.torch.div(a, b, rounding_mode="trunc")  # onnxruntime's integer Div truncates


def _mod(xs, op):
    a, b = xs
    if int(op.attr("fmod", 0)) or a.is_floating_point():
        return op.torch.fmod(a, b)
    return op.torch.remainder(a, b)  # the sign of the divisor, as the spec says for fmod=0


def _pow(xs, op):
    x, y = xs
    return op.torch.pow(x, y).to(x.dtype)  # the result has the base's type


def _bitshift(xs, op):
    T = op.torch
    a, b = xs
    return T.bitwise_left_shift(a, b) if op.attr("direction") == "LEFT" else T.bitwise_right_shift(a, b)


def _clip(xs, op):
    x = xs[0]
    if op.opset < 11:  # bounds are attributes
        lo, hi = op.attr("min"), op.attr("max")
    else:
        lo = xs[1] if len(xs) > 1 else None
        hi = xs[2] if len(xs) > 2 else None
    if lo is None and hi is None:
        return x
    return op.torch.clamp(x, lo, hi)


def _cast(xs, op):
    return xs[0].to(op.dtype(int(op.attr("to"))))


def _dropout(xs, op):
    x = xs[0]
    training = xs[2] if len(xs) > 2 and xs[2] is not None else None
    if training is not None and op.ints(training, "training_mode")[0]:
        op.refuse("training_mode is true (random masks)")
    if int(op.attr("is_test", 0) or 0) == 0 and op.opset < 7:
        op.refuse("Dropout below opset 7 in training mode")
    return x, op.torch.ones(x.shape, dtype=op.torch.bool, device=x.device)


def _hard_sigmoid(T, x, op):
    return T.clamp(float(op.attr("alpha", 0.2)) * x + float(op.attr("beta", 0.5)), 0, 1)


def _celu(T, x, op):
    a = float(op.attr("alpha", 1.0))
    return T.clamp(x, min=0) + T.clamp(a * T.expm1(x / a), max=0)


def _selu(T, x, op):
    a, g = float(op.attr("alpha")), float(op.attr("gamma"))
    return g * T.where(x > 0, x, a * T.expm1(x))


TORCH.update({
    "Sigmoid": _unary(lambda T, x, op: T.sigmoid(x)),
    "HardSigmoid": _unary(_hard_sigmoid),
    "HardSwish": _unary(lambda T, x, op: x * T.clamp(x * (1.0 / 6.0) + 0.5, 0, 1)),
    "Tanh": _unary(lambda T, x, op: T.tanh(x)),
    "Exp": _unary(lambda T, x, op: T.exp(x)),
    "Log": _unary(lambda T, x, op: T.log(x)),
    "Sqrt": _unary(lambda T, x, op: T.sqrt(x)),
    "Reciprocal": _unary(lambda T, x, op: T.reciprocal(x)),
    "Selu": _unary(_selu),
    "Celu": _unary(_celu),
    "Softplus": _unary(lambda T, x, op: T.log1p(T.exp(-T.abs(x))) + T.clamp(x, min=0)),
    "Softsign": _unary(lambda T, x, op: x / (1 + T.abs(x))),
    "Mish": _unary(lambda T, x, op: x * T.tanh(op.F.softplus(x))),
    "ThresholdedRelu": _unary(lambda T, x, op: T.where(x > float(op.attr("alpha", 1.0)), x, T.zeros_like(x))),
    "Round": _unary(lambda T, x, op: T.round(x)),  # half to even, as the spec
    "Sign": _unary(lambda T, x, op: T.sign(x)),
    "Sin": _unary(lambda T, x, op: T.sin(x)),
    "Cos": _unary(lambda T, x, op: T.cos(x)),
    "Not": _unary(lambda T, x, op: T.logical_not(x)),
    "IsNaN": _unary(lambda T, x, op: T.isnan(x)),
    "Swish": _unary(lambda T, x, op: x * T.sigmoid(float(op.attr("alpha", 1.0)) * x)),
    "Relu": _unary(lambda T, x, op: T.relu(x)),
    "LeakyRelu": _unary(lambda T, x, op: op.F.leaky_relu(x, float(op.attr("alpha", 0.01)))),
    "Elu": _unary(lambda T, x, op: op.F.elu(x, float(op.attr("alpha", 1.0)))),
    "Gelu": _unary(lambda T, x, op: op.F.gelu(x, approximate=op.attr("approximate", "none"))),
    "Erf": _unary(lambda T, x, op: T.erf(x)),
    "Neg": _unary(lambda T, x, op: T.neg(x)),
    "Abs": _unary(lambda T, x, op: T.abs(x)),
    "Floor": _unary(lambda T, x, op: T.floor(x)),
    "Ceil": _unary(lambda T, x, op: T.ceil(x)),
    "Identity": _unary(lambda T, x, op: x),
    "Cast": _cast,
    "CastLike": lambda xs, op: xs[0].to(xs[1].dtype),
    "Mean": lambda xs, op: _variadic(lambda T, a, b: a + b)(xs, op) / len(xs),
    "Pow": _pow,
    "Equal": lambda xs, op: op.torch.eq(xs[0], xs[1]),
    "Less": lambda xs, op: op.torch.lt(xs[0], xs[1]),
    "Greater": lambda xs, op: op.torch.gt(xs[0], xs[1]),
    "LessOrEqual": lambda xs, op: op.torch.le(xs[0], xs[1]),
    "GreaterOrEqual": lambda xs, op: op.torch.ge(xs[0], xs[1]),
    "And": lambda xs, op: op.torch.logical_and(xs[0], xs[1]),
    "Or": lambda xs, op: op.torch.logical_or(xs[0], xs[1]),
    "Xor": lambda xs, op: op.torch.logical_xor(xs[0], xs[1]),
    "Where": lambda xs, op: op.torch.where(xs[0], xs[1], xs[2]),
    "BitShift": _bitshift,
    "Sub": lambda xs, op: xs[0] - xs[1],
    "Mod": _mod,
    "Max": _variadic(lambda T, a, b: T.maximum(a, b)),
    "Min": _variadic(lambda T, a, b: T.minimum(a, b)),
    "Sum": _variadic(lambda T, a, b: a + b),
    "Mul": lambda xs, op: xs[0] * xs[1],
    "Div": _div,
    "Add": lambda xs, op: xs[0] + xs[1],
    "Clip": _clip,
    "PRelu": lambda xs, op: op.torch.where(xs[0] < 0, xs[0] * xs[1], xs[0]),
    "Dropout": _dropout,
})
