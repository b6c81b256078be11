"""Per-handler tests: small graphs in ONNX text, pruned with ``prune_and_verify``.

Every graph routes a channel space *through* the op under test between a producer (Conv, Gemm or
MatMul with a constant weight) and a consumer, so that the removed channels reach a consumer weight:
a handler that links the wrong elements makes the pruned model differ from the masked original.
Each exact case asserts that verification passed (relative error < 1e-4), that the pruned model
passes the full ONNX checker, that the output shapes are the original's (also at another batch
size: the batch stays dynamic), that the expected weights lost channels and that MACs dropped.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from onnxprune import pipeline
from onnxprune.errors import NothingToPrune
from onnxprune.measure.verify import compare, masked_original
from onnxprune.planning.options import PlanOptions
from onnxprune.rewrite.apply import rewrite
from onnxprune.runtime.inputs import make_inputs
from onnxprune.testing import from_text, prune_and_verify

TOL = 1e-4


# ----------------------------------------------------------------------------------------------
# helpers


def header(opset: int) -> str:
    ir = 8 if opset <= 18 else (9 if opset <= 20 else 10)
    return f'<ir_version: {ir}, opset_import: ["" : {opset}]>'


def build(text: str, positive: tuple[str, ...] = (), seed: int = 0) -> onnx.ModelProto:
    """``from_text`` with He-scaled weights, so activations keep a magnitude of about 1 through
    the layers (no saturated Sigmoid/Tanh/HardSigmoid hiding a wrong channel)."""
    model = from_text(text, seed=seed, positive=positive)
    for i, init in enumerate(model.graph.initializer):
        arr = numpy_helper.to_array(init)
        if arr.ndim < 2 or not np.issubdtype(arr.dtype, np.floating) or init.name in positive:
            continue
        fan_in = arr.size / max(arr.shape) if arr.ndim == 2 else int(np.prod(arr.shape[1:]))
        if fan_in > 1:
            arr = (arr / np.sqrt(fan_in)).astype(arr.dtype)
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(arr, init.name))
    return model


def inits(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def shapes_of(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in inits(model).items()}


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def assert_exact(res, original: onnx.ModelProto, expect: dict[str, tuple[int, ...]] | None = None,
                 batch: int = 3, input_shapes=None) -> None:
    """The common assertions for an exact pruning result."""
    v = res.verification
    assert v is not None and v.exact
    assert v.passed, v.to_json()
    assert v.outputs and all(o.rel_error < TOL for o in v.outputs), v.to_json()
    onnx.checker.check_model(res.pruned, full_check=True)
    # the batch axis stays dynamic: verify again at another batch size, and compare output shapes
    an = res.analysis
    if input_shapes is None:
        feeds = make_inputs(an.model, batch=batch, seed=1)
    else:
        feeds = make_inputs(an.model, input_shapes, seed=1)
    v2 = compare(an.model, masked_original(an.model, an.cg, res.plan), res.pruned, feeds, "cpu", TOL)
    assert v2.passed, v2.to_json()
    outs_o = run(original, feeds)
    outs_p = run(res.pruned, feeds)
    assert [o.shape for o in outs_p] == [o.shape for o in outs_o]
    for o in outs_o:  # a meaningful comparison: finite, non-constant outputs of sane magnitude
        assert np.all(np.isfinite(o)) and 1e-3 < np.ptp(o) and np.max(np.abs(o)) < 1e4
    assert [o.name for o in res.pruned.graph.output] == [o.name for o in original.graph.output]
    # channels were really removed
    assert res.plan.pruned(), "nothing was pruned"
    assert res.after.macs < res.before.macs
    assert res.after.params < res.before.params
    check_shapes(res.pruned, expect or {})


def check_shapes(model: onnx.ModelProto, expect: dict[str, tuple[int, ...]]) -> None:
    """``expect`` maps an initializer name, or ``"@T:i"`` (input i of the node producing tensor T,
    e.g. a weight reached through a folded Transpose/Cast), to its expected shape."""
    got = shapes_of(model)
    inferred = None
    for key, shape in expect.items():
        if key.startswith("@"):
            out, idx = key[1:].rsplit(":", 1)
            node = next(n for n in model.graph.node if out in n.output)
            name = node.input[int(idx)]
            if name not in got:
                if inferred is None:
                    g = onnx.shape_inference.infer_shapes(model).graph
                    inferred = {vi.name: tuple(d.dim_value for d in vi.type.tensor_type.shape.dim)
                                for vi in list(g.value_info) + list(g.output)}
                got[name] = inferred.get(name)
        else:
            name = key
        assert got.get(name) == tuple(shape), (key, got.get(name), shape)


def frozen_reasons(res_or_plan) -> list[str]:
    plan = res_or_plan.plan if hasattr(res_or_plan, "plan") else res_or_plan
    return [r for reasons in plan.frozen.values() for r in reasons]


def attr_of(model: onnx.ModelProto, op_type: str, name: str):
    for n in model.graph.node:
        if n.op_type == op_type:
            for a in n.attribute:
                if a.name == name:
                    return onnx.helper.get_attribute_value(a)
    return None


# ----------------------------------------------------------------------------------------------
# conv -> {op} -> conv with unchanged spatial size: x[N,3,8,8] -> Conv(w1,b1) -> h[N,8,8,8] -> mid
# -> m[N,8,S,S] -> Conv(w2) -> y[N,4,S,S]


def sandwich(mid: str, extra: str = "", opset: int = 17, s: int = 8, c: int = 8) -> str:
    ex = (", " + extra) if extra else ""
    return f"""
{header(opset)}
g (float[N,3,8,8] x) => (float[N,4,{s},{s}] y)
<float[{c},3,3,3] w1, float[{c}] b1, float[4,{c},3,3] w2{ex}>
{{
  h = Conv<pads=[1,1,1,1]>(x, w1, b1)
  {mid}
  y = Conv<pads=[1,1,1,1]>(m, w2)
}}
"""


SANDWICH_EXPECT = {"w1": (4, 3, 3, 3), "b1": (4,), "w2": (4, 4, 3, 3)}

C8 = "float[8,1,1] c"
# (id, mid nodes, extra initializers, opset, positive initializers, output spatial size)
SANDWICH_CASES = [
    # elementwise with a per-channel constant (sliced as a param)
    ("Add", "m = Add(h, c)", C8, 17, (), 8),
    ("Add-const-first", "m = Add(c, h)", C8, 17, (), 8),
    ("Sub", "m = Sub(h, c)", C8, 17, (), 8),
    ("Sub-const-first", "m = Sub(c, h)", C8, 17, (), 8),
    ("Mul", "m = Mul(h, c)", C8, 17, (), 8),
    ("Mul-full-const", "m = Mul(h, c)", "float[8,8,8] c", 17, (), 8),
    ("Div", "m = Div(h, c)", C8, 17, ("c",), 8),
    ("Max", "m = Max(h, c)", C8, 17, (), 8),
    ("Min", "m = Min(h, c)", C8, 17, (), 8),
    ("Sum", "m = Sum(h, c, h)", C8, 17, (), 8),
    ("Mean", "m = Mean(h, c)", C8, 17, (), 8),
    ("Mod", "m = Mod<fmod=1>(h, c)", C8, 17, ("c",), 8),
    ("PRelu", "m = PRelu(h, c)", C8, 17, (), 8),
    ("Pow", "m = Pow(h, e)", "float e = {2.0}", 17, (), 8),
    ("Pow-per-channel-exponent", "p = Sigmoid(h)\n  m = Pow(p, e)", "float[8,1,1] e", 17, (), 8),
    ("Clip", "m = Clip(h, lo, hi)", "float lo = {-0.5}, float hi = {0.7}", 17, (), 8),
    ("Clip-opset11", "m = Clip(h, lo, hi)", "float lo = {-0.5}, float hi = {0.7}", 11, (), 8),
    ("Clip-min-only", "m = Clip(h, lo)", "float lo = {0.1}", 13, (), 8),
    # unary
    ("Relu", "m = Relu(h)", "", 17, (), 8),
    ("LeakyRelu", "m = LeakyRelu<alpha=0.1>(h)", "", 17, (), 8),
    ("Sigmoid", "m = Sigmoid(h)", "", 17, (), 8),
    ("HardSigmoid", "m = HardSigmoid(h)", "", 17, (), 8),
    ("HardSwish", "m = HardSwish(h)", "", 17, (), 8),
    ("Tanh", "m = Tanh(h)", "", 17, (), 8),
    ("Erf", "m = Erf(h)", "", 17, (), 8),
    ("Identity", "m = Identity(h)", "", 17, (), 8),
    ("Dropout", "m = Dropout(h)", "", 17, (), 8),
    ("Dropout-mask", "m, mask = Dropout(h)", "", 17, (), 8),
    ("Dropout-opset11", "m = Dropout<ratio=0.3>(h)", "", 11, (), 8),
    ("Cast", "m = Cast<to=1>(h)", "", 17, (), 8),
    ("Cast-double-roundtrip", "d = Cast<to=11>(h)\n  m = Cast<to=1>(d)", "", 17, (), 8),
    ("CastLike", "m = CastLike(h, c)", "float c = {0.0}", 17, (), 8),
    ("Neg", "m = Neg(h)", "", 17, (), 8),
    ("Abs", "m = Abs(h)", "", 17, (), 8),
    ("Exp", "m = Exp(h)", "", 17, (), 8),
    ("Log-Sqrt-Reciprocal", "p = Sigmoid(h)\n  l = Log(p)\n  q = Sqrt(p)\n  r = Reciprocal(p)\n"
                            "  lq = Add(l, q)\n  m = Add(lq, r)", "", 17, (), 8),
    ("Elu", "m = Elu<alpha=0.5>(h)", "", 17, (), 8),
    ("Selu", "m = Selu(h)", "", 17, (), 8),
    ("Celu", "m = Celu(h)", "", 17, (), 8),
    ("Softplus-Softsign", "p = Softplus(h)\n  m = Softsign(p)", "", 17, (), 8),
    ("Gelu", "m = Gelu(h)", "", 20, (), 8),
    ("Gelu-tanh", "m = Gelu<approximate=\"tanh\">(h)", "", 20, (), 8),
    ("Mish", "m = Mish(h)", "", 18, (), 8),
    ("ThresholdedRelu", "m = ThresholdedRelu<alpha=0.3>(h)", "", 17, (), 8),
    ("Floor-Ceil-Round-Sign", "f = Floor(h)\n  cc = Ceil(h)\n  r = Round(h)\n  sg = Sign(h)\n"
                              "  a = Sum(f, cc, r, sg)\n  m = Add(a, h)", "", 17, (), 8),
    ("Sin-Cos", "sn = Sin(h)\n  cs = Cos(h)\n  m = Mul(sn, cs)", "", 17, (), 8),
    # comparisons and boolean logic feeding Where
    ("Greater-Where", "g = Greater(h, c)\n  m = Where(g, h, c2)", C8 + ", float[8,1,1] c2", 17, (), 8),
    ("Where-cond-const", "m = Where(k, h, c2)", "bool[8,1,1] k = {1,0,1,1,0,0,1,0}, float[8,1,1] c2",
     17, (), 8),
    ("Logic", "l = Less(h, c)\n  ge = GreaterOrEqual(h, z)\n  a = And(l, ge)\n  le = LessOrEqual(h, z)\n"
              "  o = Or(a, le)\n  nn = Not(o)\n  xo = Xor(nn, l)\n  m = Where(xo, h, c)",
     C8 + ", float z = {0.0}", 17, (), 8),
    ("Equal", "f = Floor(h)\n  eq = Equal(f, z)\n  m = Where(eq, c, h)", C8 + ", float z = {0.0}", 17, (), 8),
    ("IsNaN", "nan = IsNaN(h)\n  m = Where(nan, c, h)", C8, 17, (), 8),
    ("BitShift", "r = Relu(h)\n  k = Mul(r, ten)\n  fl = Floor(k)\n  q = Cast<to=12>(fl)\n"
                 "  sh = BitShift<direction=\"LEFT\">(q, one)\n  m = Cast<to=1>(sh)",
     "float ten = {10.0}, uint32 one = {1}", 17, (), 8),
    # normalizations
    ("BatchNormalization", "m = BatchNormalization(h, sc, bi, mu, var)",
     "float[8] sc, float[8] bi, float[8] mu, float[8] var", 17, ("var",), 8),
    ("BatchNormalization-opset11", "m = BatchNormalization(h, sc, bi, mu, var)",
     "float[8] sc, float[8] bi, float[8] mu, float[8] var", 11, ("var",), 8),
    ("InstanceNormalization", "m = InstanceNormalization(h, sc, bi)", "float[8] sc, float[8] bi", 17, (), 8),
    # softmax over a spatial axis does not touch the channels
    ("Softmax-spatial", "m = Softmax<axis=3>(h)", "", 17, (), 8),
    ("LogSoftmax-spatial", "m = LogSoftmax<axis=-1>(h)", "", 13, (), 8),
    ("Softmax-spatial-opset11", "m = Softmax<axis=2>(h)", "", 11, (), 8),
    # pooling and spatial reductions
    ("MaxPool", "m = MaxPool<kernel_shape=[2,2], strides=[2,2]>(h)", "", 17, (), 4),
    ("MaxPool-indices", "m, idx = MaxPool<kernel_shape=[2,2], strides=[2,2]>(h)", "", 17, (), 4),
    ("AveragePool", "m = AveragePool<kernel_shape=[3,3], pads=[1,1,1,1]>(h)", "", 17, (), 8),
    ("LpPool", "m = LpPool<kernel_shape=[2,2], strides=[2,2], p=2>(h)", "", 17, (), 4),
    ("GlobalAveragePool", "m = GlobalAveragePool(h)", "", 17, (), 1),
    ("GlobalMaxPool", "m = GlobalMaxPool(h)", "", 17, (), 1),
    ("GlobalLpPool", "m = GlobalLpPool<p=2>(h)", "", 17, (), 1),
    ("ReduceMean-keepdims", "m = ReduceMean<axes=[2,3], keepdims=1>(h)", "", 17, (), 1),
    ("ReduceMax-keepdims", "m = ReduceMax<axes=[-2,-1]>(h)", "", 17, (), 1),
    ("ReduceMean-opset11", "m = ReduceMean<axes=[2,3], keepdims=1>(h)", "", 11, (), 1),
    ("ReduceMean-opset18", "m = ReduceMean<keepdims=1>(h, ax)", "int64[2] ax = {2,3}", 18, (), 1),
    ("ReduceMax-opset18", "m = ReduceMax(h, ax)", "int64[2] ax = {-1,-2}", 18, (), 1),
    ("ReduceSum-opset13", "m = ReduceSum(h, ax)", "int64[2] ax = {2,3}", 13, (), 1),
    ("ReduceSum-opset11", "m = ReduceSum<axes=[2,3]>(h)", "", 11, (), 1),
    ("ReduceMin", "m = ReduceMin<axes=[2,3]>(h)", "", 17, (), 1),
    ("ReduceProd", "p = Sigmoid(h)\n  m = ReduceProd<axes=[2,3]>(p)", "", 17, (), 1),
    ("ReduceL1-L2", "a = ReduceL1<axes=[2,3]>(h)\n  b = ReduceL2<axes=[2,3]>(h)\n  m = Add(a, b)", "", 17, (), 1),
    ("ReduceLogSum-LogSumExp-SumSquare",
     "p = Sigmoid(h)\n  a = ReduceLogSum<axes=[2,3]>(p)\n  b = ReduceLogSumExp<axes=[2,3]>(h)\n"
     "  q = ReduceSumSquare<axes=[2,3]>(h)\n  m = Sum(a, b, q)", "", 17, (), 1),
    # resize and pad on the spatial axes
    ("Resize-scales", "m = Resize<mode=\"nearest\">(h, , sc)", "float[4] sc = {1.0, 1.0, 2.0, 2.0}", 17, (), 16),
    ("Resize-linear", "m = Resize<mode=\"linear\">(h, , sc)", "float[4] sc = {1.0, 1.0, 0.5, 0.5}", 13, (), 4),
    ("Resize-opset11", "m = Resize<mode=\"nearest\">(h, roi, sc)",
     "float[0] roi = {}, float[4] sc = {1.0, 1.0, 2.0, 2.0}", 11, (), 16),
    ("Resize-sizes-axes", "m = Resize<axes=[2,3]>(h, , , sz)", "int64[2] sz = {12, 12}", 18, (), 12),
    ("Pad", "m = Pad(h, p)", "int64[8] p = {0,0,1,1,0,0,1,1}", 17, (), 10),
    ("Pad-reflect", "m = Pad<mode=\"reflect\">(h, p)", "int64[8] p = {0,0,2,1,0,0,0,1}", 13, (), 10),
    ("Pad-value-opset11", "m = Pad(h, p, v)", "int64[8] p = {0,0,1,1,0,0,1,1}, float v = {0.5}", 11, (), 10),
    ("Pad-axes-opset18", "m = Pad(h, p, , a)", "int64[4] p = {1,1,1,1}, int64[2] a = {2,3}", 18, (), 10),
    # index / broadcast ops on spatial axes
    ("Tile", "m = Tile(h, r)", "int64[4] r = {1,1,2,2}", 17, (), 16),
    ("Expand", "p = GlobalAveragePool(h)\n  m = Expand(p, sh)", "int64[4] sh = {1,1,8,8}", 17, (), 8),
    ("Gather-spatial-Range", "ix = Range(st, lim, dl)\n  m0 = Gather<axis=2>(h, ix)\n  m = Gather<axis=3>(m0, ix)",
     "int64 st = {0}, int64 lim = {8}, int64 dl = {2}", 17, (), 4),
    ("Gather-spatial-NonZero", "nz = NonZero(k)\n  ix = Squeeze(nz, zero)\n  m0 = Gather<axis=2>(h, ix)\n"
                               "  m = Gather<axis=-1>(m0, ix)",
     "bool[8] k = {1,0,1,1,0,0,1,0}, int64[1] zero = {0}", 17, (), 4),
    # transpose there and back
    ("Transpose-roundtrip", "t = Transpose<perm=[0,2,3,1]>(h)\n  m = Transpose<perm=[0,3,1,2]>(t)", "", 17, (), 8),
    ("Reshape-roundtrip", "r = Reshape(h, s1)\n  m = Reshape(r, s2)",
     "int64[3] s1 = {0, 8, -1}, int64[4] s2 = {-1, 8, 8, 8}", 17, (), 8),
    # Flatten<axis=2> merges the batch into the channel axis ([N*8, 64]); the target's channel entry
    # is rewritten and the batch stays dynamic
    ("Flatten-merges-batch-and-channels", "f = Flatten<axis=2>(h)\n  m = Reshape(f, s2)",
     "int64[4] s2 = {-1, 8, 8, 8}", 17, (), 8),
    ("Flatten-Reshape-back", "f = Flatten<axis=1>(h)\n  m = Reshape(f, s2)", "int64[4] s2 = {-1, 8, 8, 8}", 17, (), 8),
]


@pytest.mark.parametrize("case", SANDWICH_CASES, ids=[c[0] for c in SANDWICH_CASES])
def test_sandwich(case):
    _id, mid, extra, opset, positive, s = case
    model = build(sandwich(mid, extra, opset, s), positive=positive)
    res = prune_and_verify(model, 0.5)
    assert_exact(res, model, SANDWICH_EXPECT)


# ----------------------------------------------------------------------------------------------
# graphs written out in full: (id, text, expected initializer shapes after ratio 0.5, positive)


@dataclass
class Case:
    id: str
    text: str
    expect: dict = field(default_factory=dict)
    positive: tuple = ()
    ratio: float = 0.5
    input_shapes: dict | None = None


H17 = header(17)

CASES = [
    # --- Conv: 1-D / 2-D / 3-D, dense, grouped, depthwise -------------------------------------
    Case("Conv1d", H17 + """
