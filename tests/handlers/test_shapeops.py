"""Shape and index ops (handlers/shapeops.py): Shape and Size values used in arithmetic,
ConstantOfShape, Range and NonZero, Gather (spatial, or a channel subset followed and renumbered),
Expand and Tile."""

from __future__ import annotations

import numpy as np
import pytest

from onnxprune.testing import checks, graphs
from onnxprune.testing.graphs import H17, Case, prefixed_text, sandwich_case

# (id, mid nodes, extra initializers, opset, positive initializers, output spatial size)
SANDWICHES = [
    # index / broadcast ops on spatial axes
    sandwich_case("Tile", "m = Tile(h, r)", "int64[4] r = {1,1,2,2}", 17, (), 16),
    sandwich_case("Expand", "p = GlobalAveragePool(h)\n  m = Expand(p, sh)", "int64[4] sh = {1,1,8,8}", 17, (), 8),
    sandwich_case("Gather-spatial-Range", "ix = Range(st, lim, dl)\n  m0 = Gather<axis=2>(h, ix)\n  m = Gather<axis=3>(m0, ix)",
     "int64 st = {0}, int64 lim = {8}, int64 dl = {2}", 17, (), 4),
    sandwich_case("Gather-spatial-NonZero", "nz = NonZero(k)\n  ix = Squeeze(nz, zero)\n  m0 = Gather<axis=2>(h, ix)\n"
                               "  m = Gather<axis=-1>(m0, ix)",
     "bool[8] k = {1,0,1,1,0,0,1,0}, int64[1] zero = {0}", 17, (), 4),
]


# ----------------------------------------------------------------------------------------------
# graphs written out in full: (id, text, expected initializer shapes after ratio 0.5, positive)

CASES = [
    Case("Expand-channel-entry", H17 + """
g (float[N,3,8,8] x) => (float[N,4,8,8] y)
<float[8,3,3,3] w1, float[4,8,3,3] w2, int64[4] sh = {1, 8, 8, 8}>
{
  h = Conv<pads=[1,1,1,1]>(x, w1)
  p = GlobalAveragePool(h)
  e = Expand(p, sh)
  m = Mul(e, h)
  y = Conv<pads=[1,1,1,1]>(m, w2)
}""", {"w1": (4, 3, 3, 3), "w2": (4, 4, 3, 3)}),
]


BY_ID = graphs.index(CASES, SANDWICHES)  # cases by id, sandwiches as "sandwich-<id>"


# ----------------------------------------------------------------------------------------------
# barriers: the group touching the op is frozen (weights untouched) with a reason naming it

FROZEN_CASES = [
    ("Tile-channels", prefixed_text("m = Tile(h, r)", "int64[4] r = {1,2,1,1}", cin2=16), ["Tile", "does not carry"]),
    ("ConstantOfShape-of-Shape", prefixed_text("sh = Shape(h)\n  ones = ConstantOfShape<value=float[1] {1.0}>(sh)\n"
                                               "  m = Mul(h, ones)"), ["ConstantOfShape", "does not carry axis 1"]),
]


class TestShapeOps(checks.SandwichCases, checks.GraphCases, checks.FrozenCases):
    """The standard tests over ``SANDWICHES``, ``CASES`` and ``FROZEN_CASES`` (``checks.CaseTests``)."""


# ----------------------------------------------------------------------------------------------
# rewritten constants, regressions and Gather on the channel axis


def test_expand_target_channel_entry_rewritten():
    model = BY_ID["Expand-channel-entry"].model()
    res = checks.prune_and_verify(model)
    checks.assert_exact(res, model)
    assert list(checks.const_input(res.pruned, "Expand", 1)) in ([1, 1, 8, 8], [1, 4, 8, 8])


@pytest.mark.parametrize("mid", [
    "sz = Size(h)\n  f = Cast<to=1>(sz)\n  m = Div(h, f)",
    "sh = Shape(h)\n  p = ReduceProd<keepdims=0>(sh)\n  f = Cast<to=1>(p)\n  m = Div(h, f)",
], ids=["Size", "Shape-ReduceProd"])
def test_regression_shape_value_used_in_arithmetic(mid):
    checks.assert_verifies(graphs.build(prefixed_text(mid)))


@pytest.mark.parametrize("mid,extra", [
    ("m = Gather<axis=1>(h, ix)", "int64[8] ix = {7, 6, 5, 4, 3, 2, 1, 0}"),
    ("g2 = Gather<axis=1>(h, ix)\n  r = ReduceMean<axes=[1]>(g2)\n  m = Mul(h, r)", "int64[2] ix = {1, 5}"),
], ids=["permutation", "two-channels"])
def test_regression_gather_on_channel_axis(mid, extra):
    checks.assert_verifies(graphs.build(prefixed_text(mid, extra)))


