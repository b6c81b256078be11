"""``prune --importance taylor|hessian|fisher|group-fisher|lamp|fpgm`` through the command line
(planning.plan, pipeline.gradient_scores_for, cli/args.py GradientArgs).

How each check can fail:
- every criterion runs with ``--verify`` on a CNN with BatchNorm, a residual Add and a depthwise
  convolution, passes, and its report names the criterion with no group left to l2;
- the gradient criteria are really what ranks: a planted channel with the largest weights of its
  group but a dead ReLU (it never reaches the output) is removed by every gradient criterion at a
  one-unit cut, and kept by l2 (the control: a run that fell back to l2 would keep it);
- lamp and fpgm run without calibration data;
- bad requests are one line, exit 2, nothing written: a gradient criterion without data, labels of
  the wrong length or type, options of one criterion given to another;
- a model with an op that has no torch forward warns in one line, is scored by l2 and exits 0;
- ``--target-macs`` collects gradients once for every ratio it evaluates;
- an output produced by a LayerNorm is taken for an embedding (Gaussian likelihood), not a class vector.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

pytest.importorskip("torch")

from onnxprune import pipeline  # noqa: E402
from onnxprune.planning.importance import GRAD_CRITERIA, GRADIENT_IMPORTANCES, TP_WEIGHT_IMPORTANCES  # noqa: E402
from onnxprune.runtime import gradients as rg  # noqa: E402
from onnxprune.testing import graphs  # noqa: E402

CNN = graphs.GRAD_CNN
HEAD = graphs.GRAD_CNN_HEAD

# one group of 8: conv1's filters = the Gemm's inputs; channel DEAD has the largest weights of the
# group on both sides, but a bias that keeps its ReLU at zero on every input
PLANTED = """
<ir_version: 8, opset_import: ["" : 17]>
planted (float[N,3,8,8] x) => (float[N,5] y)
<float[8,3,3,3] w1, float[8] b1, float[5,8] wf, float[5] bf>
{
  c1 = Conv <pads=[1,1,1,1]> (x, w1, b1)
  a1 = Relu (c1)
  p = GlobalAveragePool (a1)
  f = Flatten (p)
  y = Gemm <transB=1> (f, wf, bf)
}
"""
DEAD = 2

CASES = [("taylor", ()), ("taylor", ("--taylor-form", "activation")), ("hessian", ()), ("fisher", ()),
         ("group-fisher", ()), ("group-fisher", ("--normalize", "memory")), ("lamp", ()), ("fpgm", ())]


def _save(model: onnx.ModelProto, path: pathlib.Path) -> pathlib.Path:
    onnx.save(model, str(path))
    return path


def _cnn(tail: str = HEAD) -> onnx.ModelProto:
    return graphs.build(CNN.replace("TAIL", tail), positive=("v1",), seed=0)


@pytest.fixture
def cnn(tmp_path):
    model = _save(_cnn(), tmp_path / "cnn.onnx")
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.random.default_rng(1).standard_normal((40, 3, 8, 8)).astype(np.float32))
    return model, calib


def _out(tmp_path) -> pathlib.Path:
    d = tmp_path / "out"
    d.mkdir(exist_ok=True)
    return d


def _refused(r, out_dir: pathlib.Path, *words: str) -> str:
    assert "Traceback" not in r.stderr, r.stderr
    assert r.returncode == 2, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("onnxprune: error:"), r.stderr
    assert list(out_dir.iterdir()) == [], "a file was written"
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


def test_names_are_one_list():
    from onnxprune.planning import grad_importance as gi

    # the scorer uses the very tuples the CLI offers (declared once), not copies that could drift
    assert gi.GRAD_CRITERIA is GRAD_CRITERIA and gi.GRADIENT_IMPORTANCES is GRADIENT_IMPORTANCES
    assert set(TP_WEIGHT_IMPORTANCES) <= set(GRAD_CRITERIA)


@pytest.mark.parametrize(("kind", "extra"), CASES, ids=[k + "".join(e[1:]) for k, e in CASES])
def test_every_criterion_prunes_verified_and_is_reported(run_main, tmp_path, cnn, kind, extra):
    model, calib = cnn
    out = _out(tmp_path)
    data = ("--calib", calib, "--holdout", "0.25") if kind in GRADIENT_IMPORTANCES else ()
    r = run_main("prune", model, "-o", out / "p.onnx", "--ratio", "0.5", "--importance", kind, *extra, *data,
                 "--verify", "--ep", "cpu", "--report", out / "r.json")
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    assert "PASSED" in r.stdout
    rep = json.loads((out / "r.json").read_text())
    imp = rep["importance"]
    assert imp["criterion"] == kind
    assert imp["groups"] == len(rep["plan"]["groups"]) > 0
    assert imp["disabled"] is None and imp["fallback_l2"] == 0, imp
    assert f"importance {kind}: {imp['groups']} of {imp['groups']} groups scored" in r.stdout
    assert rep["plan"]["options"]["importance"] == kind
    if kind in GRADIENT_IMPORTANCES:
        assert imp["gradients"]["samples"] == 30  # the fit share: 40 - ceil(0.25 * 40)
        assert imp["gradients"]["settings"]["loss"] == "pseudo"
        assert "argmax" in imp["gradients"]["loss"]["y"]  # classifier-shaped: cross-entropy
    else:
        assert imp["gradients"] is None
    assert rep["stats"]["pruned"]["macs"] < rep["stats"]["original"]["macs"]


@pytest.fixture
def planted(tmp_path):
    model = graphs.build(PLANTED, seed=3)
    for init in model.graph.initializer:
        a = numpy_helper.to_array(init).copy()
        if init.name == "w1":
            a[DEAD] = 3.0 * np.abs(a).max()  # every input of the filter positive, and large
        elif init.name == "b1":
            a[DEAD] = -1e4  # its ReLU never opens on standard-normal inputs
        elif init.name == "wf":
            a[:, DEAD] = 3.0 * np.abs(a).max()
        init.CopyFrom(numpy_helper.from_array(a, init.name))
    path = _save(model, tmp_path / "planted.onnx")
    calib = tmp_path / "planted.npz"
    np.savez(calib, x=np.random.default_rng(2).standard_normal((24, 3, 8, 8)).astype(np.float32))
    return path, calib


def _kept(run_main, tmp_path, planted, importance, *extra) -> list[int]:
    model, calib = planted
    out = _out(tmp_path)
    plan = out / f"plan-{importance}{''.join(extra)}.json"
    r = run_main("prune", model, "-o", out / "p.onnx", "--ratio", "0.125", "--importance", importance, *extra,
                 "--calib", calib, "--compensate", "none", "--ep", "cpu", "--verify", "--save-plan", plan)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    groups = json.loads(plan.read_text())["groups"]
    assert len(groups) == 1 and groups[0]["channels"] == 8 and len(groups[0]["keep"]) == 7
    return groups[0]["keep"]


@pytest.mark.parametrize(("kind", "extra"), [c for c in CASES if c[0] in GRADIENT_IMPORTANCES],
                         ids=[k + "".join(e[1:]) for k, e in CASES if k in GRADIENT_IMPORTANCES])
def test_gradient_criteria_remove_the_dead_channel_that_l2_keeps(run_main, tmp_path, planted, kind, extra):
    assert DEAD in _kept(run_main, tmp_path, planted, "l2")  # the control: by its weights it is the most important
    assert DEAD not in _kept(run_main, tmp_path, planted, kind, *extra)


def test_lamp_and_fpgm_need_no_data_and_gradient_criteria_do(run_main, tmp_path, cnn):
    model, _ = cnn
    out = _out(tmp_path)
    for kind in TP_WEIGHT_IMPORTANCES:
        r = run_main("prune", model, "-o", out / f"{kind}.onnx", "--importance", kind, "--verify", "--ep", "cpu")
        assert r.returncode == 0 and "PASSED" in r.stdout, r.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    for kind in GRADIENT_IMPORTANCES:
        r = run_main("prune", model, "-o", empty / "p.onnx", "--importance", kind, "--ep", "cpu")
        _refused(r, empty, f"--importance {kind}", "needs calibration data")


@pytest.mark.parametrize(("args", "words"), [
    (("--importance", "l2", "--taylor-form", "activation"), ("--taylor-form", "not to --importance l2")),
    (("--importance", "fisher", "--taylor-form", "param"), ("--taylor-form", "taylor")),
    (("--importance", "taylor", "--normalize", "memory"), ("--normalize", "group-fisher")),
    (("--importance", "group-fisher", "--group-reduction", "max"), ("--group-reduction", "group-fisher")),
    (("--importance", "lamp", "--normalizer", "max"), ("--normalizer", "lamp")),
    (("--importance", "act-var", "--grad-loss", "sampled"), ("--grad-loss", "act-var")),
    (("--importance", "lamp", "--grad-batch", "4"), ("--grad-batch", "lamp")),
    (("--importance", "taylor", "--labels", "LABELS", "--grad-loss", "sampled"), ("--labels",)),
])
def test_bad_combinations_are_one_line(run_main, tmp_path, cnn, args, words):
    model, calib = cnn
    labels = tmp_path / "labels.npy"
    np.save(labels, np.zeros(40, np.int64))
    out = _out(tmp_path)
    args = tuple(str(labels) if a == "LABELS" else a for a in args)
    r = run_main("prune", model, "-o", out / "p.onnx", "--calib", calib, "--ep", "cpu", *args)
    _refused(r, out, *words)


def test_labels_are_checked_and_used(run_main, tmp_path, cnn):
    model, calib = cnn
    out = _out(tmp_path)
    for name, arr, words in (("short", np.zeros(39, np.int64), ("39 labels", "40 samples")),
                             ("float", np.zeros(40, np.float32), ("integer",)),
                             ("negative", -np.ones(40, np.int64), (">= 0",))):
        path = tmp_path / f"{name}.npy"
        np.save(path, arr)
        r = run_main("prune", model, "-o", out / "p.onnx", "--importance", "fisher", "--labels", path,
                     "--calib", calib, "--ep", "cpu")
        _refused(r, out, "--labels", *words)
    good = tmp_path / "good.npy"
    np.save(good, np.random.default_rng(0).integers(0, 5, 40))
    r = run_main("prune", model, "-o", out / "p.onnx", "--importance", "fisher", "--labels", good, "--calib", calib,
                 "--ep", "cpu", "--verify", "--report", out / "r.json")
    assert r.returncode == 0, r.stderr
    g = json.loads((out / "r.json").read_text())["importance"]["gradients"]
    assert "given labels" in g["loss"]["y"] and g["settings"]["labels"] == 40


def test_op_without_torch_forward_falls_back_to_l2_with_a_warning(run_main, tmp_path):
    """tf_crop_and_resize has no torch forward (runtime.torch_exec): it sits after the pruned groups."""
    model = _cnn(tail="u = Resize <mode=\"linear\", coordinate_transformation_mode=\"tf_crop_and_resize\"> "
                      "(a4, roi, sc)\n  q = GlobalAveragePool (u)\n  g2 = Flatten (q)\n"
                      "  y = Gemm <transB=1> (g2, wf, bf)")
    model.graph.initializer.extend([numpy_helper.from_array(np.array([0, 0, 0, 0, 1, 1, 1, 1], np.float32), "roi"),
                                    numpy_helper.from_array(np.ones(4, np.float32), "sc")])
    path = _save(model, tmp_path / "resize.onnx")
    calib = tmp_path / "c.npz"
    np.savez(calib, x=np.random.default_rng(1).standard_normal((12, 3, 8, 8)).astype(np.float32))
    out = _out(tmp_path)
    r = run_main("prune", path, "-o", out / "p.onnx", "--importance", "group-fisher", "--calib", calib,
                 "--ep", "cpu", "--verify", "--report", out / "r.json")
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    warn = [line for line in r.stdout.splitlines() if line.startswith("warning: gradient criteria disabled")]
    assert len(warn) == 1 and "Resize" in warn[0] and warn[0].endswith("; scored by l2"), r.stdout
    imp = json.loads((out / "r.json").read_text())["importance"]
    assert "Resize" in imp["disabled"] and imp["fallback_l2"] == imp["groups"] > 0
    assert "PASSED" in r.stdout


def test_target_macs_collects_gradients_once(run_main, tmp_path, cnn, monkeypatch):
    model, calib = cnn
    calls = []
    real = rg.collect_gradients

    def counted(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(rg, "collect_gradients", counted)
    out = _out(tmp_path)
    r = run_main("prune", model, "-o", out / "p.onnx", "--importance", "group-fisher", "--target-macs", "0.6",
                 "--calib", calib, "--ep", "cpu", "--verify", "--report", out / "r.json")
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    rep = json.loads((out / "r.json").read_text())
    assert len(rep["target"]["evaluations"]) > 2 and len(calls) == 1
    assert rep["stats"]["pruned"]["macs"] <= 0.6 * rep["stats"]["original"]["macs"]
    assert rep["importance"]["criterion"] == "group-fisher"


def test_layernorm_output_is_an_embedding_not_a_class_vector(tmp_path):
    """[N, 12] after a LayerNormalization is classifier-shaped by the rule; it gets the Gaussian loss."""
    tail = ("e = Gemm <transB=1> (f, we, be)\n  y = LayerNormalization <axis=-1> (e, lg, lb)")
    text = CNN.replace("TAIL", tail).replace("float[N,5] y", "float[N,12] y").replace(
        "float[5,12] wf, float[5] bf", "float[12,12] we, float[12] be, float[12] lg, float[12] lb")
    model = graphs.build(text, positive=("v1",), seed=0)
    assert pipeline.embedding_outputs(model) == {"y": False}
    assert pipeline.embedding_outputs(_cnn()) == {}
    an = pipeline.analyze_model(model)
    calib = tmp_path / "c.npz"
    np.savez(calib, x=np.random.default_rng(1).standard_normal((8, 3, 8, 8)).astype(np.float32))
    from onnxprune.planning.options import PlanOptions
    from onnxprune.runtime.calib import CalibSpec, open_calib

    view = open_calib(an.model, CalibSpec(path=str(calib), holdout=0.25)).fit
    sc = pipeline.gradient_scores_for(an, view, PlanOptions(importance="fisher"))
    assert sc.disabled is None and sc.gradients["loss"]["y"].startswith("gaussian"), sc.gradients


def test_softmax_written_out_stays_a_class_vector():
    """Exp / ReduceSum (jax2tf's softmax, magika's output) divides by a computed tensor, but is a softmax."""
    tail = ("e = Gemm <transB=1> (f, wf, bf)\n  z = Exp (e)\n  s = ReduceSum <keepdims=1> (z, ax)\n"
            "  y = Div (z, s)")
    model = graphs.build(CNN.replace("TAIL", tail), positive=("v1",), seed=0)
    model.graph.initializer.append(numpy_helper.from_array(np.array([-1], np.int64), "ax"))
    assert pipeline.embedding_outputs(model) == {}
    norm = ("e = Gemm <transB=1> (f, wf, bf)\n  z = Mul (e, e)\n  s = ReduceSum <keepdims=1> (z, ax)\n"
            "  y = Div (e, s)")  # divided by a computed norm: an embedding
    model = graphs.build(CNN.replace("TAIL", norm), positive=("v1",), seed=0)
    assert pipeline.embedding_outputs(model) == {"y": False}
