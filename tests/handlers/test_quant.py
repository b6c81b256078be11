"""Quantized ops (handlers/quant.py): QDQ graphs (QuantizeLinear / DequantizeLinear around weights and
activations, per channel and per tensor, opsets 12, 17 and 21, and onnxruntime's com.microsoft versions
for 16-bit types), QOperator graphs (QLinearConv dense,
grouped and depthwise, QLinearMatMul, ConvInteger and MatMulInteger behind DynamicQuantizeLinear, and
onnxruntime's QGemm, QLinearAdd, QLinearMul, QLinearSigmoid, QLinearLeakyRelu, QLinearAveragePool,
QLinearGlobalAveragePool, QLinearConcat), and the barriers (blocked quantization, per-row scales of a
matrix product's first operand, DynamicQuantizeLinear after an op that does not keep zeros).

Every graph routes the channels of a quantized producer through the op under test into a quantized
consumer. Weights are uint8 with per-channel zero points near 128 (or int8 with non-zero ones), so a
masked original that zeroed a weight instead of setting it to its zero point would differ: the
comparison is bit-exact (relative error exactly 0) wherever the outputs are dequantized integers, and
below ``checks.TOL`` where a float op ends the graph. The zoo acceptance is tests/test_quantized.py."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import onnx
import pytest

from onnxprune import pipeline
from onnxprune.errors import NothingToPrune
from onnxprune.measure.stats import stats_at
from onnxprune.measure.verify import compare, masked_original
from onnxprune.runtime.inputs import make_inputs
from onnxprune.testing import checks
from onnxprune.testing.graphs import MS, Case, from_text, header

H12, H17, H21, Q17 = header(12), header(17), header(21), header(17, MS)
_RNG = np.random.default_rng(7)


def qbuild(text: str, values: dict, seed: int = 0) -> onnx.ModelProto:
    """Parse ``text``; every initializer declared without a value gets ``values[name]`` or, by type:
    int8 weights uniform in [-60, 60], uint8 in [70, 190], int32 biases in [-300, 300], floats N(0, 0.3²)."""

    def fill(name, dims, dtype, rng):
        if name in values:
            return np.asarray(values[name])
        if dtype == np.int8:
            return rng.integers(-60, 61, size=dims)
        if dtype == np.uint8:
            return rng.integers(70, 191, size=dims)
        if dtype == np.int32:
            return rng.integers(-300, 301, size=dims)
        return rng.standard_normal(dims) * 0.3

    return from_text(text, seed=seed, fill=fill)


def chan(n: int, signed: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """A per-channel weight (scale, zero point): scales in [0.004, 0.008], zero points near 128 (uint8)
    or in [-6, 6] (int8), all different."""
    zp = _RNG.integers(-6, 7, n) if signed else _RNG.integers(118, 139, n)
    return _RNG.uniform(0.004, 0.008, n).astype(np.float32), zp


def wvals(name: str, n: int, signed: bool = False) -> dict:
    s, z = chan(n, signed)
    return {f"{name}s": s, f"{name}z": z}


ACT = {"xs": 0.03, "xz": 128, "hs": 0.06, "hz": 128, "ms": 0.06, "mz": 128, "ys": 0.12, "yz": 128}


@dataclass(frozen=True)
class QCase(Case):
    """A ``Case`` whose quantization parameters are given (``values``); ``exact``: the outputs are
    dequantized integers, compared bit for bit."""

    values: dict = field(default_factory=dict)
    exact: bool = True

    def model(self) -> onnx.ModelProto:
        return qbuild(self.text, {**ACT, **self.values})


def assert_quantized_exact(res, model: onnx.ModelProto, case: QCase) -> None:
    """``checks.assert_exact`` (verification, full checker, another batch size, shapes, MACs and
    parameters drop), and bit-exact where the case's outputs are dequantized integers."""
    checks.assert_exact(res, model, case.expect)
    if case.exact:
        assert all(o.rel_error == 0.0 for o in res.verification.outputs), res.verification.to_json()
        an = res.analysis
        feeds = make_inputs(an.model, batch=3, seed=5)
        v = compare(an.model, masked_original(an.model, an.cg, res.plan), res.pruned, feeds, "cpu", tol=0.0)
        assert v.passed, v.to_json()


# ----------------------------------------------------------------------------------------------
# QDQ graphs

