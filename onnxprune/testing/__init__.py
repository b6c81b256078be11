"""Graph builders and checks for tests (nothing in the package imports this): small models from
ONNX text, prune-and-verify, synthetic large models (``synth``) and re-encodings (``variants``)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from onnxprune import pipeline
from onnxprune.planning.options import PlanOptions


def from_text(text: str, seed: int = 0, positive: tuple[str, ...] = ()) -> onnx.ModelProto:
    """Parse a model in ONNX text format; every tensor declared in the ``<...>`` initializer list
    without a value gets random normal values (names in ``positive`` get values in [0.5, 1.5),
    e.g. BatchNorm variances)."""
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
        if vi.name in positive:
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


def prune_and_verify(model: onnx.ModelProto, ratio: float = 0.5, *, input_shapes=None, ep: str = "cpu",
                     tol: float = 1e-4, **plan_kwargs):
    """Prune ``model`` in memory and verify it against the masked original.

    Returns the pipeline ``Result`` (``.pruned``, ``.plan``, ``.verification``, ``.before``/``.after``).
    """
    return pipeline.run(model, PlanOptions(ratio=ratio, **plan_kwargs), input_shapes=input_shapes,
                        verify=True, ep=ep, tol=tol)
