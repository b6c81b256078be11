"""Probes: run a model once in onnxruntime (CPU) to read tensors that static analysis cannot tell,
at the generated input sizes (``scale=1``) or with every dynamic size changed (``scale=2``)."""

from __future__ import annotations

import numpy as np
import onnx

from onnxprune.errors import UserError
from onnxprune.ir.graph import input_feeds_spec
from onnxprune.ir.graph import value_dims as _dims
from onnxprune.runtime.inputs import make_inputs
from onnxprune.runtime.session import make_session


def run_for_shapes(model: onnx.ModelProto, names: list[str], overrides, scale: int) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in run_probe(model, names, overrides, scale).items()}


def probe_static_values(model: onnx.ModelProto, names: list[str], overrides=None) -> dict[str, np.ndarray]:
    """Values of computed (small, integer) tensors that do not depend on dynamic input sizes."""
    if not names:
        return {}
    a = run_probe(model, names, overrides, scale=1)
    b = run_probe(model, names, overrides, scale=2)
    return {k: v for k, v in a.items() if k in b and b[k].shape == v.shape and np.array_equal(b[k], v)}


def run_probe(model: onnx.ModelProto, names: list[str], overrides, scale: int) -> dict[str, np.ndarray]:
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    existing = {o.name for o in probe.graph.output}
    graph_inputs = {i.name for i in probe.graph.input}
    for n in names:
        if n not in existing and n not in graph_inputs:
            probe.graph.output.append(onnx.ValueInfoProto(name=n))
    feeds = make_inputs(model, overrides, batch=scale)
    if scale != 1:
        # scale dynamic non-batch dims too, so they are recognised as dynamic
        for vi in input_feeds_spec(model):
            dims = _dims(vi) or []
            if overrides and vi.name in overrides:
                continue
            shape = list(feeds[vi.name].shape)
            for ax, d in enumerate(dims):
                if not isinstance(d, int) and ax > 0:
                    shape[ax] = shape[ax] + (32 if len(dims) == 4 else 1)
            if tuple(shape) != feeds[vi.name].shape:
                feeds[vi.name] = np.resize(feeds[vi.name], shape).astype(feeds[vi.name].dtype)
    try:
        sess, _ = make_session(probe, "cpu")
        outs = sess.run(None, feeds)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001
        if scale != 1:
            return {}
        raise UserError(f"onnxruntime could not run the model on generated inputs "
                        f"({str(exc).splitlines()[0][:200]}); give shapes with --input-shape") from None
    result = {}
    for meta, arr in zip(sess.get_outputs(), outs, strict=True):
        result[meta.name] = np.asarray(arr)
    return result

