"""Probes: run a model once in onnxruntime (CPU) to read tensors that static analysis cannot tell.

``scale=1`` runs at the analysis sizes: the ``--input`` arrays where given, else generated inputs of the
``--input-shape`` (or default) sizes. Where the model does not run with dims at their *default* sizes
(a speech model's 400-sample convolution at 16), those dims grow (:func:`grow`: the calibration
samples' size first, then doubling, at most ``MAX_DIM`` per dim and ``MAX_ELEMENTS`` in all) and
the smallest that runs is remembered (``inputs.found_sizes``) for every later generated input; a
failure at sizes the user gave, or after the growth, is the user's to fix (one-line error).
``scale=2`` runs with every *declared* dynamic size changed (the batch doubled, other dynamic sizes moved
by an odd step, then by a larger one if the model rejects that), whether or not the user fixed the size
for analysis; a failure there returns nothing and never aborts (what it could not show stays dynamic).
A probe shows values; it never proves one static (``analysis.static`` does that).
"""

from __future__ import annotations

import re
import time

import numpy as np
import onnx

from onnxprune.errors import UserError
from onnxprune.ir.graph import input_feeds_spec
from onnxprune.ir.graph import value_dims as _dims
from onnxprune.runtime.inputs import (
    DEFAULT,
    Found,
    data_sizes,
    found_sizes,
    make_inputs,
    plan_shapes,
    remember_sizes,
)
from onnxprune.runtime.session import make_session

MAX_DIM = 2**16  # a grown dim stops here
MAX_ELEMENTS = 2**24  # and the generated inputs, all together, stop here (64 MiB of float32)
MAX_GROW_S = 30.0  # the growth stops before a run that would take it past this (doubling; 4x assumed)

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
    outs = None
    for k, f in enumerate(attempts):
        try:
            outs = sess.run(None, f)
            break
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types
            if scale != 1:
                if k + 1 < len(attempts):
                    continue
                return {}
            memo = found_sizes(model) if growable(model, overrides, arrays) else None
            if memo is not None and not memo.ok:  # grown before (another probe of this analysis): no run
                raise UserError(memo.message) from None
            outs = grow(model, sess, overrides, arrays, exc) if memo is None else None
            if outs is None:  # nothing the probe may grow, or the sizes it found fail here
                given = ("the given --input arrays" if arrays else "the --input-shape sizes" if overrides
                         else "generated inputs")
                hint = "" if arrays or overrides else "; give shapes with --input-shape or arrays with --input"
                raise UserError(f"onnxruntime could not run the model on {given} "
                                f"({_reason(exc)}){hint}") from None
    result = {}
    for meta, arr in zip(sess.get_outputs(), outs, strict=True):
        result[meta.name] = np.asarray(arr)
    return result


def _reason(exc: BaseException) -> str:
    """onnxruntime's reason, one line: the node and its message, without ORT's source paths."""
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    m = re.search(r"running (\S+) node\. Name:'([^']*)' Status Message: (.*)", text)
    if m:
        msg = re.sub(r"^/\S+:\d+ (?:[\w:~]+\([^)]*\)(?: const)? )?", "", m.group(3))
        text = f"{m.group(1)} node" + (f" '{m.group(2)}'" if m.group(2) else "") + f": {msg}"
    return text[:300]


def growable(model: onnx.ModelProto, overrides=None, arrays=None) -> list[tuple[str, int]]:
    """(input, axis) of the dims the probe may grow: dynamic dims at their default size, batch
    (axis 0) only where there is no other."""
    planned = plan_shapes(model, overrides, None, arrays, found=False)
    dims = [(n, ax) for n, p in planned.items() for ax, w in enumerate(p.why) if w == DEFAULT]
    return [d for d in dims if d[1] > 0] or dims


def _dim_names(model: onnx.ModelProto, dims: list[tuple[str, int]]) -> str:
    declared = {vi.name: _dims(vi) or [] for vi in input_feeds_spec(model)}
    by_input: dict[str, list[str]] = {}
    for n, ax in dims:
        d = declared[n][ax] if ax < len(declared[n]) else None
        by_input.setdefault(n, []).append(f"{ax} ('{d}')" if isinstance(d, str) and d else str(ax))
    parts = [f"'{n}' dim{'s' if len(a) > 1 else ''} {', '.join(a)}" for n, a in by_input.items()]
    return ("input " if len(parts) == 1 else "inputs ") + ", ".join(parts)


