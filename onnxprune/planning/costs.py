"""Costs of keeping units, at the current widths: MACs (``flops``), tensor elements (``memory``) or a
node's measured time (``latency``), each *linear in every channel axis* of what it counts. Torch-free,
so that the greedy schedule of ``grad_importance`` and the budget allocation of ``planning.allocate``
share one model of what removing a unit saves.

``CostModel`` holds the savings at the current widths (each node's MACs, or each tensor's elements,
linear in each of its channel axes: at full width exactly ``grad_importance.unit_savings``);
``remove`` narrows the widths and ``restore`` widens them again, ``saving_of`` is what removing a
given set of units would save now (without removing it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx

from onnxprune.analysis.contract import Role
from onnxprune.analysis.coupling import CouplingGraph, Group

_MATRIX_ROLES = (Role.PRODUCER, Role.CONSUMER)


def handler_macs(cg: CouplingGraph) -> Callable[[onnx.NodeProto], float]:
    """MACs of a node by its handler at the analysis shapes (as ``measure.stats.node_macs`` counts them)."""
    def macs_of(node: onnx.NodeProto) -> float:
        h = cg.registry.for_node(node, cg.opset)
        return float(h.macs(node, cg.shapes.get, cg.consts.get) or 0) if h is not None else 0.0
    return macs_of


def node_terms(cg: CouplingGraph, slots, macs_of: Callable[[onnx.NodeProto], float]) -> list[tuple[float, list[int]]]:
    """Each node's MACs (``macs_of``) as terms linear in each weight axis of ``slots``: one term per
    constant weight of the node with a matrix slot, its share of the node's MACs that weight's elements
    over those of every such weight of the node (a node multiplies each weight at the same positions:
    W and R of a recurrent node, whose MACs are seq x batch x (|W| + |R|)), over the spaces of ``slots``
    on that weight (an axis the slots do not list is kept whole). One weight, one term: the node's MACs."""
    axes: dict[str, dict[str, dict[int, int]]] = {}  # node -> weight -> axis -> space
    for s in slots:
        if s.role in _MATRIX_ROLES:
            axes.setdefault(s.node, {}).setdefault(s.const, {})[s.axis] = s.space
    if not axes:
        return []
    weights: dict[str, dict[str, float]] = {}  # node -> weight -> elements, over every slot of the graph
    for s in cg.slots:
        if s.role in _MATRIX_ROLES and s.node in axes and s.const not in weights.get(s.node, {}):
            shape = cg.shapes.get(s.const)
            if shape is None:
                v = cg.consts.get(s.const)
                shape = v.shape if v is not None else ()
            weights.setdefault(s.node, {})[s.const] = float(np.prod(shape, dtype=np.float64))
    out = []
    for name, per_weight in axes.items():
        node = cg.node_by_name.get(name)
        m = float(macs_of(node)) if node is not None else 0.0
        if not m:
            continue
        w = weights.get(name, {})
        total = sum(w.values())
        for const, ax in per_weight.items():
            out.append((m * (w.get(const, 0.0) / total if total > 0 else 1.0 / len(per_weight)), list(ax.values())))
    return out


def divide_by_saving(delta: np.ndarray, cost: np.ndarray) -> np.ndarray:
    """``delta / cost``; a unit whose removal saves nothing is divided by the smallest positive saving
    among ``cost``, and nothing is divided when none is positive."""
    pos = cost[cost > 0]
    if pos.size == 0:
        return delta
    return delta / np.where(cost > 0, cost, pos.min())


@dataclass
class _Term:
    """A cost linear in the width of each of ``axes`` ((group id, space id)): a node's MACs (its weight
    axes) or a tensor's elements (its channel axes)."""

    base: float
    axes: list[tuple[int, int]]


