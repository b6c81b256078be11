"""The transformer ops of onnxruntime's transformer optimizer and onnxruntime-genai (domain
``com.microsoft``, and SimplifiedLayerNormalization, which onnxruntime defines in the default domain).

Semantics relied on: onnxruntime's contrib schemas (docs/ContribOperators.md) and CPU kernels, each
checked here against onnxruntime on graphs of the op (tests/handlers/test_ms_transformer.py).

Normalizations (approximate over the hidden axis, as LayerNormalization, ``norm.py``):

- SkipLayerNormalization ``(input, skip, gamma, beta?, bias?) -> (output, mean?, inv_std_var?,
  input_skip_bias_sum?)``: ``s = input + skip + bias``, ``output = LayerNorm(s) * gamma + beta`` over the
  last axis; skip broadcasts like an Add operand. SkipSimplifiedLayerNormalization ``(input, skip,
  gamma, bias?)``: the same with RMS normalization. SimplifiedLayerNormalization ``(X, scale) -> (Y,
  inv_std_var?)`` (default domain): RMS normalization over the axes from ``axis`` on.
- EmbedLayerNormalization ``(input_ids, segment_ids?, word_embedding, position_embedding,
  segment_embedding?, gamma, beta, mask?, position_ids?) -> (output, mask_index?, embedding_sum?)``:
  the sum of three table lookups (the tables' columns produce the hidden channels: producer slots),
  then LayerNorm.

MatMulNBits ``Y = A @ dequant(B)^T (+ bias)``, B ``[N, n_blocks, blob]`` (uint8, ``bits``-bit values of
``block_size`` consecutive input channels per block, low bits first), scales ``[N, n_blocks]`` or
``[N * n_blocks]``, zero points uint8 packed ``[N, ceil(n_blocks * bits / 8)]`` (or flat), or of the
scales' type and layout: output channel n is row n of B, of the scales and of the zero points, so N is
followed exactly (the scales' rows are the producer slot: a zeroed scale row is an exactly zero output
channel; B's and the zero points' rows are sliced, never zeroed). Input channels go only as whole
quantization blocks (a unit is a block): B's block axis is sliced, the scales' block column is the
consumer slot (zeroed in the masked original: the block then dequantizes to exactly 0) and packed
zero points are unpacked, sliced and repacked by ``rewrite``. Input channels are frozen (with the
reason) where that cannot be done exactly: ``g_idx`` (act-order), flat scales or zero points, one block
only, ``bits`` not dividing 8, ``weight_prepacked``.

Attention (heads: ``--head-ratio``, a unit is a whole head; the softmax scale ``1/sqrt(head_size)`` and
every other head are untouched by removing one; ``num_heads`` (and ``kv_num_heads``,
``qkv_hidden_sizes``) are rewritten). Head-dimension pruning (``--head-dim-ratio``, the "dim" analysis)
is not done through these ops: their axes are frozen with that reason.

- Attention ``(input, weights [D_in, Dq+Dk+Dv], bias?, mask_index?, past?, attention_bias?,
  past_sequence_length?)``: the packed weights' columns and bias are sliced per head in each of the
  three blocks; the input channels are a consumer slot of the weights' rows (exact). ``past`` /
  ``present``, ``attention_bias`` and ``do_rotary`` freeze the heads.
- MultiHeadAttention ``(query, key?, value?, bias?, key_padding_mask?, attention_bias?, past_key?,
  past_value?, ...)``, 3-D query/key/value ``[B, S, H*d]``: head h of query, key, value, the bias' three
  blocks and the output are one unit. Packed or 4-D key/value, attention_bias, past and
  cache_indirection freeze the heads; present_key/present_value ``[B, H, T, d]`` follow them.
- GroupQueryAttention ``(query, key?, value?, past_key?, past_value?, seqlens_k, total_sequence_length,
  cos_cache?, sin_cache?, ...)``: a unit is a KV group (kv head g and the ``num_heads / kv_num_heads`` query
  heads that read it), in separate or packed QKV; past/present ``[B, kv_heads, T, d]`` follow it; rotary
  caches are per head dimension (untouched). attention_bias with a head axis, head_sink, k/v scales and
  output_qk freeze the heads.
- RotaryEmbedding ``(input, position_ids, cos_cache, sin_cache)``: rotates pairs of head dimensions of
  each head alike; 3-D ``[B, S, H*d]``: a unit is a head (``num_heads`` rewritten where set; else
  onnxruntime infers it from the cache); 4-D ``[B, H, S, d]``: the head axis passes; the head-dimension
  axis is frozen (pairs of it share a cache column).
"""

