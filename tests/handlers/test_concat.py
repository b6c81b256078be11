"""Concat, Split and Slice (handlers/concat.py): channel offsets through concatenations (of two
convs, of one tensor twice, into a grouped conv, DenseNet chains), split sizes and slice bounds
rewritten, concat and split on a spatial axis; a slice that does not carry the channel axis is
a barrier."""

from __future__ import annotations

import numpy as np
import pytest

from onnxprune.testing import checks, graphs
from onnxprune.testing.graphs import H17, Case, header, prefixed_text

# ----------------------------------------------------------------------------------------------
# graphs written out in full: (id, text, expected initializer shapes after ratio 0.5, positive)


def split_halves(id: str, opset: int, split: str, extra: str = "") -> Case:
    """The 8 channels of h split (``split``, into a and b) in two halves, each read by a conv."""
    ex = (", " + extra) if extra else ""
    return Case(id, header(opset) + f"""
g (float[N,3,8,8] x) => (float[N,4,8,8] ya, float[N,5,8,8] yb)
<float[8,3,3,3] w1, float[4,4,3,3] wa, float[5,4,1,1] wb{ex}>
{{
  h = Conv<pads=[1,1,1,1]>(x, w1)
  {split}
  ya = Conv<pads=[1,1,1,1]>(a, wa)
  yb = Conv(b, wb)
}}""", {"w1": (4, 3, 3, 3), "wa": (4, 2, 3, 3), "wb": (5, 2, 1, 1)})


def slice_channels(id: str, slice_node: str, bounds: str) -> Case:
    """A channel range of h sliced by ``slice_node`` (into s; ``bounds`` declares its constants) is
    read by one conv, all of h by another."""
    return Case(id, H17 + f"""
g (float[N,3,8,8] x) => (float[N,4,8,8] y, float[N,5,8,8] z)
<float[8,3,3,3] w1, float[4,4,3,3] w2, float[5,8,1,1] w3, {bounds}>
{{
  h = Conv<pads=[1,1,1,1]>(x, w1)
  {slice_node}
  y = Conv<pads=[1,1,1,1]>(s, w2)
  z = Conv(h, w3)
}}""", {"w1": (4, 3, 3, 3), "w3": (5, 4, 1, 1)})


