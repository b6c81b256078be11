"""Least-squares reconstruction of the kept stripes (``rewrite/stripe_refit.py``): with calibration
data the stripe stage refits the kept stripes on the conv inputs' patch Gram matrices."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxprune import pipeline
from onnxprune.planning.options import StripeOptions
from onnxprune.rewrite.compensate import CompensateOptions
from onnxprune.rewrite.stripes import _tensors
from onnxprune.runtime.calib import CalibSpec, CalibView, open_calib
from onnxprune.runtime.session import make_session, run_session

C, F1, F2, HW = 4, 8, 8, 10


def cnn(seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((F1, C, 3, 3)).astype(np.float32)
    b1 = rng.standard_normal(F1).astype(np.float32) * 0.1
    w2 = rng.standard_normal((F2, F1 // 2, 3, 3)).astype(np.float32) * 0.3
    nodes = [helper.make_node("Conv", ["X", "W1", "B1"], ["A"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["A"], ["R"]),
             helper.make_node("Conv", ["R", "W2"], ["Y"], name="conv2", pads=[1, 1, 1, 1], group=2)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", C, HW, HW])],
                          [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", F2, HW, HW])],
                          [numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(b1, "B1"),
                           numpy_helper.from_array(w2, "W2")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def data(n: int, seed: int = 1) -> np.ndarray:
    """Random-normal samples, smoothed in space and mixed across channels (so patches correlate)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, C, HW + 2, HW + 2))
    x = (x[:, :, :-2, :-2] + x[:, :, 1:-1, 1:-1] + x[:, :, 2:, 2:]) / 3  # spatial smoothing
    mix = np.eye(C) + 0.6 * rng.standard_normal((C, C))
    return np.einsum("dc,nchw->ndhw", mix, x).astype(np.float32)


def patches(x: np.ndarray) -> np.ndarray:
    """Every 3x3 patch of the zero-padded input (pad 1, stride 1): [N·H·W, C·9], channel-major then tap."""
    p = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (1, 1), (1, 1)))
    taps = [p[:, :, i:i + HW, j:j + HW] for i in range(3) for j in range(3)]  # each [N, C, H, W]
    return np.stack(taps, axis=2).transpose(0, 3, 4, 1, 2).reshape(-1, x.shape[1] * 9)


@pytest.fixture
def setup(tmp_path):
    m = cnn()
    x = data(60)
    np.savez(tmp_path / "calib.npz", X=x)
    onnx.save(m, str(tmp_path / "m.onnx"))
    calib = open_calib(m, CalibSpec(path=str(tmp_path / "calib.npz"), holdout=0.5))
    return m, x, calib, tmp_path


def weight(model: onnx.ModelProto, name: str) -> np.ndarray:
    return numpy_helper.to_array(_tensors(model.graph)[name])


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def held_out(calib) -> np.ndarray:
    return calib.holdout.read(0, calib.holdout.n).feeds["X"]


def out(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    sess, _ = make_session(model, "cpu", precise=True)
    return run_session(sess, {"X": x}, ["Y"])[0]


@pytest.mark.parametrize("mode", ["mask", "shrink"])
def test_refit_lowers_held_out_error_and_verifies(setup, mode):
    m, _, calib, _ = setup
    opts = StripeOptions(0.5, mode=mode, gate="off")
    plain = pipeline.run_stripes(m, opts, fit=calib.fit, ep="cpu", verify=True)
    refit = pipeline.run_stripes(m, opts, fit=calib.fit, ep="cpu", verify=True, compensation=CompensateOptions())
    assert plain.compensation is None and refit.compensation is not None
    assert refit.plan.keep.keys() == plain.plan.keep.keys()
    for k in plain.plan.keep:
        np.testing.assert_array_equal(refit.plan.keep[k], plain.plan.keep[k])
    xh = held_out(calib)
    ref = out(m, xh)
    e_plain, e_refit = rel_err(out(plain.model, xh), ref), rel_err(out(refit.model, xh), ref)
    assert e_refit < 0.95 * e_plain, (e_plain, e_refit)
    assert refit.verification is not None and refit.verification.passed
    rep = refit.to_json()["compensation"]
    assert rep["convs_refitted"] >= 1 and rep["seconds"] >= 0
    for c in rep["per_conv"]:
        if c["refitted"]:
            assert c["fit_rel_error_after"] <= c["fit_rel_error_before"] + 1e-12
    # the removed stripes stay zero in the refitted, masked source
    w = weight(pipeline.mask_stripes(refit.source, refit.plan), "W1")
    assert not w[np.broadcast_to(~refit.plan.keep["conv1"][:, None], w.shape)].any()


def test_refit_equals_the_closed_form(setup):
    m, x, calib, _ = setup
    lam_rel = 1e-3
    comp = CompensateOptions(ridge=lam_rel, rows_per_sample=HW * HW)  # every position: the exact Gram
    stage = pipeline.run_stripes(m, StripeOptions(0.5, mode="mask"), fit=calib.fit, ep="cpu", compensation=comp)
    xf = calib.fit.read(0, calib.fit.n).feeds["X"]
    p = patches(xf)
    g = p.T @ p / len(p)
    w = weight(m, "W1").astype(np.float64).reshape(F1, -1)
    keep = stage.plan.keep["conv1"]
    new = weight(stage.source, "W1").reshape(F1, -1)
    for f in (0, F1 - 1):
        k = np.flatnonzero(np.tile(keep[f].reshape(-1), C))
        assert 0 < len(k) < w.shape[1]
        gkk = g[np.ix_(k, k)]
        lam = lam_rel * np.trace(gkk) / len(k)
        want = np.linalg.solve(gkk + lam * np.eye(len(k)), g[k] @ w[f] + lam * w[f, k])
        np.testing.assert_allclose(new[f, k], want, rtol=1e-4, atol=1e-5)
    # the patches' direct least squares: the refit output is what x_K·w'_K predicts
    f = 0
    k = np.flatnonzero(np.tile(keep[f].reshape(-1), C))
    direct = np.linalg.lstsq(p[:, k], p @ w[f], rcond=None)[0]
    np.testing.assert_allclose(new[f, k], direct, rtol=0.05, atol=0.02)  # ridge 1e-3: near plain least squares


def test_cli_prints_the_refit_and_reports_it(setup, run_main):
    _, _, _, tmp = setup
    common = [tmp / "m.onnx", "--stripe-ratio", "0.5", "--calib", tmp / "calib.npz", "--holdout", "0.5", "--verify"]
    r = run_main("prune", *common, "-o", tmp / "p.onnx", "--report", tmp / "r.json")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "stripe refit (lsq):" in r.stdout and "PASSED" in r.stdout
    rep = json.loads((tmp / "r.json").read_text())["stripes"]["compensation"]
    assert rep["convs_refitted"] >= 1 and {"fit_rel_error_before", "fit_rel_error_after"} <= set(rep["per_conv"][0])
    r = run_main("prune", *common, "--compensate", "none", "-o", tmp / "q.onnx", "--report", tmp / "q.json")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "stripe refit" not in r.stdout
    assert json.loads((tmp / "q.json").read_text())["stripes"]["compensation"] is None


def test_view_without_samples_means_no_refit(setup):
    m, _, calib, _ = setup
    empty = CalibView(calib.fit.data, "empty", np.arange(0))
    stage = pipeline.run_stripes(m, StripeOptions(0.5, mode="mask"), fit=empty, ep="cpu",
                                 compensation=CompensateOptions())
    assert stage.compensation is None