_W1 = wvals("w1", 8)
_W1["b1s"] = np.float32(ACT["xs"]) * _W1["w1s"]  # a bias's scale is x_scale * w_scale (or it is not fused)

QDQ_CONV = H17 + """
g (float[N,3,8,8] x) => (float[N,4,8,8] y)
<float xs, uint8 xz, uint8[8,3,3,3] w1, float[8] w1s, uint8[8] w1z, int32[8] b1, float[8] b1s, float hs, uint8 hz,
 uint8[4,8,3,3] w2, float[4] w2s, uint8[4] w2z, float ys, uint8 yz MID_DECL>
{
  xq = QuantizeLinear(x, xs, xz)
  xd = DequantizeLinear(xq, xs, xz)
  w1d = DequantizeLinear<axis=0>(w1, w1s, w1z)
  b1d = DequantizeLinear<axis=0>(b1, b1s)
  h = Conv<pads=[1,1,1,1]>(xd, w1d, b1d)
  hq = QuantizeLinear(h, hs, hz)
  hd = DequantizeLinear(hq, hs, hz)
  MID
  w2d = DequantizeLinear<axis=0>(w2, w2s, w2z)
  c = Conv<pads=[1,1,1,1]>(md, w2d)
  cq = QuantizeLinear(c, ys, yz)
  y = DequantizeLinear(cq, ys, yz)
}"""
QDQ_EXPECT = {"w1": (4, 3, 3, 3), "w1s": (4,), "w1z": (4,), "b1": (4,), "b1s": (4,), "w2": (4, 4, 3, 3)}


def qdq_conv(mid: str = "md = Identity(hd)", decl: str = "") -> str:
    return QDQ_CONV.replace("MID_DECL", decl).replace("MID", mid)


