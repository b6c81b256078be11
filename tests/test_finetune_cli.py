"""``prune --finetune N`` (distillation into the pruned weights, rewrite/distill.py) and ``--bn-stats``
(BatchNorm statistics after compensation) through the command line, on tiny models.

What each test can catch:
- the finetuned model is written, verified against the masked original rebuilt from its trained
  weights, and reported (steps, the step kept, what was trained, fidelity before and after); on
  fresh samples its KL to the original is lower than the unfinetuned model's (a loop that writes
  nothing back, or writes the wrong tensors, fails), and the standalone ``verify`` against the
  untouched original tells the two apart;
- ``--finetune`` without calibration data, or its options without it, or without torch: exit 2,
  one line, nothing written;
- ``--bn-stats`` reaches compensation (the report's mode and BatchNorm list, the written statistics)
  and verification stays exact; a bad value fails in argparse;
- a target search evaluates its ratios without finetuning and finetunes the chosen plan once.
"""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import pytest

pytest.importorskip("torch")

from onnxprune.cli.args import FINETUNE_DEFAULTS  # noqa: E402
from onnxprune.rewrite import distill  # noqa: E402
from onnxprune.rewrite.distill import DistillOptions  # noqa: E402
from onnxprune.testing import graphs  # noqa: E402
from onnxprune.testing.checks import inits, run  # noqa: E402

MLP = graphs.SOFTMAX_MLP

# a BatchNormalization after c2, a consumer of c1's pruned channels: compensation sets its statistics
BN_CNN = """
<ir_version: 8, opset_import: ["" : 17]>
bn (float[N,3,8,8] x) => (float[N,5] y)
<float[8,3,3,3] w1, float[8] b1, float[6,8,1,1] w2, float[6] b2, float[6] s, float[6] bb, float[6] mean,
 float[6] var, float[5,6] wf, float[5] bf>
{
  c1 = Conv <pads=[1,1,1,1]> (x, w1, b1)
  r1 = Relu (c1)
  c2 = Conv (r1, w2, b2)
  n2 = BatchNormalization (c2, s, bb, mean, var)
  r2 = Relu (n2)
  p = GlobalAveragePool (r2)
  f = Flatten (p)
  y = Gemm <transB=1> (f, wf, bf)
}
"""

STEPS = "60"
FT = ("--ratio", "0.6", "--holdout", "0.5", "--compensate", "none", "--finetune-batch", "32", "--ep", "cpu")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models on a shared machine: more torch threads only make each small matmul slower."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _scaled(m: onnx.ModelProto) -> onnx.ModelProto:
    """Weights of variance 4/fan-in: unit-normal ones saturate the softmax to one-hot vectors."""
    for init in m.graph.initializer:
        if init.name.startswith("w"):
            w = onnx.numpy_helper.to_array(init)
            init.CopyFrom(onnx.numpy_helper.from_array(w * np.float32(2 / np.sqrt(w[0].size)), init.name))
    return m


@pytest.fixture
def mlp(tmp_path):
    model, calib = tmp_path / "mlp.onnx", tmp_path / "c.npz"
    onnx.save(_scaled(graphs.build(MLP, seed=1)), str(model))
    np.savez(calib, x=np.random.default_rng(0).standard_normal((400, 8)).astype(np.float32))
    out = tmp_path / "out"
    out.mkdir()
    return model, calib, out


@pytest.fixture
def bn_cnn(tmp_path):
    model, calib = tmp_path / "bn.onnx", tmp_path / "c.npz"
    onnx.save(_scaled(graphs.build(BN_CNN, positive=("var",), seed=4)), str(model))
    np.savez(calib, x=np.random.default_rng(5).standard_normal((80, 3, 8, 8)).astype(np.float32))
    out = tmp_path / "out"
    out.mkdir()
    return model, calib, out


def _ok(r) -> None:
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    assert r.stdout.strip().splitlines()[-1] == "PASSED", r.stdout[-2000:]


def _strict(path) -> dict:
    """The report, read as strict JSON (NaN refused)."""
    def refuse(c):
        raise AssertionError(f"{c} in the report")

    return json.loads(path.read_text(), parse_constant=refuse)


def _refused(r, out_dir, *words: str) -> None:
    assert "Traceback" not in r.stderr, r.stderr
    assert r.returncode == 2, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert list(out_dir.iterdir()) == [], "a file was written"
    for w in words:
        assert w in lines[0], (w, lines[0])


def _kl(original, pruned, feeds) -> float:
    p, q = run(original, feeds)[0].astype(np.float64), run(pruned, feeds)[0].astype(np.float64)
    return float(np.mean(np.sum(p * (np.log(np.maximum(p, 1e-30)) - np.log(np.maximum(q, 1e-30))), axis=-1)))


