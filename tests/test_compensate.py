"""Compensation and reconstruction (rewrite/compensate.py, ``--compensate``, ``--ridge``) and the
zero-bias normalization pass it relies on (analysis/passes.py ``add_bias_inputs``).

What is planted and why each check can fail:
- a channel that is constant on the data: bias compensation must reproduce the original exactly
  (without it, the pruned output is off by that channel's contribution);
- a channel that is a linear combination of the others (a linear layer of rank < width): least
  squares must reproduce the original to ~1e-4 (bias compensation alone cannot);
- ``--verify`` with compensation: the pruned model against the compensated original, exact;
- held-out fidelity on a small ReLU model: lsq beats bias beats none (a fit that made things
  worse, or one that was not applied, fails the order).
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from onnxprune import pipeline
from onnxprune.analysis.passes import add_bias_inputs
from onnxprune.planning.options import PlanOptions
from onnxprune.rewrite.compensate import CompensateOptions, find_consumers
from onnxprune.runtime.calib import CalibSpec, open_calib
from onnxprune.testing import from_text
from onnxprune.testing.checks import run, run_cli

MLP = """
<ir_version: 8, opset_import: ["" : 17]>
mlp (float[N,6] x) => (float[N,4] y)
<float[16,6] w1, float[16] b1, float[4,16] w2, float[4] b2>
{
  h = Gemm <transB=1> (x, w1, b1)
  r = Relu (h)
  y = Gemm <transB=1> (r, w2, b2)
}
"""

# the consumer is a 1x1 Conv without a bias (the normalization pass gives it one)
CONV = """
<ir_version: 8, opset_import: ["" : 17]>
cnn (float[N,3,6,6] x) => (float[N,5,6,6] y)
<float[8,3,3,3] w1, float[8] b1, float[5,8,1,1] w2>
{
  c = Conv <pads=[1,1,1,1]> (x, w1, b1)
  r = Relu (c)
  y = Conv (r, w2)
}
"""

# linear: h has 8 channels computed from 6 inputs, so every channel is an affine combination of others
LINEAR = """
<ir_version: 8, opset_import: ["" : 17]>
lin (float[N,6] x) => (float[N,4] y)
<float[8,6] w1, float[8] b1, float[8,4] w2, float[4] b2>
{
  h = Gemm <transB=1> (x, w1, b1)
  m = MatMul (h, w2)
  y = Add (m, b2)
}
"""

# a 3x3 conv, a grouped conv, a MatMul on a 3-D tensor and a Gemm: every fitting path
MIXED = """
<ir_version: 8, opset_import: ["" : 17]>
mixed (float[N,3,8,8] x) => (float[N,4] y)
<float[8,3,3,3] w1, float[8] b1, float[8,4,3,3] w2, float[8] b2, int64[3] shape, float[8,6] wm, float[4,6] wg,
 float[4] bg>
{
  c = Conv <pads=[1,1,1,1]> (x, w1, b1)
  r = Relu (c)
  d = Conv <pads=[1,1,1,1], group=2, strides=[2,2]> (r, w2, b2)
  e = Relu (d)
  f = Reshape (e, shape)
  t = Transpose <perm=[0,2,1]> (f)
  m = MatMul (t, wm)
  p = ReduceMean <axes=[1], keepdims=0> (m)
  y = Gemm <transB=1> (p, wg, bg)
}
"""


def _model(text: str, seed: int = 0, **planted: np.ndarray) -> onnx.ModelProto:
    """``text`` with random normal weights, ``planted`` ones replacing them by name (``shape``: the
    Reshape target of MIXED)."""
    m = from_text(text, seed=seed)
    planted.setdefault("shape", np.array([0, 8, -1], np.int64))
    for init in m.graph.initializer:
        if init.name in planted:
            dtype = onnx.helper.tensor_dtype_to_np_dtype(init.data_type)
            init.CopyFrom(onnx.numpy_helper.from_array(np.asarray(planted[init.name], dtype), init.name))
    return m


def _calib(tmp_path, x: np.ndarray, name: str = "calib") -> str:
    path = tmp_path / f"{name}.npz"
    np.savez(path, x=x.astype(np.float32))
    return str(path)


def _prune(model: onnx.ModelProto, calib: str, mode: str, ratio: float, importance: str = "l2", **kw):
    """(result, held-out fidelity summary, held-out inputs) of one run with verification."""
    an = pipeline.analyze_model(model, bias_inputs=mode != "none")
    data = open_calib(an.model, CalibSpec(path=calib, holdout=0.5))
    comp = CompensateOptions(mode=mode, **kw)
    res = pipeline.run(model, PlanOptions(ratio=ratio, importance=importance), verify=True, ep="cpu",
                       analysis=an, calib=data.fit, compensation=comp)
    fid = pipeline.measure_holdout(res, data.holdout, "cpu")
    held = data.holdout.read(0, data.holdout.n).feeds
    return res, fid.summary(), held


def _rel(model_a: onnx.ModelProto, model_b: onnx.ModelProto, feeds) -> float:
    a, b = run(model_a, feeds)[0], run(model_b, feeds)[0]
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


# ----------------------------------------------------------------------------------------------
# the normalization pass


def test_add_bias_inputs_preserves_the_function_and_is_off_by_default(tmp_path):
    m = _model(CONV)
    m2 = onnx.ModelProto()
    m2.CopyFrom(m)
    res = add_bias_inputs(m2)
    assert res.changes == ("added a zero bias to Conv 'conv_2'",), res.changes
    assert len(m2.graph.node[2].input) == 3 and m2.graph.node[2].input[2]
    x = np.random.default_rng(0).standard_normal((2, 3, 6, 6)).astype(np.float32)
    np.testing.assert_array_equal(run(m, {"x": x})[0], run(m2, {"x": x})[0])
    lin = _model(LINEAR)
    r = add_bias_inputs(lin)
    assert r.changes == (), "a MatMul whose result goes to one Add of a constant already has a bias"
    plain = _model(MIXED)
    assert "normalization" not in json.dumps(pipeline.analyze_model(plain).changes)
    an = pipeline.analyze_model(plain, bias_inputs=True)
    assert any("zero bias Add after MatMul" in c for c in an.changes), an.changes
    assert [n.op_type for n in an.model.graph.node].count("Add") == 1


# ----------------------------------------------------------------------------------------------
# bias compensation is exact for a channel that is constant on the data


@pytest.mark.parametrize("text,const", [(MLP, "h"), (CONV, "c")], ids=["gemm", "conv1x1-no-bias"])
def test_bias_compensation_is_exact_for_a_constant_channel(tmp_path, text, const):
    rng = np.random.default_rng(1)
    w1 = rng.standard_normal((16, 6) if text is MLP else (8, 3, 3, 3)).astype(np.float32)
    b1 = rng.uniform(0.5, 1.0, w1.shape[0]).astype(np.float32)
    w1[3] = 0.0  # channel 3 of h is Relu(b1[3]) = 2 for every input: constant on the data
    b1[3] = 2.0
    m = _model(text, seed=2, w1=w1, b1=b1)
    x = rng.standard_normal((60, 6) if text is MLP else (60, 3, 6, 6))
    calib = _calib(tmp_path, x)
    ratio = 1.0 / w1.shape[0] + 1e-6  # one channel goes: the constant one (act-var scores it 0)
    for mode, ok in (("none", False), ("bias", True)):
        res, _, held = _prune(m, calib, mode, ratio, importance="act-var")
        (gp,) = res.plan.pruned()
        assert 3 not in gp.keep and gp.removed == 1
        assert res.verification.passed
        err = _rel(res.pruned, m, held)
        assert (err < 1e-5) == ok, (mode, err)


# ----------------------------------------------------------------------------------------------
# least squares reconstructs a redundant channel


def test_lsq_reconstructs_a_linear_combination_of_kept_channels(tmp_path):
    m = _model(LINEAR, seed=3)
    x = np.random.default_rng(4).standard_normal((200, 6))
    calib = _calib(tmp_path, x)
    errs = {}
    for mode in ("none", "bias", "lsq"):
        res, _, held = _prune(m, calib, mode, 0.25)  # 2 of 8 channels: both affine in the other 6
        assert res.verification.passed
        errs[mode] = _rel(res.pruned, m, held)
    assert errs["lsq"] < 1e-4, errs
    assert errs["bias"] > 1e-2 and errs["none"] > 1e-2, errs
    (r,) = res.compensation.consumers
    assert r.how == "lsq" and r.op == "MatMul" and r.inputs_kept == 6 and r.inputs == 8
    assert r.fit_rel_error_after < 1e-4 < r.fit_rel_error_before


def test_ridge_shrinks_toward_the_kept_weights(tmp_path):
    """An infinite ridge is bias compensation: a huge one gives (almost) the same model."""
    m = _model(LINEAR, seed=3)
    calib = _calib(tmp_path, np.random.default_rng(4).standard_normal((200, 6)))
    rb, _, held = _prune(m, calib, "bias", 0.25)
    rl, _, _ = _prune(m, calib, "lsq", 0.25, ridge=1e9)
    assert _rel(rl.pruned, rb.pruned, held) < 1e-5


# ----------------------------------------------------------------------------------------------
# exactness: --verify with compensation; every fitting path


@pytest.mark.parametrize("layerwise", [True, False], ids=["layerwise", "flat"])
def test_every_path_verifies_and_improves(tmp_path, layerwise):
    m = _model(MIXED, seed=5)
    calib = _calib(tmp_path, np.random.default_rng(6).standard_normal((80, 3, 8, 8)))
    r0, f0, _ = _prune(m, calib, "none", 0.5)
    res, f, _ = _prune(m, calib, "lsq", 0.5, layerwise=layerwise)
    assert res.verification.passed and res.verification.outputs[0].rel_error < 1e-5
    ops = sorted(r.op for r in res.compensation.consumers)
    assert ops == ["Conv", "Gemm", "MatMul"], [r.to_json() for r in res.compensation.consumers]
    assert all(r.how == "lsq" for r in res.compensation.consumers)
    assert {r.source for r in res.compensation.consumers if r.level > 0} == ({"pruned"} if layerwise else {"original"})
    assert res.compensation.passes == (3 if layerwise else 1)
    assert f["worst_rel_error_l2"] < f0["worst_rel_error_l2"], (f, f0)
    # the consumers' removed input positions are zero in the compensated original
    an2 = res.compensation.analysis
    cons, _ = find_consumers(res.analysis, res.plan)
    for c in cons:
        w = an2.cg.consts.get(c.weight)
        removed = np.setdiff1d(np.arange(w.shape[c.w_axis]), c.kept_w)
        assert removed.size and not np.take(w, removed, axis=c.w_axis).any()


def test_fidelity_order_lsq_bias_none(tmp_path):
    rng = np.random.default_rng(7)
    mix = rng.standard_normal((6, 6))  # correlated inputs: the kept channels predict the removed
    x = rng.standard_normal((400, 6)) @ mix + 0.5
    m = _model(MLP, seed=8)
    calib = _calib(tmp_path, x)
    err = {mode: _prune(m, calib, mode, 0.5)[1]["worst_rel_error_l2"] for mode in ("none", "bias", "lsq")}
    assert err["lsq"] < err["bias"] < err["none"], err


# ----------------------------------------------------------------------------------------------
# the command line


def _save(tmp_path, text: str, name: str, **planted) -> str:
    path = tmp_path / f"{name}.onnx"
    onnx.save(_model(text, **planted), path)
    return str(path)


def test_cli_verify_passes_with_compensation_and_reports_it(tmp_path):
    model = _save(tmp_path, MIXED, "mixed")
    calib = _calib(tmp_path, np.random.default_rng(9).standard_normal((40, 3, 8, 8)))
    out, rep = tmp_path / "p.onnx", tmp_path / "r.json"
    proc = run_cli("prune", model, "-o", out, "--ratio", "0.5", "--calib", calib, "--verify", "--report", rep)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "compensation lsq: 3 consumers (3 lsq)" in proc.stdout and "PASSED" in proc.stdout
    data = json.loads(rep.read_text())
    assert data["verification"]["passed"] and data["compensation"]["mode"] == "lsq"
    assert {c["op"] for c in data["compensation"]["consumers"]} == {"Conv", "MatMul", "Gemm"}
    assert data["timings_s"]["compensate"] > 0
    proc = run_cli("prune", model, "-o", out, "--ratio", "0.5", "--calib", calib, "--compensate", "none",
                   "--report", rep)
    assert proc.returncode == 0 and "compensation" not in json.loads(rep.read_text())


@pytest.mark.parametrize("args,words", [
    (["--compensate", "lsq"], "needs calibration data"),
    (["--compensate", "bias"], "needs calibration data"),
    (["--ridge", "0.1"], "--ridge applies to --compensate lsq"),
    (["--compensate", "fancy"], "invalid choice"),
], ids=["lsq-no-calib", "bias-no-calib", "ridge-without-lsq", "unknown-mode"])
def test_cli_refuses_compensation_without_data(tmp_path, args, words):
    model = _save(tmp_path, MLP, "mlp")
    out = tmp_path / "out"
    out.mkdir()
    proc = run_cli("prune", model, "-o", out / "p.onnx", *args)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], proc.stderr
    assert not list(out.iterdir())


def test_ridge_with_bias_is_refused_even_with_data(tmp_path):
    model = _save(tmp_path, MLP, "mlp")
    calib = _calib(tmp_path, np.random.default_rng(0).standard_normal((20, 6)))
    proc = run_cli("prune", model, "-o", tmp_path / "p.onnx", "--calib", calib, "--compensate", "bias",
                   "--ridge", "1")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


# ----------------------------------------------------------------------------------------------
# padding: positions where attention_mask is 0 are no rows

PADDED = """
<ir_version: 8, opset_import: ["" : 17]>
seq (float[N,5,6] x, int64[N,5] attention_mask) => (float[N,5,4] y)
<float[6,8] w1, float[8] b1, float[8,4] w2, float[4] b2>
{
  h0 = MatMul (x, w1)
  h = Add (h0, b1)
  r = Relu (h)
  y0 = MatMul (r, w2)
  y = Add (y0, b2)
}
"""


@pytest.mark.parametrize("row_mask,exact", [("auto", True), (None, False)], ids=["masked", "unmasked"])
def test_padding_positions_are_left_out_of_the_fit(tmp_path, row_mask, exact):
    """Channel 3 of h is 1 on every real token and 0 on padding: bias compensation is exact on the
    real tokens only when the padding is left out of its mean."""
    rng = np.random.default_rng(11)
    w1 = rng.standard_normal((6, 8)).astype(np.float32)
    w1[:, 3] = 0.0
    w1[0, 3] = 1.0  # h3 = x0
    b1 = np.full(8, 3.0, np.float32)
    b1[3] = 0.0
    m = _model(PADDED, seed=12, w1=w1, b1=b1)
    n = 80
    mask = (np.arange(5)[None, :] < rng.integers(2, 6, n)[:, None]).astype(np.int64)
    x = rng.standard_normal((n, 5, 6)).astype(np.float32)
    x[..., 0] = np.where(mask == 1, 1.0, -4.0)  # relu(x0): 1 on real tokens, 0 on padding
    path = tmp_path / "pad.npz"
    np.savez(path, x=x, attention_mask=mask)
    an = pipeline.analyze_model(m, bias_inputs=True)
    data = open_calib(an.model, CalibSpec(path=str(path), holdout=0.5))
    opts = PlanOptions(ratio=0.125)
    plan = pipeline.build_plan(an, opts).to_json(an.cg)
    (entry,) = plan["groups"]
    entry["keep"] = [i for i in range(8) if i != 3]
    res = pipeline.run(m, opts, verify=True, ep="cpu", analysis=an, plan_json=plan, fit=data.fit,
                       compensation=CompensateOptions(mode="bias", row_mask=row_mask))
    assert res.verification.passed
    (r,) = res.compensation.consumers
    assert r.rows_masked_by == ("attention_mask" if row_mask else None)
    held = data.holdout.read(0, data.holdout.n).feeds
    p, o = run(res.pruned, held)[0], run(m, held)[0]
    real = held["attention_mask"] == 1
    err = float(np.max(np.abs(p - o)[real]) / np.max(np.abs(o)[real]))
    assert (err < 1e-5) == exact, err
