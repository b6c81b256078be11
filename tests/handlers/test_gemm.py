"""Gemm and MatMul (handlers/gemm.py): transA/transB, MatMul with the constant first, weights
reached through a Transpose; a MatMul of two activations (attention) is approximate."""

from __future__ import annotations

from onnxprune.testing import checks
from onnxprune.testing.graphs import H17, Case

# ----------------------------------------------------------------------------------------------
# graphs written out in full: (id, text, expected initializer shapes after ratio 0.5, positive)

CASES = [
    # --- Gemm and MatMul --------------------------------------------------------------------
    Case("Gemm-transB1-then-transB0", H17 + """
g (float[N,16] x) => (float[N,8] y)
<float[32,16] w1, float[32] b1, float[32,8] w2, float[8] b2>
{
  h = Gemm<transB=1>(x, w1, b1)
  r = Relu(h)
  y = Gemm(r, w2, b2)
}""", {"w1": (16, 16), "b1": (16,), "w2": (16, 8), "b2": (8,)}),
    Case("Gemm-transB0-then-transB1", H17 + """
g (float[N,16] x) => (float[N,8] y)
<float[16,32] w1, float[1,32] b1, float[8,32] w2, float[8] b2>
{
  h = Gemm<transB=0, alpha=0.5, beta=2.0>(x, w1, b1)
  r = Tanh(h)
  y = Gemm<transB=1>(r, w2, b2)
}""", {"w1": (16, 16), "b1": (1, 16), "w2": (8, 16), "b2": (8,)}),
    Case("MatMul-MLP-2d", H17 + """
g (float[N,16] x) => (float[N,8] y)
<float[16,32] w1, float[32] b1, float[32,8] w2, float[8] b2>
{
  mm1 = MatMul(x, w1)
  h = Add(mm1, b1)
  r = Relu(h)
  mm2 = MatMul(r, w2)
  y = Add(mm2, b2)
}""", {"w1": (16, 16), "b1": (16,), "w2": (16, 8), "b2": (8,)}),
    Case("MatMul-MLP-3d", H17 + """
g (float[N,5,16] x) => (float[N,5,8] y)
<float[16,32] w1, float[32] b1, float[32,8] w2, float[8] b2>
{
  mm1 = MatMul(x, w1)
  h = Add(b1, mm1)
  r = Sigmoid(h)
  mm2 = MatMul(r, w2)
  y = Add(mm2, b2)
}""", {"w1": (16, 16), "b1": (16,), "w2": (16, 8), "b2": (8,)}),
    # MatMul with the constant first (channels-first features [N,C,T]) and Transpose default perm
    Case("MatMul-constant-first", H17 + """
g (float[N,16,5] x) => (float[N,8,5] y)
<float[32,16] w1, float[32,1] b1, float[8,32] w2>
{
  mm = MatMul(w1, x)
  h = Add(mm, b1)
  r = Relu(h)
  y = MatMul(w2, r)
}""", {"w1": (16, 16), "b1": (16, 1), "w2": (8, 16)}),
    Case("Gemm-transA", H17 + """
g (float[N,16] x) => (float[N,8] y)
<float[16,32] w1, float[32,8] w2>
{
  xt = Transpose<perm=[1,0]>(x)
  h = Gemm<transA=1>(xt, w1)
  r = Relu(h)
  y = Gemm(r, w2)
}""", {"w1": (16, 16), "w2": (16, 8)}),
    # weights reached through Transpose / Cast of a constant
    Case("MatMul-transposed-constant-weight", H17 + """
g (float[N,16] x) => (float[N,8] y)
<float[32,16] w1, float[8,32] w2>
{
  w1t = Transpose<perm=[1,0]>(w1)
  h = MatMul(x, w1t)
  r = Relu(h)
  w2t = Transpose<perm=[1,0]>(w2)
  y = MatMul(r, w2t)
}""", {"@h:1": (16, 16), "@y:1": (16, 8)}),
]


# ----------------------------------------------------------------------------------------------
# other ratios

# (case, ratio, expected shapes)
RATIO_CASES = [
    ("MatMul-MLP-2d", 0.25, {"w1": (16, 24), "b1": (24,), "w2": (24, 8)}),
    ("MatMul-MLP-3d", 0.75, {"w1": (16, 8), "b1": (8,), "w2": (8, 8)}),
]


# ----------------------------------------------------------------------------------------------
# approximate groups: frozen by default, pruned only with allow_approximate

# (id, text, shapes by default, shapes with allow_approximate, words in the frozen reason)
APPROX_CASES = [
    # q and k are not linear in their weights (Sigmoid): their contraction is approximate
    ("MatMul-two-activations", H17 + """
g (float[N,5,16] x) => (float[N,5,16] y)
<float[16,24] w0, float[24,8] wq, float[24,8] wk, float[24,8] wv, float[8,16] wo>
{
  h0 = MatMul(x, w0)
  r0 = Relu(h0)
  q0 = MatMul(r0, wq)
  q = Sigmoid(q0)
  k0 = MatMul(r0, wk)
  k = Tanh(k0)
  v = MatMul(r0, wv)
  kt = Transpose<perm=[0,2,1]>(k)
  s = MatMul(q, kt)
  p = Softmax<axis=-1>(s)
  o = MatMul(p, v)
  y = MatMul(o, wo)
}""", {"w0": (16, 12), "wq": (12, 8), "wk": (12, 8)}, {"w0": (16, 12), "wq": (12, 4), "wk": (12, 4)},
        "two activations"),
]


class TestGemm(checks.GraphCases, checks.RatioCases, checks.ApproxCases):
    """The standard tests over ``CASES``, ``RATIO_CASES`` and ``APPROX_CASES`` (``checks.CaseTests``)."""
