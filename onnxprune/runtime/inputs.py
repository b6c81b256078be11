"""Generated inputs from a model's input types, and checks of the shapes and arrays a user gives.

Sizes of a dynamic dim, first that applies: the user's ``--input`` array or ``--input-shape``; the
size of the same named dim (``dim_param``) in another input the user gave; the size the probe found
the model needs (``runtime.probe`` grows a dim the model rejects at its default, and remembers it
here for the process: :func:`found_sizes`); the default (axis 0 -> 1, the last two axes of a rank-4
input -> 224, other dims -> 16). :func:`probe_sizes` says which applied, for the report.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from onnxprune.errors import UserError
from onnxprune.ir.graph import input_feeds_spec
from onnxprune.ir.graph import value_dims as _dims
from onnxprune.runtime import calib

DEFAULT_SPATIAL = 224
DEFAULT_OTHER = 16
MAX_INPUT_BYTES = 4 * 2**30  # generated inputs beyond this are a typo, not a benchmark

DEFAULT = "default"
FIXED = "fixed"


@dataclass(frozen=True)
class Found:
    """What the probe found about sizes the model rejects at their defaults (``runtime.probe``)."""

    sizes: dict[tuple[str, int], int]  # (input, axis) -> the smallest size tried that ran; {} when none ran
    tried: dict[tuple[str, int], tuple[int, ...]]  # (input, axis) -> the sizes that did not run, in order
    source: str  # "grown" (the growth sequence) or "--calib" (the calibration samples' size)
    message: str  # one line: what was tried and onnxruntime's reason

    @property
    def ok(self) -> bool:
        return bool(self.sizes)


# sizes found by the probe, per input signature (names, types, declared dims): a model, its
# normalized form and its pruned versions share one; filled only for models that reject a default
_FOUND: dict[tuple, Found] = {}
# sizes of the user's calibration samples (name -> sample shape, without axis 0; None: a .npy for a
# single-input model): the probe tries them first when a model rejects the default sizes
_DATA_SIZES: dict[str | None, tuple[int, ...]] = {}


def signature(model: onnx.ModelProto) -> tuple:
    return tuple((vi.name, vi.type.SerializeToString()) for vi in input_feeds_spec(model))


def found_sizes(model: onnx.ModelProto) -> Found | None:
    return _FOUND.get(signature(model))


def remember_sizes(model: onnx.ModelProto, found: Found) -> None:
    _FOUND[signature(model)] = found


def forget_sizes() -> None:
    """Drop what the probe found and the calibration sizes (tests; a process that changes models)."""
    _FOUND.clear()
    _DATA_SIZES.clear()


def use_data_sizes(shapes: dict[str | None, tuple[int, ...]]) -> None:
    """Sample shapes of the calibration data (``--calib``), tried first by the probe where a model
    does not run at the default sizes."""
    _DATA_SIZES.clear()
    _DATA_SIZES.update({k: tuple(int(d) for d in v) for k, v in shapes.items()})


def data_sizes(name: str, n_inputs: int) -> tuple[int, ...] | None:
    if name in _DATA_SIZES:
        return _DATA_SIZES[name]
    return _DATA_SIZES.get(None) if n_inputs == 1 else None


def calib_sample_shapes(path: str) -> dict[str | None, tuple[int, ...]]:
    """Sample shapes (axis 0 dropped) of the arrays of a ``--calib`` path, from the headers only;
    {} when they cannot be read (``runtime.calib.open_calib`` reports that later, with its checks)."""
    try:
        files = calib._files_of(Path(path))
        f = str(files[0])
        if f.lower().endswith(".npy"):
            return {None: calib._npy_chunk(f).sample_shape}
        return {k: c.sample_shape for k, c in calib._npz_chunks(f).items()}
    except (UserError, OSError, ValueError):
        return {}


@dataclass(frozen=True)
class Planned:
    """The shape an input is fed at, with where each dim's size came from."""

    shape: tuple[int, ...]
    why: tuple[str, ...]  # per axis: FIXED, DEFAULT, "--input", "--input-shape", "dim 'x' of input 'y'", ...


def _given_env(specs, overrides, arrays) -> dict[str, tuple[int, str]]:
    """Sizes of named dims in the inputs the user gave: dim_param -> (size, input)."""
    env: dict[str, tuple[int, str]] = {}
    for vi in specs:
        given = overrides.get(vi.name, arrays[vi.name].shape if vi.name in arrays else None)
        if given is None:
            continue
        for d, g in zip(_dims(vi) or [], given, strict=False):
            if isinstance(d, str) and d and d not in env:
                env[d] = (int(g), vi.name)
    return env


