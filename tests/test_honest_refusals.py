"""Honest refusals (issue 13, item 4): a model whose every prunable group is approximate is told so,
with what would prune it; an input model that fails the full ONNX checker is refused as the input's
fault (exit 2, the checker's reason, nothing written), except for stale shape annotations (value_info
entries that contradict shape inference, as jax2onnx writes NHWC ones), which are dropped, inferred
again and reported as a normalization change."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from onnxprune import pipeline
from onnxprune.analysis import passes
from onnxprune.errors import NothingToPrune, UserError
from onnxprune.planning.options import PlanOptions
from onnxprune.runtime.inputs import make_inputs
from onnxprune.runtime.session import rel_error, run_model
from onnxprune.testing import graphs
from onnxprune.testing.checks import one_line_error
from onnxprune.testing.checks import save_in_src as _save

# ConvNeXt-V2's block in miniature: a 1x1 conv, LayerNorm over the channels (NHWC), an MLP whose hidden
# units go through GRN (a global response normalization: each channel divided by the mean over the
# channels of the spatial L2 norms), then back to NCHW. Both prunable groups mix channels.
CONVNEXT_V2 = graphs.header(17) + """
g (float[1,3,8,8] x) => (float[1,8,8,8] y)
<float[8,3,1,1] w0, float[8] b0, float[8] s, float[8] t, float[8,16] w1, float[16] b1, float[16] gamma,
 float[16] beta, float[16,8] w2, float[8] b2>
{
  h = Conv(x, w0, b0)
  hn = Transpose<perm=[0,2,3,1]>(h)
  ln = LayerNormalization<axis=-1>(hn, s, t)
  m1 = MatMul(ln, w1)
  a1 = Add(m1, b1)
  u = Relu(a1)
  gx = ReduceL2<axes=[1,2], keepdims=1>(u)
  gm = ReduceMean<axes=[-1], keepdims=1>(gx)
  eps = Constant<value=float {1e-6}>()
  gme = Add(gm, eps)
  nx = Div(gx, gme)
  un = Mul(u, nx)
  gu = Mul(gamma, un)
  gb = Add(gu, beta)
  v = Add(gb, u)
  m2 = MatMul(v, w2)
  a2 = Add(m2, b2)
  y = Transpose<perm=[0,3,1,2]>(a2)
}
"""


@pytest.fixture
def out_dir(tmp_path: pathlib.Path) -> pathlib.Path:
    d = tmp_path / "out"
    d.mkdir()
    return d


# ----------------------------------------------------------------------------------------------
# every prunable group approximate


def test_all_approximate_says_so(run_main, tmp_path, out_dir):
    model = graphs.build(CONVNEXT_V2)
    onnx.checker.check_model(model, full_check=True)
    an = pipeline.analyze_model(model)
    live = [g for g in an.cg.groups if g.prunable]
    assert len(live) == 2 and all(g.is_approximate for g in live)  # the premise: nothing exact to prune
    src = _save(tmp_path, model)
    msg = one_line_error(run_main("prune", src, "-o", out_dir / "p.onnx", "--ratio", "0.3", "--verify", "--ep", "cpu"),
                         code=NothingToPrune.exit_code)
    assert ("2 groups are approximate: --allow-approximate prunes them; with --calib the fidelity is measured"
            in msg), msg
    assert "LayerNormalization" in msg or "ReduceMean" in msg  # an example of what mixes the channels
    assert "every group is frozen" not in msg
    assert "the other 2 are frozen" in msg and "graph input 'x'" in msg and "graph output 'y'" in msg
    assert sorted(out_dir.iterdir()) == []
    # ... and the flag it names does prune them
    proc = run_main("prune", src, "-o", out_dir / "p.onnx", "--ratio", "0.3", "--verify", "--allow-approximate",
                    "--ep", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert (out_dir / "p.onnx").exists()


def test_one_approximate_group_is_singular():
    text = graphs.header(17) + """
g (float[1,3,8,8] x) => (float[1,8,8,4] y) <float[8,3,1,1] w0, float[8] s, float[8] t, float[8,4] w1> {
  h = Conv(x, w0)
  hn = Transpose<perm=[0,2,3,1]>(h)
  ln = LayerNormalization<axis=-1>(hn, s, t)
  y = MatMul(ln, w1)
}"""
    an = pipeline.analyze_model(graphs.build(text))
    with pytest.raises(NothingToPrune, match=r"1 group is approximate: --allow-approximate prunes it; with --calib"):
        pipeline.build_plan(an, PlanOptions(ratio=0.3))


def test_frozen_only_still_lists_the_barriers():
    """Without approximate groups the message is the frozen one, with reasons (never an empty list)."""
    text = graphs.header(17) + """