CASES = [
    # --- Concat / Split / Slice on the channel axis -------------------------------------------
    Case("Concat-two-convs", H17 + """
g (float[N,3,8,8] x) => (float[N,4,8,8] y)
<float[8,3,3,3] wa, float[6,3,1,1] wb, float[4,14,3,3] wc>
{
  a = Conv<pads=[1,1,1,1]>(x, wa)
  b = Conv(x, wb)
  cat = Concat<axis=1>(a, b)
  y = Conv<pads=[1,1,1,1]>(cat, wc)
}""", {"wa": (4, 3, 3, 3), "wb": (3, 3, 1, 1), "wc": (4, 7, 3, 3)}),
    Case("Concat-negative-axis-three-inputs", H17 + """
g (float[N,3,8,8] x) => (float[N,4,8,8] y)
<float[8,3,3,3] wa, float[4,3,1,1] wb, float[4,16,1,1] wc>
{
  a = Conv<pads=[1,1,1,1]>(x, wa)
  b = Conv(x, wb)
  cat = Concat<axis=-3>(b, a, b)
  y = Conv(cat, wc)
}""", {"wa": (4, 3, 3, 3), "wb": (2, 3, 1, 1), "wc": (4, 8, 1, 1)}),
    split_halves("Split-sizes-input", 13, "a, b = Split<axis=1>(h, sp)", "int64[2] sp = {4, 4}"),
    Case("Split-unequal-sizes-input", H17 + """
g (float[N,3,8,8] x) => (float[N,4,8,8] ya, float[N,5,8,8] yb)
<float[8,3,3,3] w1, float[4,2,3,3] wa, float[5,6,1,1] wb, int64[2] sp = {2, 6}>
{
  h = Conv<pads=[1,1,1,1]>(x, w1)
  a, b = Split<axis=-3>(h, sp)
  ya = Conv<pads=[1,1,1,1]>(a, wa)
  yb = Conv(b, wb)
}""", {"w1": (4, 3, 3, 3), "wa": (4, 1, 3, 3), "wb": (5, 3, 1, 1)}),
    split_halves("Split-attribute-opset11", 11, "a, b = Split<axis=1, split=[4,4]>(h)"),
    split_halves("Split-equal-no-sizes-opset11", 11, "a, b = Split<axis=1>(h)"),
    split_halves("Split-num_outputs-opset18", 18, "a, b = Split<axis=1, num_outputs=2>(h)"),
    slice_channels("Slice-channels", "s = Slice(h, st, en, ax)",
                   "int64[1] st = {2}, int64[1] en = {6}, int64[1] ax = {1}"),
    slice_channels("Slice-channels-open-end-negative-axis", "s = Slice(h, st, en, ax, sp)",
                   "int64[2] st = {-4, 0}, int64[2] en = {9223372036854775807, 8}, int64[2] ax = {-3, 2}, "
                   "int64[2] sp = {1, 1}"),
    split_halves("Split-equal-no-sizes-opset13", 13, "a, b = Split<axis=1>(h)"),
    Case("Concat-same-tensor-twice", H17 + """
g (float[N,3,8,8] x) => (float[N,4,8,8] y)
<float[8,3,3,3] w1, float[4,16,1,1] w2>
{
  h = Conv<pads=[1,1,1,1]>(x, w1)
  cat = Concat<axis=1>(h, h)
  y = Conv(cat, w2)
}""", {"w1": (4, 3, 3, 3), "w2": (4, 8, 1, 1)}),
    Case("Concat-spatial-axis", H17 + """
g (float[N,3,8,8] x) => (float[N,4,16,8] y)
<float[8,3,3,3] wa, float[8,3,1,1] wb, float[4,8,3,3] wc>
{
  a = Conv<pads=[1,1,1,1]>(x, wa)
  b = Conv(x, wb)
  cat = Concat<axis=2>(a, b)
  y = Conv<pads=[1,1,1,1]>(cat, wc)
}""", {"wa": (4, 3, 3, 3), "wb": (4, 3, 1, 1), "wc": (4, 4, 3, 3)}),
    Case("Split-spatial-axis", H17 + """
g (float[N,3,8,8] x) => (float[N,4,3,8] ya, float[N,5,5,8] yb)
<float[8,3,3,3] w1, float[4,8,3,3] wa, float[5,8,1,1] wb, int64[2] sp = {3, 5}>
{
  h = Conv<pads=[1,1,1,1]>(x, w1)
  a, b = Split<axis=2>(h, sp)
  ya = Conv<pads=[1,1,1,1]>(a, wa)
  yb = Conv(b, wb)
}""", {"w1": (4, 3, 3, 3), "wa": (4, 4, 3, 3), "wb": (5, 4, 1, 1), "sp": (2,)}),
    Case("Concat-into-grouped-conv", H17 + """
g (float[N,3,8,8] x) => (float[N,4,8,8] y)
<float[4,3,3,3] wa, float[4,3,1,1] wb, float[8,4,3,3] wg, float[4,8,1,1] w3>
{
  a = Conv<pads=[1,1,1,1]>(x, wa)
  b = Conv(x, wb)
  cat = Concat<axis=1>(a, b)
  gg = Conv<auto_pad="SAME_UPPER", group=2>(cat, wg)
  y = Conv(gg, w3)
}""", {"wa": (2, 3, 3, 3), "wb": (2, 3, 1, 1), "wg": (4, 2, 3, 3), "w3": (4, 4, 1, 1)}),
    # DenseNet: every layer reads the concatenation of all earlier outputs
    Case("DenseNet-concat-chain", H17 + """
g (float[N,3,8,8] x) => (float[N,4,8,8] y)
<float[8,3,3,3] w0, float[4,8,3,3] w1, float[4,12,3,3] w2, float[4,16,1,1] wt>
{
  a = Conv<pads=[1,1,1,1]>(x, w0)
  ar = Relu(a)
  b = Conv<pads=[1,1,1,1]>(ar, w1)
  c1 = Concat<axis=1>(ar, b)
  c1r = Relu(c1)
  c = Conv<pads=[1,1,1,1]>(c1r, w2)
  c2 = Concat<axis=1>(c1, c)
  y = Conv(c2, wt)
}""", {"w0": (4, 3, 3, 3), "w1": (2, 4, 3, 3), "w2": (2, 6, 3, 3), "wt": (4, 8, 1, 1)}),
    Case("Split-num_outputs-uneven-opset18", header(18) + """
g (float[N,3,8,8] x) => (float[N,4,8,8] ya, float[N,4,8,8] yb, float[N,4,8,8] yc)
<float[8,3,3,3] w1, float[4,3,3,3] wa, float[4,3,1,1] wb, float[4,2,1,1] wc>
{
  h = Conv<pads=[1,1,1,1]>(x, w1)
  a, b, c = Split<axis=1, num_outputs=3>(h)
  ya = Conv<pads=[1,1,1,1]>(a, wa)
  yb = Conv(b, wb)
  yc = Conv(c, wc)
}""", {"w1": (4, 3, 3, 3)}),
    slice_channels("Slice-without-axes-input", "s = Slice(h, st, en)",
                   "int64[2] st = {0, 2}, int64[2] en = {9223372036854775807, 6}"),
]