def plan_shapes(model: onnx.ModelProto, overrides: dict[str, tuple[int, ...]] | None = None,
                batch: int | None = None, arrays: dict[str, np.ndarray] | None = None,
                found: bool = True) -> dict[str, Planned]:
    """The shape of every graph input (no checks; ``make_inputs`` checks). ``found``: apply the sizes
    the probe found (``False``: the defaults, as the probe's first try)."""
    overrides = overrides or {}
    arrays = arrays or {}
    specs = input_feeds_spec(model)
    env = _given_env(specs, overrides, arrays)
    memo = found_sizes(model) if found else None
    out: dict[str, Planned] = {}
    for vi in specs:
        dims = _dims(vi) or []
        if vi.name in arrays:
            shape = tuple(int(d) for d in arrays[vi.name].shape)
            why = tuple(FIXED if isinstance(d, int) and d > 0 else "--input" for d in dims)
            out[vi.name] = Planned(shape, why if len(why) == len(shape) else ("--input",) * len(shape))
            continue
        if vi.name in overrides:
            shape = tuple(int(d) for d in overrides[vi.name])
            why = tuple(FIXED if isinstance(d, int) and d > 0 else "--input-shape" for d in dims)
            out[vi.name] = Planned(shape, why if len(why) == len(shape) else ("--input-shape",) * len(shape))
            continue
        shape_l: list[int] = []
        why_l: list[str] = []
        for ax, d in enumerate(dims):
            if isinstance(d, int) and d > 0:
                shape_l.append(d)
                why_l.append(FIXED)
            elif isinstance(d, str) and d in env:
                shape_l.append(env[d][0])
                why_l.append(f"dim '{d}' of input '{env[d][1]}'")
            elif memo is not None and memo.ok and (vi.name, ax) in memo.sizes and not (ax == 0 and batch):
                shape_l.append(memo.sizes[(vi.name, ax)])
                why_l.append(memo.source)
            elif ax == 0:
                shape_l.append(batch or 1)
                why_l.append("--batch" if batch else DEFAULT)
            elif len(dims) == 4 and ax >= 2:
                shape_l.append(DEFAULT_SPATIAL)
                why_l.append(DEFAULT)
            else:
                shape_l.append(DEFAULT_OTHER)
                why_l.append(DEFAULT)
        out[vi.name] = Planned(tuple(shape_l), tuple(why_l))
    return out


def make_inputs(model: onnx.ModelProto, overrides: dict[str, tuple[int, ...]] | None = None,
                batch: int | None = None, seed: int = 0,
                arrays: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Generated inputs from the graph's input types.

    Dynamic dims: see the module doc (axis 0 -> ``batch``, default 1; the last two axes of a rank-4
    input -> 224; anything else -> 16, unless a given input or the probe says otherwise).
    ``overrides`` gives whole shapes, ``arrays`` whole values.
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
    for name, arr in arrays.items():
        if not isinstance(arr, np.ndarray):
            raise UserError(f"input '{name}': expected an array, got {type(arr).__name__}")
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
    planned = plan_shapes(model, overrides, batch, arrays)
    for vi in specs:
        if vi.name in arrays:
            feeds[vi.name] = arrays[vi.name]
            continue
        elem = vi.type.tensor_type.elem_type
        if not vi.type.HasField("tensor_type"):
            raise UserError(f"input '{vi.name}' is not a tensor; give it with --input")
        dtype = onnx.helper.tensor_dtype_to_np_dtype(elem)
        shape = planned[vi.name].shape
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


def probe_sizes(model: onnx.ModelProto, overrides: dict[str, tuple[int, ...]] | None = None,
                arrays: dict[str, np.ndarray] | None = None) -> list[dict]:
    """For the report: every graph input with a dynamic dim, the shape the probes ran it at and, per
    dynamic dim, where the size came from (``why``) and, where the probe grew it, what did not run."""
    memo = found_sizes(model)
    out = []
    for vi in input_feeds_spec(model):
        dims = _dims(vi) or []
        p = plan_shapes(model, overrides, None, arrays).get(vi.name)
        if p is None or all(isinstance(d, int) and d > 0 for d in dims):
            continue
        rows = []
        for ax, (d, size, why) in enumerate(zip(dims, p.shape, p.why, strict=False)):
            if isinstance(d, int) and d > 0:
                continue
            row = {"axis": ax, "name": d if isinstance(d, str) else None, "size": int(size), "from": why}
            if memo is not None and (vi.name, ax) in memo.tried and why in ("grown", "--calib"):
                row["did_not_run_at"] = list(memo.tried[(vi.name, ax)])
            rows.append(row)
        out.append({"input": vi.name, "shape": [int(s) for s in p.shape], "dims": rows})
    if memo is not None and not memo.ok:
        out.append({"error": memo.message})
    return out


def describe_probe_sizes(rows: list[dict]) -> str | None:
    """One console line for :func:`probe_sizes` where a size is not the plain default (None otherwise)."""
    parts = []
    for r in rows:
        if "input" not in r:
            continue
        special = [d for d in r["dims"] if d["from"] not in (DEFAULT, FIXED)]
        if not special:
            continue
        bits = []
        for d in special:
            name = f" '{d['name']}'" if d["name"] else ""
            why = d["from"]
            if d.get("did_not_run_at"):
                why += f"; did not run at {', '.join(map(str, d['did_not_run_at']))}"
            bits.append(f"dim {d['axis']}{name} = {d['size']} ({why})")
        parts.append(f"'{r['input']}' {'x'.join(map(str, r['shape']))}: " + ", ".join(bits))
    return "probe sizes: " + "; ".join(parts) if parts else None
