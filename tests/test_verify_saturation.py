"""Verification of outputs made by a saturating op (issue 9: text-detection sigmoid maps).

When a Sigmoid squashes its input into the flat region, max |M| of the output is as small as the
kernel's own rounding, so float noise reads as a large relative error while every tensor before it
matches. Such an output is judged on the op's input as well; a wrong model must still fail.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import onnxprune.measure.verify
from onnxprune.cli import main
from onnxprune.measure.verify import DEFAULT_TOL, allowance, compare, verify_plan
from onnxprune.runtime.inputs import make_inputs
from onnxprune.testing import checks, graphs

# x -> Conv -> Relu -> Conv(w2, b2) -> z -> Sigmoid -> y; b2 puts z around -14 (sigmoid ~1e-6)
SATURATED = graphs.H17 + """
g (float[N,3,16,16] x) => (float[N,1,16,16] y)
<float[32,3,3,3] w1, float[32] b1, float[1,32,3,3] w2, float[1] b2>
{
  h = Conv<pads=[1,1,1,1]>(x, w1, b1)
  r = Relu(h)
  z = Conv<pads=[1,1,1,1]>(r, w2, b2)
  y = Sigmoid(z)
}
"""


def saturated_model(bias: float = -14.0, seed: int = 0) -> onnx.ModelProto:
    m = graphs.build(SATURATED, seed=seed)
    for i, t in enumerate(m.graph.initializer):
        if t.name == "b2":
            m.graph.initializer[i].CopyFrom(numpy_helper.from_array(np.array([bias], np.float32), "b2"))
    return m


def _set(model: onnx.ModelProto, name: str, arr: np.ndarray) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for i, t in enumerate(out.graph.initializer):
        if t.name == name:
            out.graph.initializer[i].CopyFrom(numpy_helper.from_array(arr.astype(np.float32), name))
    return out


# ----------------------------------------------------------------------------------------------
# (a) float noise on a saturated sigmoid: judged on its input, passes, and says so


def test_saturated_sigmoid_passes_on_its_input_and_says_so():
    res = checks.prune_and_verify(saturated_model(), 0.5)
    o = res.verification.outputs[0]
    assert o.rel_error > 10 * DEFAULT_TOL  # the false alarm: the output's own relative error fails
    assert res.verification.passed, o
    assert o.rule == "pre-activation"
    assert o.saturation.op == "Sigmoid" and o.saturation.input == "z"
    assert o.saturation.rel_error < 1e-5 and o.saturation.explained
    assert o.min_passing_tol == o.saturation.rel_error
    assert "saturated Sigmoid; judged on its input 'z'" in o.reason


def test_saturated_sigmoid_cli_line_and_report(tmp_path, capsys):
    src, out, report = tmp_path / "m.onnx", tmp_path / "p.onnx", tmp_path / "r.json"
    onnx.save(saturated_model(), src)
    rc = main(["prune", str(src), "-o", str(out), "--ratio", "0.5", "--verify", "--ep", "cpu", "--report", str(report)])
    text = capsys.readouterr().out
    assert rc == 0 and out.exists()
    assert "saturated Sigmoid; judged on its input 'z'" in text and "PASSED" in text
    o = json.loads(report.read_text())["verification"]["outputs"][0]
    assert o["passed"] and o["rule"] == "pre-activation" and o["rel_error"] > DEFAULT_TOL  # old fields kept
    assert o["pre_activation"]["input"] == "z" and o["pre_activation"]["explained"]
    assert o["min_passing_tolerance"] == o["pre_activation"]["rel_error"]


def test_output_that_passes_on_its_own_keeps_the_relative_rule():
    res = checks.prune_and_verify(saturated_model(bias=0.0), 0.5)
    o = res.verification.outputs[0]
    assert res.verification.passed and o.rule == "relative" and o.saturation is None and o.reason == ""


# ----------------------------------------------------------------------------------------------
# (b) wrong models with a saturating output still fail


@pytest.mark.parametrize("delta", [1e-2, 1.0])
def test_wrong_pruned_model_with_saturated_sigmoid_fails(delta):
    res = checks.prune_and_verify(saturated_model(), 0.5)
    assert res.verification.passed
    w2 = checks.inits(res.pruned)["w2"].copy()
    w2[0, 0, 1, 1] += delta  # one weight of the last conv: a small and a gross mismatch
    wrong = _set(res.pruned, "w2", w2)
    v = verify_plan(res.analysis, res.plan, wrong, make_inputs(res.analysis.model))
    o = v.outputs[0]
    assert not v.passed and not o.passed
    assert o.rule == "pre-activation" and o.saturation.rel_error > DEFAULT_TOL
    assert o.min_passing_tol > DEFAULT_TOL


def test_unmasked_original_against_pruned_fails_in_the_cli(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(onnxprune.measure.verify, "masked_original", lambda model, cg, plan: model)
    src, out = tmp_path / "m.onnx", tmp_path / "p.onnx"
    onnx.save(saturated_model(), src)
    rc = main(["prune", str(src), "-o", str(out), "--ratio", "0.5", "--verify", "--ep", "cpu"])
    text = capsys.readouterr().out
    assert rc == 1 and not out.exists()
    assert "saturated Sigmoid; judged on its input 'z'" in text and "FAILED" in text


def _clip_model(hi: float) -> onnx.ModelProto:
    """x -> Mul(s) -> z -> Clip(z, 0, hi) -> y: hi tiny, so y saturates at hi almost everywhere."""
    nodes = [helper.make_node("Mul", ["x", "s"], ["z"]), helper.make_node("Clip", ["z", "lo", "hi"], ["y"])]
    inits = [numpy_helper.from_array(np.array(3.0, np.float32), "s"),
             numpy_helper.from_array(np.array(0.0, np.float32), "lo"),
             numpy_helper.from_array(np.array(hi, np.float32), "hi")]
    return graphs.from_nodes(nodes, inits, [1, 8], [1, 8])


def test_output_its_input_does_not_explain_fails():
    """Same op, same input names, input equal: the outputs differ (another Clip bound) beyond what
    the input's difference explains, so the pre-activation rule refuses."""
    m, p = _clip_model(1e-3), _clip_model(2e-3)
    feeds = {"x": np.abs(np.random.default_rng(0).standard_normal((1, 8))).astype(np.float32) + 0.1}
    v = compare(m, m, p, feeds, "cpu")
    o = v.outputs[0]
    assert not v.passed and o.rule == "pre-activation"
    assert o.saturation.rel_error == 0.0 and not o.saturation.explained
    assert "more than its input's |Δ| and rounding explain" in o.reason


