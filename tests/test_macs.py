"""MACs and parameters of ONNX graphs (onnxprune.measure.stats), per op and against Torch-Pruning.

Our definition (onnxprune/stats.py): MACs are the multiply-accumulates of Conv, ConvTranspose, Gemm,
MatMul (weights and activation x activation, so attention's Q·Kᵀ and ·V), Einsum, Attention and
LSTM/GRU/RNN gate products, at the real input shapes; bias adds, normalization, activations, pooling
and softmax are not counted. Torch-Pruning's ``tp.utils.count_ops_and_params`` counts the same matrix
products (conv, linear, nn.MultiheadAttention's projections and its Q·Kᵀ and ·V) and adds: conv and
linear bias adds, BatchNorm (2 per element), LayerNorm (2 per element), activations and pooling (1 per
element), and inside nn.MultiheadAttention the Q scaling, softmax (1 per score) and projection bias
adds. The comparison below splits its count into those two parts; the matrix-product part must agree
within 2% (it agrees exactly on ResNet-50 and MobileNetV2); the rest is reported as definitional.
``ModelStats.tp_ops`` counts the graph with TP's conventions; it must agree with TP's total within
2% on the unfused-BN exports of ResNet-50 and MobileNetV2 and on ViT-B/16 (the tp_ops tests below).
"""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import pytest

from onnxprune.analysis.shapes import infer_shapes
from onnxprune.measure.stats import model_stats, stats_at
from onnxprune.testing import graphs


def _macs(text: str, input_shapes=None) -> int:
    m = graphs.from_text(text)
    return stats_at(m, input_shapes).macs


# ------------------------------------------------------------------------------------------------
# per-op formulas on small graphs


def test_conv_grouped_and_depthwise():
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2,8,10,10] x) => (float[2,16,5,5] y)
    <float[16,2,3,3] w, float[16] b, float[16,1,3,3] wd>
    {
      c = Conv <group=4, pads=[1,1,1,1], strides=[2,2]> (x, w, b)
      y = Conv <group=16, pads=[1,1,1,1]> (c, wd)
    }
    """
    # grouped: N*Cout*Hout*Wout * Cin/g*k*k; depthwise: N*C*H*W * 1*k*k (bias adds not counted)
    assert _macs(text) == 2 * 16 * 5 * 5 * 2 * 9 + 2 * 16 * 5 * 5 * 9


def test_conv_transpose():
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[1,8,4,4] x) => (float[1,4,8,8] y)
    <float[8,4,2,2] w>
    {
      y = ConvTranspose <strides=[2,2]> (x, w)
    }
    """
    assert _macs(text) == 1 * 8 * 4 * 4 * 4 * 2 * 2  # N*Cin*Hin*Win * Cout/g*k*k


def test_gemm_trans_and_matmul_weight():
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[3,20] x) => (float[3,7] y)
    <float[10,20] w, float[10] b, float[10,7] w2>
    {
      h = Gemm <transB=1> (x, w, b)
      y = MatMul (h, w2)
    }
    """
    assert _macs(text) == 3 * 10 * 20 + 3 * 7 * 10


def test_attention_matmuls_between_activations():
    """Q·Kᵀ and softmax·V are MatMuls of two activations: counted (per head, with the batch)."""
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2,4,10,8] q, float[2,4,8,10] kt, float[2,4,10,8] v) => (float[2,4,10,8] y)
    {
      s = MatMul (q, kt)
      p = Softmax <axis=-1> (s)
      y = MatMul (p, v)
    }
    """
    assert _macs(text) == 2 * 4 * 10 * 10 * 8 + 2 * 4 * 10 * 8 * 10


def test_attention_op_opset23():
    text = """
    <ir_version: 10, opset_import: ["" : 23]>
    g (float[2,4,10,8] q, float[2,4,12,8] k, float[2,4,12,6] v) => (float[2,4,10,6] y)
    {
      y = Attention (q, k, v)
    }
    """
    assert _macs(text) == 2 * 4 * 10 * 12 * (8 + 6)


