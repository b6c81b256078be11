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
from onnxprune.planning.plan import Plan
from onnxprune.rewrite import compensate as comp_mod
from onnxprune.rewrite.compensate import (
    CompensateOptions,
    compensate,
    compensate_many,
    find_batchnorms,
    find_consumers,
)
from onnxprune.runtime.calib import CalibSpec, open_calib
from onnxprune.runtime.capture import with_outputs
from onnxprune.testing import from_text
from onnxprune.testing.checks import run, run_cli
from onnxprune.testing.graphs import CONV_1X1

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
CONV = CONV_1X1

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


def _passes(monkeypatch) -> list[int]:
    """Counts the compensation's runs over the data (``run_batched`` in rewrite/compensate.py)."""
    calls: list[int] = []
    real = comp_mod.run_batched

    def counted(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(comp_mod, "run_batched", counted)
    return calls


@pytest.mark.parametrize("layerwise", [False, True], ids=["flat", "layerwise"])
def test_plans_compensated_together_equal_each_compensated_alone(tmp_path, monkeypatch, layerwise):
    """``compensate_many``: three plans of MIXED (ratios 0.25, 0.5, 0.75: other kept channels, other
    features per consumer) fitted together give every plan the constants it gets alone, and the flat
    fits of all three take one run over the data where alone each takes its own (layerwise: a later
    level reads each plan's own pruned model, so nothing is shared)."""
    m = _model(MIXED, seed=5)
    an = pipeline.analyze_model(m, bias_inputs=True)
    view = open_calib(an.model, CalibSpec(path=_calib(tmp_path, np.random.default_rng(6).standard_normal(
        (60, 3, 8, 8))), holdout=0.2)).fit
    plans = [pipeline.build_plan(an, PlanOptions(ratio=r)) for r in (0.25, 0.5, 0.75)]
    opts = CompensateOptions(mode="lsq", layerwise=layerwise)
    calls = _passes(monkeypatch)
    alone = [compensate(an, p, view, opts, "cpu") for p in plans]
    n_alone = len(calls)
    together = compensate_many(an, plans, view, opts, "cpu")
    n_together = len(calls) - n_alone
    assert (n_alone, n_together) == ((9, 9) if layerwise else (3, 1))
    for a, t in zip(alone, together, strict=True):
        assert [r.to_json() for r in t.consumers] == [r.to_json() for r in a.consumers]
        ia = {i.name: onnx.numpy_helper.to_array(i) for i in a.analysis.model.graph.initializer}
        it = {i.name: onnx.numpy_helper.to_array(i) for i in t.analysis.model.graph.initializer}
        assert ia.keys() == it.keys()
        changed = [k for k in ia if not np.array_equal(ia[k], onnx.numpy_helper.to_array(
            next(i for i in an.model.graph.initializer if i.name == k)))]
        assert changed  # the fits wrote something
        for k in ia:
            assert _rel_vec(it[k], ia[k]) < 1e-5, k


@pytest.mark.parametrize("mode", ["lsq", "none"])
def test_prune_many_gives_the_models_run_gives(tmp_path, mode):
    """``pipeline.prune_many``: for each of several options the model ``run`` makes (same outputs
    on unseen inputs to float rounding), compensated or not."""
    m = _model(MIXED, seed=9)
    an = pipeline.analyze_model(m, bias_inputs=mode != "none")
    view = open_calib(an.model, CalibSpec(path=_calib(tmp_path, np.random.default_rng(10).standard_normal(
        (50, 3, 8, 8))), holdout=0.2)).fit
    comp = CompensateOptions(mode=mode)
    options = [PlanOptions(ratio=r) for r in (0.3, 0.6)]
    many = pipeline.prune_many(an, options, compensation=comp, fit=view, ep="cpu")
    feeds = {"x": np.random.default_rng(11).standard_normal((7, 3, 8, 8)).astype(np.float32)}
    for o, p in zip(options, many, strict=True):
        want = pipeline.run(m, o, analysis=an, compensation=comp, fit=view, ep="cpu").pruned
        assert _rel(p, want, feeds) < 1e-5
        assert _rel(p, m, feeds) > 1e-3  # pruned: not the original


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


# ----------------------------------------------------------------------------------------------
# BatchNormalization statistics after a changed consumer

# channel 1 of r is twice channel 0 (planted), and c2 reads those two only, channel 1 at half the
# weight: removing it scales c2 by exactly 1/2 per channel (bias compensation adds the mean), which a
# BatchNorm with matched statistics undoes exactly
BN_AFTER = """
<ir_version: 8, opset_import: ["" : 17]>
bnx (float[N,3,8,8] x) => (float[N,5,8,8] y)
<float[4,3,3,3] w1, float[4] b1, float[5,4,1,1] w2, float[5] b2, float[5] s, float[5] bb, float[5] mean,
 float[5] var>
{
  c1 = Conv <pads=[1,1,1,1]> (x, w1, b1)
  r = Relu (c1)
  c2 = Conv (r, w2, b2)
  y = BatchNormalization (c2, s, bb, mean, var)
}
"""

# three BatchNorms in a chain: n0 after a conv that loses nothing, n1 and n2 after pruned consumers
BN_CHAIN = """
<ir_version: 8, opset_import: ["" : 17]>
chain (float[N,3,8,8] x) => (float[N,4,8,8] y)
<float[6,3,3,3] w0, float[6] b0, float[6] s0, float[6] t0, float[6] m0, float[6] v0,
 float[6,6,3,3] w1, float[6] b1, float[6] s1, float[6] t1, float[6] m1, float[6] v1,
 float[6,6,1,1] w2, float[6] b2, float[6] s2, float[6] t2, float[6] m2, float[6] v2, float[4,6,1,1] w3, float[4] b3>
{
  c0 = Conv <pads=[1,1,1,1]> (x, w0, b0)
  n0 = BatchNormalization (c0, s0, t0, m0, v0)
  r0 = Relu (n0)
  c1 = Conv <pads=[1,1,1,1]> (r0, w1, b1)
  n1 = BatchNormalization (c1, s1, t1, m1, v1)
  r1 = Relu (n1)
  c2 = Conv (r1, w2, b2)
  n2 = BatchNormalization (c2, s2, t2, m2, v2)
  r2 = Relu (n2)
  y = Conv (r2, w3, b3)
}
"""


def _stats_in(model: onnx.ModelProto, tensor: str, feeds) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and (population) variance of ``tensor`` in ``model`` on ``feeds``, numpy."""
    v = run(with_outputs(model, [tensor]), feeds)[-1].astype(np.float64)
    return v.mean(axis=(0, 2, 3)), v.var(axis=(0, 2, 3))


def _const(model: onnx.ModelProto, name: str) -> np.ndarray:
    return next(onnx.numpy_helper.to_array(i) for i in model.graph.initializer if i.name == name)


def _rel_vec(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def _run_planned(m: onnx.ModelProto, calib: str, keep: dict[str, list[int]], comp: CompensateOptions,
                 holdout: float = 0.3):
    """(result, fit feeds, held-out feeds) of one verified run whose groups keep ``keep`` (by the
    group's producing node; other groups are left whole)."""
    an = pipeline.analyze_model(m, bias_inputs=True)
    data = open_calib(an.model, CalibSpec(path=calib, holdout=holdout))
    opts = PlanOptions(ratio=0.5)
    plan = pipeline.build_plan(an, opts).to_json(an.cg)
    for entry in plan["groups"]:
        (producer,) = [p for p in entry["producers"] if p in keep] or [None]
        entry["keep"] = keep[producer] if producer else list(range(entry["channels"]))
    res = pipeline.run(m, opts, verify=True, ep="cpu", analysis=an, plan_json=plan, fit=data.fit, compensation=comp)
    fit = data.fit.read(0, data.fit.n).feeds
    return res, fit, data.holdout.read(0, data.holdout.n).feeds


@pytest.mark.parametrize("bn_stats,exact", [("match", True), ("recompute", False), ("off", False)])
def test_matched_batchnorm_undoes_a_per_channel_scale(tmp_path, bn_stats, exact):
    """c2 of the pruned model is exactly (c2 of the original) / 2 + a constant per channel: matched
    statistics make the BatchNorm after it give the original's output on unseen data; recomputed
    ones normalize to the data's statistics, which are not the original's running ones."""
    rng = np.random.default_rng(21)
    w1 = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    b1 = rng.uniform(0.2, 0.6, 4).astype(np.float32)
    w1[1], b1[1] = 2 * w1[0], 2 * b1[0]  # r1 = 2 r0
    w2 = rng.standard_normal((5, 4, 1, 1)).astype(np.float32)
    w2[:, 1] = 0.5 * w2[:, 0]  # c2 = 2 w2[:, 0] r0 + b2; without r1: w2[:, 0] r0 + b2 + mean
    w2[:, 2:] = 0.0
    m = _model(BN_AFTER, seed=22, w1=w1, b1=b1, w2=w2, mean=rng.standard_normal(5),
               var=rng.uniform(0.5, 1.5, 5), s=rng.uniform(0.5, 1.5, 5))
    calib = _calib(tmp_path, rng.standard_normal((80, 3, 8, 8)))
    comp = CompensateOptions(mode="bias", bn_stats=bn_stats, bn_samples=None)
    res, _, held = _run_planned(m, calib, {"conv_0": [0, 2, 3]}, comp)
    assert res.verification.passed and max(o.rel_error for o in res.verification.outputs) < 1e-5
    err = _rel(res.pruned, m, held)
    assert (err < 1e-4) == exact, (bn_stats, err)
    bns = [b.to_json() for b in res.compensation.batchnorms]
    if bn_stats == "off":
        assert bns == [] and np.array_equal(_const(res.pruned, "mean"), _const(m, "mean"))
    else:
        (b,) = bns
        assert (b["node"], b["after"], b["how"], b["mode"], b["channels"]) == ("batchnormalization_3", "conv_2",
                                                                             "recomputed", bn_stats, 5)
        assert abs(b["std_ratio"] - 0.5) < 1e-3 if exact else True  # the scale it undid
        assert res.to_json()["compensation"]["batchnorms"][0]["node"] == "batchnormalization_3"


def test_batchnorm_statistics_are_recomputed_in_layer_order(tmp_path):
    """``recompute``: each BatchNorm of the pruned model holds the mean and variance of its input in
    that same pruned model on the fit samples, n2's taken after n1 changed (its statistics with n1's
    old ones differ); n0, after a conv that lost nothing, keeps the original's."""
    rng = np.random.default_rng(23)
    planted = {f"v{i}": rng.uniform(0.5, 1.5, 6) for i in range(3)}
    m = _model(BN_CHAIN, seed=24, **planted)
    calib = _calib(tmp_path, rng.standard_normal((60, 3, 8, 8)))
    comp = CompensateOptions(mode="lsq", bn_stats="recompute", bn_samples=None)
    res, fit, _ = _run_planned(m, calib, {"conv_0": [0, 2, 4], "conv_3": [1, 2, 3, 5], "conv_6": [0, 1, 3]}, comp)
    assert res.verification.passed and max(o.rel_error for o in res.verification.outputs) < 1e-5
    p = res.pruned
    by = {b.node: b for b in res.compensation.batchnorms}
    names = {n.name: n for n in m.graph.node if n.op_type == "BatchNormalization"}
    assert sorted(by) == sorted(k for k, n in names.items() if n.input[0] in ("c1", "c2"))
    assert by[next(k for k, n in names.items() if n.input[0] == "c2")].level == 1
    for x, mean, var in (("c1", "m1", "v1"), ("c2", "m2", "v2")):
        mu, var_x = _stats_in(p, x, fit)
        assert _rel_vec(_const(p, mean), mu) < 1e-5 and _rel_vec(_const(p, var), var_x) < 1e-5, x
    kept0 = [0, 2, 4]
    assert np.array_equal(_const(p, "m0"), _const(m, "m0")[kept0])
    assert np.array_equal(_const(p, "v0"), _const(m, "v0")[kept0])
    # had n2's statistics been taken before n1 changed, they would be these: far from what it holds
    old = onnx.ModelProto()
    old.CopyFrom(p)
    kept1 = [1, 2, 3, 5]
    for init in old.graph.initializer:
        if init.name in ("m1", "v1"):
            init.CopyFrom(onnx.numpy_helper.from_array(_const(m, init.name)[kept1], init.name))
    mu_old, _ = _stats_in(old, "c2", fit)
    assert _rel_vec(mu_old, _const(p, "m2")) > 1e-2


# which BatchNorms follow a changed consumer: through per-channel ops, not through a sum of two tensors
BN_PATHS = """
<ir_version: 8, opset_import: ["" : 17]>
paths (float[N,3,8,8] x) => (float[N,6,8,8] y, float[N,6,8,8] z, float[N,6,8,8] u)
<float[6,3,3,3] w0, float[6] b0, float[6,6,1,1] w1, float[6] b1, float[1,6,1,1] k,
 float[6] s0, float[6] t0, float[6] m0, float[6] v0, float[6] s1, float[6] t1, float[6] m1, float[6] v1,
 float[6] s2, float[6] t2, float[6] m2, float[6] v2>
{
  c0 = Conv <pads=[1,1,1,1]> (x, w0, b0)
  r0 = Relu (c0)
  c1 = Conv (r0, w1, b1)
  a = Relu (c1)
  b = Mul (a, k)
  y = BatchNormalization (b, s0, t0, m0, v0)
  d = Add (c1, c0)
  z = BatchNormalization (d, s1, t1, m1, v1)
  u = BatchNormalization (c0, s2, t2, m2, v2)
}
"""


def test_batchnorms_after_a_changed_consumer_are_found_through_per_channel_ops():
    m = _model(BN_PATHS, seed=25, v0=np.ones(6), v1=np.ones(6), v2=np.ones(6))
    an = pipeline.analyze_model(m, bias_inputs=True)
    plan = Plan({}, {}, {})  # nothing removed: which BNs follow which nodes does not depend on it
    found, skipped = find_batchnorms(an, plan, {"conv_2"})
    assert [(t.node, t.x, t.after, t.level) for t in found] == [("batchnormalization_5", "b", "conv_2", 0)]
    assert skipped == []
    found, _ = find_batchnorms(an, plan, {"conv_0"})
    assert [t.node for t in found] == ["batchnormalization_8"]  # u reads c0 directly; z reads a sum
