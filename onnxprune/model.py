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
        model = onnx.load(str(p), load_external_data=False)
    except Exception as exc:  # protobuf raises several unrelated types
        raise UserError(f"{p} is not a readable ONNX file ({type(exc).__name__})") from None
    _absolutize_external(model, p.parent)
    if not model.graph.node:
        raise UserError(f"{p} is not an ONNX model (no graph nodes)")
    check_opset(model, str(p))
    return model


def _external_tensors(model: onnx.ModelProto):
    for t in model.graph.initializer:
        if is_external(t):
            yield t
    for n in model.graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value" and is_external(a.t):
                    yield a.t


def _absolutize_external(model: onnx.ModelProto, base: Path) -> None:
    """Weights stay in their files: each external tensor points at its file by absolute path and is
    read only when needed (memory stays near the size of what is pruned, not of the model)."""
    for t in _external_tensors(model):
        for e in t.external_data:
            if e.key == "location":
                loc = Path(e.value)
                full = loc if loc.is_absolute() else (base / loc)
                if not full.exists():
                    raise UserError(f"external data file {full} of tensor '{t.name}' is missing")
                e.value = str(full.resolve())


def has_external(model: onnx.ModelProto) -> bool:
    return next(_external_tensors(model), None) is not None


def model_bytes(model: onnx.ModelProto) -> int:
    """Size of the model including its external data."""
    return model.ByteSize() + sum(tensor_nbytes(t) for t in _external_tensors(model))


def approx_bytes(model: onnx.ModelProto) -> int:
    """Weight bytes from tensor dims (ByteSize walks every byte and costs as much as serializing)."""
    return sum(tensor_nbytes(t) for t in _all_tensors(model)) + 1_000_000


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


LARGE_BYTES = 1_800_000_000


def save_atomic(model: onnx.ModelProto, path: str | os.PathLike, external: bool | None = None,
                data: bytes | None = None) -> None:
    """Write to temporary files beside ``path``, then rename: no partial output on failure.

    Models with external data (or over ~1.8 GB) keep their weights in ``<name>.data`` beside the
    file, written tensor by tensor."""
    p = Path(path)
    if external is None:
        external = has_external(model) or approx_bytes(model) > LARGE_BYTES
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent or ".")
    os.close(fd)
    tmp_data = None
    try:
        if external:
            data_name = p.name + ".data"
            fd, tmp_data = tempfile.mkstemp(prefix=f".{data_name}.", suffix=".tmp", dir=p.parent or ".")
            os.close(fd)
            out = _externalized_copy(model, tmp_data, data_name)
            with open(tmp, "wb") as f:
                f.write(out.SerializeToString())
            os.replace(tmp_data, p.parent / data_name)
            _default_mode(p.parent / data_name)
        else:
            with open(tmp, "wb") as f:  # ``data``: the serialization already made (and checked)
                f.write(data if data is not None else model.SerializeToString())
        _default_mode(Path(tmp))
        os.replace(tmp, p)
    except BaseException:
        for f in (tmp, tmp_data):
            if f and os.path.exists(f):
                os.unlink(f)
        raise


def _default_mode(path: Path) -> None:
    """mkstemp creates 0600 files: give outputs the usual permissions (0666 minus the umask)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def _externalized_copy(model: onnx.ModelProto, data_path: str, location: str,
                       threshold: int = 1024) -> onnx.ModelProto:
    """A copy of ``model`` whose large tensors live in ``data_path`` (streamed, one tensor at a time)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    offset = 0
    with open(data_path, "wb") as f:
        for t in _all_tensors(out):
            if not is_external(t) and tensor_nbytes(t) < threshold:
                continue
            data = tensor_value(t) if is_external(t) else numpy_helper.to_array(t)
            raw = np.ascontiguousarray(data).tobytes()
            pad = (-offset) % 64
            f.write(b"\0" * pad)
            offset += pad
            f.write(raw)
            t.ClearField("raw_data")
            for fld in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data"):
                t.ClearField(fld)
            del t.external_data[:]
            t.data_location = onnx.TensorProto.EXTERNAL
            for k, v in (("location", location), ("offset", str(offset)), ("length", str(len(raw)))):
                e = t.external_data.add()
                e.key, e.value = k, v
            offset += len(raw)
            del data, raw
    return out


def _all_tensors(model: onnx.ModelProto):
    yield from model.graph.initializer
    for n in model.graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    yield a.t


def inline_functions(model: onnx.ModelProto) -> onnx.ModelProto:
    if len(model.functions):
        from onnx import inliner

        model = inliner.inline_local_functions(model)
    return model


# ----------------------------------------------------------------------------------------------
# constants


class _LazyValues:
    """name -> numpy array, converted on first use; external data is read per tensor, not cached."""

    def __init__(self, table: ConstantTable):
        self._t = table

    def __contains__(self, name) -> bool:
        return name in self._t._protos or name in self._t._cache

    def __iter__(self):
        return iter(list(self._t._protos) + [k for k in self._t._cache if k not in self._t._protos])

    def keys(self):
        return list(iter(self))

    def get(self, name, default=None):
        v = self._t.get(name)
        return default if v is None else v

    def __getitem__(self, name):
        v = self._t.get(name)
        if v is None:
            raise KeyError(name)
        return v

    def __setitem__(self, name, value) -> None:
        self._t._cache[name] = np.asarray(value)

    def items(self):
        return ((k, self._t.get(k)) for k in self.keys())

    def values(self):
        return (self._t.get(k) for k in self.keys())