QDQ_CASES = [
    QCase("QDQ-Conv-per-channel-uint8", qdq_conv(), QDQ_EXPECT, values={**_W1, **wvals("w2", 4)}),
    QCase("QDQ-Conv-depthwise-per-channel", qdq_conv(
        "wdd = DequantizeLinear<axis=0>(wd, wds, wdz)\n  dc = Conv<group=8, pads=[1,1,1,1]>(hd, wdd)\n"
        "  dq = QuantizeLinear(dc, ms, mz)\n  md = DequantizeLinear(dq, ms, mz)",
        ", uint8[8,1,3,3] wd, float[8] wds, uint8[8] wdz, float ms, uint8 mz"),
        {**QDQ_EXPECT, "wd": (4, 1, 3, 3), "wds": (4,), "wdz": (4,)},
        values={**_W1, **wvals("w2", 4), **wvals("wd", 8)}),
    # per-channel quantization of an activation: its scale and zero point are sliced with the channels;
    # the float Conv after it makes the output float (compared by relative error)
    QCase("QDQ-per-channel-activation", H17 + """
g (float[N,3,8,8] x) => (float[N,4,8,8] y)
<float[8,3,3,3] w1, float[8] b1, float[8] as, uint8[8] az, float[4,8,3,3] w2>
{
  h = Conv<pads=[1,1,1,1]>(x, w1, b1)
  q = QuantizeLinear<axis=1>(h, as, az)
  d = DequantizeLinear<axis=1>(q, as, az)
  y = Conv<pads=[1,1,1,1]>(d, w2)
}""", {"w1": (4, 3, 3, 3), "b1": (4,), "as": (4,), "az": (4,), "w2": (4, 4, 3, 3)},
        values={"as": _RNG.uniform(0.02, 0.04, 8), "az": _RNG.integers(100, 150, 8)}, exact=False),
    # onnxruntime's com.microsoft QuantizeLinear / DequantizeLinear (uint16 activations): per-channel weights
    # with an ``axis``; the float Conv at the end makes the output float
    QCase("QDQ-contrib-uint16", Q17 + """
g (float[N,3,8,8] x) => (float[N,4,8,8] y)
<float xs, uint16 xz, uint8[8,3,3,3] w1, float[8] w1s, uint8[8] w1z, float hs, uint16 hz, float[4,8,3,3] w2>
{
  xq = com.microsoft.QuantizeLinear(x, xs, xz)
  xd = com.microsoft.DequantizeLinear(xq, xs, xz)
  w1d = com.microsoft.DequantizeLinear<axis=0>(w1, w1s, w1z)
  h = Conv<pads=[1,1,1,1]>(xd, w1d)
  hq = com.microsoft.QuantizeLinear(h, hs, hz)
  hd = com.microsoft.DequantizeLinear(hq, hs, hz)
  y = Conv<pads=[1,1,1,1]>(hd, w2)
}""", {"w1": (4, 3, 3, 3), "w1s": (4,), "w1z": (4,), "w2": (4, 4, 3, 3)},
        values={**wvals("w1", 8), "xs": 1e-4, "xz": 32768, "hs": 2e-4, "hz": 32768}, exact=False),
    # opset 12 (QuantizeLinear10/DequantizeLinear10): per-tensor only, int8 weight with zero point 5
    QCase("QDQ-opset12-per-tensor-int8", H12 + """
g (float[N,3,8,8] x) => (float[N,4,8,8] y)
<float xs, uint8 xz, int8[8,3,3,3] w1, float w1s, int8 w1z, float hs, uint8 hz, int8[4,8,3,3] w2, float w2s,
 int8 w2z, float ys, uint8 yz>
{
  xq = QuantizeLinear(x, xs, xz)
  xd = DequantizeLinear(xq, xs, xz)
  w1d = DequantizeLinear(w1, w1s, w1z)
  h = Conv<pads=[1,1,1,1]>(xd, w1d)
  hq = QuantizeLinear(h, hs, hz)
  hd = DequantizeLinear(hq, hs, hz)
  w2d = DequantizeLinear(w2, w2s, w2z)
  c = Conv<pads=[1,1,1,1]>(hd, w2d)
  cq = QuantizeLinear(c, ys, yz)
  y = DequantizeLinear(cq, ys, yz)
}""", {"w1": (4, 3, 3, 3), "w2": (4, 4, 3, 3)}, values={"w1s": 0.006, "w1z": 5, "w2s": 0.006, "w2z": -4}),
    # opset 21 (the blocked-quantization class without blocks) and MatMul weights per column (axis 1)
    QCase("QDQ-opset21-MatMul-per-column", H21 + """
g (float[N,5,16] x) => (float[N,5,4] y)
<float xs, uint8 xz, uint8[16,8] w1, float[8] w1s, uint8[8] w1z, float hs, uint8 hz, uint8[8,4] w2, float[4] w2s,
 uint8[4] w2z, float ys, uint8 yz>
{
  xq = QuantizeLinear(x, xs, xz)
  xd = DequantizeLinear(xq, xs, xz)
  w1d = DequantizeLinear<axis=1>(w1, w1s, w1z)
  h = MatMul(xd, w1d)
  hq = QuantizeLinear(h, hs, hz)
  hd = DequantizeLinear(hq, hs, hz)
  w2d = DequantizeLinear<axis=1>(w2, w2s, w2z)
  c = MatMul(hd, w2d)
  cq = QuantizeLinear(c, ys, yz)
  y = DequantizeLinear(cq, ys, yz)
}""", {"w1": (16, 4), "w1s": (4,), "w1z": (4,), "w2": (4, 4)},
        values={**wvals("w1", 8), **wvals("w2", 4), "hs": 0.05, "ys": 0.06}, input_shapes={"x": (2, 5, 16)}),
    QCase("QDQ-Gemm-transB-bias", H17 + """
g (float[N,16] x) => (float[N,4] y)
<float xs, uint8 xz, int8[8,16] w1, float[8] w1s, int8[8] w1z, int32[8] b1, float[8] b1s, float hs, uint8 hz,
 int8[4,8] w2, float[4] w2s, int8[4] w2z, float ys, uint8 yz>
{
  xq = QuantizeLinear(x, xs, xz)
  xd = DequantizeLinear(xq, xs, xz)
  w1d = DequantizeLinear<axis=0>(w1, w1s, w1z)
  b1d = DequantizeLinear<axis=0>(b1, b1s)
  h = Gemm<transB=1>(xd, w1d, b1d)
  hq = QuantizeLinear(h, hs, hz)
  hd = DequantizeLinear(hq, hs, hz)
  w2d = DequantizeLinear<axis=0>(w2, w2s, w2z)
  c = Gemm<transB=1>(hd, w2d)
  cq = QuantizeLinear(c, ys, yz)
  y = DequantizeLinear(cq, ys, yz)
}""", {"w1": (4, 16), "w1s": (4,), "w1z": (4,), "b1": (4,), "b1s": (4,), "w2": (4, 4)},
        values={**_W1, **wvals("w2", 4, signed=True), "w1z": _RNG.integers(-6, 7, 8), "hs": 0.05, "ys": 0.05}),
]

