"""Quantized zoo models (issue 13, item 2): torchvision ResNet-18 and MobileNetV2 (random weights,
``zoo.export(name, "legacy")``) quantized with onnxruntime.quantization, statically (a few random
calibration batches) as QDQ and as QOperator graphs, and dynamically, prune at ``--ratio 0.3`` from the
command line and verify bit-exactly: the pruned model computes exactly the integers the masked
original computes (relative error 0), passes the full checker, stays quantized (the same ops, integer
weights) and has fewer MACs. ``uint8`` weights have zero points near 128, so the masked original must
set removed channels to the zero point (a masked original that zeroed them would fail). The per-op
graphs are in tests/handlers/test_quant.py."""

from __future__ import annotations

import collections
import json
import pathlib

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

pytest.importorskip("torch")
pytest.importorskip("torchvision")
quantization = pytest.importorskip("onnxruntime.quantization")

CALIB_BATCHES = 3


class _RandomImages(quantization.CalibrationDataReader):
    def __init__(self, n: int = CALIB_BATCHES):
        rng = np.random.default_rng(0)
        self._it = iter([{"input": rng.standard_normal((1, 3, 224, 224)).astype(np.float32)} for _ in range(n)])

    def get_next(self):
        return next(self._it, None)


def quantize(src: pathlib.Path, dst: pathlib.Path, kind: str) -> pathlib.Path:
    """``kind``: ``qdq`` / ``qoperator`` (static, per channel, onnxruntime's default int8 types),
    ``qdq-uint8`` (uint8 activations and weights) or ``dynamic`` / ``dynamic-uint8`` (uint8 weights)."""
    q, types = quantization, quantization.QuantType
    if kind.startswith("dynamic"):
        weight = types.QUInt8 if kind.endswith("uint8") else types.QInt8
        q.quantize_dynamic(str(src), str(dst), weight_type=weight)
        return dst
    fmt = q.QuantFormat.QOperator if kind == "qoperator" else q.QuantFormat.QDQ
    u8 = kind.endswith("uint8")
    q.quantize_static(str(src), str(dst), _RandomImages(), quant_format=fmt, per_channel=True,
                      activation_type=types.QUInt8 if u8 else types.QInt8,
                      weight_type=types.QUInt8 if u8 else types.QInt8)
    return dst


@pytest.fixture(scope="session")
def quantized_zoo(tmp_path_factory):
    """``(arch, kind) -> path`` of the quantized zoo model, made once per session."""
    from onnxprune.models import zoo

    made: dict[tuple[str, str], pathlib.Path] = {}
    d = tmp_path_factory.mktemp("quantized")

    def get(arch: str, kind: str) -> pathlib.Path:
        if (arch, kind) not in made:
            made[(arch, kind)] = quantize(zoo.export(arch, "legacy"), d / f"{arch}-{kind}.onnx", kind)
        return made[(arch, kind)]

    return get


def _ops(model: onnx.ModelProto) -> collections.Counter:
    """The quantization and matrix ops (the analysis may fold a Reshape of a constant bias and drop
    dead Constant nodes; nothing else changes)."""
    words = ("Quant", "QLinear", "Integer", "QGemm", "Conv", "Gemm", "MatMul")
    return collections.Counter((n.domain, n.op_type) for n in model.graph.node if any(w in n.op_type for w in words))


def _integer_weights(model: onnx.ModelProto) -> int:
    return sum(1 for t in model.graph.initializer if t.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)
               and len(t.dims) >= 2)


def assert_prunes_bit_exactly(path: pathlib.Path, out: pathlib.Path, run_main) -> dict:
    report = out.with_suffix(".json")
    r = run_main("prune", path, "-o", out, "--ratio", "0.3", "--verify", "--ep", "cpu", "--report", report)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "PASSED" in r.stdout.splitlines()[-1]
    rep = json.loads(report.read_text())
    v = rep["verification"]
    assert v["passed"] and v["exact"], v
    # bit-exact: directly, or on the exact integers where this host's u8s8 kernels saturate (x86
    # without VNNI: the masked and the pruned model pair their int16 sums differently)
    assert v["outputs"] and all(o["rel_error"] == 0.0 or (o["rule"] == "integer-exact"
                                                          and o["integer_exact"]["rel_error"] == 0.0)
                                for o in v["outputs"]), v["outputs"]
    assert all(0 < o["fidelity_rel_error"] < float("inf") for o in v["outputs"])  # pruning changed the function
    before, after = rep["stats"]["original"], rep["stats"]["pruned"]
    assert after["macs"] < 0.8 * before["macs"], (before["macs"], after["macs"])
    assert after["params"] < before["params"]
    assert rep["groups"]["pruned"] >= 10
    original, pruned = onnx.load(str(path)), onnx.load(str(out))
    onnx.checker.check_model(pruned, full_check=True)
    assert _ops(pruned) == _ops(original)  # still quantized: no dequantized weight folded, no op lost
    assert _integer_weights(pruned) == _integer_weights(original) > 0
    if path.stem.endswith("uint8"):  # weights whose zero is not 0: a masked original that zeroed them would fail
        zps = [numpy_helper.to_array(t) for t in original.graph.initializer
               if t.data_type == onnx.TensorProto.UINT8 and "zero_point" in t.name]
        assert sum(bool(np.any(z != 0)) for z in zps) >= 20
    return rep


DEFAULT = [("resnet18", "qdq"), ("mobilenet_v2", "dynamic-uint8")]
SLOW = [("resnet18", "qoperator"), ("resnet18", "dynamic"), ("mobilenet_v2", "qdq"), ("mobilenet_v2", "qoperator"),
        ("mobilenet_v2", "dynamic"), ("resnet18", "qdq-uint8"), ("resnet18", "dynamic-uint8")]


@pytest.mark.parametrize(("arch", "kind"), DEFAULT, ids=[f"{a}-{k}" for a, k in DEFAULT])
def test_quantized_zoo_prunes_bit_exactly(arch, kind, quantized_zoo, run_main, tmp_path):
    """Also: the quantized model counts the MACs of the float model it was made from."""
    from onnxprune.models import zoo

    from onnxprune.measure.stats import stats_at

    rep = assert_prunes_bit_exactly(quantized_zoo(arch, kind), tmp_path / "pruned.onnx", run_main)
    assert rep["stats"]["original"]["macs"] == stats_at(str(zoo.export(arch, "legacy"))).macs


@pytest.mark.slow
@pytest.mark.parametrize(("arch", "kind"), SLOW, ids=[f"{a}-{k}" for a, k in SLOW])
def test_quantized_zoo_prunes_bit_exactly_slow(arch, kind, quantized_zoo, run_main, tmp_path):
    assert_prunes_bit_exactly(quantized_zoo(arch, kind), tmp_path / "pruned.onnx", run_main)
