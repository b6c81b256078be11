"""Tensors and constants: numpy values of TensorProtos (external data read per tensor) and the
table of every constant of a graph (initializers and Constant-node outputs)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import onnx
from onnx import numpy_helper


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