BY_ID = graphs.index(CASES, ())  # cases by id, sandwiches as "sandwich-<id>"


# ----------------------------------------------------------------------------------------------
# other ratios

# (case, ratio, expected shapes)
RATIO_CASES = [
    ("Concat-two-convs", 0.75, {"wa": (2, 3, 3, 3), "wb": (2, 3, 1, 1), "wc": (4, 4, 3, 3)}),
    ("Split-sizes-input", 0.25, {"w1": (6, 3, 3, 3), "wa": (4, 3, 3, 3), "wb": (5, 3, 1, 1)}),
    ("Split-sizes-input", 0.75, {"w1": (2, 3, 3, 3), "wa": (4, 1, 3, 3), "wb": (5, 1, 1, 1)}),
]


# ----------------------------------------------------------------------------------------------
# barriers: the group touching the op is frozen (weights untouched) with a reason naming it

INT64_MAX = 9223372036854775807
FROZEN_CASES = [
    ("Slice-single-channel", prefixed_text("one = Slice(h, st, en, ax)\n  m = Mul(h, one)",
                                           "int64[1] st = {3}, int64[1] en = {4}, int64[1] ax = {1}"),
     ["Slice", "does not carry axis 1"]),
    ("Slice-reversed-channels", prefixed_text("m = Slice(h, st, en, ax, sp)",
                                              f"int64[1] st = {{-1}}, int64[1] en = {{-{INT64_MAX}}}, "
                                              "int64[1] ax = {1}, int64[1] sp = {-1}"),
     ["Slice", "does not carry axis 1"]),
]


class TestConcat(checks.GraphCases, checks.RatioCases, checks.FrozenCases):
    """The standard tests over ``CASES``, ``RATIO_CASES`` and ``FROZEN_CASES`` (``checks.CaseTests``)."""


# ----------------------------------------------------------------------------------------------
# rewritten constants: split sizes and slice bounds


@pytest.mark.parametrize("case_id,how", [
    ("Split-sizes-input", "input"), ("Split-attribute-opset11", "attribute"),
    ("Split-equal-no-sizes-opset11", "attribute"), ("Split-num_outputs-opset18", "input"),
    ("Split-equal-no-sizes-opset13", "input"),
])
def test_split_sizes_rewritten(case_id, how):
    model = BY_ID[case_id].model()
    res = checks.prune_and_verify(model)
    checks.assert_exact(res, model)
    node = next(n for n in res.pruned.graph.node if n.op_type == "Split")
    if how == "input":
        assert list(checks.inits(res.pruned)[node.input[1]]) == [2, 2]
        assert checks.attr_of(res.pruned, "Split", "num_outputs") is None
    else:
        assert list(checks.attr_of(res.pruned, "Split", "split")) == [2, 2]


@pytest.mark.parametrize("case_id,lo,hi", [("Slice-channels", 2, 6), ("Slice-channels-open-end-negative-axis", 4, 8)])
def test_slice_bounds_rewritten(case_id, lo, hi):
    model = BY_ID[case_id].model()
    res = checks.prune_and_verify(model)
    checks.assert_exact(res, model)
    o, p = checks.inits(model), checks.inits(res.pruned)
    k1 = checks.kept_along(o["w1"], p["w1"], 0)
    inside = [c for c in k1 if lo <= c < hi]
    assert p["w2"].shape[1] == len(inside) >= 1
    np.testing.assert_array_equal(p["w2"], o["w2"][:, [c - lo for c in inside]])
    starts, ends = checks.const_input(res.pruned, "Slice", 1), checks.const_input(res.pruned, "Slice", 2)
    ch = 0  # the channel axis is the first sliced axis in both graphs
    assert starts[ch] == sum(c < lo for c in k1)
    assert ends[ch] - starts[ch] == len(inside)