# ----------------------------------------------------------------------------------------------
# QOperator graphs

QOP = Q17 + """
g (float[N,3,8,8] x) => (float[N,4,8,8] y)
<float xs, uint8 xz, uint8[8,3,3,3] w1, float[8] w1s, uint8[8] w1z, int32[8] b1, float hs, uint8 hz,
 uint8[4,W2C,3,3] w2, float[4] w2s, uint8[4] w2z, float ys, uint8 yz MID_DECL>
{
  xq = QuantizeLinear(x, xs, xz)
  h = QLinearConv<pads=[1,1,1,1]>(xq, xs, xz, w1, w1s, w1z, hs, hz, b1)
  MID
  c = QLinearConv<pads=[1,1,1,1]>(m, ms, mz, w2, w2s, w2z, ys, yz)
  y = DequantizeLinear(c, ys, yz)
}"""
QOP_EXPECT = {"w1": (4, 3, 3, 3), "w1s": (4,), "w1z": (4,), "b1": (4,), "w2": (4, 4, 3, 3), "w2s": (4,), "w2z": (4,)}
_QOP_W = {**wvals("w1", 8), **wvals("w2", 4)}


def qop(mid: str, decl: str = "", w2c: int = 8) -> str:
    return QOP.replace("MID_DECL", decl).replace("MID", mid).replace("W2C", str(w2c))