class ConstantTable:
    """Every constant tensor of the main graph: initializers and Constant-node outputs.

    Values are converted lazily; tensors stored as external data are read from their file on each
    use (never all at once), so large models are analysed without holding their weights.
    """

    CACHE_BYTES = 1 << 20

    def __init__(self):
        self._protos: dict[str, onnx.TensorProto] = {}
        self._cache: dict[str, np.ndarray] = {}
        self.constant_nodes: dict[str, onnx.NodeProto] = {}
        self.values = _LazyValues(self)

    @classmethod
    def of(cls, graph: onnx.GraphProto) -> ConstantTable:
        table = cls()
        for init in graph.initializer:
            table._protos[init.name] = init
        for node in graph.node:
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and len(node.output) == 1:
                t = next((a.t for a in node.attribute if a.name == "value"), None)
                if t is not None:
                    table._protos[node.output[0]] = t
                else:
                    value = constant_node_value(node)
                    if value is not None:
                        table._cache[node.output[0]] = value
                table.constant_nodes[node.output[0]] = node
        return table

    def get(self, name: str) -> np.ndarray | None:
        v = self._cache.get(name)
        if v is not None:
            return v
        proto = self._protos.get(name)
        if proto is None:
            return None
        v = tensor_value(proto)
        if v.nbytes <= self.CACHE_BYTES:
            self._cache[name] = v
        return v

    def shape(self, name: str) -> tuple[int, ...] | None:
        if name in self._cache:
            return tuple(self._cache[name].shape)
        proto = self._protos.get(name)
        return None if proto is None else tuple(int(d) for d in proto.dims)

    def dtype(self, name: str):
        if name in self._cache:
            return self._cache[name].dtype
        proto = self._protos.get(name)
        return None if proto is None else onnx.helper.tensor_dtype_to_np_dtype(proto.data_type)

    def names(self) -> list[str]:
        return self.values.keys()

    def __contains__(self, name: str) -> bool:
        return name in self.values


def is_external(t: onnx.TensorProto) -> bool:
    return t.data_location == onnx.TensorProto.EXTERNAL


def external_info(t: onnx.TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in t.external_data}


_RAW_FAST = {onnx.TensorProto.FLOAT: np.dtype("<f4"), onnx.TensorProto.DOUBLE: np.dtype("<f8"),
             onnx.TensorProto.INT64: np.dtype("<i8"), onnx.TensorProto.INT32: np.dtype("<i4"),
             onnx.TensorProto.FLOAT16: np.dtype("<f2"), onnx.TensorProto.INT8: np.dtype("i1"),
             onnx.TensorProto.UINT8: np.dtype("u1")}


def tensor_value(t: onnx.TensorProto) -> np.ndarray:
    """numpy value of a tensor; external data (with an absolute location) is read from its file."""
    if not is_external(t):
        if t.data_type in _RAW_FAST and t.HasField("raw_data"):
            # one copy (the bytes object), read-only: callers never write into constants
            return np.frombuffer(t.raw_data, dtype=_RAW_FAST[t.data_type]).reshape(tuple(t.dims))
        return numpy_helper.to_array(t)
    info = external_info(t)
    dtype = onnx.helper.tensor_dtype_to_np_dtype(t.data_type)
    count = int(np.prod(t.dims, dtype=np.int64))
    offset = int(info.get("offset", 0))
    arr = np.fromfile(info["location"], dtype=dtype, count=count, offset=offset)
    return arr.reshape(tuple(t.dims))


def tensor_nbytes(t: onnx.TensorProto) -> int:
    if is_external(t):
        return int(external_info(t).get("length", 0))
    # from dims, not raw_data: reading raw_data copies the bytes
    return int(np.prod(t.dims, dtype=np.int64) * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize)


def constant_node_value(node: onnx.NodeProto) -> np.ndarray | None:
    for attr in node.attribute:
        if attr.name == "value":
            return tensor_value(attr.t)
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
    elem_types: dict[str, int] = field(default_factory=dict)

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
        inferred = onnx.shape_inference.infer_shapes(weightless(model), data_prop=True)
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
    for name in consts.names():
        shp = consts.shape(name)
        concrete[name] = shp
        dynamic[name] = (False,) * len(shp)
    all_names = {o for n in model.graph.node for o in n.output if o} | {i for n in model.graph.node for i in n.input if i}
    missing = [n for n in all_names if n not in concrete]
    if needed is not None:  # only these tensors need a run (stats.py asks for the MAC-relevant ones)
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
    elem_types: dict[str, int] = {}
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
            elem_types[vi.name] = vi.type.tensor_type.elem_type
    for name in consts.names():
        elem_types[name] = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(consts.dtype(name)))
    return Shapes(concrete, dynamic, concrete2, elem_types)


def weightless(model: onnx.ModelProto, keep_bytes: int = 4096) -> onnx.ModelProto:
    """A copy for shape inference: large initializers keep name, type and dims but no data (shape
    inference reads only their types; data propagation needs only the small ones)."""
    out = onnx.ModelProto()
    for f in ("ir_version", "producer_name", "producer_version", "domain", "model_version", "doc_string"):
        if model.HasField(f):
            setattr(out, f, getattr(model, f))
    out.opset_import.extend(model.opset_import)
    out.functions.extend(model.functions)
    g, g2 = model.graph, out.graph
    g2.name = g.name
    g2.node.extend(g.node)
    g2.input.extend(g.input)
    g2.output.extend(g.output)
    g2.value_info.extend(g.value_info)
    for t in g.initializer:
        if is_external(t) or tensor_nbytes(t) > keep_bytes:
            light = g2.initializer.add()
            light.name, light.data_type = t.name, t.data_type
            light.dims.extend(t.dims)
        else:
            g2.initializer.append(t)
    return out


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
