"""Distillation (``rewrite/distill.py``) of a pruned magika, judged by magika's own client.

Run::

    pip install magika==1.0.3
    python bench/magika_calib.py --out magika2500.npz --files 2500
    python bench/distill_magika.py --calib magika2500.npz --targets 0.7 0.5 --steps 200 \\
        --configs base splice [--out /tmp/dm] [--threads 2] [--write]

Per MAC target: the run ``onnxprune prune MODEL --target-macs T --calib C --holdout 0.6 --importance
recon`` makes (recon importance on the 1,000 fit files, lsq compensation), then ``finetune`` with each
named setting of ``CONFIGS`` (the ``DistillOptions`` it changes) on the same fit share. Each model:
held-out top-1 agreement with the original (the 1,500 held-out files of C, never fitted on), the exact
check of the finetuned model against the masked original rebuilt from its weights, and the label
agreement of magika's client on 1,500 other files of this machine (``magika_calib.py --judge``: the
acceptance figure). ``--write`` replaces the "distillation" section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import onnx  # noqa: E402
from _common import write_section  # noqa: E402

MODEL = os.path.expanduser("~/.cache/onnxprune-real-models/magika.onnx")
HERE = Path(__file__).resolve().parent

# the DistillOptions each named setting changes (the rest: the defaults)
CONFIGS = {
    "default": {},
    "none": {"augment": "none"},
    "splice": {"augment": "splice"},
    "splice75": {"augment": "splice", "augment_share": 0.75},
    "noise": {"augment": "noise"},
    "splice+noise": {"augment": "splice+noise"},
    "splice-hard": {"augment": "splice", "hard": 0.5},
    "splice-anchor": {"augment": "splice", "anchor": 1.0},
    "splice-b32": {"augment": "splice", "batch": 32},
    "splice-T2": {"augment": "splice", "temperature": 2.0},
    "splice-lr5e-3": {"augment": "splice", "lr": 5e-3},
    "hard": {"augment": "none", "hard": 0.5},
}


def judge(path: str, exclude: str, files: int) -> float | None:
    """magika's client label agreement (percent) of ``path`` on ``files`` files not in ``exclude``."""
    out = subprocess.run([sys.executable, str(HERE / "magika_calib.py"), "--judge", path, "--exclude", exclude,
                          "--files", str(files)], capture_output=True, text=True)
    m = re.search(r"= ([0-9.]+)%", out.stdout)
    if m is None:
        print(out.stdout + out.stderr, file=sys.stderr)
        return None
    return float(m.group(1))


def prune(model: str, calib: str, holdout: float, target: float):
    """(analysis, calibration data, result) of the CLI's ``--target-macs target --importance recon`` run."""
    from onnxprune import pipeline
    from onnxprune.measure.targets import RatioSearch
    from onnxprune.planning.options import PlanOptions
    from onnxprune.rewrite.compensate import CompensateOptions
    from onnxprune.runtime.calib import CalibSpec, open_calib

    an = pipeline.analyze_model(model, bias_inputs=True)
    data = open_calib(an.model, CalibSpec(path=calib, holdout=holdout))
    opts = PlanOptions(importance="recon")
    acts = pipeline.capture_activations(an, data.fit, "cpu", opts=opts)
    found = RatioSearch(an, opts, target_macs=target, ep="cpu", activations=acts).search()
    res = pipeline.run(model, dataclasses.replace(opts, ratio=found.ratio), ep="cpu", analysis=an, calib=acts,
                       compensation=CompensateOptions(mode="lsq"), fit=data.fit)
    return an, data, res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=MODEL)
    ap.add_argument("--calib", default="/tmp/comp/magika2500.npz")
    ap.add_argument("--holdout", type=float, default=0.6)
    ap.add_argument("--targets", type=float, nargs="+", default=[0.7, 0.5])
    ap.add_argument("--steps", type=int, nargs="+", default=[200])
    ap.add_argument("--configs", nargs="+", default=["none", "default"], choices=sorted(CONFIGS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--files", type=int, default=1500, help="files the client judges (default 1500)")
    ap.add_argument("--no-judge", action="store_true")
    ap.add_argument("--out", default="/tmp/distill_magika")
    ap.add_argument("--write", action="store_true", help="replace the distillation section of bench/RESULTS.md")
    args = ap.parse_args()

    import torch

    from onnxprune import pipeline
    from onnxprune.measure.fidelity import measure_fidelity
    from onnxprune.rewrite.distill import DistillOptions, finetune, rebuild_original
    from onnxprune.runtime.inputs import make_inputs

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    exclude = args.calib + ".files.txt"
    rows = []

    def record(row: dict, model: onnx.ModelProto, name: str) -> None:
        path = str(out / f"{name}.onnx")
        onnx.save(model, path)
        row["client"] = None if args.no_judge else judge(path, exclude, args.files)
        rows.append(row)
        print(json.dumps(row), flush=True)

    for target in args.targets:
        t0 = time.perf_counter()
        an, data, res = prune(args.model, args.calib, args.holdout, target)
        macs = res.after.macs / res.before.macs
        f0 = measure_fidelity(an.model, res.pruned, data.holdout, ep="cpu").summary()
        record({"macs": round(macs, 3), "steps": 0, "setting": "-", "top1": f0["min_top1_agreement"],
                "seconds": round(time.perf_counter() - t0, 1), "fit": data.fit.n, "held": data.holdout.n},
               res.pruned, f"m{target}_0")
        cut = res.compensation.analysis if res.compensation is not None else an
        for steps in args.steps:
            for name in args.configs:
                opts = DistillOptions(steps=steps, device="cpu", **CONFIGS[name])
                t = time.perf_counter()
                d = finetune(an, cut, res.plan, res.pruned, data.fit, opts, ep="cpu")
                wall = time.perf_counter() - t
                f = measure_fidelity(an.model, d.model, data.holdout, ep="cpu").summary()
                v = pipeline.verify_plan(rebuild_original(cut, res.plan, d.model), res.plan, d.model,
                                         make_inputs(an.model), "cpu")
                record({"macs": round(macs, 3), "steps": steps, "setting": name, "top1": f["min_top1_agreement"],
                        "seconds": round(wall, 1), "best_step": d.best_step, "stopped": d.stopped,
                        "augment": d.augment, "val": [d.val_loss_start, d.val_loss_best],
                        "verify_rel": max(o.rel_error for o in v.outputs),
                        "options": {k: getattr(opts, k) for k in ("lr", "batch", "temperature", "augment",
                                                                   "augment_share", "hard", "anchor")}},
                       d.model, f"m{target}_{name}_{steps}")

    lines = ["| MACs | steps | setting | held-out top-1 | client agreement | seconds |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        client = "-" if r["client"] is None else f"{r['client']:.1f}%"
        lines.append(f"| {r['macs']:.3f}x | {r['steps']} | {r['setting']} | {100 * r['top1']:.1f}% | {client} | "
                     f"{r['seconds']} |")
    print("\n".join(lines))
    if args.write:
        cmd = "python bench/distill_magika.py " + " ".join(sys.argv[1:])
        write_section("distillation", ["## Distillation (`--finetune`): magika, judged by its own client", "",
                                       f"`{cmd}`", "", *lines], )


if __name__ == "__main__":
    main()
