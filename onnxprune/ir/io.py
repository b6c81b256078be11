"""Files: loading ONNX models (external data stays in its files, read per tensor), atomic saving
with the usual permissions, and JSON reports and plans written the same way."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from onnxprune.errors import UserError
from onnxprune.ir.graph import default_opset
from onnxprune.ir.tensors import all_tensors, external_tensors, is_external, tensor_nbytes, tensor_value

log = logging.getLogger(__name__)

MIN_OPSET, MAX_OPSET = 11, 23
LARGE_BYTES = 1_800_000_000


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


def _absolutize_external(model: onnx.ModelProto, base: Path) -> None:
    """Weights stay in their files: each external tensor points at its file by absolute path and is
    read only when needed (memory stays near the size of what is pruned, not of the model)."""
    for t in external_tensors(model):
        for e in t.external_data:
            if e.key == "location":
                loc = Path(e.value)
                full = loc if loc.is_absolute() else (base / loc)
                if not full.exists():
                    raise UserError(f"external data file {full} of tensor '{t.name}' is missing")
                e.value = str(full.resolve())



def has_external(model: onnx.ModelProto) -> bool:
    return next(external_tensors(model), None) is not None


def model_bytes(model: onnx.ModelProto) -> int:
    """Size of the model including its external data."""
    return model.ByteSize() + sum(tensor_nbytes(t) for t in external_tensors(model))


def approx_bytes(model: onnx.ModelProto) -> int:
    """Weight bytes from tensor dims (ByteSize walks every byte and costs as much as serializing)."""
    return sum(tensor_nbytes(t) for t in all_tensors(model)) + 1_000_000


def check_opset(model: onnx.ModelProto, where: str = "model") -> int:
    opset = default_opset(model)
    if opset is None:
        raise UserError(f"{where}: no default-domain opset import")
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise UserError(f"{where}: opset {opset} is outside the supported range {MIN_OPSET}..{MAX_OPSET}")
    return opset


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
        for t in all_tensors(out):
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



def write_json(path: str | os.PathLike, data: dict) -> None:
    """Write JSON atomically (temporary file, then rename), with the same permissions as models."""
    p = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent if str(p.parent) else ".")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, default=json_default)
        _default_mode(Path(tmp))
        os.replace(tmp, p)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def json_default(o):
    """numpy scalars and arrays as JSON numbers and lists."""
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(type(o))