def _steps(model: onnx.ModelProto, base: dict[tuple[str, int], int], planned) -> tuple[list, str]:
    """Sizes to try, in order, for the dims in ``base`` (their defaults): the calibration samples'
    sizes where they apply, then the defaults doubled while every dim <= MAX_DIM and the inputs
    <= MAX_ELEMENTS; and why the sequence stops where it does."""
    n_inputs = len(planned)

    def elements(sizes: dict) -> int:
        total = 0
        for name, p in planned.items():
            shape = [sizes.get((name, ax), d) for ax, d in enumerate(p.shape)]
            total += int(np.prod(shape, dtype=np.int64)) if shape else 1
        return total

    steps: list[tuple[str, dict]] = []
    hint = {}
    for name, ax in base:
        s = data_sizes(name, n_inputs)
        if s is not None and 0 < ax <= len(s):
            hint[(name, ax)] = int(s[ax - 1])
    if hint and len(hint) == len(base) and hint != base and elements(hint) <= MAX_ELEMENTS:
        steps.append(("--calib", hint))
    f, stop = 2, f"at most {MAX_DIM} per dim"
    while True:
        sizes = {k: v * f for k, v in base.items()}
        if max(sizes.values()) > MAX_DIM:
            break
        if elements(sizes) > MAX_ELEMENTS:
            stop = f"larger inputs would exceed {MAX_ELEMENTS} elements"
            break
        steps.append(("grown", sizes))
        f *= 2
    return steps, stop


def _fmt(sizes: dict, dims: list) -> str:
    vals = [sizes[d] for d in dims]
    return str(vals[0]) if len(set(vals)) == 1 else "x".join(map(str, vals))


def grow(model: onnx.ModelProto, sess, overrides, arrays, exc: BaseException):
    """The model did not run at the default sizes (``exc``): grow the dims that are at their default
    (:func:`growable`) until it runs; remember the first sizes that run (``inputs.remember_sizes``) and
    return the outputs there. When none runs: remembered too, and a one-line UserError naming the
    dims, the sizes tried and onnxruntime's reason. None when no dim is the probe's to grow."""
    dims = growable(model, overrides, arrays)
    if not dims:
        return None
    planned = plan_shapes(model, overrides, None, arrays, found=False)
    base = {(n, ax): planned[n].shape[ax] for n, ax in dims}
    steps, stop = _steps(model, base, planned)
    tried = [base]
    reason = _reason(exc)
    t_start, last = time.perf_counter(), 0.0
    for source, sizes in steps:
        if time.perf_counter() - t_start + 4 * last > MAX_GROW_S:
            stop = f"the runs would take over {MAX_GROW_S:.0f} s"
            break
        shapes = dict(overrides or {})
        for name in {n for n, _ in dims}:
            shapes[name] = tuple(sizes.get((name, ax), d) for ax, d in enumerate(planned[name].shape))
        t0 = time.perf_counter()
        try:
            feeds = make_inputs(model, shapes, arrays=arrays)
            outs = sess.run(None, feeds)
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own types
            last = time.perf_counter() - t0
            tried.append(sizes)
            reason = _reason(e)
            continue
        per_dim = {d: tuple(t[d] for t in tried) for d in dims}
        remember_sizes(model, Found(dict(sizes), per_dim, source,
                                    f"{_dim_names(model, dims)}: the model did not run at "
                                    f"{', '.join(_fmt(t, dims) for t in tried)}; it ran at {_fmt(sizes, dims)}"))
        return outs
    message = (f"{_dim_names(model, dims)}: the model did not run at {', '.join(_fmt(t, dims) for t in tried)} "
               f"({stop}): {reason}; give the size with --input-shape or an array with --input")
    remember_sizes(model, Found({}, {d: tuple(t[d] for t in tried) for d in dims}, "grown", message))
    raise UserError(message)