class CostModel:
    """What removing each unit of ``groups`` saves (``unit_savings``'s ``flops`` or ``memory``) at the
    current widths. A term is linear in each of its axes, so the term's value is its full-width value
    times the kept share of every axis, and unit u of g saves ``value x (1 - prod over the term's axes
    in g of (1 - u's elements there / kept elements))``; at full width this is ``unit_savings``.
    ``remove`` narrows the widths; ``savings`` is then what the next unit saves."""

    def __init__(self, cg: CouplingGraph, groups: list[Group], how: str,
                 macs_of: Callable[[onnx.NodeProto], float] | None = None):
        self.cg, self.how = cg, how
        self.groups = {g.id: g for g in groups}
        gid_of = {sid: g.id for g in groups for sid in g.spaces}
        self.terms: list[_Term] = []
        if how in ("flops", "latency"):  # latency: ``macs_of`` gives each node's measured time
            slots = [s for g in groups for s in g.slots]
            for m, sids in node_terms(cg, slots, macs_of or handler_macs(cg)):
                self.terms.append(_Term(m, [(gid_of[sid], sid) for sid in sids]))
        elif how == "memory":
            tensors: dict[str, list[tuple[int, int]]] = {}
            for g in groups:
                for sid in g.spaces:
                    tensor, _ = cg.space_key[sid]
                    if tensor not in cg.consts and cg.shapes.get(tensor):
                        tensors.setdefault(tensor, []).append((g.id, sid))
            for tensor, ax in tensors.items():
                self.terms.append(_Term(float(np.prod(cg.shapes.get(tensor), dtype=np.float64)), ax))
        self.kept = {sid: float(cg.space_size[sid]) for t in self.terms for _, sid in t.axes}
        self.inc = {g.id: {} for g in groups}  # gid -> sid -> elements of each unit in the space
        self.terms_of: dict[int, list[int]] = {g.id: [] for g in groups}
        for k, t in enumerate(self.terms):
            for gid, sid in t.axes:
                if sid not in self.inc[gid]:
                    g = self.groups[gid]
                    self.inc[gid][sid] = np.bincount(cg.unit_index(g, sid), minlength=g.size).astype(np.float64)
                if k not in self.terms_of[gid]:
                    self.terms_of[gid].append(k)
        self.alive = {g.id: np.ones(g.size, dtype=bool) for g in groups}

    def value(self, t: _Term) -> float:
        v = t.base
        for _, sid in t.axes:
            v *= self.kept[sid] / self.cg.space_size[sid]
        return v

    def total(self) -> float:
        return float(sum(self.value(t) for t in self.terms))

    def savings(self, gid: int) -> np.ndarray:
        """What each unit of ``gid`` saves now (0 for removed units; ``none``: 1 each)."""
        g = self.groups[gid]
        alive = self.alive[gid]
        if self.how not in ("flops", "memory", "latency"):
            return alive.astype(np.float64)
        out = np.zeros(g.size)
        for k in self.terms_of[gid]:
            t = self.terms[k]
            left = np.ones(g.size)
            for tg, sid in t.axes:
                if tg == gid and self.kept[sid] > 0:
                    left *= 1.0 - self.inc[gid][sid] / self.kept[sid]
            out += self.value(t) * (1.0 - left)
        return np.where(alive, out, 0.0)

    def remove(self, gid: int, units: np.ndarray) -> set[int]:
        """Remove ``units`` of ``gid``; the groups whose savings changed."""
        units = np.asarray(units, dtype=np.int64)
        self.alive[gid][units] = False
        for sid, inc in self.inc[gid].items():
            self.kept[sid] -= float(inc[units].sum())
        return {tg for k in self.terms_of[gid] for tg, _ in self.terms[k].axes} | {gid}

    def saving_of(self, gid: int, units: np.ndarray) -> float:
        """What removing ``units`` of ``gid`` (alive ones) together would save now, without removing them."""
        units = np.asarray(units, dtype=np.int64)
        if units.size == 0:
            return 0.0
        if self.how not in ("flops", "memory", "latency"):
            return float(units.size)
        out = 0.0
        for k in self.terms_of[gid]:
            t = self.terms[k]
            left = 1.0
            for tg, sid in t.axes:
                if tg == gid and self.kept[sid] > 0:
                    left *= max(0.0, 1.0 - float(self.inc[gid][sid][units].sum()) / self.kept[sid])
            out += self.value(t) * (1.0 - left)
        return out

    def restore(self, gid: int, units: np.ndarray) -> set[int]:
        """Put back ``units`` of ``gid`` (removed ones): ``remove`` undone; the groups whose savings changed."""
        units = np.asarray(units, dtype=np.int64)
        self.alive[gid][units] = True
        for sid, inc in self.inc[gid].items():
            self.kept[sid] += float(inc[units].sum())
        return {tg for k in self.terms_of[gid] for tg, _ in self.terms[k].axes} | {gid}