g (float[N,3,16] x) => (float[N,4,16] y)
<float[8,3,3] w1, float[8] b1, float[4,8,3] w2, float[4] b2>
{
  h = Conv<pads=[1,1]>(x, w1, b1)
  r = Relu(h)
  y = Conv<pads=[1,1]>(r, w2, b2)
}""", {"w1": (4, 3, 3), "b1": (4,), "w2": (4, 4, 3), "b2": (4,)}),
    Case("Conv2d-strided-dilated", H17 + """
g (float[N,3,9,9] x) => (float[N,4,5,5] y)
<float[8,3,3,3] w1, float[4,8,3,3] w2>
{
  h = Conv<pads=[1,1,1,1], strides=[2,2]>(x, w1)
  y = Conv<pads=[2,2,2,2], dilations=[2,2]>(h, w2)
}""", {"w1": (4, 3, 3, 3), "w2": (4, 4, 3, 3)}),
    Case("Conv3d", H17 + """
g (float[N,2,4,6,6] x) => (float[N,4,4,6,6] y)
<float[8,2,3,3,3] w1, float[8] b1, float[4,8,1,1,1] w2>
{
  h = Conv<pads=[1,1,1,1,1,1]>(x, w1, b1)
  r = Relu(h)
  y = Conv(r, w2)
}""", {"w1": (4, 2, 3, 3, 3), "b1": (4,), "w2": (4, 4, 1, 1, 1)}),
    # grouped: group=4, 2 input and 2 output channels per group; the same in-group position is
    # removed from every group, `group` stays 4
    Case("Conv-grouped", H17 + """
g (float[N,3,8,8] x) => (float[N,4,8,8] y)
<float[8,3,3,3] w1, float[8,2,3,3] wg, float[8] bg, float[4,8,1,1] w3>
{
  h = Conv<pads=[1,1,1,1]>(x, w1)
  r = Relu(h)
  gg = Conv<pads=[1,1,1,1], group=4>(r, wg, bg)
  y = Conv(gg, w3)
}""", {"w1": (4, 3, 3, 3), "wg": (4, 1, 3, 3), "bg": (4,), "w3": (4, 4, 1, 1)}),
    Case("Conv-depthwise", H17 + """
g (float[N,3,8,8] x) => (float[N,4,8,8] y)
<float[8,3,3,3] w1, float[8,1,3,3] wd, float[8] bd, float[4,8,1,1] w3>
{
  h = Conv<pads=[1,1,1,1]>(x, w1)
  d = Conv<pads=[1,1,1,1], group=8>(h, wd, bd)
  r = Relu(d)
  y = Conv(r, w3)
}""", {"w1": (4, 3, 3, 3), "wd": (4, 1, 3, 3), "bd": (4,), "w3": (4, 4, 1, 1)}),
    # depthwise with channel multiplier 2: input channel c owns outputs 2c and 2c+1
    Case("Conv-depthwise-multiplier2", H17 + """
g (float[N,3,8,8] x) => (float[N,4,8,8] y)
<float[8,3,3,3] w1, float[16,1,3,3] wd, float[16] bd, float[4,16,1,1] w3>
{
  h = Conv<pads=[1,1,1,1]>(x, w1)
  d = Conv<pads=[1,1,1,1], group=8>(h, wd, bd)
  y = Conv(d, w3)
}""", {"w1": (4, 3, 3, 3), "wd": (8, 1, 3, 3), "bd": (8,), "w3": (4, 8, 1, 1)}),
    Case("Conv-depthwise-1d", H17 + """
