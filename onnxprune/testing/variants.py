"""Equivalent re-encodings of an ONNX model, used by tests and benchmarks.

- :func:`initializers_to_constants`: every initializer becomes a ``Constant`` node;
- :func:`ort_optimize`: onnxruntime's offline graph optimizer (CPU provider), which fuses ops into
  com.microsoft contrib ops (FusedConv, FusedGemm, ...) and folds constants.

Both are pure: the input model or file is never modified.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import onnx
from onnx import external_data_helper

from onnxprune.runtime.session import require_ort

LEVELS = ("disable", "basic", "extended", "all")


def initializers_to_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose main-graph initializers are ``Constant`` nodes (placed first).

    Initializers that are also graph inputs (overridable defaults) keep their input semantics only
    as initializers, so they are left as they are. External data must already be loaded.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    input_names = {vi.name for vi in g.input}
    consts: list[onnx.NodeProto] = []
    keep: list[onnx.TensorProto] = []
    used = {n.name for n in g.node if n.name}
    for init in g.initializer:
        if init.name in input_names:
            keep.append(init)
            continue
        if external_data_helper.uses_external_data(init):
            raise ValueError(f"initializer '{init.name}' has unloaded external data")
        tensor = onnx.TensorProto()
        tensor.CopyFrom(init)
        tensor.ClearField("name")
        name = f"{init.name}__const"
        while name in used:
            name += "_"
        used.add(name)
        consts.append(onnx.helper.make_node("Constant", [], [init.name], name=name, value=tensor))
    nodes = consts + list(g.node)
    del g.initializer[:]
    g.initializer.extend(keep)
    del g.node[:]
    g.node.extend(nodes)
    return out


def _level(ort, level: str):
    levels = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    if level not in levels:
        raise ValueError(f"unknown optimization level {level!r}; expected one of {LEVELS}")
    return levels[level]


def ort_optimize(model_path: str | os.PathLike, level: str = "extended", *,
                 external_data: bool = False) -> onnx.ModelProto:
    """Run onnxruntime's offline optimizer (CPU provider) on ``model_path`` and return the result.

    The optimized file is written to a temporary directory and loaded back with any external data
    it uses, so the returned model is self-contained (no tensor refers to a file). ``external_data``
    asks onnxruntime to write the initializers to a side file (what a model over 2 GB needs).
    """
    ort = require_ort()
    src = Path(model_path)
    with tempfile.TemporaryDirectory(prefix="onnxprune-ort-") as tmp:
        dest = Path(tmp) / f"{src.stem}.ort-{level}.onnx"
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.graph_optimization_level = _level(ort, level)
        so.optimized_model_filepath = str(dest)
        if external_data:
            so.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                        f"{dest.name}.data")
            so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes",
                                        "64")
        ort.InferenceSession(str(src), sess_options=so, providers=["CPUExecutionProvider"])
        # external data (if onnxruntime wrote any) is read from beside the file, inside ``tmp``
        model = onnx.load(str(dest), load_external_data=True)
    return model
