"""Stripe pruning, shrink mode (issue 12 item 3): cropped kernels, Slices for negative pads, splits by
box group with the channel reordering absorbed by the consumers, the safety rules that refuse a
reordering, micro-model pairs and the latency gate's rule.

Every shrunk model is compared with ``mask_stripes`` of the same plan (the dense model with the removed
stripes zeroed) on random inputs with onnxruntime, by relative error ``max|a-b| / max|b|``, and passes
the full checker."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxprune.errors import UserError
from onnxprune.measure import stripes as stripes_gate
from onnxprune.measure.latency import Latency
from onnxprune.measure.stripes import SplitTiming, gate_splits, gated, split_pays
from onnxprune.pipeline import analyze_model
from onnxprune.planning.stripes import StripePlan, stripe_convs
from onnxprune.rewrite.stripes import (
    PERMUTABLE_OPS,
    filter_boxes,
    mask_stripes,
    micro_pair,
    micro_pairs,
    shrink_stripes,
)
from onnxprune.runtime.session import make_session, run_session

TOL = 1e-5


def rel(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    scale = float(np.abs(b).max())
    assert scale > 0, "reference output is all zeros: the comparison could not fail"
    return float(np.abs(a - b).max()) / scale


def run(m: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    sess, _ = make_session(m, ep="cpu")
    return run_session(sess, feeds)


def feeds_for(m: onnx.ModelProto, seed: int = 0, batch: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for vi in m.graph.input:
        dims = [d.dim_value if d.HasField("dim_value") else batch for d in vi.type.tensor_type.shape.dim]
        out[vi.name] = rng.standard_normal(dims).astype(np.float32)
    return out


def assert_matches_masked(res, model: onnx.ModelProto, plan: StripePlan, seeds=(0, 1)) -> None:
    onnx.checker.check_model(res.model, full_check=True)
    ref = mask_stripes(model, plan)
    for s in seeds:
        f = feeds_for(model, s)
        for a, b in zip(run(res.model, f), run(ref, f), strict=True):
            err = rel(a, b)
            assert err <= TOL, f"relative error {err:.3e} > {TOL:.0e}"


def tensor(a, name: str) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(a, dtype=np.float32), name)


def make(nodes, inits, x_shape, y_shape, opset: int = 17) -> onnx.ModelProto:
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, x_shape)],
                          [helper.make_tensor_value_info("Y", TensorProto.FLOAT, y_shape)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    onnx.checker.check_model(m, full_check=True)
    return m


def single_conv(kernel=(3, 3), cin=4, f=8, hw=(9, 9), seed=0, const_weight=False, bias=True, **attrs):
    """X [1, cin, *hw] -> Conv 'conv' (W [f, cin/group, *kernel], B) -> Y."""
    rng = np.random.default_rng(seed)
    g = attrs.get("group", 1)
    w = rng.standard_normal((f, cin // g, *kernel))
    ins = ["X", "W"] + (["B"] if bias else [])
    nodes = [helper.make_node("Conv", ins, ["Y"], name="conv", **attrs)]
    inits = [tensor(rng.standard_normal(f), "B")] if bias else []
    if const_weight:
        nodes.insert(0, helper.make_node("Constant", [], ["W"], name="w_const", value=tensor(w, "W")))
    else:
        inits.append(tensor(w, "W"))
    return make(nodes, inits, [1, cin, *hw], [1, f, None, None])


def kernels(m: onnx.ModelProto) -> list[tuple[int, int]]:
    weights = {t.name: tuple(t.dims) for t in m.graph.initializer}
    return [weights[n.input[1]][2:] for n in m.graph.node if n.op_type == "Conv"]


def ops(m: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in m.graph.node]


def box_mask(f: int, kernel, box, seed: int = 0, holes: bool = True) -> np.ndarray:
    """Keep-mask [f, K, K'] whose every filter has bounding box ``box`` (its corners kept), with
    random removed stripes inside the box (``holes``)."""
    rng = np.random.default_rng(seed)
    r0, r1, c0, c1 = box
    m = np.zeros((f, *kernel), dtype=bool)
    m[:, r0:r1 + 1, c0:c1 + 1] = rng.random((f, r1 - r0 + 1, c1 - c0 + 1)) < 0.6 if holes else True
    m[:, r0, c0] = m[:, r1, c1] = True
    return m


def interleaved(f: int = 8, drop_row: int | None = None) -> np.ndarray:
    """3x3 keep-mask: even filters lose kernel row 0, odd filters lose kernel column 2 (two boxes,
    interleaved: a split must reorder the output channels); ``drop_row`` is lost by every filter."""
    m = np.ones((f, 3, 3), dtype=bool)
    m[0::2, 0, :] = False
    m[1::2, :, 2] = False
    if drop_row is not None:
        m[:, drop_row, :] = False
    return m


# ---------------------------------------------------------------------------------------------
# crop: one box per conv


@pytest.mark.parametrize("removed,kernel", [
    ({"rows": [0]}, (2, 3)), ({"rows": [2]}, (2, 3)), ({"cols": [0]}, (3, 2)),
    ({"rows": [0], "cols": [2]}, (2, 2)), ({"rows": [0, 2], "cols": [0, 2]}, (1, 1))])
def test_rows_and_columns_removed_crop_the_kernel(removed, kernel):
    m = single_conv(pads=[1, 1, 1, 1])
    keep = np.ones((8, 3, 3), dtype=bool)
    keep[:, removed.get("rows", []), :] = False
    keep[:, :, removed.get("cols", [])] = False
    keep[3, 1, 1] = kernel == (1, 1)  # a hole inside the box stays zero
    plan = StripePlan({"conv": keep})
    res = shrink_stripes(m, plan)
    assert kernels(res.model) == [kernel]
    rec = res.conv("conv")
    assert rec.shrunk and not rec.split and rec.kernel == (3, 3)
    assert [b.kernel for b in rec.built] == [kernel]
    assert "Slice" not in ops(res.model)  # pads 1 absorb a one-row crop
    assert rec.macs_before == 8 * 4 * 9 * 81 and rec.macs_after == 8 * 4 * kernel[0] * kernel[1] * 81
    assert_matches_masked(res, m, plan)


GEOMETRIES = {
    "stride2": dict(pads=[1, 1, 1, 1], strides=[2, 2]),
    "dilation2": dict(pads=[2, 2, 2, 2], dilations=[2, 2]),
    "asymmetric_pads": dict(pads=[0, 2, 1, 0]),
    "stride2_dilation2_hw": dict(pads=[1, 0, 2, 1], strides=[2, 1], dilations=[1, 2]),
    "same_upper_stride2": dict(auto_pad="SAME_UPPER", strides=[2, 2]),
    "same_lower_stride2": dict(auto_pad="SAME_LOWER", strides=[2, 2]),
    "same_upper": dict(auto_pad="SAME_UPPER"),
    "valid": dict(auto_pad="VALID"),
}


@pytest.mark.parametrize("name", sorted(GEOMETRIES))
@pytest.mark.parametrize("box", [(1, 2, 0, 1), (0, 0, 2, 2), (1, 1, 1, 1)])
def test_crop_keeps_every_geometry(name, box):
    m = single_conv(hw=(10, 9), **GEOMETRIES[name])
    plan = StripePlan({"conv": box_mask(8, (3, 3), box, seed=3)})
    res = shrink_stripes(m, plan)
    assert kernels(res.model) == [(box[1] - box[0] + 1, box[3] - box[2] + 1)]
    conv = next(n for n in res.model.graph.node if n.op_type == "Conv")
    assert "auto_pad" not in {a.name for a in conv.attribute}
    assert_matches_masked(res, m, plan)


def test_negative_pad_slices_the_input():
    m = single_conv(pads=[0, 0, 0, 0])
    plan = StripePlan({"conv": box_mask(8, (3, 3), (1, 2, 0, 1))})
    res = shrink_stripes(m, plan)
    assert ops(res.model) == ["Slice", "Conv"]
    assert res.conv("conv").sliced
    conv = res.model.graph.node[1]
    assert list(next(a.ints for a in conv.attribute if a.name == "pads")) == [0, 0, 0, 0]
    assert_matches_masked(res, m, plan)


def test_negative_pad_from_dilation_slices_the_input():
    m = single_conv(pads=[1, 1, 1, 1], dilations=[2, 2], hw=(11, 11))
    plan = StripePlan({"conv": box_mask(8, (3, 3), (1, 2, 1, 2))})  # top pad 1 - 1*2 < 0
    res = shrink_stripes(m, plan)
    assert "Slice" in ops(res.model) and kernels(res.model) == [(2, 2)]
    assert_matches_masked(res, m, plan)


def test_a_slice_that_could_empty_the_input_is_refused():
    m = single_conv(kernel=(3, 3), hw=(2, 9), pads=[0, 1, 5, 1])  # output rows read padding only
    plan = StripePlan({"conv": box_mask(8, (3, 3), (2, 2, 0, 2), holes=False)})
    res = shrink_stripes(m, plan)
    rec = res.conv("conv")
    assert not rec.shrunk and "slice away" in rec.reason
    assert_matches_masked(res, m, plan)


@pytest.mark.parametrize("kernel,box,attrs", [
    ((5, 5), (1, 3, 2, 4), dict(pads=[2, 2, 2, 2])),
    ((7, 7), (2, 6, 0, 3), dict(pads=[3, 3, 3, 3], strides=[2, 2])),
    ((5, 3), (0, 2, 1, 1), dict(pads=[0, 1, 0, 1]))])
def test_large_kernels(kernel, box, attrs):
    m = single_conv(kernel=kernel, cin=3, f=6, hw=(16, 15), **attrs)
    plan = StripePlan({"conv": box_mask(6, kernel, box, seed=1)})
    res = shrink_stripes(m, plan)
    assert kernels(res.model) == [(box[1] - box[0] + 1, box[3] - box[2] + 1)]
    assert_matches_masked(res, m, plan)


@pytest.mark.parametrize("group,cin,f", [(2, 4, 6), (4, 4, 4), (4, 4, 8)])
def test_grouped_and_depthwise_convs_take_the_union_box(group, cin, f):
    m = single_conv(cin=cin, f=f, group=group, pads=[1, 1, 1, 1])
    keep = np.zeros((f, 3, 3), dtype=bool)
    keep[:f // 2] = box_mask(f // 2, (3, 3), (1, 2, 1, 1), seed=1)
    keep[f // 2:] = box_mask(f - f // 2, (3, 3), (1, 1, 0, 2), seed=2)
    plan = StripePlan({"conv": keep})
    res = shrink_stripes(m, plan)
    rec = res.conv("conv")
    assert kernels(res.model) == [(2, 3)] and not rec.split and rec.group == group
    assert len(rec.boxes) == 2 and [b.box for b in rec.built] == [(1, 2, 0, 2)]
    assert "grouped" in rec.reason
    assert_matches_masked(res, m, plan)


def test_constant_node_weight_with_value_info():
    m = onnx.shape_inference.infer_shapes(single_conv(const_weight=True, pads=[1, 1, 1, 1]))
    assert any(vi.name == "W" for vi in m.graph.value_info)  # a stale entry would fail the full check
    plan = StripePlan({"conv": box_mask(8, (3, 3), (0, 1, 0, 2))})
    res = shrink_stripes(m, plan)
    assert "Constant" not in ops(res.model) and kernels(res.model) == [(2, 3)]
    assert_matches_masked(res, m, plan)


def test_whole_kernel_box_stays_dense():
    m = single_conv(pads=[1, 1, 1, 1])
    keep = np.ones((8, 3, 3), dtype=bool)
    keep[:, 1, 1] = False  # holes only: every box is the whole kernel
    plan = StripePlan({"conv": keep})
    res = shrink_stripes(m, plan)
    rec = res.conv("conv")
    assert not rec.shrunk and "whole kernel" in rec.reason and rec.macs_after == rec.macs_before
    assert kernels(res.model) == [(3, 3)]
    assert_matches_masked(res, m, plan)


# ---------------------------------------------------------------------------------------------
# split: several boxes


def test_contiguous_boxes_split_without_reordering_and_without_cg():
    m = single_conv(pads=[0, 1, 1, 0])
    keep = np.zeros((8, 3, 3), dtype=bool)
    keep[:3] = box_mask(3, (3, 3), (1, 2, 0, 1), seed=1)
    keep[3:] = box_mask(5, (3, 3), (0, 0, 0, 2), seed=2)
    plan = StripePlan({"conv": keep})
    res = shrink_stripes(m, plan)
    rec = res.conv("conv")
    assert rec.split and not rec.permuted and rec.reason is None
    assert [(b.box, b.filters) for b in rec.built] == [((1, 2, 0, 1), 3), ((0, 0, 0, 2), 5)]
    assert kernels(res.model) == [(2, 2), (1, 3)] and ops(res.model)[-1] == "Concat"
    assert rec.macs_after == (3 * 4 * 4 + 5 * 4 * 3) * 8 * 8
    assert_matches_masked(res, m, plan)


def bn_chain(seed: int = 0) -> onnx.ModelProto:
    """X [1,4,8,8] -> conv1 (8) -> BN -> Relu -> conv2 (6) -> Y."""
    rng = np.random.default_rng(seed)
    nodes = [helper.make_node("Conv", ["X", "W1", "B1"], ["A"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["A", "s", "b", "mu", "var"], ["N"], name="bn"),
             helper.make_node("Relu", ["N"], ["R"], name="relu"),
             helper.make_node("Conv", ["R", "W2"], ["Y"], name="conv2", pads=[1, 1, 1, 1])]
    inits = [tensor(rng.standard_normal((8, 4, 3, 3)), "W1"), tensor(rng.standard_normal(8), "B1"),
             tensor(rng.uniform(0.5, 1.5, 8), "s"), tensor(rng.standard_normal(8), "b"),
             tensor(rng.standard_normal(8), "mu"), tensor(rng.uniform(0.5, 1.5, 8), "var"),
             tensor(rng.standard_normal((6, 8, 3, 3)), "W2")]
    return make(nodes, inits, [1, 4, 8, 8], [1, 6, 8, 8])


def inits_of(m: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}


def test_split_reorders_the_group_through_bn_relu_conv():
    an = analyze_model(bn_chain())
    plan = StripePlan({"conv1": interleaved()})
    res = shrink_stripes(an.model, plan, cg=an.cg)
    rec = res.conv("conv1")
    assert rec.split and rec.permuted and rec.reason is None
    assert [(b.box, b.filters) for b in rec.built] == [((1, 2, 0, 2), 4), ((0, 2, 0, 1), 4)]
    assert "Gather" not in ops(res.model) and ops(res.model).count("Concat") == 1
    order = [0, 2, 4, 6, 1, 3, 5, 7]
    before, after = inits_of(an.model), inits_of(res.model)
    for name in ("s", "b", "mu", "var"):
        np.testing.assert_array_equal(after[name], before[name][order])
    np.testing.assert_array_equal(after["W2"], before["W2"][:, order])
    assert_matches_masked(res, an.model, plan)


@pytest.mark.parametrize("consumer", ["crop", "split"])
def test_reordered_consumer_conv_is_cropped_or_split_too(consumer):
    """conv2's weight is reordered on its input axis (conv1's split), then cut to its own boxes."""
    an = analyze_model(bn_chain())
    keep2 = box_mask(6, (3, 3), (1, 2, 0, 2), seed=7)
    if consumer == "split":
        keep2[3:] = box_mask(3, (3, 3), (0, 2, 1, 1), seed=8)
    plan = StripePlan({"conv1": interleaved(), "conv2": keep2})
    res = shrink_stripes(an.model, plan, cg=an.cg)
    assert res.conv("conv1").permuted and not res.conv("conv2").permuted
    assert res.conv("conv2").split == (consumer == "split") and res.conv("conv2").shrunk
    assert_matches_masked(res, an.model, plan)


def test_split_reorders_through_depthwise_pool_flatten_gemm():
    rng = np.random.default_rng(2)
    nodes = [helper.make_node("Conv", ["X", "W1", "B1"], ["A"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["A", "Wd", "Bd"], ["D"], name="dw", pads=[1, 1, 1, 1], group=8),
             helper.make_node("Relu", ["D"], ["R"], name="relu"),
             helper.make_node("GlobalAveragePool", ["R"], ["G"], name="gap"),
             helper.make_node("Flatten", ["G"], ["F"], name="flat"),
             helper.make_node("Gemm", ["F", "Wg", "Bg"], ["Y"], name="fc", transB=1)]
    inits = [tensor(rng.standard_normal((8, 4, 3, 3)), "W1"), tensor(rng.standard_normal(8), "B1"),
             tensor(rng.standard_normal((8, 1, 3, 3)), "Wd"), tensor(rng.standard_normal(8), "Bd"),
             tensor(rng.standard_normal((5, 8)), "Wg"), tensor(rng.standard_normal(5), "Bg")]
    an = analyze_model(make(nodes, inits, [1, 4, 8, 8], [1, 5]))
    plan = StripePlan({"conv1": interleaved(), "dw": box_mask(8, (3, 3), (0, 1, 1, 2), seed=4)})
    res = shrink_stripes(an.model, plan, cg=an.cg)
    assert res.conv("conv1").permuted and res.conv("dw").shrunk
    np.testing.assert_array_equal(inits_of(res.model)["Wg"], inits_of(an.model)["Wg"][:, [0, 2, 4, 6, 1, 3, 5, 7]])
    assert_matches_masked(res, an.model, plan)


def residual(seed: int = 0) -> onnx.ModelProto:
    """X -> conv_a, X -> conv_b; Add -> Relu -> conv_c -> Y: two convs write one channel group."""
    rng = np.random.default_rng(seed)
    nodes = [helper.make_node("Conv", ["X", "Wa", "Ba"], ["A"], name="conv_a", pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["X", "Wb", "Bb"], ["B"], name="conv_b", pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["A", "B"], ["S"], name="add"),
             helper.make_node("Relu", ["S"], ["R"], name="relu"),
             helper.make_node("Conv", ["R", "Wc"], ["Y"], name="conv_c", pads=[1, 1, 1, 1])]
    inits = [tensor(rng.standard_normal((8, 4, 3, 3)), "Wa"), tensor(rng.standard_normal(8), "Ba"),
             tensor(rng.standard_normal((8, 4, 3, 3)), "Wb"), tensor(rng.standard_normal(8), "Bb"),
             tensor(rng.standard_normal((6, 8, 3, 3)), "Wc")]
    return make(nodes, inits, [1, 4, 8, 8], [1, 6, 8, 8])


def two_boxes(first: list[int], f: int = 8) -> np.ndarray:
    """Filters in ``first`` keep box rows 0-1, the others rows 0-2; all keep columns 1-2 (the union
    box is 3x2)."""
    m = np.zeros((f, 3, 3), dtype=bool)
    m[:, :, 1:] = True
    m[first, 2, :] = False
    return m


@pytest.mark.parametrize("case", ["b_dense", "b_crop", "b_contiguous", "b_interleaved"])
def test_residual_add_two_convs_in_one_group(case):
    an = analyze_model(residual())
    keep = {"conv_a": interleaved()}
    if case == "b_crop":
        keep["conv_b"] = box_mask(8, (3, 3), (1, 2, 0, 1), seed=5)
    elif case == "b_contiguous":
        keep["conv_b"] = two_boxes([0, 2, 4, 6])  # contiguous in conv_a's order [0 2 4 6 1 3 5 7]
    elif case == "b_interleaved":
        keep["conv_b"] = two_boxes([0, 1])  # R S S S R S S S in that order
    plan = StripePlan(keep)
    res = shrink_stripes(an.model, plan, cg=an.cg)
    assert res.conv("conv_a").permuted and res.conv("conv_a").reordered_by == "conv_a"
    order = [0, 2, 4, 6, 1, 3, 5, 7]
    if case == "b_dense":
        np.testing.assert_array_equal(inits_of(res.model)["Wb"], inits_of(an.model)["Wb"][order])
    if "conv_b" in keep:
        b = res.conv("conv_b")
        assert b.shrunk and b.permuted and b.reordered_by == "conv_a"
        assert b.split == (case == "b_contiguous")
        if case == "b_interleaved":
            assert "conv_a" in b.reason and "not contiguous" in b.reason
    assert_matches_masked(res, an.model, plan)


def test_graph_output_is_not_reordered():
    m = single_conv(pads=[1, 1, 1, 1])
    an = analyze_model(m)
    plan = StripePlan({"conv": interleaved(drop_row=2)})  # boxes rows 1-1 and rows 0-1 x cols 0-1
    res = shrink_stripes(an.model, plan, cg=an.cg)
    rec = res.conv("conv")
    assert rec.shrunk and not rec.split and not rec.permuted
    assert "graph output" in rec.reason
    assert kernels(res.model) == [(2, 3)]  # the union box
    no_cg = shrink_stripes(m, plan).conv("conv")
    assert not no_cg.split and "coupling graph" in no_cg.reason
    assert_matches_masked(res, an.model, plan)


def test_op_off_the_allowlist_refuses_the_reordering():
    rng = np.random.default_rng(0)
    assert "Pad" not in PERMUTABLE_OPS
    nodes = [helper.make_node("Conv", ["X", "W1"], ["A"], name="conv1", pads=[0, 0, 0, 0]),
             helper.make_node("Pad", ["A", "p"], ["P"], name="pad"),
             helper.make_node("Conv", ["P", "W2"], ["Y"], name="conv2")]
    inits = [tensor(rng.standard_normal((8, 4, 3, 3)), "W1"), tensor(rng.standard_normal((6, 8, 3, 3)), "W2"),
             numpy_helper.from_array(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "p")]
    an = analyze_model(make(nodes, inits, [1, 4, 8, 8], [1, 6, 6, 6]))
    assert any(g.prunable for g in an.cg.groups)  # the analysis itself does not freeze the group
    keep = interleaved(drop_row=2)  # union box rows 0-1
    plan = StripePlan({"conv1": keep})
    res = shrink_stripes(an.model, plan, cg=an.cg)
    rec = res.conv("conv1")
    assert not rec.split and "Pad 'pad'" in rec.reason and "allowlist" in rec.reason
    assert rec.shrunk and kernels(res.model)[0] == (2, 3)
    assert_matches_masked(res, an.model, plan)


def test_split_set_keeps_other_convs_dense():
    an = analyze_model(bn_chain())
    keep2 = box_mask(6, (3, 3), (0, 1, 0, 2), seed=7)
    plan = StripePlan({"conv1": interleaved(), "conv2": keep2})
    res = shrink_stripes(an.model, plan, cg=an.cg, split={"conv2"})
    one, two = res.conv("conv1"), res.conv("conv2")
    assert not one.shrunk and "split set" in one.reason and two.shrunk
    np.testing.assert_array_equal(inits_of(res.model)["W1"], inits_of(mask_stripes(an.model, plan))["W1"])
    assert kernels(res.model) == [(3, 3), (2, 3)]
    assert_matches_masked(res, an.model, plan)


def test_plan_is_validated_before_anything_changes():
    m = single_conv(pads=[1, 1, 1, 1])
    before = m.SerializeToString()
    with pytest.raises(UserError, match="nope"):
        shrink_stripes(m, StripePlan({"nope": np.ones((8, 3, 3), dtype=bool)}))
    with pytest.raises(UserError, match="keep-mask shape"):
        shrink_stripes(m, StripePlan({"conv": np.ones((8, 2, 3), dtype=bool)}))
    with pytest.raises(UserError, match="split names"):
        shrink_stripes(m, StripePlan({"conv": interleaved()}), split={"other"})
    assert m.SerializeToString() == before


def test_cg_of_another_model_is_refused():
    an = analyze_model(bn_chain())
    other = single_conv(pads=[1, 1, 1, 1])
    with pytest.raises(UserError, match="coupling graph"):
        shrink_stripes(other, StripePlan({"conv": interleaved()}), cg=an.cg)


def test_result_json():
    an = analyze_model(bn_chain())
    res = shrink_stripes(an.model, StripePlan({"conv1": interleaved()}), cg=an.cg)
    d = json.loads(json.dumps(res.to_json()))
    assert d["split"] == 1 and d["convs"][0]["permuted"] and d["macs_after"] < d["macs_before"]
    assert any("reordered" in c for c in d["changes"])


def test_filter_boxes():
    keep = np.zeros((2, 3, 4), dtype=bool)
    keep[0, 1, 2] = True
    keep[1, 0, 0] = keep[1, 2, 1] = True
    np.testing.assert_array_equal(filter_boxes(keep), [[1, 1, 2, 2], [0, 2, 0, 1]])


# ---------------------------------------------------------------------------------------------
# zoo: planted dead rows in ResNet-18


def test_resnet18_planted_dead_rows_all_shrink(resnet18_onnx):
    model = onnx.load(str(resnet18_onnx))
    convs, _ = stripe_convs(model)
    weights = {t.name: t for t in model.graph.initializer}
    keep = {}
    for i, c in enumerate(c for c in convs if c.shape[2:] == (3, 3)):
        row = 2 * (i % 2)  # row 0 or row 2: both pad sides
        t = weights[c.weight_name]
        w = numpy_helper.to_array(t).copy()
        w[:, :, row, :] = 0
        t.CopyFrom(numpy_helper.from_array(w, t.name))
        k = np.ones((c.shape[0], 3, 3), dtype=bool)
        k[:, row, :] = False
        keep[c.key] = k
    assert len(keep) == 16
    plan = StripePlan(keep)
    res = shrink_stripes(model, plan)
    assert all(c.shrunk and c.built[0].kernel == (2, 3) for c in res.convs)
    sizes = {tuple(k) for k in kernels(res.model)}
    assert (3, 3) not in sizes and (2, 3) in sizes
    onnx.checker.check_model(res.model, full_check=True)
    f = feeds_for(model, 0)
    err = rel(run(res.model, f)[0], run(model, f)[0])
    assert err <= TOL, err


# ---------------------------------------------------------------------------------------------
# micro-models and the latency gate (never asserting on timings)


def test_micro_pair_outputs_match():
    an = analyze_model(bn_chain())
    plan = StripePlan({"conv1": interleaved(), "conv2": box_mask(6, (3, 3), (1, 2, 0, 2), seed=7)})
    for key in ("conv1", "conv2"):
        pair = micro_pair(an.model, plan, key, cg=an.cg, batch=2)
        assert pair.input_shape[0] == 2
        onnx.checker.check_model(pair.dense, full_check=True)
        onnx.checker.check_model(pair.shrunk, full_check=True)
        assert ops(pair.dense) == ["Conv"]
        f = {"X": np.random.default_rng(1).standard_normal(pair.input_shape).astype(np.float32)}
        assert rel(run(pair.shrunk, f)[0], run(pair.dense, f)[0]) <= TOL
    assert ops(micro_pair(an.model, plan, "conv1", cg=an.cg).shrunk)[-1] == "Concat"


def test_gate_splits_has_an_entry_for_every_planned_conv():
    an = analyze_model(bn_chain())
    full = np.ones((6, 3, 3), dtype=bool)
    full[:, 1, 1] = False  # nothing to crop
    plan = StripePlan({"conv1": interleaved(), "conv2": full})
    timings = gate_splits(an.model, plan, "cpu", threads=1, repeat=3, cg=an.cg, warmup=1)
    assert set(timings) == {"conv1", "conv2"}
    assert timings["conv1"].form == "split 2" and timings["conv1"].dense_ms is not None
    assert timings["conv2"].form == "dense" and timings["conv2"].shrunk_ms is None
    assert "whole kernel" in timings["conv2"].reason and not timings["conv2"].pays
    json.dumps({k: t.to_json() for k, t in timings.items()})
    assert set(micro_pairs(an.model, plan, an.cg)) == {"conv1", "conv2"}


def test_the_rule_with_injected_timings():
    assert split_pays(1.0, 0.9) and not split_pays(1.0, 1.0) and not split_pays(1.0, 1.1)
    assert not split_pays(None, 0.5) and not split_pays(1.0, None)
    an = analyze_model(bn_chain())
    plan = StripePlan({"conv1": interleaved(), "conv2": box_mask(6, (3, 3), (1, 2, 0, 2), seed=7)})
    timings = {"conv1": SplitTiming("conv1", "split 2", 2.0, 2.5), "conv2": SplitTiming("conv2", "crop 2x3", 2.0, 1.5)}
    assert gated(timings) == {"conv2"} and timings["conv2"].gain_ms == 0.5
    res = shrink_stripes(an.model, plan, cg=an.cg, split=gated(timings))
    assert not res.conv("conv1").shrunk and res.conv("conv2").shrunk
    assert_matches_masked(res, an.model, plan)



def test_sign_test_verdicts():
    # binomial tails by hand: P(X >= 22 | 30, 1/2) = 0.0081 < 0.01, P(X >= 21) = 0.0214
    assert abs(stripes_gate.sign_tail(22, 30) - 0.008062) < 1e-5
    assert stripes_gate.verdict([1.0] * 22 + [0.5] * 8, [0.9] * 30) == "faster"  # 22 wins of 30
    assert stripes_gate.verdict([1.0] * 21 + [0.5] * 9, [0.9] * 30) == "tie"     # 21 wins of 30
    assert stripes_gate.verdict([1.0] * 30, [1.2] * 30) == "slower"
    assert stripes_gate.verdict([1.0] * 30, [1.02] * 30) == "tie"  # consistent, but under MIN_EFFECT (5%)
    assert stripes_gate.verdict([1.0] * 30, [1.0] * 30) == "tie"  # equal pairs carry no evidence
    # a large median gap with inconsistent pairs is still a tie (outliers do not decide)
    assert stripes_gate.verdict([1.0] * 15 + [9.0] * 15, [2.0] * 15 + [0.5] * 15) == "tie"


def test_rule_split_needs_faster_crop_needs_not_slower():
    assert stripes_gate.makes("split 2", "faster") and not stripes_gate.makes("split 2", "tie")
    assert stripes_gate.makes("crop 3x2", "tie") and not stripes_gate.makes("crop 3x2", "slower")
    assert not stripes_gate.makes("dense", "faster")
    timings = {"a": SplitTiming("a", "split 2", 1.0, 0.9, verdict="tie"),
               "b": SplitTiming("b", "crop 2x2", 1.0, 1.05, verdict="tie"),
               "c": SplitTiming("c", "crop 2x2", 1.0, 0.8, verdict="slower")}
    assert gated(timings) == {"b"}


def test_a_tie_is_timed_again_up_to_max_rounds(monkeypatch):
    an = analyze_model(bn_chain())
    plan = StripePlan({"conv2": box_mask(6, (3, 3), (1, 2, 0, 2), seed=7)})
    calls = []

    def fake(runners, warmup=5, repeat=30, **kw):  # the same times for both: always a tie
        calls.append(repeat)
        return [Latency("cpu", 1, 1.0, 1.0, repeat, [], [1.0] * repeat) for _ in runners]

    monkeypatch.setattr(stripes_gate, "measure_runners", fake)
    t = gate_splits(an.model, plan, "cpu", threads=1, repeat=4, cg=an.cg, warmup=1, max_rounds=3)["conv2"]
    assert calls == [4, 4, 4] and t.rounds == 3 and t.pairs == 12 and t.verdict == "tie" and t.pays
    seq = iter([[1.0] * 10, [0.5] * 10])

    def decisive(runners, warmup=5, repeat=30, **kw):
        return [Latency("cpu", 1, 1.0, 1.0, repeat, [], next(seq)) for _ in runners]

    monkeypatch.setattr(stripes_gate, "measure_runners", decisive)
    t = gate_splits(an.model, plan, "cpu", threads=1, repeat=10, cg=an.cg, warmup=1)["conv2"]
    assert t.rounds == 1 and t.verdict == "faster"


# ---------------------------------------------------------------------------------------------
# property: random single convs


def _random_case(draw, st):
    k = draw(st.integers(1, 5))
    k2 = draw(st.integers(2 if k == 1 else 1, 5))
    s = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    d = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    pads = [draw(st.integers(0, 3)) for _ in range(4)]
    hw = []
    for ax, kk in enumerate((k, k2)):
        smallest = max(1, d[ax] * (kk - 1) + 1 - pads[ax] - pads[ax + 2])
        hw.append(draw(st.integers(smallest, smallest + 6)))
    f = draw(st.integers(1, 8))
    n_boxes = draw(st.integers(1, min(3, f)))
    boxes = []
    for _ in range(n_boxes):
        r = sorted(draw(st.integers(0, k - 1)) for _ in range(2))
        c = sorted(draw(st.integers(0, k2 - 1)) for _ in range(2))
        boxes.append((r[0], r[1], c[0], c[1]))
    n_cuts = min(n_boxes - 1, f - 1)
    cuts = sorted(draw(st.lists(st.integers(1, f - 1), min_size=n_cuts, max_size=n_cuts, unique=True))) if f > 1 else []
    shuffle = draw(st.booleans())
    seed = draw(st.integers(0, 2**16))
    return (k, k2), s, d, pads, tuple(hw), f, boxes, cuts, shuffle, seed


def test_property_random_single_convs():
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies

    @hypothesis.settings(max_examples=30, deadline=None, derandomize=True)
    @hypothesis.given(st.data())
    def check(data):
        kernel, s, d, pads, hw, f, boxes, cuts, shuffle, seed = _random_case(data.draw, st)
        m = single_conv(kernel=kernel, cin=2, f=f, hw=hw, seed=seed, strides=list(s), dilations=list(d), pads=pads)
        keep = np.zeros((f, *kernel), dtype=bool)
        for i, (a, b) in enumerate(zip([0, *cuts], [*cuts, f], strict=True)):
            keep[a:b] = box_mask(b - a, kernel, boxes[i % len(boxes)], seed=seed + i)
        if shuffle:
            keep = keep[np.random.default_rng(seed).permutation(f)]
        plan = StripePlan({"conv": keep})
        res = shrink_stripes(m, plan)
        rec = res.conv("conv")
        if rec.shrunk:
            assert sum(b.filters for b in rec.built) == f
            assert rec.macs_after < rec.macs_before
        assert_matches_masked(res, m, plan, seeds=(seed,))

    check()


def _crop(key: str, dense: float, shrunk: float, verdict: str, saved: int = 100) -> SplitTiming:
    return SplitTiming(key, "crop 2x2", dense, shrunk, macs_before=1000, macs_after=1000 - saved, verdict=verdict)


def test_immaterial_crops_take_the_cheapest_slowdowns_within_the_slack():
    """Model of 10 ms at batch 1 and 80 ms at batch 8, slack 1%: 0.1 ms and 0.8 ms of losses in all.
    "a" (+0.05 ms at b1, faster at b8) and "c" (+0.04 at b1) fit; "b" (+0.2 ms) alone exceeds b1's
    0.1 ms; a split and a crop that pays are never in the answer."""
    per = {8: {"a": _crop("a", 5.0, 4.0, "faster"), "b": _crop("b", 5.0, 4.0, "faster"),
               "c": _crop("c", 5.0, 5.0, "tie"), "s": SplitTiming("s", "split 2", 1.0, 2.0, verdict="slower"),
               "ok": _crop("ok", 1.0, 0.5, "faster")},
           1: {"a": _crop("a", 0.50, 0.55, "slower"), "b": _crop("b", 0.50, 0.70, "slower"),
               "c": _crop("c", 0.50, 0.54, "slower"), "s": SplitTiming("s", "split 2", 1.0, 2.0, verdict="slower"),
               "ok": _crop("ok", 1.0, 0.5, "faster")}}
    got = stripes_gate.immaterial_crops(per, {1: 10.0, 8: 80.0}, slack=0.01)
    assert set(got) == {"a", "c"}
    assert "batch 1" in got["a"] and "0.050 ms" in got["a"]
    # the summed losses decide: with room for one, the one saving more MACs per share lost goes first
    per1 = {1: {"a": _crop("a", 0.5, 0.56, "slower", saved=100), "c": _crop("c", 0.5, 0.56, "slower", saved=300)}}
    assert set(stripes_gate.immaterial_crops(per1, {1: 10.0}, slack=0.01)) == {"c"}
    # no model latency (the model could not be timed): the strict rule stands
    assert stripes_gate.immaterial_crops(per, {1: None, 8: 80.0}) == {}
    # an accepted crop pays, and gated() lets it change
    t = dataclasses.replace(per[1]["a"], immaterial=got["a"])
    assert t.pays and gated({"a": t}) == {"a"}


def test_gate_makes_immaterial_crops_and_says_so(resnet18_onnx, monkeypatch):
    """Injected timings (tests never time): every crop measures 1% slower than its dense conv at batch 1
    (a verdict of slower), faster at batch 8; the model 'measures' 1000 ms, so the slowdowns are
    immaterial and every conv is cropped; with a model of 0.5 ms none is (0.01 ms each, 0.005 ms of slack)."""
    from onnxprune import pipeline
    from onnxprune.planning.options import StripeOptions

    def fake_gate(model, plan, ep="auto", threads=None, batch=1, repeat=30, *, cg=None, **_):
        return {k: SplitTiming(k, "crop 2x2", 1.0, 1.01 if batch == 1 else 0.5, 100, 50,
                               verdict="slower" if batch == 1 else "faster") for k in plan.keep}

    monkeypatch.setattr(pipeline, "gate_splits", fake_gate)
    model = onnx.load(str(resnet18_onnx))
    opts = StripeOptions(ratio=0.5, boxes=1)
    monkeypatch.setattr(pipeline, "model_latency_ms", lambda *a, **k: 1000.0)
    stage = pipeline.run_stripes(model, opts, batch=8, verify=True)
    assert stage.verification.passed
    assert all(c.shrunk for c in stage.shrink.convs) and all(g.immaterial for g in stage.gate.values())
    monkeypatch.setattr(pipeline, "model_latency_ms", lambda *a, **k: 0.5)
    stage = pipeline.run_stripes(model, opts, batch=8, verify=True)
    assert not any(c.shrunk for c in stage.shrink.convs) and not any(g.immaterial for g in stage.gate.values())
