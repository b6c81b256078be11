"""onnxruntime contrib ops (handlers/contrib.py, domain com.microsoft): FusedConv (with a residual Z,
depthwise), FusedGemm and the Gelu family; a contrib op without a handler is a barrier. The contrib
ops of real models come from onnxruntime's optimizer (tests/test_variants.py)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from onnxprune import pipeline
from onnxprune.testing import checks, graphs
from onnxprune.testing.graphs import MS, MS17, SANDWICH_EXPECT, Case, sandwich_text

# ----------------------------------------------------------------------------------------------
# graphs written out in full: (id, text, expected initializer shapes after ratio 0.5, positive)

CASES = [
    Case("com.microsoft-FusedConv", sandwich_text(
        'm = com.microsoft.FusedConv<activation="Relu", pads=[1,1,1,1]>(h, wf, bf)',
        "float[8,8,3,3] wf, float[8] bf", domains=MS),
        {**SANDWICH_EXPECT, "wf": (4, 4, 3, 3), "bf": (4,)}),
    Case("com.microsoft-FusedConv-residual-Z", sandwich_text(
        'm = com.microsoft.FusedConv<activation="LeakyRelu", activation_params=[0.1], pads=[1,1,1,1]>'
        '(h, wf, bf, h)', "float[8,8,3,3] wf, float[8] bf", domains=MS),
        {**SANDWICH_EXPECT, "wf": (4, 4, 3, 3), "bf": (4,)}),
    Case("com.microsoft-FusedConv-depthwise", sandwich_text(
        'm = com.microsoft.FusedConv<activation="Relu", group=8, pads=[1,1,1,1]>(h, wd)',
        "float[8,1,3,3] wd", domains=MS), {**SANDWICH_EXPECT, "wd": (4, 1, 3, 3)}),
    Case("com.microsoft-Gelu-QuickGelu", sandwich_text(
        "g = com.microsoft.Gelu(h)\n  m = com.microsoft.QuickGelu<alpha=1.702>(g)", domains=MS),
        SANDWICH_EXPECT),
    Case("com.microsoft-FastGelu-BiasGelu", sandwich_text(
        "t = Transpose<perm=[0,2,3,1]>(h)\n  g = com.microsoft.FastGelu(t, bb)\n"
        "  q = com.microsoft.BiasGelu(g, bc)\n  m = Transpose<perm=[0,3,1,2]>(q)",
        "float[8] bb, float[8] bc", domains=MS), {**SANDWICH_EXPECT, "bb": (4,), "bc": (4,)}),
    Case("com.microsoft-FusedGemm", MS17 + """
