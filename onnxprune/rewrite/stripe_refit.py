"""Least-squares reconstruction of the kept stripes (``prune --stripe-ratio R --calib DATA``).

Stripe pruning removes stripes ``W[f, :, i, j]`` of a K×K' conv; without data the kept stripes keep
their values. With calibration data the kept stripes are refitted so each filter's output on the
data stays close to the original's. Like channel compensation (``rewrite/compensate.py``) this
changes the *source's* constants, never the graph: ``refit_stripes`` returns a copy S' of the source
whose planned convs carry refitted weights (removed stripes still as they were: the pipeline then
masks or shrinks S' and verifies against ``mask_stripes(S', plan)``, which is exact as before).

The fit (one conv). Its features x are the input patches (``runtime.capture.GramSpec``: per conv
group, in-group channels x kernel taps, channel-major, read from the zero-padded input), and
``G = E[x xᵀ]`` their (uncentered) Gram on the fit share's row subsample. Filter ``f`` keeps the
features ``K_f`` = its in-group channels x its kept taps; with ``w`` its flattened original weight
and ``w_K`` its kept part,

    ``w'_K = (G_KK + lam·I)^-1 (G_{K,all} w + lam·w_K)``,  ``lam = ridge · mean(diag G_KK)``

the ridge fit of the original filter's output on the kept features, shrunk toward the kept weights
(``ridge`` -> infinity: no refit; 0: plain least squares), as ``compensate.py`` does. One Cholesky
per distinct kept set (filters of a conv group sharing a box share it: many right-hand sides). The
bias is untouched (the target ``x·w`` has no intercept; the filter's bias is the same on both
sides). ``ridge=None`` (``CompensateOptions``' default) picks the ridge per conv by 2-fold
cross-validation on the Gram's folds (rows split by the parity of the sample index): every ridge of
``RIDGE_GRID`` (None: no refit) is fitted on one fold and scored on the other, both ways, from the
Gram matrices alone; the lowest summed error wins, so a refit is never chosen when it predicts the
other fold worse than the masked weights.

Flat: every conv is fitted on the source's own activations (its upstream unrefitted).
The report per conv: the fit's relative error ``E||x w − x_K w'_K||² / E||x w||²`` (summed over the
filters, both folds) before (``w'_K = w_K``, the masked weights) and after.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import onnx

from onnxprune.ir.attrs import get_attr
from onnxprune.ir.graph import default_opset
from onnxprune.ir.tensors import set_tensor, tensor_value
from onnxprune.planning.stripes import StripePlan
from onnxprune.rewrite.compensate import MAX_FEATURES, RIDGE_GRID
from onnxprune.rewrite.stripes import _tensors, validate_stripes
from onnxprune.runtime.capture import GramSpec, GramSum

log = logging.getLogger(__name__)


@dataclass
class ConvRefit:
    """One planned conv: refitted or not (``reason``), the ridge used, fit relative error before/after."""

    key: str
    refitted: bool
    ridge: float | None = None
    error_before: float | None = None
    error_after: float | None = None
    kept_sets: int = 0
    reason: str | None = None

    def to_json(self) -> dict:
        return {"conv": self.key, "refitted": self.refitted, "ridge": self.ridge,
                "fit_rel_error_before": self.error_before, "fit_rel_error_after": self.error_after,
                "kept_sets": self.kept_sets, **({"reason": self.reason} if self.reason else {})}


@dataclass
class StripeRefit:
    """What ``refit_stripes`` did: per planned conv a ``ConvRefit``, the fit rows, the seconds
    (``seconds``: the solves; ``capture_s``: the Gram capture, set by the pipeline)."""

    convs: list[ConvRefit] = field(default_factory=list)
    ridge: float | None = None  # the option: None = cross-validated per conv
    rows: int = 0
    seconds: float = 0.0
    capture_s: float = 0.0

    @property
    def refitted(self) -> list[ConvRefit]:
        return [c for c in self.convs if c.refitted]

    def to_json(self) -> dict:
        return {"mode": "lsq", "ridge": self.ridge, "convs_refitted": len(self.refitted), "convs": len(self.convs),
                "fit_rows": self.rows, "seconds": self.seconds + self.capture_s, "capture_s": self.capture_s,
                "per_conv": [c.to_json() for c in self.convs]}


def stripe_gram_specs(model: onnx.ModelProto, plan: StripePlan,
                      max_features: int = MAX_FEATURES) -> dict[str, GramSpec]:
    """``{conv key: the GramSpec of its input patch}`` for every planned conv that removes a stripe
    and has at most ``max_features`` features per conv group (what the pipeline captures)."""
    convs = validate_stripes(model, plan)
    opset = default_opset(model)
    out: dict[str, GramSpec] = {}
    for key, conv in convs.items():
        if plan.keep[key].all():
            continue
        f, cpg, k, k2 = conv.shape
        groups = conv.group
        node = conv.node
        auto = get_attr(node, "auto_pad", opset) or "NOTSET"
        auto = auto.decode() if isinstance(auto, bytes) else str(auto)
        spec = GramSpec(node.input[0], 1, cpg * groups, (k, k2), tuple(get_attr(node, "strides", opset) or (1, 1)),
                        tuple(get_attr(node, "dilations", opset) or (1, 1)),
                        tuple(get_attr(node, "pads", opset) or (0, 0, 0, 0)), auto, groups)
        if spec.features <= max_features:
            out[key] = spec
    return out


def _err(g: np.ndarray, w: np.ndarray, idx: np.ndarray, wk: np.ndarray) -> float:
    """Summed E||x w − x_K wk||² over the columns, from the Gram ``g`` (w [F_all, n], wk [|K|, n])."""
    gw = g @ w
    return float(np.sum(w * gw) - 2 * np.sum(wk * gw[idx]) + np.sum(wk * (g[np.ix_(idx, idx)] @ wk)))


def _solve(g: np.ndarray, w: np.ndarray, idx: np.ndarray, lam_rel: float | None) -> np.ndarray:
    """The kept rows of the refitted weights (columns = filters) for one kept set."""
    wk = w[idx]
    if lam_rel is None:
        return wk
    gkk = g[np.ix_(idx, idx)]
    lam = lam_rel * max(float(np.trace(gkk)) / max(len(idx), 1), 1e-12)
    lhs = gkk + lam * np.eye(len(idx))
    rhs = g[idx] @ w + lam * wk
    try:
        c = np.linalg.cholesky(lhs)
        out = np.linalg.solve(c.T, np.linalg.solve(c, rhs))
    except np.linalg.LinAlgError:
        out = np.linalg.lstsq(lhs, rhs, rcond=None)[0]
    return out if np.all(np.isfinite(out)) else wk


def _kept_sets(keep: np.ndarray, groups: int, cpg: int) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """``(conv group, filters, kept feature indices)`` per distinct kept set of one conv."""
    f = keep.shape[0]
    per = f // groups
    flat = keep.reshape(f, -1)
    out = []
    for grp in range(groups):
        rows = flat[grp * per:(grp + 1) * per]
        pats, inv = np.unique(rows, axis=0, return_inverse=True)
        for p, pat in enumerate(pats):
            filters = grp * per + np.flatnonzero(inv.reshape(-1) == p)
            out.append((grp, filters, np.flatnonzero(np.tile(pat, cpg))))
    return out


def refit_stripes(model: onnx.ModelProto, plan: StripePlan, grams: dict[GramSpec, GramSum],
                  ridge: float | None = None, max_features: int = MAX_FEATURES) -> tuple[onnx.ModelProto, StripeRefit]:
    """A copy of ``model`` whose planned convs' kept stripes are refitted on ``grams`` (the Gram sums
    of ``stripe_gram_specs(model, plan)``, module docstring), and the report. Removed stripes keep
    their values (the mask zeroes them); a conv without its Gram is reported, not refitted."""
    t0 = time.perf_counter()
    out = onnx.ModelProto()
    out.CopyFrom(model)
    convs = validate_stripes(out, plan)
    specs = stripe_gram_specs(out, plan, max_features)
    weights = _tensors(out.graph)
    report = StripeRefit(ridge=ridge)
    for key, conv in convs.items():
        if plan.keep[key].all():
            report.convs.append(ConvRefit(key, False, reason="no stripe removed"))
            continue
        spec = specs.get(key)
        acc = grams.get(spec) if spec is not None else None
        if acc is None or acc.rows == 0 or min(acc.n) == 0:
            why = (f"{spec.features} features per conv group exceed {max_features}" if spec is None
                   else "no Gram rows captured")
            report.convs.append(ConvRefit(key, False, reason=why))
            continue
        report.rows = max(report.rows, acc.rows)
        t = weights[conv.weight_name]
        w0 = np.asarray(tensor_value(t))
        f, cpg = w0.shape[:2]
        w = w0.astype(np.float64).reshape(f, -1)  # [F, C/g·K·K'], channel-major then tap
        folds = [acc.ss[j] / acc.n[j] for j in (0, 1)]  # [G, F_all, F_all] per fold
        full = acc.ss.sum(axis=0) / acc.n.sum()
        sets = _kept_sets(plan.keep[key], conv.group, cpg)
        lam = ridge
        if ridge is None:  # 2-fold CV over RIDGE_GRID, the error summed over sets and both directions
            cv = {}
            for r in RIDGE_GRID:
                e = 0.0
                for grp, fl, idx in sets:
                    wf = w[fl].T
                    for a, b in ((0, 1), (1, 0)):
                        e += _err(folds[b][grp], wf, idx, _solve(folds[a][grp], wf, idx, r))
                cv[r] = e
            lam = min(cv, key=lambda r: (cv[r], r is None))
        new = w.copy()
        before = after = total = 0.0
        for grp, fl, idx in sets:
            wf = w[fl].T
            g = full[grp]
            wk = _solve(g, wf, idx, lam)
            new[np.ix_(fl, idx)] = wk.T
            before += _err(g, wf, idx, wf[idx])
            after += _err(g, wf, idx, wk)
            total += float(np.sum(wf * (g @ wf)))
        total = max(total, 1e-30)
        refitted = lam is not None
        if refitted:
            drop = ~np.broadcast_to(plan.keep[key][:, None], w0.shape).reshape(f, -1)
            new[drop] = w[drop]  # removed stripes untouched (the mask zeroes them)
            set_tensor(t, new.reshape(w0.shape).astype(w0.dtype))
        report.convs.append(ConvRefit(key, refitted, lam, before / total, after / total if refitted else before / total,
                                      len(sets), None if refitted else "cross-validation kept the masked weights"))
    report.seconds = time.perf_counter() - t0
    log.info("stripe refit: %d of %d convs in %.2fs", len(report.refitted), len(report.convs), report.seconds)
    return out, report
