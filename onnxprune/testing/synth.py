"""Synthetic models for tests and benchmarks: a dense MLP stack whose weights are written straight
to an external data file (never all in memory), so multi-gigabyte models can be generated anywhere."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper


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
