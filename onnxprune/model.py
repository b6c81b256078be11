"""I/O layer: loading ONNX files, constant tables, shapes and generated inputs.

Raw protobuf stays in here and in the rewrite pass; analysis works on the views this module builds.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from onnxprune.errors import UserError

log = logging.getLogger(__name__)

MIN_OPSET, MAX_OPSET = 11, 23
DEFAULT_SPATIAL = 224
DEFAULT_OTHER = 16


def load(path: str | os.PathLike) -> onnx.ModelProto:
    """Load and sanity-check an ONNX file; every failure is a one-line UserError."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"no such file: {p}")
    if p.is_dir():
        raise UserError(f"{p} is a directory, not an ONNX file")
    try:
        model = onnx.load(str(p), load_external_data=True)
    except Exception as exc:  # protobuf raises several unrelated types
        raise UserError(f"{p} is not a readable ONNX file ({type(exc).__name__})") from None
    if not model.graph.node:
        raise UserError(f"{p} is not an ONNX model (no graph nodes)")
    check_opset(model, str(p))
    return model


def check_opset(model: onnx.ModelProto, where: str = "model") -> int:
    opset = default_opset(model)
    if opset is None:
        raise UserError(f"{where}: no default-domain opset import")
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise UserError(f"{where}: opset {opset} is outside the supported range {MIN_OPSET}..{MAX_OPSET}")
    return opset


def default_opset(model: onnx.ModelProto) -> int | None:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    return None


def save_atomic(model: onnx.ModelProto, path: str | os.PathLike) -> None:
    """Write to a temporary file beside ``path``, then rename: no partial output on failure."""
    p = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent or ".")
    os.close(fd)
    try:
        large = model.ByteSize() > 1_800_000_000
        if large:
            data_name = p.name + ".data"
            onnx.save_model(model, tmp, save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data_name, size_threshold=1024)
        else:
            onnx.save_model(model, tmp)
        os.replace(tmp, p)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def inline_functions(model: onnx.ModelProto) -> onnx.ModelProto:
    if len(model.functions):
        from onnx import inliner

        model = inliner.inline_local_functions(model)
    return model


# ----------------------------------------------------------------------------------------------
# constants


@dataclass
class ConstantTable:
    """Every constant tensor of the main graph: initializers and Constant-node outputs."""

    values: dict[str, np.ndarray] = field(default_factory=dict)
    constant_nodes: dict[str, onnx.NodeProto] = field(default_factory=dict)  # output name -> node

    @classmethod
    def of(cls, graph: onnx.GraphProto) -> ConstantTable:
        table = cls()
        for init in graph.initializer:
            table.values[init.name] = numpy_helper.to_array(init)
        for node in graph.node:
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and len(node.output) == 1:
                value = constant_node_value(node)
                if value is not None:
                    table.values[node.output[0]] = value
                    table.constant_nodes[node.output[0]] = node
        return table

    def get(self, name: str) -> np.ndarray | None:
        return self.values.get(name)

    def __contains__(self, name: str) -> bool:
        return name in self.values


def constant_node_value(node: onnx.NodeProto) -> np.ndarray | None:
    for attr in node.attribute:
        if attr.name == "value":
            return numpy_helper.to_array(attr.t)
        if attr.name == "value_float":
            return np.array(attr.f, dtype=np.float32)
        if attr.name == "value_floats":
            return np.array(list(attr.floats), dtype=np.float32)
        if attr.name == "value_int":
            return np.array(attr.i, dtype=np.int64)
        if attr.name == "value_ints":
            return np.array(list(attr.ints), dtype=np.int64)
    return None


# ----------------------------------------------------------------------------------------------
# shapes

Dim = int | None  # None: unknown / dynamic


@dataclass
class Shapes:
    """Concrete shapes for analysis plus which axes are dynamic (never pruned, never hard-coded)."""

    concrete: dict[str, tuple[int, ...]]
    dynamic: dict[str, tuple[bool, ...]]
    # sizes with the batch doubled and other dynamic sizes changed (where known)
    concrete2: dict[str, tuple[int, ...]] = field(default_factory=dict)

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


def _dims(vi: onnx.ValueInfoProto) -> list[int | str | None] | None:
    t = vi.type
    if not t.HasField("tensor_type") or not t.tensor_type.HasField("shape"):
        return None
    out: list[int | str | None] = []
    for d in t.tensor_type.shape.dim:
        if d.HasField("dim_value"):
            out.append(int(d.dim_value))
        elif d.HasField("dim_param"):
            out.append(d.dim_param)
        else:
            out.append(None)
    return out


