"""Synthetic models for tests and benchmarks: a dense MLP stack whose weights are written straight
to an external data file (never all in memory), so multi-gigabyte models can be generated anywhere;
the ONNX model zoo's opset-9 classics that the onnx package ships weightless, with weights filled in.

Terms:
- *light classic*: ``onnx/backend/test/data/light/light_<name>.onnx`` (AlexNet, VGG19, ResNet-50, ...,
  IR 3, opset 9), where every weight is a ``ConstantOfShape`` placeholder of the value 0.02.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

LIGHT_CLASSICS = ("bvlc_alexnet", "densenet121", "inception_v1", "inception_v2", "resnet50", "shufflenet",
                  "squeezenet", "vgg19", "zfnet512")


def external_mlp(path: str | os.PathLike, width: int = 512, layers: int = 4, seed: int = 0) -> int:
    """Write an MLP (MatMul + Add + Relu per layer, dynamic batch) with external data beside
    ``path``. Returns the number of weight bytes."""
    p = Path(path)
    data_name = p.name + ".data"
    rng = np.random.default_rng(seed)
    inits, nodes = [], []
    offset = 0
    x = "x"
    with open(p.parent / data_name, "wb") as f:
        for i in range(layers):
            for name, shape in ((f"w{i}", (width, width)), (f"b{i}", (width,))):
                arr = rng.standard_normal(shape, dtype=np.float32)
                arr *= np.float32(1.0 / np.sqrt(width)) if len(shape) == 2 else np.float32(0.1)
                raw = arr.tobytes()
                f.write(raw)
                t = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=list(shape),
                                data_location=TensorProto.EXTERNAL)
                for k, v in (("location", data_name), ("offset", str(offset)), ("length", str(len(raw)))):
                    e = t.external_data.add()
                    e.key, e.value = k, v
                offset += len(raw)
                inits.append(t)
                del arr, raw
            nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [f"m{i}"], name=f"fc{i}"))
            nodes.append(helper.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"], name=f"bias{i}"))
            if i < layers - 1:
                nodes.append(helper.make_node("Relu", [f"a{i}"], [f"r{i}"], name=f"relu{i}"))
                x = f"r{i}"
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", width])],
                              [helper.make_tensor_value_info(f"a{layers - 1}", TensorProto.FLOAT, ["N", width])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    p.write_bytes(model.SerializeToString())
    return offset


def light_classic_path(name: str) -> Path:
    return Path(onnx.__file__).parent / "backend" / "test" / "data" / "light" / f"light_{name}.onnx"


def _weight_role(model: onnx.ModelProto, name: str) -> tuple[str, int]:
    """(op type, input index) of the first reader of ``name``, through Unsqueeze (Caffe's Scale)."""
    readers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for n in model.graph.node:
        for i, t in enumerate(n.input):
            readers.setdefault(t, []).append((n, i))
    r = readers.get(name, [])
    while r and r[0][0].op_type == "Unsqueeze":
        r = readers.get(r[0][0].output[0], [])
    return (r[0][0].op_type, r[0][1]) if r else ("", -1)


def light_classic(name: str, seed: int = 0, expose_logits: bool = True) -> onnx.ModelProto:
    """The light classic ``name`` (see the module doc) with every ``ConstantOfShape`` placeholder
    replaced by an initializer of seeded normal values: weights of rank >= 2 He-scaled
    (std sqrt(2 / fan_in)), BatchNorm variances uniform in [0.5, 1.5), BatchNorm and Scale (Mul)
    multipliers 1 + 0.1·N(0, 1), biases and means 0.1·N(0, 1). The model stays IR 3 / opset 9, every
    initializer listed as a graph input as IR 3 requires. ``expose_logits``: a final Softmax's input
    becomes a second graph output, so that a comparison of outputs is not blinded by a saturated
    softmax (random weights make one-hot softmaxes)."""
    model = onnx.load(str(light_classic_path(name)))
    g = model.graph
    rng = np.random.default_rng(seed)
    inits = {t.name: t for t in g.initializer}
    nodes, shapes_used = [], set()
    for n in g.node:
        if n.op_type != "ConstantOfShape" or n.input[0] not in inits:
            nodes.append(n)
            continue
        shape = tuple(int(v) for v in numpy_helper.to_array(inits[n.input[0]]))
        shapes_used.add(n.input[0])
        op, slot = _weight_role(model, n.output[0])
        if len(shape) >= 2:
            arr = rng.standard_normal(shape) * np.sqrt(2.0 / int(np.prod(shape[1:])))
        elif op == "BatchNormalization" and slot == 4:
            arr = rng.uniform(0.5, 1.5, shape)
        elif (op == "BatchNormalization" and slot == 1) or op == "Mul":
            arr = 1.0 + 0.1 * rng.standard_normal(shape)
        else:
            arr = 0.1 * rng.standard_normal(shape)
        g.initializer.append(numpy_helper.from_array(arr.astype(np.float32), n.output[0]))
        g.input.append(helper.make_tensor_value_info(n.output[0], TensorProto.FLOAT, list(shape)))
    del g.node[:]
    g.node.extend(nodes)
    read = {t for n in g.node for t in n.input}
    dead = {t for t in shapes_used if t not in read}
    kept = [t for t in g.initializer if t.name not in dead]
    del g.initializer[:]
    g.initializer.extend(kept)
    ins = [i for i in g.input if i.name not in dead]
    del g.input[:]
    g.input.extend(ins)
    last = g.node[len(g.node) - 1]
    if expose_logits and last.op_type == "Softmax":
        inferred = onnx.shape_inference.infer_shapes(model)
        vi = next(v for v in inferred.graph.value_info if v.name == last.input[0])
        g.output.append(vi)
    return model
