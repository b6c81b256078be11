"""Data-aware importance (planning/data_importance.py) and its wiring (``--importance act|act-var``,
the default with ``--calib``).

The criteria are checked against numpy: the activations are computed here by hand (a numpy
convolution on the fit share's samples), not read from the capture. Planted models show what the
criteria are for: a channel with large weights that is dead on the data is kept by l2 and removed by
act and act-var; a channel that is constant on the data is removed by act-var (its mean goes into the
bias) but kept by act (its energy is large).
"""

from __future__ import annotations

import json
import pathlib

import numpy as np
import onnx
import pytest
from numpy.lib.stride_tricks import sliding_window_view

from onnxprune import pipeline
from onnxprune.errors import UserError
from onnxprune.planning.data_importance import consumer_taps, data_scores
from onnxprune.planning.importance import (
    DATA_IMPORTANCES,
    DEFAULT_BIAS_IMPORTANCE,
    DEFAULT_DATA_IMPORTANCE,
    DEFAULT_UNCOMPENSATED_IMPORTANCE,
    group_importance,
)
from onnxprune.planning.options import PlanOptions
from onnxprune.planning.plan import make_plan
from onnxprune.runtime.calib import CalibSpec, open_calib
from onnxprune.testing import from_text
from onnxprune.testing.graphs import MLP

CONV2 = """
<ir_version: 8, opset_import: ["" : 17]>
cnn (float[N,3,8,8] x) => (float[N,4,8,8] y)
<float[8,3,3,3] w1, float[8] b1, float[4,8,3,3] w2, float[4] b2>
{
  c = Conv <pads=[1,1,1,1]> (x, w1, b1)
  r = Relu (c)
  y = Conv <pads=[1,1,1,1]> (r, w2, b2)
}
"""

# r feeds two consumers: a 3x3 conv and a 1x1 conv
FORK = """
<ir_version: 8, opset_import: ["" : 17]>
fork (float[N,3,8,8] x) => (float[N,4,8,8] y, float[N,5,8,8] z)
<float[8,3,3,3] w1, float[8] b1, float[4,8,3,3] w2, float[4] b2, float[5,8,1,1] w3>
{
  c = Conv <pads=[1,1,1,1]> (x, w1, b1)
  r = Relu (c)
  y = Conv <pads=[1,1,1,1]> (r, w2, b2)
  z = Conv (r, w3)
}
"""


# the 16 channels of a and b meet only in an activation x activation MatMul: no consumer weight
NO_CONSUMER = """
<ir_version: 8, opset_import: ["" : 17]>
mm (float[N,8] x) => (float[N,N] y)
<float[16,8] w1, float[16] b1, float[16,8] w2, float[16] b2>
{
  a = Gemm <transB=1> (x, w1, b1)
  b = Gemm <transB=1> (x, w2, b2)
  bt = Transpose (b)
  y = MatMul (a, bt)
}
"""


DIAGONAL = ("act", "act-var")  # the criteria of the diagonal formula (recon: tests/test_recon_importance.py)


def _model(text: str, seed: int = 0, **planted: np.ndarray) -> onnx.ModelProto:
    """``text`` with random normal weights, ``planted`` ones replacing them by name."""
    m = from_text(text)
    rng = np.random.default_rng(seed)
    for init in m.graph.initializer:
        a = planted.get(init.name)
        if a is None:
            a = rng.standard_normal(tuple(init.dims)).astype(np.float32)
        init.CopyFrom(onnx.numpy_helper.from_array(np.asarray(a, np.float32), init.name))
    return m


