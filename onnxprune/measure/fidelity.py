"""Fidelity on held-out calibration data: how much of the original's function the pruned model
keeps, measured on samples never used for fitting (``CalibData.holdout``).

Both models run on the same batches (``runtime.capture.run_batched``: memory-bounded, one batch
alive). Per graph output, over every held-out sample:
- ``rel_error_l2``: ||P - O|| / ||O|| (Frobenius norms over all samples; 0 when both are zero, inf
  when only O is). Not verification's max-abs error: this one weighs every element;
- ``cosine``: the mean over samples of cos(P_i, O_i), each sample's output flattened (1 when both
  are zero, 0 when only one is);
- ``top1``: for *classifier-shaped* outputs, the share of positions where argmax over the last
  axis agrees (``positions`` says how many were compared);
- ``match``: for integer and bool outputs (labels, indices), the share of equal elements.

Samples: an output whose axis 0 has one entry per sample of the batch has a *sample axis*; an output
without one (the model drops the batch) counts each run as one item.

The classifier rule: a float output with a sample axis whose last axis has C >= 2 entries, and
either (a) every other per-sample axis has size 1 (``[N, C]``, ``[N, 1, C]``, ``[N, 1, 1, C]``: one
class vector per sample), or (b) the original's values along the last axis are probability vectors
on every held-out sample (all >= 0, each summing to 1 within 1e-3: a softmax over classes at every
position, e.g. a CTC recognizer's ``[N, T, C]``). Anything else (feature maps, embeddings, logits of
sequence models) gets no top-1: its relative error and cosine say what is kept.

One number per model, for ``--target-fidelity`` and ``sweep`` (``score``): ``agreement`` is the
smallest top-1 agreement over the classifier-shaped outputs (the others do not count; a model
without one has no agreement: ``choose_metric`` says to use cosine), ``cosine`` the smallest mean
cosine over all outputs. The worst output decides, so a model with several heads keeps all of them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import onnx

from onnxprune.errors import UserError
from onnxprune.runtime.calib import Batch, CalibView
from onnxprune.runtime.capture import DEFAULT_BUDGET, MAX_BATCH, Progress, run_batched
from onnxprune.runtime.session import make_session

PROB_TOL = 1e-3
METRICS = ("agreement", "cosine")  # what --target-fidelity judges (``score``)


@dataclass
class OutputFidelity:
    name: str
    shape: tuple[int, ...]  # one sample's shape (the whole output's when it has no sample axis)
    rel_error_l2: float
    cosine: float
    top1: float | None  # classifier-shaped outputs only
    positions: int  # argmax positions compared for top1 (0: none)
    match: float | None  # integer and bool outputs: share of equal elements

    def to_json(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "rel_error_l2": self.rel_error_l2,
                "cosine": self.cosine, "top1_agreement": self.top1, "top1_positions": self.positions,
                "match": self.match}


@dataclass
class Fidelity:
    """Per-output fidelity of a pruned model against its original on ``samples`` held-out samples."""

    samples: int
    outputs: list[OutputFidelity]
    batches: tuple[int, ...] = ()
    calibration: dict = field(default_factory=dict)  # where the samples came from (CalibData.to_json)

    def summary(self) -> dict:
        """The worst output: largest relative error, smallest cosine, smallest top-1 (None: no classifier)."""
        tops = [o.top1 for o in self.outputs if o.top1 is not None]
        return {"held_out": self.samples,
                "worst_rel_error_l2": max((o.rel_error_l2 for o in self.outputs), default=0.0),
                "min_cosine": min((o.cosine for o in self.outputs), default=1.0),
                "min_top1_agreement": min(tops) if tops else None}

    def to_json(self) -> dict:
        return {"held_out": self.samples, "calibration": self.calibration, "batches": len(self.batches),
                "largest_batch": max(self.batches, default=0), "summary": self.summary(),
                "outputs": [o.to_json() for o in self.outputs]}


class _Acc:
    """Running sums of one output over the held-out batches."""

    def __init__(self, name: str):
        self.name = name
        self.shape: tuple[int, ...] | None = None
        self.sq_diff = self.sq_ref = 0.0
        self.cos_sum, self.items = 0.0, 0
        self.agree = self.positions = 0
        self.equal = self.elements = 0
        self.probabilities = True
        self.floating = True
        self.mismatch = False
        self.per_sample = False

    def update(self, o: np.ndarray, p: np.ndarray, n: int) -> None:
        o, p = np.asarray(o), np.asarray(p)
        per_sample = o.ndim >= 1 and o.shape[0] == n
        if self.shape is None:
            self.shape = tuple(o.shape[1:]) if per_sample else tuple(o.shape)
            self.floating = bool(np.issubdtype(o.dtype, np.floating))
            self.per_sample = per_sample
        if o.shape != p.shape:
            self.mismatch = True
            return
        o64, p64 = o.astype(np.float64), p.astype(np.float64)
        d = p64 - o64
        self.sq_diff += float(np.sum(d * d))
        self.sq_ref += float(np.sum(o64 * o64))
        oo = o64.reshape(n, -1) if per_sample else o64.reshape(1, -1)
        pp = p64.reshape(n, -1) if per_sample else p64.reshape(1, -1)
        self.cos_sum += float(np.sum(cosines(pp, oo)))
        self.items += oo.shape[0]
        if not self.floating:
            self.equal += int(np.sum(o == p))
            self.elements += int(o.size)
        elif per_sample and o.ndim >= 2 and o.shape[-1] >= 2:
            if self.probabilities:
                sums = o64.sum(axis=-1)
                self.probabilities = bool(np.all(o64 >= 0) and np.all(np.abs(sums - 1.0) <= PROB_TOL))
            self.agree += int(np.sum(np.argmax(o, axis=-1) == np.argmax(p, axis=-1)))
            self.positions += int(math.prod(o.shape[:-1]))

    def classifier(self) -> bool:
        if not (self.floating and self.per_sample and self.shape and self.shape[-1] >= 2 and self.positions):
            return False
        return all(d == 1 for d in self.shape[:-1]) or self.probabilities

    def result(self) -> OutputFidelity:
        if self.mismatch:
            inf = float("inf")
            return OutputFidelity(self.name, self.shape or (), inf, 0.0, 0.0 if self.classifier() else None, 0, None)
        if self.sq_ref > 0:
            rel = math.sqrt(self.sq_diff) / math.sqrt(self.sq_ref)
        else:
            rel = 0.0 if self.sq_diff == 0 else float("inf")
        top = self.agree / self.positions if self.classifier() else None
        match = self.equal / self.elements if (not self.floating and self.elements) else None
        return OutputFidelity(self.name, self.shape or (), rel, self.cos_sum / max(self.items, 1), top,
                              self.positions if top is not None else 0, match)


def cosines(p: np.ndarray, o: np.ndarray) -> np.ndarray:
    """Row-wise cos(p_i, o_i) of two [items, features] arrays: 1 where both rows are zero, 0 where
    one is."""
    dot = np.einsum("ij,ij->i", p, o)
    np_, no = np.linalg.norm(p, axis=1), np.linalg.norm(o, axis=1)
    both = (np_ == 0) & (no == 0)
    denom = np.where(np_ * no == 0, 1.0, np_ * no)
    return np.where(both, 1.0, np.where(np_ * no == 0, 0.0, dot / denom))


def measure_fidelity(original: onnx.ModelProto, pruned: onnx.ModelProto, view: CalibView, *, ep: str = "auto",
                     budget_bytes: int = DEFAULT_BUDGET, max_batch: int = MAX_BATCH,
                     progress: Progress | None = None) -> Fidelity:
    """Fidelity of ``pruned`` against ``original`` on every sample of ``view`` (module docstring)."""
    so, _ = make_session(original, ep, precise=True)
    sp, _ = make_session(pruned, ep, precise=True)
    names = [o.name for o in so.get_outputs()]
    accs = [_Acc(n) for n in names]

    def consume(batch: Batch, outs: list[list[np.ndarray]]) -> None:
        for acc, o, p in zip(accs, outs[0], outs[1], strict=True):
            acc.update(o, p, batch.n)

    run = run_batched([so, sp], view, [names, names], consume, budget_bytes=budget_bytes, max_batch=max_batch,
                      progress=progress)
    return Fidelity(view.n, [a.result() for a in accs], tuple(run.batches), view.data.to_json())


def score(fid: Fidelity, metric: str) -> float | None:
    """The model's ``metric`` (module docstring): the worst output's top-1 agreement (None: no
    classifier-shaped output) or mean cosine."""
    if metric not in METRICS:
        raise ValueError(f"unknown fidelity metric {metric!r} (one of {', '.join(METRICS)})")
    s = fid.summary()
    return s["min_top1_agreement"] if metric == "agreement" else s["min_cosine"]


@dataclass(frozen=True)
class OutputKind:
    """What fidelity can say about one graph output on a view: its per-sample shape and whether it
    is classifier-shaped (module docstring's rule, decided on the original's values)."""

    name: str
    shape: tuple[int, ...]
    classifier: bool


def output_kinds(model: onnx.ModelProto, view: CalibView, *, ep: str = "auto", budget_bytes: int = DEFAULT_BUDGET,
                 max_batch: int = MAX_BATCH, progress: Progress | None = None) -> list[OutputKind]:
    """Which outputs of ``model`` are classifier-shaped on ``view``: one run of the model alone (the
    same rule ``measure_fidelity`` applies, so the two never disagree)."""
    sess, _ = make_session(model, ep, precise=True)
    names = [o.name for o in sess.get_outputs()]
    accs = [_Acc(n) for n in names]

    def consume(batch: Batch, outs: list[list[np.ndarray]]) -> None:
        for acc, o in zip(accs, outs[0], strict=True):
            acc.update(o, o, batch.n)

    run_batched([sess], view, [names], consume, budget_bytes=budget_bytes, max_batch=max_batch, progress=progress)
    return [OutputKind(a.name, a.shape or (), a.classifier()) for a in accs]


def choose_metric(kinds: list[OutputKind], metric: str | None) -> str:
    """``metric`` checked against the model's outputs; None: agreement when an output is
    classifier-shaped, else cosine. UserError for agreement on a model without a classifier output."""
    if metric is not None and metric not in METRICS:
        raise UserError(f"--metric must be one of {', '.join(METRICS)}, got {metric!r}")
    classifiers = [k for k in kinds if k.classifier]
    if metric is None:
        return "agreement" if classifiers else "cosine"
    if metric == "agreement" and not classifiers:
        seen = ", ".join(f"{k.name} {list(k.shape)}" for k in kinds[:4]) + (", ..." if len(kinds) > 4 else "")
        raise UserError("--metric agreement needs a classifier-shaped output (one class vector per sample, or "
                        f"probability vectors on the last axis); this model has none ({seen}): use --metric cosine")
    return metric
