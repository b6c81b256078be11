"""Tests of the ``onnxprune`` command line: exit codes, one-line errors, nothing written on failure,
the prune -> verify -> replay round trip, planted dead channels, groups/inspect/bench/demo, and the
argument groups every option belongs to (cli/args.py).

Exit codes (onnxprune/cli/__init__.py): 0 ok, 1 verification failed, 2 user error, 3 nothing to prune,
4 refused rewrite. User errors are exactly one line on stderr starting with ``onnxprune: error:``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import re
import tempfile

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import onnxprune.analysis.analyze
import onnxprune.cli
import onnxprune.measure.verify
import onnxprune.pipeline
from onnxprune.cli import COMMANDS
from onnxprune.cli.args import ArgGroup
from onnxprune.errors import NothingToPrune, UserError
from onnxprune.planning.importance import IMPORTANCES
from onnxprune.planning.options import PlanOptions
from onnxprune.runtime.session import cuda_available
from onnxprune.testing import from_text
from onnxprune.testing.synth import external_mlp

# ----------------------------------------------------------------------------------------------
# helpers


def _listing(d: pathlib.Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def assert_user_error(proc, code: int = 2) -> str:
    """Exit ``code``, exactly one non-empty stderr line starting 'onnxprune: error:', no traceback."""
    assert "Traceback" not in proc.stdout and "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == code, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("onnxprune: error:") and lines[0][len("onnxprune: error:"):].strip()
    return lines[0]


class Snapshot:
    """Bytes of the input and the listings of the input and output directories."""

    def __init__(self, model: pathlib.Path | None, *dirs: pathlib.Path):
        self.model = model
        self.data = model.read_bytes() if model is not None and model.exists() else None
        self.dirs = {d: _listing(d) for d in dirs}

    def assert_unchanged(self) -> None:
        if self.data is not None:
            assert self.model.read_bytes() == self.data, "input model was modified"
        for d, names in self.dirs.items():
            assert _listing(d) == names, f"files appeared/disappeared in {d}"


def _initializers(path) -> dict[str, np.ndarray]:
    m = onnx.load(str(path))
    return {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    assert a.shape == b.shape
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def _really_unwritable(d: pathlib.Path) -> bool:
    try:
        fd, name = tempfile.mkstemp(dir=d)
    except OSError:
        return True
    os.close(fd)
    os.unlink(name)
    return False


# ----------------------------------------------------------------------------------------------
# 1. bad input: exit 2, one line, nothing written, input untouched


def test_missing_input(run_cli, tmp_path, out_dir):
    snap = Snapshot(None, tmp_path, out_dir)
    proc = run_cli("prune", tmp_path / "missing.onnx", "-o", out_dir / "o.onnx")
    msg = assert_user_error(proc)
    assert "missing.onnx" in msg
    snap.assert_unchanged()


def test_input_not_onnx(run_cli, tmp_path, out_dir):
    src = tmp_path / "src"
    src.mkdir()
    junk = src / "junk.onnx"
    rng = np.random.default_rng(0)
    junk.write_text(" ".join(f"word{rng.integers(1e6)}" for _ in range(200)) + "\n")
    snap = Snapshot(junk, src, out_dir)
    assert_user_error(run_cli("prune", junk, "-o", out_dir / "o.onnx"))
    snap.assert_unchanged()


@pytest.mark.parametrize("which", ["small", "resnet18"])
def test_input_truncated(run_cli, small_onnx, out_dir, which, request):
    real = small_onnx if which == "small" else request.getfixturevalue("resnet18_onnx")
    data = real.read_bytes()
    trunc = small_onnx.parent / "trunc.onnx"
    trunc.write_bytes(data[: len(data) // 2])
    snap = Snapshot(trunc, small_onnx.parent, out_dir)
    assert_user_error(run_cli("prune", trunc, "-o", out_dir / "o.onnx", "--verify"))
    snap.assert_unchanged()


# (arguments, run as a subprocess?): the rest run in-process through onnxprune.cli.main (faster)
BAD_ARGS = {
    "ratio_1.0": (["--ratio", "1.0"], True),
    "ratio_-0.1": (["--ratio=-0.1"], True),
    "ratio_1.5": (["--ratio", "1.5"], True),
    "ratio_nan": (["--ratio", "nan"], False),
    "layer_ratio_regex_matches_nothing": (["--layer-ratio", "nomatch.*=0.5"], True),
    "layer_ratio_bad_regex": (["--layer-ratio", "[=0.5"], False),
    "layer_ratio_out_of_range": (["--layer-ratio", "conv1=1.0"], False),
    "ignore_matches_nothing": (["--ignore", "nomatch"], True),
    "input_shape_not_integers": (["--input-shape", "x=1xAx16x16"], True),
    "input_shape_no_equals": (["--input-shape", "1x3x16x16"], False),
    "input_shape_empty_dims": (["--input-shape", "x="], False),
    "load_plan_missing": (["--load-plan", "{tmp}/nope.json"], True),
    "load_plan_not_json": (["--load-plan", "{model}"], True),
    "load_plan_json_not_a_plan": (["--load-plan", "{tmp}/list.json"], False),
    "unknown_flag": (["--no-such-flag"], True),
    "bad_importance_choice": (["--importance", "l3"], False),
    "round_to_zero": (["--round-to", "0"], False),
    "abbreviated_option": (["--rati", "0.5"], False),  # no abbreviations: a new option could change their meaning
    "tol_nan": (["--tol", "nan"], False),
}


@pytest.mark.parametrize("case", list(BAD_ARGS))
def test_bad_arguments(run_cli, run_main, small_onnx, out_dir, tmp_path, case):
    (tmp_path / "list.json").write_text("[1, 2]")
    extra, subprocess = BAD_ARGS[case]
    args = [a.format(tmp=tmp_path, model=small_onnx) for a in extra]
    snap = Snapshot(small_onnx, small_onnx.parent, out_dir)
    msg = assert_user_error((run_cli if subprocess else run_main)(
        "prune", small_onnx, "-o", out_dir / "o.onnx", "--verify", "--report", out_dir / "r.json",
        "--save-plan", out_dir / "p.json", *args))
    if case.startswith(("layer_ratio_regex", "ignore")):
        assert "matches no node" in msg
    snap.assert_unchanged()
    assert _listing(out_dir) == []


def test_argparse_error_missing_output(run_cli, small_onnx, out_dir):
    snap = Snapshot(small_onnx, small_onnx.parent, out_dir)
    assert_user_error(run_cli("prune", small_onnx))
    snap.assert_unchanged()


@pytest.mark.parametrize("spelling", ["same", "dot_slash", "absolute", "dotdot", "symlink"])
def test_output_equals_input(run_cli, small_onnx, spelling):
    src = small_onnx.parent
    if spelling == "symlink":
        (src / "link.onnx").symlink_to("small.onnx")
    inp, out = {
        "same": ("small.onnx", "small.onnx"),
        "dot_slash": ("small.onnx", "./small.onnx"),
        "absolute": ("./small.onnx", str(small_onnx.resolve())),
        "dotdot": ("small.onnx", f"../{src.name}/small.onnx"),
        "symlink": ("small.onnx", "link.onnx"),
    }[spelling]
    snap = Snapshot(small_onnx, src)
    msg = assert_user_error(run_cli("prune", inp, "-o", out, "--verify", cwd=src))
    assert "input" in msg
    snap.assert_unchanged()


def test_output_directory_missing(run_cli, small_onnx, out_dir):
    snap = Snapshot(small_onnx, small_onnx.parent, out_dir)
    msg = assert_user_error(run_cli("prune", small_onnx, "-o", out_dir / "nodir" / "o.onnx"))
    assert "does not exist" in msg
    snap.assert_unchanged()


def test_output_is_a_directory(run_main, small_onnx, out_dir):
    snap = Snapshot(small_onnx, small_onnx.parent, out_dir)
    assert_user_error(run_main("prune", small_onnx, "-o", out_dir))
    snap.assert_unchanged()


def test_output_directory_unwritable(run_cli, small_onnx, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        if _really_unwritable(ro):
            target = ro
        elif pathlib.Path("/proc/self").is_dir() and _really_unwritable(pathlib.Path("/proc/self")):
            # running as root: chmod does not stop writes; /proc/self refuses file creation for root too
            target = pathlib.Path("/proc/self")
        else:
            pytest.skip("no directory that refuses writes for this user")
        snap = Snapshot(small_onnx, small_onnx.parent, *([ro] if target == ro else []))
        msg = assert_user_error(run_cli("prune", small_onnx, "-o", target / "o.onnx", "--verify"))
        assert "writable" in msg
        assert not (target / "o.onnx").exists()
        snap.assert_unchanged()
    finally:
        ro.chmod(0o755)


def _lying_directory() -> pathlib.Path | None:
    """A directory that os.access() calls writable but where files cannot be created (root on sysfs)."""
    for d in ("/sys", "/proc", "/sys/kernel"):
        p = pathlib.Path(d)
        if p.is_dir() and os.access(p, os.W_OK) and _really_unwritable(p):
            return p
    return None


@pytest.mark.skipif(_lying_directory() is None, reason="no directory where os.access() and writes disagree")
def test_output_directory_unwritable_despite_os_access(run_cli, small_onnx):
    d = _lying_directory()
    snap = Snapshot(small_onnx, small_onnx.parent)
    assert_user_error(run_cli("prune", small_onnx, "-o", d / "onnxprune_test_out.onnx"))
    snap.assert_unchanged()


def test_report_directory_missing(run_main, small_onnx, out_dir):
    snap = Snapshot(small_onnx, small_onnx.parent, out_dir)
    assert_user_error(run_main("prune", small_onnx, "-o", out_dir / "o.onnx", "--report", out_dir / "no" / "r.json"))
    snap.assert_unchanged()


@pytest.mark.parametrize("flag", ["--save-plan", "--report"])
def test_side_output_equal_to_input_never_overwrites(run_main, small_onnx, out_dir, flag):
    snap = Snapshot(small_onnx, small_onnx.parent)
    proc = run_main("prune", small_onnx, "-o", out_dir / "o.onnx", flag, small_onnx)
    try:
        snap.assert_unchanged()
    finally:
        small_onnx.write_bytes(snap.data)
    assert_user_error(proc)


@pytest.mark.parametrize("shape,verify", [
    ("x=-1x3x16x16", False),  # negative dim: numpy ValueError traceback (inspect/prune), exit 1
    ("x=0x3x16x16", True),  # zero batch: onnxruntime InvalidArgument traceback with --verify
    ("x=1x3x16", True),  # wrong rank: onnxruntime InvalidArgument traceback with --verify
    ("x=1x4x16x16", True),  # contradicts the model's static channel dim: traceback with --verify
    ("nope=1x3x16x16", False),  # names no graph input: silently ignored, exit 0, output written
], ids=["negative", "zero", "wrong_rank", "contradicts_model", "unknown_input"])
def test_input_shape_invalid_for_model(run_main, small_onnx, out_dir, shape, verify):
    snap = Snapshot(small_onnx, small_onnx.parent, out_dir)
    proc = run_main("prune", small_onnx, "-o", out_dir / "o.onnx", "--input-shape", shape,
                   *(["--verify"] if verify else []))
    assert_user_error(proc)
    snap.assert_unchanged()


@pytest.mark.parametrize("plan", [
    {"version": 1, "groups": [{}]},
    {"version": 1, "groups": [{"anchor": {"tensor": "w1", "axis": 0}}]},
    {"version": 1, "groups": {"w1": [0, 1]}},
    {"version": 1, "groups": [{"anchor": {"tensor": "w1", "axis": 0}, "keep": "abc"}]},
], ids=["no_anchor", "no_keep", "groups_not_list", "keep_not_ints"])
def test_load_plan_malformed(run_main, small_onnx, out_dir, tmp_path, plan):
    pf = tmp_path / "bad_plan.json"
    pf.write_text(json.dumps(plan))
    snap = Snapshot(small_onnx, small_onnx.parent, out_dir)
    assert_user_error(run_main("prune", small_onnx, "-o", out_dir / "o.onnx", "--load-plan", pf))
    snap.assert_unchanged()


# ----------------------------------------------------------------------------------------------
# 2. nothing to prune: exit 3


def test_nothing_to_prune(run_cli, tmp_path, out_dir, model_builders):
    src = tmp_path / "src"
    src.mkdir()
    single = src / "single.onnx"
    onnx.save(model_builders.single_conv(), str(single))
    snap = Snapshot(single, src, out_dir)
    proc = run_cli("prune", single, "-o", out_dir / "o.onnx", "--verify")
    msg = assert_user_error(proc, code=NothingToPrune.exit_code)
    assert NothingToPrune.exit_code == 3
    assert "nothing to prune" in msg
    assert "graph input" in msg and "graph output" in msg
    snap.assert_unchanged()
    assert _listing(out_dir) == []


# ----------------------------------------------------------------------------------------------
# 3. prune -> report/plan -> verify -> replay


@pytest.fixture(scope="module")
def pruned_small(tmp_path_factory, run_cli, model_builders):
    d = tmp_path_factory.mktemp("pruned_small")
    small = d / "small.onnx"
    onnx.save(model_builders.small_cnn(), str(small))
    proc = run_cli("prune", "small.onnx", "-o", "out.onnx", "--ratio", "0.5", "--verify",
                   "--report", "r.json", "--save-plan", "p.json", cwd=d)
    return d, proc


def test_prune_verify_writes_model_report_plan(pruned_small):
    d, proc = pruned_small
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert _last_line(proc.stdout) == "PASSED"
    onnx.checker.check_model(onnx.load(str(d / "out.onnx")), full_check=True)
    assert not [n for n in _listing(d) if n.startswith(".")], "temp files left behind"

    report = json.loads((d / "r.json").read_text())
    orig, pruned = report["stats"]["original"], report["stats"]["pruned"]
    assert 0 < pruned["macs"] < orig["macs"]
    assert pruned["params"] < orig["params"]
    ver = report["verification"]
    assert ver["passed"] is True
    assert ver["outputs"] and all(o["passed"] and o["rel_error"] < 1e-4 for o in ver["outputs"])
    assert report["output"] == "out.onnx"

    plan = json.loads((d / "p.json").read_text())
    assert plan["version"] == 1 and plan["groups"]
    for g in plan["groups"]:
        assert {"anchor", "keep", "units", "kept_units"} <= set(g)
        assert g["kept_units"] == len(g["keep"]) < g["units"]  # every group of this CNN is pruned 1:1
    # the pruned model has the kept number of channels
    inits = _initializers(d / "out.onnx")
    for g in plan["groups"]:
        assert inits[g["anchor"]["tensor"]].shape[g["anchor"]["axis"]] == len(g["keep"])


def test_verify_command_passes(pruned_small, run_cli):
    d, proc = pruned_small
    assert proc.returncode == 0
    v = run_cli("verify", "small.onnx", "out.onnx", "--plan", "p.json", cwd=d)
    assert v.returncode == 0, v.stderr
    assert _last_line(v.stdout) == "PASSED"


def test_load_plan_replays_identically(pruned_small, run_main, tmp_path):
    d, proc = pruned_small
    assert proc.returncode == 0
    out2 = tmp_path / "out2.onnx"
    # the plan decides, not the (different) options given on the command line
    r = run_main("prune", d / "small.onnx", "-o", out2, "--load-plan", d / "p.json", "--importance", "random",
                "--seed", "7")
    assert r.returncode == 0, r.stderr
    a, b = _initializers(d / "out.onnx"), _initializers(out2)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_verify_against_a_different_plan_fails(pruned_small, run_cli, run_main):
    d, proc = pruned_small
    assert proc.returncode == 0
    r = run_main("prune", "small.onnx", "-o", "rnd.onnx", "--importance", "random", "--seed", "1",
                "--save-plan", "prnd.json", cwd=d)
    assert r.returncode == 0, r.stderr
    keeps = lambda f: [g["keep"] for g in json.loads((d / f).read_text())["groups"]]  # noqa: E731
    assert keeps("prnd.json") != keeps("p.json"), "random plan should differ from the l2 plan"
    v = run_cli("verify", "small.onnx", "out.onnx", "--plan", "prnd.json", cwd=d)
    assert "Traceback" not in v.stderr
    assert v.returncode == 1
    assert _last_line(v.stdout) == "FAILED"
    # and an unpruned "pruned" model cannot pass either
    v = run_main("verify", "small.onnx", "small.onnx", "--plan", "p.json", "--ep", "cpu", cwd=d)
    assert v.returncode == 1 and _last_line(v.stdout) == "FAILED"


# ----------------------------------------------------------------------------------------------
# 4. a failing --verify writes nothing (in-process, verification sabotaged)


def test_verify_failure_exit_1_no_output(monkeypatch, small_onnx, out_dir, capsys):
    monkeypatch.setattr(onnxprune.measure.verify, "masked_original", lambda model, cg, plan: model)
    snap = Snapshot(small_onnx, small_onnx.parent, out_dir)
    rc = onnxprune.cli.main(["prune", str(small_onnx), "-o", str(out_dir / "o.onnx"), "--verify", "--ep", "cpu"])
    cap = capsys.readouterr()
    assert rc == 1
    assert _last_line(cap.out).startswith("FAILED")
    assert "PASSED" not in _last_line(cap.out)
    assert not (out_dir / "o.onnx").exists()
    snap.assert_unchanged()


# ----------------------------------------------------------------------------------------------
# 5. groups / inspect


def test_groups_text_and_json(small_onnx, capsys):
    assert onnxprune.cli.main(["groups", str(small_onnx), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    groups = data["groups"]
    assert groups
    assert {g["status"] for g in groups} == {"prunable", "frozen"}
    for g in groups:
        assert g["members"]
        for m in g["members"]:
            assert isinstance(m["tensor"], str) and isinstance(m["axis"], int)
    # conv1's output channels: w1 rows, BN params, w2 columns, coupled
    g1 = next(g for g in groups if {"tensor": "w1", "axis": 0} in [{k: m[k] for k in ("tensor", "axis")}
                                                                   for m in g["members"]])
    members = {(m["tensor"], m["axis"]) for m in g1["members"]}
    assert {("w1", 0), ("b1", 0), ("s1", 0), ("bb1", 0), ("w2", 1)} <= members
    assert g1["status"] == "prunable"

    assert onnxprune.cli.main(["groups", str(small_onnx)]) == 0
    text = capsys.readouterr().out
    for g in groups:
        assert re.search(rf"^Group {g['id']}: {g['units']} units, {g['status']}\b", text, re.M), g["id"]
    assert "coverage:" in text


def test_inspect_json(small_onnx, capsys):
    assert onnxprune.cli.main(["inspect", str(small_onnx), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["stats"]["macs"] > 0
    cov = rep["coverage"]
    assert 0 < cov["prunable_channels"] <= cov["channels"]
    assert rep["prunable_groups"] >= 1 and rep["groups"] >= rep["prunable_groups"]


# ----------------------------------------------------------------------------------------------
# 6. planted dead channels are exactly what gets removed


def test_planted_dead_channels_small_cnn(run_cli, tmp_path, ort_run, model_builders):
    model = model_builders.planted_cnn(seed=3)
    C = 8
    dead = np.sort(np.random.default_rng(42).permutation(C)[: C // 2])
    alive = np.setdiff1d(np.arange(C), dead)
    inits = {i.name: numpy_helper.to_array(i).copy() for i in model.graph.initializer}
    inits["w1"][dead] = 0
    inits["b1"][dead] = 0
    inits["s1"][dead] = 0
    inits["bb1"][dead] = 0
    inits["wd"][dead] = 0
    inits["w2"][:, dead] = 0
    for init in model.graph.initializer:
        init.CopyFrom(numpy_helper.from_array(inits[init.name], init.name))
    planted = tmp_path / "planted.onnx"
    onnx.save(model, str(planted))

    proc = run_cli("prune", planted, "-o", tmp_path / "p.onnx", "--importance", "l2", "--ratio", "0",
                   "--layer-ratio", "^conv1$=0.5", "--round-to", "1", "--save-plan", tmp_path / "plan.json",
                   "--verify", "--ep", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert _last_line(proc.stdout) == "PASSED"

    plan = json.loads((tmp_path / "plan.json").read_text())
    cut = [g for g in plan["groups"] if g["kept_units"] < g["units"]]
    assert len(cut) == 1
    assert cut[0]["anchor"] == {"tensor": "w1", "axis": 0}
    assert cut[0]["keep"] == alive.tolist()

    pruned = _initializers(tmp_path / "p.onnx")
    assert pruned["w1"].shape[0] == C // 2 and pruned["wd"].shape[0] == C // 2 and pruned["w2"].shape[1] == C // 2
    np.testing.assert_array_equal(pruned["w1"], inits["w1"][alive])
    x = np.random.default_rng(0).standard_normal((1, 3, 16, 16)).astype(np.float32)
    (a,), (b,) = ort_run(tmp_path / "p.onnx", {"x": x}), ort_run(planted, {"x": x})
    assert np.max(np.abs(b)) > 0
    assert _rel(a, b) <= 1e-5


def test_planted_dead_channels_resnet18(run_cli, resnet18_onnx, tmp_path, ort_run):
    model = onnx.load(str(resnet18_onnx))
    nodes = {n.name: n for n in model.graph.node}
    conv1, conv2 = nodes["/layer1/layer1.0/conv1/Conv"], nodes["/layer1/layer1.0/conv2/Conv"]
    w1_name, b1_name, w2_name = conv1.input[1], conv1.input[2], conv2.input[1]
    uses = [i for n in model.graph.node for i in n.input]
    assert all(uses.count(t) == 1 for t in (w1_name, b1_name, w2_name)), "weights are shared"
    inits = {i.name: i for i in model.graph.initializer}
    w1, b1, w2 = (numpy_helper.to_array(inits[t]).copy() for t in (w1_name, b1_name, w2_name))
    C = w1.shape[0]
    assert C == 64 and w2.shape[1] == C
    dead = np.sort(np.random.default_rng(7).permutation(C)[: C // 2])
    alive = np.setdiff1d(np.arange(C), dead)
    w1[dead] = 0
    b1[dead] = 0
    w2[:, dead] = 0
    for name, arr in ((w1_name, w1), (b1_name, b1), (w2_name, w2)):
        inits[name].CopyFrom(numpy_helper.from_array(arr, name))
    planted = tmp_path / "planted_r18.onnx"
    onnx.save(model, str(planted))

    proc = run_cli("prune", planted, "-o", tmp_path / "p.onnx", "--importance", "l2", "--ratio", "0",
                   "--layer-ratio", "^" + re.escape(conv1.name) + "$=0.5", "--round-to", "1",
                   "--save-plan", tmp_path / "plan.json", "--verify", "--ep", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert _last_line(proc.stdout) == "PASSED"
    plan = json.loads((tmp_path / "plan.json").read_text())
    cut = [g for g in plan["groups"] if g["kept_units"] < g["units"]]
    assert len(cut) == 1
    assert cut[0]["anchor"] == {"tensor": w1_name, "axis": 0}
    assert cut[0]["keep"] == alive.tolist()

    pruned = _initializers(tmp_path / "p.onnx")
    np.testing.assert_array_equal(pruned[w1_name], w1[alive])
    np.testing.assert_array_equal(pruned[w2_name], w2[:, alive])
    x = np.random.default_rng(1).standard_normal((2, 3, 224, 224)).astype(np.float32)
    (a,), (b,) = ort_run(tmp_path / "p.onnx", {"input": x}), ort_run(planted, {"input": x})
    assert a.shape == (2, 1000)
    assert _rel(a, b) <= 1e-5


# ----------------------------------------------------------------------------------------------
# 7. demo / bench


def test_demo_help(run_cli):
    proc = run_cli("demo", "--help")
    assert proc.returncode == 0 and proc.stderr == ""
    assert "--arch" in proc.stdout and "--ratio" in proc.stdout


def test_bench_cpu(pruned_small, run_cli, tmp_path):
    d, proc = pruned_small
    assert proc.returncode == 0
    r = run_cli("bench", "small.onnx", "out.onnx", "--ep", "cpu", "--repeat", "3", "--warmup", "1",
                "--report", tmp_path / "b.json", cwd=d)
    assert r.returncode == 0, r.stderr
    assert "speedup" in r.stdout
    lat = json.loads((tmp_path / "b.json").read_text())["latency"]
    assert len(lat) == 2 and all(x["runs"] == 3 and x["ep"] == "cpu" and x["median_ms"] > 0 for x in lat)


@pytest.mark.skipif(cuda_available(), reason="CUDA execution provider is available here")
def test_bench_cuda_unavailable(run_cli, small_onnx):
    snap = Snapshot(small_onnx, small_onnx.parent)
    msg = assert_user_error(run_cli("bench", small_onnx, "--ep", "cuda", "--repeat", "1"))
    assert "cuda" in msg.lower()
    snap.assert_unchanged()


def test_bench_repeat_zero(run_main, small_onnx):
    assert_user_error(run_main("bench", small_onnx, "--ep", "cpu", "--repeat", "0"))


# ----------------------------------------------------------------------------------------------
# 8. argument groups: every option declared once, parsed once, shared by the commands that take it


def _subparsers() -> dict:
    parser = onnxprune.cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def test_every_option_belongs_to_exactly_one_argument_group():
    owner: dict[str, type] = {}
    for cmd in COMMANDS:
        assert cmd.GROUPS and all(isinstance(g, ArgGroup) for g in cmd.GROUPS), cmd.__name__
        for g in cmd.GROUPS:
            for opt in g.options():
                assert owner.setdefault(opt, type(g)) is type(g), f"{opt}: {owner[opt].__name__} and {type(g).__name__}"
    subs = _subparsers()
    for cmd in COMMANDS:
        name = cmd.__name__.rsplit("cmd_", 1)[1]
        declared = {o for a in subs[name]._actions for o in a.option_strings} - {"-h", "--help"}
        from_groups = set().union(*(g.options() for g in cmd.GROUPS))
        assert declared == from_groups, f"{name}: options outside its groups: {declared - from_groups}"


def test_commands_agree_about_every_shared_option():
    seen: dict[str, tuple] = {}
    for name, sp in _subparsers().items():
        for a in sp._actions:
            for opt in a.option_strings:
                # the default may differ per command (bench times longer than sweep), nothing else
                key = (type(a).__name__, a.type, tuple(a.choices) if a.choices else None, a.nargs, a.dest)
                assert seen.setdefault(opt, key) == key, f"{opt} differs in {name}"


def test_importance_choices_come_from_the_criteria():
    for name in ("prune", "sweep", "demo"):
        action = next(a for a in _subparsers()[name]._actions if "--importance" in a.option_strings)
        assert sorted(action.choices) == sorted(IMPORTANCES)


def test_plan_options_are_typed_and_frozen():
    opts = PlanOptions(ratio=0.3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.ratio = 0.5
    with pytest.raises(UserError, match="auto_round_to"):
        PlanOptions(round_to="auto").validate()  # the library takes an int; the CLI resolves 'auto'


@pytest.mark.parametrize("extra", [["--batch", "0"], ["--threads", "-3"], ["--warmup", "0"], ["--repeat", "x"],
                                   ["--target-latency", "0"], ["--target-macs", "nan"], ["--tol", "-1"]],
                         ids=["batch_0", "threads_-3", "warmup_0", "repeat_x", "latency_0", "macs_nan", "tol_-1"])
def test_prune_timing_and_target_options_are_validated(run_cli, run_main, small_onnx, out_dir, extra):
    snap = Snapshot(small_onnx, small_onnx.parent, out_dir)
    run = run_cli if extra[0] == "--batch" else run_main
    msg = assert_user_error(run("prune", small_onnx, "-o", out_dir / "o.onnx", "--target-latency", "0.9", *extra))
    assert extra[0] in msg
    snap.assert_unchanged()
    assert _listing(out_dir) == []


@pytest.mark.parametrize("cmd", ["bench", "sweep"])
@pytest.mark.parametrize("extra", [["--batch", "0"], ["--threads", "-3"]], ids=["batch_0", "threads_-3"])
def test_bench_and_sweep_share_the_timing_checks(run_main, small_onnx, out_dir, cmd, extra):
    snap = Snapshot(small_onnx, small_onnx.parent, out_dir)
    msg = assert_user_error(run_main(cmd, small_onnx, "--ep", "cpu", "--report", out_dir / "r.json", *extra))
    assert extra[0] in msg
    snap.assert_unchanged()


def test_sweep_report_never_overwrites_the_model(run_main, small_onnx):
    snap = Snapshot(small_onnx, small_onnx.parent)
    assert_user_error(run_main("sweep", small_onnx, "--ep", "cpu", "--report", small_onnx))
    snap.assert_unchanged()


def test_report_and_plan_may_not_be_one_file(run_main, small_onnx, out_dir):
    snap = Snapshot(small_onnx, small_onnx.parent, out_dir)
    msg = assert_user_error(run_main("prune", small_onnx, "-o", out_dir / "o.onnx", "--report", out_dir / "x.json",
                                     "--save-plan", out_dir / "x.json"))
    assert "--save-plan" in msg
    snap.assert_unchanged()


def test_report_plan_and_model_files_have_the_same_mode(run_main, small_onnx, out_dir):
    r = run_main("prune", small_onnx, "-o", out_dir / "o.onnx", "--report", out_dir / "r.json",
                 "--save-plan", out_dir / "p.json")
    assert r.returncode == 0, r.stderr
    umask = os.umask(0)
    os.umask(umask)
    modes = {f: (out_dir / f).stat().st_mode & 0o777 for f in ("o.onnx", "r.json", "p.json")}
    assert set(modes.values()) == {0o666 & ~umask}, modes


def test_target_macs_analyses_the_model_once(monkeypatch, small_onnx, out_dir, capsys):
    calls = []

    def counting(original):
        def wrapper(*args, **kwargs):
            calls.append(args[0] if args else kwargs.get("model"))
            return original(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(onnxprune.pipeline, "_analyze", counting(onnxprune.pipeline._analyze))
    monkeypatch.setattr(onnxprune.analysis.analyze, "analyze_model",
                        counting(onnxprune.analysis.analyze.analyze_model))
    rc = onnxprune.cli.main(["prune", str(small_onnx), "-o", str(out_dir / "o.onnx"), "--target-macs", "0.6",
                             "--report", str(out_dir / "r.json")])
    assert rc == 0, capsys.readouterr().err
    assert len(calls) == 1, calls
    report = json.loads((out_dir / "r.json").read_text())
    assert report["stats"]["pruned"]["macs"] <= 0.6 * report["stats"]["original"]["macs"]
    assert report["plan"]["options"]["ratio"] == report["target"]["ratio"]


def test_verbose_prune_lists_the_normalization_changes(run_main, tmp_path, out_dir):
    # an Identity in front of a weight is folded by normalization; -v says so
    p = tmp_path / "id.onnx"
    onnx.save(from_text("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[1,3,8,8] x) => (float[1,4,8,8] y)
    <float[8,3,3,3] w1, float[4,8,1,1] w2>
    { wi = Identity(w1)  c = Conv<pads=[1,1,1,1]>(x, wi)  r = Relu(c)  y = Conv(r, w2) }"""), str(p))
    r = run_main("-v", "prune", p, "-o", out_dir / "o.onnx")
    assert r.returncode == 0, r.stderr
    assert "normalization:" in r.stdout
    quiet = run_main("prune", p, "-o", out_dir / "o2.onnx")
    assert quiet.returncode == 0 and "normalization:" not in quiet.stdout


