"""Generated inputs from a model's input types, and checks of the shapes and arrays a user gives."""

from __future__ import annotations

import numpy as np
import onnx

from onnxprune.errors import UserError
from onnxprune.ir.graph import input_feeds_spec
from onnxprune.ir.graph import value_dims as _dims

DEFAULT_SPATIAL = 224
DEFAULT_OTHER = 16
MAX_INPUT_BYTES = 4 * 2**30  # generated inputs beyond this are a typo, not a benchmark


def make_inputs(model: onnx.ModelProto, overrides: dict[str, tuple[int, ...]] | None = None,
                batch: int | None = None, seed: int = 0,
                arrays: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Generated inputs from the graph's input types.

    Dynamic dims: axis 0 -> ``batch`` (default 1); the last two axes of a rank-4 input -> 224;
    anything else -> 16. ``overrides`` gives whole shapes, ``arrays`` whole values.
    """
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    total = 0
    overrides = overrides or {}
    arrays = arrays or {}
    specs = input_feeds_spec(model)
    names = {vi.name for vi in specs}
    for name in list(overrides) + list(arrays):
        if name not in names:
            raise UserError(f"'{name}' is not a graph input (inputs: {', '.join(sorted(names))})")
    for vi in specs:
        declared = _dims(vi) or []
        given = overrides.get(vi.name, arrays[vi.name].shape if vi.name in arrays else None)
        if given is not None:
            if len(given) != len(declared):
                raise UserError(f"input '{vi.name}': rank {len(given)} given, the model declares {len(declared)}")
            for ax, (g, d) in enumerate(zip(given, declared, strict=True)):
                if g < 1:
                    raise UserError(f"input '{vi.name}': dim {ax} must be >= 1, got {g}")
                if isinstance(d, int) and d > 0 and g != d:
                    raise UserError(f"input '{vi.name}': dim {ax} is fixed to {d} in the model, got {g}")
        if vi.name in arrays:
            feeds[vi.name] = arrays[vi.name]
            continue
        elem = vi.type.tensor_type.elem_type
        if not vi.type.HasField("tensor_type"):
            raise UserError(f"input '{vi.name}' is not a tensor; give it with --input")
        dtype = onnx.helper.tensor_dtype_to_np_dtype(elem)
        if vi.name in overrides:
            shape = tuple(overrides[vi.name])
        else:
            dims = _dims(vi) or []
            shape_l = []
            for ax, d in enumerate(dims):
                if isinstance(d, int) and d > 0:
                    shape_l.append(d)
                elif ax == 0:
                    shape_l.append(batch or 1)
                elif len(dims) == 4 and ax >= 2:
                    shape_l.append(DEFAULT_SPATIAL)
                else:
                    shape_l.append(DEFAULT_OTHER)
            shape = tuple(shape_l)
        n = 1
        for d in shape:
            n *= int(d)
        total += n * np.dtype(dtype).itemsize
        if total > MAX_INPUT_BYTES:  # before allocating anything
            raise UserError(f"input '{vi.name}' of shape {'x'.join(map(str, shape))}: generated inputs would take "
                            f"{total / 2**30:.1f} GiB (at most {MAX_INPUT_BYTES / 2**30:.0f} GiB); "
                            "give a smaller --input-shape")
        if np.issubdtype(dtype, np.floating):
            feeds[vi.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype == np.bool_:
            feeds[vi.name] = np.ones(shape, dtype=np.bool_)
        else:
            feeds[vi.name] = np.ones(shape, dtype=dtype)
    return feeds

