"""Shapes for analysis: concrete sizes of every tensor at the generated (or given) input sizes, and
which axes are dynamic (batch, sequence: never pruned, never hard-coded)."""

from __future__ import annotations

import ast
import logging
from dataclasses import dataclass, field

import numpy as np
import onnx

from onnxprune.ir.graph import input_feeds_spec, weightless
from onnxprune.ir.graph import value_dims as _dims
from onnxprune.ir.tensors import ConstantTable
from onnxprune.runtime.inputs import make_inputs, plan_shapes
from onnxprune.runtime.probe import run_for_shapes, scaled_feeds

log = logging.getLogger(__name__)


Dim = int | None  # None: unknown / dynamic


@dataclass
class Shapes:
    """Concrete shapes for analysis plus which axes are dynamic (never pruned, never hard-coded)."""

    concrete: dict[str, tuple[int, ...]]
    dynamic: dict[str, tuple[bool, ...]]
    # sizes with the batch doubled and other dynamic sizes changed (where known)
    concrete2: dict[str, tuple[int, ...]] = field(default_factory=dict)
    elem_types: dict[str, int] = field(default_factory=dict)
    notes: tuple[str, ...] = ()  # what the probes could not show (kept in the report)

    def batch_scaled(self, name: str, axis: int) -> bool:
        """A dynamic axis that is (batch x a static count), e.g. heads merged into the batch."""
        c, c2 = self.concrete.get(name), self.concrete2.get(name)
        if c is None or c2 is None or axis >= len(c) or axis >= len(c2):
            return False
        return self.is_dynamic(name, axis) and c[axis] > 1 and c2[axis] == 2 * c[axis]

    def get(self, name: str) -> tuple[int, ...] | None:
        return self.concrete.get(name)

    def is_dynamic(self, name: str, axis: int) -> bool:
        flags = self.dynamic.get(name)
        return bool(flags and axis < len(flags) and flags[axis])


