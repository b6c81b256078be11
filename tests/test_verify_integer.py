"""Verification on the integers ONNX defines (issue 13, item 2), and outputs that are not tensors.

onnxruntime's x86 u8s8 kernels without VNNI saturate pairwise int16 sums, so a masked and a pruned
model with uint8 activations and int8 weights round differently there. ``measure.verify.integer_exact``
re-expresses such weights (and their zero points) as uint8, which defines the same integers; these
tests check that form against numpy's int64 arithmetic (an independent reference), that it is used only
where it is the same map on both models, and that a wrong pruned model still fails. The last part:
ZipMap's sequence of maps (skl2onnx classifiers) is compared class by class.
"""

from __future__ import annotations

import json
import platform

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxprune.measure.verify import comparable, compare, integer_exact, judge_integer_exact, masked_original
from onnxprune.runtime.machine import cpu_flags
from onnxprune.testing import checks

SATURATES_HERE = (platform.machine() in ("x86_64", "AMD64")
                  and not {"avx512_vnni", "avx_vnni", "amx_tile"} & cpu_flags())


def _model(nodes, inputs, outputs, inits, opsets=(("", 13),)) -> onnx.ModelProto:
    g = helper.make_graph(nodes, "g", inputs, outputs, inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets])
    onnx.checker.check_model(m, full_check=True)
    return m


def _run(m: onnx.ModelProto, feeds: dict) -> list:
    return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


def _matmul_integer(w: np.ndarray, wz: np.ndarray | None, rows: int = 8) -> onnx.ModelProto:
    k, n = w.shape
    inputs = ["x", "W", "xz"] + (["wz"] if wz is not None else [])
    inits = [numpy_helper.from_array(w, "W"), numpy_helper.from_array(np.uint8(3), "xz")]
    if wz is not None:
        inits.append(numpy_helper.from_array(wz, "wz"))
    return _model([helper.make_node("MatMulInteger", inputs, ["y"])],
                  [helper.make_tensor_value_info("x", TensorProto.UINT8, [rows, k])],
                  [helper.make_tensor_value_info("y", TensorProto.INT32, [rows, n])], inits)


def _init(m: onnx.ModelProto, name: str) -> np.ndarray:
    return next(numpy_helper.to_array(t) for t in m.graph.initializer if t.name == name)


@pytest.mark.parametrize("zero_point", [None, "scalar", "per-column"])
def test_re_expressed_matmul_integer_computes_the_exact_integers(zero_point):
    """Values chosen so that adjacent products overflow int16 (255 * 127 * 2 > 32767)."""
    rng = np.random.default_rng(0)
    w = rng.integers(90, 128, (64, 16)).astype(np.int8)
    w[::3] = -w[::3]
    wz = {None: None, "scalar": np.int8(-5), "per-column": rng.integers(-9, 9, 16).astype(np.int8)}[zero_point]
    x = rng.integers(200, 256, (8, 64)).astype(np.uint8)
    m = _matmul_integer(w, wz)
    exact = (x.astype(np.int64) - 3) @ (w.astype(np.int64) - (0 if wz is None else wz.astype(np.int64)))
    got = integer_exact(m)
    assert got is not None and got[1] == 1
    wide, _ = got
    onnx.checker.check_model(wide, full_check=True)
    assert _init(wide, "W").dtype == np.uint8
    assert np.array_equal(_init(wide, "W").astype(np.int64), w.astype(np.int64) + 128)
    zn = wide.graph.node[0].input[3]
    want_zp = 128 if wz is None else wz.astype(np.int64) + 128
    assert np.array_equal(_init(wide, zn).astype(np.int64), want_zp) and _init(wide, zn).dtype == np.uint8
    assert np.array_equal(_run(wide, {"x": x})[0], exact)
    if SATURATES_HERE:  # the reason for the rule: this host's u8s8 kernel does not compute them
        assert not np.array_equal(_run(m, {"x": x})[0], exact)