g (float[N,16] x) => (float[N,8] y)
<float[32,16] w1, float[32] b1, float[32,8] w2>
{
  h = com.microsoft.FusedGemm<transB=1, activation="Relu">(x, w1, b1)
  y = Gemm(h, w2)
}""", {"w1": (16, 16), "b1": (16,), "w2": (16, 8)}),
]


class TestContrib(checks.GraphCases):
    """The standard tests over ``CASES`` (``checks.CaseTests``)."""

# ----------------------------------------------------------------------------------------------
# graphs built with onnx.helper: a residual Z, the depthwise group, the Gelu family, an unsupported op

_RNG = np.random.default_rng(0)  # one stream for the module: values depend on the tests' order


def _const(name: str, shape) -> onnx.TensorProto:
    return graphs.random_tensor(name, shape, _RNG)


def _ms(op, inputs, outputs, **attrs):
    return helper.make_node(op, inputs, outputs, name=f"{op}_{outputs[0]}", domain="com.microsoft", **attrs)


def _prune(model):
    res = checks.prune_and_verify(model)
    assert res.verification.passed, res.verification.to_json()
    onnx.checker.check_model(res.pruned, full_check=True)
    return res


def test_fused_conv_with_z_is_a_residual():
    # y = Conv(FusedConv(FusedConv(x) , Z = FusedConv(x)))
    nodes = [
        _ms("FusedConv", ["x", "w1", "b1"], ["a"], activation="Relu", pads=[1, 1, 1, 1]),
        _ms("FusedConv", ["x", "w2", "b2"], ["z"], activation="LeakyRelu", activation_params=[0.1],
            pads=[1, 1, 1, 1]),
        _ms("FusedConv", ["a", "w3", "b3", "z"], ["r"], activation="Relu", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["r", "w4"], ["y"], name="head"),
    ]
    inits = [_const("w1", (8, 3, 3, 3)), _const("b1", (8,)), _const("w2", (16, 3, 3, 3)), _const("b2", (16,)),
             _const("w3", (16, 8, 3, 3)), _const("b3", (16,)), _const("w4", (4, 16, 1, 1))]
    res = _prune(graphs.from_nodes(nodes, inits, [1, 3, 8, 8], [1, 4, 8, 8], domains=MS))
    cg = res.analysis.cg
    assert not cg.unknown_ops
    # z and the output of the FusedConv it is summed into are one group: both halved together
    p = res.pruned
    assert checks.shapes_of(p)[checks.node_named(p, "FusedConv_z").input[1]][0] == 8
    assert checks.shapes_of(p)[checks.node_named(p, "FusedConv_r").input[1]][:2] == (8, 4)
    assert res.after.macs < res.before.macs


def test_fused_conv_depthwise_group_rewritten():
    nodes = [
        _ms("FusedConv", ["x", "w1", "b1"], ["a"], activation="Clip", activation_params=[0.0, 6.0]),
        _ms("FusedConv", ["a", "w2", "b2"], ["d"], activation="Relu", group=8, pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["d", "w3"], ["y"], name="head"),
    ]
    inits = [_const("w1", (8, 3, 1, 1)), _const("b1", (8,)), _const("w2", (8, 1, 3, 3)), _const("b2", (8,)),
             _const("w3", (4, 8, 1, 1))]
    res = _prune(graphs.from_nodes(nodes, inits, [1, 3, 6, 6], [1, 4, 6, 6], domains=MS))
    dw = checks.node_named(res.pruned, "FusedConv_d")
    assert next(a.i for a in dw.attribute if a.name == "group") == 4
    assert next(a.s for a in dw.attribute if a.name == "activation") == b"Relu"
    # MACs like Conv
    assert res.before.macs == 8 * 3 * 36 + 8 * 9 * 36 + 4 * 8 * 36


def test_fused_gemm_and_gelus():
    nodes = [
        helper.make_node("Flatten", ["x"], ["f"], name="flat"),
        _ms("FusedGemm", ["f", "w1", "b1"], ["h"], transB=1, activation="Relu"),
        _ms("BiasGelu", ["h", "bg"], ["g1"]),
        _ms("FastGelu", ["g1", "bf"], ["g2"]),
        _ms("Gelu", ["g2"], ["g3"]),
        _ms("QuickGelu", ["g3"], ["g4"], alpha=1.702),
        helper.make_node("Gemm", ["g4", "w2"], ["y"], name="head"),
    ]
    inits = [_const("w1", (32, 12)), _const("b1", (32,)), _const("bg", (32,)), _const("bf", (32,)),
             _const("w2", (32, 5))]
    res = _prune(graphs.from_nodes(nodes, inits, [2, 3, 2, 2], [2, 5], domains=MS))
    assert not res.analysis.cg.unknown_ops
    p = res.pruned
    assert checks.shapes_of(p)[checks.node_named(p, "FusedGemm_h").input[1]] == (16, 12)
    for name in ("BiasGelu_g1", "FastGelu_g2"):
        assert checks.shapes_of(p)[checks.node_named(p, name).input[1]] == (16,)
    assert checks.shapes_of(p)[checks.node_named(p, "head").input[1]] == (16, 5)
    assert res.before.macs == 2 * 32 * 12 + 2 * 5 * 32


def test_unsupported_contrib_op_is_a_barrier():
    # FusedMatMul (MatMul with transposes and alpha) has no handler: it freezes what it touches
    nodes = [
        helper.make_node("Flatten", ["x"], ["f"], name="flat"),
        _ms("FusedGemm", ["f", "w1", "b1"], ["h"], transB=1, activation="Relu"),
        _ms("FusedMatMul", ["h", "w2"], ["m"], alpha=0.5, transB=1),
        _ms("FusedGemm", ["m", "w3"], ["y"], activation="Relu"),
    ]
    inits = [_const("w1", (32, 12)), _const("b1", (32,)), _const("w2", (16, 32)), _const("w3", (16, 5))]
    an = pipeline.analyze_model(graphs.from_nodes(nodes, inits, [2, 3, 2, 2], [2, 5], domains=MS))
    assert "com.microsoft::FusedMatMul" in an.cg.unknown_ops
    assert an.cg.groups and not any(g.prunable for g in an.cg.groups)
    assert any("com.microsoft::FusedMatMul" in r for g in an.cg.groups for r in g.frozen)