g (float[N,3,16] x) => (float[N,4,16] y)
<float[8,3,1] w1, float[8,1,5] wd, float[4,8,1] w3>
{
  h = Conv(x, w1)
  d = Conv<pads=[2,2], group=8>(h, wd)
  y = Conv(d, w3)
}""", {"w1": (4, 3, 1), "wd": (4, 1, 5), "w3": (4, 4, 1)}),
    # --- ConvTranspose (W is [C_in, C_out/group, k, k]) ----------------------------------------
    Case("ConvTranspose", H17 + """
g (float[N,3,8,8] x) => (float[N,4,16,16] y)
<float[8,3,3,3] w1, float[8,6,2,2] wt, float[6] bt, float[4,6,3,3] w3>
{
  h = Conv<pads=[1,1,1,1]>(x, w1)
  t = ConvTranspose<strides=[2,2]>(h, wt, bt)
  r = Relu(t)
  y = Conv<pads=[1,1,1,1]>(r, w3)
}""", {"w1": (4, 3, 3, 3), "wt": (4, 3, 2, 2), "bt": (3,), "w3": (4, 3, 3, 3)}),
    Case("ConvTranspose-depthwise", H17 + """
g (float[N,3,8,8] x) => (float[N,4,16,16] y)
<float[8,3,3,3] w1, float[8,1,2,2] wt, float[8] bt, float[4,8,3,3] w3>
{
  h = Conv<pads=[1,1,1,1]>(x, w1)
  t = ConvTranspose<strides=[2,2], group=8>(h, wt, bt)
  y = Conv<pads=[1,1,1,1]>(t, w3)
}""", {"w1": (4, 3, 3, 3), "wt": (4, 1, 2, 2), "bt": (4,), "w3": (4, 4, 3, 3)}),
    Case("ConvTranspose-depthwise-multiplier2", H17 + """
g (float[N,3,8,8] x) => (float[N,4,16,16] y)
<float[8,3,3,3] w1, float[8,2,2,2] wt, float[4,16,3,3] w3>
{
  h = Conv<pads=[1,1,1,1]>(x, w1)
  t = ConvTranspose<strides=[2,2], group=8>(h, wt)
  y = Conv<pads=[1,1,1,1]>(t, w3)
}""", {"w1": (4, 3, 3, 3), "wt": (4, 2, 2, 2), "w3": (4, 8, 3, 3)}),
    Case("ConvTranspose-grouped", H17 + """
g (float[N,3,8,8] x) => (float[N,4,8,8] y)
<float[8,3,3,3] w1, float[8,2,3,3] wt, float[4,8,3,3] w3>
{
  h = Conv<pads=[1,1,1,1]>(x, w1)
  t = ConvTranspose<pads=[1,1,1,1], group=4>(h, wt)
  y = Conv<pads=[1,1,1,1]>(t, w3)
}""", {"w1": (4, 3, 3, 3), "wt": (4, 1, 3, 3), "w3": (4, 4, 3, 3)}),
    # --- Gemm and MatMul --------------------------------------------------------------------
    Case("Gemm-transB1-then-transB0", H17 + """
g (float[N,16] x) => (float[N,8] y)
<float[32,16] w1, float[32] b1, float[32,8] w2, float[8] b2>
{
  h = Gemm<transB=1>(x, w1, b1)
  r = Relu(h)
  y = Gemm(r, w2, b2)
}""", {"w1": (16, 16), "b1": (16,), "w2": (16, 8), "b2": (8,)}),
    Case("Gemm-transB0-then-transB1", H17 + """
g (float[N,16] x) => (float[N,8] y)
<float[16,32] w1, float[1,32] b1, float[8,32] w2, float[8] b2>
{
  h = Gemm<transB=0, alpha=0.5, beta=2.0>(x, w1, b1)
  r = Tanh(h)
  y = Gemm<transB=1>(r, w2, b2)
}""", {"w1": (16, 16), "b1": (1, 16), "w2": (8, 16), "b2": (8,)}),
    Case("MatMul-MLP-2d", H17 + """
g (float[N,16] x) => (float[N,8] y)
<float[16,32] w1, float[32] b1, float[32,8] w2, float[8] b2>
{
  mm1 = MatMul(x, w1)
  h = Add(mm1, b1)
  r = Relu(h)
  mm2 = MatMul(r, w2)
  y = Add(mm2, b2)
}""", {"w1": (16, 16), "b1": (16,), "w2": (16, 8), "b2": (8,)}),
    Case("MatMul-MLP-3d", H17 + """
g (float[N,5,16] x) => (float[N,5,8] y)
<float[16,32] w1, float[32] b1, float[32,8] w2, float[8] b2>
{
  mm1 = MatMul(x, w1)
  h = Add(b1, mm1)
  r = Sigmoid(h)
  mm2 = MatMul(r, w2)
  y = Add(mm2, b2)
}""", {"w1": (16, 16), "b1": (16,), "w2": (16, 8), "b2": (8,)}),
    # --- two-branch structures ----------------------------------------------------------------
    Case("Residual-Add-of-two-conv-branches", H17 + """
g (float[N,3,8,8] x) => (float[N,4,8,8] y)
<float[8,3,3,3] w1, float[8,8,3,3] wa, float[8] ba, float[8,8,1,1] wb, float[4,8,1,1] w4>
{
  h = Conv<pads=[1,1,1,1]>(x, w1)
  r = Relu(h)
  a = Conv<pads=[1,1,1,1]>(r, wa, ba)
  b = Conv(r, wb)
  s = Add(a, b)
  y = Conv(s, w4)
}""", {"w1": (4, 3, 3, 3), "wa": (4, 4, 3, 3), "ba": (4,), "wb": (4, 4, 1, 1), "w4": (4, 4, 1, 1)}),
    Case("Residual-identity-skip", H17 + """
g (float[N,3,8,8] x) => (float[N,4,8,8] y)
<float[8,3,3,3] w1, float[8,8,3,3] wa, float[8] sc, float[8] bi, float[8] mu, float[8] var,
 float[8,8,3,3] wb, float[4,8,1,1] w4>
{
  h = Conv<pads=[1,1,1,1]>(x, w1)
  r = Relu(h)
  a = Conv<pads=[1,1,1,1]>(r, wa)
  bn = BatchNormalization(a, sc, bi, mu, var)
  ar = Relu(bn)
  b = Conv<pads=[1,1,1,1]>(ar, wb)
  s = Add(r, b)
  sr = Relu(s)
  y = Conv(sr, w4)
}""", {"w1": (4, 3, 3, 3), "wa": (4, 4, 3, 3), "sc": (4,), "var": (4,), "wb": (4, 4, 3, 3),
       "w4": (4, 4, 1, 1)}, positive=("var",)),
    Case("Squeeze-Excitation", H17 + """
g (float[N,3,8,8] x) => (float[N,4,8,8] y)
<float[8,3,3,3] w1, float[8] b1, float[4,8,1,1] wr, float[4] br, float[8,4,1,1] we, float[8] be,
 float[4,8,3,3] w3>
{
  h = Conv<pads=[1,1,1,1]>(x, w1, b1)
  p = GlobalAveragePool(h)
  s1 = Conv(p, wr, br)
  s2 = Relu(s1)
  s3 = Conv(s2, we, be)
  s4 = Sigmoid(s3)
  m = Mul(h, s4)
  y = Conv<pads=[1,1,1,1]>(m, w3)
}""", {"w1": (4, 3, 3, 3), "b1": (4,), "wr": (2, 4, 1, 1), "br": (2,), "we": (4, 2, 1, 1), "be": (4,),
       "w3": (4, 4, 3, 3)}),
    # --- reductions without keepdims into a Gemm ----------------------------------------------
    Case("ReduceMean-keepdims0-Gemm", H17 + """
g (float[N,3,8,8] x) => (float[N,10] y)
<float[8,3,3,3] w1, float[10,8] wf, float[10] bf>
{
  h = Conv<pads=[1,1,1,1]>(x, w1)
  p = ReduceMean<axes=[2,3], keepdims=0>(h)
  y = Gemm<transB=1>(p, wf, bf)
}""", {"w1": (4, 3, 3, 3), "wf": (10, 4)}),
    Case("ReduceMax-keepdims0-opset18-Gemm", header(18) + """
g (float[N,3,8,8] x) => (float[N,10] y)
<float[8,3,3,3] w1, float[8,10] wf, int64[2] ax = {3, 2}>
{
  h = Conv<pads=[1,1,1,1]>(x, w1)
  p = ReduceMax<keepdims=0>(h, ax)
  y = Gemm(p, wf)
}""", {"w1": (4, 3, 3, 3), "wf": (4, 10)}),
    Case("GlobalMaxPool-Flatten-Gemm", H17 + """
g (float[N,3,8,8] x) => (float[N,10] y)
<float[8,3,3,3] w1, float[10,8] wf>
{
  h = Conv<pads=[1,1,1,1]>(x, w1)
  p = GlobalMaxPool(h)
  f = Flatten(p)
  y = Gemm<transB=1>(f, wf)
}""", {"w1": (4, 3, 3, 3), "wf": (10, 4)}),
    # --- Concat / Split / Slice on the channel axis -------------------------------------------
    Case("Concat-two-convs", H17 + """
g (float[N,3,8,8] x) => (float[N,4,8,8] y)
<float[8,3,3,3] wa, float[6,3,1,1] wb, float[4,14,3,3] wc>
{
  a = Conv<pads=[1,1,1,1]>(x, wa)
  b = Conv(x, wb)
  cat = Concat<axis=1>(a, b)
  y = Conv<pads=[1,1,1,1]>(cat, wc)
}""", {"wa": (4, 3, 3, 3), "wb": (3, 3, 1, 1), "wc": (4, 7, 3, 3)}),
    Case("Concat-negative-axis-three-inputs", H17 + """
g (float[N,3,8,8] x) => (float[N,4,8,8] y)
<float[8,3,3,3] wa, float[4,3,1,1] wb, float[4,16,1,1] wc>
{
  a = Conv<pads=[1,1,1,1]>(x, wa)
  b = Conv(x, wb)
  cat = Concat<axis=-3>(b, a, b)
  y = Conv(cat, wc)
}""", {"wa": (4, 3, 3, 3), "wb": (2, 3, 1, 1), "wc": (4, 8, 1, 1)}),
    Case("Split-sizes-input", header(13) + """
g (float[N,3,8,8] x) => (float[N,4,8,8] ya, float[N,5,8,8] yb)
<float[8,3,3,3] w1, float[4,4,3,3] wa, float[5,4,1,1] wb, int64[2] sp = {4, 4}>
{
  h = Conv<pads=[1,1,1,1]>(x, w1)
  a, b = Split<axis=1>(h, sp)
  ya = Conv<pads=[1,1,1,1]>(a, wa)
  yb = Conv(b, wb)
}""", {"w1": (4, 3, 3, 3), "wa": (4, 2, 3, 3), "wb": (5, 2, 1, 1)}),
    Case("Split-unequal-sizes-input", H17 + """
g (float[N,3,8,8] x) => (float[N,4,8,8] ya, float[N,5,8,8] yb)
<float[8,3,3,3] w1, float[4,2,3,3] wa, float[5,6,1,1] wb, int64[2] sp = {2, 6}>
{
  h = Conv<pads=[1,1,1,1]>(x, w1)
  a, b = Split<axis=-3>(h, sp)
  ya = Conv<pads=[1,1,1,1]>(a, wa)
  yb = Conv(b, wb)
}""", {"w1": (4, 3, 3, 3), "wa": (4, 1, 3, 3), "wb": (5, 3, 1, 1)}),
    Case("Split-attribute-opset11", header(11) + """
g (float[N,3,8,8] x) => (float[N,4,8,8] ya, float[N,5,8,8] yb)
<float[8,3,3,3] w1, float[4,4,3,3] wa, float[5,4,1,1] wb>
{
  h = Conv<pads=[1,1,1,1]>(x, w1)
  a, b = Split<axis=1, split=[4,4]>(h)
  ya = Conv<pads=[1,1,1,1]>(a, wa)
  yb = Conv(b, wb)
}""", {"w1": (4, 3, 3, 3), "wa": (4, 2, 3, 3), "wb": (5, 2, 1, 1)}),
    Case("Split-equal-no-sizes-opset11", header(11) + """
