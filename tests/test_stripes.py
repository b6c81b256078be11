"""Stripe pruning (issue 12 items 1-2): stripe importance, per-conv selection, the JSON plan and the
soft (mask) mode, on small CNNs built with ``onnx.helper`` and run with onnxruntime."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxprune.errors import UserError
from onnxprune.planning.stripes import (
    StripePlan,
    conv_stripe_scores,
    plan_stripes,
    removed_count,
    select_keep,
    select_stripes,
    stripe_convs,
    stripe_importance,
)
from onnxprune.rewrite.stripes import mask_stripes
from onnxprune.runtime.session import make_session, run_session

C_IN, F1, F2, HW = 4, 8, 6, 8


def cnn(w1: np.ndarray, w2: np.ndarray, constant_w2: bool = False) -> onnx.ModelProto:
    """X [1, 4, 8, 8] -> Conv 3x3 pads 1 (W1 [8, 4, 3, 3]) -> Relu -> Conv 3x3 pads 1 group 2
    (W2 [6, 4, 3, 3]) -> Y; W2 as a Constant node with ``constant_w2``."""
    pads = [1, 1, 1, 1]
    nodes = [helper.make_node("Conv", ["X", "W1"], ["A"], name="conv1", pads=pads),
             helper.make_node("Relu", ["A"], ["R"], name="relu"),
             helper.make_node("Conv", ["R", "W2"], ["Y"], name="conv2", pads=pads, group=2)]
    inits = [numpy_helper.from_array(w1.astype(np.float32), "W1")]
    if constant_w2:
        nodes.insert(2, helper.make_node("Constant", [], ["W2"], name="w2",
                                         value=numpy_helper.from_array(w2.astype(np.float32), "W2")))
    else:
        inits.append(numpy_helper.from_array(w2.astype(np.float32), "W2"))
    g = helper.make_graph(nodes, "cnn", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, C_IN, HW, HW])],
                          [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, F2, HW, HW])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m, full_check=True)
    return m


def planted(seed: int = 0):
    """The CNN with dead stripes planted: kernel row 2 of every conv1 filter, and 1-6 random
    stripes per conv2 filter. Returns (model, {conv: planted zero mask [F, K, K']})."""
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((F1, C_IN, 3, 3))
    w2 = rng.standard_normal((F2, F1 // 2, 3, 3))
    dead1 = np.zeros((F1, 3, 3), dtype=bool)
    dead1[:, 2, :] = True
    dead2 = np.zeros((F2, 3, 3), dtype=bool)
    for f in range(F2):
        dead2[f].ravel()[rng.choice(9, size=rng.integers(1, 7), replace=False)] = True
    w1[np.broadcast_to(dead1[:, None], w1.shape)] = 0
    w2[np.broadcast_to(dead2[:, None], w2.shape)] = 0
    return cnn(w1, w2), {"conv1": dead1, "conv2": dead2}


def weights(m: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}


def run(m: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    sess, _ = make_session(m, ep="cpu")
    return run_session(sess, {"X": x})[0]


def ratio_for(n_removed: int, n_stripes: int) -> float:
    return n_removed / n_stripes


# ---------------------------------------------------------------------------------------------
# importance


@pytest.mark.parametrize("norm", ["l1", "l2"])
def test_importance_equals_numpy(norm):
    rng = np.random.default_rng(1)
    w = rng.standard_normal((5, 3, 3, 2))
    got = stripe_importance(w, norm)
    want = np.empty((5, 3, 2))
    for f in range(5):
        for i in range(3):
            for j in range(2):
                want[f, i, j] = np.linalg.norm(w[f, :, i, j], ord=1 if norm == "l1" else 2)
    assert got.shape == (5, 3, 2)
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_model_scores_grouped_and_constant_weight():
    """conv2 is grouped (its stripes span C/g = 4 channels) and, here, a Constant node's value."""
    rng = np.random.default_rng(2)
    w1, w2 = rng.standard_normal((F1, C_IN, 3, 3)), rng.standard_normal((F2, F1 // 2, 3, 3))
    scores = conv_stripe_scores(cnn(w1, w2, constant_w2=True))
    assert set(scores) == {"conv1", "conv2"}
    np.testing.assert_allclose(scores["conv1"], np.abs(w1.astype(np.float32)).sum(axis=1), rtol=1e-6)
    np.testing.assert_allclose(scores["conv2"], np.abs(w2.astype(np.float32)).sum(axis=1), rtol=1e-6)


def test_skipped_convs_have_reasons():
    rng = np.random.default_rng(3)
    m = cnn(rng.standard_normal((F1, C_IN, 3, 3)), rng.standard_normal((F2, F1 // 2, 3, 3)))
    # conv2's weight becomes a graph input (not constant); a 1x1 conv is appended
    w2 = [t for t in m.graph.initializer if t.name == "W2"][0]
    m.graph.input.append(helper.make_tensor_value_info("W2", TensorProto.FLOAT, list(w2.dims)))
    m.graph.initializer.remove(w2)
    m.graph.initializer.append(numpy_helper.from_array(rng.standard_normal((2, F2, 1, 1)).astype(np.float32), "W3"))
    m.graph.node.append(helper.make_node("Conv", ["Y", "W3"], ["Z"], name="conv3"))
    convs, skipped = stripe_convs(m)
    assert [c.key for c in convs] == ["conv1"]
    assert skipped == {"conv2": "weight is not a constant", "conv3": "1x1 kernel: no stripes to prune"}


def test_shared_and_overridable_weights_are_skipped():
    rng = np.random.default_rng(4)
    w = rng.standard_normal((F1, C_IN, 3, 3))
    m = cnn(w, rng.standard_normal((F2, F1 // 2, 3, 3)))
    m.graph.node.append(helper.make_node("Conv", ["X", "W1"], ["B"], name="conv1b", pads=[1, 1, 1, 1]))
    _, skipped = stripe_convs(m)
    assert skipped["conv1"] == skipped["conv1b"] == "weight is read by another node too"
    m2 = cnn(w, rng.standard_normal((F2, F1 // 2, 3, 3)))
    m2.graph.input.append(helper.make_tensor_value_info("W2", TensorProto.FLOAT, [F2, F1 // 2, 3, 3]))
    _, skipped = stripe_convs(m2)
    assert skipped == {"conv2": "weight is an overridable initializer (also a graph input)"}


# ---------------------------------------------------------------------------------------------
# selection


def test_ratio_half_removes_floor_share_and_never_empties_a_filter():
    rng = np.random.default_rng(5)
    s = np.abs(rng.standard_normal((5, 3, 3)))
    keep = select_keep(s, 0.5)
    assert keep.size - keep.sum() == math.floor(0.5 * 45) == 22
    assert keep.reshape(5, -1).any(axis=1).all()
    # the removed stripes are the lowest, apart from each filter's protected best
    best = s.reshape(5, -1).max(axis=1)
    unprotected_kept = s[keep & (s < best[:, None, None])]
    if unprotected_kept.size:
        assert s[~keep].max() <= unprotected_kept.min()


def test_filter_keeps_its_best_stripe_even_when_globally_weak():
    """Filter 0 is weak everywhere: its best stripe stays although every other filter's beats it."""
    s = np.ones((3, 3, 3))
    s[0] = 0.01
    s[0, 1, 1] = 0.02
    keep = select_keep(s, 0.4)  # floor(10.8) = 10 removed: filter 0's 8 weak ones, then 2 more
    assert keep.size - keep.sum() == 10
    assert keep[0].sum() == 1 and keep[0, 1, 1]


def test_high_ratio_capped_at_one_stripe_per_filter():
    rng = np.random.default_rng(6)
    s = np.abs(rng.standard_normal((4, 3, 3)))
    keep = select_keep(s, 0.99)
    assert removed_count(4, 36, 0.99) == 32
    assert (keep.reshape(4, -1).sum(axis=1) == 1).all()
    assert (keep.reshape(4, -1).argmax(axis=1) == s.reshape(4, -1).argmax(axis=1)).all()


def test_ratio_zero_keeps_all_and_bad_ratios_refused():
    s = np.ones((2, 3, 3))
    assert select_keep(s, 0.0).all()
    for bad in (-0.1, 1.0, float("nan")):
        with pytest.raises(UserError):
            select_stripes({"c": s}, bad)


def test_planted_stripes_are_exactly_the_removed_ones():
    m, dead = planted()
    scores = conv_stripe_scores(m)
    # the planted row is 1/3 of conv1's stripes
    plan = select_stripes({"conv1": scores["conv1"]}, 1 / 3)
    np.testing.assert_array_equal(~plan.keep["conv1"], dead["conv1"])
    # conv2's random stripes: the ratio that removes as many as were planted
    n2 = int(dead["conv2"].sum())
    keep2 = select_keep(scores["conv2"], ratio_for(n2, dead["conv2"].size))
    np.testing.assert_array_equal(~keep2, dead["conv2"])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_masked_planted_model_equals_planted(seed):
    m, dead = planted(seed)
    scores = conv_stripe_scores(m)
    keep = {k: select_keep(scores[k], ratio_for(int(d.sum()), d.size)) for k, d in dead.items()}
    masked = mask_stripes(m, StripePlan(keep))
    onnx.checker.check_model(masked, full_check=True)
    assert [n.SerializeToString() for n in masked.graph.node] == [n.SerializeToString() for n in m.graph.node]
    for name, w in weights(m).items():
        np.testing.assert_array_equal(weights(masked)[name], w)
    x = np.random.default_rng(seed + 10).standard_normal((1, C_IN, HW, HW)).astype(np.float32)
    a, b = run(masked, x), run(m, x)
    assert np.abs(a - b).max() <= 1e-6 * np.abs(b).max()


def test_mask_zeroes_exactly_the_removed_stripes():
    rng = np.random.default_rng(7)
    m = cnn(rng.standard_normal((F1, C_IN, 3, 3)), rng.standard_normal((F2, F1 // 2, 3, 3)), constant_w2=True)
    plan = plan_stripes(m, 0.5)
    assert plan.removed() == {"conv1": 36, "conv2": 27}
    before = m.SerializeToString()
    masked = mask_stripes(m, plan)
    assert m.SerializeToString() == before  # the input model is untouched
    w1 = numpy_helper.to_array(m.graph.initializer[0])
    got1 = numpy_helper.to_array(masked.graph.initializer[0])
    np.testing.assert_array_equal(got1, w1 * plan.keep["conv1"][:, None])
    w2 = numpy_helper.to_array(m.graph.node[2].attribute[0].t)
    got2 = numpy_helper.to_array(masked.graph.node[2].attribute[0].t)
    np.testing.assert_array_equal(got2, w2 * plan.keep["conv2"][:, None])
    # the masked model computes the numpy-masked weights' model
    ref = cnn(w1 * plan.keep["conv1"][:, None], w2 * plan.keep["conv2"][:, None])
    x = rng.standard_normal((1, C_IN, HW, HW)).astype(np.float32)
    a, b = run(masked, x), run(ref, x)
    assert np.abs(a - b).max() <= 1e-6 * np.abs(b).max()


def test_mask_refuses_bad_plans():
    m, _ = planted()
    with pytest.raises(UserError, match="no Conv of that name"):
        mask_stripes(m, StripePlan({"nope": np.ones((1, 3, 3), dtype=bool)}))
    with pytest.raises(UserError, match="does not match"):
        mask_stripes(m, StripePlan({"conv1": np.ones((F1, 3, 2), dtype=bool)}))
    with pytest.raises(UserError, match="keeps no stripe"):
        StripePlan({"conv1": np.zeros((F1, 3, 3), dtype=bool)})


# ---------------------------------------------------------------------------------------------
# plans as JSON


def test_json_round_trip():
    m, _ = planted()
    plan = plan_stripes(m, 0.5, norm="l2")
    back = StripePlan.from_json(plan.to_json())
    assert back.ratio == 0.5 and back.norm == "l2"
    assert set(back.keep) == set(plan.keep)
    for k in plan.keep:
        assert back.keep[k].dtype == bool
        np.testing.assert_array_equal(back.keep[k], plan.keep[k])
    assert back.to_json() == plan.to_json()


def test_json_refuses_other_documents():
    for text in ("[]", "{", '{"kind": "onnxprune.stripes", "version": 2}',
                 '{"kind": "onnxprune.stripes", "version": 1, "convs": {"c": {"shape": [1, 3, 3], "keep": [1]}}}'):
        with pytest.raises(UserError):
            StripePlan.from_json(text)
