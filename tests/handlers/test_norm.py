"""Normalizations and softmax (handlers/norm.py): BatchNormalization and InstanceNormalization
slice per channel; softmax over a spatial axis does not touch the channels; LayerNormalization
and softmax over the channel axis mix channels (approximate: frozen unless allowed)."""

from __future__ import annotations

from onnxprune.testing import checks
from onnxprune.testing.graphs import (
    H17,
    PREFIX_FROZEN,
    PREFIX_PRUNED,
    Case,
    prefixed_text,
    sandwich_case,
    sandwich_expect,
)

# (id, mid nodes, extra initializers, opset, positive initializers, output spatial size)
SANDWICHES = [
    # normalizations
    sandwich_case("BatchNormalization", "m = BatchNormalization(h, sc, bi, mu, var)",
     "float[8] sc, float[8] bi, float[8] mu, float[8] var", 17, ("var",), 8),
    sandwich_case("BatchNormalization-opset11", "m = BatchNormalization(h, sc, bi, mu, var)",
     "float[8] sc, float[8] bi, float[8] mu, float[8] var", 11, ("var",), 8),
    sandwich_case("InstanceNormalization", "m = InstanceNormalization(h, sc, bi)", "float[8] sc, float[8] bi", 17, (), 8),
    # softmax over a spatial axis does not touch the channels
    sandwich_case("Softmax-spatial", "m = Softmax<axis=3>(h)", "", 17, (), 8),
    sandwich_case("LogSoftmax-spatial", "m = LogSoftmax<axis=-1>(h)", "", 13, (), 8),
    sandwich_case("Softmax-spatial-opset11", "m = Softmax<axis=2>(h)", "", 11, (), 8),
]


# ----------------------------------------------------------------------------------------------
# graphs written out in full: (id, text, expected initializer shapes after ratio 0.5, positive)

CASES = [
    Case("Gemm-BatchNormalization-1d", H17 + """
g (float[N,16] x) => (float[N,8] y)
<float[32,16] w1, float[32] sc, float[32] bi, float[32] mu, float[32] var, float[8,32] w2>
{
  h = Gemm<transB=1>(x, w1)
  n = BatchNormalization(h, sc, bi, mu, var)
  r = Relu(n)
  y = Gemm<transB=1>(r, w2)
}""", {"w1": (16, 16), "sc": (16,), "var": (16,), "w2": (8, 16)}, positive=("var",)),
    Case("LayerNormalization-over-time-axis-is-exact", H17 + """
g (float[N,16,6] x) => (float[N,8,6] y)
<float[32,16] w1, float[6] g6, float[6] b6, float[8,32] w2>
{
  h = MatMul(w1, x)
  n = LayerNormalization<axis=-1>(h, g6, b6)
  y = MatMul(w2, n)
}""", {"w1": (16, 16), "w2": (8, 16)}),
]


# ----------------------------------------------------------------------------------------------
# other ratios

# (case, ratio, expected shapes)
RATIO_CASES = [
    ("sandwich-BatchNormalization", 0.75, {**sandwich_expect(2), "var": (2,)}),
]


# ----------------------------------------------------------------------------------------------
# approximate groups: frozen by default, pruned only with allow_approximate

# (id, text, shapes by default, shapes with allow_approximate, words in the frozen reason)
APPROX_CASES = [
    ("LayerNormalization", H17 + """
g (float[N,16] x) => (float[N,8] y)
<float[24,16] w0, float[32,24] w1, float[32] b1, float[32] ga, float[32] be, float[8,32] w2>
{
  h0 = Gemm<transB=1>(x, w0)
  r0 = Relu(h0)
  h = Gemm<transB=1>(r0, w1, b1)
  n = LayerNormalization<axis=-1>(h, ga, be)
  y = Gemm<transB=1>(n, w2)
}""", {"w0": (12, 16), "w1": (32, 12), "ga": (32,), "w2": (8, 32)},
        {"w0": (12, 16), "w1": (16, 12), "ga": (16,), "be": (16,), "w2": (8, 16)}, "LayerNormalization"),
    ("LayerNormalization-3d", H17 + """
g (float[N,5,16] x) => (float[N,5,8] y)
<float[16,24] w0, float[24,32] w1, float[32] ga, float[8,32] w2>
{
  h0 = MatMul(x, w0)
  r0 = Relu(h0)
  h = MatMul(r0, w1)
  n = LayerNormalization<axis=2, epsilon=0.001>(h, ga)
  w2t = Transpose<perm=[1,0]>(w2)
  y = MatMul(n, w2t)
}""", {"w0": (16, 12), "w1": (12, 32), "ga": (32,)},
        {"w0": (16, 12), "w1": (12, 16), "ga": (16,)}, "LayerNormalization"),
    ("Softmax-channels", prefixed_text("m = Softmax<axis=1>(h)"), PREFIX_FROZEN, PREFIX_PRUNED, "Softmax"),
    ("Softmax-channels-opset11", prefixed_text("m = Softmax<axis=1>(h)", opset=11), PREFIX_FROZEN, PREFIX_PRUNED,
     "Softmax"),
    ("LogSoftmax-channels", prefixed_text("m = LogSoftmax<axis=-3>(h)", opset=13), PREFIX_FROZEN, PREFIX_PRUNED,
     "LogSoftmax"),
]


class TestNorm(checks.SandwichCases, checks.GraphCases, checks.RatioCases, checks.ApproxCases):
    """The standard tests over ``SANDWICHES``, ``CASES``, ``RATIO_CASES`` and ``APPROX_CASES``
    (``checks.CaseTests``)."""