from __future__ import annotations

import numpy as np
from onnxprune.handlers.elementwise import broadcast_links

from onnxprune.analysis.contract import (
    AnalysisCtx,
    ConstOf,
    Handler,
    Node,
    RewriteCtx,
    Role,
    ShapeOf,
    numel,
    register,
)
from onnxprune.errors import Barrier
from onnxprune.ir.attrs import attr

DOMAIN = "com.microsoft"
HEADS_ONLY = "head-dimension positions are not pruned through fused attention ops (whole heads: --head-ratio)"


def _input(node: Node, i: int) -> str:
    return node.input[i] if len(node.input) > i else ""


def _output(node: Node, i: int) -> str:
    return node.output[i] if len(node.output) > i else ""


def _where(node: Node) -> str:
    return f"{node.op_type} '{node.name}'"


# -- normalizations -------------------------------------------------------------------------------


def _carry_stats(ctx: AnalysisCtx, y: str, extra: str, hidden_from: int) -> None:
    """A mean / inverse-std output: the axes before the normalized ones are the output's."""
    if not extra:
        return
    r = ctx.rank(extra) or 0
    for ax in range(r):
        if ax < hidden_from:
            ctx.identity(extra, ax, y, ax)
        else:
            ctx.cover(extra, ax)


@register
class SkipLayerNormalization(Handler):
    """SkipLayerNormalization (input, skip, gamma, beta, bias) and SkipSimplifiedLayerNormalization
    (input, skip, gamma, bias): the residual Add and the normalization over the last axis."""

    op_types = ("SkipLayerNormalization", "SkipSimplifiedLayerNormalization")
    domain = DOMAIN
    since = 1
    shape_stand_in = "Add"  # output 0 has the shape of input + skip
    tp_per_input = 2

    def roles(self, node: Node) -> list[tuple[str, Role]]:
        if node.op_type == "SkipLayerNormalization":
            return [(_input(node, 2), Role.SCALE), (_input(node, 3), Role.PARAM), (_input(node, 4), Role.PARAM)]
        return [(_input(node, 2), Role.SCALE), (_input(node, 3), Role.PARAM)]

    def analyze(self, node: Node, ctx: AnalysisCtx) -> None:
        x, skip, y = node.input[0], node.input[1], node.output[0]
        r = ctx.rank(x)
        if r is None or ctx.rank(y) != r:
            return
        broadcast_links(node, ctx, [x, skip])
        ctx.approximate(x, r - 1, f"{_where(node)} normalizes over the channels")
        for t, role in self.roles(node):
            if not t:
                continue
            s = ctx.shape(t)
            if s is None or len(s) != 1:
                raise Barrier(f"'{t}' is not 1-D")
            ctx.slot(t, 0, role)
            ctx.identity(t, 0, y, r - 1)
        _carry_stats(ctx, y, _output(node, 1), r - 1)
        _carry_stats(ctx, y, _output(node, 2), r - 1)
        s = _output(node, 3)
        if s:
            for ax in range(r):
                ctx.identity(s, ax, y, ax)

    def torch_forward(self, node: Node, xs: list, op):
        """s = input + skip (+ bias); LayerNorm (or RMS norm) of s over the last axis."""
        x, skip, gamma = xs[0], xs[1], xs[2]
        simplified = node.op_type == "SkipSimplifiedLayerNormalization"
        beta = None if simplified or len(xs) < 4 else xs[3]
        bias = (xs[3] if len(xs) > 3 else None) if simplified else (xs[4] if len(xs) > 4 else None)
        s = x + skip
        if bias is not None:
            s = s + bias
        eps = float(op.attr("epsilon", 1e-12))
        if simplified:
            inv = op.torch.rsqrt((s * s).mean(dim=-1, keepdim=True) + eps)
            mean = op.torch.zeros_like(inv)
            y = s * inv * gamma
        else:
            mean = s.mean(dim=-1, keepdim=True)
            d = s - mean
            inv = op.torch.rsqrt((d * d).mean(dim=-1, keepdim=True) + eps)
            y = d * inv * gamma
            if beta is not None:
                y = y + beta
        return y, mean, inv, s