def test_conv_integer_re_expressed_is_exact():
    rng = np.random.default_rng(1)
    w = rng.integers(-128, 128, (8, 6, 3, 3)).astype(np.int8)
    x = rng.integers(180, 256, (2, 6, 9, 9)).astype(np.uint8)
    m = _model([helper.make_node("ConvInteger", ["x", "W"], ["y"], pads=[1, 1, 1, 1])],
               [helper.make_tensor_value_info("x", TensorProto.UINT8, [2, 6, 9, 9])],
               [helper.make_tensor_value_info("y", TensorProto.INT32, [2, 8, 9, 9])],
               [numpy_helper.from_array(w, "W")])
    xp = np.pad(x.astype(np.int64), ((0, 0), (0, 0), (1, 1), (1, 1)))
    win = np.lib.stride_tricks.sliding_window_view(xp, (3, 3), axis=(2, 3))  # n, c, h, w, kh, kw
    exact = np.einsum("nchwij,ocij->nohw", win, w.astype(np.int64))
    wide, count = integer_exact(m)
    assert count == 1
    assert np.array_equal(_run(wide, {"x": x})[0], exact)


def test_only_weights_read_by_integer_products_alone_are_re_expressed():
    """A weight also read by another op, and a product whose activation is int8, are left alone."""
    w = np.arange(-16, 16, dtype=np.int8).reshape(4, 8)
    shared = _model([helper.make_node("MatMulInteger", ["x", "W"], ["y"]), helper.make_node("Cast", ["W"], ["c"], to=1)],
                    [helper.make_tensor_value_info("x", TensorProto.UINT8, [2, 4])],
                    [helper.make_tensor_value_info("y", TensorProto.INT32, [2, 8]),
                     helper.make_tensor_value_info("c", TensorProto.FLOAT, [4, 8])], [numpy_helper.from_array(w, "W")])
    assert integer_exact(shared) is None
    signed = _model([helper.make_node("MatMulInteger", ["x", "W"], ["y"])],
                    [helper.make_tensor_value_info("x", TensorProto.INT8, [2, 4])],
                    [helper.make_tensor_value_info("y", TensorProto.INT32, [2, 8])], [numpy_helper.from_array(w, "W")])
    assert integer_exact(signed) is None


# ----------------------------------------------------------------------------------------------
# a dynamically quantized two-conv net, pruned: exact on the integers, and a wrong model fails


def dynamic_quantized(seed: int = 0) -> onnx.ModelProto:
    """x -> DynamicQuantizeLinear -> ConvInteger(w1) -> Cast -> *s1 -> Relu -> DynamicQuantizeLinear ->
    ConvInteger(w2) -> Cast -> *s2 -> y, as ``quantize_dynamic`` writes it; weights near +-127 so that
    u8s8 kernels that saturate do here."""
    rng = np.random.default_rng(seed)
    w1 = (rng.choice([-1, 1], (32, 3, 3, 3)) * rng.integers(60, 128, (32, 3, 3, 3))).astype(np.int8)
    w2 = (rng.choice([-1, 1], (16, 32, 3, 3)) * rng.integers(60, 128, (16, 32, 3, 3))).astype(np.int8)
    nodes = []
    for i, (src, w) in enumerate((("x", "w1"), ("r1", "w2")), start=1):
        nodes += [helper.make_node("DynamicQuantizeLinear", [src], [f"q{i}", f"qs{i}", f"qz{i}"]),
                  helper.make_node("ConvInteger", [f"q{i}", w, f"qz{i}", f"{w}_zp"], [f"c{i}"], pads=[1, 1, 1, 1]),
                  helper.make_node("Cast", [f"c{i}"], [f"f{i}"], to=TensorProto.FLOAT),
                  helper.make_node("Mul", [f"qs{i}", f"{w}_scale"], [f"s{i}"]),
                  helper.make_node("Mul", [f"f{i}", f"s{i}"], [f"m{i}"])]
        nodes.append(helper.make_node("Relu", [f"m{i}"], [f"r{i}"]) if i == 1 else
                     helper.make_node("Identity", [f"m{i}"], ["y"]))
    inits = [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(np.int8(0), "w1_zp"),
             numpy_helper.from_array(np.float32(0.01), "w1_scale"), numpy_helper.from_array(w2, "w2"),
             numpy_helper.from_array(np.int8(0), "w2_zp"), numpy_helper.from_array(np.float32(0.01), "w2_scale")]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 12, 12])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16, 12, 12])], inits)


