"""Models with external data: weights stay in files, the pruned model keeps external data beside it."""

from __future__ import annotations

import os
import subprocess

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxprune.cli import main
from onnxprune.errors import UserError
from onnxprune.ir.io import load, save_atomic
from onnxprune.ir.tensors import tensor_value
from onnxprune.testing import checks
from onnxprune.testing.synth import external_mlp


def test_external_data_in_and_out(tmp_path):
    src = tmp_path / "mlp.onnx"
    weight_bytes = external_mlp(src, width=256, layers=3)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "p.onnx"
    assert main(["prune", str(src), "-o", str(out), "--ratio", "0.5", "--verify", "--ep", "cpu"]) == 0
    data = out_dir / "p.onnx.data"
    assert data.exists(), "pruned weights must live in external data beside the model"
    assert out.stat().st_size < 10_000  # the .onnx itself holds no weights
    # hidden layers halved: 2 of the 3 weight matrices lose half their rows or columns
    assert data.stat().st_size < 0.7 * weight_bytes
    onnx.checker.check_model(str(out), full_check=True)
    y = checks.run(out, {"x": np.ones((3, 256), np.float32)})[0]
    assert y.shape == (3, 256)
    # the input and its data file are untouched
    assert (tmp_path / "mlp.onnx.data").stat().st_size == weight_bytes


@pytest.mark.slow
def test_large_model_over_2gb_prunes(tmp_path):
    """A 2.7 GB model (over protobuf's 2 GB limit) prunes; its weights never load all at once."""
    src = tmp_path / "big.onnx"
    weight_bytes = external_mlp(src, width=8192, layers=10)
    assert weight_bytes > 2.5e9
    out = tmp_path / "big_pruned.onnx"
    assert main(["prune", str(src), "-o", str(out), "--ratio", "0.5"]) == 0
    assert (tmp_path / "big_pruned.onnx.data").stat().st_size < 0.5 * weight_bytes
    onnx.checker.check_model(str(out), full_check=True)
    assert checks.run(out, {"x": np.ones((1, 8192), np.float32)})[0].shape == (1, 8192)


# ----------------------------------------------------------------------------------------------
# hostile external-data locations: refused at load (exit 2, one line, nothing written)


def _user_error(proc) -> str:
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("onnxprune: error:"), proc.stderr
    return lines[0]


def _relocate(model_path, tensor: str, **fields) -> None:
    """Rewrite the external-data fields (location, offset, length) of one tensor of the file."""
    m = onnx.load(str(model_path), load_external_data=False)
    t = next(i for i in m.graph.initializer if i.name == tensor)
    info = {e.key: e.value for e in t.external_data}
    info.update({k: str(v) for k, v in fields.items()})
    del t.external_data[:]
    for k, v in info.items():
        e = t.external_data.add()
        e.key, e.value = k, v
    model_path.write_bytes(m.SerializeToString())