def _weights(m: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {i.name: onnx.numpy_helper.to_array(i) for i in m.graph.initializer}


def _setup(tmp_path: pathlib.Path, m: onnx.ModelProto, x: np.ndarray, name: str = "m"):
    """Saved model, its analysis and calibration data (x, a quarter held out)."""
    path = tmp_path / f"{name}.onnx"
    onnx.save(m, str(path))
    np.savez(tmp_path / f"{name}.npz", x=x)
    an = pipeline.analyze_model(str(path))
    cd = open_calib(an.model, CalibSpec(path=str(tmp_path / f"{name}.npz"), holdout=0.25))
    return path, an, cd


def _group_of(an, producer_weight: str):
    return next(g for g in an.cg.groups if g.prunable and any(s.const == producer_weight for s in g.slots))


def _conv(x: np.ndarray, w: np.ndarray, b: np.ndarray | None = None, pad: int = 0) -> np.ndarray:
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    win = sliding_window_view(xp, w.shape[2:], axis=(2, 3))  # [N, C, H, W, kh, kw]
    y = np.einsum("nchwij,ocij->nohw", win, w.astype(np.float64))
    return y if b is None else y + b[None, :, None, None]


def _fit_x(cd) -> np.ndarray:
    return cd.fit.read(0, cd.fit.n).feeds["x"]


def _energy(r: np.ndarray, w: np.ndarray, kind: str) -> np.ndarray:
    """e_c = stat(r_c) * ||W[:, c]||² (stat: E[r²] or Var[r] over samples and positions), divided by
    the consumer's whole energy sum_c E[r_c²] ||W[:, c]||²."""
    axes = tuple(a for a in range(r.ndim) if a != 1)
    msq = np.mean(r**2, axis=axes)
    stat = np.var(r, axis=axes) if kind == "act-var" else msq
    wn = np.sum(w.astype(np.float64) ** 2, axis=tuple(a for a in range(w.ndim) if a != 1))
    return stat * wn / np.sum(msq * wn)


def _mean1(s: np.ndarray) -> np.ndarray:
    return s / s.mean()


# ----------------------------------------------------------------------------------------------
# the criteria equal a hand computation


@pytest.mark.parametrize("kind", DIAGONAL)
def test_conv_criteria_equal_numpy(tmp_path, kind):
    m = _model(CONV2)
    x = np.random.default_rng(1).standard_normal((24, 3, 8, 8)).astype(np.float32)
    _, an, cd = _setup(tmp_path, m, x)
    w = _weights(m)
    r = np.maximum(_conv(_fit_x(cd), w["w1"], w["b1"], pad=1), 0)
    want = _mean1(_energy(r, w["w2"], kind))
    g = _group_of(an, "w1")
    acts = pipeline.capture_activations(an, cd.fit, "cpu")
    got = data_scores(an.cg, [g], kind, acts)
    assert not got.fallback
    np.testing.assert_allclose(got.scores[g.id], want, rtol=1e-4)
    assert not np.allclose(got.scores[g.id], group_importance(an.cg, g, "l2"), rtol=1e-2)


@pytest.mark.parametrize("kind", DIAGONAL)
def test_each_consumer_counts_as_a_relative_change_of_its_output(tmp_path, kind):
    """Two consumers: the score sums each one's share of its own output energy, so scaling one
    consumer's weights by 100 changes nothing."""
    x = np.random.default_rng(2).standard_normal((24, 3, 8, 8)).astype(np.float32)
    w3 = np.random.default_rng(3).standard_normal((5, 8, 1, 1)).astype(np.float32)
    scores = []
    for scale in (1.0, 100.0):
        m = _model(FORK, w3=w3 * scale)
        _, an, cd = _setup(tmp_path, m, x, name=f"fork{int(scale)}")
        w = _weights(m)
        r = np.maximum(_conv(_fit_x(cd), w["w1"], w["b1"], pad=1), 0)
        want = _mean1(_energy(r, w["w2"], kind) + _energy(r, w["w3"], kind))
        g = _group_of(an, "w1")
        taps = consumer_taps(an.cg, [g])
        assert taps.taps == [("r", 1)]  # two consumers, one tensor tapped once
        assert len(taps.consumers[g.id]) == 2
        got = data_scores(an.cg, [g], kind, pipeline.capture_activations(an, cd.fit, "cpu")).scores[g.id]
        np.testing.assert_allclose(got, want, rtol=1e-4)
        scores.append(got)
    np.testing.assert_allclose(scores[0], scores[1], rtol=1e-4)


def test_gemm_criterion_equals_numpy(tmp_path):
    m = _model(MLP)
    x = np.random.default_rng(4).standard_normal((40, 8)).astype(np.float32)
    _, an, cd = _setup(tmp_path, m, x)
    w = _weights(m)
    r = np.maximum(_fit_x(cd).astype(np.float64) @ w["w1"].T + w["b1"], 0)
    e = np.mean(r**2, axis=0) * np.sum(w["w2"].astype(np.float64) ** 2, axis=0)
    g = _group_of(an, "w1")
    got = data_scores(an.cg, [g], "act", pipeline.capture_activations(an, cd.fit, "cpu")).scores[g.id]
    np.testing.assert_allclose(got, _mean1(e), rtol=1e-4)


# ----------------------------------------------------------------------------------------------
# planted channels: what the criteria are for


def _planted() -> onnx.ModelProto:
    """Channel 0: the largest weights, but dead on positive inputs (negative weights and bias before
    the Relu). Channel 1: no input weights, bias 3: constant 3 on the data. Others: small weights."""
    rng = np.random.default_rng(5)
    w1 = 0.3 * rng.standard_normal((8, 3, 3, 3))
    b1 = 0.1 * rng.standard_normal(8)
    w2 = 0.3 * rng.standard_normal((4, 8, 3, 3))
    w1[0] = -5.0 * np.abs(rng.standard_normal((3, 3, 3)))
    b1[0] = -1.0
    w2[:, 0] *= 20.0
    w1[1], b1[1] = 0.0, 3.0
    return _model(CONV2, w1=w1, b1=b1, w2=w2)


def _positive_x(n: int = 32) -> np.ndarray:
    return np.random.default_rng(6).uniform(0.0, 1.0, (n, 3, 8, 8)).astype(np.float32)


def _kept(res) -> set[int]:
    (gp,) = res.plan.groups.values()
    return {int(k) for k in gp.keep}


def test_planted_channels(tmp_path):
    path, an, cd = _setup(tmp_path, _planted(), _positive_x())
    acts = pipeline.capture_activations(an, cd.fit, "cpu")
    kept = {}
    for kind in ("l2", "act", "act-var"):
        res = pipeline.run(str(path), PlanOptions(ratio=0.25, importance=kind), analysis=an, calib=acts,
                           verify=True, ep="cpu")
        assert res.verification.passed
        kept[kind] = _kept(res)
        assert len(kept[kind]) == 6
    assert 0 in kept["l2"]  # large weights
    assert 0 not in kept["act"] and 0 not in kept["act-var"]  # dead on the data
    assert 1 in kept["act"]  # constant 3: large energy
    assert 1 not in kept["act-var"]  # constant: nothing left after bias compensation


# ----------------------------------------------------------------------------------------------
# fallback and errors


def test_group_without_a_consumer_falls_back_to_l2_and_is_counted(tmp_path):
    m = _model(NO_CONSUMER)
    x = np.random.default_rng(7).standard_normal((16, 8)).astype(np.float32)
    path, an, cd = _setup(tmp_path, m, x)
    g = _group_of(an, "w1")
    acts = pipeline.capture_activations(an, cd.fit, "cpu")
    ds = data_scores(an.cg, [g], "act", acts)
    assert g.id in ds.fallback and "no consumer" in ds.fallback[g.id]
    np.testing.assert_array_equal(ds.scores[g.id], group_importance(an.cg, g, "l2"))
    res = pipeline.run(str(path), PlanOptions(ratio=0.5, importance="act"), analysis=an, calib=cd.fit, ep="cpu")
    assert res.plan.importance["criterion"] == "act"
    assert res.plan.importance["fallback_l2"] == 1
    assert res.to_json()["importance"]["fallback"][0]["group"] == g.id


def test_data_importance_without_activations_is_refused(tmp_path):
    _, an, _ = _setup(tmp_path, _model(MLP), np.zeros((8, 8), np.float32))
    g = _group_of(an, "w1")
    with pytest.raises(UserError, match="calibration data"):
        make_plan(an.cg, PlanOptions(importance="act"))
    with pytest.raises(UserError, match="activations"):
        group_importance(an.cg, g, "act-var")


# ----------------------------------------------------------------------------------------------
# the command line


def _refused_one_line(proc) -> str:
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-1500:], proc.stderr[-1500:])
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("onnxprune: error:"), proc.stderr
    return lines[0]


