"""Soft pruning (``--soft``, Torch-Pruning's soft mode): the plan applied as zeroed weights in an
unchanged graph, for users who want to inspect the selection or retrain with the mask.

The graph, its nodes and every initializer's shape stay as they are; for every unit a plan removes,
these weights are zeroed:

- every consumer slot (the input-channel axis of the nodes that read the channel): this alone makes the
  model compute what the pruned one computes, as the masked original of ``measure.verify`` does;
- every producer slot (the filters that write the channel), and the biases (``PARAM``) of producer
  nodes and the scale and bias of BatchNormalization/InstanceNormalization/LayerNormalization in the
  group: what the pruned model no longer has, so a removed channel is exactly zero after its
  producer and normalization, as Torch-Pruning's soft mode zeroes a group's out- and in-channels;
- in a group whose exactness needs its producers masked (``Group.mask_producers``: a q/k contraction
  with no consumer weight), every ``PARAM`` slot too, as the masked original does.

A group whose channels some node divides by, or takes the logarithm or a power of (``Div``,
``Reciprocal``, ``Log``, ``Pow`` reading one of its tensors), gets its consumer slots zeroed only: a
zero channel there would become an infinity, and an infinity times a zero consumer weight is NaN.
``soft_prune(..., producers=False)`` zeroes the consumer slots only everywhere (the masked original).

A quantized weight is zeroed to its zero point (``CouplingGraph.zeroed``), the value meaning 0.
Never zeroed: running statistics (``STAT``: a zero variance divides by ``sqrt(eps)``) and the
constants of elementwise ops (a divisor would become zero). The soft model equals the pruned one on
exact groups (up to float summation order); an approximate group's soft model is its masked original.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from onnxprune.analysis.analyze import Analysis
from onnxprune.analysis.contract import Role
from onnxprune.analysis.coupling import CouplingGraph, Group, Slot
from onnxprune.ir.tensors import constant_node_value, tensor_value
from onnxprune.planning.plan import Plan
from onnxprune.rewrite.apply import scopes, validate

_NORMS = ("BatchNormalization", "InstanceNormalization", "LayerNormalization")
_POLES = ("Div", "Reciprocal", "Log", "Pow")  # a zero channel read by one of these may become infinite


def zeroes_producers(cg: CouplingGraph, g: Group) -> bool:
    """Whether soft pruning may zero the producers of ``g``: no node divides by, or takes the
    logarithm or a power of, one of its computed tensors."""
    for sid in g.spaces:
        tensor, _ = cg.space_key[sid]
        if tensor in cg.consts:
            continue
        if any(n.op_type in _POLES for n in cg.consumers_of.get(tensor, ())):
            return False
    return True


def _zeroed(cg: CouplingGraph, g: Group, s: Slot, producer_nodes: set[str]) -> bool:
    if s.role == Role.CONSUMER:
        return True
    if not producer_nodes and not g.mask_producers:
        return False  # consumers only (producers=False, or a group read by a pole)
    if s.role == Role.PRODUCER:
        return True
    if s.role == Role.STAT:
        return False
    if g.mask_producers and s.role == Role.PARAM:
        return True
    node = cg.node_by_name.get(s.node)
    if node is not None and node.op_type in _NORMS:
        return s.role in (Role.SCALE, Role.PARAM)
    return s.role == Role.PARAM and s.node in producer_nodes


def soft_zeros(cg: CouplingGraph, plan: Plan, producers: bool = True) -> dict[str, list[tuple[int, np.ndarray]]]:
    """constant name -> (axis, indices to zero) for every removed unit of ``plan`` (module docstring)."""
    zero: dict[str, list[tuple[int, np.ndarray]]] = {}
    for gp in plan.pruned():
        g = cg.groups[gp.group]
        removed = np.ones(g.size, dtype=bool)
        removed[gp.keep] = False
        producer_nodes = ({s.node for s in g.slots if s.role == Role.PRODUCER}
                          if producers and zeroes_producers(cg, g) else set())
        for s in g.slots:
            if _zeroed(cg, g, s, producer_nodes):
                idx = np.flatnonzero(removed[cg.unit_index(g, s.space)])
                zero.setdefault(s.const, []).append((s.axis, idx))
    return zero


def soft_prune(cut: Analysis, plan: Plan, producers: bool = True) -> onnx.ModelProto:
    """``cut.model`` with the weights of every unit ``plan`` removes zeroed (module docstring); the plan
    is validated first, and nothing else changes (weights inside If branches are zeroed where they live).
    ``cut``: the analysis the plan was cut from (``pipeline.run``'s compensated one when compensating)."""
    cg = cut.cg
    validate(cg, plan)
    zero = soft_zeros(cg, plan, producers)
    m = onnx.ModelProto()
    m.CopyFrom(cut.model)
    graphs = scopes(m)
    for init in [i for sub in graphs for i in sub.initializer]:
        if init.name in zero:
            init.CopyFrom(numpy_helper.from_array(cg.zeroed(init.name, tensor_value(init), zero[init.name]), init.name))
    for node in [n for sub in graphs for n in sub.node]:
        if node.op_type == "Constant" and node.output and node.output[0] in zero:
            arr = cg.zeroed(node.output[0], constant_node_value(node), zero[node.output[0]])
            del node.attribute[:]
            node.attribute.append(onnx.helper.make_attribute("value", numpy_helper.from_array(arr)))
    return m
