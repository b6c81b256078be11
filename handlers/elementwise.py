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
    tp_per_output = 1

    def analyze(self, node: Node, ctx: AnalysisCtx) -> None:
        broadcast_links(node, ctx)


@register
class Dropout(Handler):
    op_types = ("Dropout",)
    carries_tensor = True

    def analyze(self, node: Node, ctx: AnalysisCtx) -> None:
        broadcast_links(node, ctx, node.input[:1])
        for t in node.input[1:]:
            ctx.cover(t)
        if len(node.output) > 1 and node.output[1]:
            r = ctx.rank(node.output[1]) or 0
            for ax in range(r):
                ctx.identity(node.output[1], ax, node.output[0], ax)
