"""Small test models written in ONNX text (``onnx.parser``).

Terms:
- *header*: the ``<ir_version: ..., opset_import: [...]>`` line of a model text;
- *sandwich*: ``x -> Conv(w1, b1) -> h -> mid -> m -> Conv(w2) -> y``, which routes the 8 channels of
  ``h`` through the op(s) under test (``mid``) between a producer and a consumer weight, so a handler
  that links the wrong elements makes the pruned model differ from the masked original;
- *prefixed*: a sandwich with an extra, always exactly prunable 6-channel group in front (``w0``), so the
  pipeline has something to do even when the group touching the op under test is frozen;
- *case*: a named model text with the initializer shapes expected after pruning (``Case``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper


def from_text(text: str, seed: int = 0, positive: tuple[str, ...] = (), fill=None) -> onnx.ModelProto:
    """Parse a model in ONNX text format; every tensor declared in the ``<...>`` initializer list
    without a value gets random normal values (names in ``positive`` get values in [0.5, 1.5),
    e.g. BatchNorm variances). ``fill(name, dims, dtype, rng)``: the value instead (quantized graphs
    fill integer weights their own way)."""
    model = onnx.parser.parse_model(text)
    rng = np.random.default_rng(seed)
    produced = {o for n in model.graph.node for o in n.output}
    keep = []
    for vi in model.graph.value_info:
        if vi.name in produced:
            keep.append(vi)
            continue
        dims = [d.dim_value for d in vi.type.tensor_type.shape.dim]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)
        if fill is not None:
            arr = np.asarray(fill(vi.name, dims, dtype, rng)).astype(dtype).reshape(dims)
        elif vi.name in positive:
            arr = rng.uniform(0.5, 1.5, size=dims).astype(dtype)
        else:
            arr = rng.standard_normal(dims).astype(dtype)
        model.graph.initializer.append(numpy_helper.from_array(arr, vi.name))
    del model.graph.value_info[:]
    model.graph.value_info.extend(keep)
    for i, node in enumerate(model.graph.node):
        if not node.name:
            node.name = f"{node.op_type.lower()}_{i}"
    return model


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


def from_nodes(nodes: list[onnx.NodeProto], initializers: list[onnx.TensorProto], x_shape, y_shape,
               domains: dict[str, int] | None = None, opset: int = 17) -> onnx.ModelProto:
    """A one-input (``x``), one-output (``y``) float model from ``onnx.helper`` nodes, for ops the text
    format cannot spell conveniently; ``domains`` adds opset imports (e.g. ``{"com.microsoft": 1}``)."""
    h = onnx.helper
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, x_shape)],
                     [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, y_shape)], initializer=initializers)
    opsets = [h.make_opsetid("", opset)] + [h.make_opsetid(d, v) for d, v in (domains or {}).items()]
    return h.make_model(g, opset_imports=opsets)


def random_tensor(name: str, shape, rng: np.random.Generator, scale: float = 0.3) -> onnx.TensorProto:
    """A float32 initializer of normal values times ``scale``."""
    return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)


# ----------------------------------------------------------------------------------------------
# model texts


def header(opset: int, domains: dict[str, int] | None = None) -> str:
    """The header line of a model text at ``opset`` (the IR version it needs), plus ``domains``."""
    ir = 8 if opset <= 18 else (9 if opset <= 20 else 10)
    imports = ", ".join([f'"" : {opset}'] + [f'"{d}" : {v}' for d, v in (domains or {}).items()])
    return f"<ir_version: {ir}, opset_import: [{imports}]>"


H17 = header(17)
MS = {"com.microsoft": 1}  # onnxruntime's contrib domain
MS17 = header(17, MS)


def sandwich_text(mid: str, extra: str = "", opset: int = 17, s: int = 8, c: int = 8,
                  domains: dict[str, int] | None = None) -> str:
    """x[N,3,8,8] -> Conv(w1,b1) -> h[N,c,8,8] -> ``mid`` -> m[N,c,s,s] -> Conv(w2) -> y[N,4,s,s];
    ``extra`` declares more initializers (``"float[8,1,1] c"``)."""
    ex = (", " + extra) if extra else ""
    return f"""
{header(opset, domains)}
g (float[N,3,8,8] x) => (float[N,4,{s},{s}] y)
<float[{c},3,3,3] w1, float[{c}] b1, float[4,{c},3,3] w2{ex}>
{{
  h = Conv<pads=[1,1,1,1]>(x, w1, b1)
  {mid}
  y = Conv<pads=[1,1,1,1]>(m, w2)
}}
"""


def sandwich_expect(k: int) -> dict[str, tuple[int, ...]]:
    """The sandwich's weights when ``k`` of the 8 channels of ``h`` are kept."""
    return {"w1": (k, 3, 3, 3), "b1": (k,), "w2": (4, k, 3, 3)}