def input_feeds_spec(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    inits = {i.name for i in model.graph.initializer}
    return [vi for vi in model.graph.input if vi.name not in inits]


def make_inputs(model: onnx.ModelProto, overrides: dict[str, tuple[int, ...]] | None = None,
                batch: int | None = None, seed: int = 0,
                arrays: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Generated inputs from the graph's input types.

    Dynamic dims: axis 0 -> ``batch`` (default 1); the last two axes of a rank-4 input -> 224;
    anything else -> 16. ``overrides`` gives whole shapes, ``arrays`` whole values.
    """
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    overrides = overrides or {}
    arrays = arrays or {}
    for vi in input_feeds_spec(model):
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
        if np.issubdtype(dtype, np.floating):
            feeds[vi.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype == np.bool_:
            feeds[vi.name] = np.ones(shape, dtype=np.bool_)
        else:
            feeds[vi.name] = np.ones(shape, dtype=dtype)
    return feeds


def infer_shapes(model: onnx.ModelProto, feeds_overrides: dict[str, tuple[int, ...]] | None = None,
                 needed: set[str] | None = None) -> Shapes:
    """Shapes of every tensor: onnx shape inference, then one onnxruntime run for what stays unknown.

    Dynamic axes are those with a symbolic or unknown dim in shape inference; for tensors that shape
    inference cannot resolve, onnxruntime runs twice with different dynamic sizes and axes that change
    are dynamic.
    """
    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception as exc:  # noqa: BLE001 - shape inference raises many types
        log.debug("shape inference failed: %s", exc)
        inferred = model
    g = inferred.graph
    concrete: dict[str, tuple[int, ...]] = {}
    dynamic: dict[str, tuple[bool, ...]] = {}
    feeds = make_inputs(model, feeds_overrides)
    env: dict[str, int] = {}
    env2: dict[str, int] = {}
    for vi in input_feeds_spec(model):
        dims = _dims(vi) or []
        for ax, (d, v) in enumerate(zip(dims, feeds[vi.name].shape, strict=False)):
            if isinstance(d, str):
                env[d] = int(v)
                env2[d] = 2 * int(v) if ax == 0 else int(v) + (32 if len(dims) == 4 else 1)
    concrete2: dict[str, tuple[int, ...]] = {}
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
            continue  # unknown or not evaluable: resolved by a run below
        dynamic[vi.name] = tuple(not isinstance(d, int) for d in dims)
        concrete[vi.name] = tuple(int(v) for v in values)
        values2 = [d if isinstance(d, int) else _eval_dim(d, env2) for d in dims]
        if all(v is not None for v in values2):
            concrete2[vi.name] = tuple(int(v) for v in values2)
    consts = ConstantTable.of(model.graph)
    for name, value in consts.values.items():
        concrete[name] = tuple(value.shape)
        dynamic[name] = (False,) * value.ndim
    all_names = {o for n in model.graph.node for o in n.output if o} | {i for n in model.graph.node for i in n.input if i}
    missing = [n for n in all_names if n not in concrete]
    if needed is not None:
        missing = [n for n in missing if n in needed]
    if missing:
        run1 = _run_for_shapes(model, missing, feeds_overrides, scale=1)
        run2 = _run_for_shapes(model, missing, feeds_overrides, scale=2)
        for name, shape in run1.items():
            concrete[name] = shape
            other = run2.get(name)
            if other is not None:
                concrete2[name] = other
            known = dynamic.get(name)
            flags = []
            for ax, d in enumerate(shape):
                flag = other is None or len(other) != len(shape) or other[ax] != d
                if known is not None and ax < len(known):
                    flag = flag or known[ax]
                flags.append(flag)
            dynamic[name] = tuple(flags)
    return Shapes(concrete, dynamic, concrete2)


def _eval_dim(expr: str | None, env: dict[str, int]) -> int | None:
    """Value of a symbolic dim such as 'batch' or '4*batch' (torch.export names), else None."""
    if expr is None:
        return None
    if expr in env:
        return env[expr]
    import ast

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


def _run_for_shapes(model: onnx.ModelProto, names: list[str], overrides, scale: int) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in _run_probe(model, names, overrides, scale).items()}


def probe_static_values(model: onnx.ModelProto, names: list[str], overrides=None) -> dict[str, np.ndarray]:
    """Values of computed (small, integer) tensors that do not depend on dynamic input sizes."""
    if not names:
        return {}
    a = _run_probe(model, names, overrides, scale=1)
    b = _run_probe(model, names, overrides, scale=2)
    return {k: v for k, v in a.items() if k in b and b[k].shape == v.shape and np.array_equal(b[k], v)}


def _run_probe(model: onnx.ModelProto, names: list[str], overrides, scale: int) -> dict[str, np.ndarray]:
    from onnxprune.runtime import make_session

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


def tensor_elem_types(model: onnx.ModelProto) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(model)
    out: dict[str, int] = {}
    for vi in list(inferred.graph.input) + list(inferred.graph.value_info) + list(inferred.graph.output):
        if vi.type.HasField("tensor_type"):
            out[vi.name] = vi.type.tensor_type.elem_type
    for init in model.graph.initializer:
        out[init.name] = init.data_type
    return out


# ----------------------------------------------------------------------------------------------
# subgraphs


def subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    out = []
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            out.append(a.g)
        elif a.type == onnx.AttributeProto.GRAPHS:
            out.extend(a.graphs)
    return out


def outer_refs(node: onnx.NodeProto) -> set[str]:
    """Names a node's subgraphs read from the enclosing scopes."""
    refs: set[str] = set()
    for g in subgraphs(node):
        defined = {i.name for i in g.input} | {i.name for i in g.initializer}
        for n in g.node:
            for t in n.input:
                if t and t not in defined:
                    refs.add(t)
            for r in outer_refs(n):
                if r not in defined:
                    refs.add(r)
            defined.update(o for o in n.output if o)
    return refs


def used_names(graph: onnx.GraphProto) -> set[str]:
    """Every tensor name read by a node of ``graph`` (subgraph outer references included) or output."""
    used = {o.name for o in graph.output}
    for n in graph.node:
        used.update(t for t in n.input if t)
        used.update(outer_refs(n))
    return used
