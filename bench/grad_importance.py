"""Time of the gradient criteria on a zoo model: one pass over the calibration data that serves
taylor (both forms), fisher and group-fisher, then the per-sample pass hessian needs.

    python bench/grad_importance.py [--arch resnet50] [--samples 256] [--batch 32] [--hessian-samples 8]

The model is the zoo's export (random torchvision weights, legacy exporter, BatchNorm folded unless
``--bn unfused``); the calibration data are standard-normal images (the time does not depend on the
values). Stages: analysis (load, normalize, shapes, coupling graph), the request, the gradient pass
(``collect_gradients``: building the executor, forward, backward, folding the gradients into the
sums) and the scores of each criterion. Hessian runs one sample per pass (per-sample squared weight
gradients): it is timed on ``--hessian-samples`` samples and the figure for ``--samples`` is that time
scaled linearly (each sample is one identical pass). Prints a table and, with ``--json``, writes it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

import numpy as np
import torch
from onnxprune.handlers import REGISTRY
from onnxprune.models import zoo

from onnxprune.analysis.analyze import analyze_model
from onnxprune.planning import grad_importance as gi
from onnxprune.runtime.calib import CalibSpec, open_calib
from onnxprune.runtime.gradients import collect_gradients

PASS_CRITERIA = [gi.GradOptions("taylor"), gi.GradOptions("taylor", taylor_form="activation"),
                 gi.GradOptions("fisher"), gi.GradOptions("group-fisher")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="resnet50")
    ap.add_argument("--bn", default="fold", choices=zoo.BN_MODES)
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--hessian-samples", type=int, default=8)
    ap.add_argument("--json", default=None, help="write the figures here")
    args = ap.parse_args()
    path = zoo.export(args.arch, "legacy", bn=args.bn)
    out: dict = {"arch": args.arch, "bn": args.bn, "samples": args.samples, "batch": args.batch,
                 "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "machine": platform.processor(),
                 "load_avg_before": os.getloadavg()[0]}
    t0 = time.perf_counter()
    an = analyze_model(str(path), REGISTRY)
    groups = [g for g in an.cg.groups if g.prunable]
    out["analysis_s"] = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        x = np.random.default_rng(0).standard_normal((args.samples + 1, 3, 224, 224)).astype(np.float32)
        np.save(f"{tmp}/x.npy", x)
        del x
        data = open_calib(an.model, CalibSpec(path=f"{tmp}/x.npy", holdout=1.0 / (args.samples + 1)))
        assert data.fit.n == args.samples
        t0 = time.perf_counter()
        req = gi.gradient_request(an.cg, groups, PASS_CRITERIA)
        out["request_s"] = time.perf_counter() - t0
        grads = collect_gradients(an.model, REGISTRY, data.fit, req, batch_size=args.batch,
                                  progress=lambda d, n: print(f"  {d}/{n} samples", flush=True))
        assert grads.unavailable is None, grads.unavailable
        out["pass"] = grads.to_json()
        out["scores_s"] = {}
        for o in PASS_CRITERIA:
            t0 = time.perf_counter()
            sc = gi.gradient_scores(an.cg, groups, o, grads)
            assert not sc.fallback, sc.fallback
            out["scores_s"][o.kind + ("-activation" if o.taylor_form == "activation" else "")] = time.perf_counter() - t0
        out["total_s"] = out["analysis_s"] + out["request_s"] + grads.seconds["total"] + sum(out["scores_s"].values())
        del grads
        if args.hessian_samples:
            hopts = gi.GradOptions("hessian")
            hreq = gi.gradient_request(an.cg, groups, hopts)
            sub = open_calib(an.model, CalibSpec(path=f"{tmp}/x.npy", samples=args.hessian_samples + 1,
                                                 holdout=1.0 / (args.hessian_samples + 1))).fit
            hg = collect_gradients(an.model, REGISTRY, sub, hreq)
            t0 = time.perf_counter()
            gi.gradient_scores(an.cg, groups, hopts, hg)
            out["hessian"] = {"pass": hg.to_json(), "scores_s": time.perf_counter() - t0,
                              "per_sample_s": hg.seconds["total"] / hg.samples,
                              f"extrapolated_{args.samples}_s": hg.seconds["total"] / hg.samples * args.samples}
    out["load_avg_after"] = os.getloadavg()[0]
    print(json.dumps(out, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
