"""Files: loading ONNX models (external data stays in its files, read per tensor), atomic saving
with the usual permissions, and JSON reports and plans written the same way."""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from onnxprune.errors import UserError
from onnxprune.ir.graph import default_opset, subgraphs
from onnxprune.ir.tensors import (
    all_tensors,
    check_external,
    check_tensor_data,
    external_info,
    external_tensors,
    is_external,
    tensor_nbytes,
    tensor_value,
)

log = logging.getLogger(__name__)

MIN_OPSET, MAX_OPSET = 11, 23  # the opsets the handlers are written for
# opsets MIN_CONVERTIBLE..MIN_OPSET-1 are loaded for analysis only, which converts them to opset 13
# (``analysis.passes.convert_opset``) where that conversion is exact, and refuses them otherwise
MIN_CONVERTIBLE = 7


class WriteFailed(UserError, OSError):
    """A save that the system refused (a full disk, a vanished folder): one line, exit 2, nothing
    left behind. Still an OSError for callers that catch those."""


def _write_failed(p: Path, exc: OSError) -> WriteFailed:
    return WriteFailed(f"cannot write {p}: {exc.strerror or exc}")
LARGE_BYTES = 1_800_000_000


def load(path: str | os.PathLike, min_opset: int = MIN_OPSET) -> onnx.ModelProto:
    """Load and sanity-check an ONNX file; every failure is a one-line UserError. ``min_opset``: the
    lowest default-domain opset accepted (``MIN_CONVERTIBLE`` for the analysis, which converts)."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"no such file: {p}")
    if p.is_dir():
        raise UserError(f"{p} is a directory, not an ONNX file")
    try:
        model = onnx.load(str(p), load_external_data=False)
    except Exception as exc:  # protobuf raises several unrelated types
        raise UserError(f"{p} is not a readable ONNX file ({type(exc).__name__})") from None
    check_text(model, str(p))
    _absolutize_external(model, p.parent)
    for t in _all_nested_tensors(model):
        check_tensor_data(t)
    if not model.graph.node:
        raise UserError(f"{p} is not an ONNX model (no graph nodes)")
    check_opset(model, str(p), min_opset)
    return model


def _values(fd, value) -> tuple[list, bool]:
    """(the values of a set field, whether it is repeated), across protobuf versions."""
    repeated = getattr(fd, "is_repeated", None)
    if repeated is None:
        repeated = fd.label == fd.LABEL_REPEATED
    return (list(value) if repeated else [value]), bool(repeated)


def check_text(msg, where: str = "model", path: str = "model") -> None:
    """Every string field (names, op types, domains, ...) must be valid UTF-8: protobuf hands an
    invalid one back as bytes (or fails to decode it), and later code compares, sorts and decodes it."""
    try:
        fields = [(fd, *_values(fd, value)) for fd, value in msg.ListFields()]
        for fd, values, _ in fields:
            if fd.type == fd.TYPE_STRING and not all(isinstance(v, str) for v in values):
                raise UnicodeDecodeError("utf-8", b"", 0, 1, fd.name)
    except UnicodeDecodeError:
        raise UserError(f"{where} is not a valid ONNX file: a string field under {path} is not valid UTF-8") from None
    for fd, values, repeated in fields:
        if fd.type == fd.TYPE_MESSAGE:
            for i, v in enumerate(values):
                check_text(v, where, f"{path}.{fd.name}[{i}]" if repeated else f"{path}.{fd.name}")


def _absolutize_external(model: onnx.ModelProto, base: Path) -> None:
    """Weights stay in their files: each external tensor is admitted by the guarded loader
    (``check_external``: a regular file inside the model's folder, its span inside the file and of
    the size its dims ask for) and then points at its file by resolved absolute path; it is read only
    when needed (memory stays near the size of what is pruned, not of the model)."""
    for t in external_tensors(model):
        check_external(t, base)
    for t in _nested_external(model):
        raise UserError(f"tensor '{t.name}' inside a subgraph keeps its data in an external file "
                        "(not supported)")


def _nested_external(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """External tensors that ``all_tensors`` does not cover: in subgraphs and sparse initializers."""
    for sp in model.graph.sparse_initializer:
        for t in (sp.values, sp.indices):
            if is_external(t):
                yield t
    stack = [g for n in model.graph.node for g in subgraphs(n)]
    while stack:
        g = stack.pop()
        for t in g.initializer:
            if is_external(t):
                yield t
        for n in g.node:
            stack.extend(subgraphs(n))
            for a in n.attribute:
                if a.type == onnx.AttributeProto.TENSOR and is_external(a.t):
                    yield a.t


def _all_nested_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every constant tensor, subgraphs and sparse initializers included."""
    for sp in model.graph.sparse_initializer:
        yield sp.values
        yield sp.indices
    stack = [model.graph]
    while stack:
        g = stack.pop()
        yield from g.initializer
        for n in g.node:
            stack.extend(subgraphs(n))
            for a in n.attribute:
                if a.type == onnx.AttributeProto.TENSOR:
                    yield a.t
                elif a.type == onnx.AttributeProto.TENSORS:
                    yield from a.tensors


