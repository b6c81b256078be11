"""Conv and ConvTranspose (handlers/conv.py): 1-D, 2-D and 3-D, strided and dilated, grouped and
depthwise (with a channel multiplier; ``group`` follows the channels), weights reached through
Cast."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from onnxprune.testing import checks, graphs
from onnxprune.testing.graphs import H17, Case

# ----------------------------------------------------------------------------------------------
# graphs written out in full: (id, text, expected initializer shapes after ratio 0.5, positive)

CASES = [
    # --- Conv: 1-D / 2-D / 3-D, dense, grouped, depthwise -------------------------------------
    Case("Conv1d", H17 + """
g (float[N,3,16] x) => (float[N,4,16] y)
<float[8,3,3] w1, float[8] b1, float[4,8,3] w2, float[4] b2>
{
  h = Conv<pads=[1,1]>(x, w1, b1)
  r = Relu(h)
  y = Conv<pads=[1,1]>(r, w2, b2)
}""", {"w1": (4, 3, 3), "b1": (4,), "w2": (4, 4, 3), "b2": (4,)}),
    Case("Conv2d-strided-dilated", H17 + """
g (float[N,3,9,9] x) => (float[N,4,5,5] y)
<float[8,3,3,3] w1, float[4,8,3,3] w2>
{
  h = Conv<pads=[1,1,1,1], strides=[2,2]>(x, w1)
  y = Conv<pads=[2,2,2,2], dilations=[2,2]>(h, w2)
}""", {"w1": (4, 3, 3, 3), "w2": (4, 4, 3, 3)}),
    Case("Conv3d", H17 + """
g (float[N,2,4,6,6] x) => (float[N,4,4,6,6] y)
<float[8,2,3,3,3] w1, float[8] b1, float[4,8,1,1,1] w2>
{
  h = Conv<pads=[1,1,1,1,1,1]>(x, w1, b1)
  r = Relu(h)
  y = Conv(r, w2)
}""", {"w1": (4, 2, 3, 3, 3), "b1": (4,), "w2": (4, 4, 1, 1, 1)}),
    # grouped: group=4, 2 input and 2 output channels per group; the same in-group position is
    # removed from every group, `group` stays 4
    Case("Conv-grouped", H17 + """
g (float[N,3,8,8] x) => (float[N,4,8,8] y)
<float[8,3,3,3] w1, float[8,2,3,3] wg, float[8] bg, float[4,8,1,1] w3>
{
  h = Conv<pads=[1,1,1,1]>(x, w1)
  r = Relu(h)
  gg = Conv<pads=[1,1,1,1], group=4>(r, wg, bg)
  y = Conv(gg, w3)
}""", {"w1": (4, 3, 3, 3), "wg": (4, 1, 3, 3), "bg": (4,), "w3": (4, 4, 1, 1)}),
    Case("Conv-depthwise", H17 + """
g (float[N,3,8,8] x) => (float[N,4,8,8] y)
<float[8,3,3,3] w1, float[8,1,3,3] wd, float[8] bd, float[4,8,1,1] w3>
{
  h = Conv<pads=[1,1,1,1]>(x, w1)
  d = Conv<pads=[1,1,1,1], group=8>(h, wd, bd)
  r = Relu(d)
  y = Conv(r, w3)
}""", {"w1": (4, 3, 3, 3), "wd": (4, 1, 3, 3), "bd": (4,), "w3": (4, 4, 1, 1)}),
    # depthwise with channel multiplier 2: input channel c owns outputs 2c and 2c+1
    Case("Conv-depthwise-multiplier2", H17 + """
g (float[N,3,8,8] x) => (float[N,4,8,8] y)
<float[8,3,3,3] w1, float[16,1,3,3] wd, float[16] bd, float[4,16,1,1] w3>
{
  h = Conv<pads=[1,1,1,1]>(x, w1)
  d = Conv<pads=[1,1,1,1], group=8>(h, wd, bd)
  y = Conv(d, w3)
}""", {"w1": (4, 3, 3, 3), "wd": (8, 1, 3, 3), "bd": (8,), "w3": (4, 8, 1, 1)}),
    Case("Conv-depthwise-1d", H17 + """
g (float[N,3,16] x) => (float[N,4,16] y)
<float[8,3,1] w1, float[8,1,5] wd, float[4,8,1] w3>
{
  h = Conv(x, w1)
  d = Conv<pads=[2,2], group=8>(h, wd)
  y = Conv(d, w3)
}""", {"w1": (4, 3, 1), "wd": (4, 1, 5), "w3": (4, 4, 1)}),
    # --- ConvTranspose (W is [C_in, C_out/group, k, k]) ----------------------------------------
    Case("ConvTranspose", H17 + """
g (float[N,3,8,8] x) => (float[N,4,16,16] y)
<float[8,3,3,3] w1, float[8,6,2,2] wt, float[6] bt, float[4,6,3,3] w3>
{
  h = Conv<pads=[1,1,1,1]>(x, w1)
  t = ConvTranspose<strides=[2,2]>(h, wt, bt)
  r = Relu(t)
  y = Conv<pads=[1,1,1,1]>(r, w3)
}""", {"w1": (4, 3, 3, 3), "wt": (4, 3, 2, 2), "bt": (3,), "w3": (4, 3, 3, 3)}),
    Case("ConvTranspose-depthwise", H17 + """