# ----------------------------------------------------------------------------------------------
# output paths never name a file the input consists of (its external data included)


@pytest.fixture
def ext_model(tmp_path) -> pathlib.Path:
    """An MLP whose weights live in ``in/mlp.onnx.data``."""
    d = tmp_path / "in"
    d.mkdir()
    src = d / "mlp.onnx"
    external_mlp(src, width=16, layers=2)
    return src


@pytest.mark.parametrize("cmd,flag", [
    ("prune", "-o"), ("prune", "--report"), ("prune", "--save-plan"), ("verify", "--report"),
    ("bench", "--report"), ("sweep", "--report"), ("sweep", "--plot"),
])
def test_outputs_never_overwrite_the_inputs_external_data(run_main, ext_model, out_dir, cmd, flag):
    data = ext_model.parent / "mlp.onnx.data"
    snap = Snapshot(data, ext_model.parent, out_dir)
    args = {
        "prune": ["prune", ext_model] + ([] if flag == "-o" else ["-o", out_dir / "p.onnx"]),
        "verify": ["verify", ext_model, ext_model, "--plan", out_dir / "plan.json"],
        "bench": ["bench", ext_model, "--ep", "cpu", "--repeat", "1", "--warmup", "1"],
        "sweep": ["sweep", ext_model, "--ep", "cpu", "--ratios", "0.5", "--repeat", "1", "--warmup", "1"],
    }[cmd]
    proc = run_main(*args, flag, data)
    try:
        snap.assert_unchanged()
    finally:
        data.write_bytes(snap.data)
    msg = assert_user_error(proc)
    assert "mlp.onnx.data" in msg
    if cmd == "bench":  # the pruned model of a pair is an input too
        pruned = ext_model.parent / "p2.onnx"
        external_mlp(pruned, width=16, layers=2, seed=1)
        snap = Snapshot(ext_model.parent / "p2.onnx.data", ext_model.parent)
        assert_user_error(run_main("bench", ext_model, pruned, "--ep", "cpu", "--report", pruned.parent / "p2.onnx.data"))
        snap.assert_unchanged()


def test_output_whose_data_file_is_an_input_file_is_refused(run_main, tmp_path, out_dir):
    """``-o p.onnx`` writes ``p.onnx.data``: refused when the input's weights are that file."""
    d = tmp_path / "in"
    d.mkdir()
    external_mlp(d / "p.onnx", width=16, layers=2)  # weights in in/p.onnx.data
    src = d / "a.onnx"
    (d / "p.onnx").rename(src)  # a.onnx still references p.onnx.data
    data = d / "p.onnx.data"
    snap = Snapshot(data, d)
    proc = run_main("prune", src, "-o", d / "p.onnx", "--ratio", "0.5")
    try:
        snap.assert_unchanged()
    finally:
        data.write_bytes(snap.data)
    msg = assert_user_error(proc)
    assert "p.onnx.data" in msg


def test_side_output_may_not_be_the_outputs_data_file(run_main, small_onnx, out_dir):
    snap = Snapshot(small_onnx, small_onnx.parent, out_dir)
    msg = assert_user_error(run_main("prune", small_onnx, "-o", out_dir / "o.onnx", "--report", out_dir / "o.onnx.data"))
    assert "--report" in msg
    snap.assert_unchanged()
