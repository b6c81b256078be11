"""What stops pruning, and says why: unknown ops (standard or custom domain), graph inputs and
outputs, --ignore; verification is able to fail; pruning without verification."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnxprune import pipeline
from onnxprune.errors import NothingToPrune
from onnxprune.measure.verify import compare, masked_original
from onnxprune.planning.options import PlanOptions
from onnxprune.rewrite.apply import rewrite
from onnxprune.runtime.inputs import make_inputs
from onnxprune.testing import checks, graphs
from onnxprune.testing.graphs import H17, prefixed_text

# ----------------------------------------------------------------------------------------------
# barriers: the group touching the op is frozen (weights untouched) with a reason naming it

FROZEN_CASES = [
    # (id, text, words expected in one of the frozen group's reasons[, --ignore patterns])
    ("unknown-standard-op-LRN", prefixed_text("m = LRN<size=3>(h)"), ["unknown op LRN"]),
    ("ignored-by-option", prefixed_text("m = Relu(h)"), ["ignored by --ignore"], ["^relu_3$"]),
]


class TestBarriers(checks.FrozenCases):
    """The standard tests over ``FROZEN_CASES`` (``checks.CaseTests``)."""


# ----------------------------------------------------------------------------------------------
# unknown ops, graph inputs and outputs; verification is able to fail


def test_unknown_custom_domain_op_freezes_its_groups():
    """com.example::Foo has no handler: every channel it touches is frozen and its weights stay whole.
    onnxruntime cannot run it, so analysis, plan and rewrite are checked (no verification)."""
    text = """
<ir_version: 8, opset_import: ["" : 17, "com.example" : 1]>
g (float[N,3,8,8] x) => (float[N,4,8,8] y)
<float[6,3,3,3] w0, float[8,6,3,3] w1, float[8] b1, float[8,8,3,3] wf, float[4,8,3,3] w2, float[N,8,8,8] f>
{
  a = Conv<pads=[1,1,1,1]>(x, w0)
  ar = Relu(a)
  h = Conv<pads=[1,1,1,1]>(ar, w1, b1)
  f = com.example.Foo(h)
  c = Conv<pads=[1,1,1,1]>(f, wf)
  y = Conv<pads=[1,1,1,1]>(c, w2)
}"""
    model = graphs.build(text)
    an = pipeline.analyze_model(model)
    plan = pipeline.build_plan(an, PlanOptions(ratio=0.5))
    pruned = rewrite(an.model, an.cg, plan)
    cg = an.cg
    assert "com.example::Foo" in cg.unknown_ops

    for const, axis in (("w1", 0), ("wf", 1)):  # the channels into Foo (w1 out) and out of it (wf in)
        g = checks.group_of(cg, const, axis)
        assert not g.prunable and g.id in plan.frozen
        assert any("com.example::Foo" in r for r in plan.frozen[g.id]), plan.frozen[g.id]
    for const, axis in (("w0", 0), ("wf", 0)):  # the groups not touching Foo are pruned
        assert checks.group_of(cg, const, axis).id in {gp.group for gp in plan.pruned()}
    onnx.checker.check_model(pruned, full_check=True)
    o, p = checks.inits(model), checks.inits(pruned)
    assert checks.shapes_of(pruned) == {"w0": (3, 3, 3, 3), "w1": (8, 3, 3, 3), "b1": (8,), "wf": (4, 8, 3, 3),
                                 "w2": (4, 4, 3, 3)}
    np.testing.assert_array_equal(p["b1"], o["b1"])
    k0 = checks.kept_along(o["w0"], p["w0"], 0)
    np.testing.assert_array_equal(p["w1"], o["w1"][:, k0])


def test_unknown_op_only_is_nothing_to_prune():
    text = """