SANDWICH_EXPECT = sandwich_expect(4)  # at ratio 0.5


def sandwich(mid: str, extra: str = "", *, opset: int = 17, s: int = 8, positive: tuple[str, ...] = (),
             seed: int = 0) -> onnx.ModelProto:
    """The sandwich model around ``mid`` (``build`` of ``sandwich_text``)."""
    return build(sandwich_text(mid, extra, opset, s), positive=positive, seed=seed)


def prefixed_text(mid: str, extra: str = "", opset: int = 17, cin2: int = 8) -> str:
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


# the prefixed graph's weights at 0.5 when the group of ``h`` is frozen, and when it is pruned
PREFIX_FROZEN = {"w0": (3, 3, 3, 3), "w1": (8, 3, 3, 3), "b1": (8,), "w2": (4, 8, 3, 3)}
PREFIX_PRUNED = {"w0": (3, 3, 3, 3), "w1": (4, 3, 3, 3), "b1": (4,), "w2": (4, 4, 3, 3)}


@dataclass(frozen=True)
class Case:
    """A named test graph: its text, the initializer shapes expected after pruning at ``ratio``
    (names, or ``"@T:i"`` for input i of the node producing T) and its positive initializers."""

    id: str
    text: str
    expect: dict = field(default_factory=dict)
    positive: tuple = ()
    ratio: float = 0.5
    input_shapes: dict | None = None

    def model(self) -> onnx.ModelProto:
        return build(self.text, positive=self.positive)


def sandwich_case(id: str, mid: str, extra: str = "", opset: int = 17, positive: tuple = (),
                  s: int = 8) -> Case:
    """A sandwich around ``mid`` as a ``Case`` expecting ``SANDWICH_EXPECT``."""
    return Case(id, sandwich_text(mid, extra, opset, s), SANDWICH_EXPECT, positive)


def ids(cases) -> list[str]:
    return [c.id for c in cases]


def index(cases=(), sandwiches=()) -> dict[str, Case]:
    """Cases by id; sandwich cases as ``"sandwich-<id>"``."""
    return {**{c.id: c for c in cases}, **{f"sandwich-{c.id}": c for c in sandwiches}}


# ----------------------------------------------------------------------------------------------
# the small CNNs of the command-line tests

# two Gemms with a dynamic batch: the calibration and data-aware importance tests' model
MLP = """
<ir_version: 8, opset_import: ["" : 17]>
mlp (float[N,8] x) => (float[N,5] y)
<float[16,8] w1, float[16] b1, float[5,16] w2, float[5] b2>
{
  h = Gemm <transB=1> (x, w1, b1)
  r = Relu (h)
  y = Gemm <transB=1> (r, w2, b2)
}
"""

# three Gemms and a softmax: the distillation tests' classifier
SOFTMAX_MLP = """
<ir_version: 8, opset_import: ["" : 17]>
mlp (float[N,8] x) => (float[N,6] y)
<float[32,8] w1, float[32] b1, float[32,32] w2, float[32] b2, float[6,32] w3, float[6] b3>
{
  h1 = Gemm <transB=1> (x, w1, b1)
  r1 = Relu (h1)
  h2 = Gemm <transB=1> (r1, w2, b2)
  r2 = Relu (h2)
  z = Gemm <transB=1> (r2, w3, b3)
  y = Softmax <axis=-1> (z)
}
"""

# a 3x3 conv (8 filters) -> Relu -> a 1x1 conv without a bias: a feature map out ([N, 5, 6, 6], so no
# classifier-shaped output); the compensation and fidelity-target tests' model
CONV_1X1 = """
<ir_version: 8, opset_import: ["" : 17]>
cnn (float[N,3,6,6] x) => (float[N,5,6,6] y)
<float[8,3,3,3] w1, float[8] b1, float[5,8,1,1] w2>
{
  c = Conv <pads=[1,1,1,1]> (x, w1, b1)
  r = Relu (c)
  y = Conv (r, w2)
}
"""

