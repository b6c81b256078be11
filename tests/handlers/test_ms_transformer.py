"""onnxruntime's transformer ops (handlers/ms_transformer.py): SkipLayerNormalization,
SkipSimplifiedLayerNormalization, SimplifiedLayerNormalization and EmbedLayerNormalization (approximate
over the hidden axis), MatMulNBits (output channels exact, input channels by whole quantization blocks),
and whole-head pruning through com.microsoft Attention, MultiHeadAttention, GroupQueryAttention and
RotaryEmbedding; the cases they cannot do exactly are barriers with their reason.

Sources: onnxruntime's transformer optimizer on the repo's BERT export (Attention, SkipLayerNormalization,
EmbedLayerNormalization, BiasGelu), its MatMulNBitsQuantizer (MatMulNBits), and graphs written here in
the ONNX text format (every graph runs in onnxruntime on the CPU)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnxprune.handlers.ms_transformer import HEADS_ONLY, _pack, _unpack

from onnxprune import pipeline
from onnxprune.measure.verify import masked_original
from onnxprune.runtime.inputs import make_inputs
from onnxprune.testing import checks, graphs
from onnxprune.testing.graphs import MS

HEAD = graphs.header(17, MS)

# ----------------------------------------------------------------------------------------------
# normalizations: the hidden axis is approximate (frozen by default, pruned with --allow-approximate)

NORMS = HEAD + """
g (float[N,8,16] x) => (float[N,8,8] y)
<float[16,32] w1, float[32] s, float[32,32] w2, float[32] g1, float[32] b1, float[32,48] w3,
 float[48,32] w4, float[32] g2, float[32] be2, float[32] bias2, float[32,8] w5>
{
  h = MatMul(x, w1)
  n = com.microsoft.SkipSimplifiedLayerNormalization<epsilon=1e-5>(h, h, s)
  z = MatMul(n, w2)
  t = com.microsoft.SkipSimplifiedLayerNormalization<epsilon=1e-5>(z, h, g1, b1)
  u = MatMul(t, w3)
  r = Relu(u)
  v = MatMul(r, w4)
  p = com.microsoft.SkipLayerNormalization<epsilon=1e-5>(v, t, g2, be2, bias2)
  y = MatMul(p, w5)
}"""


def test_norms_are_approximate_over_the_hidden_axis():
    model = graphs.from_text(NORMS)
    an = pipeline.analyze_model(model)
    assert not an.cg.unknown_ops
    g = checks.group_of(an.cg, "w1", 1)
    # one residual stream: every norm's parameters and the skip inputs share the 32 channels
    members = {(s.const, s.axis) for s in g.slots}
    assert {("s", 0), ("g1", 0), ("b1", 0), ("g2", 0), ("be2", 0), ("bias2", 0), ("w2", 0), ("w2", 1),
            ("w3", 0), ("w4", 1), ("w5", 0)} <= members
    assert g.size == 32 and g.is_approximate
    ops = {r.split(" '")[0] for r in g.approximate}
    assert ops == {"SkipSimplifiedLayerNormalization", "SkipLayerNormalization"}
    # the exact group (w3's 48 columns) is pruned by half; the stream is frozen, with its reason
    checks.assert_approximate_frozen(model, {"w3": (32, 24), "w4": (24, 32), "w1": (16, 32)},
                                     "SkipLayerNormalization")


def test_norms_pruned_with_allow_approximate():
    model = graphs.from_text(NORMS)
    checks.assert_approximate_allowed(model, {"w1": (16, 16), "s": (16,), "w2": (16, 16), "g1": (16,),
                                              "b1": (16,), "w3": (16, 24), "w4": (24, 16), "g2": (16,),
                                              "be2": (16,), "bias2": (16,), "w5": (16, 8)})


SIMPLIFIED = HEAD + """
g (float[N,8,16] x) => (float[N,8,8] y)
<float[16,32] w1, float[32] s, float[32,8] w2>
{
  h = MatMul(x, w1)
  n = SimplifiedLayerNormalization<axis=-1, epsilon=1e-5>(h, s)
  y = MatMul(n, w2)
}"""


def test_simplified_layer_normalization_in_the_default_domain():
    # onnxruntime defines it in the default domain (its optimizer writes it there): followed like
    # LayerNormalization (approximate), but onnx's checker knows no such op, so the pipeline refuses
    # such a model as invalid input before pruning
    model = graphs.from_text(SIMPLIFIED)
    checks.run(model, make_inputs(model, batch=1))
    an = pipeline.analyze_model(model)
    assert not an.cg.unknown_ops
    g = checks.group_of(an.cg, "w1", 1)
    assert g.is_approximate and any(r.startswith("SimplifiedLayerNormalization") for r in g.approximate)
    assert {("s", 0), ("w2", 0)} <= {(sl.const, sl.axis) for sl in g.slots}
    assert an.input_fault is not None and "SimplifiedLayerNormalization" in an.input_fault


def test_norm_torch_forwards_match_onnxruntime():
    torch = pytest.importorskip("torch")
    from onnxprune.handlers import REGISTRY

    from onnxprune.runtime.torch_exec import TorchGraph

    for text in (NORMS, SIMPLIFIED):
        model = graphs.from_text(text)
        feeds = make_inputs(model, batch=2, seed=0)
        ref = checks.run(model, feeds)[0]
        got = TorchGraph(model, REGISTRY, device="cpu").run(feeds)["y"]
        got = got.detach().numpy() if isinstance(got, torch.Tensor) else got
        assert checks.rel_err(got, ref) < 1e-4


# ----------------------------------------------------------------------------------------------
# MatMulNBits (from onnxruntime's own quantizer)


def _mlp(sizes: list[int], seed: int = 0) -> onnx.ModelProto:
    h = onnx.helper
    rng = np.random.default_rng(seed)
    nodes, inits, prev = [], [], "x"
    for i, (a, b) in enumerate(zip(sizes, sizes[1:], strict=False)):
        inits.append(onnx.numpy_helper.from_array((rng.standard_normal((a, b)) * 0.3).astype(np.float32), f"w{i}"))
        out = "y" if i == len(sizes) - 2 else f"h{i}"
        nodes.append(h.make_node("MatMul", [prev, f"w{i}"], [out], name=f"mm{i}"))
        prev = out
        if out != "y":
            nodes.append(h.make_node("Relu", [out], [f"r{i}"], name=f"relu{i}"))
            prev = f"r{i}"
    return graphs.from_nodes(nodes, inits, ["B", sizes[0]], ["B", sizes[-1]])


def _quantize(model: onnx.ModelProto, block_size: int = 32, symmetric: bool = False) -> onnx.ModelProto:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    q = MatMulNBitsQuantizer(model, block_size=block_size, is_symmetric=symmetric)
    q.process()
    out = q.model.model
    assert [n.op_type for n in out.graph.node if n.op_type.startswith("MatMul")] == ["MatMulNBits"] * 2
    return out


def _nbits_attr(model, name: str, k: int):
    nodes = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    return next(onnx.helper.get_attribute_value(a) for a in nodes[k].attribute if a.name == name)


def test_matmul_nbits_prunes_rows_and_whole_blocks():
    # 128 hidden channels = 4 blocks of 32: a unit is a block, half of them go; the zero points
    # (two 4-bit values a byte) are repacked
    model = _quantize(_mlp([64, 128, 32]))
    an = pipeline.analyze_model(model)
    assert not an.cg.unknown_ops
    g = checks.group_of(an.cg, "w0_scales", 0)
    assert g.size == 4 and g.prunable and not g.is_approximate
    res = checks.prune_and_verify(model, 0.5)
    checks.assert_exact(res, model, {"w0_Q4": (64, 2, 16), "w0_scales": (64, 2), "w1_Q4": (32, 2, 16),
                                     "w1_scales": (32, 2)})
    p = res.pruned
    assert (_nbits_attr(p, "N", 0), _nbits_attr(p, "K", 0)) == (64, 64)
    assert (_nbits_attr(p, "N", 1), _nbits_attr(p, "K", 1)) == (32, 64)
    # the kept blocks, read from the pruned scales, carry their own zero points (two blocks a byte)
    orig, pruned = checks.inits(model), checks.inits(p)
    blocks = checks.kept_along(orig["w1_scales"], pruned["w1_scales"], 1)
    assert len(blocks) == 2
    zp_name = next(n for n in p.graph.node if n.op_type == "MatMulNBits" and n.input[0] != "x").input[3]
    np.testing.assert_array_equal(_unpack(pruned[zp_name], 4, 2), _unpack(orig["w1_zero_points"], 4, 4)[:, blocks])
    # the removed blocks mattered: the masked original differs from the original
    assert all(o.fidelity > 1e-3 for o in res.verification.outputs)


def test_matmul_nbits_symmetric_and_torch_forward():
    torch = pytest.importorskip("torch")
    from onnxprune.handlers import REGISTRY

    from onnxprune.runtime.torch_exec import TorchGraph

    model = _quantize(_mlp([64, 96, 16]), symmetric=True)
    res = checks.prune_and_verify(model, 0.5)
    checks.assert_exact(res, model, {"w0_Q4": (64, 2, 16), "w1_Q4": (16, 2, 16)})
    feeds = make_inputs(model, batch=2, seed=0)
    got = TorchGraph(model, REGISTRY, device="cpu").run(feeds)["y"]
    got = got.detach().numpy() if isinstance(got, torch.Tensor) else got
    assert checks.rel_err(got, checks.run(model, feeds)[0]) < 1e-4


def test_matmul_nbits_one_block_freezes_input_channels():
    model = _quantize(_mlp([64, 32, 16]))  # the 32 hidden channels are one block of the second layer
    an = pipeline.analyze_model(model)
    g = checks.group_of(an.cg, "w0_scales", 0)
    assert not g.prunable
    assert any("input channels go only as whole quantization blocks" in r and "one quantization block" in r
               for r in g.frozen), g.frozen


def test_matmul_nbits_flat_scales_freeze_input_channels():
    model = _quantize(_mlp([64, 96, 16]))
    for init in model.graph.initializer:  # onnxruntime's older layout: [N * blocks]
        if init.name.endswith("_scales"):
            arr = onnx.numpy_helper.to_array(init).reshape(-1)
            init.CopyFrom(onnx.numpy_helper.from_array(arr, init.name))
    checks.run(model, make_inputs(model, batch=1))  # onnxruntime takes it
    an = pipeline.analyze_model(model)
    g = checks.group_of(an.cg, "w0_scales", 0)
    assert not g.prunable and any("stored flat" in r for r in g.frozen), g.frozen


def test_pack_roundtrip():
    vals = np.random.default_rng(0).integers(0, 16, size=(5, 7)).astype(np.uint8)
    np.testing.assert_array_equal(_unpack(_pack(vals, 4), 4, 7), vals)
    vals2 = np.random.default_rng(1).integers(0, 4, size=(3, 9)).astype(np.uint8)
    np.testing.assert_array_equal(_unpack(_pack(vals2, 2), 2, 9), vals2)


# ----------------------------------------------------------------------------------------------
# attention: whole heads (--head-ratio)

MHA = HEAD + """
g (float[N,8,32] x) => (float[N,8,16] y)
<float[32,32] wq, float[32,32] wk, float[32,32] wv, float[96] bqkv, float[32,32] wo, float[32] gn,
 float[32,16] wy, int64[1] pos = {0}, float[16,4] cos, float[16,4] sin>
{
  q = MatMul(x, wq)
  k = MatMul(x, wk)
  v = MatMul(x, wv)
  qr = com.microsoft.RotaryEmbedding<num_heads=4>(q, pos, cos, sin)
  kr = com.microsoft.RotaryEmbedding<interleaved=1>(k, pos, cos, sin)
  a = com.microsoft.MultiHeadAttention<num_heads=4>(qr, kr, v, bqkv)
  o = MatMul(a, wo)
  s = com.microsoft.SkipSimplifiedLayerNormalization<epsilon=1e-5>(o, x, gn)
  y = MatMul(s, wy)
}"""

# 4 heads of 8; half of them go: wq/wk/wv keep 16 columns, the bias 3 x 16, wo 16 rows
MHA_EXPECT = {"wq": (32, 16), "wk": (32, 16), "wv": (32, 16), "bqkv": (48,), "wo": (16, 32), "wy": (32, 16)}


def _heads_kept(orig: np.ndarray, pruned: np.ndarray, d: int) -> list[int]:
    cols = checks.kept_along(orig, pruned, 1)
    assert len(cols) % d == 0
    heads = [c // d for c in cols[::d]]
    assert cols == [h * d + j for h in heads for j in range(d)], cols  # whole heads, in order
    return heads


def test_mha_and_rotary_prune_whole_heads():
    model = graphs.from_text(MHA)
    res = checks.prune_and_verify(model, head_ratio=0.5)
    checks.assert_exact(res, model, MHA_EXPECT)
    p = res.pruned
    assert checks.attr_of(p, "MultiHeadAttention", "num_heads") == 2
    assert [checks.attr_of(p, "RotaryEmbedding", "num_heads")] == [2]  # set on one, inferred on the other
    o, n = checks.inits(model), checks.inits(p)
    heads = _heads_kept(o["wq"], n["wq"], 8)
    assert _heads_kept(o["wk"], n["wk"], 8) == heads == _heads_kept(o["wv"], n["wv"], 8)
    assert checks.kept_along(o["wo"], n["wo"], 0) == [h * 8 + j for h in heads for j in range(8)]
    feeds = make_inputs(res.analysis.model, batch=2, seed=5)
    masked = masked_original(res.analysis.model, res.analysis.cg, res.plan)
    assert checks.rel_err(checks.run(p, feeds)[0], checks.run(masked, feeds)[0]) < checks.TOL
    assert checks.rel_err(checks.run(masked, feeds)[0], checks.run(model, feeds)[0]) > 1e-3


def test_attention_ops_freeze_head_dims():
    # the "dim" analysis (plain --ratio / --head-dim-ratio) does not prune through fused attention
    model = graphs.from_text(MHA)
    an = pipeline.analyze_model(model)
    g = checks.group_of(an.cg, "wq", 1)
    assert not g.prunable and any(HEADS_ONLY in r for r in g.frozen), g.frozen


def test_mha_with_attention_bias_is_a_barrier():
    text = MHA.replace("float[32] gn,", "float[32] gn, float[1,4,8,8] ab,").replace(
        "(qr, kr, v, bqkv)", "(qr, kr, v, bqkv, , ab)")
    model = graphs.from_text(text)
    checks.run(model, make_inputs(model, batch=1))
    an = pipeline.analyze_model(model, head_mode="heads")
    g = checks.group_of(an.cg, "wv", 1)
    assert not g.prunable
    assert any("MultiHeadAttention" in r and "attention_bias" in r for r in g.frozen), g.frozen


GQA = HEAD + """
g (float[1,8,32] x) => (float[1,8,16] y)
<float[32,32] wq, float[32,16] wk, float[32,16] wv, float[32,16] wo, int32[1] seqlens = {7}, int32 total = {8}>
{
  q = MatMul(x, wq)
  k = MatMul(x, wk)
  v = MatMul(x, wv)
  a, pk, pv = com.microsoft.GroupQueryAttention<num_heads=4, kv_num_heads=2>(q, k, v, , , seqlens, total)
  y = MatMul(a, wo)
}"""

GQA_PACKED = HEAD + """
g (float[1,8,32] x) => (float[1,8,16] y)
<float[32,128] wqkv, float[64,16] wo, int32[1] seqlens = {7}, int32 total = {8}, float[16,8] cos, float[16,8] sin>
{
  qkv = MatMul(x, wqkv)
  a, pk, pv = com.microsoft.GroupQueryAttention<num_heads=4, kv_num_heads=2, do_rotary=1>(qkv, , , , , seqlens,
                                                                                           total, cos, sin)
  y = MatMul(a, wo)
}"""


def test_gqa_prunes_whole_kv_groups():
    # 2 KV heads, each read by 2 of the 4 query heads (head size 8): one group of 3 heads goes
    model = graphs.from_text(GQA)
    an = pipeline.analyze_model(model, head_mode="heads")
    assert checks.group_of(an.cg, "wq", 1).size == 2
    res = checks.prune_and_verify(model, head_ratio=0.5)
    checks.assert_exact(res, model, {"wq": (32, 16), "wk": (32, 8), "wv": (32, 8), "wo": (16, 16)})
    p = res.pruned
    assert checks.attr_of(p, "GroupQueryAttention", "num_heads") == 2
    assert checks.attr_of(p, "GroupQueryAttention", "kv_num_heads") == 1
    o, n = checks.inits(model), checks.inits(p)
    kv = _heads_kept(o["wk"], n["wk"], 8)
    assert _heads_kept(o["wq"], n["wq"], 8) == [2 * kv[0], 2 * kv[0] + 1]
    assert all(o.fidelity > 1e-3 for o in res.verification.outputs)


def test_gqa_packed_qkv_with_rotary():
    model = graphs.from_text(GQA_PACKED)
    res = checks.prune_and_verify(model, head_ratio=0.5)
    # head size 16 (rotary needs a multiple of 16): 4 query heads, 2 KV heads -> 2 and 1
    checks.assert_exact(res, model, {"wqkv": (32, 64), "wo": (32, 16)})
    o, n = checks.inits(model), checks.inits(res.pruned)
    cols = checks.kept_along(o["wqkv"], n["wqkv"], 1)
    g = cols[0] // 32  # the kept KV group: query heads 2g, 2g+1, key head g, value head g
    assert cols == (list(range(32 * g, 32 * g + 32)) + list(range(64 + 16 * g, 80 + 16 * g))
                    + list(range(96 + 16 * g, 112 + 16 * g)))


def test_gqa_in_dim_mode_is_frozen():
    an = pipeline.analyze_model(graphs.from_text(GQA))
    g = checks.group_of(an.cg, "wk", 1)
    assert not g.prunable and any("GroupQueryAttention" in r and HEADS_ONLY in r for r in g.frozen)


# ----------------------------------------------------------------------------------------------
# onnxruntime's transformer optimizer on the repo's BERT export


@pytest.fixture(scope="module")
def bert_optimized(tmp_path_factory):
    pytest.importorskip("torch")
    from onnxprune.models.transformers import export_bert
    from onnxruntime.transformers.optimizer import optimize_model

    d = tmp_path_factory.mktemp("bert")
    path = export_bert(hidden=64, heads=4, layers=2, intermediate=128, vocab=200, cache_dir=d)
    opt = optimize_model(str(path), model_type="bert", num_heads=4, hidden_size=64)
    return opt.model


def test_bert_optimizer_ops_prune_heads_and_mlp(bert_optimized):
    model = bert_optimized
    ops = {(n.domain, n.op_type) for n in model.graph.node}
    assert {("com.microsoft", "Attention"), ("com.microsoft", "SkipLayerNormalization"),
            ("com.microsoft", "EmbedLayerNormalization")} <= ops
    an = pipeline.analyze_model(model, head_mode="heads")
    assert not an.cg.unknown_ops
    res = checks.prune_and_verify(model, 0.5, head_ratio=0.5)
    feeds = make_inputs(model, batch=2, seed=1)
    checks.assert_matches_masked(res, [feeds])
    p = res.pruned
    atts = [n for n in p.graph.node if n.op_type == "Attention"]
    assert len(atts) == 2
    for n in atts:  # 4 heads of 16 -> 2: the packed Q, K, V weights keep 3 x 32 columns
        assert next(onnx.helper.get_attribute_value(a) for a in n.attribute if a.name == "num_heads") == 2
        assert checks.shapes_of(p)[n.input[1]] == (64, 96)
        assert checks.shapes_of(p)[n.input[2]] == (96,)
    for n in p.graph.node:
        if n.op_type == "BiasGelu":
            assert checks.shapes_of(p)[n.input[1]] == (64,)  # 128 intermediate -> 64
    # the hidden stream (EmbedLayerNormalization, SkipLayerNormalization) stays: approximate and an output
    g = checks.group_of(res, "embedding_norm.weight", 0)
    assert g.is_approximate and not g.prunable


def test_bert_optimizer_plain_ratio_leaves_heads(bert_optimized):
    res = checks.prune_and_verify(bert_optimized, 0.5)
    assert res.verification.passed and res.verification.exact
    assert checks.attr_of(res.pruned, "Attention", "num_heads") == 4
    assert any(HEADS_ONLY in r for r in checks.frozen_reasons(res))


# ----------------------------------------------------------------------------------------------
# the same ops written out in the text format

NBITS_TEXT = HEAD + """
g (float[N,64] x) => (float[N,16] y)
<uint8[64,2,16] b1, float[64,2] s1, uint8[64,1] z1, float[64] bias1, uint8[16,2,16] b2, float[16,2] s2,
 uint8[16,1] z2>
{
  h = com.microsoft.MatMulNBits<K=64, N=64, bits=4, block_size=32>(x, b1, s1, z1, , bias1)
  r = Relu(h)
  y = com.microsoft.MatMulNBits<K=64, N=16, bits=4, block_size=32>(r, b2, s2, z2)
}"""


def _nbits_fill(name, dims, dtype, rng):
    if dtype == np.uint8:
        return rng.integers(0, 256, size=dims)
    if name.startswith("s"):
        return rng.uniform(0.01, 0.05, size=dims)
    return rng.standard_normal(dims)


def test_matmul_nbits_text_with_bias():
    # 64 hidden channels = 2 blocks of the second layer: one goes; the bias is sliced with the rows
    model = graphs.from_text(NBITS_TEXT, fill=_nbits_fill)
    res = checks.prune_and_verify(model, 0.5)
    checks.assert_exact(res, model, {"b1": (32, 2, 16), "s1": (32, 2), "z1": (32, 1), "bias1": (32,),
                                     "b2": (16, 1, 16), "s2": (16, 1)})
    o, n = checks.inits(model), checks.inits(res.pruned)
    rows = checks.kept_along(o["s1"], n["s1"], 0)
    assert rows == checks.kept_along(o["bias1"][:, None], n["bias1"][:, None], 0)
    blocks = checks.kept_along(o["s2"], n["s2"], 1)
    assert rows == list(range(32 * blocks[0], 32 * blocks[0] + 32))  # the block's channels are the rows kept


ATTENTION_TEXT = HEAD + """
g (float[N,8,32] x) => (float[N,8,16] y)
<float[16,32] w0, float[32,96] w, float[96] b, float[32,16] wo>
{
  h = MatMul(x, w0)
  a = com.microsoft.Attention<num_heads=4>(h, w, b)
  y = MatMul(a, wo)
}"""


def test_attention_text_heads_and_input_channels():
    model = graphs.from_text(ATTENTION_TEXT.replace("float[N,8,32] x", "float[N,8,16] x"))
    res = checks.prune_and_verify(model, 0.5, head_ratio=0.5)
    # heads: 4 of 8 -> 2 (Q, K, V blocks of 16 columns); input channels: w0's 32 columns -> 16
    checks.assert_exact(res, model, {"w0": (16, 16), "w": (16, 48), "b": (48,), "wo": (16, 16)})
    assert checks.attr_of(res.pruned, "Attention", "num_heads") == 2
    o, n = checks.inits(model), checks.inits(res.pruned)
    cols = checks.kept_along(o["b"][:, None], n["b"][:, None], 0)
    heads = [c // 8 for c in cols[:16:8]]
    assert cols == [blk * 32 + h * 8 + j for blk in range(3) for h in heads for j in range(8)]


def test_attention_with_past_is_a_barrier():
    text = ATTENTION_TEXT.replace("float[N,8,32] x", "float[1,8,16] x").replace("float[N,8,16] y", "float[1,8,16] y").replace(
        "float[32,16] wo>", "float[32,16] wo, float[2,1,4,0,8] past>").replace(
        "a = com.microsoft.Attention<num_heads=4>(h, w, b)", "a, pr = com.microsoft.Attention<num_heads=4>(h, w, b, , past)")
    an = pipeline.analyze_model(graphs.from_text(text), head_mode="heads")
    g = checks.group_of(an.cg, "wo", 0)  # the output's heads (the packed weights' columns declare no slot)
    assert not g.prunable and any("Attention" in r and "past / present" in r for r in g.frozen), g.frozen


EMBED_TEXT = HEAD + """
g (int32[N,8] ids) => (float[N,8,16] y)
<float[50,32] we, float[16,32] pe, float[32] gm, float[32] bt, float[32,16] w>
{
  e, mi = com.microsoft.EmbedLayerNormalization<epsilon=1e-5>(ids, , we, pe, , gm, bt)
  y = MatMul(e, w)
}"""


def test_embed_layer_normalization_is_approximate():
    model = graphs.from_text(EMBED_TEXT)
    an = pipeline.analyze_model(model)
    g = checks.group_of(an.cg, "we", 1)
    assert {("we", 1), ("pe", 1), ("gm", 0), ("bt", 0), ("w", 0)} <= {(s.const, s.axis) for s in g.slots}
    assert g.is_approximate and any("EmbedLayerNormalization" in r for r in g.approximate)
    res = checks.prune_and_verify(model, **checks.APPROX_OPTS)
    onnx.checker.check_model(res.pruned, full_check=True)
    checks.check_shapes(res.pruned, {"we": (50, 16), "pe": (16, 16), "gm": (16,), "bt": (16,), "w": (16, 16)})
    assert not res.verification.exact
    feeds = make_inputs(model, batch=2)
    assert checks.run(res.pruned, feeds)[0].shape == (2, 8, 16)
