"""Verification with onnxruntime: pruned P against the masked original M (the original with the
consumer weights of every removed channel zeroed, nothing else), and fidelity P against O."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from onnxprune.analysis.analyze import Analysis
from onnxprune.analysis.contract import Role
from onnxprune.analysis.coupling import CouplingGraph
from onnxprune.ir.tensors import constant_node_value, tensor_value
from onnxprune.planning.plan import Plan
from onnxprune.rewrite.apply import rewrite
from onnxprune.runtime.session import make_session, run_session

DEFAULT_TOL = 1e-4


def masked_original(model: onnx.ModelProto, cg: CouplingGraph, plan: Plan) -> onnx.ModelProto:
    zero: dict[str, list[tuple[int, np.ndarray]]] = {}
    for gp in plan.pruned():
        g = cg.groups[gp.group]
        mask = np.ones(g.size, dtype=bool)
        mask[gp.keep] = False
        roles = (Role.CONSUMER, Role.PRODUCER, Role.PARAM) if g.mask_producers else (Role.CONSUMER,)
        for s in g.slots:
            if s.role not in roles:
                continue
            removed = np.flatnonzero(mask[cg.unit_index(g, s.space)])
            zero.setdefault(s.const, []).append((s.axis, removed))
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for init in m.graph.initializer:
        if init.name in zero:
            arr = np.array(tensor_value(init), copy=True)
            for ax, idx in zero[init.name]:
                sl = [slice(None)] * arr.ndim
                sl[ax] = idx
                arr[tuple(sl)] = 0
            init.CopyFrom(numpy_helper.from_array(arr, init.name))
    for node in m.graph.node:
        if node.op_type == "Constant" and node.output and node.output[0] in zero:
            arr = constant_node_value(node).copy()
            for ax, idx in zero[node.output[0]]:
                sl = [slice(None)] * arr.ndim
                sl[ax] = idx
                arr[tuple(sl)] = 0
            del node.attribute[:]
            node.attribute.append(onnx.helper.make_attribute("value", numpy_helper.from_array(arr)))
    return m


@dataclass
class OutputCheck:
    name: str
    rel_error: float
    fidelity: float
    tol: float
    shape: tuple[int, ...]

    @property
    def passed(self) -> bool:
        return bool(np.isfinite(self.rel_error) and self.rel_error <= self.tol)


@dataclass
class Verification:
    ep: str
    tol: float
    outputs: list[OutputCheck] = field(default_factory=list)
    exact: bool = True  # False when only the exact part of the plan could be checked
    note: str = ""

    @property
    def passed(self) -> bool:
        return bool(self.outputs) and all(o.passed for o in self.outputs)

    def to_json(self) -> dict:
        return {"ep": self.ep, "tolerance": self.tol, "passed": self.passed, "exact": self.exact, "note": self.note,
                "outputs": [{"name": o.name, "rel_error": o.rel_error, "fidelity_rel_error": o.fidelity,
                             "min_passing_tolerance": o.rel_error, "passed": o.passed, "shape": list(o.shape)}
                            for o in self.outputs]}


def rel_error(a: np.ndarray, ref: np.ndarray) -> float:
    a = np.asarray(a, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if a.shape != ref.shape:
        return float("inf")
    scale = float(np.max(np.abs(ref))) if ref.size else 0.0
    diff = float(np.max(np.abs(a - ref))) if ref.size else 0.0
    if scale == 0.0:
        return 0.0 if diff == 0.0 else float("inf")
    return diff / scale


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray], ep: str) -> tuple[list[np.ndarray], list[str], str]:
    sess, used = make_session(model, ep, precise=True)
    names = [o.name for o in sess.get_outputs()]
    return run_session(sess, feeds), names, used


def compare(original: onnx.ModelProto, masked: onnx.ModelProto, pruned: onnx.ModelProto,
            feeds: dict[str, np.ndarray], ep: str = "auto", tol: float = DEFAULT_TOL) -> Verification:
    outs_o, names, used = run(original, feeds, ep)
    outs_m, _, _ = run(masked, feeds, ep)
    outs_p, _, _ = run(pruned, feeds, ep)
    v = Verification(ep=used, tol=tol)
    for name, o, m, p in zip(names, outs_o, outs_m, outs_p, strict=True):
        v.outputs.append(OutputCheck(name, rel_error(p, m), rel_error(p, o), tol, tuple(np.shape(p))))
    return v


def verify_plan(an: Analysis, plan: Plan, pruned: onnx.ModelProto, feeds: dict[str, np.ndarray],
                ep: str = "auto", tol: float = DEFAULT_TOL) -> Verification:
    """P vs masked original. Approximate groups change the function: they are checked for
    fidelity only, and the exact groups are verified on a model pruned by the exact part alone."""
    approx = [gp for gp in plan.pruned() if gp.approximate]
    if not approx:
        return compare(an.model, masked_original(an.model, an.cg, plan), pruned, feeds, ep, tol)
    exact = plan.exact_only()
    p_exact = rewrite(an.model, an.cg, exact) if exact.pruned() else an.model
    v = compare(an.model, masked_original(an.model, an.cg, exact), p_exact, feeds, ep, tol)
    full = compare(an.model, an.model, pruned, feeds, ep, float("inf"))
    for o, f in zip(v.outputs, full.outputs, strict=True):
        o.fidelity = f.fidelity
        o.shape = f.shape
    v.exact = False
    v.note = (f"{len(approx)} approximate group(s) pruned: exact groups verified against the masked "
              f"original; fidelity is that of the full pruned model")
    return v

