"""Re-encoded zoo models still prune at 0.5 and verify.

Variants of the legacy export of every torchvision architecture:
  a: every initializer turned into a Constant node (``variants.initializers_to_constants``);
  b: round trip through onnxruntime's offline optimizer at ORT_ENABLE_EXTENDED, CPU provider
     (``variants.ort_optimize``): FusedConv, FusedGemm and QuickGelu from the com.microsoft domain;
  c: exported with BatchNormalization unfused (``zoo.export(..., bn="unfused")``).

The full matrix is slow (select it with ``-m slow``); resnet18 and mobilenet_v2 run always. The
contrib handlers on small graphs are tested in tests/handlers/test_contrib.py.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnxprune.models import zoo

from onnxprune import pipeline
from onnxprune.planning.options import PlanOptions
from onnxprune.runtime.inputs import make_inputs
from onnxprune.testing import checks, variants

VARIANTS = ("a", "b", "c")
FAST = [(arch, v) for arch in ("resnet18", "mobilenet_v2") for v in VARIANTS]
# known failures caused outside the contrib handlers: (arch, variant) -> reason
XFAIL: dict[tuple[str, str], str] = {}
ALL = [pytest.param(arch, v, marks=pytest.mark.xfail(strict=True, reason=XFAIL[(arch, v)]))
       if (arch, v) in XFAIL else (arch, v) for arch in zoo.ARCHS for v in VARIANTS]

NO_BATCHNORM = frozenset({"squeezenet1_1"})
MIN_MACS_DROP = 0.60
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
        assert o.rel_error < checks.TOL, (o.name, o.rel_error)
    drop = 1 - res.after.macs / res.before.macs
    assert drop >= MIN_MACS_DROP, f"MACs only dropped {drop:.1%}"
    pruned = res.pruned
    onnx.checker.check_model(pruned, full_check=True)
    if variant == "a":
        assert not _weight_initializers(pruned), "weights became initializers"
        assert len(pruned.graph.initializer) < len([n for n in pruned.graph.node if n.op_type == "Constant"])
    batches = (1, 2) if dynamic else (1,)
    checks.assert_same_output_shapes(model, pruned, [make_inputs(model, batch=b) for b in batches])
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
    np.testing.assert_array_equal(checks.run(model, feeds)[0], checks.run(conv, feeds)[0])


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
    checks.assert_close(checks.run(model, feeds)[0], checks.run(path, feeds)[0], 1e-4)


def test_ort_optimize_bad_level():
    with pytest.raises(ValueError):
        variants.ort_optimize(zoo.export("resnet18", "legacy"), "everything")
