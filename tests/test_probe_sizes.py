"""Inputs the probe cannot guess (issue 13 item 5): a speech model whose first convolution needs
>= 400 samples does not run at the default 16. The probe's sizes come from the user's arrays where
given (``--input``, ``--calib``); otherwise the dims at their default grow (doubling) until
onnxruntime runs the model, and the smallest that runs is used everywhere after; a model that never
runs is one error line naming the dimension and what was tried."""

from __future__ import annotations

import json
import warnings

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from onnxprune.runtime import inputs as rin
from onnxprune.runtime.probe import MAX_DIM
from onnxprune.testing import checks

torch = pytest.importorskip("torch")

KERNEL, STRIDE, KERNEL2 = 400, 160, 3


@pytest.fixture(autouse=True)
def _fresh_sizes():
    rin.forget_sizes()  # what an in-process probe found stays out of other tests
    yield
    rin.forget_sizes()


class Speech(torch.nn.Module):
    """raw waveform [batch, samples] -> Conv1d(k=400, s=160) -> ReLU -> Conv1d(k=3) -> ReLU -> mean -> Linear."""

    def __init__(self):
        super().__init__()
        self.c1 = torch.nn.Conv1d(1, 16, KERNEL, stride=STRIDE)
        self.c2 = torch.nn.Conv1d(16, 32, KERNEL2)
        self.fc = torch.nn.Linear(32, 10)

    def forward(self, wave):
        x = torch.relu(self.c1(wave.unsqueeze(1)))
        x = torch.relu(self.c2(x))
        return self.fc(x.mean(-1))


@pytest.fixture(scope="module")
def speech(tmp_path_factory):
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("speech")
    p = d / "speech.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Speech().eval(), (torch.randn(2, 1000),), str(p), input_names=["wave"],
                          output_names=["logits"], dynamic_axes={"wave": {0: "batch", 1: "samples"},
                                                                 "logits": {0: "batch"}},
                          opset_version=17, dynamo=False)
    return p