def test_einsum_two_operands():
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2,5,6] a, float[2,6,7] b) => (float[2,5,7] y)
    {
      y = Einsum <equation="bij,bjk->bik"> (a, b)
    }
    """
    assert _macs(text) == 2 * 5 * 6 * 7


@pytest.mark.parametrize(("op", "gates"), [("LSTM", 4), ("GRU", 3), ("RNN", 1)])
def test_recurrent_gate_products(op, gates):
    hidden, inp, seq, batch = 16, 12, 5, 3
    text = f"""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[{seq},{batch},{inp}] x) => (float[{seq},2,{batch},{hidden}] y)
    <float[2,{gates * hidden},{inp}] w, float[2,{gates * hidden},{hidden}] r>
    {{
      y = {op} <hidden_size={hidden}, direction="bidirectional"> (x, w, r)
    }}
    """
    # every step, both directions: x·Wᵀ and h·Rᵀ for all gates
    assert _macs(text) == seq * batch * 2 * gates * hidden * (inp + hidden)


def test_symbolic_dims_take_the_real_input_shape():
    """A sequence length that shape inference carries as a symbol is counted at the given size."""
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N,S,64] x) => (float[N,S,32] y)
    <float[64,32] w>
    {
      y = MatMul (x, w)
    }
    """
    m = graphs.from_text(text)
    assert stats_at(m, {"x": (2, 128, 64)}).macs == 2 * 128 * 64 * 32
    # the generated default for a dynamic non-batch dim is 16, the batch 1
    assert stats_at(m).macs == 1 * 16 * 64 * 32
    # model_stats on analysis shapes (the pipeline's path) pins the real input sizes too
    assert model_stats(m, infer_shapes(m, {"x": (4, 7, 64)})).macs == 4 * 7 * 64 * 32
    assert [vi.type.tensor_type.shape.dim[1].dim_param for vi in m.graph.input] == ["S"]  # restored


def test_inspect_uses_input_shape(tmp_path, run_main):
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N,S,64] x) => (float[N,S,32] y)
    <float[64,32] w, float[32] b>
    {
      h = MatMul (x, w)
      y = Add (h, b)
    }
    """
    p = tmp_path / "m.onnx"
    onnx.save(graphs.from_text(text), str(p))
    r = run_main("inspect", p, "--json", "--input-shape", "x=3x50x64")
    assert r.returncode == 0, r.stderr
    st = json.loads(r.stdout)["stats"]
    assert st["macs"] == 3 * 50 * 64 * 32
    assert st["params"] == 64 * 32 + 32


def test_params_count_float_constants_once():
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[1,4] x) => (float[1,4] y)
    <float[4,4] w, int64[2] shape = {1, 4}>
    {
      h = MatMul (x, w)
      h2 = MatMul (h, w)
      y = Reshape (h2, shape)
    }
    """
    m = onnx.parser.parse_model(text)
    m.graph.initializer.append(onnx.numpy_helper.from_array(np.ones((4, 4), np.float32), "w"))
    st = stats_at(m)
    assert st.params == 16  # the int64 shape constant is not a parameter; w counted once
    assert st.macs == 2 * 4 * 4


# ------------------------------------------------------------------------------------------------
# against Torch-Pruning


def _tp():
    return pytest.importorskip("torch_pruning", reason="Torch-Pruning is not installed "
                               "(pip install torch-pruning --no-deps)")