def test_help_states_the_distillation_defaults():
    d = DistillOptions()
    assert FINETUNE_DEFAULTS == {"lr": d.lr, "batch": d.batch, "temperature": d.temperature}


def test_finetune_is_verified_reported_and_not_worse(run_main, mlp):
    model, calib, out = mlp
    r = run_main("prune", model, "-o", out / "p.onnx", "--calib", calib, "--finetune", STEPS, *FT, "--verify",
                 "--report", out / "r.json")
    _ok(r)
    rep = _strict(out / "r.json")
    ft = rep["finetune"]
    assert ft["steps"] == int(STEPS) and 0 < ft["steps_run"] <= int(STEPS)
    assert ft["trained_constants"] == 6 and ft["trained_values"] > 0 and ft["frozen_constants"] == 0
    assert ft["train_samples"] + ft["val_samples"] == 200  # the fit share: 400 - 0.5 * 400
    assert ft["history"][0][1] is None  # step 0 has no training loss: null, not NaN
    assert rep["verification"]["passed"] and max(o["rel_error"] for o in rep["verification"]["outputs"]) < 1e-5
    before, after = rep["fidelity_before"]["summary"], rep["fidelity"]["summary"]
    assert before["held_out"] == after["held_out"] == 200
    assert f"finetune: {ft['steps_run']} of {STEPS} steps" in r.stdout
    assert "held-out top-1" in r.stdout and "masked original rebuilt from its trained weights" in r.stdout
    if ft["best_step"] > 0:
        assert ft["val_loss_best"] < ft["val_loss_start"]
        assert after["min_cosine"] >= before["min_cosine"] and after["min_top1_agreement"] >= before["min_top1_agreement"]
        assert after["worst_rel_error_l2"] < before["worst_rel_error_l2"]
    else:
        assert after == before


def test_finetuned_model_differs_and_is_closer_on_fresh_samples(run_main, mlp):
    model, calib, out = mlp
    _ok(run_main("prune", model, "-o", out / "p0.onnx", "--calib", calib, "--finetune", "0", *FT, "--verify"))
    _ok(run_main("prune", model, "-o", out / "p1.onnx", "--calib", calib, "--finetune", STEPS, *FT, "--verify",
                 "--report", out / "r.json", "--save-plan", out / "plan.json"))
    assert _strict(out / "r.json")["finetune"]["best_step"] > 0, "nothing improved: the test would not say anything"
    p0, p1 = onnx.load(str(out / "p0.onnx")), onnx.load(str(out / "p1.onnx"))
    a, b = inits(p0), inits(p1)
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)  # same graph, same shapes
    assert any(not np.array_equal(a[k], b[k]) for k in a)  # other values
    onnx.checker.check_model(p1, full_check=True)
    fresh = {"x": np.random.default_rng(99).standard_normal((300, 8)).astype(np.float32)}
    kl0, kl1 = _kl(str(model), p0, fresh), _kl(str(model), p1, fresh)
    assert kl1 < kl0, (kl0, kl1)
    # the standalone verify masks the untouched original: it accepts the unfinetuned model, and tells
    # the finetuned one apart (verified by prune against the original rebuilt from its weights)
    assert run_main("verify", model, out / "p0.onnx", "--plan", out / "plan.json", "--ep", "cpu").returncode == 0
    assert run_main("verify", model, out / "p1.onnx", "--plan", out / "plan.json", "--ep", "cpu").returncode == 1


def test_finetune_refusals(run_main, mlp, monkeypatch):
    model, calib, out = mlp
    r = run_main("prune", model, "-o", out / "p.onnx", "--ratio", "0.5", "--finetune", "10")
    _refused(r, out, "--finetune needs calibration data (--calib or --calib-images)")
    r = run_main("prune", model, "-o", out / "p.onnx", "--ratio", "0.5", "--calib", calib, "--finetune-lr", "0.1")
    _refused(r, out, "--finetune-lr", "--finetune N")
    _refused(run_main("prune", model, "-o", out / "p.onnx", "--calib", calib, "--finetune", "-1"), out, "--finetune")
    _refused(run_main("prune", model, "-o", out / "p.onnx", "--calib", calib, "--finetune", "5",
                      "--finetune-lr", "0"), out, "--finetune-lr")
    monkeypatch.setattr(distill, "torch_exec", None)  # as without torch installed
    monkeypatch.setattr(distill, "_NO_TORCH", "torch is not installed (pip install onnxprune[torch])", raising=False)
    r = run_main("prune", model, "-o", out / "p.onnx", "--ratio", "0.5", "--calib", calib, "--finetune", "5",
                 "--report", out / "r.json")
    _refused(r, out, "torch is not installed")