@register
class SimplifiedLayerNormalization(Handler):
    """RMS normalization ``X / sqrt(mean(X^2) + epsilon) * scale`` over the axes from ``axis`` on
    (onnxruntime's op in the default domain, since 1)."""

    op_types = ("SimplifiedLayerNormalization",)
    tp_per_input = 2

    def analyze(self, node: Node, ctx: AnalysisCtx) -> None:
        x, y = node.input[0], node.output[0]
        r = ctx.rank(x)
        if r is None:
            return
        for ax in range(r):
            ctx.identity(x, ax, y, ax)
        axis = int(ctx.attr("axis") if ctx.attr("axis") is not None else -1)
        axis = axis + r if axis < 0 else axis
        for ax in range(axis, r):
            ctx.approximate(x, ax, f"{_where(node)} normalizes over the channels")
        scale = _input(node, 1)
        s = ctx.shape(scale) or ()
        for j in range(len(s)):
            ctx.slot(scale, j, Role.SCALE)
            ctx.identity(scale, j, y, r - len(s) + j)
        _carry_stats(ctx, y, _output(node, 1), axis)

    def torch_forward(self, node: Node, xs: list, op):
        x, scale = xs[0], xs[1]
        r = x.dim()
        axis = int(op.attr("axis", -1))
        axes = tuple(range(axis + r if axis < 0 else axis, r))
        xc = x.to(op.torch.float32) if x.dtype in (op.torch.float16, op.torch.bfloat16) else x
        inv = op.torch.rsqrt((xc * xc).mean(dim=axes, keepdim=True) + float(op.attr("epsilon", 1e-5)))
        return (xc * inv).to(x.dtype) * scale, inv


@register
class EmbedLayerNormalization(Handler):
    """Word + position (+ segment) embedding lookups, then LayerNorm over the hidden axis."""

    op_types = ("EmbedLayerNormalization",)
    domain = DOMAIN
    since = 1
    tp_per_output = 2

    def analyze(self, node: Node, ctx: AnalysisCtx) -> None:
        y = node.output[0]
        if ctx.rank(y) != 3:
            return
        ids = node.input[0]
        for ax in range(min(2, ctx.rank(ids) or 0)):
            ctx.identity(ids, ax, y, ax)
        for i in (1, 7, 8):  # segment_ids, mask, position_ids: indices
            ctx.cover(_input(node, i))
        for i in (2, 3, 4):  # the tables: rows are looked up, columns are the hidden channels
            t = _input(node, i)
            if not t:
                continue
            if ctx.const_source(t) is None:
                raise Barrier(f"embedding table '{t}' is computed")
            ctx.cover(t, 0)
            ctx.slot(t, 1, Role.PRODUCER)
            ctx.identity(t, 1, y, 2)
        for i, role in ((5, Role.SCALE), (6, Role.PARAM)):
            t = _input(node, i)
            if t:
                ctx.slot(t, 0, role)
                ctx.identity(t, 0, y, 2)
        ctx.approximate(y, 2, f"{_where(node)} normalizes over the channels")
        ctx.cover(_output(node, 1))  # mask_index
        s = _output(node, 2)
        if s:
            for ax in range(3):
                ctx.identity(s, ax, y, ax)


# -- MatMulNBits ----------------------------------------------------------------------------------


