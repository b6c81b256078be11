"""Reshape, Flatten, Transpose, Squeeze and Unsqueeze (handlers/reshape.py): flatten blocks into a
Gemm, constant and computed reshape targets, channel shuffles, regrouping reshapes."""

from __future__ import annotations

import numpy as np
import pytest

from onnxprune import pipeline
from onnxprune.testing import checks, graphs
from onnxprune.testing.graphs import H17, Case, header, prefixed_text, sandwich_case

# (id, mid nodes, extra initializers, opset, positive initializers, output spatial size)
SANDWICHES = [
    # transpose there and back
    sandwich_case("Transpose-roundtrip", "t = Transpose<perm=[0,2,3,1]>(h)\n  m = Transpose<perm=[0,3,1,2]>(t)", "", 17, (), 8),
    sandwich_case("Reshape-roundtrip", "r = Reshape(h, s1)\n  m = Reshape(r, s2)",
     "int64[3] s1 = {0, 8, -1}, int64[4] s2 = {-1, 8, 8, 8}", 17, (), 8),
    # Flatten<axis=2> merges the batch into the channel axis ([N*8, 64]); the target's channel entry
    # is rewritten and the batch stays dynamic
    sandwich_case("Flatten-merges-batch-and-channels", "f = Flatten<axis=2>(h)\n  m = Reshape(f, s2)",
     "int64[4] s2 = {-1, 8, 8, 8}", 17, (), 8),
    sandwich_case("Flatten-Reshape-back", "f = Flatten<axis=1>(h)\n  m = Reshape(f, s2)", "int64[4] s2 = {-1, 8, 8, 8}", 17, (), 8),
]


# ----------------------------------------------------------------------------------------------
# graphs written out in full: (id, text, expected initializer shapes after ratio 0.5, positive)