g (float[N,3,8,8] x) => (float[N,4,8,8] ya, float[N,5,8,8] yb)
<float[8,3,3,3] w1, float[4,4,3,3] wa, float[5,4,1,1] wb>
{
  h = Conv<pads=[1,1,1,1]>(x, w1)
  a, b = Split<axis=1>(h)
  ya = Conv<pads=[1,1,1,1]>(a, wa)
  yb = Conv(b, wb)
}""", {"w1": (4, 3, 3, 3), "wa": (4, 2, 3, 3), "wb": (5, 2, 1, 1)}),
    Case("Split-num_outputs-opset18", header(18) + """
g (float[N,3,8,8] x) => (float[N,4,8,8] ya, float[N,5,8,8] yb)
<float[8,3,3,3] w1, float[4,4,3,3] wa, float[5,4,1,1] wb>
{
  h = Conv<pads=[1,1,1,1]>(x, w1)
  a, b = Split<axis=1, num_outputs=2>(h)
  ya = Conv<pads=[1,1,1,1]>(a, wa)
  yb = Conv(b, wb)
}""", {"w1": (4, 3, 3, 3), "wa": (4, 2, 3, 3), "wb": (5, 2, 1, 1)}),
    Case("Slice-channels", H17 + """
g (float[N,3,8,8] x) => (float[N,4,8,8] y, float[N,5,8,8] z)
<float[8,3,3,3] w1, float[4,4,3,3] w2, float[5,8,1,1] w3, int64[1] st = {2}, int64[1] en = {6},
 int64[1] ax = {1}>
{
  h = Conv<pads=[1,1,1,1]>(x, w1)
  s = Slice(h, st, en, ax)
  y = Conv<pads=[1,1,1,1]>(s, w2)
  z = Conv(h, w3)
}""", {"w1": (4, 3, 3, 3), "w3": (5, 4, 1, 1)}),
    Case("Slice-channels-open-end-negative-axis", H17 + """
g (float[N,3,8,8] x) => (float[N,4,8,8] y, float[N,5,8,8] z)
<float[8,3,3,3] w1, float[4,4,3,3] w2, float[5,8,1,1] w3, int64[2] st = {-4, 0},
 int64[2] en = {9223372036854775807, 8}, int64[2] ax = {-3, 2}, int64[2] sp = {1, 1}>
{
  h = Conv<pads=[1,1,1,1]>(x, w1)
  s = Slice(h, st, en, ax, sp)
  y = Conv<pads=[1,1,1,1]>(s, w2)
  z = Conv(h, w3)
}""", {"w1": (4, 3, 3, 3), "w3": (5, 4, 1, 1)}),
    # --- Reshape / Flatten / Transpose / Squeeze / Unsqueeze ----------------------------------
    Case("Flatten-Gemm", H17 + """
g (float[N,3,4,4] x) => (float[N,10] y)
<float[8,3,3,3] w1, float[8] b1, float[128,10] wf, float[10] bf>
{
  h = Conv<pads=[1,1,1,1]>(x, w1, b1)
  r = Relu(h)
  f = Flatten(r)
  y = Gemm(f, wf, bf)
}""", {"w1": (4, 3, 3, 3), "wf": (64, 10)}),
    Case("Reshape-0-minus1-Gemm", H17 + """
g (float[N,3,4,4] x) => (float[N,10] y)
<float[8,3,3,3] w1, float[10,128] wf, int64[2] sh = {0, -1}>
{
  h = Conv<pads=[1,1,1,1]>(x, w1)
  f = Reshape(h, sh)
  y = Gemm<transB=1>(f, wf)
}""", {"w1": (4, 3, 3, 3), "wf": (10, 64)}),
    Case("Reshape-minus1-128-MatMul", H17 + """
g (float[N,3,4,4] x) => (float[N,10] y)
<float[8,3,3,3] w1, float[128,10] wf, int64[2] sh = {-1, 128}>
{
  h = Conv<pads=[1,1,1,1]>(x, w1)
  f = Reshape(h, sh)
  y = MatMul(f, wf)
}""", {"w1": (4, 3, 3, 3), "wf": (64, 10)}),
    # PyTorch-export flatten: the target is computed from Shape at run time
    Case("Reshape-computed-target", H17 + """
g (float[N,3,4,4] x) => (float[N,10] y)
<float[8,3,3,3] w1, float[10,128] wf, int64 zero = {0}, int64[1] zax = {0}, int64[1] m1 = {-1}>
{
  h = Conv<pads=[1,1,1,1]>(x, w1)
  s = Shape(h)
  n = Gather(s, zero)
  nu = Unsqueeze(n, zax)
  t = Concat<axis=0>(nu, m1)
  f = Reshape(h, t)
  y = Gemm<transB=1>(f, wf)
}""", {"w1": (4, 3, 3, 3), "wf": (10, 64)}),
    Case("Transpose-NHWC-MatMul-Transpose", H17 + """
g (float[N,3,4,4] x) => (float[N,4,4,4] y)
<float[8,3,3,3] w1, float[8,6] wm, float[6] bm, float[4,6,3,3] w2>
{
  h = Conv<pads=[1,1,1,1]>(x, w1)
  t = Transpose<perm=[0,2,3,1]>(h)
  mm = MatMul(t, wm)
  a = Add(mm, bm)
  r = Relu(a)
  tb = Transpose<perm=[0,3,1,2]>(r)
  y = Conv<pads=[1,1,1,1]>(tb, w2)
}""", {"w1": (4, 3, 3, 3), "wm": (4, 3), "bm": (3,), "w2": (4, 3, 3, 3)}),
    Case("Squeeze-Gemm-Unsqueeze", H17 + """
g (float[N,3,8,8] x) => (float[N,4,1,1] y)
<float[8,3,3,3] w1, float[16,8] wg, float[16] bg, float[4,16,1,1] w3, int64[2] ax = {2,3}>
{
  h = Conv<pads=[1,1,1,1]>(x, w1)
  p = GlobalAveragePool(h)
  sq = Squeeze(p, ax)
  gm = Gemm<transB=1>(sq, wg, bg)
  us = Unsqueeze(gm, ax)
  y = Conv(us, w3)
}""", {"w1": (4, 3, 3, 3), "wg": (8, 4), "bg": (8,), "w3": (4, 8, 1, 1)}),
    Case("Squeeze-Gemm-Unsqueeze-opset11", header(11) + """
g (float[N,3,8,8] x) => (float[N,4,1,1] y)
<float[8,3,3,3] w1, float[16,8] wg, float[16] bg, float[4,16,1,1] w3>
{
  h = Conv<pads=[1,1,1,1]>(x, w1)
  p = GlobalAveragePool(h)
  sq = Squeeze<axes=[-1,2]>(p)
  gm = Gemm<transB=1>(sq, wg, bg)
  us = Unsqueeze<axes=[2,-1]>(gm)
  y = Conv(us, w3)
}""", {"w1": (4, 3, 3, 3), "wg": (8, 4), "bg": (8,), "w3": (4, 8, 1, 1)}),
    Case("Squeeze-Gemm-Unsqueeze-opset13-negative-axes", header(13) + """
g (float[N,3,8,8] x) => (float[N,4,1,1] y)
<float[8,3,3,3] w1, float[16,8] wg, float[4,16,1,1] w3, int64[2] ax = {-1,-2}, int64[2] ux = {-2,-1}>
{
  h = Conv<pads=[1,1,1,1]>(x, w1)
  p = GlobalAveragePool(h)
  sq = Squeeze(p, ax)
  gm = Gemm<transB=1>(sq, wg)
  us = Unsqueeze(gm, ux)
  y = Conv(us, w3)
}""", {"w1": (4, 3, 3, 3), "wg": (8, 4), "w3": (4, 8, 1, 1)}),
    # ShuffleNet channel shuffle: [N,8,5,5] -> [N,2,4,5,5] -> perm [0,2,1,3,4] -> [N,8,5,5]
    Case("ChannelShuffle", H17 + """
g (float[N,3,5,5] x) => (float[N,4,5,5] y)
<float[8,3,3,3] w1, float[8] b1, float[4,8,3,3] w2, int64[5] s1 = {-1, 2, 4, 5, 5},
 int64[4] s2 = {-1, 8, 5, 5}>
{
  h = Conv<pads=[1,1,1,1]>(x, w1, b1)
  r = Relu(h)
  a = Reshape(r, s1)
  t = Transpose<perm=[0,2,1,3,4]>(a)
  b = Reshape(t, s2)
  y = Conv<pads=[1,1,1,1]>(b, w2)
}""", {"w1": (4, 3, 3, 3), "b1": (4,), "w2": (4, 4, 3, 3)}),
    # --- Resize with a constant `sizes` that includes the channel axis (static batch) --------
    Case("Resize-sizes-with-channel-entry", H17 + """
g (float[1,3,8,8] x) => (float[1,4,16,16] y)
<float[8,3,3,3] w1, float[4,8,3,3] w2, int64[4] sz = {1, 8, 16, 16}>
{
  h = Conv<pads=[1,1,1,1]>(x, w1)
  u = Resize<mode="nearest">(h, , , sz)
  y = Conv<pads=[1,1,1,1]>(u, w2)
}""", {"w1": (4, 3, 3, 3), "w2": (4, 4, 3, 3)}),
    Case("Expand-channel-entry", H17 + """
g (float[N,3,8,8] x) => (float[N,4,8,8] y)
<float[8,3,3,3] w1, float[4,8,3,3] w2, int64[4] sh = {1, 8, 8, 8}>
{
  h = Conv<pads=[1,1,1,1]>(x, w1)
  p = GlobalAveragePool(h)
  e = Expand(p, sh)
  m = Mul(e, h)
  y = Conv<pads=[1,1,1,1]>(m, w2)
}""", {"w1": (4, 3, 3, 3), "w2": (4, 4, 3, 3)}),
]


CASES += [
    # MatMul with the constant first (channels-first features [N,C,T]) and Transpose default perm
    Case("MatMul-constant-first", H17 + """
g (float[N,16,5] x) => (float[N,8,5] y)
<float[32,16] w1, float[32,1] b1, float[8,32] w2>
{
  mm = MatMul(w1, x)
  h = Add(mm, b1)
  r = Relu(h)
  y = MatMul(w2, r)
}""", {"w1": (16, 16), "b1": (16, 1), "w2": (8, 16)}),
    Case("Transpose-default-perm-MatMul", H17 + """
g (float[N,16] x) => (float[N,8] y)
<float[16,32] w1, float[8,32] w2>
{
  h = MatMul(x, w1)
  t = Transpose(h)
  m = MatMul(w2, t)
  y = Transpose(m)
}""", {"w1": (16, 16), "w2": (8, 16)}),
    Case("Gemm-transA", H17 + """
g (float[N,16] x) => (float[N,8] y)
<float[16,32] w1, float[32,8] w2>
{
  xt = Transpose<perm=[1,0]>(x)
  h = Gemm<transA=1>(xt, w1)
  r = Relu(h)
  y = Gemm(r, w2)
}""", {"w1": (16, 16), "w2": (16, 8)}),
    # weights reached through Transpose / Cast of a constant
    Case("MatMul-transposed-constant-weight", H17 + """
g (float[N,16] x) => (float[N,8] y)
<float[32,16] w1, float[8,32] w2>
{
  w1t = Transpose<perm=[1,0]>(w1)
  h = MatMul(x, w1t)
  r = Relu(h)
  w2t = Transpose<perm=[1,0]>(w2)
  y = MatMul(r, w2t)
}""", {"@h:1": (16, 16), "@y:1": (16, 8)}),
    Case("Conv-float16-weights-through-Cast", H17 + """