# conv1 -> BN -> Relu -> conv2 -> Relu -> GlobalAveragePool -> Flatten -> Gemm -> y
SMALL_CNN = """
<ir_version: 8, opset_import: ["" : 17]>
small (float[1,3,16,16] x) => (float[1,10] y)
<float[8,3,3,3] w1, float[8] b1, float[8] s1, float[8] bb1, float[8] m1, float[8] v1,
 float[16,8,3,3] w2, float[16] b2, float[10,16] wf, float[10] bf>
{
  c1 = Conv <pads=[1,1,1,1]> (x, w1, b1)
  n1 = BatchNormalization (c1, s1, bb1, m1, v1)
  r1 = Relu (n1)
  c2 = Conv <pads=[1,1,1,1]> (r1, w2, b2)
  r2 = Relu (c2)
  p = GlobalAveragePool (r2)
  f = Flatten (p)
  y = Gemm <transB=1> (f, wf, bf)
}
"""
SMALL_CNN_NODE_NAMES = ["conv1", "bn1", "relu1", "conv2", "relu2", "gap", "flatten", "fc"]

# a single Conv from graph input to graph output: nothing can be pruned
SINGLE_CONV = """
<ir_version: 8, opset_import: ["" : 17]>
single (float[1,3,8,8] x) => (float[1,4,8,8] y)
<float[4,3,3,3] w>
{
  y = Conv <pads=[1,1,1,1]> (x, w)
}
"""

# conv1 (+bias) -> BN -> Relu -> depthwise conv -> Relu -> conv2 -> y
PLANTED_CNN = """
<ir_version: 8, opset_import: ["" : 17]>
planted (float[1,3,16,16] x) => (float[1,4,16,16] y)
<float[8,3,3,3] w1, float[8] b1, float[8] s1, float[8] bb1, float[8] m1, float[8] v1,
 float[8,1,3,3] wd, float[4,8,1,1] w2>
{
  c1 = Conv <pads=[1,1,1,1]> (x, w1, b1)
  n1 = BatchNormalization (c1, s1, bb1, m1, v1)
  r1 = Relu (n1)
  d = Conv <group=8, pads=[1,1,1,1]> (r1, wd)
  r2 = Relu (d)
  y = Conv (r2, w2)
}
"""
PLANTED_CNN_NODE_NAMES = ["conv1", "bn1", "relu1", "dwconv", "relu2", "conv2"]


def _named(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    assert len(model.graph.node) == len(names)
    for node, name in zip(model.graph.node, names, strict=True):
        node.name = name
    onnx.checker.check_model(model, full_check=True)
    return model


def small_cnn(seed: int = 0) -> onnx.ModelProto:
    return _named(from_text(SMALL_CNN, seed=seed, positive=("v1",)), SMALL_CNN_NODE_NAMES)


def single_conv(seed: int = 0) -> onnx.ModelProto:
    m = from_text(SINGLE_CONV, seed=seed)
    onnx.checker.check_model(m, full_check=True)
    return m


def planted_cnn(seed: int = 0) -> onnx.ModelProto:
    return _named(from_text(PLANTED_CNN, seed=seed, positive=("v1",)), PLANTED_CNN_NODE_NAMES)


# the gradient criteria's test CNN: x -> conv1 -> BN -> tanh = a1 -> conv2 -> tanh = a2; r = a1 + a2 (a1
# feeds conv2 and the Add: a mask must sit on conv2's edge only) -> depthwise -> tanh -> conv3 (12 ch)
# -> tanh -> GAP -> flatten f -> GRAD_CNN_HEAD (replace ``TAIL`` with it, or with another head on f)
GRAD_CNN = """
<ir_version: 8, opset_import: ["" : 17]>
cnn (float[N,3,8,8] x) => (float[N,5] y)
<float[8,3,3,3] w1, float[8] b1, float[8] s1, float[8] bb1, float[8] m1, float[8] v1,
 float[8,8,3,3] w2, float[8] b2, float[8,1,3,3] wd, float[12,8,1,1] w3, float[5,12] wf, float[5] bf>
{
  c1 = Conv <pads=[1,1,1,1]> (x, w1, b1)
  n1 = BatchNormalization (c1, s1, bb1, m1, v1)
  a1 = Tanh (n1)
  c2 = Conv <pads=[1,1,1,1]> (a1, w2, b2)
  a2 = Tanh (c2)
  r = Add (a1, a2)
  d = Conv <group=8, pads=[1,1,1,1]> (r, wd)
  a3 = Tanh (d)
  c3 = Conv (a3, w3)
  a4 = Tanh (c3)
  p = GlobalAveragePool (a4)
  f = Flatten (p)
  TAIL
}
"""
GRAD_CNN_HEAD = "y = Gemm <transB=1> (f, wf, bf)"
