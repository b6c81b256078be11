"""``prune --soft``, ``--isomorphic``, ``--greedy [--greedy-batch F]`` and ``group-fisher --normalize
latency`` through the command line (the library pieces: tests/test_soft.py, test_isomorphic.py,
test_greedy_fisher.py, test_latency_normalize.py).

How each can fail: the soft model must keep the original's nodes and initializer shapes and compute
what the hard-pruned model of the same plan computes (relative error, not an absolute tolerance);
the isomorphic and greedy runs must verify and say in the report what they did (classes, rounds);
latency normalization must carry the per-node table it measured; misuse is one line, exit 2,
nothing written."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import onnx
import pytest

pytest.importorskip("torch")

from onnxprune.runtime.session import make_session, run_session  # noqa: E402


def _out(tmp_path) -> pathlib.Path:
    d = tmp_path / "out"
    d.mkdir(exist_ok=True)
    return d


def _ok(r) -> None:
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])


def _refused(r, out_dir: pathlib.Path, word: str) -> None:
    assert "Traceback" not in r.stderr, r.stderr
    assert r.returncode == 2, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and word in lines[0], r.stderr
    assert list(out_dir.iterdir()) == []


def _outputs(path, x) -> np.ndarray:
    sess, _ = make_session(str(path), "cpu")
    return np.asarray(run_session(sess, {"x": x})[0])


@pytest.mark.parametrize("data", [False, True], ids=["weights", "calib"])
def test_soft_keeps_the_graph_and_computes_what_the_pruned_model_computes(run_main, tmp_path, grad_cnn, data):
    model, calib = grad_cnn
    out = _out(tmp_path)
    extra = ("--calib", calib) if data else ()
    _ok(run_main("prune", model, "-o", out / "hard.onnx", "--ratio", "0.5", *extra, "--save-plan", out / "plan.json"))
    r = run_main("prune", model, "-o", out / "soft.onnx", "--ratio", "0.5", *extra, "--soft", "--verify")
    _ok(r)
    assert "--soft" in r.stdout and "PASSED" in r.stdout
    orig, soft, hard = (onnx.load(str(p)) for p in (model, out / "soft.onnx", out / "hard.onnx"))
    onnx.checker.check_model(soft, full_check=True)
    assert [n.op_type for n in soft.graph.node] == [n.op_type for n in orig.graph.node]
    shapes = {t.name: list(t.dims) for t in orig.graph.initializer}
    assert all(shapes.get(t.name, list(t.dims)) == list(t.dims) for t in soft.graph.initializer)
    assert any(list(t.dims) != shapes.get(t.name) for t in hard.graph.initializer)  # the hard one did shrink
    x = np.random.default_rng(7).standard_normal((4, 3, 8, 8)).astype(np.float32)
    s, h, o = _outputs(out / "soft.onnx", x), _outputs(out / "hard.onnx", x), _outputs(model, x)
    assert np.linalg.norm(s - h) <= 1e-5 * np.linalg.norm(h)
    assert np.linalg.norm(s - o) > 1e-3 * np.linalg.norm(o)  # and it is not the original


def test_isomorphic_verifies_and_reports_its_classes(run_main, tmp_path, grad_cnn):
    model, _ = grad_cnn
    out = _out(tmp_path)
    r = run_main("prune", model, "-o", out / "p.onnx", "--ratio", "0.5", "--isomorphic", "--verify",
                 "--report", out / "r.json")
    _ok(r)
    assert "PASSED" in r.stdout
    rep = json.loads((out / "r.json").read_text())
    iso = rep["importance"]["isomorphic"]
    assert iso and rep["plan"]["options"]["isomorphic"] is True
    kept = {g["group"]: len(g["keep"]) for g in rep["plan"]["groups"]}
    assert sorted(gid for c in iso for gid in c["groups"]) == sorted(kept)  # every pruned group in one class
    for c in iso:  # each class at the ratio, its kept units those of its groups
        assert c["kept"] == sum(kept[gid] for gid in c["groups"]) == c["units"] - int(c["units"] * 0.5)


def test_greedy_group_fisher_verifies_and_reports(run_main, tmp_path, grad_cnn):
    model, calib = grad_cnn
    out = _out(tmp_path)
    r = run_main("prune", model, "-o", out / "p.onnx", "--ratio", "0.4", "--importance", "group-fisher", "--greedy",
                 "--greedy-batch", "0", "--calib", calib, "--verify", "--report", out / "r.json")
    _ok(r)
    rep = json.loads((out / "r.json").read_text())
    greedy = rep["importance"]["greedy"]
    assert greedy["batch"] == 0 and greedy["removed"] > 0
    assert rep["plan"]["options"]["greedy"] is True


def test_latency_normalization_measures_a_table(run_main, tmp_path, grad_cnn):
    model, calib = grad_cnn
    out = _out(tmp_path)
    r = run_main("prune", model, "-o", out / "p.onnx", "--ratio", "0.4", "--importance", "group-fisher",
                 "--normalize", "latency", "--global", "--calib", calib, "--verify", "--ep", "cpu",
                 "--report", out / "r.json")
    _ok(r)
    rep = json.loads((out / "r.json").read_text())
    table = rep["importance"]["gradients"]["latency_table"]
    assert table["ep"] == "cpu" and table["nodes"] == len(onnx.load(str(model)).graph.node) and table["runs"] > 0
    assert rep["plan"]["options"]["normalize"] == "latency"


def test_misuse_is_one_line(run_main, tmp_path, grad_cnn):
    model, calib = grad_cnn
    out = _out(tmp_path)
    _refused(run_main("prune", model, "-o", out / "p.onnx", "--greedy"), out, "group-fisher")
    _refused(run_main("prune", model, "-o", out / "p.onnx", "--greedy-batch", "0.1"), out, "--greedy")
    _refused(run_main("prune", model, "-o", out / "p.onnx", "--importance", "group-fisher", "--calib", calib,
                      "--greedy", "--isomorphic"), out, "--isomorphic")
