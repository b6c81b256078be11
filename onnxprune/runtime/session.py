"""onnxruntime sessions: execution-provider choice, with clear errors when the runtime is missing."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import onnx
from onnx import numpy_helper

from onnxprune.errors import UserError
from onnxprune.ir.io import LARGE_BYTES, approx_bytes, has_external, model_bytes
from onnxprune.ir.tensors import all_tensors, is_external, tensor_value

log = logging.getLogger(__name__)

EPS = ("auto", "cpu", "cuda")


def require_ort():
    try:
        import onnxruntime as ort
    except ImportError:
        raise UserError("onnxruntime is not installed: pip install 'onnxprune[cpu]' "
                        "(or 'onnxprune[gpu]' for onnxruntime-gpu; never both)") from None
    return ort


def cuda_available() -> bool:
    ort = require_ort()
    return "CUDAExecutionProvider" in ort.get_available_providers()


def resolve_ep(ep: str) -> str:
    """'auto' picks CUDA when onnxruntime-gpu and a GPU are present, else CPU."""
    ep = ep.lower()
    if ep not in ("auto", "cpu", "cuda"):
        raise UserError(f"unknown execution provider '{ep}' (auto, cpu or cuda)")
    if ep == "auto":
        return "cuda" if cuda_available() else "cpu"
    if ep == "cuda" and not cuda_available():
        raise UserError("--ep cuda: the CUDA execution provider is not available "
                        "(install onnxprune[gpu] on a machine with an NVIDIA GPU)")
    return ep


def make_session(model: onnx.ModelProto | str | os.PathLike, ep: str = "auto", threads: int | None = None,
                 optimize: bool = True, precise: bool = False):
    """Return (session, ep actually used). CUDA sessions keep CPU as fallback for unsupported ops."""
    ort = require_ort()
    ep = resolve_ep(ep)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    providers = ["CPUExecutionProvider"] if ep == "cpu" else [
        # verification compares float32 results: TF32 Tensor-Core math (on by default) would add ~1e-3
        ("CUDAExecutionProvider", {"use_tf32": "0"} if precise else {}), "CPUExecutionProvider"]
    tmpdir = None
    if isinstance(model, onnx.ModelProto):
        src, tmpdir = _runnable(model)
    else:
        src = str(model)
    try:
        sess = ort.InferenceSession(src, sess_options=so, providers=providers)
    finally:
        if tmpdir is not None:
            tmpdir.cleanup()
    used = "cuda" if "CUDAExecutionProvider" in sess.get_providers() else "cpu"
    if ep == "cuda" and used != "cuda":
        raise UserError("--ep cuda: onnxruntime fell back to CPU")
    return sess, used



def _runnable(model: onnx.ModelProto):
    """(bytes or path, temp dir) for onnxruntime. Weights kept in external files (absolute paths
    after loading) are inlined for models under ~1.8 GB, else the model is written to a temporary
    directory with its data files linked beside it (onnxruntime wants relative locations)."""
    if not has_external(model):
        if approx_bytes(model) > LARGE_BYTES:
            raise UserError("model too large to run from memory")
        return model.SerializeToString(), None
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    if model_bytes(model) <= LARGE_BYTES:
        for t in all_tensors(copy):
            if is_external(t):
                value = tensor_value(t)
                t.CopyFrom(numpy_helper.from_array(value, t.name))
        return copy.SerializeToString(), None
    tmp = tempfile.TemporaryDirectory(prefix="onnxprune-run-")
    links: dict[str, str] = {}
    for t in all_tensors(copy):
        if not is_external(t):
            continue
        for e in t.external_data:
            if e.key == "location":
                if e.value not in links:
                    name = f"data{len(links)}.bin"
                    os.symlink(e.value, Path(tmp.name) / name)
                    links[e.value] = name
                e.value = links[e.value]
    path = Path(tmp.name) / "model.onnx"
    path.write_bytes(copy.SerializeToString())
    return str(path), tmp

