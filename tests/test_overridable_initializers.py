"""Initializers that are also graph inputs (IR < 4 models, or on purpose) are defaults a caller may
override at run time: they are graph inputs, never constants. Normalization never unties or folds
them (a fed value must reach every consumer), the analysis freezes their channels like any graph
input's, and the pruned model still takes them, with the same effect as the original."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxprune.analysis.passes import fold_identity_constants, untie_constants
from onnxprune.ir.graph import input_feeds_spec
from onnxprune.ir.tensors import ConstantTable
from onnxprune.runtime.session import make_session
from onnxprune.testing import checks

C = 8


def _model(identity: bool) -> onnx.ModelProto:
    """x -> convA -> relu -> convB -> +S -> relu -> convC -> +S' -> y, where S is an initializer that is
    also a graph input, read by both Adds (``identity``: the second through Identity(S)). The channels
    between convA and convB are prunable; those S is added to are not."""
    rng = np.random.default_rng(0)

    def w(name, *shape):
        return numpy_helper.from_array((rng.standard_normal(shape) * 0.3).astype(np.float32), name)

    s = numpy_helper.from_array((rng.standard_normal((1, C, 1, 1))).astype(np.float32), "S")
    inits = [w("WA", C, 3, 3, 3), w("WB", C, C, 3, 3), w("WC", C, C, 1, 1), s]
    second = "S"
    nodes = [
        helper.make_node("Conv", ["x", "WA"], ["a"], name="convA", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a"], ["ra"], name="reluA"),
        helper.make_node("Conv", ["ra", "WB"], ["b"], name="convB", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["b", "S"], ["bs"], name="addS"),
        helper.make_node("Relu", ["bs"], ["rb"], name="reluB"),
        helper.make_node("Conv", ["rb", "WC"], ["c"], name="convC"),
    ]
    if identity:
        nodes.append(helper.make_node("Identity", ["S"], ["S2"], name="idS"))
        second = "S2"
    nodes.append(helper.make_node("Add", ["c", second], ["y"], name="addS2"))
    g = helper.make_graph(nodes, "overridable",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8]),
                           helper.make_tensor_value_info("S", TensorProto.FLOAT, [1, C, 1, 1])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, C, 8, 8])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(m, full_check=True)
    return m


def test_overridable_initializer_is_a_graph_input_not_a_constant():
    m = _model(identity=False)
    assert "S" not in ConstantTable.of(m.graph)
    assert "WA" in ConstantTable.of(m.graph)
    assert "S" in {vi.name for vi in input_feeds_spec(m)}


@pytest.mark.parametrize("identity", [False, True], ids=["shared", "identity"])
def test_normalization_never_unties_or_folds_an_overridable_initializer(identity):
    m = _model(identity)
    before = m.SerializeToString()
    assert untie_constants(fold_identity_constants(m).model).model.SerializeToString() == before


@pytest.mark.parametrize("identity", [False, True], ids=["shared", "identity"])
def test_fed_value_reaches_every_consumer_after_pruning(identity):
    m = _model(identity)
    res = checks.prune_and_verify(m, 0.5)
    pruned = res.pruned
    # something was pruned (between convA and convB), and S is still a graph input of its shape
    assert checks.shapes_of(pruned)["WA"][0] < C
    assert "S" in {i.name for i in pruned.graph.input}
    assert checks.shapes_of(pruned)["S"] == (1, C, 1, 1)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, 3, 8, 8)).astype(np.float32)
    fed = {"x": x, "S": (5.0 + rng.standard_normal((1, C, 1, 1))).astype(np.float32)}
    got = _run(pruned, fed)
    # the fed S moves the output of both models alike (the default would give another output)
    default_out = _run(pruned, {"x": x})
    assert checks.rel_err(got, default_out) > 0.1
    ref_masked = _run(_masked(m, res), fed)
    assert checks.rel_err(got, ref_masked) < 1e-4


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """Output ``y``, feeding overridable initializers too (``checks.run`` feeds only required inputs)."""
    sess, _ = make_session(model, "cpu")
    return sess.run(None, feeds)[0]


def _masked(m: onnx.ModelProto, res) -> onnx.ModelProto:
    """The original with the pruned channels of convA zeroed (its output channels are what the plan
    removed): the function the pruned model must compute for every fed S."""
    kept = checks.kept_along(checks.inits(m)["WA"], checks.inits(res.pruned)["WA"], 0)
    out = onnx.ModelProto()
    out.CopyFrom(m)
    for t in out.graph.initializer:
        if t.name == "WA":
            a = numpy_helper.to_array(t).copy()
            drop = [i for i in range(C) if i not in kept]
            a[drop] = 0
            t.CopyFrom(numpy_helper.from_array(a, "WA"))
    return out