QOP_CASES = [
    QCase("QLinearConv-per-channel-uint8", qop("m = Identity(h)", ", float ms, uint8 mz"), QOP_EXPECT, values=_QOP_W),
    QCase("QLinearConv-depthwise", qop("m = QLinearConv<group=8, pads=[1,1,1,1]>(h, hs, hz, wd, wds, wdz, ms, mz)",
                                       ", uint8[8,1,3,3] wd, float[8] wds, uint8[8] wdz, float ms, uint8 mz"),
          {**QOP_EXPECT, "wd": (4, 1, 3, 3), "wds": (4,), "wdz": (4,)}, values={**_QOP_W, **wvals("wd", 8)}),
    # grouped (2 groups of 4): the same in-group positions go from both groups, ``group`` stays
    QCase("QLinearConv-grouped", qop("m = QLinearConv<group=2, pads=[1,1,1,1]>(h, hs, hz, wg, wgs, wgz, ms, mz)",
                                     ", uint8[8,4,3,3] wg, float[8] wgs, uint8[8] wgz, float ms, uint8 mz"),
          {"w1": (4, 3, 3, 3), "wg": (4, 2, 3, 3), "w2": (4, 4, 3, 3)}, values={**_QOP_W, **wvals("wg", 8)}),
    QCase("QLinearAdd-residual", qop(
        "h2 = QLinearConv<pads=[1,1,1,1]>(xq, xs, xz, w3, w3s, w3z, hs, hz)\n"
        "  m = com.microsoft.QLinearAdd(h, hs, hz, h2, hs, hz, ms, mz)",
        ", uint8[8,3,3,3] w3, float[8] w3s, uint8[8] w3z, float ms, uint8 mz"),
          {**QOP_EXPECT, "w3": (4, 3, 3, 3), "w3s": (4,), "w3z": (4,)}, values={**_QOP_W, **wvals("w3", 8)}),
    # a constant per-channel operand (uint8, per-tensor zero point) is a param slot, sliced
    QCase("QLinearMul-constant", qop("m = com.microsoft.QLinearMul(h, hs, hz, k, ks, kz, ms, mz)",
                                     ", uint8[1,8,1,1] k, float ks, uint8 kz, float ms, uint8 mz"),
          {**QOP_EXPECT, "k": (1, 4, 1, 1)}, values={**_QOP_W, "ks": 0.01, "kz": 40, "ms": 0.08}),
    QCase("QLinearSigmoid-QLinearLeakyRelu", qop(
        "g = com.microsoft.QLinearLeakyRelu<alpha=0.1>(h, hs, hz, gs, gz)\n"
        "  m = com.microsoft.QLinearSigmoid(g, gs, gz, ms, mz)",
        ", float gs, uint8 gz, float ms, uint8 mz"), QOP_EXPECT,
          values={**_QOP_W, "gs": 0.05, "gz": 60, "ms": 1 / 256, "mz": 0}),
    QCase("QLinearAveragePool", qop(
        "m = com.microsoft.QLinearAveragePool<kernel_shape=[3,3], pads=[1,1,1,1], count_include_pad=1>"
        "(h, hs, hz, ms, mz)", ", float ms, uint8 mz"), QOP_EXPECT, values={**_QOP_W, "ms": 0.03}),
    # concatenated with the channels of another producer: offsets along the channel axis
    QCase("QLinearConcat", qop(
        "h2 = QLinearConv<pads=[1,1,1,1]>(xq, xs, xz, w3, w3s, w3z, ms, mz)\n"
        "  m = com.microsoft.QLinearConcat<axis=1>(ms, mz, h, hs, hz, h2, ms, mz)",
        ", uint8[8,3,3,3] w3, float[8] w3s, uint8[8] w3z, float ms, uint8 mz", w2c=16),
          {**QOP_EXPECT, "w3": (4, 3, 3, 3), "w2": (4, 8, 3, 3)},
          values={**wvals("w1", 8), **wvals("w3", 8), **wvals("w2", 4)}),
    # QLinearGlobalAveragePool, Flatten, then QGemm with a per-column weight, an int32 bias and a float output
    QCase("QLinearGlobalAveragePool-QGemm", Q17 + """
g (float[N,3,8,8] x) => (float[N,4] y)
<float xs, uint8 xz, uint8[8,3,3,3] w1, float[8] w1s, uint8[8] w1z, float hs, uint8 hz, float ps, uint8 pz,
 uint8[4,8] w2, float[4] w2s, uint8[4] w2z, int32[4] b2>
{
  xq = QuantizeLinear(x, xs, xz)
  h = QLinearConv<pads=[1,1,1,1]>(xq, xs, xz, w1, w1s, w1z, hs, hz)
  p = com.microsoft.QLinearGlobalAveragePool<channels_last=0>(h, hs, hz, ps, pz)
  f = Flatten(p)
  y = com.microsoft.QGemm<transB=1>(f, ps, pz, w2, w2s, w2z, b2)
}""", {"w1": (4, 3, 3, 3), "w1s": (4,), "w1z": (4,), "w2": (4, 4)},
          values={**wvals("w1", 8), **wvals("w2", 4), "ps": 0.01}),
    # QGemm with a requantized output, weight [K, N] (transB=0): per column is axis 1
    QCase("QGemm-requantized", Q17 + """
g (float[N,16] x) => (float[N,4] y)
<float xs, uint8 xz, uint8[16,8] w1, float[8] w1s, uint8[8] w1z, int32[8] b1, float hs, uint8 hz,
 uint8[8,4] w2, float[4] w2s, uint8[4] w2z, int32[4] b2, float ys, uint8 yz>
{
  xq = QuantizeLinear(x, xs, xz)
  h = com.microsoft.QGemm(xq, xs, xz, w1, w1s, w1z, b1, hs, hz)
  c = com.microsoft.QGemm(h, hs, hz, w2, w2s, w2z, b2, ys, yz)
  y = DequantizeLinear(c, ys, yz)
}""", {"w1": (16, 4), "w1s": (4,), "w1z": (4,), "b1": (4,), "w2": (4, 4)},
          values={**wvals("w1", 8), **wvals("w2", 4), "hs": 0.05, "ys": 0.05}),
    QCase("QLinearMatMul-per-column", Q17 + """
g (float[N,5,16] x) => (float[N,5,4] y)
<float xs, uint8 xz, uint8[16,8] w1, float[8] w1s, uint8[8] w1z, float hs, uint8 hz, uint8[8,4] w2, float[4] w2s,
 uint8[4] w2z, float ys, uint8 yz>
{
  xq = QuantizeLinear(x, xs, xz)
  h = QLinearMatMul(xq, xs, xz, w1, w1s, w1z, hs, hz)
  c = QLinearMatMul(h, hs, hz, w2, w2s, w2z, ys, yz)
  y = DequantizeLinear(c, ys, yz)
}""", {"w1": (16, 4), "w1s": (4,), "w1z": (4,), "w2": (4, 4)},
          values={**wvals("w1", 8), **wvals("w2", 4), "hs": 0.05, "ys": 0.06}, input_shapes={"x": (2, 5, 16)}),
]

# ----------------------------------------------------------------------------------------------
# dynamic quantization: DynamicQuantizeLinear ranges over the whole tensor; exact once the removed
# channels are zero (their producers are masked too). The weight scales are per tensor, so only the
# weights' masking to their zero point makes the removed channels zero (a per-channel scale is a param
# slot of the scaling Mul and would be zeroed too)

