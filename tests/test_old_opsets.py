"""Opsets 7-10 (issue 13, item 1): a model below opset 11 is converted to opset 13 with
``onnx.version_converter`` on analysis, kept only when original and converted compute the same outputs
in onnxruntime (relative error <= ``passes.EXACT_REL``), and refused (exit 2, one line, nothing
written) otherwise; the normalization says so and the pruned model is opset 13.

The model zoo's classics as the onnx package ships them (``light_*.onnx``, IR 3, opset 9) carry no
weights: every weight is a ``ConstantOfShape`` of 0.02. ``synth.light_classic`` fills them with seeded
normal values (He-scaled weights, BatchNorm variances in [0.5, 1.5)) and exposes the logits before the
final Softmax as a second output, so that ``--verify`` is not blinded by a one-hot softmax.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper, version_converter

from onnxprune import pipeline
from onnxprune.analysis import passes
from onnxprune.ir.graph import default_opset
from onnxprune.planning.options import PlanOptions
from onnxprune.runtime.inputs import make_inputs
from onnxprune.runtime.session import rel_error, run_model
from onnxprune.testing import graphs, synth
from onnxprune.testing.checks import one_line_error

CONVERTED = ("convert_opset: converted opset 9 -> 13 with onnx.version_converter; outputs equal on generated "
             "inputs (rel. error 0.0e+00)")
HEAVY = {"bvlc_alexnet", "vgg19", "zfnet512"}  # 60M-140M weights in their fully connected layers: slow
TOL = 1e-4  # prune --verify's default tolerance


def _classics():
    return [pytest.param(n, marks=pytest.mark.slow) if n in HEAVY else n for n in synth.LIGHT_CLASSICS]



def _save(tmp_path: pathlib.Path, model: onnx.ModelProto, name: str) -> pathlib.Path:
    p = tmp_path / f"{name}.onnx"
    onnx.save(model, str(p))
    return p


def test_light_classics_ship_without_weights():
    """Why the tests fill them: every weight of the shipped files is a constant placeholder."""
    for name in synth.LIGHT_CLASSICS:
        m = onnx.load(str(synth.light_classic_path(name)))
        assert default_opset(m) == 9 and m.ir_version == 3
        fills = [n for n in m.graph.node if n.op_type == "ConstantOfShape"]
        assert fills and all(numpy_helper.to_array(n.attribute[0].t).tolist() == [np.float32(0.02)] for n in fills)


@pytest.mark.parametrize("name", _classics())
def test_light_classic_prunes_through_an_exact_conversion(name, run_main, tmp_path):
    model = synth.light_classic(name)
    onnx.checker.check_model(model, full_check=True)
    assert default_opset(model) == 9
    src = _save(tmp_path, model, name)
    out, report = tmp_path / "pruned.onnx", tmp_path / "report.json"
    proc = run_main("-v", "prune", src, "-o", out, "--ratio", "0.3", "--verify", "--report", report, "--ep", "cpu")
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    assert proc.stdout.strip().splitlines()[-1] == "PASSED"
    assert CONVERTED in proc.stdout  # -v lists the normalization
    onnx.checker.check_model(str(out), full_check=True)
    pruned = onnx.load(str(out))
    assert default_opset(pruned) == 13
    rep = json.loads(report.read_text())
    assert CONVERTED in rep["normalization"]
    before, after = rep["stats"]["original"]["macs"], rep["stats"]["pruned"]["macs"]
    assert after < 0.9 * before, (before, after)
    v = rep["verification"]
    assert v["passed"] and len(v["outputs"]) == len(model.graph.output)
    assert all(o["passed"] and o["rel_error"] <= TOL for o in v["outputs"])


def test_verify_and_fidelity_are_against_the_converted_model(tmp_path):
    """``--verify`` masks the converted model (the analysed one, opset 13), and the fidelity column is
    the pruned model against it, which is the opset-9 original's function: recomputed here from the
    untouched opset-9 file, it is the reported figure."""
    model = synth.light_classic("squeezenet")
    src = _save(tmp_path, model, "squeezenet")
    res = pipeline.run(str(src), PlanOptions(ratio=0.3), verify=True, ep="cpu")
    assert default_opset(res.analysis.model) == 13 and default_opset(res.pruned) == 13
    assert res.verification.passed
    feeds = make_inputs(res.analysis.model)
    assert set(feeds) == {"data_0"}  # IR 3's initializer inputs are constants, not inputs to feed
    orig = run_model(onnx.load(str(src)), feeds)
    got = run_model(res.pruned, feeds)
    for o, ref, p in zip(res.verification.outputs, orig, got, strict=True):
        assert o.fidelity == pytest.approx(rel_error(p, ref), rel=1e-6, abs=1e-12)
        assert o.fidelity > 1e-3  # pruned at 0.3 with random weights: the function did change


def test_inexact_conversion_is_refused(run_main, monkeypatch, tmp_path):
    """A converter that changes one weight by 0.1% is caught: exit 2, one line, nothing written."""
    real = version_converter.convert_version

    def tampered(model, target):
        out = real(model, target)
        t = next(t for t in out.graph.initializer if len(t.dims) == 4)
        t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * np.float32(1.001), t.name))
        return out

    monkeypatch.setattr(version_converter, "convert_version", tampered)
    src = _save(tmp_path, synth.light_classic("squeezenet"), "squeezenet")
    out = tmp_path / "out"
    out.mkdir()
    msg = one_line_error(run_main("prune", src, "-o", out / "p.onnx", "--ratio", "0.3", "--verify", "--ep", "cpu"))
    assert "opset 9" in msg and "not exact" in msg and "rel. error" in msg
    err = float(msg.split("rel. error ")[1].split()[0])
    assert passes.EXACT_REL < err < 1e-1
    assert sorted(out.iterdir()) == []


def test_converter_failure_is_refused(run_main, monkeypatch, tmp_path):
    def broken(model, target):
        raise RuntimeError("No Adapter For Foo\nsecond line")

    monkeypatch.setattr(version_converter, "convert_version", broken)
    src = _save(tmp_path, synth.light_classic("squeezenet"), "squeezenet")
    out = tmp_path / "out"
    out.mkdir()
    msg = one_line_error(run_main("prune", src, "-o", out / "p.onnx", "--ep", "cpu"))
    assert "cannot convert" in msg and "No Adapter For Foo" in msg
    assert sorted(out.iterdir()) == []


def _opset_model(opset: int) -> onnx.ModelProto:
    """x -> Conv(w1) -> Relu -> Conv(w2) -> y at ``opset`` (IR as that opset shipped; below IR 4 the
    weights are listed as graph inputs too, as that IR requires)."""
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array((rng.standard_normal((8, 3, 3, 3)) * 0.3).astype(np.float32), "w1")
    w2 = numpy_helper.from_array((rng.standard_normal((4, 8, 1, 1)) * 0.3).astype(np.float32), "w2")
    nodes = [helper.make_node("Conv", ["x", "w1"], ["h"], name="c1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["h"], ["r"], name="r1"),
             helper.make_node("Conv", ["r", "w2"], ["y"], name="c2")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 8, 8])],
                          [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4, 8, 8])], [w1, w2])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = helper.find_min_ir_version_for([helper.make_opsetid("", opset)])
    if m.ir_version < 4:
        g.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in (w1, w2))
        m.graph.CopyFrom(g)
    return m


@pytest.mark.parametrize("opset", [7, 8, 10])
def test_opsets_7_to_10_convert(opset, run_main, tmp_path):
    src = _save(tmp_path, _opset_model(opset), f"m{opset}")
    out, report = tmp_path / "p.onnx", tmp_path / "r.json"
    proc = run_main("prune", src, "-o", out, "--ratio", "0.5", "--verify", "--report", report, "--ep", "cpu")
    assert proc.returncode == 0, proc.stderr
    rep = json.loads(report.read_text())
    assert rep["normalization"][0] == CONVERTED.replace("opset 9", f"opset {opset}")
    assert default_opset(onnx.load(str(out))) == 13
    assert [i.name for i in onnx.load(str(out)).graph.input] == ["x"]
    assert rep["stats"]["pruned"]["macs"] < rep["stats"]["original"]["macs"]


def test_opset_below_7_is_refused(run_main, tmp_path):
    m = _opset_model(7)
    m.opset_import[0].version = 6
    src = _save(tmp_path, m, "m6")
    out = tmp_path / "out"
    out.mkdir()
    msg = one_line_error(run_main("prune", src, "-o", out / "p.onnx", "--ep", "cpu"))
    assert "opset 6 is outside the supported range 7..23" in msg
    assert sorted(out.iterdir()) == []


def test_commands_that_do_not_analyse_keep_refusing_old_opsets(run_main, tmp_path):
    src = _save(tmp_path, _opset_model(9), "m9")
    msg = one_line_error(run_main("bench", src, "--ep", "cpu", "--repeat", "2", "--warmup", "1"))
    assert "opset 9 is outside the supported range 11..23" in msg and "convert" in msg


def test_models_at_opset_11_and_above_are_not_converted():
    model = graphs.small_cnn()
    res = passes.convert_opset(model)
    assert res.model is model and res.changes == ()