def _eval_dim(expr: str | None, env: dict[str, int]) -> int | None:
    """Value of a symbolic dim such as 'batch' or '4*batch' (torch.export names), else None."""
    if expr is None:
        return None
    if expr in env:
        return env[expr]
    try:
        tree = ast.parse(expr, mode="eval")
    except SyntaxError:
        return None

    def ev(n):
        if isinstance(n, ast.Expression):
            return ev(n.body)
        if isinstance(n, ast.Constant) and isinstance(n.value, int):
            return n.value
        if isinstance(n, ast.Name) and n.id in env:
            return env[n.id]
        if isinstance(n, ast.BinOp):
            a, b = ev(n.left), ev(n.right)
            ops = {ast.Add: lambda: a + b, ast.Sub: lambda: a - b, ast.Mult: lambda: a * b,
                   ast.FloorDiv: lambda: a // b if b else None, ast.Mod: lambda: a % b if b else None}
            f = ops.get(type(n.op))
            if f is None or a is None or b is None:
                return None
            return f()
        return None

    try:
        v = ev(tree)
    except Exception:  # noqa: BLE001
        return None
    return v if isinstance(v, int) and v >= 0 else None


def infer_shapes(model: onnx.ModelProto, feeds_overrides: dict[str, tuple[int, ...]] | None = None,
                 needed: set[str] | None = None, arrays: dict[str, np.ndarray] | None = None) -> Shapes:
    """Shapes of every tensor: onnx shape inference, then one onnxruntime run for what stays unknown.

    Dynamic axes are those with a symbolic or unknown dim in shape inference; for tensors that shape
    inference cannot resolve, onnxruntime runs twice with different dynamic sizes and axes that change
    are dynamic. Dynamic means declared dynamic: a size fixed with ``--input-shape`` or by an
    ``--input`` array is the analysis size, and still changed in the second run. When the model
    rejects every second size, what shape inference could not tell is dynamic on every axis.
    """
    try:
        inferred = onnx.shape_inference.infer_shapes(weightless(model), data_prop=True)
    except Exception as exc:  # noqa: BLE001 - shape inference raises many types
        log.debug("shape inference failed: %s", exc)
        inferred = model
    g = inferred.graph
    concrete: dict[str, tuple[int, ...]] = {}
    dynamic: dict[str, tuple[bool, ...]] = {}
    feeds = make_inputs(model, feeds_overrides, arrays=arrays)
    feeds2 = scaled_feeds(model, feeds, 0)
    env: dict[str, int] = {}
    env2: dict[str, int] = {}
    for vi in input_feeds_spec(model):
        dims = _dims(vi) or []
        for d, v, v2 in zip(dims, feeds[vi.name].shape, feeds2[vi.name].shape, strict=False):
            if isinstance(d, str):
                env[d] = int(v)
                env2[d] = int(v2)
    concrete2: dict[str, tuple[int, ...]] = {}
    proven: dict[str, tuple[bool, ...]] = {}  # axes shape inference gave an integer size
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        dims = _dims(vi)
        if dims is None:
            continue
        if vi.name in feeds:
            concrete[vi.name] = tuple(feeds[vi.name].shape)
            dynamic[vi.name] = tuple(not isinstance(d, int) for d in dims)
            continue
        values = [d if isinstance(d, int) else _eval_dim(d, env) for d in dims]
        if any(v is None for v in values):
            # unknown or not evaluable: resolved by a run below; the integer sizes are proven static
            proven[vi.name] = tuple(isinstance(d, int) and d >= 0 for d in dims)
            continue
        dynamic[vi.name] = tuple(not isinstance(d, int) for d in dims)
        concrete[vi.name] = tuple(int(v) for v in values)
        values2 = [d if isinstance(d, int) else _eval_dim(d, env2) for d in dims]
        if all(v is not None for v in values2):
            concrete2[vi.name] = tuple(int(v) for v in values2)
    consts = ConstantTable.of(model.graph)
    for name in consts.names():
        shp = consts.shape(name)
        concrete[name] = shp
        dynamic[name] = (False,) * len(shp)
    all_names = {o for n in model.graph.node for o in n.output if o} | {i for n in model.graph.node for i in n.input if i}
    missing = [n for n in all_names if n not in concrete]
    notes: list[str] = []
    if needed is not None:  # only these tensors need a run (stats.py asks for the MAC-relevant ones)
        missing = [n for n in missing if n in needed]
    if missing:
        run1 = run_for_shapes(model, missing, feeds_overrides, scale=1, arrays=arrays)
        if {k: v.shape for k, v in feeds.items()} != {k: p.shape for k, p in plan_shapes(
                model, feeds_overrides, arrays=arrays).items()}:  # the probe grew sizes the model rejected
            return infer_shapes(model, feeds_overrides, needed, arrays)
        run2 = run_for_shapes(model, missing, feeds_overrides, scale=2, arrays=arrays)
        if not run2 and run1:
            notes.append(f"the model does not run at a second input size: the {len(run1)} tensors whose shapes "
                         "shape inference could not tell are treated as dynamic on every axis it did not prove static")
        for name, shape in run1.items():
            concrete[name] = shape
            other = run2.get(name)
            if other is not None:
                concrete2[name] = other
            known = dynamic.get(name)
            static = proven.get(name) if len(proven.get(name, ())) == len(shape) else None
            flags = []
            for ax, d in enumerate(shape):
                flag = other is None or len(other) != len(shape) or other[ax] != d
                if static is not None and static[ax]:
                    flag = False
                if known is not None and ax < len(known):
                    flag = flag or known[ax]
                flags.append(flag)
            dynamic[name] = tuple(flags)
    elem_types: dict[str, int] = {}
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
            elem_types[vi.name] = vi.type.tensor_type.elem_type
    for name in consts.names():
        elem_types[name] = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(consts.dtype(name)))
    return Shapes(concrete, dynamic, concrete2, elem_types, tuple(notes))