@pytest.mark.parametrize("kind", DATA_IMPORTANCES)
def test_data_importance_without_calib_exits_2_with_one_line(run_main, tmp_path, out_dir, kind):
    path = tmp_path / "m.onnx"
    onnx.save(_planted(), str(path))
    proc = run_main("prune", path, "-o", out_dir / "o.onnx", "--importance", kind)
    line = _refused_one_line(proc)
    assert f"--importance {kind}" in line and "--calib" in line
    assert list(out_dir.iterdir()) == []


def _prune(run_main, tmp_path, out_dir, *args):
    path = tmp_path / "m.onnx"
    onnx.save(_planted(), str(path))
    np.savez(tmp_path / "calib.npz", x=_positive_x(40))
    report = out_dir / "r.json"
    proc = run_main("prune", path, "-o", out_dir / "o.onnx", "--ratio", "0.25", "--report", report, "--verify", *args)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-2000:])
    assert "PASSED" in proc.stdout
    return proc, json.loads(report.read_text())


def test_with_calib_the_default_is_data_aware_and_the_report_says_so(run_main, tmp_path, out_dir):
    proc, rep = _prune(run_main, tmp_path, out_dir, "--calib", tmp_path / "calib.npz")
    imp = rep["importance"]
    assert "compensation" in rep  # data compensates by default (lsq), and recon scores what lsq leaves
    assert rep["compensation"]["mode"] == "lsq"
    assert imp["criterion"] == DEFAULT_DATA_IMPORTANCE == "recon" == rep["plan"]["options"]["importance"]
    assert imp["fallback_l2"] == 0 and imp["groups"] == 1
    assert imp["samples"] == 32  # the fit share: 40 samples, a fifth held out (the default)
    assert isinstance(imp["capture_s"], float) and "capture" in rep["timings_s"]
    assert f"importance {DEFAULT_DATA_IMPORTANCE}" in proc.stdout
    (group,) = rep["plan"]["groups"]
    assert 0 not in group["keep"]  # the dead channel went; --verify passed all the same