def _hostile_case(tmp_path, case):
    """A model folder ``m/`` whose tensor ``w0`` points somewhere it must not."""
    outside = tmp_path / "secret.bin"
    d = tmp_path / "m"
    d.mkdir()
    src = d / "mlp.onnx"
    external_mlp(src, width=16, layers=2)
    data = d / "mlp.onnx.data"
    nbytes = 16 * 16 * 4
    outside.write_bytes(data.read_bytes())  # a plausible file: the exact bytes the tensor wants
    if case == "dotdot":
        _relocate(src, "w0", location="../secret.bin", offset=0)
    elif case == "absolute":
        _relocate(src, "w0", location=str(outside), offset=0)
    elif case == "dev_zero":
        _relocate(src, "w0", location="/dev/zero", offset=0, length=1 << 40)
    elif case == "symlink_out":
        (d / "link.bin").symlink_to(outside)
        _relocate(src, "w0", location="link.bin", offset=0)
    elif case == "symlink_dev":
        (d / "zero.bin").symlink_to("/dev/zero")
        _relocate(src, "w0", location="zero.bin", offset=0)
    elif case == "fifo":
        os.mkfifo(d / "pipe.bin")
        _relocate(src, "w0", location="pipe.bin", offset=0)
    elif case == "directory":
        (d / "sub").mkdir()
        _relocate(src, "w0", location="sub", offset=0)
    elif case == "past_end":
        _relocate(src, "w0", offset=data.stat().st_size - 8, length=nbytes)
    elif case == "length_mismatch":
        _relocate(src, "w0", length=nbytes // 2)
    elif case == "huge_length":
        _relocate(src, "w0", length=1 << 40)
    elif case == "negative_offset":
        _relocate(src, "w0", offset=-64)
    return src


HOSTILE = ["dotdot", "absolute", "dev_zero", "symlink_out", "symlink_dev", "fifo", "directory", "past_end",
           "length_mismatch", "huge_length", "negative_offset"]


@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_external_data_is_refused(tmp_path, case):
    src = _hostile_case(tmp_path, case)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    # a subprocess with a timeout: a FIFO opened for reading would block forever
    try:
        proc = checks.run_cli("prune", src, "-o", out_dir / "p.onnx", "--ratio", "0.5", timeout=40)
    except subprocess.TimeoutExpired:
        pytest.fail("prune hung on the external-data location")
    msg = _user_error(proc)
    assert "w0" in msg
    assert list(out_dir.iterdir()) == [], "nothing is written when the input is refused"


def test_external_data_in_a_subfolder_is_fine(tmp_path):
    d = tmp_path / "m"
    (d / "weights").mkdir(parents=True)
    src = d / "mlp.onnx"
    external_mlp(src, width=16, layers=2)
    (d / "mlp.onnx.data").rename(d / "weights" / "w.bin")
    m = onnx.load(str(src), load_external_data=False)
    for t in m.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "weights/../weights/w.bin"
    src.write_bytes(m.SerializeToString())
    model = load(src)
    x = np.ones((2, 16), np.float32)
    assert checks.rel_err(checks.run(model, {"x": x})[0], checks.run(src, {"x": x})[0]) < 1e-6


def test_tensor_value_refuses_an_unchecked_location(tmp_path):
    """A ModelProto not loaded by ``load`` (relative location, unchecked) is never read blindly."""
    src = tmp_path / "mlp.onnx"
    external_mlp(src, width=16, layers=1)
    m = onnx.load(str(src), load_external_data=False)
    with pytest.raises(UserError):
        tensor_value(m.graph.initializer[0])


# ----------------------------------------------------------------------------------------------
# saving: the .onnx and its data file stay a consistent pair whatever happens


def _mlp_model(width: int, seed: int) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    w = numpy_helper.from_array(rng.standard_normal((width, width)).astype(np.float32), "w")
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, width])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, width])], [w])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _crash_on_second(real, calls: list):
    """``os.replace`` that records its calls and fails on the second (between the two renames)."""
    def replace(a, b):
        calls.append((a, b))
        if len(calls) == 2:
            raise OSError("simulated crash")
        return real(a, b)
    return replace


def test_crash_between_renames_keeps_the_old_pair(tmp_path, monkeypatch):
    out = tmp_path / "p.onnx"
    x = {"x": np.ones((1, 64), np.float32)}
    old, new = _mlp_model(64, 0), _mlp_model(64, 1)
    save_atomic(old, out, external=True)
    ref_old = checks.run(out, x)[0]
    assert checks.rel_err(checks.run(new, x)[0], ref_old) > 0.1  # the two models differ
    before = sorted(p.name for p in tmp_path.iterdir())

    real, calls = os.replace, []
    monkeypatch.setattr(os, "replace", _crash_on_second(real, calls))
    with pytest.raises(OSError, match="simulated crash"):
        save_atomic(new, out, external=True)
    monkeypatch.setattr(os, "replace", real)
    assert len(calls) == 2
    assert checks.rel_err(checks.run(out, x)[0], ref_old) < 1e-6, "the old .onnx must still pair with its old data"
    onnx.checker.check_model(str(out), full_check=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == before, "a failed save leaves no files behind"
    # a save that completes replaces the pair and removes the old data file
    save_atomic(new, out, external=True)
    assert checks.rel_err(checks.run(out, x)[0], checks.run(new, x)[0]) < 1e-6
    onnx.checker.check_model(str(out), full_check=True)
    datas = [p.name for p in tmp_path.iterdir() if p.name.endswith(".data")]
    assert len(datas) == 1, datas


def test_crash_in_the_first_save_leaves_no_pair(tmp_path, monkeypatch):
    out = tmp_path / "p.onnx"
    real, calls = os.replace, []
    monkeypatch.setattr(os, "replace", _crash_on_second(real, calls))
    with pytest.raises(OSError):
        save_atomic(_mlp_model(64, 0), out, external=True)
    assert list(tmp_path.iterdir()) == []


def test_saving_inline_over_an_external_output_removes_its_data(tmp_path):
    out = tmp_path / "p.onnx"
    x = {"x": np.ones((1, 64), np.float32)}
    save_atomic(_mlp_model(64, 0), out, external=True)
    assert (tmp_path / "p.onnx.data").exists()
    small = _mlp_model(64, 2)
    save_atomic(small, out, external=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.onnx"]
    assert checks.rel_err(checks.run(out, x)[0], checks.run(small, x)[0]) < 1e-6