g (float[N,3,8,8] x) => (float[N,4,8,8] y)
<float16[8,3,3,3] w1, float16[8] b1, float16[4,8,3,3] w2>
{
  w1f = Cast<to=1>(w1)
  b1f = Cast<to=1>(b1)
  w2f = Cast<to=1>(w2)
  h = Conv<pads=[1,1,1,1]>(x, w1f, b1f)
  y = Conv<pads=[1,1,1,1]>(h, w2f)
}""", {"@h:1": (4, 3, 3, 3), "@h:2": (4,), "@y:1": (4, 4, 3, 3)}),
    # channel shuffle with 4 groups of 2: the group index is the followed factor
    Case("ChannelShuffle-4-groups", H17 + """
g (float[N,3,5,5] x) => (float[N,4,5,5] y)
<float[8,3,3,3] w1, float[4,8,1,1] w2, int64[5] s1 = {0, 4, 2, 5, 5}, int64[4] s2 = {0, -1, 5, 5}>
{
  h = Conv<pads=[1,1,1,1]>(x, w1)
  a = Reshape(h, s1)
  t = Transpose<perm=[0,2,1,3,4]>(a)
  b = Reshape(t, s2)
  y = Conv(b, w2)
}""", {"w1": (4, 3, 3, 3), "w2": (4, 4, 1, 1)}),
    Case("Split-equal-no-sizes-opset13", header(13) + """
g (float[N,3,8,8] x) => (float[N,4,8,8] ya, float[N,5,8,8] yb)
<float[8,3,3,3] w1, float[4,4,3,3] wa, float[5,4,1,1] wb>
{
  h = Conv<pads=[1,1,1,1]>(x, w1)
  a, b = Split<axis=1>(h)
  ya = Conv<pads=[1,1,1,1]>(a, wa)
  yb = Conv(b, wb)
}""", {"w1": (4, 3, 3, 3), "wa": (4, 2, 3, 3), "wb": (5, 2, 1, 1)}),
    Case("Concat-same-tensor-twice", H17 + """
g (float[N,3,8,8] x) => (float[N,4,8,8] y)
<float[8,3,3,3] w1, float[4,16,1,1] w2>
{
  h = Conv<pads=[1,1,1,1]>(x, w1)
  cat = Concat<axis=1>(h, h)
  y = Conv(cat, w2)
}""", {"w1": (4, 3, 3, 3), "w2": (4, 8, 1, 1)}),
    Case("Flatten-opset11-Gemm", header(11) + """
g (float[N,3,4,4] x) => (float[N,10] y)
<float[8,3,3,3] w1, float[10,128] wf>
{
  h = Conv<pads=[1,1,1,1]>(x, w1)
  f = Flatten<axis=1>(h)
  y = Gemm<transB=1>(f, wf)
}""", {"w1": (4, 3, 3, 3), "wf": (10, 64)}),
    Case("Concat-spatial-axis", H17 + """
g (float[N,3,8,8] x) => (float[N,4,16,8] y)
<float[8,3,3,3] wa, float[8,3,1,1] wb, float[4,8,3,3] wc>
{
  a = Conv<pads=[1,1,1,1]>(x, wa)
  b = Conv(x, wb)
  cat = Concat<axis=2>(a, b)
  y = Conv<pads=[1,1,1,1]>(cat, wc)
}""", {"wa": (4, 3, 3, 3), "wb": (4, 3, 1, 1), "wc": (4, 4, 3, 3)}),
    Case("Split-spatial-axis", H17 + """
g (float[N,3,8,8] x) => (float[N,4,3,8] ya, float[N,5,5,8] yb)
<float[8,3,3,3] w1, float[4,8,3,3] wa, float[5,8,1,1] wb, int64[2] sp = {3, 5}>
{
  h = Conv<pads=[1,1,1,1]>(x, w1)
  a, b = Split<axis=2>(h, sp)
  ya = Conv<pads=[1,1,1,1]>(a, wa)
  yb = Conv(b, wb)
}""", {"w1": (4, 3, 3, 3), "wa": (4, 4, 3, 3), "wb": (5, 4, 1, 1), "sp": (2,)}),
    Case("MaxRoiPool", H17 + """
g (float[N,3,8,8] x) => (float[3,4,2,2] y)
<float[8,3,3,3] w1, float[4,8,1,1] w2, float[3,5] rois = {0,0,0,7,7, 0,1,1,4,5, 0,2,0,7,3}>
{
  h = Conv<pads=[1,1,1,1]>(x, w1)
  p = MaxRoiPool<pooled_shape=[2,2]>(h, rois)
  y = Conv(p, w2)
}""", {"w1": (4, 3, 3, 3), "w2": (4, 4, 1, 1), "rois": (3, 5)}),
    Case("Concat-into-grouped-conv", H17 + """
g (float[N,3,8,8] x) => (float[N,4,8,8] y)
<float[4,3,3,3] wa, float[4,3,1,1] wb, float[8,4,3,3] wg, float[4,8,1,1] w3>
{
  a = Conv<pads=[1,1,1,1]>(x, wa)
  b = Conv(x, wb)
  cat = Concat<axis=1>(a, b)
  gg = Conv<auto_pad="SAME_UPPER", group=2>(cat, wg)
  y = Conv(gg, w3)
}""", {"wa": (2, 3, 3, 3), "wb": (2, 3, 1, 1), "wg": (4, 2, 3, 3), "w3": (4, 4, 1, 1)}),
    Case("Gemm-BatchNormalization-1d", H17 + """
g (float[N,16] x) => (float[N,8] y)
<float[32,16] w1, float[32] sc, float[32] bi, float[32] mu, float[32] var, float[8,32] w2>
{
  h = Gemm<transB=1>(x, w1)
  n = BatchNormalization(h, sc, bi, mu, var)
  r = Relu(n)
  y = Gemm<transB=1>(r, w2)
}""", {"w1": (16, 16), "sc": (16,), "var": (16,), "w2": (8, 16)}, positive=("var",)),
    # MobileNetV2 inverted residual: expand 1x1 -> BN -> Clip(0,6) -> depthwise -> BN -> Clip ->
    # project 1x1 -> BN -> + input of the block
    Case("MobileNetV2-inverted-residual", H17 + """
g (float[N,3,8,8] x) => (float[N,4,8,8] y)
<float[8,3,3,3] w0, float[24,8,1,1] we, float[24] s1, float[24] b1, float[24] m1, float[24] v1,
 float[24,1,3,3] wd, float[24] s2, float[24] b2, float[24] m2, float[24] v2, float[8,24,1,1] wp, float[8] bp,
 float[4,8,1,1] wo, float lo = {0.0}, float hi = {6.0}>
{
  a = Conv<pads=[1,1,1,1]>(x, w0)
  e = Conv(a, we)
  en = BatchNormalization(e, s1, b1, m1, v1)
  er = Clip(en, lo, hi)
  d = Conv<pads=[1,1,1,1], group=24>(er, wd)
  dn = BatchNormalization(d, s2, b2, m2, v2)
  dr = Clip(dn, lo, hi)
  p = Conv(dr, wp, bp)
  s = Add(a, p)
  y = Conv(s, wo)
}""", {"w0": (4, 3, 3, 3), "we": (12, 4, 1, 1), "v1": (12,), "wd": (12, 1, 3, 3), "v2": (12,),
       "wp": (4, 12, 1, 1), "bp": (4,), "wo": (4, 4, 1, 1)}, positive=("v1", "v2")),
    # DenseNet: every layer reads the concatenation of all earlier outputs
    Case("DenseNet-concat-chain", H17 + """
g (float[N,3,8,8] x) => (float[N,4,8,8] y)
<float[8,3,3,3] w0, float[4,8,3,3] w1, float[4,12,3,3] w2, float[4,16,1,1] wt>
{
  a = Conv<pads=[1,1,1,1]>(x, w0)
  ar = Relu(a)
  b = Conv<pads=[1,1,1,1]>(ar, w1)
  c1 = Concat<axis=1>(ar, b)
  c1r = Relu(c1)
  c = Conv<pads=[1,1,1,1]>(c1r, w2)
  c2 = Concat<axis=1>(c1, c)
  y = Conv(c2, wt)
}""", {"w0": (4, 3, 3, 3), "w1": (2, 4, 3, 3), "w2": (2, 6, 3, 3), "wt": (4, 8, 1, 1)}),
    # FPN top-down: upsampled coarse map + lateral 1x1 conv
    Case("FPN-Resize-Add", H17 + """
g (float[N,3,8,8] x) => (float[N,4,8,8] y)
<float[8,3,3,3] wc, float[8,3,1,1] wl, float[4,8,3,3] w2, float[4] sc = {1.0, 1.0, 2.0, 2.0}>
{
  c = Conv<pads=[1,1,1,1], strides=[2,2]>(x, wc)
  u = Resize<mode="nearest">(c, , sc)
  l = Conv(x, wl)
  s = Add(u, l)
  y = Conv<pads=[1,1,1,1]>(s, w2)
}""", {"wc": (4, 3, 3, 3), "wl": (4, 3, 1, 1), "w2": (4, 4, 3, 3)}),
    Case("Split-num_outputs-uneven-opset18", header(18) + """
g (float[N,3,8,8] x) => (float[N,4,8,8] ya, float[N,4,8,8] yb, float[N,4,8,8] yc)
<float[8,3,3,3] w1, float[4,3,3,3] wa, float[4,3,1,1] wb, float[4,2,1,1] wc>
{
  h = Conv<pads=[1,1,1,1]>(x, w1)
  a, b, c = Split<axis=1, num_outputs=3>(h)
  ya = Conv<pads=[1,1,1,1]>(a, wa)
  yb = Conv(b, wb)
  yc = Conv(c, wc)
}""", {"w1": (4, 3, 3, 3)}),
    Case("Slice-without-axes-input", H17 + """
g (float[N,3,8,8] x) => (float[N,4,8,8] y, float[N,5,8,8] z)
<float[8,3,3,3] w1, float[4,4,3,3] w2, float[5,8,1,1] w3, int64[2] st = {0, 2},
 int64[2] en = {9223372036854775807, 6}>
{
  h = Conv<pads=[1,1,1,1]>(x, w1)
  s = Slice(h, st, en)
  y = Conv<pads=[1,1,1,1]>(s, w2)
  z = Conv(h, w3)
}""", {"w1": (4, 3, 3, 3), "w3": (5, 4, 1, 1)}),
    Case("Gemm-PRelu-1d", H17 + """
g (float[N,16] x) => (float[N,8] y)
<float[32,16] w1, float[32] sl, float[8,32] w2>
{
  h = Gemm<transB=1>(x, w1)
  r = PRelu(h, sl)
  y = Gemm<transB=1>(r, w2)
}""", {"w1": (16, 16), "sl": (16,), "w2": (8, 16)}),
    Case("LayerNormalization-over-time-axis-is-exact", H17 + """