def test_non_saturating_output_has_no_second_rule():
    m = graphs.small_cnn()
    feeds = make_inputs(m)
    wrong = onnx.ModelProto()
    wrong.CopyFrom(m)
    t = wrong.graph.initializer[0]
    t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * 1.5, t.name))
    o = compare(m, m, wrong, feeds, "cpu").outputs[0]
    assert not o.passed and o.rule == "relative" and o.saturation is None


def test_allowance_is_the_lipschitz_bound_plus_rounding():
    node = helper.make_node("Sigmoid", ["x"], ["y"])
    xm = np.array([-14.0, 0.0], np.float32)
    xp = xm + np.float32(1e-3)
    ym, yp = 1 / (1 + np.exp(-xm)), 1 / (1 + np.exp(-xp))
    a = allowance(node, 17, xp, xm, yp, ym)
    assert np.all(np.abs(yp - ym) <= a)
    eps = np.finfo(np.float32).eps
    assert np.allclose(a, 0.25 * np.abs(xp - xm) + 4 * eps * (1 + np.maximum(yp, ym)))
    hs = helper.make_node("HardSigmoid", ["x"], ["y"], alpha=0.5)
    assert np.allclose(allowance(hs, 17, xp, xm, ym, ym), 0.5 * np.abs(xp - xm) + 4 * eps * (1.5 + ym))


# ----------------------------------------------------------------------------------------------
# (c) the real model that raised the false alarm: PP-OCRv4 text detection (paddle2onnx, opset 12)

RAPIDOCR = "rapidocr-onnxruntime==1.4.4"
DET = "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx"


@pytest.fixture(scope="session")
def ppocr_det(tmp_path_factory) -> Path:
    dest = os.environ.get("ONNXPRUNE_REAL_MODELS")
    if dest and (Path(dest) / "ch_PP-OCRv4_det_infer.onnx").is_file():
        return Path(dest) / "ch_PP-OCRv4_det_infer.onnx"
    d = tmp_path_factory.mktemp("rapidocr")
    try:
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(d), RAPIDOCR],
                              capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        pytest.skip("pip download timed out (offline?)")
    wheels = list(d.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        pytest.skip(f"{RAPIDOCR} could not be downloaded (offline?): {proc.stderr.strip()[:200]}")
    out = d / "ch_PP-OCRv4_det_infer.onnx"
    with zipfile.ZipFile(wheels[0]) as z:
        out.write_bytes(z.read(DET))
    return out


@pytest.mark.network
def test_ppocr_det_saturated_sigmoid_verifies(ppocr_det, tmp_path):
    out, report = tmp_path / "p.onnx", tmp_path / "r.json"
    rc = main(["prune", str(ppocr_det), "-o", str(out), "--ratio", "0.3", "--verify", "--ep", "cpu",
               "--report", str(report)])
    assert rc == 0
    (o,) = json.loads(report.read_text())["verification"]["outputs"]
    assert o["passed"] and o["rule"] == "pre-activation" and o["rel_error"] > DEFAULT_TOL
    assert o["pre_activation"]["op"] == "Sigmoid" and o["pre_activation"]["rel_error"] < 1e-5
