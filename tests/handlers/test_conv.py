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


# ----------------------------------------------------------------------------------------------
# --conv-groups whole: a unit is a whole conv group, ``group`` shrinks

WHOLE_GROUPS = H17 + """
g (float[N,3,8,8] x) => (float[N,4,8,8] y)
<float[12,3,3,3] w1, float[16,3,3,3] wg, float[16] bg, float[4,16,1,1] w3>
{
  h = Conv<pads=[1,1,1,1]>(x, w1)
  r = Relu(h)
  gg = Conv<pads=[1,1,1,1], group=4>(r, wg, bg)
  y = Conv(gg, w3)
}"""
# 4 conv groups, each 3 input channels (of w1's 12) and 4 outputs (of 16)


def _group_attr(model, op="Conv"):
    return [onnx.helper.get_attribute_value(a) for n in model.graph.node if n.op_type == op
            for a in n.attribute if a.name == "group"]


@pytest.mark.parametrize("ratio,groups_left", [(0.5, 2), (0.25, 3), (0.75, 1)])
def test_whole_conv_groups_go_with_their_input_and_output_channels(ratio, groups_left):
    """Each conv group is one unit: its 3 input channels (rows of w1) and 4 outputs (rows of wg, bg,
    columns of w3) are kept or removed together, ``group`` becomes the kept count, the in-group kernel
    axis is whole, and the pruned model computes what the masked original does."""
    model = graphs.from_text(WHOLE_GROUPS, seed=1)
    res = checks.prune_and_verify(model, ratio, conv_groups="whole")
    assert _group_attr(res.pruned) == [groups_left]
    o, p = checks.inits(model), checks.inits(res.pruned)
    k1 = checks.kept_along(o["w1"], p["w1"], 0)
    kept_groups = sorted({c // 3 for c in k1})
    assert len(kept_groups) == groups_left and k1 == [3 * j + i for j in kept_groups for i in range(3)]
    kg = checks.kept_along(o["bg"], p["bg"], 0)
    assert kg == [4 * j + i for j in kept_groups for i in range(4)]
    np.testing.assert_array_equal(p["wg"], o["wg"][kg])  # axis 1 (in-group input position) whole
    np.testing.assert_array_equal(p["w3"], o["w3"][:, kg])
    checks.assert_exact(res, model)


def test_by_position_the_same_graph_keeps_its_groups():
    model = graphs.from_text(WHOLE_GROUPS, seed=1)
    res = checks.prune_and_verify(model, 0.5)
    assert _group_attr(res.pruned) == [4]
    assert checks.inits(res.pruned)["wg"].shape[1] < 3
    checks.assert_exact(res, model)


def test_whole_conv_groups_of_a_transposed_conv():
    model = BY_ID["ConvTranspose-grouped"].model()  # group=4, W [8, 2, 3, 3]: 2 inputs, 2 outputs per group
    res = checks.prune_and_verify(model, 0.5, conv_groups="whole")
    assert _group_attr(res.pruned, "ConvTranspose") == [2]
    o, p = checks.inits(model), checks.inits(res.pruned)
    k1 = checks.kept_along(o["w1"], p["w1"], 0)
    kept_groups = sorted({c // 2 for c in k1})
    assert k1 == [2 * j + i for j in kept_groups for i in range(2)]
    np.testing.assert_array_equal(p["wt"], o["wt"][k1])
    np.testing.assert_array_equal(p["w3"], o["w3"][:, k1])
    checks.assert_exact(res, model)


def test_whole_conv_groups_leave_depthwise_and_dense_convs_as_they_were():
    for case_id in ("Conv-depthwise", "Conv-depthwise-multiplier2", "Conv2d-strided-dilated"):
        model = BY_ID[case_id].model()
        a = checks.prune_and_verify(model, 0.5)
        b = checks.prune_and_verify(model, 0.5, conv_groups="whole")
        pa, pb = checks.inits(a.pruned), checks.inits(b.pruned)
        assert pa.keys() == pb.keys(), case_id
        for name in pa:  # the same channels kept, not just as many
            np.testing.assert_array_equal(pa[name], pb[name], err_msg=f"{case_id}: {name}")
        assert _group_attr(a.pruned) == _group_attr(b.pruned), case_id
        checks.assert_exact(b, model)


def test_options_and_analysis_of_different_modes_are_refused():
    """A plan by whole conv groups made over an analysis by position (or the reverse) would cut other
    units than the options say: refused, by the planner and by the API."""
    from onnxprune import pipeline
    from onnxprune.api import DependencyGraph, Pruner
    from onnxprune.errors import UserError
    from onnxprune.planning.options import PlanOptions
    from onnxprune.planning.plan import build_plan
    model = graphs.from_text(WHOLE_GROUPS, seed=1)
    by_position = pipeline.analyze_model(model)
    with pytest.raises(UserError, match="dim\\+conv-groups"):
        build_plan(by_position, PlanOptions(ratio=0.5, conv_groups="whole"))
    whole = pipeline.analyze_model(model, head_mode="dim+conv-groups")
    with pytest.raises(UserError, match="mode 'dim'"):
        build_plan(whole, PlanOptions(ratio=0.5))
    with pytest.raises(UserError, match="DependencyGraph"):
        Pruner(DependencyGraph(model), PlanOptions(ratio=0.5, conv_groups="whole"))
    pruned = Pruner(DependencyGraph(model, mode="dim+conv-groups"), PlanOptions(ratio=0.5, conv_groups="whole")).step()
    assert _group_attr(pruned) == [2]


def test_a_plan_made_with_whole_conv_groups_is_applied_in_that_mode():
    """A saved plan remembers the mode it was made in: applied with default options it is cut by
    whole conv groups again (an analysis by position would not know its unit ids)."""
    from onnxprune import pipeline
    from onnxprune.planning.options import PlanOptions
    model = graphs.from_text(WHOLE_GROUPS, seed=1)
    made = checks.prune_and_verify(model, 0.5, conv_groups="whole")
    plan_json = made.plan.to_json(made.analysis.cg)
    assert pipeline.head_mode_for(PlanOptions(), plan_json) == "dim+conv-groups"
    again = pipeline.run(model, PlanOptions(), plan_json=plan_json, verify=True, ep="cpu")
    assert _group_attr(again.pruned) == [2]
    for name, w in checks.inits(made.pruned).items():
        np.testing.assert_array_equal(checks.inits(again.pruned)[name], w)