g (float[N,3,8,8] x) => (float[N,4,16,16] y)
<float[8,3,3,3] w1, float[8,1,2,2] wt, float[8] bt, float[4,8,3,3] w3>
{
  h = Conv<pads=[1,1,1,1]>(x, w1)
  t = ConvTranspose<strides=[2,2], group=8>(h, wt, bt)
  y = Conv<pads=[1,1,1,1]>(t, w3)
}""", {"w1": (4, 3, 3, 3), "wt": (4, 1, 2, 2), "bt": (4,), "w3": (4, 4, 3, 3)}),
    Case("ConvTranspose-depthwise-multiplier2", H17 + """
g (float[N,3,8,8] x) => (float[N,4,16,16] y)
<float[8,3,3,3] w1, float[8,2,2,2] wt, float[4,16,3,3] w3>
{
  h = Conv<pads=[1,1,1,1]>(x, w1)
  t = ConvTranspose<strides=[2,2], group=8>(h, wt)
  y = Conv<pads=[1,1,1,1]>(t, w3)
}""", {"w1": (4, 3, 3, 3), "wt": (4, 2, 2, 2), "w3": (4, 8, 3, 3)}),
    Case("ConvTranspose-grouped", H17 + """
g (float[N,3,8,8] x) => (float[N,4,8,8] y)
<float[8,3,3,3] w1, float[8,2,3,3] wt, float[4,8,3,3] w3>
{
  h = Conv<pads=[1,1,1,1]>(x, w1)
  t = ConvTranspose<pads=[1,1,1,1], group=4>(h, wt)
  y = Conv<pads=[1,1,1,1]>(t, w3)
}""", {"w1": (4, 3, 3, 3), "wt": (4, 1, 3, 3), "w3": (4, 4, 3, 3)}),
    Case("Conv-float16-weights-through-Cast", H17 + """
g (float[N,3,8,8] x) => (float[N,4,8,8] y)
<float16[8,3,3,3] w1, float16[8] b1, float16[4,8,3,3] w2>
{
  w1f = Cast<to=1>(w1)
  b1f = Cast<to=1>(b1)
  w2f = Cast<to=1>(w2)
  h = Conv<pads=[1,1,1,1]>(x, w1f, b1f)
  y = Conv<pads=[1,1,1,1]>(h, w2f)
}""", {"@h:1": (4, 3, 3, 3), "@h:2": (4,), "@y:1": (4, 4, 3, 3)}),
]


BY_ID = graphs.index(CASES, ())  # cases by id, sandwiches as "sandwich-<id>"


# ----------------------------------------------------------------------------------------------
# other ratios

# (case, ratio, expected shapes)
RATIO_CASES = [
    ("Conv-depthwise", 0.25, {"w1": (6, 3, 3, 3), "wd": (6, 1, 3, 3), "w3": (4, 6, 1, 1)}),
    ("Conv-depthwise-multiplier2", 0.75, {"w1": (2, 3, 3, 3), "wd": (4, 1, 3, 3), "w3": (4, 4, 1, 1)}),
    ("Conv-grouped", 0.75, {"w1": (4, 3, 3, 3), "wg": (4, 1, 3, 3), "w3": (4, 4, 1, 1)}),
]


class TestConv(checks.GraphCases, checks.RatioCases):
    """The standard tests over ``CASES`` and ``RATIO_CASES`` (``checks.CaseTests``)."""


# ----------------------------------------------------------------------------------------------
# what exactly was kept: the same position in every group, depthwise rows


def test_grouped_conv_removes_same_position_in_every_group():
    model = BY_ID["Conv-grouped"].model()
    res = checks.prune_and_verify(model)
    o, p = checks.inits(model), checks.inits(res.pruned)
    groups = [onnx.helper.get_attribute_value(a) for n in res.pruned.graph.node for a in n.attribute
              if a.name == "group"]
    assert groups == [4]
    k1 = checks.kept_along(o["w1"], p["w1"], 0)
    assert len({c % 2 for c in k1}) == 1 and sorted(c // 2 for c in k1) == [0, 1, 2, 3]
    kg = checks.kept_along(o["bg"], p["bg"], 0)  # output channels: the same position in each group too
    assert len({c % 2 for c in kg}) == 1 and sorted(c // 2 for c in kg) == [0, 1, 2, 3]
    # the grouped weight keeps, for each kept output, the kept input position
    pos = k1[0] % 2
    np.testing.assert_array_equal(p["wg"], o["wg"][kg][:, [pos]])
    checks.assert_exact(res, model)


@pytest.mark.parametrize("case_id,op,rows_per_channel", [
    ("Conv-depthwise", "Conv", 1), ("Conv-depthwise-multiplier2", "Conv", 2),
    ("Conv-depthwise-1d", "Conv", 1), ("ConvTranspose-depthwise", "ConvTranspose", 1),
    ("ConvTranspose-depthwise-multiplier2", "ConvTranspose", 1),
])
def test_depthwise_group_attribute_follows_channels(case_id, op, rows_per_channel):
    model = BY_ID[case_id].model()
    res = checks.prune_and_verify(model)
    groups = [onnx.helper.get_attribute_value(a) for n in res.pruned.graph.node if n.op_type == op
              for a in n.attribute if a.name == "group"]
    assert groups == [4]
    o, p = checks.inits(model), checks.inits(res.pruned)
    k1 = checks.kept_along(o["w1"], p["w1"], 0)
    wname = "wd" if op == "Conv" else "wt"
    kd = checks.kept_along(o[wname], p[wname], 0)
    assert kd == [c * rows_per_channel + j for c in k1 for j in range(rows_per_channel)]
    checks.assert_exact(res, model)
