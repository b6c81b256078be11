"""Elementwise ops with numpy broadcasting: every output axis is the same index set in each input
whose aligned axis has the same size; constants on such axes are weight slots (sliced with it)."""

from __future__ import annotations

import onnx

from onnxprune.analysis.contract import Handler, register

UNARY = ("Relu", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Erf", "Identity", "Cast",
         "Neg", "Abs", "Exp", "Log", "Sqrt", "Reciprocal", "Elu", "Selu", "Celu", "Softplus", "Softsign",
         "Gelu", "Mish", "ThresholdedRelu", "Floor", "Ceil", "Round", "Sign", "Sin", "Cos", "Not", "IsNaN",
         "Swish", "CastLike")
BINARY = ("Add", "Sub", "Mul", "Div", "Max", "Min", "Sum", "Mean", "Pow", "Equal", "Less", "Greater",
          "LessOrEqual", "GreaterOrEqual", "And", "Or", "Xor", "Where", "Clip", "Mod", "BitShift")


def broadcast_links(node: onnx.NodeProto, ctx, inputs=None) -> None:
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
                ctx.slot(t, j, "param")
            ctx.identity(t, j, out, oa)


@register
class Unary(Handler):
    op_types = UNARY

    def analyze(self, node, ctx):
        broadcast_links(node, ctx, node.input[:1])
        if node.op_type == "CastLike" and len(node.input) > 1:
            ctx.cover(node.input[1])


@register
class Binary(Handler):
    op_types = BINARY

    def analyze(self, node, ctx):
        broadcast_links(node, ctx)


@register
class PRelu(Handler):
    op_types = ("PRelu",)

    def analyze(self, node, ctx):
        broadcast_links(node, ctx)


@register
class Dropout(Handler):
    op_types = ("Dropout",)

    def analyze(self, node, ctx):
        broadcast_links(node, ctx, node.input[:1])
        for t in node.input[1:]:
            ctx.cover(t)
        if len(node.output) > 1 and node.output[1]:
            r = ctx.rank(node.output[1]) or 0
            for ax in range(r):
                ctx.identity(node.output[1], ax, node.output[0], ax)