def _unpack(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """``[rows, bytes]`` uint8 of ``bits``-bit values (low bits first) -> ``[rows, count]`` values."""
    per = 8 // bits
    shifts = (np.arange(per, dtype=np.uint8) * bits).astype(np.uint8)
    vals = (packed[:, :, None] >> shifts[None, None, :]) & np.uint8((1 << bits) - 1)
    return vals.reshape(packed.shape[0], -1)[:, :count]


def _pack(vals: np.ndarray, bits: int) -> np.ndarray:
    """Inverse of :func:`_unpack`: ``[rows, count]`` values -> ``[rows, ceil(count * bits / 8)]`` uint8."""
    per = 8 // bits
    rows, count = vals.shape
    n_bytes = -(-count * bits // 8)
    padded = np.zeros((rows, n_bytes * per), dtype=np.uint8)
    padded[:, :count] = vals
    padded = padded.reshape(rows, n_bytes, per)
    out = np.zeros((rows, n_bytes), dtype=np.uint8)
    for k in range(per):
        out |= (padded[:, :, k] << np.uint8(k * bits)).astype(np.uint8)
    return out


@register
class MatMulNBits(Handler):
    """Blockwise-quantized MatMul (module docstring): N exact, K by whole blocks where exact."""

    op_types = ("MatMulNBits",)
    domain = DOMAIN
    since = 1

    def _dims(self, node: Node, ctx_attr) -> tuple[int, int, int, int, int]:
        k, n = int(ctx_attr("K")), int(ctx_attr("N"))
        bits, bs = int(ctx_attr("bits") or 4), int(ctx_attr("block_size"))
        nb = -(-k // bs)
        return k, n, bits, bs, nb

    def analyze(self, node: Node, ctx: AnalysisCtx) -> None:
        a, b, scales, zp, g_idx, bias = (_input(node, i) for i in range(6))
        y = node.output[0]
        sa, sy = ctx.shape(a), ctx.shape(y)
        if sa is None or sy is None:
            return
        for t in (b, scales, zp, bias):
            if t and ctx.const_source(t) is None:
                raise Barrier(f"'{t}' is computed (only constant quantized weights are followed)")
        if int(ctx.attr("weight_prepacked") or 0):
            raise Barrier("weight_prepacked=1: B is in a backend's private layout")
        k, n, bits, bs, nb = self._dims(node, ctx.attr)
        sb, ss = ctx.shape(b), ctx.shape(scales)
        if sb is None or len(sb) != 3 or sb[0] != n or sb[1] != nb or sa[-1] != k or sy[-1] != n:
            raise Barrier(f"B of shape {sb} does not match K={k}, N={n}, block_size={bs}")
        r = len(sa)
        for j in range(r - 1):
            ctx.identity(a, j, y, j)
        # N: row n of B, of the scales and of the zero points, element n of the bias
        ctx.slot(b, 0, Role.QUANT)
        ctx.identity(b, 0, y, r - 1)
        ctx.cover(b, 2)
        flat_scales = len(ss) == 1
        self._rows(ctx, scales, ss, n, y, Role.PRODUCER)
        zs = ctx.shape(zp) if zp else None
        flat_zp = zs is not None and len(zs) == 1
        if zp:
            self._rows(ctx, zp, zs, n, y, Role.QUANT)
        if bias:
            ctx.slot(bias, 0, Role.PARAM)
            ctx.identity(bias, 0, y, r - 1)
        # K: whole blocks only
        why = None
        if g_idx:
            why = "g_idx (act-order) maps input channels to blocks out of order"
            ctx.cover(g_idx)
        elif nb == 1:
            why = f"K={k} is one quantization block (block_size {bs})"
        elif 8 % bits:
            why = f"{bits}-bit zero points do not pack whole into bytes"
        elif flat_scales or flat_zp:
            why = "its scales or zero points are stored flat ([N * blocks])"
        elif zp and zs is not None and zs[1] != (-(-nb * bits // 8) if ctx.elem_type(zp) == 2 else nb):
            why = f"zero points of shape {list(zs)} are not one per block"
        if why is not None:
            ctx.freeze(a, r - 1, f"{_where(node)}: input channels go only as whole quantization blocks, and {why}")
            ctx.cover(b, 1)
            if not flat_scales:
                ctx.cover(scales, 1)
            if zp and not flat_zp:
                ctx.cover(zp, 1)
            return
        e = np.arange(k)
        ctx.link(a, r - 1, e, b, 1, e // bs)
        ctx.slot(b, 1, Role.QUANT)
        ctx.slot(scales, 1, Role.CONSUMER)
        ctx.identity(scales, 1, b, 1)
        if zp:
            if ctx.elem_type(zp) == 2:  # uint8, packed: rewrite repacks it
                ctx.cover(zp, 1)
            else:  # one zero point per block, of the scales' type
                ctx.slot(zp, 1, Role.QUANT)
                ctx.identity(zp, 1, b, 1)

    def _rows(self, ctx: AnalysisCtx, t: str, s, n: int, y: str, role: Role) -> None:
        """Axis 0 of ``t`` is the N rows (2-D), or ``n`` runs of equal length (flat)."""
        if s is None or s[0] % n:
            raise Barrier(f"'{t}' of shape {s} is not laid out by the N={n} output channels")
        ctx.slot(t, 0, role)
        if len(s) == 2:
            ctx.identity(t, 0, y, -1)
        elif len(s) == 1:
            per = s[0] // n
            e = np.arange(s[0])
            ctx.link(t, 0, e, y, -1, e // per)
        else:
            raise Barrier(f"'{t}' of shape {list(s)} is neither [N, blocks] nor [N * blocks]")

    def rewrite(self, node: Node, rw: RewriteCtx) -> None:
        a, b, zp = node.input[0], node.input[1], _input(node, 3)
        old_k = rw.old_shape(a)[-1]
        new_k = int(rw.new_shape(a)[-1])
        rw.set_attr(node, "N", int(rw.new_shape(node.output[0])[-1]))
        rw.set_attr(node, "K", new_k)
        if new_k == old_k or not zp:
            return
        value = rw.const(zp)
        if value is None or value.dtype != np.uint8 or value.ndim != 2:
            return  # float zero points were sliced with the blocks
        bits = int(rw.attr(node, "bits") or 4)
        bs = int(rw.attr(node, "block_size"))
        nb = -(-old_k // bs)
        blocks = rw.kept(b, 1)
        vals = _unpack(value, bits, nb)[:, blocks]
        rw.set_input_const(node, 3, _pack(vals, bits))

    def macs(self, node: Node, shape_of: ShapeOf, const_of: ConstOf) -> int:
        a, y = shape_of(node.input[0]), shape_of(node.output[0])
        if a is None or y is None:
            return 0
        return numel(y) * int(a[-1])

    def torch_forward(self, node: Node, xs: list, op):
        """A @ dequant(B)^T + bias, B dequantized from its constant values."""
        a, b, scales = xs[0], xs[1], xs[2]
        zp = xs[3] if len(xs) > 3 else None
        if len(xs) > 4 and xs[4] is not None:
            op.refuse("g_idx")
        bias = xs[5] if len(xs) > 5 else None
        k, n, bits, bs, nb = self._dims(node, op.attr)
        if 8 % bits:
            op.refuse(f"bits={bits}")
        T = op.torch
        packed = b.to(T.int64).reshape(n, -1)
        shifts = T.arange(8 // bits, device=packed.device) * bits
        q = ((packed[:, :, None] >> shifts) & ((1 << bits) - 1)).reshape(n, nb, bs)
        s = scales.reshape(n, nb, 1)
        if zp is None:
            z = T.full((n, nb, 1), float(1 << (bits - 1)), dtype=s.dtype, device=s.device)
        elif zp.dtype == T.uint8:
            zb = zp.to(T.int64).reshape(n, -1)
            z = ((zb[:, :, None] >> shifts) & ((1 << bits) - 1)).reshape(n, -1)[:, :nb].reshape(n, nb, 1).to(s.dtype)
        else:
            z = zp.reshape(n, nb, 1)
        w = ((q.to(s.dtype) - z) * s).reshape(n, nb * bs)[:, :k]
        y = T.matmul(a, w.transpose(0, 1).to(a.dtype))
        return y + bias if bias is not None else y


# -- attention ------------------------------------------------------------------------------------


def _heads_of(size: int, d: int) -> np.ndarray:
    """For each element of a ``[H*d]`` axis, the first element of its head."""
    e = np.arange(size)
    return (e // d) * d


def _tie_heads(ctx: AnalysisCtx, t: str, axis: int, d: int) -> None:
    """Every element of a head of (t, axis) is one unit."""
    size = (ctx.shape(t) or ())[axis]
    e = np.arange(size)
    ctx.link(t, axis, e, t, axis, _heads_of(size, d))


def _freeze_heads(node: Node, ctx: AnalysisCtx, axes: list[tuple[str, int]], why: str) -> None:
    for t, ax in axes:
        if t:
            ctx.freeze(t, ax, f"{_where(node)}: {why}")


def _cover_all(ctx: AnalysisCtx, names) -> None:
    for t in names:
        if t:
            ctx.cover(t)


def _pass_batch(ctx: AnalysisCtx, x: str, y: str, axes: int) -> None:
    """The leading ``axes`` axes of ``x`` (batch, sequence) are those of ``y``."""
    rx, ry = ctx.rank(x) or 0, ctx.rank(y) or 0
    for ax in range(min(axes, rx, ry)):
        ctx.identity(x, ax, y, ax)


@register
class MSAttention(Handler):
    """com.microsoft Attention: the QKV projection (packed weights) and multi-head attention."""

    op_types = ("Attention",)
    domain = DOMAIN
    since = 1
    shape_stand_in = "Identity"  # output 0: the batch and sequence axes of input 0, a static last axis

    def sizes(self, node: Node, ctx_attr, w_cols: int) -> tuple[int, int, int, int]:
        h = int(ctx_attr("num_heads"))
        qkv = list(ctx_attr("qkv_hidden_sizes") or [])
        dq, dk, dv = qkv if qkv else (w_cols // 3,) * 3
        return h, int(dq), int(dk), int(dv)

    def analyze(self, node: Node, ctx: AnalysisCtx) -> None:
        x, w, bias = node.input[0], node.input[1], _input(node, 2)
        y = node.output[0]
        sx, sw, sy = ctx.shape(x), ctx.shape(w), ctx.shape(y)
        if sx is None or sw is None or sy is None:
            return
        if ctx.const_source(w) is None or (bias and ctx.const_source(bias) is None):
            raise Barrier("computed weights or bias")
        if len(sx) != 3 or len(sw) != 2:
            raise Barrier(f"input of rank {len(sx)} / weights of rank {len(sw)}")
        h, dq, dk, dv = self.sizes(node, ctx.attr, sw[1])
        if dq + dk + dv != sw[1] or dq % h or dk % h or dv % h or dq != dk or sy[2] != dv:
            raise Barrier(f"weights [{sw[0]}, {sw[1]}] are not Q, K, V blocks of num_heads={h}")
        _pass_batch(ctx, x, y, 2)
        # input channels: rows of the packed weights (exact, a constant operand)
        ctx.slot(w, 0, Role.CONSUMER)
        ctx.identity(x, 2, w, 0)
        _cover_all(ctx, [_input(node, 3), _input(node, 6)])  # mask_index, past_sequence_length
        heads = [(w, 1), (bias, 0), (y, 2)]
        why = None
        if ctx.head_mode != "heads":
            why = HEADS_ONLY
        elif _input(node, 4) or _output(node, 1):
            why = "past / present state is not followed"
        elif _input(node, 5):
            why = "attention_bias is not followed"
        elif int(ctx.attr("do_rotary") or 0):
            why = "do_rotary is not followed"
        if why is not None:
            _cover_all(ctx, [_input(node, 4), _input(node, 5), _output(node, 1)])
            _freeze_heads(node, ctx, heads, why)
            return
        ctx.slot(w, 1, Role.PRODUCER)
        if bias:
            ctx.slot(bias, 0, Role.PARAM)
            ctx.identity(bias, 0, w, 1)
        hq, hv = dq // h, dv // h
        # column c of block q/k/v belongs to head c // head_size: tie it to that head's first output element
        cols = np.arange(sw[1])
        head = np.concatenate([np.arange(dq) // hq, np.arange(dk) // hq, np.arange(dv) // hv])
        ctx.link(w, 1, cols, y, 2, head * hv)
        _tie_heads(ctx, y, 2, hv)
        ctx.mark_attention(y, 2, "heads")

    def rewrite(self, node: Node, rw: RewriteCtx) -> None:
        w, y = node.input[1], node.output[0]
        old, new = rw.old_shape(w), rw.new_shape(w)
        if old == new or old[1] == new[1]:
            return
        h, dq, dk, dv = self.sizes(node, lambda a: rw.attr(node, a), old[1])
        hv = dv // h
        h_new = int(rw.new_shape(y)[2]) // hv
        rw.set_attr(node, "num_heads", h_new)
        if rw.attr(node, "qkv_hidden_sizes"):
            rw.set_attr(node, "qkv_hidden_sizes", [dq // h * h_new, dk // h * h_new, hv * h_new])

    def macs(self, node: Node, shape_of: ShapeOf, const_of: ConstOf) -> int:
        x, w = shape_of(node.input[0]), shape_of(node.input[1])
        if x is None or w is None or len(x) != 3:
            return 0
        b, s, _ = x
        h, dq, dk, dv = self.sizes(node, lambda a: attr(node, a), w[1])
        return int(b * s * x[2] * w[1] + b * s * s * (dq + dv))


@register
class MultiHeadAttention(Handler):
    """com.microsoft MultiHeadAttention on separate 3-D query, key, value."""

    op_types = ("MultiHeadAttention",)
    domain = DOMAIN
    since = 1
    shape_stand_in = "Identity"  # output 0: the batch and sequence axes of input 0, a static last axis

    def analyze(self, node: Node, ctx: AnalysisCtx) -> None:
        q, k, v, bias = (_input(node, i) for i in range(4))
        y = node.output[0]
        sq, sy = ctx.shape(q), ctx.shape(y)
        if sq is None or sy is None:
            return
        h = int(ctx.attr("num_heads"))
        _pass_batch(ctx, q, y, 2)
        _cover_all(ctx, [q, k, v, _input(node, 4), _input(node, 8)] + list(node.output[1:]))
        heads = [(q, 2), (k, 2), (v, 2), (bias, 0), (y, 2)] + [(t, 1) for t in node.output[1:3] if t]
        sk, sv = ctx.shape(k), ctx.shape(v)
        why = None
        if ctx.head_mode != "heads":
            why = HEADS_ONLY
        elif len(sq) != 3 or sk is None or sv is None or len(sk) != 3 or len(sv) != 3:
            why = "only separate 3-D query, key and value ([B, S, heads * head_size]) are followed"
        elif any(_input(node, i) for i in (5, 6, 7, 9)):
            why = "attention_bias, past_key / past_value and cache_indirection are not followed"
        elif _output(node, 3):
            why = "the qk output is not followed"
        elif bias and ctx.const_source(bias) is None:
            why = "a computed bias is not followed"
        elif sq[2] % h or sk[2] % h or sv[2] % h or sq[2] != sk[2] or sy[2] != sv[2]:
            why = f"hidden sizes {sq[2]}, {sk[2]}, {sv[2]} are not num_heads={h} heads"
        if why is not None:
            _cover_all(ctx, [bias])
            _freeze_heads(node, ctx, heads, why)
            return
        dq, dv = sq[2] // h, sv[2] // h
        _tie_heads(ctx, q, 2, dq)
        e = np.arange(sq[2])
        ctx.link(k, 2, e, q, 2, _heads_of(sq[2], dq))
        ev = np.arange(sv[2])
        ctx.link(v, 2, ev, q, 2, (ev // dv) * dq)
        ctx.link(y, 2, ev, q, 2, (ev // dv) * dq)
        if bias:
            nb = ctx.shape(bias)[0]
            if nb != 2 * sq[2] + sv[2]:
                raise Barrier(f"bias of {nb} is not query, key and value biases")
            ctx.slot(bias, 0, Role.PARAM)
            cols = np.arange(nb)
            head = np.concatenate([e // dq, e // dq, ev // dv])
            ctx.link(bias, 0, cols, q, 2, head * dq)
        for t in node.output[1:3]:  # present_key / present_value [B, H, T, d]
            if t and ctx.rank(t) == 4:
                hh = np.arange(h)
                ctx.link(t, 1, hh, q, 2, hh * dq)
        ctx.mark_attention(q, 2, "heads")

    def rewrite(self, node: Node, rw: RewriteCtx) -> None:
        q = node.input[0]
        old, new = rw.old_shape(q), rw.new_shape(q)
        if old == new:
            return
        h = int(rw.attr(node, "num_heads"))
        rw.set_attr(node, "num_heads", int(new[2]) // (old[2] // h))

    def macs(self, node: Node, shape_of: ShapeOf, const_of: ConstOf) -> int:
        q, k, v = (shape_of(_input(node, i)) if _input(node, i) else None for i in range(3))
        if q is None or k is None or v is None or len(q) != 3 or len(k) != 3 or len(v) != 3:
            return 0
        return int(q[0] * q[1] * k[1] * (q[2] + v[2]))


@register
class GroupQueryAttention(Handler):
    """com.microsoft GroupQueryAttention: a unit is a KV group."""

    op_types = ("GroupQueryAttention",)
    domain = DOMAIN
    since = 1
    shape_stand_in = "Identity"  # output 0: the batch and sequence axes of input 0, a static last axis

    def analyze(self, node: Node, ctx: AnalysisCtx) -> None:
        q, k, v, pk, pv = (_input(node, i) for i in range(5))
        y = node.output[0]
        sq, sy = ctx.shape(q), ctx.shape(y)
        if sq is None or sy is None:
            return
        hq, hkv = int(ctx.attr("num_heads")), int(ctx.attr("kv_num_heads"))
        _pass_batch(ctx, q, y, 2)
        _cover_all(ctx, [q, k, v, pk, pv] + list(node.input[5:]) + list(node.output[1:]))
        packed = not k
        kv_axes = [(t, 1) for t in (pk, pv, _output(node, 1), _output(node, 2)) if t]
        heads = [(q, 2), (k, 2), (v, 2), (y, 2)] + kv_axes
        sab = ctx.shape(_input(node, 10))
        why = None
        if ctx.head_mode != "heads":
            why = HEADS_ONLY
        elif len(sq) != 3 or hkv < 1 or hq % hkv:
            why = f"query of rank {len(sq)}, num_heads={hq}, kv_num_heads={hkv}"
        elif sab is not None and len(sab) == 4 and sab[1] != 1:
            why = "an attention_bias with a head axis is not followed"
        elif any(_input(node, i) for i in (11, 12, 13)):
            why = "head_sink and k_scale / v_scale are not followed"
        elif _output(node, 3):
            why = "output_qk is not followed"
        elif int(ctx.attr("kv_cache_bit_width") or 0):
            why = "a quantized KV cache is not followed"
        if why is None:
            d = sy[2] // hq
            if sy[2] != hq * d or sq[2] != (hq * d if not packed else (hq + 2 * hkv) * d):
                why = f"query of {sq[2]} channels is not num_heads={hq} (+ 2 x kv_num_heads={hkv}) heads"
            elif not packed and (ctx.shape(k) is None or ctx.shape(v) is None or ctx.shape(k)[-1] != hkv * d
                                 or ctx.shape(v)[-1] != hkv * d or len(ctx.shape(k)) != 3):
                why = f"key / value are not [B, S, kv_num_heads * {d}]"
        if why is not None:
            _freeze_heads(node, ctx, heads, why)
            return
        r = hq // hkv
        group_q = (np.arange(hq * d) // d) // r  # kv group of each query element
        gkv = np.arange(hkv * d) // d  # kv group of each key / value element
        # every element is tied to its group's first output element
        ey = np.arange(hq * d)
        ctx.link(y, 2, ey, y, 2, group_q * r * d)
        if packed:
            head = np.concatenate([group_q, gkv, gkv])
            ctx.link(q, 2, np.arange(sq[2]), y, 2, head * r * d)
        else:
            ctx.link(q, 2, ey, y, 2, group_q * r * d)
            for t in (k, v):
                ctx.link(t, 2, np.arange(hkv * d), y, 2, gkv * r * d)
        g = np.arange(hkv)
        for t, ax in kv_axes:
            if ctx.rank(t) == 4 and (ctx.shape(t) or ())[1] == hkv:
                ctx.link(t, ax, g, y, 2, g * r * d)
            else:
                ctx.freeze(t, ax, f"{_where(node)}: past / present of shape {ctx.shape(t)} is not [B, kv_heads, T, d]")
        ctx.mark_attention(y, 2, "heads")

    def rewrite(self, node: Node, rw: RewriteCtx) -> None:
        y = node.output[0]
        old, new = rw.old_shape(y), rw.new_shape(y)
        if old == new:
            return
        hq, hkv = int(rw.attr(node, "num_heads")), int(rw.attr(node, "kv_num_heads"))
        d = old[2] // hq
        hq_new = int(new[2]) // d
        rw.set_attr(node, "num_heads", hq_new)
        rw.set_attr(node, "kv_num_heads", hq_new // (hq // hkv))

    def macs(self, node: Node, shape_of: ShapeOf, const_of: ConstOf) -> int:
        y, q = shape_of(node.output[0]), shape_of(node.input[0])
        if y is None or q is None or len(y) != 3:
            return 0
        t = q[1]
        pk = shape_of(_input(node, 3)) if _input(node, 3) else None
        if pk is not None and len(pk) == 4:
            t += pk[2]
        return int(2 * y[0] * y[1] * t * y[2])


@register
class RotaryEmbedding(Handler):
    """com.microsoft RotaryEmbedding: every head rotated alike."""

    op_types = ("RotaryEmbedding",)
    domain = DOMAIN
    since = 1
    shape_stand_in = "Identity"  # output 0: the batch and sequence axes of input 0, a static last axis

    def head_size(self, node: Node, ctx: AnalysisCtx, hidden: int) -> int | None:
        h = int(ctx.attr("num_heads") or 0)
        if h:
            return hidden // h if hidden % h == 0 else None
        cos = ctx.shape(_input(node, 2))
        if cos is None or int(ctx.attr("rotary_embedding_dim") or 0):
            return None
        return 2 * cos[-1]

    def analyze(self, node: Node, ctx: AnalysisCtx) -> None:
        x, y = node.input[0], node.output[0]
        sx = ctx.shape(x)
        if sx is None or ctx.shape(y) != sx:
            return
        _cover_all(ctx, node.input[1:4])
        r = len(sx)
        for ax in range(r):
            ctx.identity(x, ax, y, ax)
        if int(ctx.attr("is_packed_batching") or 0):
            _freeze_heads(node, ctx, [(x, ax) for ax in range(r)], "packed batching is not followed")
            return
        if r == 4:  # [B, H, S, d]: heads pass; pairs of head dimensions share a cache column
            ctx.freeze(x, 3, f"{_where(node)}: rotates pairs of head dimensions (one cache column per pair)")
            ctx.mark_attention(x, 1, "heads")
            return
        if r != 3:
            raise Barrier(f"input of rank {r}")
        d = self.head_size(node, ctx, sx[2])
        if ctx.head_mode != "heads":
            ctx.freeze(x, 2, f"{_where(node)}: {HEADS_ONLY}")
        elif d is None or sx[2] % d:
            ctx.freeze(x, 2, f"{_where(node)}: head size unknown (no num_heads)")
        else:
            _tie_heads(ctx, x, 2, d)
            ctx.mark_attention(x, 2, "heads")

    def rewrite(self, node: Node, rw: RewriteCtx) -> None:
        x = node.input[0]
        old, new = rw.old_shape(x), rw.new_shape(x)
        h = int(rw.attr(node, "num_heads") or 0)
        if old == new or len(old) != 3 or not h:
            return
        rw.set_attr(node, "num_heads", int(new[2]) // (old[2] // h))