<ir_version: 8, opset_import: ["" : 17, "com.example" : 1]>
g (float[N,3,8,8] x) => (float[N,4,8,8] y)
<float[8,3,3,3] w1, float[4,8,3,3] w2, float[N,8,8,8] f>
{
  h = Conv<pads=[1,1,1,1]>(x, w1)
  f = com.example.Foo(h)
  y = Conv<pads=[1,1,1,1]>(f, w2)
}"""
    an = pipeline.analyze_model(graphs.build(text))
    with pytest.raises(NothingToPrune, match="com.example::Foo"):
        pipeline.build_plan(an, PlanOptions(ratio=0.5))


def test_graph_inputs_and_outputs_are_frozen():
    # a graph output in the middle freezes its group; the graph input's channels are never pruned
    text = H17 + """
g (float[N,3,8,8] x) => (float[N,4,8,8] y, float[N,8,8,8] h)
<float[6,3,3,3] w0, float[8,6,3,3] w1, float[4,8,3,3] w2>
{
  a = Conv<pads=[1,1,1,1]>(x, w0)
  ar = Relu(a)
  h = Conv<pads=[1,1,1,1]>(ar, w1)
  y = Conv<pads=[1,1,1,1]>(h, w2)
}"""
    model = graphs.build(text)
    res = checks.prune_and_verify(model)
    checks.assert_exact(res, model, {"w0": (3, 3, 3, 3), "w1": (8, 3, 3, 3), "w2": (4, 8, 3, 3)})
    assert any("graph output 'h'" in r for r in res.plan.frozen[checks.group_of(res, "w1", 0).id])
    assert any("graph input 'x'" in r for r in res.plan.frozen[checks.group_of(res, "w0", 1).id])
    assert any("graph output 'y'" in r for r in res.plan.frozen[checks.group_of(res, "w2", 0).id])
    with pytest.raises(NothingToPrune, match="graph (input|output)"):
        checks.prune_and_verify(graphs.build(H17 + """
g (float[N,3,8,8] x) => (float[N,4,8,8] y)
<float[4,3,3,3] w>
{
  y = Conv<pads=[1,1,1,1]>(x, w)
}"""))


def test_verification_detects_a_corrupted_pruned_model():
    model = graphs.sandwich("m = Relu(h)")
    res = checks.prune_and_verify(model)
    assert res.verification.passed
    an = res.analysis
    masked = masked_original(an.model, an.cg, res.plan)
    feeds = make_inputs(an.model, batch=2, seed=5)
    assert compare(an.model, masked, res.pruned, feeds, "cpu", checks.TOL).passed
    # permute the kept input columns of the consumer conv: same shapes, wrong channels
    bad = onnx.ModelProto()
    bad.CopyFrom(res.pruned)
    for i, init in enumerate(bad.graph.initializer):
        if init.name == "w2":
            w = numpy_helper.to_array(init)
            bad.graph.initializer[i].CopyFrom(numpy_helper.from_array(w[:, ::-1].copy(), "w2"))
    onnx.checker.check_model(bad, full_check=True)
    v = compare(an.model, masked, bad, feeds, "cpu", checks.TOL)
    assert not v.passed and not v.to_json()["passed"]
    assert v.outputs[0].rel_error > 100 * checks.TOL
    # and the masking matters: the correct pruned model is not the *unmasked* original
    assert not compare(an.model, an.model, res.pruned, feeds, "cpu", checks.TOL).passed


def test_regression_run_without_verification_on_model_with_custom_op():
    text = """
<ir_version: 8, opset_import: ["" : 17, "com.example" : 1]>
g (float[N,3,8,8] x) => (float[N,4,8,8] y)
<float[6,3,3,3] w0, float[8,6,3,3] w1, float[4,8,3,3] w2, float[N,8,8,8] f>
{
  a = Conv<pads=[1,1,1,1]>(x, w0)
  ar = Relu(a)
  h = Conv<pads=[1,1,1,1]>(ar, w1)
  f = com.example.Foo(h)
  y = Conv<pads=[1,1,1,1]>(f, w2)
}"""
    res = pipeline.run(graphs.build(text), PlanOptions(ratio=0.5), verify=False)
    assert checks.shapes_of(res.pruned)["w0"] == (3, 3, 3, 3)