def smallest_running(default: int = rin.DEFAULT_OTHER) -> tuple[int, list[int]]:
    """From the conv arithmetic alone: the first size of the growth sequence (default, doubled) at
    which both convolutions have an output (conv1 gives floor((L - 400) / 160) + 1 steps, conv2 needs
    3 of them), and the sizes before it."""
    size, before = default, []
    while not (size >= KERNEL and (size - KERNEL) // STRIDE + 1 >= KERNEL2):
        before.append(size)
        size *= 2
    return size, before


def probe_row(report: dict, name: str = "wave") -> dict:
    (row,) = [r for r in report["probe_sizes"] if r.get("input") == name]
    return row


def test_the_default_size_does_not_run(speech):
    # the premise: at the default 16 samples onnxruntime refuses the model
    model = onnx.load(str(speech))
    with pytest.raises(Exception, match="Conv"):
        checks.run(model, rin.make_inputs(model))


def test_min_size_found_and_used_without_input(speech, tmp_path):
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    proc = checks.run_cli("prune", speech, "-o", out, "--ratio", "0.5", "--verify", "--ep", "cpu",
                          "--report", report)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.splitlines()[-1] == "PASSED"
    rep = json.loads(report.read_text())
    checks.assert_report_verified(rep)
    expect, before = smallest_running()
    assert expect >= KERNEL
    row = probe_row(rep)
    assert row["shape"] == [1, expect]
    (dim,) = [d for d in row["dims"] if d["axis"] == 1]
    assert dim == {"axis": 1, "name": "samples", "size": expect, "from": "grown", "did_not_run_at": before}
    assert f"dim 1 'samples' = {expect} (grown; did not run at {', '.join(map(str, before))})" in proc.stdout
    # the size is the smallest that runs: the one before it does not, and the pruned model runs at it
    model, pruned = onnx.load(str(speech)), onnx.load(str(out))
    with pytest.raises(Exception, match="Conv"):
        checks.run(model, {"wave": np.zeros((1, before[-1]), np.float32)})
    assert checks.run(pruned, {"wave": np.ones((1, expect), np.float32)})[0].shape == (1, 10)


def test_probe_uses_the_users_array_npz(speech, tmp_path):
    wave = np.random.default_rng(0).standard_normal((1, 1000)).astype(np.float32)
    npz = tmp_path / "wave.npz"
    np.savez(npz, wave=wave)
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    proc = checks.run_cli("prune", speech, "-o", out, "--ratio", "0.5", "--verify", "--ep", "cpu",
                          "--input", npz, "--report", report)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rep = json.loads(report.read_text())
    checks.assert_report_verified(rep)
    row = probe_row(rep)
    assert row["shape"] == [1, 1000]
    assert [d["from"] for d in row["dims"]] == ["--input", "--input"]
    assert "did_not_run_at" not in json.dumps(row)
    # and the pruned model computes what the masked original computes on that array
    ref = checks.run(speech, {"wave": wave})[0]
    assert checks.run(out, {"wave": wave})[0].shape == ref.shape


def test_calib_sizes_tried_first(speech, tmp_path):
    calib = tmp_path / "calib.npz"
    np.savez(calib, wave=np.random.default_rng(1).standard_normal((24, 1000)).astype(np.float32))
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    proc = checks.run_cli("prune", speech, "-o", out, "--ratio", "0.5", "--verify", "--ep", "cpu",
                          "--calib", calib, "--report", report)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rep = json.loads(report.read_text())
    checks.assert_report_verified(rep)
    (dim,) = [d for d in probe_row(rep)["dims"] if d["axis"] == 1]
    assert (dim["size"], dim["from"], dim["did_not_run_at"]) == (1000, "--calib", [rin.DEFAULT_OTHER])


def test_api_prunes_and_later_inputs_use_the_found_size(speech):
    model = onnx.load(str(speech))
    res = checks.prune_and_verify(model, 0.5)
    assert res.verification.passed
    expect, _ = smallest_running()
    assert rin.make_inputs(res.analysis.model)["wave"].shape == (1, expect)
    assert rin.make_inputs(res.pruned, batch=3)["wave"].shape == (3, expect)
    # exact against the masked original at the found size and at another batch and length
    checks.assert_matches_masked(res, [rin.make_inputs(model, seed=4), rin.make_inputs(model, {"wave": (2, 1600)})])


def never_runs() -> onnx.ModelProto:
    """[batch, samples] -> Reshape [-1, 7] -> MatMul: only sizes with batch * samples a multiple of 7
    run, and no size of the doubling sequence is one."""
    w = helper.make_tensor("w", TensorProto.FLOAT, [7, 4], np.ones(28, np.float32))
    shp = helper.make_tensor("shp", TensorProto.INT64, [2], [-1, 7])
    g = helper.make_graph(
        [helper.make_node("Reshape", ["wave", "shp"], ["r"]), helper.make_node("MatMul", ["r", "w"], ["y"])],
        "never", [helper.make_tensor_value_info("wave", TensorProto.FLOAT, ["batch", "samples"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w, shp])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_never_runs_is_one_line_naming_the_dim(tmp_path):
    src = checks.save_in_src(tmp_path, never_runs())
    out = tmp_path / "out.onnx"
    proc = checks.run_cli("prune", src, "-o", out, "--ratio", "0.5", "--ep", "cpu")
    line = checks.one_line_error(proc, 2)
    sizes = []
    s = rin.DEFAULT_OTHER
    while s <= MAX_DIM:
        sizes.append(s)
        s *= 2
    assert f"input 'wave' dim 1 ('samples'): the model did not run at {', '.join(map(str, sizes))} " in line
    assert "Reshape" in line  # onnxruntime's reason
    assert not out.exists()
    assert sorted(p.name for p in (tmp_path / "src").iterdir()) == ["m.onnx"]


def test_normal_model_keeps_the_default_size():
    # a model that runs at the default: no probe growth, the sizes and report as before
    w = helper.make_tensor("w", TensorProto.FLOAT, [8, 6], np.random.default_rng(0).standard_normal(48).astype(np.float32))
    w2 = helper.make_tensor("w2", TensorProto.FLOAT, [6, 3], np.random.default_rng(1).standard_normal(18).astype(np.float32))
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("MatMul", ["r", "w2"], ["y"])],
        "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", 3])], [w, w2])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    res = checks.prune_and_verify(model, 0.5)
    assert res.verification.passed
    assert rin.found_sizes(model) is None
    assert rin.make_inputs(model)["x"].shape == (1, rin.DEFAULT_OTHER, 8)
    (row,) = res.to_json()["probe_sizes"]
    assert row["shape"] == [1, rin.DEFAULT_OTHER, 8]
    assert [d["from"] for d in row["dims"]] == ["default", "default"]
    assert rin.describe_probe_sizes(res.to_json()["probe_sizes"]) is None


def test_shared_dim_follows_the_given_array():
    # a dim named like one of a given input's takes its size (the model declares them equal)
    g = helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["y"])], "add",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["batch", "seq"]),
         helper.make_tensor_value_info("b", TensorProto.FLOAT, ["batch", "seq"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq"])])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    feeds = rin.make_inputs(model, arrays={"a": np.zeros((2, 37), np.float32)})
    assert feeds["b"].shape == (2, 37)
    rows = rin.probe_sizes(model, arrays={"a": np.zeros((2, 37), np.float32)})
    assert [d["from"] for d in rows[1]["dims"]] == ["dim 'batch' of input 'a'", "dim 'seq' of input 'a'"]
