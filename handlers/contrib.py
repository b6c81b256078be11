"""onnxruntime contrib ops (domain ``com.microsoft``) that its graph optimizer produces.

On the torchvision CNNs, ``ORT_ENABLE_EXTENDED`` with the CPU provider produces FusedConv
(Conv + Relu/Clip/Sigmoid/HardSigmoid/...), FusedGemm (Gemm + activation) and QuickGelu
(``x * sigmoid(alpha * x)``, i.e. SiLU). Transformer fusions add Gelu, FastGelu and BiasGelu.

- FusedConv: Conv (same channel flow, same ``group`` rewrite, same MACs); the activation is per
  element. The optional 4th input Z is summed in before the activation, like a residual Add: every
  axis of Z is the same index set as the output's.
- FusedGemm: Gemm followed by an elementwise activation.
- Gelu, QuickGelu (unary) and FastGelu, BiasGelu (input + optional bias broadcast on the last axis):
  elementwise; a constant bias is a param slot.

The transformer ops (SkipLayerNormalization, Attention, MatMulNBits, ...) are in ``ms_transformer.py``.
Every other contrib op (BiasSoftmax, FusedMatMul, NhwcConv, ...) has no handler, so it stays a barrier
that freezes every tensor it touches.

The registry is keyed by domain; the analysis looks contrib ops up at opset 1 (``since = 1``).
Torch-Pruning's count (``tp_ops``) sees the fused Gelu as nn.GELU (1 per output element) and no
other contrib op: FusedConv and FusedGemm count nothing there (their MACs are Conv's and Gemm's).
"""

from __future__ import annotations

from onnxprune.handlers.conv import Conv, conv_forward
from onnxprune.handlers.elementwise import broadcast_links
from onnxprune.handlers.gemm import Gemm, gemm_forward

from onnxprune.analysis.contract import AnalysisCtx, ConstOf, CountGraph, Handler, Node, ShapeOf, register

DOMAIN = "com.microsoft"


@register
class FusedConv(Conv):
    """Conv + activation (``activation``, ``activation_params``) + optional summed input Z."""

    op_types = ("FusedConv",)
    domain = DOMAIN
    since = 1
    shape_stand_in = "Conv"

    def analyze(self, node: Node, ctx: AnalysisCtx) -> None:
        super().analyze(node, ctx)
        z = node.input[3] if len(node.input) > 3 else ""
        if z:
            # Y = act(conv(X, W) + B + Z): Z is added elementwise, like the other operand of an Add
            broadcast_links(node, ctx, [z])

    def tp_ops(self, node: Node, shape_of: ShapeOf, const_of: ConstOf, graph: CountGraph) -> int:
        return 0

    def torch_forward(self, node: Node, xs: list, op):
        """act(conv(X, W, B) + Z), the activation's parameters in ``activation_params``."""
        y = conv_forward(node, xs[:3], op)
        if len(xs) > 3 and xs[3] is not None:
            y = y + xs[3]
        params = list(op.attr("activation_params") or [])
        return fused_activation(op.attr("activation", "Identity"), y, params, op)


@register
class FusedGemm(Gemm):
    """Gemm + activation (``activation``, ``activation_alpha/beta/gamma``)."""

    op_types = ("FusedGemm",)
    domain = DOMAIN
    since = 1
    shape_stand_in = "Gemm"

    def tp_ops(self, node: Node, shape_of: ShapeOf, const_of: ConstOf, graph: CountGraph) -> int:
        return 0

    def torch_forward(self, node: Node, xs: list, op):
        """act(Gemm), the activation's parameters in ``activation_alpha/beta/gamma``."""
        y = gemm_forward(xs, op)
        params = [p for p in (op.attr("activation_alpha"), op.attr("activation_beta")) if p is not None]
        return fused_activation(op.attr("activation", "Identity"), y, [float(p) for p in params], op)


@register
class ContribElementwise(Handler):
    """Per-element activations: QuickGelu (one input), FastGelu, BiasGelu (input, bias)."""

    op_types = ("QuickGelu", "FastGelu", "BiasGelu")
    domain = DOMAIN
    since = 1
    shape_stand_in = "Add"  # input (+ bias broadcast on the last axis); one input: Add keeps its shape

    def analyze(self, node: Node, ctx: AnalysisCtx) -> None:
        broadcast_links(node, ctx, node.input[:2])

    def torch_forward(self, node: Node, xs: list, op):
        F = op.F
        x = xs[0]
        if len(xs) > 1 and xs[1] is not None:
            x = x + xs[1]
        if node.op_type == "QuickGelu":
            return x * op.torch.sigmoid(float(op.attr("alpha", 1.702)) * x)
        if node.op_type == "FastGelu":
            return F.gelu(x, approximate="tanh")
        return F.gelu(x)  # BiasGelu, Gelu: the exact (erf) form


@register
class ContribGelu(ContribElementwise):
    """Gelu (one input): the fused nn.GELU, which Torch-Pruning counts 1 per output element."""

    op_types = ("Gelu",)
    tp_per_output = 1


def fused_activation(name: str, y, params: list[float], op):
    """The activations onnxruntime fuses into FusedConv / FusedGemm."""
    T = op.torch
    if name in ("", "Identity"):
        return y
    if name == "Relu":
        return T.relu(y)
    if name == "Tanh":
        return T.tanh(y)
    if name == "Sigmoid":
        return T.sigmoid(y)
    if name == "LeakyRelu":
        return op.F.leaky_relu(y, params[0] if params else 0.01)
    if name == "Clip":
        lo, hi = (params + [float("-inf"), float("inf")][len(params):])[:2]
        return T.clamp(y, lo, hi)
    if name == "HardSigmoid":
        a, b = (params + [0.2, 0.5][len(params):])[:2]
        return T.clamp(a * y + b, 0, 1)
    op.refuse(f"fused activation '{name}'")
