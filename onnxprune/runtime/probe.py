"""Probes: run a model once in onnxruntime (CPU) to read tensors that static analysis cannot tell.

``scale=1`` runs at the analysis sizes: the ``--input`` arrays where given, else generated inputs of the
``--input-shape`` (or default) sizes; a failure there is the user's to fix (one-line error).
``scale=2`` runs with every *declared* dynamic size changed (the batch doubled, other dynamic sizes moved
by an odd step, then by a larger one if the model rejects that), whether or not the user fixed the size
for analysis; a failure there returns nothing and never aborts (what it could not show stays dynamic).
A probe shows values; it never proves one static (``analysis.static`` does that).
"""

from __future__ import annotations

import numpy as np
import onnx

from onnxprune.errors import UserError
from onnxprune.ir.graph import input_feeds_spec
from onnxprune.ir.graph import value_dims as _dims
from onnxprune.runtime.inputs import make_inputs
from onnxprune.runtime.session import make_session

# steps for non-batch dynamic sizes at scale 2, tried in turn: odd first (shares no factor with the
# usual sizes), then the step most image models accept (multiples of 32)
_STEPS = {4: (7, 32), None: (3, 1)}


def run_for_shapes(model: onnx.ModelProto, names: list[str], overrides, scale: int,
                   arrays=None) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in run_probe(model, names, overrides, scale, arrays).items()}


def scaled_feeds(model: onnx.ModelProto, feeds: dict[str, np.ndarray], attempt: int) -> dict[str, np.ndarray]:
    """``feeds`` with every declared dynamic size changed (see the module doc); values are repeated
    from the given ones (token ids stay token ids, a sample rate stays a sample rate)."""
    out = dict(feeds)
    for vi in input_feeds_spec(model):
        dims = _dims(vi) or []
        if vi.name not in feeds:
            continue
        shape = list(feeds[vi.name].shape)
        steps = _STEPS[4] if len(dims) == 4 else _STEPS[None]
        for ax, d in enumerate(dims):
            if isinstance(d, int) and d > 0 or ax >= len(shape):
                continue
            shape[ax] = 2 * shape[ax] if ax == 0 else shape[ax] + steps[min(attempt, len(steps) - 1)]
        if tuple(shape) != feeds[vi.name].shape:
            out[vi.name] = np.resize(feeds[vi.name], shape).astype(feeds[vi.name].dtype)
    return out


def run_probe(model: onnx.ModelProto, names: list[str], overrides, scale: int,
              arrays: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    existing = {o.name for o in probe.graph.output}
    graph_inputs = {i.name for i in probe.graph.input}
    for n in names:
        if n not in existing and n not in graph_inputs:
            probe.graph.output.append(onnx.ValueInfoProto(name=n))
    feeds = make_inputs(model, overrides, arrays=arrays)
    try:
        sess, _ = make_session(probe, "cpu")
    except UserError:
        if scale != 1:
            return {}
        raise
    attempts = [feeds] if scale == 1 else [scaled_feeds(model, feeds, a) for a in range(2)]
    for k, f in enumerate(attempts):
        try:
            outs = sess.run(None, f)
            break
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types
            if scale != 1:
                if k + 1 < len(attempts):
                    continue
                return {}
            given = "the given --input arrays" if arrays else "generated inputs"
            hint = "" if arrays else "; give shapes with --input-shape or arrays with --input"
            raise UserError(f"onnxruntime could not run the model on {given} "
                            f"({str(exc).splitlines()[0][:200]}){hint}") from None
    result = {}
    for meta, arr in zip(sess.get_outputs(), outs, strict=True):
        result[meta.name] = np.asarray(arr)
    return result