@pytest.mark.parametrize("mode", ["recompute", "match", "off"])
def test_bn_stats_reaches_compensation(run_main, bn_cnn, mode):
    model, calib, out = bn_cnn
    r = run_main("prune", model, "-o", out / "p.onnx", "--ratio", "0.5", "--calib", calib, "--bn-stats", mode,
                 "--verify", "--ep", "cpu", "--report", out / "r.json")
    _ok(r)
    rep = _strict(out / "r.json")
    comp = rep["compensation"]
    assert rep["verification"]["passed"] and max(o["rel_error"] for o in rep["verification"]["outputs"]) < 1e-5
    p, o = inits(onnx.load(str(out / "p.onnx"))), inits(onnx.load(str(model)))
    if mode == "off":
        assert comp["batchnorms"] == [] and "BatchNorm statistics" not in r.stdout
        assert np.isin(p["mean"], o["mean"]).all() and np.isin(p["var"], o["var"]).all()  # the original's, sliced
        return
    assert comp["bn_stats"] == mode
    (bn,) = comp["batchnorms"]
    assert (bn["mode"], bn["how"]) == (mode, "recomputed") and bn["after"]
    word = "matched" if mode == "match" else "recomputed"
    assert f"BatchNorm statistics ({mode}): 1 {word}" in r.stdout
    assert not np.isin(p["mean"], o["mean"]).all()  # the statistics moved


def test_bn_stats_recompute_differs_from_match_and_is_frozen_by_finetune(run_main, bn_cnn):
    model, calib, out = bn_cnn
    for mode in ("match", "recompute"):
        _ok(run_main("prune", model, "-o", out / f"{mode}.onnx", "--ratio", "0.5", "--calib", calib, "--bn-stats", mode,
                     "--ep", "cpu", "--verify", "--save-plan", out / f"{mode}.json"))
    m, rc = inits(onnx.load(str(out / "match.onnx"))), inits(onnx.load(str(out / "recompute.onnx")))
    assert json.loads((out / "match.json").read_text())["groups"] == json.loads((out / "recompute.json").read_text())["groups"]
    assert not np.allclose(m["mean"], rc["mean"]) or not np.allclose(m["var"], rc["var"])
    r = run_main("prune", model, "-o", out / "ft.onnx", "--ratio", "0.5", "--calib", calib, "--bn-stats", "recompute",
                 "--finetune", "8", "--ep", "cpu", "--verify", "--report", out / "ft.json")
    _ok(r)
    ft = _strict(out / "ft.json")["finetune"]
    assert "running mean" in ft["frozen"].get("mean", "") and "running variance" in ft["frozen"].get("var", "")
    assert ft["frozen_constants"] >= 2 and sum(ft["frozen_reasons"].values()) == ft["frozen_constants"]
    if ft["best_step"] > 0:  # the trained model keeps the recomputed statistics
        f = inits(onnx.load(str(out / "ft.onnx")))
        assert np.array_equal(f["mean"], rc["mean"]) and np.array_equal(f["var"], rc["var"])


def test_bn_stats_refusals(run_main, bn_cnn):
    model, calib, out = bn_cnn
    _refused(run_main("prune", model, "-o", out / "p.onnx", "--calib", calib, "--bn-stats", "sometimes"), out,
             "--bn-stats")
    _refused(run_main("prune", model, "-o", out / "p.onnx", "--ratio", "0.5", "--bn-stats", "recompute"), out,
             "--bn-stats", "compensation")
    _refused(run_main("prune", model, "-o", out / "p.onnx", "--ratio", "0.5", "--calib", calib, "--compensate", "none",
                      "--bn-stats", "recompute"), out, "--bn-stats")


@pytest.mark.parametrize("target", [("--target-fidelity", "0.9", "--metric", "cosine"), ("--target-macs", "0.6")],
                         ids=["fidelity", "macs"])
def test_target_search_finetunes_the_chosen_plan_once(run_main, mlp, monkeypatch, target):
    model, calib, out = mlp
    calls = []
    real = distill.finetune

    def counted(*args, **kwargs):
        calls.append(args[4].n)  # the fit share
        return real(*args, **kwargs)

    monkeypatch.setattr(distill, "finetune", counted)
    r = run_main("prune", model, "-o", out / "p.onnx", "--calib", calib, "--holdout", "0.5", "--compensate", "none",
                 *target, "--finetune", "20", "--ep", "cpu", "--verify", "--report", out / "r.json")
    _ok(r)
    assert calls == [200]
    rep = _strict(out / "r.json")
    assert rep["finetune"]["steps"] == 20 and rep["verification"]["passed"]
    evs = rep["target"]["evaluations"]
    assert len(evs) > 1
    if target[0] == "--target-fidelity":  # every evaluation measured unfinetuned: the chosen one is "before"
        chosen = rep["target"]["chosen"]
        assert chosen["fidelity"] == rep["fidelity_before"]["summary"]
        assert math.isclose(chosen["value"], rep["fidelity_before"]["summary"]["min_cosine"])