def tp_breakdown(model, x) -> dict:
    """Torch-Pruning's count, split into the matrix products we count and the rest."""
    import torch
    from torch import nn

    tp = _tp()
    out_shapes = {}
    hooks = [m.register_forward_hook(lambda mod, i, o: out_shapes.__setitem__(mod, tuple(o.shape)))
             for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    mha_inputs = {}
    hooks += [m.register_forward_hook(lambda mod, i, o: mha_inputs.__setitem__(mod, tuple(i[0].shape)))
              for m in model.modules() if isinstance(m, nn.MultiheadAttention)]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    total, params, layer_flops, _ = tp.utils.count_ops_and_params(model, x, layer_wise=True)
    parts = {"matmul": 0, "bias": 0, "norm": 0, "activation_pool": 0, "attention_extra": 0, "other": 0}
    for m, f in layer_flops.items():
        if f is None or type(m) not in tp.utils.op_counter.MODULES_MAPPING:
            continue
        if isinstance(m, nn.Conv2d):
            bias = m.out_channels * math.prod(out_shapes[m][2:]) * out_shapes[m][0] if m.bias is not None else 0
            parts["matmul"] += f - bias
            parts["bias"] += bias
        elif isinstance(m, nn.Linear):
            bias = m.out_features if m.bias is not None else 0  # TP adds out_features once
            parts["matmul"] += f - bias
            parts["bias"] += bias
        elif isinstance(m, nn.MultiheadAttention):
            shp = mha_inputs[m]  # (B, L, E) with batch_first, else (L, B, E)
            b, seq = (shp[0], shp[1]) if m.batch_first else (shp[1], shp[0])
            e, h = m.embed_dim, m.num_heads
            extra = b * (seq * e + h * seq * seq + (3 * seq * e if m.in_proj_bias is not None else 0) + seq * e)
            parts["matmul"] += f - extra
            parts["attention_extra"] += extra
        elif isinstance(m, nn.BatchNorm2d | nn.LayerNorm | nn.GroupNorm):
            parts["norm"] += f
        elif f:
            name = type(m).__name__
            parts["activation_pool" if any(k in name for k in ("ReLU", "GELU", "Pool", "SiLU", "Hardswish",
                                                                  "Sigmoid", "Dropout")) else "other"] += f
    parts["total"] = total
    parts["params"] = params
    return parts


def _compare(model, onnx_path, x):
    tp_parts = tp_breakdown(model, x)
    ours = stats_at(str(onnx_path), {"input": tuple(x.shape)})
    rel = abs(ours.macs - tp_parts["matmul"]) / tp_parts["matmul"]
    print(f"ours {ours.macs} / TP matmul part {tp_parts['matmul']} (rel. diff {rel:.2e}); TP total "
          f"{tp_parts['total']:.0f} = matmul + bias {tp_parts['bias']} + norm {tp_parts['norm']} + act/pool "
          f"{tp_parts['activation_pool']} + attention extras {tp_parts['attention_extra']}; "
          f"params ours {ours.params} TP {tp_parts['params']}")
    assert rel < 0.02, f"MACs {ours.macs} vs Torch-Pruning's matrix products {tp_parts['matmul']}"
    assert tp_parts["other"] == 0, "Torch-Pruning counted a module kind this comparison does not know"
    # the whole difference to TP's total is definitional: bias adds, norms, activations, pooling
    definitional = tp_parts["bias"] + tp_parts["norm"] + tp_parts["activation_pool"] + tp_parts["attention_extra"]
    assert abs(tp_parts["total"] - definitional - ours.macs) / tp_parts["total"] < 0.02
    assert abs(ours.params - tp_parts["params"]) / tp_parts["params"] < 0.02
    return ours, tp_parts


@pytest.mark.parametrize("arch", ["resnet50", "mobilenet_v2"])
def test_macs_agree_with_torch_pruning(arch):
    _tp()
    torch = pytest.importorskip("torch")
    from onnxprune.models import zoo

    path = zoo.export(arch, "legacy")
    model = zoo.build_model(arch).eval()
    _compare(model, path, torch.zeros(1, 3, 224, 224))


@pytest.mark.slow
def test_macs_agree_with_torch_pruning_vit_b_16(tmp_path):
    _tp()
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.vit_b_16(weights=None).eval()
    x = torch.zeros(1, 3, 224, 224)
    path = tmp_path / "vit_b_16.onnx"
    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)  # the fused MHA kernel has no ONNX export
    try:
        with torch.no_grad():
            torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=17,
                              input_names=["input"], output_names=["output"])
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)
    ours, tp_parts = _compare(model, path, x)
    assert ours.macs_by_op["MatMul"] > 0


# ------------------------------------------------------------------------------------------------
# tp_ops: the same graph counted with Torch-Pruning's conventions (onnxprune/stats.py docstring)


