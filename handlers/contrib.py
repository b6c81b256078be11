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

Every other contrib op (SkipLayerNormalization, BiasSoftmax, FusedMatMul, NhwcConv, Attention, ...)
has no handler, so it stays a barrier that freezes every tensor it touches.

The registry is keyed by domain; the analysis looks contrib ops up at opset 1 (``since = 1``).
Torch-Pruning's count (``tp_ops``) sees the fused Gelu as nn.GELU (1 per output element) and no
other contrib op: FusedConv and FusedGemm count nothing there (their MACs are Conv's and Gemm's).
"""

from __future__ import annotations

from onnxprune.handlers.conv import Conv
from onnxprune.handlers.elementwise import broadcast_links
from onnxprune.handlers.gemm import Gemm

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


@register
class FusedGemm(Gemm):
    """Gemm + activation (``activation``, ``activation_alpha/beta/gamma``)."""

    op_types = ("FusedGemm",)
    domain = DOMAIN
    since = 1
    shape_stand_in = "Gemm"

    def tp_ops(self, node: Node, shape_of: ShapeOf, const_of: ConstOf, graph: CountGraph) -> int:
        return 0


@register
class ContribElementwise(Handler):
    """Per-element activations: QuickGelu (one input), FastGelu, BiasGelu (input, bias)."""

    op_types = ("QuickGelu", "FastGelu", "BiasGelu")
    domain = DOMAIN
    since = 1
    shape_stand_in = "Add"  # input (+ bias broadcast on the last axis); one input: Add keeps its shape

    def analyze(self, node: Node, ctx: AnalysisCtx) -> None:
        broadcast_links(node, ctx, node.input[:2])


@register
class ContribGelu(ContribElementwise):
    """Gelu (one input): the fused nn.GELU, which Torch-Pruning counts 1 per output element."""

    op_types = ("Gelu",)
    tp_per_output = 1