DYN_CASES = [
    QCase("ConvInteger-DynamicQuantizeLinear", H17 + """
g (float[N,3,8,8] x) => (float[N,4,8,8] y)
<uint8[8,3,3,3] w1, uint8 w1z, float w1s, float[1,8,1,1] b1, uint8[4,8,3,3] w2, uint8 w2z, float w2s>
{
  xq, xs, xz = DynamicQuantizeLinear(x)
  a = ConvInteger<pads=[1,1,1,1]>(xq, w1, xz, w1z)
  af = Cast<to=1>(a)
  s1 = Mul(xs, w1s)
  h0 = Mul(af, s1)
  h1 = Add(h0, b1)
  h = Relu(h1)
  p = MaxPool<kernel_shape=[3,3], pads=[1,1,1,1]>(h)
  hq, hs, hz = DynamicQuantizeLinear(p)
  c = ConvInteger<pads=[1,1,1,1]>(hq, w2, hz, w2z)
  cf = Cast<to=1>(c)
  s2 = Mul(hs, w2s)
  y = Mul(cf, s2)
}""", {"w1": (4, 3, 3, 3), "b1": (1, 4, 1, 1), "w2": (4, 4, 3, 3)},
          values={"w1z": 131, "w1s": 0.006, "w2z": 125, "w2s": 0.006}),
    QCase("MatMulInteger-per-column-DynamicQuantizeLinear", H17 + """
g (float[N,5,16] x) => (float[N,5,4] y)
<float lo = {0.0}, float hi = {20.0}, uint8[16,8] w1, uint8[8] w1z, float w1s, float[8] b1, uint8[8,4] w2,
 uint8[4] w2z, float[4] w2s>
{
  xq, xs, xz = DynamicQuantizeLinear(x)
  a = MatMulInteger(xq, w1, xz, w1z)
  af = Cast<to=1>(a)
  s1 = Mul(xs, w1s)
  h0 = Mul(af, s1)
  h1 = Add(h0, b1)
  h = Clip(h1, lo, hi)
  hq, hs, hz = DynamicQuantizeLinear(h)
  c = MatMulInteger(hq, w2, hz, w2z)
  cf = Cast<to=1>(c)
  s2 = Mul(hs, w2s)
  y = Mul(cf, s2)
}""",
          {"w1": (16, 4), "w1z": (4,), "b1": (4,), "w2": (4, 4)},
          values={"w1z": wvals("w1", 8)["w1z"], "w1s": 0.006, **wvals("w2", 4)}, input_shapes={"x": (2, 5, 16)}),
]

CASES = QDQ_CASES + QOP_CASES + DYN_CASES


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_quantized_graph_is_exact(case: QCase):
    model = case.model()
    res = checks.prune_and_verify(model, case.ratio, input_shapes=case.input_shapes)
    assert_quantized_exact(res, model, case)


# MACs at batch 1 (the float ops' formulas): conv N·Cout·HW·Cin/g·k², matrix products prod(out)·K
MACS = {
    "QDQ-Conv-per-channel-uint8": 8 * 64 * 27 + 4 * 64 * 72,
    "QLinearConv-per-channel-uint8": 8 * 64 * 27 + 4 * 64 * 72,
    "QLinearConv-depthwise": 8 * 64 * 27 + 8 * 64 * 9 + 4 * 64 * 72,
    "QLinearConv-grouped": 8 * 64 * 27 + 8 * 64 * 36 + 4 * 64 * 72,
    "ConvInteger-DynamicQuantizeLinear": 8 * 64 * 27 + 4 * 64 * 72,
    "QLinearMatMul-per-column": 5 * 8 * 16 + 5 * 4 * 8,
    "MatMulInteger-per-column-DynamicQuantizeLinear": 5 * 8 * 16 + 5 * 4 * 8,
    "QGemm-requantized": 8 * 16 + 4 * 8,
    "QLinearGlobalAveragePool-QGemm": 8 * 64 * 27 + 4 * 8,
}


@pytest.mark.parametrize("case_id", sorted(MACS))
def test_quantized_matrix_ops_count_their_float_macs(case_id):
    case = next(c for c in CASES if c.id == case_id)
    shapes = {k: (1, *v[1:]) for k, v in case.input_shapes.items()} if case.input_shapes else None
    assert stats_at(case.model(), shapes).macs == MACS[case_id]


