"""Re-encoded zoo models still prune at 0.5 and verify.

Variants of the legacy export of every torchvision architecture:
  a: every initializer turned into a Constant node (``variants.initializers_to_constants``);
  b: round trip through onnxruntime's offline optimizer at ORT_ENABLE_EXTENDED, CPU provider
     (``variants.ort_optimize``): FusedConv, FusedGemm and QuickGelu from the com.microsoft domain;
  c: exported with BatchNormalization unfused (``zoo.export(..., bn="unfused")``).

The full matrix is slow (select it with ``-m slow``); resnet18 and mobilenet_v2 run always. The
handler tests at the end build small graphs with contrib ops directly.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxprune.models import zoo

from onnxprune import pipeline
from onnxprune.planning.options import PlanOptions
from onnxprune.runtime.inputs import make_inputs
from onnxprune.runtime.session import make_session
from onnxprune.testing import variants

VARIANTS = ("a", "b", "c")
FAST = [(arch, v) for arch in ("resnet18", "mobilenet_v2") for v in VARIANTS]
# known failures caused outside the contrib handlers: (arch, variant) -> reason
XFAIL: dict[tuple[str, str], str] = {}
ALL = [pytest.param(arch, v, marks=pytest.mark.xfail(strict=True, reason=XFAIL[(arch, v)]))
       if (arch, v) in XFAIL else (arch, v) for arch in zoo.ARCHS for v in VARIANTS]

NO_BATCHNORM = frozenset({"squeezenet1_1"})
MIN_MACS_DROP = 0.60
TOL = 1e-4
# ops whose inputs after the first are weights (kernels, biases, BatchNorm parameters)
WEIGHT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "BatchNormalization", "InstanceNormalization",
              "PRelu", "FusedConv", "FusedGemm")


def _variant(arch: str, variant: str) -> tuple[onnx.ModelProto, bool]:
    """(model, has a dynamic batch) of ``arch`` in ``variant``; zoo exports are cached on disk."""
    bn = "unfused" if variant == "c" else "fold"
    path = zoo.export(arch, "legacy", bn=bn)
    dynamic = bool(zoo.load_meta(path).get("dynamic_batch", True))
    if variant == "a":
        return variants.initializers_to_constants(onnx.load(str(path))), dynamic
    if variant == "b":
        return variants.ort_optimize(path, "extended"), dynamic
    return onnx.load(str(path)), dynamic


def _check_variant_source(arch: str, model: onnx.ModelProto, variant: str) -> None:
    """The variant really is what it claims (else the test proves nothing)."""
    ops = {(n.domain or "", n.op_type) for n in model.graph.node}
    if variant == "a":
        assert not model.graph.initializer
        assert ("", "Constant") in ops
    elif variant == "b":
        assert ("com.microsoft", "FusedConv") in ops
    elif arch not in NO_BATCHNORM:
        assert ("", "BatchNormalization") in ops


def _weight_initializers(model: onnx.ModelProto) -> list[str]:
    inits = {i.name for i in model.graph.initializer}
    return sorted({t for n in model.graph.node if n.op_type in WEIGHT_OPS for t in n.input[1:] if t in inits})


def _prune_and_check(arch: str, variant: str) -> float:
    model, dynamic = _variant(arch, variant)
    _check_variant_source(arch, model, variant)
    res = pipeline.run(model, PlanOptions(ratio=0.5), verify=True, ep="cpu")
    assert not res.analysis.cg.unknown_ops, f"barriers from unknown ops: {dict(res.analysis.cg.unknown_ops)}"
    v = res.verification
    assert v is not None and v.passed, v.to_json() if v else None
    for o in v.outputs:
        assert o.rel_error < TOL, (o.name, o.rel_error)
    drop = 1 - res.after.macs / res.before.macs
    assert drop >= MIN_MACS_DROP, f"MACs only dropped {drop:.1%}"
    pruned = res.pruned
    onnx.checker.check_model(pruned, full_check=True)
    if variant == "a":
        assert not _weight_initializers(pruned), "weights became initializers"
        assert len(pruned.graph.initializer) < len([n for n in pruned.graph.node if n.op_type == "Constant"])
    so, _ = make_session(model, "cpu")
    sp, _ = make_session(pruned, "cpu")
    for batch in (1, 2) if dynamic else (1,):
        feeds = make_inputs(model, batch=batch)
        for o, p in zip(so.run(None, feeds), sp.run(None, feeds), strict=True):
            assert o.shape == p.shape
            assert np.all(np.isfinite(p))
    return drop


@pytest.mark.parametrize(("arch", "variant"), FAST)
def test_variant_prune_fast(arch, variant):
    _prune_and_check(arch, variant)


@pytest.mark.slow
@pytest.mark.parametrize(("arch", "variant"), ALL)
def test_variant_prune_all(arch, variant, record_property):
    record_property("macs_drop", round(_prune_and_check(arch, variant), 4))


# ------------------------------------------------------------------------------------ variants


def test_initializers_to_constants_is_equivalent():
    path = zoo.export("resnet18", "legacy")
    model = onnx.load(str(path))
    n_inits = len(model.graph.initializer)
    conv = variants.initializers_to_constants(model)
    assert len(model.graph.initializer) == n_inits  # pure
    assert not conv.graph.initializer
    assert sum(n.op_type == "Constant" for n in conv.graph.node) >= n_inits
    onnx.checker.check_model(conv, full_check=True)
    feeds = make_inputs(model)
    a = make_session(model, "cpu")[0].run(None, feeds)
    b = make_session(conv, "cpu")[0].run(None, feeds)
    np.testing.assert_array_equal(a[0], b[0])


@pytest.mark.parametrize("external_data", [False, True])
def test_ort_optimize_self_contained(external_data, monkeypatch):
    path = zoo.export("resnet18", "legacy")
    written = []
    load = onnx.load

    def spy(f, *args, **kwargs):  # what onnxruntime wrote: does the file refer to a side file?
        m = onnx.load_model(f, load_external_data=False)
        written.append(any(onnx.external_data_helper.uses_external_data(t) for t in m.graph.initializer))
        return load(f, *args, **kwargs)

    monkeypatch.setattr(onnx, "load", spy)
    model = variants.ort_optimize(path, "extended", external_data=external_data)
    assert written == [external_data]
    assert not any(onnx.external_data_helper.uses_external_data(t) for t in model.graph.initializer)
    assert any(n.op_type == "FusedConv" and n.domain == "com.microsoft" for n in model.graph.node)
    feeds = make_inputs(model)
    ref = make_session(str(path), "cpu")[0].run(None, feeds)[0]
    got = make_session(model, "cpu")[0].run(None, feeds)[0]
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * float(np.abs(ref).max()))


def test_ort_optimize_bad_level():
    with pytest.raises(ValueError):
        variants.ort_optimize(zoo.export("resnet18", "legacy"), "everything")


# ------------------------------------------------------------------------------------ contrib handlers

_RNG = np.random.default_rng(0)


def _const(name: str, shape) -> onnx.TensorProto:
    return numpy_helper.from_array((_RNG.standard_normal(shape) * 0.3).astype(np.float32), name)


def _model(nodes, inits, x_shape, y_shape) -> onnx.ModelProto:
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)], initializer=inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])


def _ms(op, inputs, outputs, **attrs):
    return helper.make_node(op, inputs, outputs, name=f"{op}_{outputs[0]}", domain="com.microsoft", **attrs)


def _prune(model):
    res = pipeline.run(model, PlanOptions(ratio=0.5), verify=True, ep="cpu")
    assert res.verification.passed, res.verification.to_json()
    onnx.checker.check_model(res.pruned, full_check=True)
    return res


def _by_name(model, name):
    return next(n for n in model.graph.node if n.name == name)


def _init_shape(model, name):
    return tuple(next(i for i in model.graph.initializer if i.name == name).dims)


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
    res = _prune(_model(nodes, inits, [1, 3, 8, 8], [1, 4, 8, 8]))
    cg = res.analysis.cg
    assert not cg.unknown_ops
    # z and the output of the FusedConv it is summed into are one group: both halved together
    p = res.pruned
    assert _init_shape(p, _by_name(p, "FusedConv_z").input[1])[0] == 8
    assert _init_shape(p, _by_name(p, "FusedConv_r").input[1])[:2] == (8, 4)
    assert res.after.macs < res.before.macs


def test_fused_conv_depthwise_group_rewritten():
    nodes = [
        _ms("FusedConv", ["x", "w1", "b1"], ["a"], activation="Clip", activation_params=[0.0, 6.0]),
        _ms("FusedConv", ["a", "w2", "b2"], ["d"], activation="Relu", group=8, pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["d", "w3"], ["y"], name="head"),
    ]
    inits = [_const("w1", (8, 3, 1, 1)), _const("b1", (8,)), _const("w2", (8, 1, 3, 3)), _const("b2", (8,)),
             _const("w3", (4, 8, 1, 1))]
    res = _prune(_model(nodes, inits, [1, 3, 6, 6], [1, 4, 6, 6]))
    dw = _by_name(res.pruned, "FusedConv_d")
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
    res = _prune(_model(nodes, inits, [2, 3, 2, 2], [2, 5]))
    assert not res.analysis.cg.unknown_ops
    p = res.pruned
    assert _init_shape(p, _by_name(p, "FusedGemm_h").input[1]) == (16, 12)
    for name in ("BiasGelu_g1", "FastGelu_g2"):
        assert _init_shape(p, _by_name(p, name).input[1]) == (16,)
    assert _init_shape(p, _by_name(p, "head").input[1]) == (16, 5)
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
    an = pipeline.analyze_model(_model(nodes, inits, [2, 3, 2, 2], [2, 5]))
    assert "com.microsoft::FusedMatMul" in an.cg.unknown_ops
    assert an.cg.groups and not any(g.prunable for g in an.cg.groups)
    assert any("com.microsoft::FusedMatMul" in r for g in an.cg.groups for r in g.frozen)
