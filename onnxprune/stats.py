"""Model statistics: op counts, parameters, MACs (from handlers, on concrete shapes), file size."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import onnx

from onnxprune import registry
from onnxprune.model import ConstantTable, Shapes, default_opset


@dataclass
class ModelStats:
    nodes: int
    ops: Counter = field(default_factory=Counter)
    params: int = 0
    macs: int = 0
    size_bytes: int = 0

    def to_json(self) -> dict:
        return {"nodes": self.nodes, "ops": dict(self.ops), "params": self.params, "macs": self.macs,
                "size_bytes": self.size_bytes}


def model_stats(model: onnx.ModelProto, shapes: Shapes) -> ModelStats:
    import onnxprune.handlers  # noqa: F401

    ops = Counter(n.op_type for n in model.graph.node if n.op_type != "Constant")
    consts = ConstantTable.of(model.graph)
    params = sum(int(v.size) for v in consts.values.values() if np.issubdtype(v.dtype, np.floating))
    opset = default_opset(model) or 0
    macs = 0
    for node in model.graph.node:
        h = registry.lookup(node.domain or "", node.op_type, opset)
        if h is not None:
            macs += h.macs(node, shapes.get, consts.get)
    size = model.ByteSize()
    return ModelStats(nodes=sum(ops.values()), ops=ops, params=params, macs=macs, size_bytes=size)


def human(n: float, unit: str = "") -> str:
    for div, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= div:
            return f"{n / div:.2f}{suffix}{unit}"
    return f"{n:.0f}{unit}"


def delta(before: float, after: float) -> str:
    if before == 0:
        return "-"
    return f"{(after - before) / before * 100:+.1f}%"
