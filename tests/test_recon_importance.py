"""``--importance recon`` (planning/data_importance.py, Gram capture in runtime/capture.py).

recon scores a unit by what its consumers' outputs lose when it goes and the consumers are refitted
by least squares on what remains. Here the scores are checked against a brute force that refits
with ``numpy.linalg.lstsq`` on activations computed by hand (numpy, from the fit share's samples), on
a small Gemm and a small Conv; planted models show what the criterion is for: a channel that is the
sum of two others costs nothing (act ranks it first), a constant channel costs nothing; and the
greedy order's cumulative scores equal the brute-force cost of removing each prefix at once.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np
import onnx
import pytest
from numpy.lib.stride_tricks import sliding_window_view

from onnxprune import pipeline
from onnxprune.planning.data_importance import Activations, consumer_taps, data_scores, recon_specs
from onnxprune.planning.importance import DATA_IMPORTANCES, IMPORTANCES
from onnxprune.planning.options import PlanOptions
from onnxprune.planning.plan import make_plan
from onnxprune.runtime.calib import CalibSpec, open_calib
from onnxprune.runtime.capture import GramSpec, capture, capture_grams
from onnxprune.testing import from_text

# x -> 8 hidden units (no nonlinearity: their linear relations are planted) -> 5 outputs
DENSE = """
<ir_version: 8, opset_import: ["" : 17]>
dense (float[N,16] x) => (float[N,5] y)
<float[8,16] w1, float[8] b1, float[5,8] w2, float[5] b2>
{
  h = Gemm <transB=1> (x, w1, b1)
  y = Gemm <transB=1> (h, w2, b2)
}
"""

CONV2 = """
<ir_version: 8, opset_import: ["" : 17]>
cnn (float[N,3,8,8] x) => (float[N,4,8,8] y)
<float[6,3,3,3] w1, float[6] b1, float[4,6,3,3] w2, float[4] b2>
{
  c = Conv <pads=[1,1,1,1]> (x, w1, b1)
  r = Relu (c)
  y = Conv <pads=[1,1,1,1]> (r, w2, b2)
}
"""

# the same with a MatMul consumer on a 3-D activation (rows: samples x positions)
MATMUL = """
<ir_version: 8, opset_import: ["" : 17]>
mm (float[N,6,16] x) => (float[N,6,5] y)
<float[16,8] w1, float[8] b1, float[8,5] w2>
{
  a = MatMul (x, w1)
  h = Add (a, b1)
  r = Relu (h)
  y = MatMul (r, w2)
}
"""


def _model(text: str, seed: int = 0, **planted: np.ndarray) -> onnx.ModelProto:
    m = from_text(text)
    rng = np.random.default_rng(seed)
    for init in m.graph.initializer:
        a = planted.get(init.name)
        if a is None:
            a = rng.standard_normal(tuple(init.dims)).astype(np.float32)
        init.CopyFrom(onnx.numpy_helper.from_array(np.asarray(a, np.float32), init.name))
    return m


def _weights(m: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {i.name: onnx.numpy_helper.to_array(i).astype(np.float64) for i in m.graph.initializer}


def _setup(tmp_path: pathlib.Path, m: onnx.ModelProto, x: np.ndarray, name: str = "m"):
    path = tmp_path / f"{name}.onnx"
    onnx.save(m, str(path))
    np.savez(tmp_path / f"{name}.npz", x=x)
    an = pipeline.analyze_model(str(path))
    cd = open_calib(an.model, CalibSpec(path=str(tmp_path / f"{name}.npz"), holdout=0.25))
    return path, an, cd


def _group(an, producer_weight: str):
    return next(g for g in an.cg.groups if g.prunable and any(s.const == producer_weight for s in g.slots))


def _fit_x(cd) -> np.ndarray:
    return cd.fit.read(0, cd.fit.n).feeds["x"].astype(np.float64)


def _scores(an, cd, g, kind="recon", **kw) -> np.ndarray:
    acts = pipeline.capture_activations(an, cd.fit, "cpu")
    return data_scores(an.cg, [g], kind, acts, **kw).scores[g.id]


def _refit_cost(f: np.ndarray, w: np.ndarray, blocks: list[np.ndarray], removed: np.ndarray, lam: float = 0.0) -> float:
    """Brute force: rows ``f`` [R, F] (features), targets t = f W^T. Remove the features of the
    units ``removed`` (``blocks[u]``: their feature indices), refit the rest with an intercept by
    lstsq (ridge ``lam`` on the standardized features toward the old weights: augmented rows
    ``sqrt(lam) sd``), and return the squared output error plus the ridge term, per row, over the
    output variance."""
    fc = f - f.mean(axis=0)
    t = fc @ w.T
    gone = np.concatenate([blocks[u] for u in removed]) if len(removed) else np.zeros(0, int)
    keep = np.setdiff1d(np.arange(f.shape[1]), gone)
    r = f.shape[0]
    x = fc[:, keep] / np.sqrt(r)
    y = (t - fc[:, keep] @ w[:, keep].T) / np.sqrt(r)  # what the change of the kept weights must make up
    if lam > 0:
        x = np.vstack([x, np.sqrt(lam) * np.diag(f[:, keep].std(axis=0))])
        y = np.vstack([y, np.zeros((len(keep), w.shape[0]))])
    d = np.linalg.lstsq(x, y, rcond=None)[0]
    err = float(np.sum((y - x @ d) ** 2))
    return err / (float(np.sum(t**2)) / r)


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def _dense_rows(cd, w):
    return _fit_x(cd) @ w["w1"].T + w["b1"]


def _conv_rows(cd, w):
    """Every output position of the second conv as a row of patch features (channel-major, then tap)."""
    x = _fit_x(cd)
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    c = np.einsum("nchwij,ocij->nohw", sliding_window_view(xp, (3, 3), axis=(2, 3)), w["w1"]) + w["b1"][None, :, None, None]
    r = np.pad(np.maximum(c, 0), ((0, 0), (0, 0), (1, 1), (1, 1)))
    win = sliding_window_view(r, (3, 3), axis=(2, 3))  # [N, C, H, W, 3, 3]
    return win.transpose(0, 2, 3, 1, 4, 5).reshape(-1, r.shape[1] * 9)


# ----------------------------------------------------------------------------------------------
# recon equals a brute-force refit


@pytest.mark.parametrize("ridge", [0.0, 0.1])
def test_gemm_scores_equal_bruteforce_refit(tmp_path, ridge):
    m = _model(DENSE)
    x = np.random.default_rng(1).standard_normal((80, 16)).astype(np.float32)
    _, an, cd = _setup(tmp_path, m, x)
    w = _weights(m)
    g = _group(an, "w1")
    f = _dense_rows(cd, w)
    blocks = [np.asarray([c]) for c in range(8)]
    want = np.asarray([_refit_cost(f, w["w2"], blocks, np.asarray([u]), ridge) for u in range(8)])
    got = _scores(an, cd, g, ridge=ridge, greedy=False)
    assert _rel(got, want / want.mean()) < 1e-6
    assert np.std(want) / np.mean(want) > 0.1  # the units differ: the comparison can fail


@pytest.mark.parametrize("ridge", [0.0, 0.03])
def test_conv_scores_equal_bruteforce_refit(tmp_path, ridge):
    m = _model(CONV2, seed=2)
    x = np.random.default_rng(3).standard_normal((16, 3, 8, 8)).astype(np.float32)
    _, an, cd = _setup(tmp_path, m, x)
    w = _weights(m)
    g = _group(an, "w1")
    f = _conv_rows(cd, w)  # 64 positions per sample: every one is a row (GRAM_ROWS = 64)
    blocks = [np.arange(c * 9, (c + 1) * 9) for c in range(6)]
    w2 = w["w2"].reshape(4, -1)
    want = np.asarray([_refit_cost(f, w2, blocks, np.asarray([u]), ridge) for u in range(6)])
    got = _scores(an, cd, g, ridge=ridge, greedy=False)
    assert _rel(got, want / want.mean()) < 1e-6
    # a diagonal criterion is not the same thing: act-var differs from the refit cost
    assert _rel(_scores(an, cd, g, "act-var"), want / want.mean()) > 1e-2


def test_matmul_on_positions_equals_bruteforce(tmp_path):
    m = _model(MATMUL, seed=4)
    x = np.random.default_rng(5).standard_normal((40, 6, 16)).astype(np.float32)
    _, an, cd = _setup(tmp_path, m, x)
    w = _weights(m)
    g = _group(an, "w1")
    f = np.maximum(_fit_x(cd) @ w["w1"] + w["b1"], 0).reshape(-1, 8)
    blocks = [np.asarray([c]) for c in range(8)]
    want = np.asarray([_refit_cost(f, w["w2"].T, blocks, np.asarray([u])) for u in range(8)])
    assert _rel(_scores(an, cd, g, ridge=0.0, greedy=False), want / want.mean()) < 1e-6


def test_greedy_cumulative_scores_equal_refit_of_each_prefix(tmp_path):
    m = _model(CONV2, seed=6)
    x = np.random.default_rng(7).standard_normal((16, 3, 8, 8)).astype(np.float32)
    _, an, cd = _setup(tmp_path, m, x)
    w = _weights(m)
    g = _group(an, "w1")
    f = _conv_rows(cd, w)
    w2 = w["w2"].reshape(4, -1)
    blocks = [np.arange(c * 9, (c + 1) * 9) for c in range(6)]
    got = _scores(an, cd, g, ridge=0.0, greedy=True)
    order = np.argsort(got, kind="stable")
    # each step removes the unit whose removal (with the earlier ones) costs least
    for k in range(5):
        cand = [u for u in range(6) if u not in order[:k]]
        costs = {u: _refit_cost(f, w2, blocks, np.append(order[:k], u)) for u in cand}
        assert order[k] == min(costs, key=costs.get)
    want = np.asarray([_refit_cost(f, w2, blocks, order[:k + 1]) for k in range(6)])
    assert abs(want[-1] - 1.0) < 1e-9  # removing everything loses the whole output variance
    assert _rel(got[order], want / want.mean()) < 1e-6
    # two units per step (a flop budget just below one per step): the cost of each prefix that
    # ends a step stays exact (ratios, as the scores are normalized)
    acts = pipeline.capture_activations(an, cd.fit, "cpu")
    ds = data_scores(an.cg, [g], "recon", acts, ridge=0.0, greedy_flops=3.6e5)
    assert ds.recon["max_units_per_step"] == 2
    few = ds.scores[g.id]
    o2 = np.argsort(few, kind="stable")
    ends = np.asarray([_refit_cost(f, w2, blocks, o2[:k + 1]) for k in (1, 3, 5)])
    assert _rel(few[o2[[1, 3, 5]]] / few[o2[5]], ends / ends[-1]) < 1e-6
    assert set(o2[:2]) != set(order[:2]) or _rel(few[o2[1]] / few[o2[5]], want[1:2] / want[5]) < 1e-6


# ----------------------------------------------------------------------------------------------
# planted models


def _planted_dense(seed: int = 0):
    """w1: unit 2 = unit 0 + unit 1 (with the biases), large; unit 5 constant (zero weights, bias 20)."""
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((8, 16))
    b1 = rng.standard_normal(8)
    w1[0] *= 3
    w1[1] *= 3
    w1[2], b1[2] = w1[0] + w1[1], b1[0] + b1[1]
    w1[5], b1[5] = 0.0, 20.0
    return _model(DENSE, seed=seed, w1=w1, b1=b1)


def test_linear_combination_scores_near_zero_act_ranks_it_high(tmp_path):
    m = _planted_dense()
    x = np.random.default_rng(8).standard_normal((120, 16)).astype(np.float32)
    _, an, cd = _setup(tmp_path, m, x)
    g = _group(an, "w1")
    act = _scores(an, cd, g, "act")
    assert act[2] == max(act[u] for u in range(8) if u != 5) and act[2] > 2 * np.median(act)  # large energy
    others = [u for u in range(8) if u not in (0, 1, 2, 5)]
    # each of 0, 1, 2 is a combination of the other two: removing it alone costs only the ridge
    # (lam x its share of the energy), whatever the ridge cross-validation picks ...
    single = _scores(an, cd, g, greedy=False)
    assert max(single[[0, 1, 2]]) < 0.05 * min(single[others])
    # ... and ~nothing without one
    tiny = _scores(an, cd, g, greedy=False, ridge=1e-9)
    assert max(tiny[[0, 1, 2]]) < 1e-6 * min(tiny[others])
    # greedy: once one of them is gone, the other two are needed
    greedy = _scores(an, cd, g)
    order = list(np.argsort(greedy, kind="stable"))
    assert order[0] == 5 and order[1] in (0, 1, 2)  # the free ones first (cumulative cost ~0) ...
    assert greedy[order[1]] < 0.05 * min(greedy[others])
    assert set(order[-2:]) == {0, 1, 2} - {order[1]}  # ... then the other two are needed most
    plan = make_plan(an.cg, PlanOptions(ratio=0.25, importance="recon"), pipeline.capture_activations(an, cd.fit, "cpu"))
    removed = set(range(8)) - set(plan.groups[g.id].keep.tolist())
    assert removed == {5, int(np.argmin(greedy[[0, 1, 2]]))}


def test_constant_channel_scores_zero(tmp_path):
    m = _planted_dense(seed=1)
    x = np.random.default_rng(9).standard_normal((120, 16)).astype(np.float32)
    _, an, cd = _setup(tmp_path, m, x)
    g = _group(an, "w1")
    for greedy in (False, True):
        s = _scores(an, cd, g, greedy=greedy)
        assert s[5] < 1e-9 * np.median(s)
    assert _scores(an, cd, g, "act")[5] > 0.5  # act counts its mean


# ----------------------------------------------------------------------------------------------
# Gram capture and memory


def test_gram_passes_within_budget_equal_one_pass(tmp_path):
    m = _model(CONV2, seed=10)
    x = np.random.default_rng(11).standard_normal((20, 3, 8, 8)).astype(np.float32)
    _, an, cd = _setup(tmp_path, m, x)
    specs = [GramSpec("r", 1, 6, (3, 3), (1, 1), (1, 1), (1, 1, 1, 1)), GramSpec("r", 1, 6), GramSpec("x", 1, 3, (3, 3))]
    one = capture_grams(an.model, specs, cd.fit, rows=16, ep="cpu")
    assert one.passes == 1
    small = capture_grams(an.model, specs, cd.fit, rows=16, ep="cpu", gram_budget=1)
    assert small.passes == 3
    taps = [("r", 1)]
    cap = capture(an.model, taps, cd.fit, ep="cpu", grams=specs, gram_rows=16, gram_budget=specs[0].nbytes)
    assert len(cap.grams.grams) == 1  # only what the budget holds comes with the capture
    for sp in specs:
        a, b = one.grams[sp], small.grams[sp]
        assert np.array_equal(a.ss, b.ss) and np.array_equal(a.n, b.n)
        assert a.rows == 16 * cd.fit.n  # 16 of the 64 (r) or 36 (x, 3x3 unpadded) positions per sample
    assert np.array_equal(cap.grams.grams[specs[0]].ss, one.grams[specs[0]].ss)


@pytest.mark.parametrize("auto_pad", ["NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID"])
def test_conv_patch_gram_equals_numpy_with_strides_dilations_and_pads(tmp_path, auto_pad):
    m = _model(CONV2, seed=20)
    x = np.random.default_rng(21).standard_normal((8, 3, 8, 8)).astype(np.float32)
    _, an, cd = _setup(tmp_path, m, x)
    pads = (1, 2, 0, 1) if auto_pad == "NOTSET" else ()
    sp = GramSpec("x", 1, 3, (3, 2), (2, 1), (1, 2), pads, auto_pad)
    got = capture_grams(an.model, [sp], cd.fit, rows=1000, ep="cpu").grams[sp]  # every position is a row
    xs = _fit_x(cd)
    if auto_pad == "NOTSET":
        pb, pe = [1, 2], [0, 1]
    elif auto_pad == "VALID":
        pb, pe = [0, 0], [0, 0]
    else:  # output = ceil(8 / stride); total padding split, the odd one at the end (UPPER) or start
        tot = [max(0, (-(-8 // st) - 1) * st + (k - 1) * d + 1 - 8) for k, st, d in ((3, 2, 1), (2, 1, 2))]
        small = [t // 2 for t in tot]
        big = [t - t // 2 for t in tot]
        pb, pe = (small, big) if auto_pad == "SAME_UPPER" else (big, small)
    xp = np.pad(xs, ((0, 0), (0, 0), (pb[0], pe[0]), (pb[1], pe[1])))
    oh = (xp.shape[2] - 3) // 2 + 1
    ow = (xp.shape[3] - 2 - 1) // 1 + 1
    feats = np.stack([xp[:, :, i:i + 2 * (oh - 1) + 1:2, 2 * j:2 * j + ow] for i in range(3) for j in range(2)], axis=-1)
    f = feats.transpose(0, 2, 3, 1, 4).reshape(-1, 3 * 6)  # rows: (sample, y, x); features (channel, tap)
    assert got.rows == len(f) == cd.fit.n * oh * ow
    ss = got.ss.sum(axis=0)[0]
    assert _rel(ss, f.T @ f) < 1e-12 and _rel(got.s.sum(axis=0)[0], f.sum(axis=0)) < 1e-12


def test_recon_in_chunks_equals_one_chunk(tmp_path):
    m = _model(MATMUL, seed=12)
    x = np.random.default_rng(13).standard_normal((30, 6, 16)).astype(np.float32)
    _, an, cd = _setup(tmp_path, m, x)
    g = _group(an, "w1")
    acts = pipeline.capture_activations(an, cd.fit, "cpu")
    a = data_scores(an.cg, [g], "recon", acts)
    b = data_scores(an.cg, [g], "recon", pipeline.capture_activations(an, cd.fit, "cpu"), gram_budget=1)
    assert np.allclose(a.scores[g.id], b.scores[g.id], rtol=1e-12, atol=0)
    assert a.recon["gram_passes"] == 1 and a.recon["consumers"] == 1
    # plans made again on the same activations (sweep, target search) reuse the scores
    again = data_scores(an.cg, [g], "recon", acts)
    assert again.recon["gram_passes"] == 0 and again.recon["cached_groups"] == 1
    assert np.array_equal(again.scores[g.id], a.scores[g.id])


def test_grams_captured_with_the_statistics_need_no_second_pass(tmp_path):
    m = _model(CONV2, seed=18)
    x = np.random.default_rng(19).standard_normal((12, 3, 8, 8)).astype(np.float32)
    _, an, cd = _setup(tmp_path, m, x)
    g = _group(an, "w1")
    taps = consumer_taps(an.cg, [g])
    specs = recon_specs(an.cg, [g], taps)
    assert [(sp.tensor, sp.kernel, sp.pads) for sp in specs] == [("r", (3, 3), (1, 1, 1, 1))]
    one = Activations.of(capture(an.model, taps.taps, cd.fit, ep="cpu", grams=specs))
    ds = data_scores(an.cg, [g], "recon", one)
    assert ds.recon["gram_passes"] == 0
    lazy = data_scores(an.cg, [g], "recon", pipeline.capture_activations(an, cd.fit, "cpu"))
    assert lazy.recon["gram_passes"] == 1
    assert np.array_equal(ds.scores[g.id], lazy.scores[g.id])


def test_unmodelled_consumer_falls_back_to_act_var_and_says_so(tmp_path):
    m = _model(CONV2, seed=14)
    x = np.random.default_rng(15).standard_normal((12, 3, 8, 8)).astype(np.float32)
    _, an, cd = _setup(tmp_path, m, x)
    g = _group(an, "w1")
    acts = pipeline.capture_activations(an, cd.fit, "cpu")
    ds = data_scores(an.cg, [g], "recon", acts, max_features=20)  # the 6 x 3x3 patch has 54
    assert g.id in ds.act_var and "54 features" in ds.act_var[g.id]
    assert np.allclose(ds.scores[g.id], data_scores(an.cg, [g], "act-var", acts).scores[g.id])
    rep = ds.report(an.cg, acts)
    assert rep["fallback_act_var"] == 1 and "exceed 20" in rep["act_var_groups"][0]["reason"]


def test_too_few_rows_for_the_features_falls_back_to_act_var(tmp_path):
    """8 features need 16 Gram rows: 12 samples (9 fit, one position each) do not determine C."""
    m = _planted_dense(seed=3)
    x = np.random.default_rng(17).standard_normal((12, 16)).astype(np.float32)
    _, an, cd = _setup(tmp_path, m, x)
    g = _group(an, "w1")
    acts = pipeline.capture_activations(an, cd.fit, "cpu")
    ds = data_scores(an.cg, [g], "recon", acts)
    assert f"{cd.fit.n} Gram rows for 8 features" in ds.act_var[g.id]
    assert np.allclose(ds.scores[g.id], data_scores(an.cg, [g], "act-var", acts).scores[g.id])
    assert data_scores(an.cg, [g], "recon", acts).act_var == ds.act_var  # cached, still said


# ----------------------------------------------------------------------------------------------
# command line

def test_recon_is_a_choice_and_needs_calibration(run_main, tmp_path):
    assert "recon" in IMPORTANCES and "recon" in DATA_IMPORTANCES
    path = tmp_path / "m.onnx"
    onnx.save(_model(CONV2), str(path))
    out = tmp_path / "p.onnx"
    r = run_main("prune", path, "-o", out, "--ratio", "0.5", "--importance", "recon")
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "calibration" in r.stderr and "Traceback" not in r.stderr
    assert not out.exists()


def test_recon_end_to_end_with_calibration(run_main, tmp_path):
    m = _planted_dense(seed=2)
    x = np.random.default_rng(16).standard_normal((160, 16)).astype(np.float32)
    path, an, cd = _setup(tmp_path, m, x)
    out, rep = tmp_path / "p.onnx", tmp_path / "r.json"
    r = run_main("prune", path, "-o", out, "--ratio", "0.25", "--calib", tmp_path / "m.npz",
                 "--importance", "recon", "--verify", "--report", rep)
    assert r.returncode == 0, r.stderr
    data = json.loads(rep.read_text())
    assert data["importance"]["criterion"] == "recon"
    assert data["importance"]["recon"]["consumers"] == 1 and data["importance"]["fallback_act_var"] == 0
    # unit 5 (constant) and one of the planted triple go: lsq restores the output exactly
    assert data["fidelity"]["summary"]["worst_rel_error_l2"] < 1e-4


def test_consumer_taps_unchanged_by_recon(tmp_path):
    """recon taps the same tensors as act/act-var (its Gram pass runs on them)."""
    m = _model(CONV2)
    _, an, cd = _setup(tmp_path, m, np.zeros((8, 3, 8, 8), np.float32))
    g = _group(an, "w1")
    assert consumer_taps(an.cg, [g]).taps == [("r", 1)]