g (float[N,16,6] x) => (float[N,8,6] y)
<float[32,16] w1, float[6] g6, float[6] b6, float[8,32] w2>
{
  h = MatMul(w1, x)
  n = LayerNormalization<axis=-1>(h, g6, b6)
  y = MatMul(w2, n)
}""", {"w1": (16, 16), "w2": (8, 16)}),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_graph(case: Case):
    model = build(case.text, positive=case.positive)
    res = prune_and_verify(model, case.ratio, input_shapes=case.input_shapes)
    assert_exact(res, model, case.expect)


# ----------------------------------------------------------------------------------------------
# onnxruntime contrib ops (com.microsoft) and recurrent ops

HC = '<ir_version: 8, opset_import: ["" : 17, "com.microsoft" : 1]>'

CONTRIB_CASES = [
    Case("com.microsoft-FusedConv", sandwich(
        'm = com.microsoft.FusedConv<activation="Relu", pads=[1,1,1,1]>(h, wf, bf)',
        "float[8,8,3,3] wf, float[8] bf").replace(header(17), HC),
        {**SANDWICH_EXPECT, "wf": (4, 4, 3, 3), "bf": (4,)}),
    Case("com.microsoft-FusedConv-residual-Z", sandwich(
        'm = com.microsoft.FusedConv<activation="LeakyRelu", activation_params=[0.1], pads=[1,1,1,1]>'
        '(h, wf, bf, h)', "float[8,8,3,3] wf, float[8] bf").replace(header(17), HC),
        {**SANDWICH_EXPECT, "wf": (4, 4, 3, 3), "bf": (4,)}),
    Case("com.microsoft-FusedConv-depthwise", sandwich(
        'm = com.microsoft.FusedConv<activation="Relu", group=8, pads=[1,1,1,1]>(h, wd)',
        "float[8,1,3,3] wd").replace(header(17), HC), {**SANDWICH_EXPECT, "wd": (4, 1, 3, 3)}),
    Case("com.microsoft-Gelu-QuickGelu", sandwich(
        "g = com.microsoft.Gelu(h)\n  m = com.microsoft.QuickGelu<alpha=1.702>(g)").replace(header(17), HC),
        SANDWICH_EXPECT),
    Case("com.microsoft-FastGelu-BiasGelu", sandwich(
        "t = Transpose<perm=[0,2,3,1]>(h)\n  g = com.microsoft.FastGelu(t, bb)\n"
        "  q = com.microsoft.BiasGelu(g, bc)\n  m = Transpose<perm=[0,3,1,2]>(q)",
        "float[8] bb, float[8] bc").replace(header(17), HC), {**SANDWICH_EXPECT, "bb": (4,), "bc": (4,)}),
    Case("com.microsoft-FusedGemm", HC + """
g (float[N,16] x) => (float[N,8] y)
<float[32,16] w1, float[32] b1, float[32,8] w2>
{
  h = com.microsoft.FusedGemm<transB=1, activation="Relu">(x, w1, b1)
  y = Gemm(h, w2)
}""", {"w1": (16, 16), "b1": (16,), "w2": (16, 8)}),
]

# X [seq, batch, input] (layout 0); the feature channels into the op and its hidden units are pruned
RNN_CASES = [
    Case("LSTM", H17 + """
g (float[5,N,8] x) => (float[5,N,6] y)
<float[8,16] w0, float[1,48,16] W, float[1,48,12] R, float[1,96] B, float[12,6] wo, int64[1] one = {1}>
{
  a = MatMul(x, w0)
  ys, yh, yc = LSTM<hidden_size=12>(a, W, R, B)
  s = Squeeze(ys, one)
  y = MatMul(s, wo)
}""", {"w0": (8, 8), "W": (1, 24, 8), "R": (1, 24, 6), "B": (1, 48), "wo": (6, 6)}),
    Case("GRU-bidirectional", H17 + """
g (float[5,N,8] x) => (float[5,N,6] y)
<float[8,16] w0, float[2,36,16] W, float[2,36,12] R, float[2,72] B, float[24,6] wo, int64[3] sh = {0, 0, -1}>
{
  a = MatMul(x, w0)
  ys = GRU<hidden_size=12, direction="bidirectional", linear_before_reset=1>(a, W, R, B)
  t = Transpose<perm=[0,2,1,3]>(ys)
  r = Reshape(t, sh)
  y = MatMul(r, wo)
}""", {"w0": (8, 8), "W": (2, 18, 8), "R": (2, 18, 6), "B": (2, 36), "wo": (12, 6)}),
    Case("RNN", H17 + """
g (float[5,N,8] x) => (float[N,6] y)
<float[8,16] w0, float[1,12,16] W, float[1,12,12] R, float[12,6] wo, int64[1] zero = {0}>
{
  a = MatMul(x, w0)
  ys, yh = RNN<hidden_size=12>(a, W, R)
  s = Squeeze(yh, zero)
  y = MatMul(s, wo)
}""", {"w0": (8, 8), "W": (1, 6, 8), "R": (1, 6, 6), "wo": (6, 6)}),
]


@pytest.mark.parametrize("case", CONTRIB_CASES + RNN_CASES, ids=[c.id for c in CONTRIB_CASES + RNN_CASES])
def test_contrib_and_recurrent(case: Case):
    model = build(case.text, positive=case.positive)
    res = prune_and_verify(model, case.ratio)
    assert_exact(res, model, case.expect)


# ----------------------------------------------------------------------------------------------
# other ratios


def _conv_keep(k: int) -> dict:
    return {"w1": (k, 3, 3, 3), "b1": (k,), "w2": (4, k, 3, 3)}


RATIO_CASES = [
    # (case source, ratio, expected shapes)
    ("sandwich-Relu", 0.25, _conv_keep(6)),
    ("sandwich-Relu", 0.75, _conv_keep(2)),
    ("sandwich-Relu", 0.9, _conv_keep(1)),
    ("sandwich-BatchNormalization", 0.75, {**_conv_keep(2), "var": (2,)}),
    ("Conv-depthwise", 0.25, {"w1": (6, 3, 3, 3), "wd": (6, 1, 3, 3), "w3": (4, 6, 1, 1)}),
    ("Conv-depthwise-multiplier2", 0.75, {"w1": (2, 3, 3, 3), "wd": (4, 1, 3, 3), "w3": (4, 4, 1, 1)}),
    ("Conv-grouped", 0.75, {"w1": (4, 3, 3, 3), "wg": (4, 1, 3, 3), "w3": (4, 4, 1, 1)}),
    ("MatMul-MLP-2d", 0.25, {"w1": (16, 24), "b1": (24,), "w2": (24, 8)}),
    ("MatMul-MLP-3d", 0.75, {"w1": (16, 8), "b1": (8,), "w2": (8, 8)}),
    ("Concat-two-convs", 0.75, {"wa": (2, 3, 3, 3), "wb": (2, 3, 1, 1), "wc": (4, 4, 3, 3)}),
    ("Split-sizes-input", 0.25, {"w1": (6, 3, 3, 3), "wa": (4, 3, 3, 3), "wb": (5, 3, 1, 1)}),
    ("Split-sizes-input", 0.75, {"w1": (2, 3, 3, 3), "wa": (4, 1, 3, 3), "wb": (5, 1, 1, 1)}),
    ("Flatten-Gemm", 0.75, {"w1": (2, 3, 3, 3), "wf": (32, 10)}),
    ("ChannelShuffle", 0.75, {"w1": (2, 3, 3, 3), "w2": (4, 2, 3, 3)}),
    ("LSTM", 0.25, {"w0": (8, 12), "W": (1, 36, 12), "R": (1, 36, 9), "wo": (9, 6)}),
]

_BY_ID = {c.id: c for c in CASES + CONTRIB_CASES + RNN_CASES}
_SANDWICH_BY_ID = {c[0]: c for c in SANDWICH_CASES}


def case_model(case_id: str) -> onnx.ModelProto:
    if case_id.startswith("sandwich-"):
        _id, mid, extra, opset, positive, s = _SANDWICH_BY_ID[case_id[len("sandwich-"):]]
        return build(sandwich(mid, extra, opset, s), positive=positive)
    c = _BY_ID[case_id]
    return build(c.text, positive=c.positive)


@pytest.mark.parametrize("case_id,ratio,expect", RATIO_CASES, ids=[f"{c}-{r}" for c, r, _ in RATIO_CASES])
def test_other_ratios(case_id, ratio, expect):
    model = case_model(case_id)
    res = prune_and_verify(model, ratio)
    assert_exact(res, model, expect)


# ----------------------------------------------------------------------------------------------
# what exactly was kept: attributes, rewritten constants and the element structure of the units


def kept_along(orig: np.ndarray, pruned: np.ndarray, axis: int) -> list[int]:
    """Indices of ``orig`` along ``axis`` that survive in ``pruned`` (matched by value)."""
    o = np.moveaxis(orig, axis, 0).reshape(orig.shape[axis], -1)
    p = np.moveaxis(pruned, axis, 0).reshape(pruned.shape[axis], -1)
    out = []
    for row in p:
        hits = [i for i in range(len(o)) if np.array_equal(o[i], row)]
        assert len(hits) == 1, "ambiguous or missing row"
        out.append(hits[0])
    return out


def const_input(model: onnx.ModelProto, op_type: str, idx: int) -> np.ndarray:
    node = next(n for n in model.graph.node if n.op_type == op_type)
    return inits(model)[node.input[idx]]


def test_grouped_conv_removes_same_position_in_every_group():
    model = case_model("Conv-grouped")
    res = prune_and_verify(model)
    o, p = inits(model), inits(res.pruned)
    groups = [onnx.helper.get_attribute_value(a) for n in res.pruned.graph.node for a in n.attribute
              if a.name == "group"]
    assert groups == [4]
    k1 = kept_along(o["w1"], p["w1"], 0)
    assert len({c % 2 for c in k1}) == 1 and sorted(c // 2 for c in k1) == [0, 1, 2, 3]
    kg = kept_along(o["bg"], p["bg"], 0)  # output channels: the same position in each group too
    assert len({c % 2 for c in kg}) == 1 and sorted(c // 2 for c in kg) == [0, 1, 2, 3]
    # the grouped weight keeps, for each kept output, the kept input position
    pos = k1[0] % 2
    np.testing.assert_array_equal(p["wg"], o["wg"][kg][:, [pos]])
    assert_exact(res, model)


@pytest.mark.parametrize("case_id,op,rows_per_channel", [
    ("Conv-depthwise", "Conv", 1), ("Conv-depthwise-multiplier2", "Conv", 2),
    ("Conv-depthwise-1d", "Conv", 1), ("ConvTranspose-depthwise", "ConvTranspose", 1),
    ("ConvTranspose-depthwise-multiplier2", "ConvTranspose", 1),
])
def test_depthwise_group_attribute_follows_channels(case_id, op, rows_per_channel):
    model = case_model(case_id)
    res = prune_and_verify(model)
    groups = [onnx.helper.get_attribute_value(a) for n in res.pruned.graph.node if n.op_type == op
              for a in n.attribute if a.name == "group"]
    assert groups == [4]
    o, p = inits(model), inits(res.pruned)
    k1 = kept_along(o["w1"], p["w1"], 0)
    wname = "wd" if op == "Conv" else "wt"
    kd = kept_along(o[wname], p[wname], 0)
    assert kd == [c * rows_per_channel + j for c in k1 for j in range(rows_per_channel)]
    assert_exact(res, model)


def test_flatten_gemm_removes_weight_rows_in_blocks_of_16():
    model = case_model("Flatten-Gemm")
    res = prune_and_verify(model)
    o, p = inits(model), inits(res.pruned)
    k1 = kept_along(o["w1"], p["w1"], 0)
    rows = np.concatenate([np.arange(c * 16, c * 16 + 16) for c in k1])
    np.testing.assert_array_equal(p["wf"], o["wf"][rows])
    np.testing.assert_array_equal(p["bf"], o["bf"])
    assert_exact(res, model)


@pytest.mark.parametrize("case_id,groups,t1,t2", [
    ("ChannelShuffle", 2, [-1, 2, 2, 5, 5], [-1, 4, 5, 5]),
    ("ChannelShuffle-4-groups", 4, [0, 2, 2, 5, 5], [0, -1, 5, 5]),
])
def test_channel_shuffle_is_pruned_through_both_reshapes(case_id, groups, t1, t2):
    model = case_model(case_id)
    res = prune_and_verify(model)
    assert_exact(res, model)
    o, p = inits(model), inits(res.pruned)
    reshapes = [n for n in res.pruned.graph.node if n.op_type == "Reshape"]
    assert [list(p[n.input[1]]) for n in reshapes] == [t1, t2]
    per = 8 // groups
    k1 = kept_along(o["w1"], p["w1"], 0)  # h channel e = g*per + q
    k2 = kept_along(o["w2"], p["w2"], 1)  # shuffled channel q*groups + g
    h_kept = {(e // per, e % per) for e in k1}
    y_kept = {(e % groups, e // groups) for e in k2}
    assert h_kept == y_kept  # the consumer reads exactly the kept producer channels, shuffled


@pytest.mark.parametrize("case_id,how", [
    ("Split-sizes-input", "input"), ("Split-attribute-opset11", "attribute"),
    ("Split-equal-no-sizes-opset11", "attribute"), ("Split-num_outputs-opset18", "input"),
    ("Split-equal-no-sizes-opset13", "input"),
])
def test_split_sizes_rewritten(case_id, how):
    model = case_model(case_id)
    res = prune_and_verify(model)
    assert_exact(res, model)
    node = next(n for n in res.pruned.graph.node if n.op_type == "Split")
    if how == "input":
        assert list(inits(res.pruned)[node.input[1]]) == [2, 2]
        assert attr_of(res.pruned, "Split", "num_outputs") is None
    else:
        assert list(attr_of(res.pruned, "Split", "split")) == [2, 2]


@pytest.mark.parametrize("case_id,lo,hi", [("Slice-channels", 2, 6), ("Slice-channels-open-end-negative-axis", 4, 8)])
def test_slice_bounds_rewritten(case_id, lo, hi):
    model = case_model(case_id)
    res = prune_and_verify(model)
    assert_exact(res, model)
    o, p = inits(model), inits(res.pruned)
    k1 = kept_along(o["w1"], p["w1"], 0)
    inside = [c for c in k1 if lo <= c < hi]
    assert p["w2"].shape[1] == len(inside) >= 1
    np.testing.assert_array_equal(p["w2"], o["w2"][:, [c - lo for c in inside]])
    starts, ends = const_input(res.pruned, "Slice", 1), const_input(res.pruned, "Slice", 2)
    ch = 0  # the channel axis is the first sliced axis in both graphs
    assert starts[ch] == sum(c < lo for c in k1)
    assert ends[ch] - starts[ch] == len(inside)


def test_resize_sizes_channel_entry_rewritten():
    model = case_model("Resize-sizes-with-channel-entry")
    res = prune_and_verify(model)
    assert_exact(res, model)
    assert list(const_input(res.pruned, "Resize", 3)) == [1, 4, 16, 16]


def test_expand_target_channel_entry_rewritten():
    model = case_model("Expand-channel-entry")
    res = prune_and_verify(model)
    assert_exact(res, model)
    assert list(const_input(res.pruned, "Expand", 1)) in ([1, 1, 8, 8], [1, 4, 8, 8])


def test_reshape_constant_target_rewritten():
    model = case_model("Reshape-minus1-128-MatMul")
    res = prune_and_verify(model)
    assert_exact(res, model)
    assert list(const_input(res.pruned, "Reshape", 1)) == [-1, 64]


# ----------------------------------------------------------------------------------------------
# approximate groups: frozen by default, pruned only with allow_approximate


def prefixed(mid: str, extra: str = "", opset: int = 17, cin2: int = 8) -> str:
    """x -> Conv(w0: 6) -> Relu -> Conv(w1, b1: 8) -> h -> mid -> m -> Conv(w2) -> y.
    The 6-channel group is always exactly prunable, so the pipeline has something to do even when
    the 8-channel group (the one touching the op under test) is frozen."""
    ex = (", " + extra) if extra else ""
    return f"""
{header(opset)}
g (float[N,3,8,8] x) => (float[N,4,8,8] y)
<float[6,3,3,3] w0, float[8,6,3,3] w1, float[8] b1, float[4,{cin2},3,3] w2{ex}>
{{
  a = Conv<pads=[1,1,1,1]>(x, w0)
  ar = Relu(a)
  h = Conv<pads=[1,1,1,1]>(ar, w1, b1)
  {mid}
  y = Conv<pads=[1,1,1,1]>(m, w2)
}}
"""


PREFIX_FROZEN = {"w0": (3, 3, 3, 3), "w1": (8, 3, 3, 3), "b1": (8,), "w2": (4, 8, 3, 3)}
PREFIX_PRUNED = {"w0": (3, 3, 3, 3), "w1": (4, 3, 3, 3), "b1": (4,), "w2": (4, 4, 3, 3)}

# (id, text, shapes by default, shapes with allow_approximate, words in the frozen reason)
APPROX_CASES = [
    ("LayerNormalization", H17 + """