def test_pruned_dynamic_quantized_net_equals_its_masked_original_on_the_integers():
    res = checks.prune_and_verify(dynamic_quantized(), 0.5)
    o = res.verification.outputs[0]
    assert res.verification.passed, o
    if o.rule == "integer-exact":
        assert o.integer.rel_error == 0.0 and o.integer.weights == 2
        assert "re-expressed as uint8" in o.reason
    else:
        assert o.rel_error == 0.0
    # the integer-exact judgement on its own, whichever rule decided here: exactly equal
    checks_ = [type(o)(o.name, float("inf"), 0.0, o.tol, o.shape)]
    x = {"x": np.random.default_rng(3).uniform(0.8, 1.0, (2, 3, 12, 12)).astype(np.float32)}  # u8 near 255
    an, plan, pruned = res.analysis, res.plan, res.pruned
    outs_o = _run(an.model, x)
    judge_integer_exact(an.model, masked_original(an.model, an.cg, plan), pruned, x, "cpu", outs_o, checks_)
    assert checks_[0].integer is not None and checks_[0].integer.rel_error == 0.0 and checks_[0].passed
    assert checks_[0].integer.host_rel_error < float("inf")


def test_a_wrong_pruned_quantized_model_fails_every_rule():
    res = checks.prune_and_verify(dynamic_quantized(), 0.5)
    an, plan, pruned = res.analysis, res.plan, res.pruned
    wrong = onnx.ModelProto()
    wrong.CopyFrom(pruned)
    for t in wrong.graph.initializer:
        if t.name == "w2":
            arr = numpy_helper.to_array(t).copy()
            arr[0, 0, 1, 1] = -arr[0, 0, 1, 1] if arr[0, 0, 1, 1] != -128 else 127
            t.CopyFrom(numpy_helper.from_array(arr, "w2"))
    x = {"x": np.random.default_rng(4).standard_normal((2, 3, 12, 12)).astype(np.float32)}
    v = compare(an.model, masked_original(an.model, an.cg, plan), wrong, x, "cpu")
    o = v.outputs[0]
    assert not v.passed
    assert o.integer is not None and o.integer.rel_error > 1e-3  # judged on the integers too, and failed


# ----------------------------------------------------------------------------------------------
# ZipMap: a sequence of maps, compared class by class


def zipmap_classifier() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Gemm", ["x", "W1", "b1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Gemm", ["r", "W2", "b2"], ["z"]), helper.make_node("Softmax", ["z"], ["p"], axis=1),
             helper.make_node("ZipMap", ["p"], ["probs"], domain="ai.onnx.ml", classlabels_int64s=[3, 5, 7])]
    inits = [numpy_helper.from_array(rng.standard_normal((4, 16)).astype(np.float32), "W1"),
             numpy_helper.from_array(rng.standard_normal(16).astype(np.float32), "b1"),
             numpy_helper.from_array(rng.standard_normal((16, 3)).astype(np.float32), "W2"),
             numpy_helper.from_array(rng.standard_normal(3).astype(np.float32), "b2")]
    seq = helper.make_sequence_type_proto(helper.make_map_type_proto(
        TensorProto.INT64, helper.make_tensor_type_proto(TensorProto.FLOAT, [])))
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                  [helper.make_value_info("probs", seq)], inits, opsets=(("", 13), ("ai.onnx.ml", 1)))


def test_sequence_of_maps_is_compared_key_by_key():
    a = [{3: 0.5, 5: 0.25}, {3: 0.1, 5: 0.9}]
    arr, keys = comparable(a)
    assert keys == (3, 5) and np.array_equal(arr, [[0.5, 0.25], [0.1, 0.9]])
    assert comparable([{3: 0.5, 6: 0.5}])[1] != keys  # other classes: never equal


def test_zipmap_classifier_prunes_and_verifies(run_main, tmp_path):
    src, out, report = tmp_path / "clf.onnx", tmp_path / "p.onnx", tmp_path / "r.json"
    onnx.save(zipmap_classifier(), src)
    r = run_main("prune", src, "-o", out, "--ratio", "0.5", "--verify", "--ep", "cpu", "--report", report)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "PASSED" in r.stdout.splitlines()[-1]
    v = json.loads(report.read_text())["verification"]
    assert v["passed"] and v["outputs"][0]["rel_error"] < 1e-6 and v["outputs"][0]["shape"][1] == 3
    pruned = onnx.load(str(out))
    assert [list(t.dims) for t in pruned.graph.initializer if t.name == "W1"] == [[4, 8]]
    x = np.random.default_rng(5).standard_normal((5, 4)).astype(np.float32)
    got = _run(pruned, {"x": x})[0]
    assert len(got) == 5 and set(got[0]) == {3, 5, 7}
