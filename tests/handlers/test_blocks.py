"""Blocks of real architectures that span handler families: residual adds of conv branches and of
an identity skip, squeeze-and-excitation, the MobileNetV2 inverted residual."""

from __future__ import annotations

from onnxprune.testing import checks
from onnxprune.testing.graphs import H17, Case

# ----------------------------------------------------------------------------------------------
# graphs written out in full: (id, text, expected initializer shapes after ratio 0.5, positive)

CASES = [
    # --- two-branch structures ----------------------------------------------------------------
    Case("Residual-Add-of-two-conv-branches", H17 + """
g (float[N,3,8,8] x) => (float[N,4,8,8] y)
<float[8,3,3,3] w1, float[8,8,3,3] wa, float[8] ba, float[8,8,1,1] wb, float[4,8,1,1] w4>
{
  h = Conv<pads=[1,1,1,1]>(x, w1)
  r = Relu(h)
  a = Conv<pads=[1,1,1,1]>(r, wa, ba)
  b = Conv(r, wb)
  s = Add(a, b)
  y = Conv(s, w4)
}""", {"w1": (4, 3, 3, 3), "wa": (4, 4, 3, 3), "ba": (4,), "wb": (4, 4, 1, 1), "w4": (4, 4, 1, 1)}),
    Case("Residual-identity-skip", H17 + """
g (float[N,3,8,8] x) => (float[N,4,8,8] y)
<float[8,3,3,3] w1, float[8,8,3,3] wa, float[8] sc, float[8] bi, float[8] mu, float[8] var,
 float[8,8,3,3] wb, float[4,8,1,1] w4>
{
  h = Conv<pads=[1,1,1,1]>(x, w1)
  r = Relu(h)
  a = Conv<pads=[1,1,1,1]>(r, wa)
  bn = BatchNormalization(a, sc, bi, mu, var)
  ar = Relu(bn)
  b = Conv<pads=[1,1,1,1]>(ar, wb)
  s = Add(r, b)
  sr = Relu(s)
  y = Conv(sr, w4)
}""", {"w1": (4, 3, 3, 3), "wa": (4, 4, 3, 3), "sc": (4,), "var": (4,), "wb": (4, 4, 3, 3),
       "w4": (4, 4, 1, 1)}, positive=("var",)),
    Case("Squeeze-Excitation", H17 + """
g (float[N,3,8,8] x) => (float[N,4,8,8] y)
<float[8,3,3,3] w1, float[8] b1, float[4,8,1,1] wr, float[4] br, float[8,4,1,1] we, float[8] be,
 float[4,8,3,3] w3>
{
  h = Conv<pads=[1,1,1,1]>(x, w1, b1)
  p = GlobalAveragePool(h)
  s1 = Conv(p, wr, br)
  s2 = Relu(s1)
  s3 = Conv(s2, we, be)
  s4 = Sigmoid(s3)
  m = Mul(h, s4)
  y = Conv<pads=[1,1,1,1]>(m, w3)
}""", {"w1": (4, 3, 3, 3), "b1": (4,), "wr": (2, 4, 1, 1), "br": (2,), "we": (4, 2, 1, 1), "be": (4,),
       "w3": (4, 4, 3, 3)}),
    # MobileNetV2 inverted residual: expand 1x1 -> BN -> Clip(0,6) -> depthwise -> BN -> Clip ->
    # project 1x1 -> BN -> + input of the block
    Case("MobileNetV2-inverted-residual", H17 + """
g (float[N,3,8,8] x) => (float[N,4,8,8] y)
<float[8,3,3,3] w0, float[24,8,1,1] we, float[24] s1, float[24] b1, float[24] m1, float[24] v1,
 float[24,1,3,3] wd, float[24] s2, float[24] b2, float[24] m2, float[24] v2, float[8,24,1,1] wp, float[8] bp,
 float[4,8,1,1] wo, float lo = {0.0}, float hi = {6.0}>
{
  a = Conv<pads=[1,1,1,1]>(x, w0)
  e = Conv(a, we)
  en = BatchNormalization(e, s1, b1, m1, v1)
  er = Clip(en, lo, hi)
  d = Conv<pads=[1,1,1,1], group=24>(er, wd)
  dn = BatchNormalization(d, s2, b2, m2, v2)
  dr = Clip(dn, lo, hi)
  p = Conv(dr, wp, bp)
  s = Add(a, p)
  y = Conv(s, wo)
}""", {"w0": (4, 3, 3, 3), "we": (12, 4, 1, 1), "v1": (12,), "wd": (12, 1, 3, 3), "v2": (12,),
       "wp": (4, 12, 1, 1), "bp": (4,), "wo": (4, 4, 1, 1)}, positive=("v1", "v2")),
]


class TestBlocks(checks.GraphCases):
    """The standard tests over ``CASES`` (``checks.CaseTests``)."""
