"""Held-out fidelity of pruned models without and with compensation (rewrite/compensate.py).

Run::

    python bench/compensation.py MODEL.onnx --calib calib.npz [--holdout 0.6] [--ratios 0.3 0.5]
        [--modes none bias lsq] [--ridge auto 1e-2] [--importance act] [--downstream] [--layerwise]
        [--json out.json] [--eval EVAL.npz]

One analysis (with zero biases added: ``bias_inputs``), one activation capture for the data-aware
importance, then per ratio one plan, and per compensation mode: compensate on the fit share, prune,
verify (exactness against the compensated original, on generated inputs) and measure fidelity on the
held-out share (``--eval EVAL.npz``: all of the calibration file is fit data, and fidelity is measured
on every sample of EVAL instead, data from another source). Prints one row per (ratio, mode): MACs ratio, top-1 agreement (classifier outputs),
mean cosine, relative L2 error, whether verification passed, and the seconds compensation took.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from onnxprune import pipeline
from onnxprune.planning.importance import DEFAULT_DATA_IMPORTANCE
from onnxprune.planning.options import PlanOptions
from onnxprune.rewrite.compensate import DEFAULT_RIDGE, CompensateOptions
from onnxprune.runtime.calib import CalibSpec, CalibView, open_calib


def _ridge(r) -> str:
    return "auto" if r is None else "" if r != r else f"{r:.0e}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("--calib", required=True)
    ap.add_argument("--holdout", type=float, default=0.2)
    ap.add_argument("--samples", type=int, default=None)
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.3, 0.5])
    ap.add_argument("--modes", nargs="+", default=["none", "bias", "lsq"])
    ap.add_argument("--ridge", type=lambda t: None if t == "auto" else float(t), nargs="+", default=[DEFAULT_RIDGE],
                    help="relative ridges to try with lsq ('auto': cross-validated, the default)")
    ap.add_argument("--importance", default=DEFAULT_DATA_IMPORTANCE)
    ap.add_argument("--downstream", action="store_true", help="also refit linear nodes after the consumers")
    ap.add_argument("--layerwise", action="store_true",
                    help="fit level by level on the compensated upstream (default: one pass on the original's)")
    ap.add_argument("--rows", type=int, default=None, help="positions per sample for second moments")
    ap.add_argument("--allow-approximate", action="store_true")
    ap.add_argument("--json", default=None)
    ap.add_argument("--eval", default=None, help="measure fidelity on every sample of this file; all of --calib is fit")
    args = ap.parse_args()

    t0 = time.perf_counter()
    an = pipeline.analyze_model(args.model, bias_inputs=True)
    data = open_calib(an.model, CalibSpec(path=args.calib, samples=args.samples, holdout=args.holdout))
    fit_view, held = data.fit, data.holdout
    if args.eval:
        fit_view = CalibView(data, "fit", np.arange(data.n if args.samples else data.available))
        ev = open_calib(an.model, CalibSpec(path=args.eval, holdout=0.5))
        held = CalibView(ev, "eval", np.arange(ev.available))
    t1 = time.perf_counter()
    acts = pipeline.capture_activations(an, fit_view, "cpu")
    t2 = time.perf_counter()
    print(f"{args.model}: {fit_view.n} fit, {held.n} {'evaluation' if args.eval else 'held-out'} samples; analysis {t1 - t0:.1f}s, "
          f"importance capture {t2 - t1:.1f}s")
    head = f"{'ratio':>5} {'mode':>5} {'ridge':>7} {'MACs':>6} {'top-1':>7} {'cosine':>7} {'rel.err':>8} {'verify':>6} {'comp s':>7} {'fit err':>15}"
    print(head)
    rows = []
    for ratio in args.ratios:
        opts = PlanOptions(ratio=ratio, importance=args.importance, allow_approximate=args.allow_approximate)
        for mode in args.modes:
            for ridge in (args.ridge if mode == "lsq" else [args.ridge[0]]):
                kw = {} if args.rows is None else {"rows_per_sample": args.rows}
                comp = CompensateOptions(mode=mode, ridge=ridge, layerwise=args.layerwise, downstream=args.downstream, **kw)
                res = pipeline.run(args.model, opts, verify=True, ep="cpu", analysis=an, calib=acts,
                                   compensation=comp, fit=fit_view)
                fid = pipeline.measure_holdout(res, held, "cpu").summary()
                macs = res.after.macs / max(res.before.macs, 1)
                c = res.compensation
                errs = [(r.fit_rel_error_before, r.fit_rel_error_after) for r in (c.consumers if c else [])
                        if r.fit_rel_error_after is not None]
                fit = f"{max(b for b, _ in errs):.3f}->{max(a for _, a in errs):.3f}" if errs else ""
                top = fid["min_top1_agreement"]
                row = {"ratio": ratio, "mode": mode, "ridge": ridge if mode == "lsq" else None, "macs": macs,
                       "top1": top, "cosine": fid["min_cosine"], "rel_error": fid["worst_rel_error_l2"],
                       "verified": res.verification.passed, "compensate_s": c.seconds if c else 0.0,
                       "passes": c.passes if c else 0, "counts": c.counts() if c else {}, "fit": fit}
                rows.append(row)
                print(f"{ratio:5.2f} {mode:>5} {_ridge(ridge if mode == 'lsq' else float('nan')):>7} {macs:6.3f} "
                      f"{'' if top is None else f'{100 * top:6.2f}%':>7} {fid['min_cosine']:7.4f} "
                      f"{fid['worst_rel_error_l2']:8.4f} {str(res.verification.passed):>6} {row['compensate_s']:7.1f} "
                      f"{fit:>15}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "fit": fit_view.n, "held_out": held.n, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
