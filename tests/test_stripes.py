"""Stripe pruning (issue 12): stripe importance (weights; activation-weighted with captured second
moments), free and box ("kernel-shape") selection per conv and with a global ratio, the JSON plan,
stripe MACs and the soft (mask) mode, on small CNNs built with ``onnx.helper`` and run with
onnxruntime, and on planted score arrays checked against brute force."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from onnxprune.errors import UserError
from onnxprune.planning import stripes
from onnxprune.planning.stripes import (
    StripePlan,
    activation_stripe_importance,
    conv_activation_scores,
    conv_out_hw,
    conv_stripe_scores,
    distinct_boxes,
    filter_boxes,
    global_removed_counts,
    is_box_mask,
    kernel_boxes,
    plan_stripes,
    removed_count,
    select_box_keep,
    select_boxes,
    select_keep,
    select_keep_count,
    select_stripes,
    stripe_convs,
    stripe_importance,
    stripe_macs,
    stripe_taps,
)
from onnxprune.rewrite.stripes import mask_stripes
from onnxprune.runtime.calib import CalibSpec, CalibView, open_calib
from onnxprune.runtime.capture import capture
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


# ---------------------------------------------------------------------------------------------
# box selection: helpers written independently of the module (plain slicing and enumeration)


def all_boxes(k: int, k2: int) -> list[tuple[int, int, int, int]]:
    return [(i0, i1, j0, j1) for i0 in range(k) for i1 in range(i0 + 1, k + 1)
            for j0 in range(k2) for j1 in range(j0 + 1, k2 + 1)]


def rect(k: int, k2: int, box) -> np.ndarray:
    m = np.zeros((k, k2), dtype=bool)
    m[box[0]:box[1], box[2]:box[3]] = True
    return m


def kept_boxes(mask: np.ndarray) -> list[tuple[int, int, int, int]]:
    """Each filter's kept stripes as a box, asserting they are one full rectangle."""
    out = []
    for m in mask:
        rows, cols = np.flatnonzero(m.any(axis=1)), np.flatnonzero(m.any(axis=0))
        box = (int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1)
        assert (rect(*m.shape, box) == m).all(), "kept stripes are not one box"
        out.append(box)
    return out


def brute_force(s: np.ndarray, n: int, k: int) -> tuple[float, int]:
    """The best kept score over every assignment of a box to each filter with at most ``k``
    distinct boxes and at least ``n`` stripes removed, and the largest kept area among the
    assignments that reach it (within 1e-9)."""
    f, k1, k2 = s.shape
    boxes = all_boxes(k1, k2)
    gain = np.array([[s[i, b[0]:b[1], b[2]:b[3]].sum() for b in boxes] for i in range(f)])
    area = np.array([(b[1] - b[0]) * (b[3] - b[2]) for b in boxes])
    assign = np.array(list(itertools.product(range(len(boxes)), repeat=f)))
    total_gain = gain[np.arange(f), assign].sum(axis=1)
    total_area = area[assign].sum(axis=1)
    srt = np.sort(assign, axis=1)
    distinct = 1 + (np.diff(srt, axis=1) != 0).sum(axis=1)
    ok = (total_area <= s.size - n) & (distinct <= k)
    best = total_gain[ok].max()
    near = ok & (total_gain >= best - 1e-9)
    return float(best), int(total_area[near].max())


