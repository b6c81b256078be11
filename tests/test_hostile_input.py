"""Trust under hostile and odd input (issue 9): onnxruntime failures, malformed plans and tensors, a
full disk, absurd sizes, invalid input models, SIGTERM while saving and models too large to inline.
Every user error is exactly one stderr line (``onnxprune: error: ...``), exit 2, no output file."""

from __future__ import annotations

import errno
import json
import os
import pathlib
import signal
import subprocess
import sys

import numpy as np
import onnx
import pytest

from onnxprune.errors import UserError
from onnxprune.ir import io as ir_io
from onnxprune.ir.io import load
from onnxprune.measure.latency import measure
from onnxprune.measure.verify import compare
from onnxprune.runtime import session as session_mod
from onnxprune.runtime.inputs import make_inputs
from onnxprune.testing import checks, graphs
from onnxprune.testing.checks import one_line_error
from onnxprune.testing.checks import save_in_src as _save
from onnxprune.testing.synth import external_mlp


def _conv_text(t: str = "float", extra_out: str = "", extra_nodes: str = "", opsets: str = '"" : 17',
               conv1: str = "pads=[1,1,1,1]", x: str = "1,3,8,8") -> str:
    return f"""
<ir_version: 8, opset_import: [{opsets}]>
g ({t}[{x}] x) => ({t}[1,4,8,8] y{extra_out}) <{t}[8,3,3,3] w1, {t}[8] b1, {t}[4,8,1,1] w2> {{
  h = Conv <{conv1}> (x, w1, b1)
  r = Relu (h)
  y = Conv (r, w2)
{extra_nodes}
}}
"""



def _listing(d: pathlib.Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())



# ----------------------------------------------------------------------------------------------
# (8) onnxruntime failures are one-line user errors, mapped in runtime/session.py


ORT_FAILURES = {
    "float64_conv": lambda: graphs.from_text(_conv_text("double")),
    "custom_op_branch": lambda: graphs.from_text(_conv_text(
        extra_out=", float[1,3,8,8] z", extra_nodes="  z = my.Foo (x)", opsets='"" : 17, "my" : 1')),
    "same_upper_dilated": lambda: graphs.from_text(_conv_text(
        conv1="auto_pad=\"SAME_UPPER\", dilations=[2,2]")),
}


@pytest.mark.parametrize("case", sorted(ORT_FAILURES))
def test_ort_failure_in_verify_is_one_line(run_main, tmp_path, case):
    src = _save(tmp_path, ORT_FAILURES[case]())
    out = tmp_path / "out"
    out.mkdir()
    proc = run_main("prune", src, "-o", out / "p.onnx", "--verify", "--ep", "cpu")
    if proc.returncode == 0:  # this onnxruntime runs it: nothing to map
        pytest.skip(f"onnxruntime runs {case}")
    msg = one_line_error(proc)
    assert "onnxruntime" in msg
    assert _listing(out) == []


def test_ort_failure_in_bench_is_one_line(run_main, tmp_path):
    src = _save(tmp_path, ORT_FAILURES["float64_conv"]())
    one_line_error(run_main("bench", src, "--ep", "cpu", "--repeat", "2", "--warmup", "1"))


def test_input_of_wrong_dtype(run_main, small_onnx, tmp_path):
    npy = tmp_path / "x.npy"
    np.save(npy, np.zeros((1, 3, 16, 16), np.float64))
    msg = one_line_error(run_main("bench", small_onnx, "--ep", "cpu", "--input", f"x={npy}",
                                  "--repeat", "2", "--warmup", "1"))
    assert "onnxruntime" in msg


