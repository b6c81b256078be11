"""``prune --steps K``: iterative pruning (Torch-Pruning's ``iterative_steps``, linear schedule).

How it can fail: the steps compound to more (or less) than the one-shot ratio (the final unit counts
must be the one-shot run's, read independently from the saved models' initializer shapes); a step
is not verified, or not against its own masked original; the stats or the held-out fidelity are of
the last intermediate model instead of the original; ``--steps 1`` changes the one-shot result (it
must be the same bytes); misuse is one line, exit 2, nothing written."""

from __future__ import annotations

import json
import math
import pathlib

import onnx
import pytest

from onnxprune import pipeline
from onnxprune.measure.fidelity import measure_fidelity
from onnxprune.runtime.calib import CalibSpec, open_calib


def _out(tmp_path) -> pathlib.Path:
    d = tmp_path / "out"
    d.mkdir(exist_ok=True)
    return d


def _ok(r) -> None:
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])


def _shapes(path) -> dict[str, list[int]]:
    return {t.name: list(t.dims) for t in onnx.load(str(path)).graph.initializer}


@pytest.mark.parametrize("ratio,steps", [(0.5, 3), (0.3, 2), (0.7, 4), (0.5, 1)])
def test_schedule_compounds_to_the_ratio(ratio, steps):
    keeps = [1.0 - pipeline.step_ratio(ratio, k, steps) for k in range(1, steps + 1)]
    assert math.prod(keeps) == pytest.approx(1.0 - ratio)
    for k in range(1, steps + 1):
        assert math.prod(keeps[:k]) == pytest.approx(1.0 - ratio * k / steps)
    assert pipeline.step_ratio(0.0, 1, 3) == 0.0


@pytest.mark.parametrize("data", [False, True], ids=["weights", "calib"])
def test_three_steps_verified_and_same_counts_as_one_shot(run_main, tmp_path, grad_cnn, data):
    model, calib = grad_cnn
    out = _out(tmp_path)
    extra = ("--calib", calib) if data else ()
    _ok(run_main("prune", model, "-o", out / "one.onnx", "--ratio", "0.5", *extra))
    r = run_main("prune", model, "-o", out / "s3.onnx", "--ratio", "0.5", "--steps", "3", "--verify", *extra,
                 "--report", out / "r.json")
    _ok(r)
    assert "PASSED" in r.stdout
    for k in (1, 2, 3):
        assert f"step {k}/3:" in r.stdout
    rep = json.loads((out / "r.json").read_text())
    steps = rep["steps"]
    assert [s["step"] for s in steps] == [1, 2, 3]
    assert all(s["verification"]["passed"] for s in steps)
    assert all(s["verification"]["rel_error"] < 1e-4 for s in steps)
    for a, b in zip(steps, steps[1:], strict=False):
        assert b["macs_before"] == a["macs_after"] and b["macs_after"] < b["macs_before"]
    assert steps[0]["ratio"] == pytest.approx(1 / 6) and steps[2]["ratio"] == pytest.approx(0.25)
    # the unit counts a one-shot --ratio 0.5 keeps, read from the saved models
    orig, one, it = _shapes(model), _shapes(out / "one.onnx"), _shapes(out / "s3.onnx")
    assert it == one
    assert any(it[n] != orig[n] for n in orig if n in it)
    # stats against the original, not the last intermediate model
    orig_macs = rep["stats"]["original"]["macs"]
    assert orig_macs == steps[0]["macs_before"] and rep["stats"]["pruned"]["macs"] == steps[-1]["macs_after"]
    if data:
        crit = {s["importance"] for s in steps}
        assert len(crit) == 1 and crit <= {"recon", "act", "act-var"}
        assert "compensation" in rep
        # held-out fidelity of the final model against the ORIGINAL, measured here independently
        original = onnx.load(str(model))
        cd = open_calib(original, CalibSpec(path=str(calib)))
        fid = measure_fidelity(original, onnx.load(str(out / "s3.onnx")), cd.holdout, ep="cpu")
        got = rep["fidelity"]["outputs"][0]["rel_error_l2"]
        assert got == pytest.approx(fid.outputs[0].rel_error_l2, rel=1e-3, abs=1e-6)
        assert got > 0


@pytest.mark.parametrize("data", [False, True], ids=["weights", "calib"])
def test_one_step_is_the_one_shot_result(run_main, tmp_path, grad_cnn, data):
    model, calib = grad_cnn
    out = _out(tmp_path)
    extra = ("--calib", calib) if data else ()
    _ok(run_main("prune", model, "-o", out / "a.onnx", "--ratio", "0.5", *extra))
    _ok(run_main("prune", model, "-o", out / "b.onnx", "--ratio", "0.5", "--steps", "1", *extra))
    assert (out / "a.onnx").read_bytes() == (out / "b.onnx").read_bytes()


def test_gradient_criterion_rescored_each_step(run_main, tmp_path, grad_cnn):
    pytest.importorskip("torch")
    model, calib = grad_cnn
    out = _out(tmp_path)
    r = run_main("prune", model, "-o", out / "t.onnx", "--ratio", "0.5", "--steps", "2", "--calib", calib,
                 "--importance", "taylor", "--verify", "--report", out / "r.json")
    _ok(r)
    steps = json.loads((out / "r.json").read_text())["steps"]
    assert [s["importance"] for s in steps] == ["taylor", "taylor"]
    assert all(s["verification"]["passed"] for s in steps)


@pytest.mark.parametrize("flags,word", [
    (("--steps", "0"), "--steps"),
    (("--steps", "-1"), "--steps"),
    (("--steps", "2", "--target-macs", "0.5"), "--target-macs"),
    (("--steps", "2", "--soft"), "--soft"),
    (("--steps", "2", "--calib", "CALIB", "--finetune", "3"), "--finetune"),
    (("--steps", "2", "--save-plan", "OUT/plan.json"), "--save-plan"),
])
def test_refusals(run_main, tmp_path, grad_cnn, flags, word):
    model, calib = grad_cnn
    out = _out(tmp_path)
    flags = [str(calib) if f == "CALIB" else f.replace("OUT", str(out)) for f in flags]
    r = run_main("prune", model, "-o", out / "p.onnx", "--ratio", "0.5", *flags)
    assert "Traceback" not in r.stderr, r.stderr
    assert r.returncode == 2, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and word in lines[0], r.stderr
    assert list(out.iterdir()) == []
