"""Tensors and constants: numpy values of TensorProtos (external data read per tensor, through the
one guarded reader) and the table of every constant of a graph (initializers and Constant-node
outputs; an initializer that is also a graph input is overridable at run time, hence no constant)."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from onnxprune.errors import UserError


def is_external(t: onnx.TensorProto) -> bool:
    return t.data_location == onnx.TensorProto.EXTERNAL


def external_info(t: onnx.TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in t.external_data}


_RAW_FAST = {onnx.TensorProto.FLOAT: np.dtype("<f4"), onnx.TensorProto.DOUBLE: np.dtype("<f8"),
             onnx.TensorProto.INT64: np.dtype("<i8"), onnx.TensorProto.INT32: np.dtype("<i4"),
             onnx.TensorProto.FLOAT16: np.dtype("<f2"), onnx.TensorProto.INT8: np.dtype("i1"),
             onnx.TensorProto.UINT8: np.dtype("u1")}


def tensor_value(t: onnx.TensorProto) -> np.ndarray:
    """numpy value of a tensor; external data (checked by :func:`check_external`) is read from its file."""
    if not is_external(t):
        if t.data_type in _RAW_FAST and t.HasField("raw_data"):
            # one copy (the bytes object), read-only: callers never write into constants
            return np.frombuffer(t.raw_data, dtype=_RAW_FAST[t.data_type]).reshape(tuple(t.dims))
        return numpy_helper.to_array(t)
    return read_external(t)


# ----------------------------------------------------------------------------------------------
# external data: the one guarded loader. ``check_external`` (at load) admits only regular files
# inside the model's folder and rewrites the location to the resolved absolute path with explicit
# offset and length; ``read_external`` re-checks the file it opens (never a FIFO or device) and reads
# exactly the bytes the tensor's dims and type ask for. Every failure is a one-line UserError.


def _expected_nbytes(t: onnx.TensorProto) -> int:
    try:
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type))
    except Exception:  # noqa: BLE001 - onnx raises KeyError or ValueError for unknown types
        raise UserError(f"tensor '{t.name}': external data of unknown type {t.data_type}") from None
    if dtype.kind in "OUS" or dtype.itemsize == 0:
        raise UserError(f"tensor '{t.name}': external data of type {dtype} cannot be read")
    if any(d < 0 for d in t.dims):
        raise UserError(f"tensor '{t.name}': negative dims {list(t.dims)}")
    n = 1
    for d in t.dims:
        n *= int(d)
    return n * dtype.itemsize


def _int_field(t: onnx.TensorProto, info: dict[str, str], key: str) -> int | None:
    if key not in info:
        return None
    try:
        v = int(info[key])
    except ValueError:
        raise UserError(f"tensor '{t.name}': external data {key} '{info[key]}' is not a whole number") from None
    if v < 0:
        raise UserError(f"tensor '{t.name}': external data {key} {v} is negative")
    return v


def _regular_size(st: os.stat_result, t: onnx.TensorProto, where) -> int:
    if not stat.S_ISREG(st.st_mode):
        raise UserError(f"external data {where} of tensor '{t.name}' is not a regular file")
    return st.st_size


def _check_span(t: onnx.TensorProto, offset: int, length: int | None, size: int, where) -> int:
    want = _expected_nbytes(t)
    if length is None:
        length = size - offset
    if length != want:
        raise UserError(f"tensor '{t.name}': external data length {length} != {want} bytes "
                        f"(dims {list(t.dims)})")
    if offset + length > size:
        raise UserError(f"tensor '{t.name}': external data (offset {offset}, length {length}) runs past "
                        f"the end of {where} ({size} bytes)")
    return length


def check_external(t: onnx.TensorProto, base: str | os.PathLike) -> Path:
    """Admit the external data of ``t`` (a file inside the model's folder ``base``) and rewrite its
    location to the resolved absolute path, with explicit offset and length. Returns that path."""
    info = external_info(t)
    loc = info.get("location")
    if not loc:
        raise UserError(f"tensor '{t.name}': external data without a location")
    if "\0" in loc or os.path.isabs(loc) or Path(loc).is_absolute() or loc.startswith(("/", "\\")):
        raise UserError(f"external data location '{loc}' of tensor '{t.name}' is absolute; "
                        "it must be a file in the model's folder")
    folder = Path(base).resolve()
    try:
        full = (folder / loc).resolve(strict=True)
    except FileNotFoundError:
        raise UserError(f"external data file {folder / loc} of tensor '{t.name}' is missing") from None
    except (OSError, RuntimeError) as exc:  # loops, too long, permission
        raise UserError(f"external data location '{loc}' of tensor '{t.name}' cannot be resolved "
                        f"({type(exc).__name__})") from None
    if folder not in full.parents:
        raise UserError(f"external data location '{loc}' of tensor '{t.name}' leaves the model's folder")
    try:
        st = os.stat(full)  # before any open: a FIFO or device is never opened
    except OSError as exc:
        raise UserError(f"external data file {full} of tensor '{t.name}' cannot be read ({exc.strerror})") from None
    size = _regular_size(st, t, full)
    offset = _int_field(t, info, "offset") or 0
    length = _check_span(t, offset, _int_field(t, info, "length"), size, full)
    info.update(location=str(full), offset=str(offset), length=str(length))
    del t.external_data[:]
    for k, v in info.items():
        e = t.external_data.add()
        e.key, e.value = k, v
    return full


def read_external(t: onnx.TensorProto) -> np.ndarray:
    """The value of an external tensor whose location :func:`check_external` admitted."""
    info = external_info(t)
    loc = info.get("location", "")
    if not os.path.isabs(loc) or "length" not in info:
        raise UserError(f"tensor '{t.name}': external data location '{loc}' was never checked "
                        "(load the model with onnxprune.ir.io.load)")
    offset = _int_field(t, info, "offset") or 0
    length = _int_field(t, info, "length")
    try:
        _regular_size(os.stat(loc), t, loc)  # the file may have changed since it was checked
        # O_NONBLOCK: even a FIFO swapped in after the stat cannot block the open; fstat refuses it
        fd = os.open(loc, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOFOLLOW", 0)
                     | getattr(os, "O_BINARY", 0))
    except OSError as exc:
        raise UserError(f"external data file {loc} of tensor '{t.name}' cannot be read ({exc.strerror})") from None
    try:
        with os.fdopen(fd, "rb", buffering=0) as f:
            size = _regular_size(os.fstat(f.fileno()), t, loc)
            length = _check_span(t, offset, length, size, loc)  # before any allocation
            buf = bytearray(length)
            view, done = memoryview(buf), 0
            f.seek(offset)
            while done < length:
                n = f.readinto(view[done:])
                if not n:
                    raise UserError(f"external data file {loc} of tensor '{t.name}' is shorter than it was")
                done += n
    except OSError as exc:
        raise UserError(f"external data file {loc} of tensor '{t.name}' cannot be read ({exc.strerror})") from None
    dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type))
    return np.frombuffer(buf, dtype=dtype).reshape(tuple(t.dims))


_T = onnx.TensorProto
_TYPED_FIELD = {_T.FLOAT: ("float_data", 1), _T.DOUBLE: ("double_data", 1), _T.INT64: ("int64_data", 1),
                _T.UINT32: ("uint64_data", 1), _T.UINT64: ("uint64_data", 1),
                _T.COMPLEX64: ("float_data", 2), _T.COMPLEX128: ("double_data", 2),
                **{k: ("int32_data", 1) for k in (_T.INT32, _T.INT16, _T.INT8, _T.UINT16, _T.UINT8, _T.BOOL,
                                                   _T.FLOAT16, _T.BFLOAT16)},
                _T.STRING: ("string_data", 1)}


def check_tensor_data(t: onnx.TensorProto) -> None:
    """An in-memory tensor's data must be what its dims ask for: raw_data of prod(dims) x itemsize
    bytes, or prod(dims) values in its typed field (sub-byte types are left to the checker).
    A mismatch or an unknown data type is a one-line UserError naming the tensor."""
    if is_external(t):
        return
    if any(d < 0 for d in t.dims):
        raise UserError(f"tensor '{t.name}': negative dims {list(t.dims)}")
    try:
        onnx.helper.tensor_dtype_to_np_dtype(t.data_type)
    except (KeyError, ValueError, TypeError):
        raise UserError(f"tensor '{t.name}': unknown data type {t.data_type}") from None
    n = 1
    for d in t.dims:
        n *= int(d)
    if t.HasField("raw_data"):
        if t.data_type == _T.STRING:
            raise UserError(f"tensor '{t.name}': string tensor with raw_data")
        try:
            itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
        except Exception:  # noqa: BLE001 - unknown type: the checker says so
            return
        if t.data_type in (getattr(_T, "INT4", -1), getattr(_T, "UINT4", -1), getattr(_T, "FLOAT4E2M1", -1)):
            want = (n + 1) // 2
        else:
            want = n * itemsize
        got = len(t.raw_data)
        if got != want:
            raise UserError(f"tensor '{t.name}': {got} bytes of data, its dims {list(t.dims)} ask for {want}")
        return
    if t.data_type not in _TYPED_FIELD:
        return
    name, per = _TYPED_FIELD[t.data_type]
    got = len(getattr(t, name))
    if got != n * per:
        raise UserError(f"tensor '{t.name}': {got} values of data, its dims {list(t.dims)} ask for {n * per}")


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



def all_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every constant tensor of the main graph: initializers and Constant nodes' values."""
    yield from model.graph.initializer
    for n in model.graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    yield a.t


def external_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """The constant tensors whose bytes live in an external file."""
    return (t for t in all_tensors(model) if is_external(t))


def set_tensor(t: onnx.TensorProto, arr: np.ndarray) -> None:
    """Replace a tensor's value in place (raw_data), keeping its name and type."""
    if arr.dtype == object or t.data_type in (onnx.TensorProto.STRING,):
        t.CopyFrom(numpy_helper.from_array(arr, t.name))
        return
    for fld in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data",
                "external_data"):
        t.ClearField(fld)
    t.data_location = onnx.TensorProto.DEFAULT
    del t.dims[:]
    t.dims.extend(arr.shape)
    t.raw_data = arr.astype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type), copy=False).tobytes()



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
        overridable = {i.name for i in graph.input}  # an initializer that is a graph input is a default
        for init in graph.initializer:
            if init.name not in overridable:
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

