"""The measurement caches (latency tables, ``measure.latency_table``; damage curves,
``measure.sensitivity``): one JSON file per key, named by a hash of the key, in a folder given by the
caller, else by an environment variable, else under ``~/.cache/onnxprune``. The key is stored in the
file and must match when read; files are written atomically and readable by all; a cache that cannot
be written costs a log line, never the run."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

import onnx

from onnxprune.ir.tensors import external_tensors, tensor_value

log = logging.getLogger(__name__)


def cache_dir(env: str, sub: str, path: str | os.PathLike | None = None) -> Path:
    """``path``, else ``$env``, else ``~/.cache/onnxprune/sub``."""
    if path is not None:
        return Path(path)
    value = os.environ.get(env)
    return Path(value) if value else Path.home() / ".cache" / "onnxprune" / sub


def key_name(key: dict) -> str:
    """The file name of ``key``'s entry."""
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32] + ".json"


def read_json(path: Path):
    """The JSON object at ``path``; None when it is missing or unreadable."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def write_json(path: Path, obj, what: str) -> Path | None:
    """``obj`` as JSON at ``path``, written atomically; None (and a log line naming ``what``) when it
    cannot be written."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError as exc:
        log.info("%s not cached (%s)", what, exc)
        return None
    return path


def model_digest(model: onnx.ModelProto, *, values: bool = False) -> str:
    """sha256 of the graph (nodes, inputs, outputs, initializers as stored) and opsets. A tensor kept
    in an external file is stored as its file, offset and length, which say nothing of its values:
    ``values`` hashes those values too (what a cache of measurements *of the weights* needs; a latency
    table depends on the shapes alone)."""
    h = hashlib.sha256()
    for imp in model.opset_import:
        h.update(f"{imp.domain}:{imp.version};".encode())
    g = model.graph
    for part in (g.input, g.output, g.node, g.initializer):
        for item in part:
            h.update(item.SerializeToString(deterministic=True))
        h.update(b"|")
    if values:
        for t in external_tensors(model):
            h.update(t.name.encode() + b":")
            h.update(tensor_value(t).tobytes())
    return h.hexdigest()