CASES = [
    # --- Reshape / Flatten / Transpose / Squeeze / Unsqueeze ----------------------------------
    Case("Flatten-Gemm", H17 + """
g (float[N,3,4,4] x) => (float[N,10] y)
<float[8,3,3,3] w1, float[8] b1, float[128,10] wf, float[10] bf>
{
  h = Conv<pads=[1,1,1,1]>(x, w1, b1)
  r = Relu(h)
  f = Flatten(r)
  y = Gemm(f, wf, bf)
}""", {"w1": (4, 3, 3, 3), "wf": (64, 10)}),
    Case("Reshape-0-minus1-Gemm", H17 + """
g (float[N,3,4,4] x) => (float[N,10] y)
<float[8,3,3,3] w1, float[10,128] wf, int64[2] sh = {0, -1}>
{
  h = Conv<pads=[1,1,1,1]>(x, w1)
  f = Reshape(h, sh)
  y = Gemm<transB=1>(f, wf)
}""", {"w1": (4, 3, 3, 3), "wf": (10, 64)}),
    Case("Reshape-minus1-128-MatMul", H17 + """
g (float[N,3,4,4] x) => (float[N,10] y)
<float[8,3,3,3] w1, float[128,10] wf, int64[2] sh = {-1, 128}>
{
  h = Conv<pads=[1,1,1,1]>(x, w1)
  f = Reshape(h, sh)
  y = MatMul(f, wf)
}""", {"w1": (4, 3, 3, 3), "wf": (64, 10)}),
    # PyTorch-export flatten: the target is computed from Shape at run time
    Case("Reshape-computed-target", H17 + """
g (float[N,3,4,4] x) => (float[N,10] y)
<float[8,3,3,3] w1, float[10,128] wf, int64 zero = {0}, int64[1] zax = {0}, int64[1] m1 = {-1}>
{
  h = Conv<pads=[1,1,1,1]>(x, w1)
  s = Shape(h)
  n = Gather(s, zero)
  nu = Unsqueeze(n, zax)
  t = Concat<axis=0>(nu, m1)
  f = Reshape(h, t)
  y = Gemm<transB=1>(f, wf)
}""", {"w1": (4, 3, 3, 3), "wf": (10, 64)}),
    Case("Transpose-NHWC-MatMul-Transpose", H17 + """
g (float[N,3,4,4] x) => (float[N,4,4,4] y)
<float[8,3,3,3] w1, float[8,6] wm, float[6] bm, float[4,6,3,3] w2>
{
  h = Conv<pads=[1,1,1,1]>(x, w1)
  t = Transpose<perm=[0,2,3,1]>(h)
  mm = MatMul(t, wm)
  a = Add(mm, bm)
  r = Relu(a)
  tb = Transpose<perm=[0,3,1,2]>(r)
  y = Conv<pads=[1,1,1,1]>(tb, w2)
}""", {"w1": (4, 3, 3, 3), "wm": (4, 3), "bm": (3,), "w2": (4, 3, 3, 3)}),
    Case("Squeeze-Gemm-Unsqueeze", H17 + """
g (float[N,3,8,8] x) => (float[N,4,1,1] y)
<float[8,3,3,3] w1, float[16,8] wg, float[16] bg, float[4,16,1,1] w3, int64[2] ax = {2,3}>
{
  h = Conv<pads=[1,1,1,1]>(x, w1)
  p = GlobalAveragePool(h)
  sq = Squeeze(p, ax)
  gm = Gemm<transB=1>(sq, wg, bg)
  us = Unsqueeze(gm, ax)
  y = Conv(us, w3)
}""", {"w1": (4, 3, 3, 3), "wg": (8, 4), "bg": (8,), "w3": (4, 8, 1, 1)}),
    Case("Squeeze-Gemm-Unsqueeze-opset11", header(11) + """
g (float[N,3,8,8] x) => (float[N,4,1,1] y)
<float[8,3,3,3] w1, float[16,8] wg, float[16] bg, float[4,16,1,1] w3>
{
  h = Conv<pads=[1,1,1,1]>(x, w1)
  p = GlobalAveragePool(h)
  sq = Squeeze<axes=[-1,2]>(p)
  gm = Gemm<transB=1>(sq, wg, bg)
  us = Unsqueeze<axes=[2,-1]>(gm)
  y = Conv(us, w3)
}""", {"w1": (4, 3, 3, 3), "wg": (8, 4), "bg": (8,), "w3": (4, 8, 1, 1)}),
    Case("Squeeze-Gemm-Unsqueeze-opset13-negative-axes", header(13) + """
g (float[N,3,8,8] x) => (float[N,4,1,1] y)
<float[8,3,3,3] w1, float[16,8] wg, float[4,16,1,1] w3, int64[2] ax = {-1,-2}, int64[2] ux = {-2,-1}>
{
  h = Conv<pads=[1,1,1,1]>(x, w1)
  p = GlobalAveragePool(h)
  sq = Squeeze(p, ax)
  gm = Gemm<transB=1>(sq, wg)
  us = Unsqueeze(gm, ux)
  y = Conv(us, w3)
}""", {"w1": (4, 3, 3, 3), "wg": (8, 4), "w3": (4, 8, 1, 1)}),
    # ShuffleNet channel shuffle: [N,8,5,5] -> [N,2,4,5,5] -> perm [0,2,1,3,4] -> [N,8,5,5]
    Case("ChannelShuffle", H17 + """
g (float[N,3,5,5] x) => (float[N,4,5,5] y)
<float[8,3,3,3] w1, float[8] b1, float[4,8,3,3] w2, int64[5] s1 = {-1, 2, 4, 5, 5},
 int64[4] s2 = {-1, 8, 5, 5}>
{
  h = Conv<pads=[1,1,1,1]>(x, w1, b1)
  r = Relu(h)
  a = Reshape(r, s1)
  t = Transpose<perm=[0,2,1,3,4]>(a)
  b = Reshape(t, s2)
  y = Conv<pads=[1,1,1,1]>(b, w2)
}""", {"w1": (4, 3, 3, 3), "b1": (4,), "w2": (4, 4, 3, 3)}),
    Case("Transpose-default-perm-MatMul", H17 + """
g (float[N,16] x) => (float[N,8] y)
<float[16,32] w1, float[8,32] w2>
{
  h = MatMul(x, w1)
  t = Transpose(h)
  m = MatMul(w2, t)
  y = Transpose(m)
}""", {"w1": (16, 16), "w2": (8, 16)}),
    # channel shuffle with 4 groups of 2: the group index is the followed factor
    Case("ChannelShuffle-4-groups", H17 + """
g (float[N,3,5,5] x) => (float[N,4,5,5] y)
<float[8,3,3,3] w1, float[4,8,1,1] w2, int64[5] s1 = {0, 4, 2, 5, 5}, int64[4] s2 = {0, -1, 5, 5}>
{
  h = Conv<pads=[1,1,1,1]>(x, w1)
  a = Reshape(h, s1)
  t = Transpose<perm=[0,2,1,3,4]>(a)
  b = Reshape(t, s2)
  y = Conv(b, w2)
}""", {"w1": (4, 3, 3, 3), "w2": (4, 4, 1, 1)}),
    Case("Flatten-opset11-Gemm", header(11) + """
g (float[N,3,4,4] x) => (float[N,10] y)
<float[8,3,3,3] w1, float[10,128] wf>
{
  h = Conv<pads=[1,1,1,1]>(x, w1)
  f = Flatten<axis=1>(h)
  y = Gemm<transB=1>(f, wf)
}""", {"w1": (4, 3, 3, 3), "wf": (10, 64)}),
]