g (float[N,16] x) => (float[N,8] y)
<float[24,16] w0, float[32,24] w1, float[32] b1, float[32] ga, float[32] be, float[8,32] w2>
{
  h0 = Gemm<transB=1>(x, w0)
  r0 = Relu(h0)
  h = Gemm<transB=1>(r0, w1, b1)
  n = LayerNormalization<axis=-1>(h, ga, be)
  y = Gemm<transB=1>(n, w2)
}""", {"w0": (12, 16), "w1": (32, 12), "ga": (32,), "w2": (8, 32)},
        {"w0": (12, 16), "w1": (16, 12), "ga": (16,), "be": (16,), "w2": (8, 16)}, "LayerNormalization"),
    ("LayerNormalization-3d", H17 + """
g (float[N,5,16] x) => (float[N,5,8] y)
<float[16,24] w0, float[24,32] w1, float[32] ga, float[8,32] w2>
{
  h0 = MatMul(x, w0)
  r0 = Relu(h0)
  h = MatMul(r0, w1)
  n = LayerNormalization<axis=2, epsilon=0.001>(h, ga)
  w2t = Transpose<perm=[1,0]>(w2)
  y = MatMul(n, w2t)
}""", {"w0": (16, 12), "w1": (12, 32), "ga": (32,)},
        {"w0": (16, 12), "w1": (12, 16), "ga": (16,)}, "LayerNormalization"),
    ("Softmax-channels", prefixed("m = Softmax<axis=1>(h)"), PREFIX_FROZEN, PREFIX_PRUNED, "Softmax"),
    ("Softmax-channels-opset11", prefixed("m = Softmax<axis=1>(h)", opset=11), PREFIX_FROZEN, PREFIX_PRUNED,
     "Softmax"),
    ("LogSoftmax-channels", prefixed("m = LogSoftmax<axis=-3>(h)", opset=13), PREFIX_FROZEN, PREFIX_PRUNED,
     "LogSoftmax"),
    ("ReduceMean-over-channels", prefixed("mu = ReduceMean<axes=[1]>(h)\n  m = Sub(h, mu)"),
     PREFIX_FROZEN, PREFIX_PRUNED, "ReduceMean"),
    # q and k are not linear in their weights (Sigmoid): their contraction is approximate
    ("MatMul-two-activations", H17 + """
g (float[N,5,16] x) => (float[N,5,16] y)
<float[16,24] w0, float[24,8] wq, float[24,8] wk, float[24,8] wv, float[8,16] wo>
{
  h0 = MatMul(x, w0)
  r0 = Relu(h0)
  q0 = MatMul(r0, wq)
  q = Sigmoid(q0)
  k0 = MatMul(r0, wk)
  k = Tanh(k0)
  v = MatMul(r0, wv)
  kt = Transpose<perm=[0,2,1]>(k)
  s = MatMul(q, kt)
  p = Softmax<axis=-1>(s)
  o = MatMul(p, v)
  y = MatMul(o, wo)
}""", {"w0": (16, 12), "wq": (12, 8), "wk": (12, 8)}, {"w0": (16, 12), "wq": (12, 4), "wk": (12, 4)},
        "two activations"),
]


# channels of an activation x activation MatMul (attention) are pruned at their own ratio where the
# planner has one (head_dim_ratio); plain `ratio` applies where it does not
ATTENTION_OPTS = {"head_dim_ratio": 0.5} if "head_dim_ratio" in {f.name for f in fields(PlanOptions)} else {}


@pytest.mark.parametrize("case", APPROX_CASES, ids=[c[0] for c in APPROX_CASES])
def test_approximate_frozen_by_default(case):
    _id, text, default, _allowed, word = case
    model = build(text)
    res = prune_and_verify(model)
    # the exact groups are pruned and verified; the approximate one is frozen with its reason
    assert_exact(res, model, default)
    approx_reasons = [r for r in frozen_reasons(res) if "approximate" in r]
    assert approx_reasons, frozen_reasons(res)
    assert all("--allow-approximate" in r for r in approx_reasons)
    assert any(word in r for r in approx_reasons), approx_reasons
    assert not any(gp.approximate for gp in res.plan.pruned())


@pytest.mark.parametrize("case", APPROX_CASES, ids=[c[0] for c in APPROX_CASES])
def test_approximate_pruned_when_allowed(case):
    _id, text, _default, allowed, _word = case
    model = build(text)
    res = prune_and_verify(model, allow_approximate=True, **ATTENTION_OPTS)
    assert any(gp.approximate for gp in res.plan.pruned())
    assert not any("approximate" in r for r in frozen_reasons(res))
    onnx.checker.check_model(res.pruned, full_check=True)
    check_shapes(res.pruned, allowed)
    v = res.verification
    assert not v.exact and "approximate" in v.note
    assert v.passed  # the exact groups alone still verify against the masked original
    feeds = make_inputs(res.analysis.model, batch=2, seed=3)
    outs_o, outs_p = run(model, feeds), run(res.pruned, feeds)
    assert [o.shape for o in outs_p] == [o.shape for o in outs_o]
    assert all(np.all(np.isfinite(o)) for o in outs_p)
    assert res.after.macs < res.before.macs


# ----------------------------------------------------------------------------------------------
# barriers: the group touching the op is frozen (weights untouched) with a reason naming it


def group_of(res, const: str, axis: int):
    cg = res.analysis.cg
    for g in cg.groups:
        if any(sl.const == const and sl.axis == axis for sl in g.slots):
            return g
    raise AssertionError(f"no group holds {const} axis {axis}")


INT64_MAX = 9223372036854775807
FROZEN_CASES = [
    # (id, text, words expected in one of the frozen group's reasons)
    ("unknown-standard-op-LRN", prefixed("m = LRN<size=3>(h)"), ["unknown op LRN"]),
    ("Slice-single-channel", prefixed("one = Slice(h, st, en, ax)\n  m = Mul(h, one)",
                                      "int64[1] st = {3}, int64[1] en = {4}, int64[1] ax = {1}"),
     ["Slice", "does not carry axis 1"]),
    ("Slice-reversed-channels", prefixed("m = Slice(h, st, en, ax, sp)",
                                         f"int64[1] st = {{-1}}, int64[1] en = {{-{INT64_MAX}}}, "
                                         "int64[1] ax = {1}, int64[1] sp = {-1}"),
     ["Slice", "does not carry axis 1"]),
    ("Pad-channels", prefixed("p = Pad(h, pd)\n  m = Slice(p, st, en, ax)",
                              "int64[8] pd = {0,1,0,0,0,1,0,0}, int64[1] st = {1}, int64[1] en = {9}, "
                              "int64[1] ax = {1}"),
     ["Pad", "does not carry axis 1"]),
    ("Tile-channels", prefixed("m = Tile(h, r)", "int64[4] r = {1,2,1,1}", cin2=16), ["Tile", "does not carry"]),
    ("ConstantOfShape-of-Shape", prefixed("sh = Shape(h)\n  ones = ConstantOfShape<value=float[1] {1.0}>(sh)\n"
                                          "  m = Mul(h, ones)"), ["ConstantOfShape", "does not carry axis 1"]),
    ("ignored-by-option", prefixed("m = Relu(h)"), ["ignored by --ignore"]),
]


@pytest.mark.parametrize("case", FROZEN_CASES, ids=[c[0] for c in FROZEN_CASES])
def test_frozen_group(case):
    _id, text, words = case
    model = build(text)
    opts = {"ignore": ["^relu_3$"]} if "ignore" in _id else {}
    res = prune_and_verify(model, **opts)
    assert_exact(res, model, {"w0": (3, 3, 3, 3), "w1": (8, 3, 3, 3), "b1": (8,)})
    w2 = inits(model)["w2"]
    assert shapes_of(res.pruned)["w2"] == w2.shape
    g = group_of(res, "w1", 0)
    assert g.id in res.plan.frozen and g.id not in {gp.group for gp in res.plan.pruned()}
    assert g.prunable == ("ignore" in _id)  # --ignore freezes in the plan, not in the analysis
    reasons = res.plan.frozen[g.id]
    assert any(all(w in r for w in words) for r in reasons), reasons
    # untouched means untouched: same values
    np.testing.assert_array_equal(inits(res.pruned)["b1"], inits(model)["b1"])


def test_unknown_custom_domain_op_freezes_its_groups():
    """com.example::Foo has no handler: every channel it touches is frozen and its weights stay whole.
    onnxruntime cannot run it, so analysis, plan and rewrite are checked (no verification)."""
    text = """