@pytest.mark.parametrize("idx", ["{7, 6, 5, 4, 3, 2, 1, 0}", "{1, 5}", "{0, 2, 4, 6}"])
def test_gather_channel_subset_is_followed_and_indices_renumbered(idx):
    n = idx.count(",") + 1
    model = graphs.build(H17 + f"""
g (float[N,3,8,8] x) => (float[N,4,8,8] y)
<float[8,3,3,3] w1, float[4,{n},3,3] w2, int64[{n}] ix = {idx}>
{{ h = Conv<pads=[1,1,1,1]>(x, w1)  r = Relu(h)  m = Gather<axis=1>(r, ix)  y = Conv<pads=[1,1,1,1]>(m, w2) }}""")
    res = checks.prune_and_verify(model)
    assert res.verification.passed and res.verification.outputs[0].rel_error < checks.TOL
    shapes = checks.shapes_of(res.pruned)
    assert shapes["w1"][0] < 8
    gather = next(nd for nd in res.pruned.graph.node if nd.op_type == "Gather")
    new_idx = checks.inits(res.pruned)[gather.input[1]]
    assert new_idx.max() < shapes["w1"][0] and len(np.unique(new_idx)) == len(new_idx)


# ----------------------------------------------------------------------------------------------
# Expand of a size-1 axis: grouped-query attention's repeat_kv (2 KV heads, 2 query heads each)

GQA = H17 + """
g (float[N,S,16] x) => (float[N,S,16] y)
<float[16,16] wq, float[16,8] wk, float[16,8] wv, float[16,16] wo, int64[4] sq = {0, 0, 4, 4},
 int64[4] skv = {0, 0, 2, 4}, int64[1] two = {2}, int64[5] ex = {1, 1, 2, 1, 1}, int64[4] sh4 = {0, 4, -1, 4},
 int64[3] sf = {0, 0, 16}>
{
  q = MatMul(x, wq)
  q4 = Reshape(q, sq)
  qt = Transpose<perm=[0,2,1,3]>(q4)
  k = MatMul(x, wk)
  k4 = Reshape(k, skv)
  kt = Transpose<perm=[0,2,1,3]>(k4)
  ku = Unsqueeze(kt, two)
  ke = Expand(ku, ex)
  kr = Reshape(ke, sh4)
  ktt = Transpose<perm=[0,1,3,2]>(kr)
  sc = MatMul(qt, ktt)
  p = Softmax<axis=-1>(sc)
  v = MatMul(x, wv)
  v4 = Reshape(v, skv)
  vt = Transpose<perm=[0,2,1,3]>(v4)
  vu = Unsqueeze(vt, two)
  ve = Expand(vu, ex)
  vr = Reshape(ve, sh4)
  o = MatMul(p, vr)
  ot = Transpose<perm=[0,2,1,3]>(o)
  of = Reshape(ot, sf)
  y = MatMul(of, wo)
}"""


@pytest.mark.parametrize("gqa,expect,copies", [
    ("kv", {"wq": (16, 8), "wk": (16, 4), "wv": (16, 4), "wo": (8, 16)}, 2),  # one KV group and its 2 query heads
    ("query", {"wq": (16, 8), "wk": (16, 8), "wv": (16, 8), "wo": (8, 16)}, 1),  # one query head per group
])
def test_expand_repeat_follows_grouped_query_heads(gqa, expect, copies):
    """The repeated axis is a channel space ("repeat"): with --gqa kv the query heads follow their KV
    head, with --gqa query they follow the copy index and the Expand entry becomes the copies kept."""
    model = graphs.build(GQA)
    res = checks.prune_and_verify(model, ratio=0.0, head_ratio=0.5, gqa=gqa)
    checks.assert_exact(res, model, expect)
    targets = {tuple(int(v) for v in checks.inits(res.pruned)[nd.input[1]]) for nd in res.pruned.graph.node
               if nd.op_type == "Expand"}
    assert targets == {(1, 1, copies, 1, 1)}, targets
    if gqa == "query":
        assert any("--gqa query" in r for r in checks.frozen_reasons(res))


def test_expand_repeat_count_inside_a_computed_target():
    """The target is a Concat of the run-time batch and constants (as exporters write it): the
    constant repeat entry is rewritten, the batch entry stays computed."""
    text = GQA.replace("int64[5] ex = {1, 1, 2, 1, 1}, ", "int64[1] one = {1}, int64[1] two2 = {2}, ").replace(
        "ke = Expand(ku, ex)", "xs = Shape<start=0, end=1>(x)\n  ex = Concat<axis=0>(xs, one, two2, one, one)\n"
                               "  ke = Expand(ku, ex)")
    model = graphs.build(text)
    res = checks.prune_and_verify(model, ratio=0.0, head_ratio=0.5, gqa="query")
    checks.assert_exact(res, model, {"wq": (16, 8), "wk": (16, 8), "wv": (16, 8), "wo": (8, 16)})
    cat = next(nd for nd in res.pruned.graph.node if nd.op_type == "Concat")
    assert int(checks.inits(res.pruned)[cat.input[2]][0]) == 1  # one copy of each KV head kept