g (float[1,3,8,8] x) => (float[1,4,8,8] y) <float[4,3,3,3] w> { y = Conv<pads=[1,1,1,1]>(x, w) }"""
    an = pipeline.analyze_model(graphs.build(text))
    with pytest.raises(NothingToPrune, match=r"every group is frozen: graph (input|output) .+\(1 group\)"):
        pipeline.build_plan(an, PlanOptions(ratio=0.3))


# ----------------------------------------------------------------------------------------------
# input models that fail the full checker


def _stale_cnn() -> onnx.ModelProto:
    """The small CNN with NHWC value_info for two NCHW tensors (as jax2onnx leaves them) and one
    correct entry."""
    m = graphs.small_cnn()
    m.graph.value_info.extend([helper.make_tensor_value_info("r1", TensorProto.FLOAT, [1, 16, 16, 8]),
                               helper.make_tensor_value_info("r2", TensorProto.FLOAT, [1, 16, 16, 16 + 1]),
                               helper.make_tensor_value_info("c2", TensorProto.FLOAT, [1, 16, 16, 16])])
    return m


def test_stale_value_info_is_repaired_and_prunes(run_main, tmp_path, out_dir):
    model = _stale_cnn()
    with pytest.raises(onnx.shape_inference.InferenceError, match="differ"):
        onnx.checker.check_model(model, full_check=True)  # the premise: the input fails the checker
    src = _save(tmp_path, model)
    out, report = out_dir / "p.onnx", out_dir / "r.json"
    proc = run_main("-v", "prune", src, "-o", out, "--ratio", "0.5", "--verify", "--report", report, "--ep", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "PASSED"
    rep = json.loads(report.read_text())
    line = next(c for c in rep["normalization"] if c.startswith("check_input:"))
    assert "dropped 2 stale value_info entries" in line and "'r1': declared 1x16x16x8, inferred 1x8x16x16" in line
    assert line in proc.stdout
    onnx.checker.check_model(str(out), full_check=True)
    pruned = onnx.load(str(out))
    assert rep["stats"]["pruned"]["macs"] < rep["stats"]["original"]["macs"]
    assert all(o["passed"] and o["rel_error"] <= 1e-4 for o in rep["verification"]["outputs"])
    # the pruned model computes the function of the input file, up to the pruning: same output shape
    feeds = make_inputs(model)
    (y,), (yp,) = run_model(model, feeds), run_model(pruned, feeds)
    assert yp.shape == y.shape and np.isfinite(rel_error(yp, y))


def test_repair_keeps_the_entries_that_agree():
    res = passes.check_input(_stale_cnn())
    assert [vi.name for vi in res.model.graph.value_info] == ["c2"]
    assert len(res.changes) == 1
    onnx.checker.check_model(res.model, full_check=True)


def test_valid_model_is_not_touched():
    model = graphs.small_cnn()
    res = passes.check_input(model)
    assert res.model is model and res.changes == ()


def _wrong_input_count() -> onnx.ModelProto:
    m = graphs.small_cnn()
    relu = next(n for n in m.graph.node if n.op_type == "Relu")
    relu.input.append("c1")  # Relu takes one input
    return m


def _type_error() -> onnx.ModelProto:
    m = graphs.small_cnn()
    relu = next(n for n in m.graph.node if n.op_type == "Relu")
    cast = helper.make_node("Cast", ["n1"], ["n1_int"], name="cast_int", to=TensorProto.INT64)
    add = helper.make_node("Add", ["n1", "n1_int"], ["n1_sum"], name="add_mixed")  # float + int64
    relu.input[0] = "n1_sum"
    nodes = list(m.graph.node)
    i = nodes.index(relu)
    del m.graph.node[:]
    m.graph.node.extend(nodes[:i] + [cast, add] + nodes[i:])
    return m


@pytest.mark.parametrize("make, reason", [
    (_wrong_input_count, "has input size 2 not in range [min=1, max=1]"),
    (_type_error, "add_mixed"),
])
def test_checker_fault_exits_2_with_the_checkers_reason(make, reason, run_main, tmp_path, out_dir):
    model = make()
    with pytest.raises(Exception) as info:  # noqa: PT011 - the checker raises ValidationError or InferenceError
        onnx.checker.check_model(model, full_check=True)
    checker_line = str(info.value).strip().splitlines()[0]
    assert reason in checker_line
    src = _save(tmp_path, model)
    before = src.read_bytes()
    report = out_dir / "r.json"
    msg = one_line_error(run_main("prune", src, "-o", out_dir / "p.onnx", "--ratio", "0.5", "--verify",
                                  "--report", report, "--ep", "cpu"))
    assert "input model is invalid" in msg and "fails the ONNX checker" in msg
    assert reason in msg
    assert "pruned model" not in msg
    assert sorted(out_dir.iterdir()) == [] and src.read_bytes() == before


def test_stale_value_info_beside_a_real_fault_reports_the_fault():
    model = _wrong_input_count()
    model.graph.value_info.append(helper.make_tensor_value_info("r1", TensorProto.FLOAT, [1, 16, 16, 8]))
    res = passes.check_input(model)
    assert res.fault is not None and "input size 2 not in range" in res.fault


def test_analysis_keeps_the_fault_and_the_rewrite_refuses_it():
    """The analysis records the fault (inspect and groups still work on such a model: onnxruntime runs
    some the checker refuses); any rewrite refuses it as the input's fault, before rewriting."""
    an = pipeline.analyze_model(_wrong_input_count())
    assert an.input_fault is not None and "input size 2 not in range" in an.input_fault
    assert any(g.prunable for g in an.cg.groups)
    plan = pipeline.build_plan(an, PlanOptions(ratio=0.5))
    with pytest.raises(UserError, match=r"fails the ONNX checker before any pruning\): .*input size 2 not in range"):
        pipeline.apply_plan(an, plan)
    assert pipeline.analyze_model(graphs.small_cnn()).input_fault is None
