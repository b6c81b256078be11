"""Importance criteria: one score per unit of a group, from the weights of every member."""

from __future__ import annotations

import numpy as np

from onnxprune.analysis.contract import Role
from onnxprune.analysis.coupling import CouplingGraph, Group
from onnxprune.errors import UserError

IMPORTANCES = ("l1", "l2", "bn", "random")
_MAGNITUDE_ROLES = (Role.PRODUCER, Role.CONSUMER, Role.SCALE, Role.PARAM)


def group_importance(cg: CouplingGraph, group: Group, kind: str = "l2", seed: int = 0) -> np.ndarray:
    """One score per unit of ``group`` (higher = more important), normalized to mean 1."""
    n = group.size
    if kind == "random":
        rng = np.random.default_rng(seed + group.id)
        return _normalize(rng.random(n))
    if kind not in IMPORTANCES:
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
        w = cg.consts.get(s.const)
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
    return _normalize(score)


def _normalize(score: np.ndarray) -> np.ndarray:
    m = float(np.mean(score)) if score.size else 0.0
    return score / m if m > 0 else score

