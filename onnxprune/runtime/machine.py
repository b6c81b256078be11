"""The machine: CPU vector width, channel alignment for ``--round-to auto``, a short description.

onnxruntime's CPU convolutions (MLAS) take the fast NCHWc path only when a convolution's channel
counts are multiples of the NCHWc block: 16 floats with AVX-512F, 8 with AVX2 (the transformer
leaves other convolutions in plain NCHW, which is several times slower per MAC). On CUDA, Tensor
Cores want channel counts that are multiples of 8. ``--round-to auto`` keeps every group's unit count
a multiple of that number.
"""

from __future__ import annotations

import os
import platform
import sys
from functools import lru_cache

import onnx

from onnxprune.runtime.session import resolve_ep

CUDA_MULTIPLE = 8
FALLBACK_MULTIPLE = 8


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return frozenset(value.split())
    except OSError:
        pass
    return frozenset()


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def nchwc_block(flags: frozenset[str] | None = None) -> tuple[int, str]:
    """(multiple, why) for onnxruntime's CPU convolutions on a CPU with these flags."""
    flags = cpu_flags() if flags is None else flags
    if "avx512f" in flags:
        return 16, "CPU with AVX-512F: onnxruntime's NCHWc block is 16 channels"
    if "avx2" in flags:
        return 8, "CPU with AVX2: onnxruntime's NCHWc block is 8 channels"
    return FALLBACK_MULTIPLE, "no AVX2/AVX-512 flags found: 8 channels (a safe default)"


def auto_round_to(ep: str = "auto", flags: frozenset[str] | None = None) -> tuple[int, str]:
    """Resolve ``--round-to auto`` for execution provider ``ep`` (auto, cpu or cuda)."""
    try:
        used = resolve_ep(ep)
    except Exception:  # noqa: BLE001 - no runtime, or CUDA asked for and missing: the CPU's block
        used = "cpu" if ep != "cuda" else "cuda"
    if used == "cuda":
        return CUDA_MULTIPLE, "CUDA: Tensor Cores want channel multiples of 8"
    return nchwc_block(flags)


def machine_facts(ep: str = "cpu") -> dict:
    """What a latency measured here depends on, for cache keys (``measure.latency_table``): the CPU
    model, its logical and usable cores, the SIMD flags onnxruntime's kernels choose by, onnxruntime's
    version and the execution provider (with CUDA: the GPU's name, when torch can tell)."""
    facts = {"cpu": cpu_model(), "logical_cpus": os.cpu_count(), "machine": platform.machine(),
             "simd": sorted(f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "neon", "asimd")
                            if f in cpu_flags()), "ep": ep}
    try:
        facts["affinity_cpus"] = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        pass
    try:
        import onnxruntime as ort

        facts["onnxruntime"] = ort.__version__
    except ImportError:
        facts["onnxruntime"] = None
    if ep == "cuda":
        try:
            import torch

            facts["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
        except ImportError:  # the GPU unnamed: the key still holds the provider and onnxruntime's version
            facts["gpu"] = None
    return facts


def describe() -> dict:
    """The machine, for benchmark reports."""
    info = {"cpu": cpu_model(), "logical_cpus": os.cpu_count(), "machine": platform.machine(),
            "os": f"{platform.system()} {platform.release()}", "python": sys.version.split()[0],
            "simd": ", ".join(f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "neon", "asimd")
                              if f in cpu_flags()) or "-",
            "nchwc_block": nchwc_block()[0]}
    try:
        info["affinity_cpus"] = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        pass
    try:
        with open("/proc/meminfo") as f:
            kb = int(f.readline().split()[1])
        info["memory_gib"] = round(kb / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    try:
        import onnxruntime as ort

        info["onnxruntime"] = ort.__version__
        info["providers"] = ", ".join(ort.get_available_providers())
    except ImportError:
        info["onnxruntime"] = "not installed"
    info["onnx"] = onnx.__version__
    return info


def describe_markdown() -> str:
    d = describe()
    return (f"Machine: {d['cpu']}, {d.get('affinity_cpus', d['logical_cpus'])} logical CPUs, "
            f"{d.get('memory_gib', '?')} GiB, {d['os']} ({d['machine']}); SIMD {d['simd']} "
            f"(NCHWc block {d['nchwc_block']}); Python {d['python']}, onnxruntime {d['onnxruntime']} "
            f"({d.get('providers', '-')}), onnx {d['onnx']}.")