<ir_version: 8, opset_import: ["" : 17, "com.example" : 1]>
g (float[N,3,8,8] x) => (float[N,4,8,8] y)
<float[6,3,3,3] w0, float[8,6,3,3] w1, float[8] b1, float[8,8,3,3] wf, float[4,8,3,3] w2, float[N,8,8,8] f>
{
  a = Conv<pads=[1,1,1,1]>(x, w0)
  ar = Relu(a)
  h = Conv<pads=[1,1,1,1]>(ar, w1, b1)
  f = com.example.Foo(h)
  c = Conv<pads=[1,1,1,1]>(f, wf)
  y = Conv<pads=[1,1,1,1]>(c, w2)
}"""
    model = build(text)
    an = pipeline.analyze_model(model)
    plan = pipeline.build_plan(an, PlanOptions(ratio=0.5))
    pruned = rewrite(an.model, an.cg, plan)
    cg = an.cg
    assert "com.example::Foo" in cg.unknown_ops

    def group(const, axis):
        return next(g for g in cg.groups if any(sl.const == const and sl.axis == axis for sl in g.slots))

    for const, axis in (("w1", 0), ("wf", 1)):  # the channels into Foo (w1 out) and out of it (wf in)
        g = group(const, axis)
        assert not g.prunable and g.id in plan.frozen
        assert any("com.example::Foo" in r for r in plan.frozen[g.id]), plan.frozen[g.id]
    for const, axis in (("w0", 0), ("wf", 0)):  # the groups not touching Foo are pruned
        assert group(const, axis).id in {gp.group for gp in plan.pruned()}
    onnx.checker.check_model(pruned, full_check=True)
    o, p = inits(model), inits(pruned)
    assert shapes_of(pruned) == {"w0": (3, 3, 3, 3), "w1": (8, 3, 3, 3), "b1": (8,), "wf": (4, 8, 3, 3),
                                 "w2": (4, 4, 3, 3)}
    np.testing.assert_array_equal(p["b1"], o["b1"])
    k0 = kept_along(o["w0"], p["w0"], 0)
    np.testing.assert_array_equal(p["w1"], o["w1"][:, k0])


def test_unknown_op_only_is_nothing_to_prune():
    text = """
<ir_version: 8, opset_import: ["" : 17, "com.example" : 1]>
g (float[N,3,8,8] x) => (float[N,4,8,8] y)
<float[8,3,3,3] w1, float[4,8,3,3] w2, float[N,8,8,8] f>
{
  h = Conv<pads=[1,1,1,1]>(x, w1)
  f = com.example.Foo(h)
  y = Conv<pads=[1,1,1,1]>(f, w2)
}"""
    an = pipeline.analyze_model(build(text))
    with pytest.raises(NothingToPrune, match="com.example::Foo"):
        pipeline.build_plan(an, PlanOptions(ratio=0.5))


def test_graph_inputs_and_outputs_are_frozen():
    # a graph output in the middle freezes its group; the graph input's channels are never pruned
    text = H17 + """
g (float[N,3,8,8] x) => (float[N,4,8,8] y, float[N,8,8,8] h)
<float[6,3,3,3] w0, float[8,6,3,3] w1, float[4,8,3,3] w2>
{
  a = Conv<pads=[1,1,1,1]>(x, w0)
  ar = Relu(a)
  h = Conv<pads=[1,1,1,1]>(ar, w1)
  y = Conv<pads=[1,1,1,1]>(h, w2)
}"""
    model = build(text)
    res = prune_and_verify(model)
    assert_exact(res, model, {"w0": (3, 3, 3, 3), "w1": (8, 3, 3, 3), "w2": (4, 8, 3, 3)})
    assert any("graph output 'h'" in r for r in res.plan.frozen[group_of(res, "w1", 0).id])
    assert any("graph input 'x'" in r for r in res.plan.frozen[group_of(res, "w0", 1).id])
    assert any("graph output 'y'" in r for r in res.plan.frozen[group_of(res, "w2", 0).id])
    with pytest.raises(NothingToPrune, match="graph (input|output)"):
        prune_and_verify(build(H17 + """
g (float[N,3,8,8] x) => (float[N,4,8,8] y)
<float[4,3,3,3] w>
{
  y = Conv<pads=[1,1,1,1]>(x, w)
}"""))


# ----------------------------------------------------------------------------------------------
# verification is able to fail


def test_verification_detects_a_corrupted_pruned_model():
    model = case_model("sandwich-Relu")
    res = prune_and_verify(model)
    assert res.verification.passed
    an = res.analysis
    masked = masked_original(an.model, an.cg, res.plan)
    feeds = make_inputs(an.model, batch=2, seed=5)
    assert compare(an.model, masked, res.pruned, feeds, "cpu", TOL).passed
    # permute the kept input columns of the consumer conv: same shapes, wrong channels
    bad = onnx.ModelProto()
    bad.CopyFrom(res.pruned)
    for i, init in enumerate(bad.graph.initializer):
        if init.name == "w2":
            w = numpy_helper.to_array(init)
            bad.graph.initializer[i].CopyFrom(numpy_helper.from_array(w[:, ::-1].copy(), "w2"))
    onnx.checker.check_model(bad, full_check=True)
    v = compare(an.model, masked, bad, feeds, "cpu", TOL)
    assert not v.passed and not v.to_json()["passed"]
    assert v.outputs[0].rel_error > 100 * TOL
    # and the masking matters: the correct pruned model is not the *unmasked* original
    assert not compare(an.model, an.model, res.pruned, feeds, "cpu", TOL).passed


# ----------------------------------------------------------------------------------------------
# regressions (found by these tests, fixed): each graph has an independent, always prunable group
# (w0), so a fix that freezes the faulty group and one that prunes it correctly both pass


def assert_verifies(text: str) -> None:
    model = build(text)
    res = prune_and_verify(model)
    assert_exact(res, model)


@pytest.mark.parametrize("mid", [
    "sz = Size(h)\n  f = Cast<to=1>(sz)\n  m = Div(h, f)",
    "sh = Shape(h)\n  p = ReduceProd<keepdims=0>(sh)\n  f = Cast<to=1>(p)\n  m = Div(h, f)",
], ids=["Size", "Shape-ReduceProd"])
def test_regression_shape_value_used_in_arithmetic(mid):
    assert_verifies(prefixed(mid))


@pytest.mark.parametrize("mid,extra", [
    ("m = Gather<axis=1>(h, ix)", "int64[8] ix = {7, 6, 5, 4, 3, 2, 1, 0}"),
    ("g2 = Gather<axis=1>(h, ix)\n  r = ReduceMean<axes=[1]>(g2)\n  m = Mul(h, r)", "int64[2] ix = {1, 5}"),
], ids=["permutation", "two-channels"])
def test_regression_gather_on_channel_axis(mid, extra):
    assert_verifies(prefixed(mid, extra))


def test_regression_maxpool_indices_values_depend_on_channels():
    assert_verifies(prefixed("mp, idx = MaxPool<kernel_shape=[1,1]>(h)\n  fi = Cast<to=1>(idx)\n"
                             "  sc = Mul(fi, eps)\n  m = Add(mp, sc)", "float eps = {0.001}"))


def test_regression_run_without_verification_on_model_with_custom_op():
    text = """
<ir_version: 8, opset_import: ["" : 17, "com.example" : 1]>
g (float[N,3,8,8] x) => (float[N,4,8,8] y)
<float[6,3,3,3] w0, float[8,6,3,3] w1, float[4,8,3,3] w2, float[N,8,8,8] f>
{
  a = Conv<pads=[1,1,1,1]>(x, w0)
  ar = Relu(a)
  h = Conv<pads=[1,1,1,1]>(ar, w1)
  f = com.example.Foo(h)
  y = Conv<pads=[1,1,1,1]>(f, w2)
}"""
    res = pipeline.run(build(text), PlanOptions(ratio=0.5), verify=False)
    assert shapes_of(res.pruned)["w0"] == (3, 3, 3, 3)


def test_reshape_regroup_with_common_atoms_prunes_channel_pairs():
    """[N,8,8,8] -> [N,4,16,8] -> [N,8,8,8]: both sides refine into atoms 4 x 2 x 8, so channel
    pairs (c//2) are the units; pruning keeps them together and verifies exactly."""
    model = build(prefixed("r = Reshape(h, s1)\n  m = Reshape(r, s2)", "int64[4] s1 = {0,4,16,8}, int64[4] s2 = {0,8,8,8}"))
    res = prune_and_verify(model)
    assert res.verification.passed
    assert all(o.rel_error < TOL for o in res.verification.outputs)
    w1 = shapes_of(res.pruned)["w1"]
    assert w1[0] < 8 and w1[0] % 2 == 0  # whole pairs removed


def test_reshape_regroup_without_common_factor_is_frozen():
    text = H17 + """
g (float[N,12] x) => (float[N,5] y)
<float[12,96] w1, float[96,5] w2>
{
  h = MatMul(x, w1)
  r = Reshape(h, s1)
  m = Reshape(r, s2)
  y = MatMul(m, w2)
}"""
    text = text.replace("<float[12,96] w1, float[96,5] w2>",
                        "<float[12,96] w1, float[96,5] w2, int64[3] s1 = {0,12,8}, int64[3] s2 = {0,8,12}>")
    text = text.replace("m = Reshape(r, s2)", "m2 = Reshape(r, s2)\n  s3 = Constant<value=int64[2] {0,96}>()\n  m = Reshape(m2, s3)")
    from onnxprune.pipeline import analyze_model

    an = analyze_model(build(text))
    g = next(g for g in an.cg.groups if any(sl.const == "w1" and sl.role == "producer" for sl in g.slots))
    assert g.frozen and any("without a common factor" in r for r in g.frozen)


@pytest.mark.parametrize("idx", ["{7, 6, 5, 4, 3, 2, 1, 0}", "{1, 5}", "{0, 2, 4, 6}"])
def test_gather_channel_subset_is_followed_and_indices_renumbered(idx):
    n = idx.count(",") + 1
    model = build(H17 + f"""
g (float[N,3,8,8] x) => (float[N,4,8,8] y)
<float[8,3,3,3] w1, float[4,{n},3,3] w2, int64[{n}] ix = {idx}>
{{ h = Conv<pads=[1,1,1,1]>(x, w1)  r = Relu(h)  m = Gather<axis=1>(r, ix)  y = Conv<pads=[1,1,1,1]>(m, w2) }}""")
    res = prune_and_verify(model)
    assert res.verification.passed and res.verification.outputs[0].rel_error < TOL
    shapes = shapes_of(res.pruned)
    assert shapes["w1"][0] < 8
    gather = next(nd for nd in res.pruned.graph.node if nd.op_type == "Gather")
    new_idx = {i.name: onnx.numpy_helper.to_array(i) for i in res.pruned.graph.initializer}[gather.input[1]]
    assert new_idx.max() < shapes["w1"][0] and len(np.unique(new_idx)) == len(new_idx)