BY_ID = graphs.index(CASES, SANDWICHES)  # cases by id, sandwiches as "sandwich-<id>"


# ----------------------------------------------------------------------------------------------
# other ratios

# (case, ratio, expected shapes)
RATIO_CASES = [
    ("Flatten-Gemm", 0.75, {"w1": (2, 3, 3, 3), "wf": (32, 10)}),
    ("ChannelShuffle", 0.75, {"w1": (2, 3, 3, 3), "w2": (4, 2, 3, 3)}),
]


class TestReshape(checks.SandwichCases, checks.GraphCases, checks.RatioCases):
    """The standard tests over ``SANDWICHES``, ``CASES`` and ``RATIO_CASES`` (``checks.CaseTests``)."""


# ----------------------------------------------------------------------------------------------
# what exactly was kept: flatten blocks, shuffled channels, rewritten targets, regrouping


def test_flatten_gemm_removes_weight_rows_in_blocks_of_16():
    model = BY_ID["Flatten-Gemm"].model()
    res = checks.prune_and_verify(model)
    o, p = checks.inits(model), checks.inits(res.pruned)
    k1 = checks.kept_along(o["w1"], p["w1"], 0)
    rows = np.concatenate([np.arange(c * 16, c * 16 + 16) for c in k1])
    np.testing.assert_array_equal(p["wf"], o["wf"][rows])
    np.testing.assert_array_equal(p["bf"], o["bf"])
    checks.assert_exact(res, model)


@pytest.mark.parametrize("case_id,groups,t1,t2", [
    ("ChannelShuffle", 2, [-1, 2, 2, 5, 5], [-1, 4, 5, 5]),
    ("ChannelShuffle-4-groups", 4, [0, 2, 2, 5, 5], [0, -1, 5, 5]),
])
def test_channel_shuffle_is_pruned_through_both_reshapes(case_id, groups, t1, t2):
    model = BY_ID[case_id].model()
    res = checks.prune_and_verify(model)
    checks.assert_exact(res, model)
    o, p = checks.inits(model), checks.inits(res.pruned)
    reshapes = [n for n in res.pruned.graph.node if n.op_type == "Reshape"]
    assert [list(p[n.input[1]]) for n in reshapes] == [t1, t2]
    per = 8 // groups
    k1 = checks.kept_along(o["w1"], p["w1"], 0)  # h channel e = g*per + q
    k2 = checks.kept_along(o["w2"], p["w2"], 1)  # shuffled channel q*groups + g
    h_kept = {(e // per, e % per) for e in k1}
    y_kept = {(e % groups, e // groups) for e in k2}
    assert h_kept == y_kept  # the consumer reads exactly the kept producer channels, shuffled


def test_reshape_constant_target_rewritten():
    model = BY_ID["Reshape-minus1-128-MatMul"].model()
    res = checks.prune_and_verify(model)
    checks.assert_exact(res, model)
    assert list(checks.const_input(res.pruned, "Reshape", 1)) == [-1, 64]


def test_reshape_regroup_with_common_atoms_prunes_channel_pairs():
    """[N,8,8,8] -> [N,4,16,8] -> [N,8,8,8]: both sides refine into atoms 4 x 2 x 8, so channel
    pairs (c//2) are the units; pruning keeps them together and verifies exactly."""
    model = graphs.build(prefixed_text("r = Reshape(h, s1)\n  m = Reshape(r, s2)", "int64[4] s1 = {0,4,16,8}, int64[4] s2 = {0,8,8,8}"))
    res = checks.prune_and_verify(model)
    assert res.verification.passed
    assert all(o.rel_error < checks.TOL for o in res.verification.outputs)
    w1 = checks.shapes_of(res.pruned)["w1"]
    assert w1[0] < 8 and w1[0] % 2 == 0  # whole pairs removed


def test_reshape_regroup_without_common_factor_is_frozen():
    text = H17 + """
g (float[N,12] x) => (float[N,5] y)
<float[12,96] w1, float[96,5] w2>
{
  h = MatMul(x, w1)
  r = Reshape(h, s1)
  m = Reshape(r, s2)
  y = MatMul(m, w2)
}"""
    text = text.replace("<float[12,96] w1, float[96,5] w2>",
                        "<float[12,96] w1, float[96,5] w2, int64[3] s1 = {0,12,8}, int64[3] s2 = {0,8,12}>")
    text = text.replace("m = Reshape(r, s2)", "m2 = Reshape(r, s2)\n  s3 = Constant<value=int64[2] {0,96}>()\n  m = Reshape(m2, s3)")
    an = pipeline.analyze_model(graphs.build(text))
    g = next(g for g in an.cg.groups if any(sl.const == "w1" and sl.role == "producer" for sl in g.slots))
    assert g.frozen and any("without a common factor" in r for r in g.frozen)