def _removed_inputs(res, const: str, axis: int) -> np.ndarray:
    g = checks.group_of(res, const, axis)
    gp = res.plan.groups[g.id]
    sid = res.analysis.cg.space_ids[(const, axis)]
    removed = np.ones(g.size, dtype=bool)
    removed[gp.keep] = False
    return np.flatnonzero(removed[res.analysis.cg.unit_index(g, sid)])


@pytest.mark.parametrize("case_id", ["QLinearConv-per-channel-uint8", "QDQ-Conv-per-channel-uint8"])
def test_masked_original_sets_removed_inputs_to_the_zero_point(case_id):
    """The consumer weight's removed input channels hold each output channel's zero point (which
    dequantizes to 0), not 0; the kept ones are untouched, and nothing else changes."""
    case = next(c for c in CASES if c.id == case_id)
    model = case.model()
    res = checks.prune_and_verify(model, 0.5)
    masked = checks.inits(masked_original(res.analysis.model, res.analysis.cg, res.plan))
    orig = checks.inits(res.analysis.model)
    removed = _removed_inputs(res, "w2", 1)
    assert len(removed) == 4
    zp = orig["w2z"].astype(np.int64)
    got = masked["w2"][:, removed].astype(np.int64)
    np.testing.assert_array_equal(got, np.broadcast_to(zp[:, None, None, None], got.shape))
    assert not np.all(zp == 0)
    kept = np.setdiff1d(np.arange(8), removed)
    np.testing.assert_array_equal(masked["w2"][:, kept], orig["w2"][:, kept])
    assert all(np.array_equal(masked[k], v) for k, v in orig.items() if k != "w2")


def test_dynamic_quantization_masks_the_producers():
    """DynamicQuantizeLinear's group masks its producers (to their zero point) and its bias; the
    removed channels are then exactly zero before the range is taken."""
    case = next(c for c in CASES if c.id == "ConvInteger-DynamicQuantizeLinear")
    res = checks.prune_and_verify(case.model(), 0.5)
    g = checks.group_of(res, "w1", 0)
    assert g.mask_producers and not g.is_approximate
    masked = checks.inits(masked_original(res.analysis.model, res.analysis.cg, res.plan))
    removed = _removed_inputs(res, "w1", 0)
    assert np.all(masked["w1"][removed] == 131)  # the per-tensor zero point, not 0
    assert np.all(masked["b1"][0, removed] == 0)


def test_dynamic_quantization_after_a_non_zero_preserving_op_is_approximate():
    """Sigmoid(0) = 0.5: the removed channels are not zero at DynamicQuantizeLinear, whose range then
    depends on them. Frozen by default, with the reason; pruned only when approximate groups are allowed."""
    case = next(c for c in CASES if c.id == "ConvInteger-DynamicQuantizeLinear")
    model = qbuild(case.text.replace("h = Relu(h1)", "h = Sigmoid(h1)"), {**ACT, **case.values})
    with pytest.raises(NothingToPrune, match="approximate.*--allow-approximate.*DynamicQuantizeLinear"):
        checks.prune_and_verify(model, 0.5)
    g = checks.group_of(pipeline.analyze_model(model).cg, "w1", 0)
    assert g.is_approximate and not g.mask_producers
    res = checks.prune_and_verify(model, 0.5, allow_approximate=True)
    assert res.plan.pruned() and not res.verification.exact


def test_dequantized_weights_stay_quantized():
    """A DequantizeLinear of constants is never folded into a float weight: the pruned model keeps its
    uint8 weights behind DequantizeLinear (what lets onnxruntime run integer kernels)."""
    case = QDQ_CASES[0]
    res = checks.prune_and_verify(case.model(), 0.5)
    an = res.analysis
    assert sum(n.op_type == "DequantizeLinear" for n in an.model.graph.node) == 6
    pruned = checks.inits(res.pruned)
    assert pruned["w1"].dtype == np.uint8 and pruned["w2"].dtype == np.uint8
    assert not any(v.dtype == np.float32 and v.ndim == 4 for v in pruned.values())


