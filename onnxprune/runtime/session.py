"""onnxruntime sessions: execution-provider choice, with clear errors when the runtime is missing;
running a model's outputs and comparing them (``rel_error``: max |a - ref| over max |ref|)."""

from __future__ import annotations

import logging
import os

import numpy as np
import onnx
from onnx import numpy_helper

from onnxprune.errors import UserError
from onnxprune.ir.io import LARGE_BYTES, approx_bytes, has_external, model_bytes
from onnxprune.ir.tensors import all_tensors, is_external, tensor_nbytes, tensor_value

log = logging.getLogger(__name__)

EPS = ("auto", "cpu", "cuda")


def require_ort():
    try:
        import onnxruntime as ort
    except ImportError:
        raise UserError("onnxruntime is not installed: pip install 'onnxprune[cpu]' "
                        "(or 'onnxprune[gpu]' for onnxruntime-gpu; never both)") from None
    _quiet(ort)
    return ort


_QUIET = []


def _quiet(ort) -> None:
    """onnxruntime's default logger prints warnings and errors itself (a second stderr line beside
    ours): only fatal messages, once per process."""
    if not _QUIET:
        ort.set_default_logger_severity(4)
        _QUIET.append(True)


def ort_error(exc: BaseException, what: str) -> UserError:
    """One-line UserError for an onnxruntime failure (``what``: creating a session, running)."""
    text = " ".join(str(exc).split())
    for prefix in ("[ONNXRuntimeError] : ",):
        if text.startswith(prefix):
            text = text[len(prefix):]
    return UserError(f"onnxruntime cannot {what} the model: {text[:400]}")


def _ort_failures(ort) -> tuple[type[BaseException], ...]:
    """The exceptions onnxruntime raises for models and inputs it cannot take: the status classes
    of its pybind module (Fail, InvalidArgument, NotImplemented, ...; plain Exception subclasses),
    RuntimeError, and ValueError, TypeError or KeyError from its Python layer on bad feeds."""
    if not _FAILURES:
        state = ort.capi.onnxruntime_pybind11_state
        own = tuple(o for o in vars(state).values()
                    if isinstance(o, type) and issubclass(o, Exception) and o.__module__ == state.__name__)
        _FAILURES.append((*own, RuntimeError, ValueError, TypeError, KeyError))
    return _FAILURES[0]


_FAILURES: list[tuple[type[BaseException], ...]] = []


def run_session(sess, feeds: dict, output_names: list[str] | None = None) -> list:
    """``sess.run`` with onnxruntime failures (wrong dtype or shape, a kernel error) as one-line
    UserErrors: every run of the measure stages goes through here."""
    ort = require_ort()
    try:
        return sess.run(output_names, feeds)
    except _ort_failures(ort) as exc:
        raise ort_error(exc, "run") from None


def run_model(model: onnx.ModelProto, feeds: dict, ep: str = "cpu", optimize: bool = True) -> list[np.ndarray]:
    """Every graph output of ``model`` on ``feeds``, in one session with precise math."""
    sess, _ = make_session(model, ep, optimize=optimize, precise=True)
    return run_session(sess, feeds)