def two_populations(seed: int = 0, f: int = 8) -> np.ndarray:
    """Positive scores; kernel row 2 dead in the first half of the filters, row 0 in the second."""
    s = np.random.default_rng(seed).uniform(0.5, 1.5, (f, 3, 3))
    s[: f // 2, 2, :] = 0
    s[f // 2:, 0, :] = 0
    return s


# ---------------------------------------------------------------------------------------------
# box selection


@pytest.mark.parametrize("max_boxes", [1, 2, 3])
def test_box_dead_row_keeps_rows_0_1(max_boxes):
    s = np.random.default_rng(10).uniform(0.5, 1.5, (8, 3, 3))
    s[:, 2, :] = 0
    keep = select_box_keep(s, removed_count(8, 72, 1 / 3), max_boxes)
    assert keep.size - keep.sum() == 24
    assert kept_boxes(keep) == [(0, 2, 0, 3)] * 8


def test_box_dead_column_keeps_the_other_columns():
    s = np.random.default_rng(11).uniform(0.5, 1.5, (6, 3, 3))
    s[:, :, 0] = 0
    plan = select_boxes({"c": s}, 1 / 3)
    assert plan.shape == "box" and plan.removed() == {"c": 18}
    assert kept_boxes(plan.keep["c"]) == [(0, 3, 1, 3)] * 6


def test_box_two_populations_found_with_two_boxes():
    s = two_populations()
    keep = select_box_keep(s, 24, 2)
    assert kept_boxes(keep) == [(0, 2, 0, 3)] * 4 + [(1, 3, 0, 3)] * 4
    np.testing.assert_allclose((s * keep).sum(), s.sum())


def test_box_two_populations_with_one_box_take_the_best_single_box():
    s = two_populations()
    keep = select_box_keep(s, 24, 1)
    boxes = kept_boxes(keep)
    assert len(set(boxes)) == 1 and keep.size - keep.sum() >= 24
    fits = [b for b in all_boxes(3, 3) if 8 * (b[1] - b[0]) * (b[3] - b[2]) <= 72 - 24]
    best = max(s[:, b[0]:b[1], b[2]:b[3]].sum() for b in fits)
    np.testing.assert_allclose((s * keep).sum(), best)
    assert (s * keep).sum() < (s * select_box_keep(s, 24, 2)).sum() - 1  # the second box is worth it


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("max_boxes", [1, 2])
def test_box_selection_is_optimal_against_brute_force(seed, max_boxes):
    rng = np.random.default_rng(seed)
    f = 1 + seed % 3
    k1, k2 = [(3, 3), (2, 3), (3, 2), (2, 2)][seed % 4]
    s = rng.uniform(0, 1, (f, k1, k2)) ** 3
    s[rng.random(s.shape) < 0.3] = 0  # zero stripes: ties in gain, broken by kept area
    n = int(rng.integers(0, s.size - f + 1))
    keep = select_box_keep(s, n, max_boxes)
    assert keep.size - keep.sum() >= n
    assert len(set(kept_boxes(keep))) <= max_boxes
    best, area = brute_force(s, n, max_boxes)
    assert (s * keep).sum() >= best - 1e-9
    assert keep.sum() == area  # no more stripes removed than an optimal assignment needs


def test_box_removes_no_more_than_an_optimum_needs():
    """Zero stripes make many assignments equally good: the one kept keeps the most area (filter 0
    may as well keep its whole kernel, removing only what the target asks)."""
    s = np.zeros((3, 3, 3))
    s[0, 1, 1] = 2
    s[1, 0, :2], s[1, 1, :2] = 2, 1
    s[2, 1, 2], s[2, 2, 2] = 2, 1
    keep = select_box_keep(s, 1, 2)
    best, area = brute_force(s, 1, 2)
    np.testing.assert_allclose((s * keep).sum(), best)
    assert keep.sum() == area


def test_three_boxes_find_three_populations_and_never_lose_to_two():
    rng = np.random.default_rng(12)
    s = rng.uniform(0.5, 1.5, (9, 3, 3))
    s[0:3, 2, :] = 0
    s[3:6, 0, :] = 0
    s[6:9, :, 0] = 0
    keep3 = select_box_keep(s, 27, 3)
    assert kept_boxes(keep3) == [(0, 2, 0, 3)] * 3 + [(1, 3, 0, 3)] * 3 + [(0, 3, 1, 3)] * 3
    keep2 = select_box_keep(s, 27, 2)
    assert len(set(kept_boxes(keep2))) == 2
    assert (s * keep3).sum() > (s * keep2).sum()
    for seed in range(6):
        r = np.random.default_rng(100 + seed).uniform(0, 1, (5, 3, 3)) ** 2
        n = removed_count(5, 45, 0.1 * (seed + 2))
        k3, k2 = select_box_keep(r, n, 3), select_box_keep(r, n, 2)
        assert k3.size - k3.sum() >= n and len(set(kept_boxes(k3))) <= 3
        assert (r * k3).sum() >= (r * k2).sum() - 1e-9


@pytest.mark.parametrize("seed", range(6))
def test_set_solvers_for_three_boxes_against_brute_force(seed):
    """For a fixed set of boxes the dynamic programme is exact and the Lagrangian solution, after
    the local search, is feasible and within one filter's largest gain of the optimum."""
    rng = np.random.default_rng(40 + seed)
    f = 2 + seed % 3
    s = rng.uniform(0, 1, (f, 3, 3)) ** 3
    n = int(rng.integers(0, s.size - f + 1))
    boxes = kernel_boxes(3, 3)
    gain = np.array([[s[i, b[0]:b[1], b[2]:b[3]].sum() for b in boxes] for i in range(f)])
    area = (boxes[:, 1] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 2])
    budget = s.size - n
    allowed = np.sort(rng.choice(len(boxes), 3, replace=False))
    allowed[-1] = len(boxes) - 1  # a 1x1 box: always feasible
    best = max(gain[np.arange(f), list(a)].sum() for a in itertools.product(allowed, repeat=f)
               if area[list(a)].sum() <= budget)
    exact = stripes._knapsack(gain, area, budget, allowed, 1e-12)
    assert area[exact].sum() <= budget and set(exact) <= set(allowed)
    assert gain[np.arange(f), exact].sum() >= best - 1e-9
    lag = stripes._lagrange(gain, area, budget, allowed, 1e-12)
    lag = stripes._local_search(gain, area, budget, lag, allowed, 1e-12)
    assert area[lag].sum() <= budget and set(lag) <= set(allowed)
    assert gain[np.arange(f), lag].sum() >= best - gain.max() - 1e-9


def test_large_kernel_candidates_still_meet_the_target():
    s = np.random.default_rng(13).uniform(0, 1, (6, 11, 11))
    s[:, 8:, :] = 0  # rows 8-10 dead
    n = removed_count(6, s.size, 3 / 11)
    keep = select_box_keep(s, n, 2)
    assert keep.size - keep.sum() >= n
    assert kept_boxes(keep) == [(0, 8, 0, 11)] * 6


def test_box_ties_are_deterministic_and_prefer_one_box():
    s = np.ones((4, 3, 3))
    a, b = select_box_keep(s, 12, 2), select_box_keep(s.copy(), 12, 2)
    np.testing.assert_array_equal(a, b)
    assert len(set(kept_boxes(a))) == 1 and a.size - a.sum() == 12


def test_grouped_conv_gets_one_box():
    s = two_populations(seed=1)
    plan = select_boxes({"g": s, "d": s.copy()}, 1 / 3, max_boxes=2, groups={"g": 2, "d": 1})
    assert len(set(kept_boxes(plan.keep["g"]))) == 1
    assert len(set(kept_boxes(plan.keep["d"]))) == 2
    # from a model: conv2 of the test CNN has group=2
    m, _ = planted()
    plan = plan_stripes(m, 0.4, shape="box", max_boxes=3)
    assert {c.key: c.group for c in stripe_convs(m)[0]} == {"conv1": 1, "conv2": 2}
    assert len(set(kept_boxes(plan.keep["conv2"]))) == 1
    assert len(set(kept_boxes(plan.keep["conv1"]))) <= 3
    for k, mask in plan.keep.items():
        assert mask.size - mask.sum() >= removed_count(mask.shape[0], mask.size, 0.4), k


def test_max_boxes_per_conv_dict():
    s = two_populations(seed=2)
    plan = select_boxes({"a": s, "b": s.copy()}, 1 / 3, max_boxes={"a": 1})
    assert len(set(kept_boxes(plan.keep["a"]))) == 1
    assert len(set(kept_boxes(plan.keep["b"]))) == 2  # the default, 2
    with pytest.raises(UserError, match="not scored"):
        select_boxes({"a": s}, 0.3, max_boxes={"zz": 1})
    for bad in (0, True, 1.5):
        with pytest.raises(UserError):
            select_boxes({"a": s}, 0.3, max_boxes=bad)


def test_box_helpers():
    assert len(kernel_boxes(3, 3)) == len(all_boxes(3, 3)) == 36
    assert sorted(map(tuple, kernel_boxes(2, 3).tolist())) == sorted(all_boxes(2, 3))
    mask = np.zeros((3, 3, 3), dtype=bool)
    mask[0, 0:2, 1:3] = True
    mask[1, 2, 0] = True
    mask[2] = True
    assert filter_boxes(mask).tolist() == [[0, 2, 1, 3], [2, 3, 0, 1], [0, 3, 0, 3]]
    assert is_box_mask(mask) and distinct_boxes(mask) == 3
    mask[2, 1, 1] = False
    assert not is_box_mask(mask)


def test_box_plan_is_checked():
    free = np.ones((2, 3, 3), dtype=bool)
    free[0, 1, 1] = False  # a ring: not a box
    StripePlan({"c": free})  # fine as a free plan
    with pytest.raises(UserError, match="not one box"):
        StripePlan({"c": free}, shape="box")
    two = np.zeros((2, 3, 3), dtype=bool)
    two[0, :2] = True
    two[1, 1:] = True
    StripePlan({"c": two}, shape="box", max_boxes=2)
    with pytest.raises(UserError, match="distinct boxes"):
        StripePlan({"c": two}, shape="box", max_boxes=1)
    with pytest.raises(UserError, match="shape"):
        StripePlan({"c": two}, shape="ring")


# ---------------------------------------------------------------------------------------------
# plans as JSON: shape, scope, version-1 files


def test_box_plan_json_round_trip():
    s = two_populations(seed=3)
    plan = select_boxes({"a": s, "b": s[:4]}, 0.3, max_boxes={"a": 2, "b": 1}, norm="l2", global_=True,
                        max_ratio=0.8)
    back = StripePlan.from_json(plan.to_json())
    assert (back.shape, back.scope, back.max_boxes, back.max_ratio, back.norm) == ("box", "global",
                                                                                 {"a": 2, "b": 1}, 0.8, "l2")
    for k in plan.keep:
        np.testing.assert_array_equal(back.keep[k], plan.keep[k])
    assert back.to_json() == plan.to_json()


def test_loads_a_version_1_plan_written_before_shapes():
    keep = np.ones((2, 3, 3), dtype=int)
    keep[1, 0, 0] = 0
    text = json.dumps({"kind": "onnxprune.stripes", "version": 1, "ratio": 0.05, "norm": "l1",
                       "convs": {"conv1": {"shape": [2, 3, 3], "keep": keep.tolist()}}}, indent=1)
    plan = StripePlan.from_json(text)
    assert plan.shape == "free" and plan.scope is None and plan.max_boxes is None
    np.testing.assert_array_equal(plan.keep["conv1"], keep.astype(bool))
    with pytest.raises(UserError, match="not one box"):
        StripePlan.from_json(text.replace('"norm": "l1"', '"norm": "l1", "shape": "box"'))


# ---------------------------------------------------------------------------------------------
# activation-weighted importance


def test_activation_importance_equals_loop_in_a_grouped_conv():
    rng = np.random.default_rng(20)
    g, f, cg = 2, 6, 3
    w = rng.standard_normal((f, cg, 3, 2))
    msq = rng.uniform(0, 2, g * cg)
    got = activation_stripe_importance(w, msq, group=g)
    want = np.empty((f, 3, 2))
    for i in range(f):
        channels = range((i // (f // g)) * cg, (i // (f // g) + 1) * cg)
        for a in range(3):
            for b in range(2):
                want[i, a, b] = math.sqrt(sum(w[i, c, a, b] ** 2 * msq[ch] for c, ch in enumerate(channels)))
    np.testing.assert_allclose(got, want, rtol=1e-12)
    np.testing.assert_allclose(activation_stripe_importance(w, np.ones(g * cg), g), stripe_importance(w, "l2"),
                               rtol=1e-12)
    with pytest.raises(UserError, match="channels"):
        activation_stripe_importance(w, msq[:-1], group=g)
    with pytest.raises(UserError):
        activation_stripe_importance(w, -msq, group=g)


def test_zero_second_moment_makes_a_channels_weights_irrelevant():
    """Channel 0 is always zero. Stripes whose weight lives on channel 0 look strongest by L1 but
    carry no output energy: activation importance removes exactly them."""
    rng = np.random.default_rng(21)
    w = rng.uniform(0.1, 0.2, (4, 3, 3, 3))
    loud = np.zeros((4, 3, 3), dtype=bool)
    loud[:, 0, :] = True  # kernel row 0: large weights on channel 0 only
    w[:, 0][loud] = 5.0
    w[:, 1:, 0, :] = 0.01  # and small ones on the live channels
    msq = np.array([0.0, 1.0, 1.0])
    act = activation_stripe_importance(w, msq)
    w2 = w.copy()
    w2[:, 0] = rng.standard_normal(w2[:, 0].shape) * 100  # anything on the dead channel
    np.testing.assert_array_equal(activation_stripe_importance(w2, msq), act)
    n = int(loud.sum())
    np.testing.assert_array_equal(~select_keep_count(act, n), loud)
    assert not (~select_keep_count(stripe_importance(w, "l1"), n) & loud).any()  # L1 keeps them all


def test_taps_and_captured_moments_feed_the_scores(tmp_path):
    rng = np.random.default_rng(22)
    w1, w2 = rng.standard_normal((F1, C_IN, 3, 3)), rng.standard_normal((F2, F1 // 2, 3, 3))
    m = cnn(w1, w2)
    taps = stripe_taps(m)
    assert taps == [("X", 1), ("R", 1)]
    x = (rng.standard_normal((6, C_IN, HW, HW)) * np.array([0.0, 1, 2, 3])[:, None, None]).astype(np.float32)
    np.save(tmp_path / "X.npy", x)
    data = open_calib(m, CalibSpec(path=str(tmp_path / "X.npy"), holdout=0.5))
    cap = capture(m, taps, CalibView(data, "all", np.arange(data.available)), ep="cpu")
    msq = {name: cap.stats[name].mean_sq for name, _ in taps}
    np.testing.assert_allclose(msq["X"], np.square(x.astype(np.float64)).mean(axis=(0, 2, 3)), rtol=1e-6)
    scores = conv_activation_scores(m, msq)
    np.testing.assert_allclose(scores["conv1"], activation_stripe_importance(w1.astype(np.float32), msq["X"]))
    np.testing.assert_allclose(scores["conv2"], activation_stripe_importance(w2.astype(np.float32), msq["R"], 2))
    dead = w1.astype(np.float32).copy()
    dead[:, 0] = 0  # input channel 0 is always zero: its weights do not count
    np.testing.assert_allclose(scores["conv1"], activation_stripe_importance(dead, msq["X"]))
    assert msq["X"][0] == 0 and not np.allclose(scores["conv1"], stripe_importance(w1, "l2"))
    plan = plan_stripes(m, 0.5, norm="activation", mean_sq=msq)
    assert plan.norm == "activation"
    np.testing.assert_array_equal(plan.keep["conv1"], select_keep(scores["conv1"], 0.5))
    with pytest.raises(UserError, match="no second moments"):
        conv_activation_scores(m, {"X": msq["X"]})
    with pytest.raises(UserError, match="mean_sq"):
        plan_stripes(m, 0.5, norm="activation")


# ---------------------------------------------------------------------------------------------
# global ratio


def three_convs(seed: int = 30) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"a": rng.uniform(0, 1, (6, 3, 3)) ** 2, "b": rng.uniform(0, 1, (4, 3, 3)),
            "c": rng.uniform(0, 1, (8, 3, 3)) ** 3}


def reference_counts(scores, ratio, max_ratio):
    """The global walk written plainly: (score / conv mean) ascending, each filter's first best
    stripe skipped, a conv at its cap skipped, until floor(ratio · total) are taken."""
    entries = []
    for ci, (k, s) in enumerate(scores.items()):
        flat = s.reshape(s.shape[0], -1)
        for f in range(flat.shape[0]):
            best = int(np.argmax(flat[f]))
            for j in range(flat.shape[1]):
                if j != best:
                    entries.append((flat[f, j] / flat.mean(), ci, f * flat.shape[1] + j, k))
    entries.sort()
    target = math.floor(ratio * sum(s.size for s in scores.values()))
    caps = {k: min(math.floor(max_ratio * s.size), s.size - s.shape[0]) for k, s in scores.items()}
    got = dict.fromkeys(scores, 0)
    for *_, k in entries:
        if sum(got.values()) == target:
            break
        if got[k] < caps[k]:
            got[k] += 1
    return got


@pytest.mark.parametrize("ratio", [0.2, 0.5, 0.75])
def test_global_counts_follow_the_normalized_ranking(ratio):
    scores = three_convs()
    assert global_removed_counts(scores, ratio, 0.9) == reference_counts(scores, ratio, 0.9)
    assert sum(global_removed_counts(scores, ratio, 0.9).values()) == math.floor(ratio * 162)


@pytest.mark.parametrize("shape", ["free", "box"])
def test_global_selection_ignores_a_conv_scaled_by_1000(shape):
    scores = three_convs(31)
    scaled = dict(scores, b=scores["b"] * 1000)
    select = select_stripes if shape == "free" else select_boxes
    plain, big = select(scores, 0.4, global_=True), select(scaled, 0.4, global_=True)
    for k in scores:
        np.testing.assert_array_equal(big.keep[k], plain.keep[k])
    assert 0 < plain.removed()["b"]
    # without normalization the scaled conv keeps every stripe: the test can tell
    raw = select(scaled, 0.4, global_=True, normalize="none")
    assert raw.removed()["b"] == 0


def test_global_cap_and_per_conv_selection():
    rng = np.random.default_rng(32)
    weak = rng.uniform(0, 0.01, (4, 3, 3))
    weak[:, 1, 1] = 1.0  # all importance in the centre: the rest normalizes to almost nothing
    scores = {"weak": weak, "flat": rng.uniform(0.9, 1.1, (4, 3, 3))}
    counts = global_removed_counts(scores, 0.5, max_ratio=0.6)
    assert counts == {"weak": math.floor(0.6 * 36), "flat": 36 - math.floor(0.6 * 36)}
    assert global_removed_counts(scores, 0.5, max_ratio=0.95) == {"weak": 32, "flat": 4}  # F stripes stay
    plan = select_stripes(scores, 0.5, global_=True, max_ratio=0.6)
    assert plan.scope == "global" and plan.max_ratio == 0.6
    for k, s in scores.items():
        np.testing.assert_array_equal(plan.keep[k], select_keep_count(s, counts[k]))
    boxes = select_boxes(scores, 0.5, global_=True, max_ratio=0.6)
    for k, s in scores.items():
        np.testing.assert_array_equal(boxes.keep[k], select_box_keep(s, counts[k], 2))
        assert boxes.removed()[k] >= counts[k]
    assert global_removed_counts(scores, 0.5, max_ratio=1.0) == {"weak": 32, "flat": 4}  # no cap but F stripes
    for bad in (0.0, 1.01, float("nan")):
        with pytest.raises(UserError):
            global_removed_counts(scores, 0.5, max_ratio=bad)


# ---------------------------------------------------------------------------------------------
# MACs


def test_stripe_macs_count_kept_stripes():
    m, _ = planted()
    convs, _ = stripe_convs(m)
    plan = plan_stripes(m, 0.5)
    out_hw = conv_out_hw(convs, {"A": (1, F1, HW, HW), "Y": (1, F2, 4, 5)})
    assert out_hw == {"conv1": (HW, HW), "conv2": (4, 5)}
    macs = stripe_macs(plan, convs, out_hw)
    kept1 = sum(int(plan.keep["conv1"][f, i, j]) * C_IN * HW * HW
                for f in range(F1) for i in range(3) for j in range(3))
    assert macs["conv1"].kept == kept1 and macs["conv1"].dense == F1 * 9 * C_IN * HW * HW
    assert macs["conv2"].kept == int(plan.keep["conv2"].sum()) * (F1 // 2) * 20
    assert macs["conv2"].dense == F2 * 9 * (F1 // 2) * 20
    assert macs["conv1"].share == pytest.approx(kept1 / (F1 * 9 * C_IN * HW * HW))
    with pytest.raises(UserError, match="output spatial size"):
        stripe_macs(plan, convs, {"conv1": (HW, HW)})
    with pytest.raises(UserError, match="not among"):
        stripe_macs(plan, convs[:1], out_hw)


# ---------------------------------------------------------------------------------------------
# properties


@st.composite
def score_arrays(draw):
    f = draw(st.integers(1, 6))
    k1, k2 = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    if k1 * k2 == 1:
        k2 = 2
    values = st.sampled_from([0.0, 0.5, 1.0]) | st.floats(0, 10, allow_nan=False)
    flat = draw(st.lists(values, min_size=f * k1 * k2, max_size=f * k1 * k2))
    return np.array(flat).reshape(f, k1, k2)


@settings(max_examples=150, deadline=None, derandomize=True, database=None)
@given(s=score_arrays(), ratio=st.floats(0, 0.99), max_boxes=st.integers(1, 3))
def test_property_no_filter_is_emptied_and_targets_are_met(s, ratio, max_boxes):
    f = s.shape[0]
    n = removed_count(f, s.size, ratio)
    free = select_keep(s, ratio)
    assert free.reshape(f, -1).any(axis=1).all() and free.size - free.sum() == n
    box = select_box_keep(s, n, max_boxes)
    assert box.size - box.sum() >= n
    assert len(set(kept_boxes(box))) <= max_boxes  # kept_boxes: one non-empty box per filter
    plan = StripePlan({"c": box}, shape="box", max_boxes=max_boxes)
    assert StripePlan.from_json(plan.to_json()).shape == "box"


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(a=score_arrays(), b=score_arrays(), ratio=st.floats(0, 0.99), cap=st.floats(0.05, 0.95),
       scale=st.sampled_from([1.0, 1e-3, 1e3]))
def test_property_global_never_empties_and_respects_caps(a, b, ratio, cap, scale):
    scores = {"a": a, "b": b * scale}
    counts = global_removed_counts(scores, ratio, cap)
    total = a.size + b.size
    assert sum(counts.values()) <= math.floor(ratio * total + 1e-9)
    for k, s in scores.items():
        assert counts[k] <= min(math.floor(cap * s.size + 1e-9), s.size - s.shape[0])
    for select in (select_stripes, select_boxes):
        plan = select(scores, ratio, global_=True, max_ratio=cap)
        for k, m in plan.keep.items():
            assert m.reshape(m.shape[0], -1).any(axis=1).all()
            assert plan.removed()[k] >= counts[k]
