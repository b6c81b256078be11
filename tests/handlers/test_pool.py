"""Pooling and reductions (handlers/pool.py): spatial pools and reductions (with and without
keepdims, axes as attribute or input), MaxRoiPool; a reduction over the channel axis is
approximate; MaxPool indices encode channel positions."""

from __future__ import annotations

from onnxprune.testing import checks, graphs
from onnxprune.testing.graphs import (
    H17,
    PREFIX_FROZEN,
    PREFIX_PRUNED,
    Case,
    header,
    prefixed_text,
    sandwich_case,
)

# (id, mid nodes, extra initializers, opset, positive initializers, output spatial size)
SANDWICHES = [
    # pooling and spatial reductions
    sandwich_case("MaxPool", "m = MaxPool<kernel_shape=[2,2], strides=[2,2]>(h)", "", 17, (), 4),
    sandwich_case("MaxPool-indices", "m, idx = MaxPool<kernel_shape=[2,2], strides=[2,2]>(h)", "", 17, (), 4),
    sandwich_case("AveragePool", "m = AveragePool<kernel_shape=[3,3], pads=[1,1,1,1]>(h)", "", 17, (), 8),
    sandwich_case("LpPool", "m = LpPool<kernel_shape=[2,2], strides=[2,2], p=2>(h)", "", 17, (), 4),
    sandwich_case("GlobalAveragePool", "m = GlobalAveragePool(h)", "", 17, (), 1),
    sandwich_case("GlobalMaxPool", "m = GlobalMaxPool(h)", "", 17, (), 1),
    sandwich_case("GlobalLpPool", "m = GlobalLpPool<p=2>(h)", "", 17, (), 1),
    sandwich_case("ReduceMean-keepdims", "m = ReduceMean<axes=[2,3], keepdims=1>(h)", "", 17, (), 1),
    sandwich_case("ReduceMax-keepdims", "m = ReduceMax<axes=[-2,-1]>(h)", "", 17, (), 1),
    sandwich_case("ReduceMean-opset11", "m = ReduceMean<axes=[2,3], keepdims=1>(h)", "", 11, (), 1),
    sandwich_case("ReduceMean-opset18", "m = ReduceMean<keepdims=1>(h, ax)", "int64[2] ax = {2,3}", 18, (), 1),
    sandwich_case("ReduceMax-opset18", "m = ReduceMax(h, ax)", "int64[2] ax = {-1,-2}", 18, (), 1),
    sandwich_case("ReduceSum-opset13", "m = ReduceSum(h, ax)", "int64[2] ax = {2,3}", 13, (), 1),
    sandwich_case("ReduceSum-opset11", "m = ReduceSum<axes=[2,3]>(h)", "", 11, (), 1),
    sandwich_case("ReduceMin", "m = ReduceMin<axes=[2,3]>(h)", "", 17, (), 1),
    sandwich_case("ReduceProd", "p = Sigmoid(h)\n  m = ReduceProd<axes=[2,3]>(p)", "", 17, (), 1),
    sandwich_case("ReduceL1-L2", "a = ReduceL1<axes=[2,3]>(h)\n  b = ReduceL2<axes=[2,3]>(h)\n  m = Add(a, b)", "", 17, (), 1),
    sandwich_case("ReduceLogSum-LogSumExp-SumSquare",
     "p = Sigmoid(h)\n  a = ReduceLogSum<axes=[2,3]>(p)\n  b = ReduceLogSumExp<axes=[2,3]>(h)\n"
     "  q = ReduceSumSquare<axes=[2,3]>(h)\n  m = Sum(a, b, q)", "", 17, (), 1),
]


# ----------------------------------------------------------------------------------------------
# graphs written out in full: (id, text, expected initializer shapes after ratio 0.5, positive)

CASES = [
    # --- reductions without keepdims into a Gemm ----------------------------------------------
    Case("ReduceMean-keepdims0-Gemm", H17 + """
g (float[N,3,8,8] x) => (float[N,10] y)
<float[8,3,3,3] w1, float[10,8] wf, float[10] bf>
{
  h = Conv<pads=[1,1,1,1]>(x, w1)
  p = ReduceMean<axes=[2,3], keepdims=0>(h)
  y = Gemm<transB=1>(p, wf, bf)
}""", {"w1": (4, 3, 3, 3), "wf": (10, 4)}),
    Case("ReduceMax-keepdims0-opset18-Gemm", header(18) + """
g (float[N,3,8,8] x) => (float[N,10] y)
<float[8,3,3,3] w1, float[8,10] wf, int64[2] ax = {3, 2}>
{
  h = Conv<pads=[1,1,1,1]>(x, w1)
  p = ReduceMax<keepdims=0>(h, ax)
  y = Gemm(p, wf)
}""", {"w1": (4, 3, 3, 3), "wf": (4, 10)}),
    Case("GlobalMaxPool-Flatten-Gemm", H17 + """
g (float[N,3,8,8] x) => (float[N,10] y)
<float[8,3,3,3] w1, float[10,8] wf>
{
  h = Conv<pads=[1,1,1,1]>(x, w1)
  p = GlobalMaxPool(h)
  f = Flatten(p)
  y = Gemm<transB=1>(f, wf)
}""", {"w1": (4, 3, 3, 3), "wf": (10, 4)}),
    Case("MaxRoiPool", H17 + """
g (float[N,3,8,8] x) => (float[3,4,2,2] y)
<float[8,3,3,3] w1, float[4,8,1,1] w2, float[3,5] rois = {0,0,0,7,7, 0,1,1,4,5, 0,2,0,7,3}>
{
  h = Conv<pads=[1,1,1,1]>(x, w1)
  p = MaxRoiPool<pooled_shape=[2,2]>(h, rois)
  y = Conv(p, w2)
}""", {"w1": (4, 3, 3, 3), "w2": (4, 4, 1, 1), "rois": (3, 5)}),
]


# ----------------------------------------------------------------------------------------------
# approximate groups: frozen by default, pruned only with allow_approximate

# (id, text, shapes by default, shapes with allow_approximate, words in the frozen reason)
APPROX_CASES = [
    ("ReduceMean-over-channels", prefixed_text("mu = ReduceMean<axes=[1]>(h)\n  m = Sub(h, mu)"),
     PREFIX_FROZEN, PREFIX_PRUNED, "ReduceMean"),
]


class TestPool(checks.SandwichCases, checks.GraphCases, checks.ApproxCases):
    """The standard tests over ``SANDWICHES``, ``CASES`` and ``APPROX_CASES`` (``checks.CaseTests``)."""


# ----------------------------------------------------------------------------------------------
# regressions


def test_regression_maxpool_indices_values_depend_on_channels():
    checks.assert_verifies(graphs.build(prefixed_text("mp, idx = MaxPool<kernel_shape=[1,1]>(h)\n  fi = Cast<to=1>(idx)\n"
                                                      "  sc = Mul(fi, eps)\n  m = Add(mp, sc)", "float eps = {0.001}")))