def test_with_bias_compensation_the_default_is_act_var(run_main, tmp_path, out_dir):
    _, rep = _prune(run_main, tmp_path, out_dir, "--calib", tmp_path / "calib.npz", "--compensate", "bias")
    assert rep["importance"]["criterion"] == DEFAULT_BIAS_IMPORTANCE == "act-var"
    keep = rep["plan"]["groups"][0]["keep"]
    assert 0 not in keep and 1 not in keep  # dead and constant: nothing left of either after bias compensation


def test_with_calib_and_no_compensation_the_default_is_act(run_main, tmp_path, out_dir):
    _, rep = _prune(run_main, tmp_path, out_dir, "--calib", tmp_path / "calib.npz", "--compensate", "none")
    assert rep["importance"]["criterion"] == DEFAULT_UNCOMPENSATED_IMPORTANCE == "act"
    keep = rep["plan"]["groups"][0]["keep"]
    assert 0 not in keep and 1 in keep  # the constant channel's mean would be lost: act keeps it


def test_weight_criteria_stay_the_default_without_data_and_selectable_with_it(run_main, tmp_path, out_dir):
    _, rep = _prune(run_main, tmp_path, out_dir)
    assert rep["importance"]["criterion"] == "l2"
    assert 0 in rep["plan"]["groups"][0]["keep"]
    for f in out_dir.iterdir():
        f.unlink()
    _, rep = _prune(run_main, tmp_path, out_dir, "--calib", tmp_path / "calib.npz", "--importance", "l2")
    assert rep["importance"]["criterion"] == "l2" and 0 in rep["plan"]["groups"][0]["keep"]


def test_act_var_through_the_cli_removes_the_constant_channel(run_main, tmp_path, out_dir):
    _, rep = _prune(run_main, tmp_path, out_dir, "--calib", tmp_path / "calib.npz", "--importance", "act-var")
    assert rep["importance"]["criterion"] == "act-var"
    keep = rep["plan"]["groups"][0]["keep"]
    assert 0 not in keep and 1 not in keep