def rel_error(a: np.ndarray, ref: np.ndarray) -> float:
    """max |a - ref| over max |ref| (0 when both are all zeros, inf for another shape or a zero
    ``ref`` with a non-zero difference)."""
    a = np.asarray(a, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if a.shape != ref.shape:
        return float("inf")
    scale = float(np.max(np.abs(ref))) if ref.size else 0.0
    diff = float(np.max(np.abs(a - ref))) if ref.size else 0.0
    if scale == 0.0:
        return 0.0 if diff == 0.0 else float("inf")
    return diff / scale


def run_with_iobinding(sess, binding) -> None:
    ort = require_ort()
    try:
        sess.run_with_iobinding(binding)
    except _ort_failures(ort) as exc:
        raise ort_error(exc, "run") from None


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
                 optimize: bool = True, precise: bool = False, profile_prefix: str | None = None):
    """Return (session, ep actually used). CUDA sessions keep CPU as fallback for unsupported ops.
    ``precise``: for comparing results (no TF32 on CUDA; quantized units on their integer kernels).
    ``profile_prefix``: onnxruntime's node profiling on, its JSON written under this prefix
    (``sess.end_profiling()`` returns the path)."""
    ort = require_ort()
    ep = resolve_ep(ep)
    so = ort.SessionOptions()
    so.log_severity_level = 4  # errors reach the user as one UserError line, not as ORT's log
    if profile_prefix is not None:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if precise:
        # a QDQ unit (DequantizeLinear -> Conv/MatMul/... -> QuantizeLinear) runs as its integer kernel
        # also with int8 activations, which onnxruntime leaves to float kernels on some x86 CPUs: float
        # summation order would then decide roundings, and integer results are exactly comparable
        so.add_session_config_entry("session.qdqisint8allowed", "1")
    providers = ["CPUExecutionProvider"] if ep == "cpu" else [
        # verification compares float32 results: TF32 Tensor-Core math (on by default) would add ~1e-3
        ("CUDAExecutionProvider", {"use_tf32": "0"} if precise else {}), "CPUExecutionProvider"]
    keep: list = []
    if isinstance(model, onnx.ModelProto):
        src, external = _runnable(model)
        if external:
            names = list(external)
            keep = [ort.OrtValue.ortvalue_from_numpy(external[n]) for n in names]
            so.add_external_initializers(names, keep)
    else:
        src = str(model)
    try:
        sess = ort.InferenceSession(src, sess_options=so, providers=providers)
    except _ort_failures(ort) as exc:
        raise ort_error(exc, "load") from None
    sess._onnxprune_external = keep  # the session reads the weights from these buffers: keep them alive
    used = "cuda" if "CUDAExecutionProvider" in sess.get_providers() else "cpu"
    if ep == "cuda" and used != "cuda":
        raise UserError("--ep cuda: onnxruntime fell back to CPU")
    return sess, used



def _runnable(model: onnx.ModelProto) -> tuple[bytes, dict[str, np.ndarray]]:
    """(serialized model, external initializers) for onnxruntime. Weights kept in external files
    (absolute paths after loading) are inlined for models under ~1.8 GB. Larger models are never
    linked or written anywhere (onnxruntime rejects symlinked data files, and the model's folder may
    be read-only): every external or large initializer becomes a stub naming a placeholder file,
    and its value is handed to the session (``SessionOptions.add_external_initializers``), which
    replaces the stub before any file is opened."""
    if not has_external(model):
        if approx_bytes(model) > LARGE_BYTES:
            return _with_external_initializers(model)
        return model.SerializeToString(), {}
    if model_bytes(model) > LARGE_BYTES:
        return _with_external_initializers(model)
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for t in all_tensors(copy):
        if is_external(t):
            value = tensor_value(t)
            t.CopyFrom(numpy_helper.from_array(value, t.name))
    return copy.SerializeToString(), {}


def _with_external_initializers(model: onnx.ModelProto, threshold: int = 1024):
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    values: dict[str, np.ndarray] = {}
    for t in copy.graph.initializer:
        if not is_external(t) and tensor_nbytes(t) < threshold:
            continue
        values[t.name] = np.ascontiguousarray(tensor_value(t))
        stub = onnx.TensorProto(name=t.name, data_type=t.data_type, dims=t.dims,
                                data_location=onnx.TensorProto.EXTERNAL)
        for k, v in (("location", "onnxprune-in-memory.bin"), ("offset", "0"),
                     ("length", str(values[t.name].nbytes))):
            e = stub.external_data.add()
            e.key, e.value = k, v
        t.CopyFrom(stub)
    for t in all_tensors(copy):  # Constant nodes' values cannot be handed over: inlined (small)
        if is_external(t) and t.name not in values:
            t.CopyFrom(numpy_helper.from_array(tensor_value(t), t.name))
    if copy.ByteSize() >= 2**31:  # protobuf's limit, even with every large initializer handed over
        raise UserError("model too large to run from memory")
    return copy.SerializeToString(), values