def test_verify_mismatched_pair(run_main, small_onnx, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    plan = out / "plan.json"
    assert run_main("prune", small_onnx, "-o", out / "p.onnx", "--save-plan", plan, "--ep", "cpu").returncode == 0
    other = _save(tmp_path, graphs.from_text(_conv_text("double")), "other.onnx")
    one_line_error(run_main("verify", small_onnx, other, "--plan", plan, "--ep", "cpu"))


def test_ort_errors_mapped_in_session_layer():
    """make_session and run_session raise UserError, whoever calls them (verify, latency)."""
    bad = graphs.from_text(_conv_text("double"))
    with pytest.raises(UserError, match="onnxruntime"):
        session_mod.make_session(bad, "cpu")
    good = graphs.from_text(_conv_text())
    sess, _ = session_mod.make_session(good, "cpu")
    with pytest.raises(UserError, match="onnxruntime"):
        session_mod.run_session(sess, {"x": np.zeros((1, 3, 8, 8), np.float64)})
    with pytest.raises(UserError):
        compare(good, good, good, {"x": np.zeros((1, 3, 8, 8), np.int64)}, "cpu")
    with pytest.raises(UserError):
        measure([good], {"x": np.zeros((2, 3, 8, 8), np.float32)}, "cpu", warmup=1, repeat=1)


# ----------------------------------------------------------------------------------------------
# (8) malformed plan files


BAD_PLANS = {
    "huge_int_keep": '{"version": 1, "groups": [{"anchor": {"tensor": "c1", "axis": 1}, "keep": [%s]}]}'
                     % ("9" * 40),
    "huge_int_axis": '{"version": 1, "groups": [{"anchor": {"tensor": "c1", "axis": %s}, "keep": [0]}]}'
                     % ("9" * 40),
    "float_axis_inf": '{"version": 1, "groups": [{"anchor": {"tensor": "c1", "axis": 1e999}, "keep": [0]}]}',
    "anchor_list": '{"version": 1, "groups": [{"anchor": ["c1", 1], "keep": [0]}]}',
    "tensor_not_str": '{"version": 1, "groups": [{"anchor": {"tensor": ["c1"], "axis": 1}, "keep": [0]}]}',
    "entry_not_dict": '{"version": 1, "groups": [7]}',
    "options_list": '{"version": 1, "options": [], "groups": []}',
    "deep_nesting": "[" * 100_000 + "]" * 100_000,
    "deep_in_groups": '{"version": 1, "groups": ' + "[" * 50_000 + "]" * 50_000 + "}",
    "huge_int_text": "1" + "0" * 5000,
}


@pytest.mark.parametrize("case", sorted(BAD_PLANS))
def test_malformed_plan(run_main, small_onnx, tmp_path, case):
    pf = tmp_path / "plan.json"
    pf.write_text(BAD_PLANS[case])
    out = tmp_path / "out"
    out.mkdir()
    one_line_error(run_main("prune", small_onnx, "-o", out / "o.onnx", "--load-plan", pf, "--ep", "cpu"))
    assert _listing(out) == []


def test_plan_path_is_directory(run_main, small_onnx, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    one_line_error(run_main("prune", small_onnx, "-o", out / "o.onnx", "--load-plan", tmp_path, "--ep", "cpu"))
    one_line_error(run_main("verify", small_onnx, small_onnx, "--plan", tmp_path, "--ep", "cpu"))


def test_plan_from_json_refuses_hostile_data():
    from onnxprune.pipeline import analyze_model
    from onnxprune.planning.plan import Plan

    an = analyze_model(graphs.small_cnn())
    for text in BAD_PLANS.values():
        try:
            data = json.loads(text)
        except (RecursionError, ValueError):
            continue
        with pytest.raises(UserError):
            Plan.from_json(data, an.cg)
    with pytest.raises(UserError):
        Plan.from_json([], an.cg)


# ----------------------------------------------------------------------------------------------
# (8) tensors whose dims disagree with their data


def test_raw_data_length_mismatch(run_main, tmp_path):
    m = graphs.small_cnn()
    w2 = next(t for t in m.graph.initializer if t.name == "w2")
    w2.raw_data = w2.raw_data[:40]
    src = _save(tmp_path, m)
    with pytest.raises(UserError, match="w2"):
        load(src)
    out = tmp_path / "out"
    out.mkdir()
    msg = one_line_error(run_main("prune", src, "-o", out / "o.onnx", "--ep", "cpu"))
    assert "w2" in msg
    assert _listing(out) == []


def test_typed_field_length_mismatch(tmp_path):
    m = graphs.small_cnn()
    b1 = next(t for t in m.graph.initializer if t.name == "b1")
    arr = onnx.numpy_helper.to_array(b1)
    b1.ClearField("raw_data")
    b1.float_data.extend(arr.tolist()[:3])
    with pytest.raises(UserError, match="b1"):
        load(_save(tmp_path, m))


# ----------------------------------------------------------------------------------------------
# (8) a full disk while saving


class _FullDisk:
    def __init__(self, *a, **k):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def write(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_disk_full_while_saving(run_main, small_onnx, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.setattr(ir_io, "open", _FullDisk, raising=False)
    msg = one_line_error(run_main("prune", small_onnx, "-o", out / "o.onnx", "--ep", "cpu"))
    assert "No space left" in msg
    assert _listing(out) == []


def test_disk_full_while_saving_external(run_main, tmp_path, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    external_mlp(src / "mlp.onnx", width=64, layers=3)
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.setattr(ir_io, "open", _FullDisk, raising=False)
    one_line_error(run_main("prune", src / "mlp.onnx", "-o", out / "o.onnx", "--ep", "cpu"))
    assert _listing(out) == []


# ----------------------------------------------------------------------------------------------
# (8) negative seed, absurd input shapes


def test_negative_seed(run_main, small_onnx, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    msg = one_line_error(run_main("prune", small_onnx, "-o", out / "o.onnx", "--importance", "random",
                                  "--seed", "-1", "--ep", "cpu"))
    assert "--seed" in msg
    assert _listing(out) == []


def test_absurd_input_shape_refused_before_allocating(run_main, tmp_path):
    model = graphs.from_text(_conv_text(x="N,3,H,W").replace("float[1,4,8,8] y", "float[N,4,H,W] y"))
    with pytest.raises(UserError, match="GiB"):
        make_inputs(model, {"x": (100000, 3, 224, 224)})
    src = _save(tmp_path, model)
    msg = one_line_error(run_main("bench", src, "--ep", "cpu", "--input-shape", "x=100000x3x224x224"))
    assert "GiB" in msg


# ----------------------------------------------------------------------------------------------
# (9) invalid input models are bad input (exit 2), not a refused rewrite (exit 4)


def test_invalid_input_model_exits_2(run_main, small_onnx, tmp_path):
    m = graphs.small_cnn()
    relu = next(n for n in m.graph.node if n.op_type == "Relu")
    relu.attribute.append(onnx.helper.make_attribute("bogus", 1))
    with pytest.raises(onnx.checker.ValidationError):
        onnx.checker.check_model(m)
    src = _save(tmp_path, m)
    out = tmp_path / "out"
    out.mkdir()
    msg = one_line_error(run_main("prune", src, "-o", out / "o.onnx", "--ep", "cpu"))
    assert "input model" in msg and "invalid" in msg
    assert _listing(out) == []


def test_ort_log_is_silenced(run_cli, tmp_path):
    """onnxruntime's own log never adds a line: the failing case prints exactly one stderr line."""
    src = _save(tmp_path, ORT_FAILURES["float64_conv"]())
    out = tmp_path / "out"
    out.mkdir()
    one_line_error(run_cli("prune", src, "-o", out / "p.onnx", "--verify", "--ep", "cpu"))
    one_line_error(run_cli("bench", src, "--ep", "cpu", "--repeat", "2", "--warmup", "1"))


_SLOW_SAVE = """
import sys, time
import onnxprune.ir.io as io
slow = io._default_mode
def _slow(path):
    print("SAVING", flush=True)
    time.sleep(60)
    slow(path)
io._default_mode = _slow
from onnxprune.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigterm_while_saving_leaves_no_temp_file(small_onnx, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_SAVE, "prune", str(small_onnx), "-o", str(out / "o.onnx"),
                             "--ep", "cpu"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        seen = []
        while not seen or ("SAVING" not in seen[-1] and seen[-1]):
            seen.append(proc.stdout.readline())
        assert "SAVING" in seen[-1], (seen, proc.stderr.read() if proc.poll() is not None else "")
        assert any(n.startswith(".") for n in _listing(out)), "the temp file exists while saving"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 143, (proc.returncode, err)
    assert "Traceback" not in err
    assert _listing(out) == []


# ----------------------------------------------------------------------------------------------
# (7) models too large to inline run without symlinks, nothing written beside them


def test_large_external_model_runs_without_symlinks(run_main, tmp_path, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    external_mlp(src / "mlp.onnx", width=64, layers=3)
    before = _listing(src)
    os.chmod(src, 0o555)  # read-only: nothing may be written beside the model
    monkeypatch.setattr(session_mod, "LARGE_BYTES", 1000)
    monkeypatch.setattr(os, "symlink", _no_symlink)
    try:
        model = load(src / "mlp.onnx")
        feeds = {"x": np.ones((2, 64), np.float32)}
        sess, _ = session_mod.make_session(model, "cpu")
        y = session_mod.run_session(sess, feeds)[0]
        ref_model = onnx.load(str(src / "mlp.onnx"))  # loads the external data into memory
        ref, _ = session_mod.make_session(ref_model, "cpu")
        want = ref.run(None, feeds)[0]
        assert np.abs(want).max() > 0 and checks.rel_err(y, want) < 1e-6
        out = tmp_path / "out"
        out.mkdir()
        proc = run_main("prune", src / "mlp.onnx", "-o", out / "p.onnx", "--verify", "--ep", "cpu")
        assert proc.returncode == 0, proc.stderr[-3000:]
        proc = run_main("bench", src / "mlp.onnx", out / "p.onnx", "--ep", "cpu", "--repeat", "3", "--warmup", "1")
        assert proc.returncode == 0, proc.stderr[-3000:]
    finally:
        os.chmod(src, 0o755)
    assert _listing(src) == before


def _no_symlink(*a, **k):
    raise OSError(errno.EPERM, "symlinks are refused here (onnxruntime rejects them)")


def test_sigterm_handler_restored_after_main():
    """main converts SIGTERM only while it runs: an in-process caller keeps its own handler."""
    from onnxprune.cli import main

    before = signal.getsignal(signal.SIGTERM)
    assert main(["inspect", "/nonexistent/model.onnx"]) == 2
    assert signal.getsignal(signal.SIGTERM) == before