def model_files(path: str | os.PathLike) -> list[Path]:
    """Every file the model at ``path`` consists of: the file itself and the external-data files
    it references (as written, relative to its folder; unchecked: the output-path guard protects
    them all, the loader decides what may be read). Unreadable models consist of the file alone."""
    p = Path(path)
    out = [p]
    try:
        model = onnx.load(str(p), load_external_data=False)
    except Exception:  # noqa: BLE001 - not a model: nothing more to protect
        return out
    for t in external_tensors(model):
        loc = external_info(t).get("location")
        if loc and "\0" not in loc:
            out.append(p.parent / loc)
    return out


def has_external(model: onnx.ModelProto) -> bool:
    return next(external_tensors(model), None) is not None


def model_bytes(model: onnx.ModelProto) -> int:
    """Size of the model including its external data."""
    return model.ByteSize() + sum(tensor_nbytes(t) for t in external_tensors(model))


def approx_bytes(model: onnx.ModelProto) -> int:
    """Weight bytes from tensor dims (ByteSize walks every byte and costs as much as serializing)."""
    return sum(tensor_nbytes(t) for t in all_tensors(model)) + 1_000_000


def check_opset(model: onnx.ModelProto, where: str = "model", min_opset: int = MIN_OPSET) -> int:
    """The default-domain opset, when it is in ``min_opset``..``MAX_OPSET`` (else a UserError)."""
    opset = default_opset(model)
    if opset is None:
        raise UserError(f"{where}: no default-domain opset import")
    if not min_opset <= opset <= MAX_OPSET:
        conv = (f" here (prune and the other analysing commands convert opsets {MIN_CONVERTIBLE}..{MIN_OPSET - 1} "
                "to 13)" if MIN_CONVERTIBLE <= opset < min_opset else "")
        raise UserError(f"{where}: opset {opset} is outside the supported range {min_opset}..{MAX_OPSET}{conv}")
    return opset


def data_file_name(name: str) -> str:
    """The usual name of the external-data file of the model file ``name``."""
    return name + ".data"


def is_data_file_of(model_path: str | os.PathLike, candidate: str | os.PathLike) -> bool:
    """Whether ``candidate`` is (or could become) an external-data file ``save_atomic`` writes for
    ``model_path``: ``<name>.data`` or ``<name>.<unique>.data`` in its folder (symlinks resolved)."""
    mp, c = Path(model_path), Path(candidate)
    try:
        folder, cand = mp.parent.resolve(), c.resolve()
    except (OSError, RuntimeError):
        return False
    if cand.parent != folder and c.absolute().parent != mp.absolute().parent:
        return False
    return any(re.fullmatch(re.escape(mp.name) + r"(\.[A-Za-z0-9_]+)?\.data", n) for n in (cand.name, c.name))


def _previous_data_files(p: Path) -> list[Path]:
    """The data files ``save_atomic`` wrote for the model at ``p`` now (removed once it is replaced)."""
    if not p.is_file():
        return []
    return [f for f in model_files(p)[1:] if is_data_file_of(p, f)]


def save_atomic(model: onnx.ModelProto, path: str | os.PathLike, external: bool | None = None,
                data: bytes | None = None) -> None:
    """Write to temporary files beside ``path``, then rename: no partial output on failure.

    Models with external data (or over ~1.8 GB) keep their weights in a data file beside the model,
    written tensor by tensor: ``<name>.data``, or ``<name>.<unique>.data`` while that name is taken.
    Crash-safe as a pair: the data file gets a name no existing model references, it is renamed in
    place first, and the rename of the .onnx is the commit point (before it the old .onnx still
    pairs with its old data file, untouched; after it the new pair is complete). The old data file
    of this output is removed only after the commit; a crash in between leaves only an unreferenced
    file."""
    p = Path(path)
    folder = p.parent if str(p.parent) else Path(".")
    if external is None:
        external = has_external(model) or approx_bytes(model) > LARGE_BYTES
    previous = _previous_data_files(p)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=folder)
    except OSError as exc:
        raise _write_failed(p, exc) from None
    os.close(fd)
    tmp_data = final_data = None
    try:
        if external:
            final_data = folder / data_file_name(p.name)
            if final_data.exists() or final_data.is_symlink():  # taken (the old pair's): a fresh name
                fd, name = tempfile.mkstemp(prefix=f"{p.name}.", suffix=".data", dir=folder)
                os.close(fd)
                final_data = Path(name)
            fd, tmp_data = tempfile.mkstemp(prefix=f".{p.name}.data.", suffix=".tmp", dir=folder)
            os.close(fd)
            out = _externalized_copy(model, tmp_data, final_data.name)
            with open(tmp, "wb") as f:
                f.write(out.SerializeToString())
            _default_mode(Path(tmp_data))
            os.replace(tmp_data, final_data)
            tmp_data = None
        else:
            with open(tmp, "wb") as f:  # ``data``: the serialization already made (and checked)
                f.write(data if data is not None else model.SerializeToString())
        _default_mode(Path(tmp))
        os.replace(tmp, p)  # the commit point
    except BaseException as exc:
        for f in (tmp, tmp_data, final_data):
            if f and os.path.lexists(f):
                os.unlink(f)
        if isinstance(exc, OSError) and not isinstance(exc, WriteFailed):  # a full disk: one line
            raise _write_failed(p, exc) from None
        raise
    for old in previous:  # after the commit: nothing references them any more
        if final_data is None or not _same_path(old, final_data):
            try:
                os.unlink(old)
            except OSError:
                pass


def _same_path(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except (OSError, RuntimeError):
        return False


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
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, OSError) and not isinstance(exc, WriteFailed):
            raise _write_failed(p, exc) from None
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
