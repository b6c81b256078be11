"""Elementwise ops (handlers/elementwise.py): unary ops, binary ops with per-channel constants
(sliced as parameters), comparisons and boolean logic feeding Where, PRelu and Dropout."""

from __future__ import annotations

from onnxprune.testing import checks
from onnxprune.testing.graphs import H17, Case, sandwich_case, sandwich_expect

C8 = "float[8,1,1] c"

# (id, mid nodes, extra initializers, opset, positive initializers, output spatial size)
SANDWICHES = [
    # elementwise with a per-channel constant (sliced as a param)
    sandwich_case("Add", "m = Add(h, c)", C8, 17, (), 8),
    sandwich_case("Add-const-first", "m = Add(c, h)", C8, 17, (), 8),
    sandwich_case("Sub", "m = Sub(h, c)", C8, 17, (), 8),
    sandwich_case("Sub-const-first", "m = Sub(c, h)", C8, 17, (), 8),
    sandwich_case("Mul", "m = Mul(h, c)", C8, 17, (), 8),
    sandwich_case("Mul-full-const", "m = Mul(h, c)", "float[8,8,8] c", 17, (), 8),
    sandwich_case("Div", "m = Div(h, c)", C8, 17, ("c",), 8),
    sandwich_case("Max", "m = Max(h, c)", C8, 17, (), 8),
    sandwich_case("Min", "m = Min(h, c)", C8, 17, (), 8),
    sandwich_case("Sum", "m = Sum(h, c, h)", C8, 17, (), 8),
    sandwich_case("Mean", "m = Mean(h, c)", C8, 17, (), 8),
    sandwich_case("Mod", "m = Mod<fmod=1>(h, c)", C8, 17, ("c",), 8),
    sandwich_case("PRelu", "m = PRelu(h, c)", C8, 17, (), 8),
    sandwich_case("Pow", "m = Pow(h, e)", "float e = {2.0}", 17, (), 8),
    sandwich_case("Pow-per-channel-exponent", "p = Sigmoid(h)\n  m = Pow(p, e)", "float[8,1,1] e", 17, (), 8),
    sandwich_case("Clip", "m = Clip(h, lo, hi)", "float lo = {-0.5}, float hi = {0.7}", 17, (), 8),
    sandwich_case("Clip-opset11", "m = Clip(h, lo, hi)", "float lo = {-0.5}, float hi = {0.7}", 11, (), 8),
    sandwich_case("Clip-min-only", "m = Clip(h, lo)", "float lo = {0.1}", 13, (), 8),
    # unary
    sandwich_case("Relu", "m = Relu(h)", "", 17, (), 8),
    sandwich_case("LeakyRelu", "m = LeakyRelu<alpha=0.1>(h)", "", 17, (), 8),
    sandwich_case("Sigmoid", "m = Sigmoid(h)", "", 17, (), 8),
    sandwich_case("HardSigmoid", "m = HardSigmoid(h)", "", 17, (), 8),
    sandwich_case("HardSwish", "m = HardSwish(h)", "", 17, (), 8),
    sandwich_case("Tanh", "m = Tanh(h)", "", 17, (), 8),
    sandwich_case("Erf", "m = Erf(h)", "", 17, (), 8),
    sandwich_case("Identity", "m = Identity(h)", "", 17, (), 8),
    sandwich_case("Dropout", "m = Dropout(h)", "", 17, (), 8),
    sandwich_case("Dropout-mask", "m, mask = Dropout(h)", "", 17, (), 8),
    sandwich_case("Dropout-opset11", "m = Dropout<ratio=0.3>(h)", "", 11, (), 8),
    sandwich_case("Cast", "m = Cast<to=1>(h)", "", 17, (), 8),
    sandwich_case("Cast-double-roundtrip", "d = Cast<to=11>(h)\n  m = Cast<to=1>(d)", "", 17, (), 8),
    sandwich_case("CastLike", "m = CastLike(h, c)", "float c = {0.0}", 17, (), 8),
    sandwich_case("Neg", "m = Neg(h)", "", 17, (), 8),
    sandwich_case("Abs", "m = Abs(h)", "", 17, (), 8),
    sandwich_case("Exp", "m = Exp(h)", "", 17, (), 8),
    sandwich_case("Log-Sqrt-Reciprocal", "p = Sigmoid(h)\n  l = Log(p)\n  q = Sqrt(p)\n  r = Reciprocal(p)\n"
                            "  lq = Add(l, q)\n  m = Add(lq, r)", "", 17, (), 8),
    sandwich_case("Elu", "m = Elu<alpha=0.5>(h)", "", 17, (), 8),
    sandwich_case("Selu", "m = Selu(h)", "", 17, (), 8),
    sandwich_case("Celu", "m = Celu(h)", "", 17, (), 8),
    sandwich_case("Softplus-Softsign", "p = Softplus(h)\n  m = Softsign(p)", "", 17, (), 8),
    sandwich_case("Gelu", "m = Gelu(h)", "", 20, (), 8),
    sandwich_case("Gelu-tanh", "m = Gelu<approximate=\"tanh\">(h)", "", 20, (), 8),
    sandwich_case("Mish", "m = Mish(h)", "", 18, (), 8),
    sandwich_case("ThresholdedRelu", "m = ThresholdedRelu<alpha=0.3>(h)", "", 17, (), 8),
    sandwich_case("Floor-Ceil-Round-Sign", "f = Floor(h)\n  cc = Ceil(h)\n  r = Round(h)\n  sg = Sign(h)\n"
                              "  a = Sum(f, cc, r, sg)\n  m = Add(a, h)", "", 17, (), 8),
    sandwich_case("Sin-Cos", "sn = Sin(h)\n  cs = Cos(h)\n  m = Mul(sn, cs)", "", 17, (), 8),
    # comparisons and boolean logic feeding Where
    sandwich_case("Greater-Where", "g = Greater(h, c)\n  m = Where(g, h, c2)", C8 + ", float[8,1,1] c2", 17, (), 8),
    sandwich_case("Where-cond-const", "m = Where(k, h, c2)", "bool[8,1,1] k = {1,0,1,1,0,0,1,0}, float[8,1,1] c2",
     17, (), 8),
    sandwich_case("Logic", "l = Less(h, c)\n  ge = GreaterOrEqual(h, z)\n  a = And(l, ge)\n  le = LessOrEqual(h, z)\n"
              "  o = Or(a, le)\n  nn = Not(o)\n  xo = Xor(nn, l)\n  m = Where(xo, h, c)",
     C8 + ", float z = {0.0}", 17, (), 8),
    sandwich_case("Equal", "f = Floor(h)\n  eq = Equal(f, z)\n  m = Where(eq, c, h)", C8 + ", float z = {0.0}", 17, (), 8),
    sandwich_case("IsNaN", "nan = IsNaN(h)\n  m = Where(nan, c, h)", C8, 17, (), 8),
    sandwich_case("BitShift", "r = Relu(h)\n  k = Mul(r, ten)\n  fl = Floor(k)\n  q = Cast<to=12>(fl)\n"
                 "  sh = BitShift<direction=\"LEFT\">(q, one)\n  m = Cast<to=1>(sh)",
     "float ten = {10.0}, uint32 one = {1}", 17, (), 8),
]


# ----------------------------------------------------------------------------------------------
# graphs written out in full: (id, text, expected initializer shapes after ratio 0.5, positive)

CASES = [
    Case("Gemm-PRelu-1d", H17 + """
g (float[N,16] x) => (float[N,8] y)
<float[32,16] w1, float[32] sl, float[8,32] w2>
{
  h = Gemm<transB=1>(x, w1)
  r = PRelu(h, sl)
  y = Gemm<transB=1>(r, w2)
}""", {"w1": (16, 16), "sl": (16,), "w2": (8, 16)}),
]


# ----------------------------------------------------------------------------------------------
# other ratios

RATIO_CASES = [
    # (case source, ratio, expected shapes)
    ("sandwich-Relu", 0.25, sandwich_expect(6)),
    ("sandwich-Relu", 0.75, sandwich_expect(2)),
    ("sandwich-Relu", 0.9, sandwich_expect(1)),
]


class TestElementwise(checks.SandwichCases, checks.GraphCases, checks.RatioCases):
    """The standard tests over ``SANDWICHES``, ``CASES`` and ``RATIO_CASES`` (``checks.CaseTests``)."""
