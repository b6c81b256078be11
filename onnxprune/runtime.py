"""onnxruntime sessions: execution-provider choice, with clear errors when the runtime is missing."""

from __future__ import annotations

import logging
import os

import onnx

from onnxprune.errors import UserError

log = logging.getLogger(__name__)

EP_NAMES = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


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
                 optimize: bool = True):
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
    providers = ["CPUExecutionProvider"] if ep == "cpu" else ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if isinstance(model, onnx.ModelProto):
        if model.ByteSize() > 1_900_000_000:
            raise UserError("model too large to run from memory; run it from a file")
        src = model.SerializeToString()
    else:
        src = str(model)
    sess = ort.InferenceSession(src, sess_options=so, providers=providers)
    used = "cuda" if "CUDAExecutionProvider" in sess.get_providers() else "cpu"
    if ep == "cuda" and used != "cuda":
        raise UserError("--ep cuda: onnxruntime fell back to CPU")
    return sess, used