def test_tp_ops_conventions_on_a_small_graph():
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[1,4,8,8] x) => (float[1,5] y)
    <float[8,4,3,3] w, float[8] b, float[8] s, float[8] t, float[8] mu, float[8] var, float[5,8] wf,
     float[5] bf, float lo = {0.0}, float hi = {6.0}>
    {
      c = Conv <pads=[1,1,1,1]> (x, w, b)
      n = BatchNormalization (c, s, t, mu, var)
      r = Relu (n)
      r6 = Clip (r, lo, hi)
      sg = Sigmoid (r6)
      a = Add (sg, r)
      p = MaxPool <kernel_shape=[2,2], strides=[2,2]> (a)
      gp = GlobalAveragePool (p)
      f = Flatten (gp)
      y = Gemm <transB=1> (f, wf, bf)
    }
    """
    st = stats_at(graphs.from_text(text))
    e = 8 * 8 * 8  # elements of every 8x8x8 activation
    conv = e * 4 * 9 + e  # products + a bias add per output element
    assert st.macs == e * 4 * 9 + 5 * 8
    # BN 2 per element, Relu and Clip(0, 6) 1 per element; Sigmoid and the Add not counted (as TP);
    # pools 1 per input element; Gemm products + its bias once (nn.Linear's convention)
    assert st.tp_ops == conv + 2 * e + e + e + e + 8 * 4 * 4 + 5 * 8 + 5
    assert stats_at(graphs.from_text(text)).to_json()["tp_ops"] == st.tp_ops


def test_tp_ops_attention_as_multihead_attention():
    """Q·Kᵀ → Softmax → ·V between activations, with projection MatMul + bias Add around it: the
    projections' bias adds per element (not once), Q scaling and softmax, like nn.MultiheadAttention."""
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[1,10,16] x) => (float[1,10,16] y)
    <float[16,16] wq, float[16] bq, float[16,16] wk, float[16] bk, float[16,16] wv, float[16] bv,
     float[16,16] wo, float[16] bo, float sc = {0.25}>
    {
      q0 = MatMul (x, wq)
      q1 = Add (q0, bq)
      q = Mul (q1, sc)
      k0 = MatMul (x, wk)
      k1 = Add (k0, bk)
      kt = Transpose <perm=[0,2,1]> (k1)
      v0 = MatMul (x, wv)
      v = Add (v0, bv)
      s = MatMul (q, kt)
      p = Softmax <axis=-1> (s)
      o = MatMul (p, v)
      y0 = MatMul (o, wo)
      y = Add (y0, bo)
    }
    """
    st = stats_at(graphs.from_text(text))
    L, E = 10, 16
    products = 4 * L * E * E + 2 * L * L * E
    assert st.macs == products
    assert st.tp_ops == products + L * E + L * L + 3 * L * E + L * E  # Q scaling, softmax, in/out biases


def _tp_total(model, x) -> float:
    tp = _tp()
    total, _ = tp.utils.count_ops_and_params(model, x)
    return total


@pytest.mark.parametrize("arch", ["resnet50", "mobilenet_v2"])
def test_tp_ops_agree_with_torch_pruning(arch):
    """tp_ops of the unfused-BN legacy export within 2% of TP's total on the same torch model; the
    BN-folded export has less work (a folded BN leaves a conv bias add, 1 per element, not 2)."""
    _tp()
    torch = pytest.importorskip("torch")
    from onnxprune.models import zoo

    x = torch.zeros(1, 3, 224, 224)
    tp_parts = tp_breakdown(zoo.build_model(arch).eval(), x)
    total = tp_parts["total"]
    unfused = stats_at(str(zoo.export(arch, "legacy", bn="unfused")), {"input": tuple(x.shape)})
    folded = stats_at(str(zoo.export(arch, "legacy", bn="fold")), {"input": tuple(x.shape)})
    rel = abs(unfused.tp_ops - total) / total
    print(f"{arch}: tp_ops unfused {unfused.tp_ops} (rel. diff {rel:.3e}), BN-folded {folded.tp_ops} "
          f"({(folded.tp_ops - total) / total:+.3e}); TP total {total:.0f}; macs {unfused.macs}")
    assert rel < 0.02, f"tp_ops {unfused.tp_ops} vs Torch-Pruning's {total}"
    assert unfused.macs == folded.macs
    assert unfused.tp_ops - folded.tp_ops == tp_parts["norm"] // 2


@pytest.mark.slow
def test_tp_ops_agree_with_torch_pruning_vit_b_16():
    _tp()
    torch = pytest.importorskip("torch")
    pytest.importorskip("torchvision")
    from onnxprune.models import transformers

    x = torch.zeros(1, 3, 224, 224)
    total = _tp_total(transformers.build_vision("vit_b_16"), x)
    st = stats_at(str(transformers.export_vision("vit_b_16", "legacy")), {"input": tuple(x.shape)})
    rel = abs(st.tp_ops - total) / total
    print(f"vit_b_16: tp_ops {st.tp_ops} (rel. diff {rel:.3e}); TP total {total:.0f}; macs {st.macs}")
    assert rel < 0.02, f"tp_ops {st.tp_ops} vs Torch-Pruning's {total}"
