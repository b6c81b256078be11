"""Data-aware importance: unit scores from the activations that feed each consumer of a group.

Terms. A *consumer slot* of a group is a weight axis with role CONSUMER (``analysis.coupling.Slot``):
the weight W of a node (Conv, ConvTranspose, Gemm, MatMul, an RNN's W) that contracts the group's
channels. Its *activation* x is that node's data operand: one of the node's first two inputs, not a
constant, on the axis whose channel space belongs to the group (``consumer_taps``). Each distinct
(tensor, axis) is tapped once, whatever the number of groups and slots reading it; one capture
(``runtime.capture``) on the *fit* share of the calibration data gives per channel E[x²] and Var[x].
Here nothing runs a model: ``pipeline.capture_activations`` does, and hands ``Activations`` down.

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
diagonal approximation: cross terms are dropped).

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
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

from onnxprune.analysis.contract import Role
from onnxprune.analysis.coupling import CouplingGraph, Group, Slot
from onnxprune.planning.importance import DATA_IMPORTANCES, group_importance, normalize
from onnxprune.runtime.capture import Capture, ChannelStats

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
    """Per-channel statistics of the consumers' inputs on the fit share (from a ``Capture``)."""

    stats: Mapping[str, ChannelStats]
    samples: int
    seconds: float | None = None  # how long the capture took (None: not measured here)

    @classmethod
    def of(cls, cap: Capture, seconds: float | None = None) -> Activations:
        return cls(dict(cap.stats), cap.samples, seconds)


@dataclass
class DataScores:
    """Scores per group id, and the groups scored by l2 instead (``fallback``) or on only some of
    their consumers (``partial``), each with a reason."""

    kind: str
    scores: dict[int, np.ndarray]
    fallback: dict[int, str] = field(default_factory=dict)
    partial: dict[int, str] = field(default_factory=dict)

    def report(self, cg: CouplingGraph, acts: Activations | None) -> dict:
        def entries(d: dict[int, str]) -> list[dict]:
            return [{"group": gid, "producers": cg.groups[gid].producers[:3], "reason": why}
                    for gid, why in list(d.items())[:10]]

        return {"criterion": self.kind, "groups": len(self.scores), "fallback_l2": len(self.fallback),
                "fallback": entries(self.fallback), "partial": len(self.partial), "partial_groups": entries(self.partial),
                "samples": acts.samples if acts is not None else None,
                "tapped_tensors": len(acts.stats) if acts is not None else 0,
                "capture_s": acts.seconds if acts is not None else None}


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
                taps: TapPlan | None = None) -> DataScores:
    """Scores of ``kind`` (``act`` or ``act-var``) for every group of ``groups``; l2 where a group has
    no tappable consumer (``DataScores.fallback``)."""
    if kind not in DATA_IMPORTANCES:
        raise ValueError(f"not a data-aware importance: {kind}")
    groups = list(groups)
    taps = taps if taps is not None else consumer_taps(cg, groups)
    out = DataScores(kind, {})
    for g in groups:
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
    if out.fallback:
        log.info("%s: %d of %d groups scored by l2 (e.g. %s)", kind, len(out.fallback), len(groups),
                 next(iter(out.fallback.values())))
    return out