def test_importance_scores_dequantized_weights():
    """Channels 0-3 of w1 have the same integers as channels 4-7 but 1/50 of the scale (and the bias and
    the consumer are the same for every channel): L2 on the dequantized weights removes exactly those;
    on the raw integers every channel would tie."""
    case = next(c for c in CASES if c.id == "QLinearConv-per-channel-uint8")
    rng = np.random.default_rng(3)
    w1 = np.tile(rng.integers(70, 191, (1, 3, 3, 3)), (8, 1, 1, 1))
    w1s = np.array([0.0001] * 4 + [0.005] * 4, dtype=np.float32)
    w2 = np.tile(rng.integers(70, 191, (4, 1, 3, 3)), (1, 8, 1, 1))
    model = qbuild(case.text, {**ACT, **case.values, "w1": w1, "w1s": w1s, "w1z": np.full(8, 128),
                               "b1": np.full(8, 100), "w2": w2})
    res = checks.prune_and_verify(model, 0.5)
    g = checks.group_of(res, "w1", 0)
    assert sorted(res.plan.groups[g.id].keep.tolist()) == [4, 5, 6, 7]
    assert res.verification.passed


# ----------------------------------------------------------------------------------------------
# barriers


def _frozen_with(model: onnx.ModelProto, const: str, axis: int, words: list[str], input_shapes=None) -> None:
    cg = pipeline.analyze_model(model, input_shapes=input_shapes).cg
    g = checks.group_of(cg, const, axis)
    assert not g.prunable
    assert any(all(w in r for w in words) for r in g.frozen), g.frozen


def test_blocked_quantization_is_a_barrier():
    text = H21 + """
g (float[N,16] x) => (float[N,4] y)
<int8[8,16] w1, float[8,2] w1s, float[4,8] w2>
{
  w1d = DequantizeLinear<axis=1, block_size=8>(w1, w1s)
  h = Gemm<transB=1>(x, w1d)
  y = Gemm<transB=1>(h, w2)
}"""
    _frozen_with(qbuild(text, {"w1s": np.full((8, 2), 0.01)}), "w2", 1, ["DequantizeLinear", "blocked quantization"])


def test_per_row_scale_of_a_matrix_product_is_a_barrier():
    """QLinearMatMul's per-row scales of ``a``: the spec's text and onnx's reference implementation lay
    them out differently, so the op is not followed."""
    case = next(c for c in CASES if c.id == "QLinearMatMul-per-column")
    text = case.text.replace("QLinearMatMul(xq, xs, xz,", "QLinearMatMul(xq, rs, rz,").replace(
        "float xs,", "float[5] rs, uint8[5] rz, float xs,")
    model = qbuild(text, {**ACT, **case.values, "rs": np.full(5, 0.03), "rz": np.full(5, 128)})
    _frozen_with(model, "w2", 0, ["QLinearMatMul", "'rs' has shape [5]", "only a per-tensor scale"],
                 case.input_shapes)


def test_unknown_quantized_contrib_op_is_a_barrier():
    model = qbuild(qop("m = com.microsoft.QLinearSoftmax<axis=1, opset=13>(h, hs, hz, ms, mz)",
                       ", float ms, uint8 mz"), {**ACT, **_QOP_W, "ms": 1 / 256, "mz": 0})
    cg = pipeline.analyze_model(model).cg
    assert "com.microsoft::QLinearSoftmax" in cg.unknown_ops
    assert not checks.group_of(cg, "w1", 0).prunable


def test_whole_conv_groups_of_a_quantized_conv():
    """--conv-groups whole through QLinearConv (its weight, scale and zero point at inputs 3-5): one of
    the two conv groups goes whole, its in-group kernel axis stays 4 wide, ``group`` becomes 1, and the
    per-channel scale and zero point follow the kept output channels."""
    case = next(c for c in CASES if c.id == "QLinearConv-grouped")
    model = case.model()
    res = checks.prune_and_verify(model, 0.5, conv_groups="whole")
    whole = dataclasses.replace(case, expect={"w1": (4, 3, 3, 3), "wg": (4, 4, 3, 3), "wgs": (4,), "wgz": (4,),
                                              "w2": (4, 4, 3, 3)})
    assert_quantized_exact(res, model, whole)
    groups = [onnx.helper.get_attribute_value(a) for n in res.pruned.graph.node if n.op_type == "QLinearConv"
              for a in n.attribute if a.name == "group"]
    assert groups == [1]
    o, p = checks.inits(model), checks.inits(res.pruned)
    kept = checks.kept_along(o["w1"], p["w1"], 0)
    assert kept in ([0, 1, 2, 3], [4, 5, 6, 7])  # a whole conv group of the two
    for name in ("wg", "wgs", "wgz"):
        np.testing.assert_array_equal(p[name], o[name][kept])
