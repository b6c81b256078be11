"""Verification with onnxruntime: pruned P against the masked original M (the original with the
consumer weights of every removed channel zeroed, nothing else), and fidelity P against O. A quantized
weight is "zeroed" to its zero point, the value that dequantizes to exactly 0 (per channel or per
tensor, ``CouplingGraph.zeroed``): integer kernels then add exactly nothing for a removed channel.

Each output is judged by its relative error (max |P - M| over max |M|). An output made by a saturating
elementwise op (Sigmoid, HardSigmoid, Tanh, Softsign, Softmax, Clip, Relu) that fails that rule is judged
a second way, on the op's input (the pre-activation): when the op squashes its input into a flat region,
max |M| can be as small as the kernel's own rounding (onnxruntime's Sigmoid has an absolute error of
~1.6e-7), so float noise reads as a relative error near 1 while every tensor before it matches. That
output passes when (1) the same op with the same inputs and attributes produces it in P and in M,
(2) its input passes the same relative tolerance, and (3) every element's |ΔY| is explained by its input:
``|ΔY| <= L·|ΔX| + 4·eps·(span + |Y|)`` with L the op's Lipschitz constant and ``span`` the output range
its kernel rounds against (Softmax: ``|ΔY| <= Y·expm1(2·max|ΔX|)`` plus the same rounding). Nothing is
loosened: a wrong pruned model changes the input of its last op as much as any other tensor.

An output that fails both rules in a model with integer products of a uint8 activation and an int8
weight (ConvInteger, MatMulInteger, QLinearConv, QLinearMatMul, QGemm: the handlers'
``integer_products``) is judged a third way, on the integers ONNX defines. onnxruntime's x86 u8s8
kernels without VNNI (VPMADDUBSW) saturate pairwise int16 sums, so there the masked and the pruned
model, which pair their terms differently, round differently (seen: rel. error 3.7e-2 on ResNet-18
quantized by ``quantize_dynamic``). Both models are re-expressed with every such weight and its zero
point as uint8 (``w + 128``, ``zp + 128``: ``w - zp`` unchanged), a form whose kernels do not saturate,
and compared again (``integer_exact``); the report also gives how far this host computes the original
itself from its exact integers. Nothing is loosened here either: the re-expression is the same map on
both models and changes no integer the spec defines.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from onnxprune.analysis.analyze import Analysis
from onnxprune.analysis.contract import Role
from onnxprune.analysis.coupling import CouplingGraph
from onnxprune.handlers import REGISTRY
from onnxprune.ir.attrs import get_attr
from onnxprune.ir.graph import (
    all_names,
    default_opset,
    fresh_name,
    nested_graphs,
    producers,
    used_names,
    weightless,
)
from onnxprune.ir.tensors import constant_node_value, tensor_value
from onnxprune.planning.plan import Plan
from onnxprune.rewrite.apply import rewrite, scopes
from onnxprune.runtime.session import make_session, rel_error, run_session

DEFAULT_TOL = 1e-4
ROUNDING_ULPS = 4  # kernel rounding allowed per evaluation pair, in units of the output dtype's eps
# op -> (Lipschitz constant, output span its kernel rounds against); HardSigmoid's come from alpha/beta
SATURATING: dict[str, tuple[float, float]] = {
    "Sigmoid": (0.25, 1.0), "Tanh": (1.0, 1.0), "Softsign": (1.0, 1.0), "Softmax": (1.0, 1.0),
    "HardSigmoid": (1.0, 1.0), "Clip": (1.0, 0.0), "Relu": (1.0, 0.0)}


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
    graphs = scopes(m)  # weights inside If branches are zeroed where they live
    # "zero" is the value that means zero: a quantized constant's zero point (``CouplingGraph.zeroed``)
    for init in [i for sub in graphs for i in sub.initializer]:
        if init.name in zero:
            arr = cg.zeroed(init.name, tensor_value(init), zero[init.name])
            init.CopyFrom(numpy_helper.from_array(arr, init.name))
    for node in [n for sub in graphs for n in sub.node]:
        if node.op_type == "Constant" and node.output and node.output[0] in zero:
            arr = cg.zeroed(node.output[0], constant_node_value(node), zero[node.output[0]])
            del node.attribute[:]
            node.attribute.append(onnx.helper.make_attribute("value", numpy_helper.from_array(arr)))
    return m


@dataclass
class PreActivation:
    """An output judged on the input of the saturating op that makes it (see the module docstring)."""
    op: str
    input: str
    rel_error: float  # of the op's input, P vs M
    max_abs_diff: float  # |ΔY| of the output at its least explained element
    allowed_abs_diff: float  # what |ΔX| and the kernel's rounding allow there
    tol: float

    @property
    def explained(self) -> bool:
        return bool(np.isfinite(self.max_abs_diff) and self.max_abs_diff <= self.allowed_abs_diff)

    @property
    def passed(self) -> bool:
        return bool(np.isfinite(self.rel_error) and self.rel_error <= self.tol and self.explained)

    def to_json(self) -> dict:
        return {"op": self.op, "input": self.input, "rel_error": self.rel_error, "max_abs_diff": self.max_abs_diff,
                "allowed_abs_diff": self.allowed_abs_diff, "explained": self.explained, "passed": self.passed}


@dataclass
class IntegerExact:
    """An output judged on the exact integers (see the module docstring): P vs M, both with their int8
    weights re-expressed as uint8, and the original as this host computes it vs its exact integers."""
    weights: int  # int8 weights re-expressed in the masked original
    rel_error: float  # P vs M, re-expressed
    host_rel_error: float  # the original as run here vs the original re-expressed
    tol: float

    @property
    def passed(self) -> bool:
        return bool(np.isfinite(self.rel_error) and self.rel_error <= self.tol)

    def to_json(self) -> dict:
        return {"weights": self.weights, "rel_error": self.rel_error, "host_rel_error": self.host_rel_error,
                "passed": self.passed}


@dataclass
class OutputCheck:
    name: str
    rel_error: float
    fidelity: float
    tol: float
    shape: tuple[int, ...]
    saturation: PreActivation | None = None  # set when the direct rule failed on a saturating op's output
    integer: IntegerExact | None = None  # set when both failed in a model with u8 x int8 integer products

    @property
    def direct_passed(self) -> bool:
        return bool(np.isfinite(self.rel_error) and self.rel_error <= self.tol)

    @property
    def saturation_passed(self) -> bool:
        return self.saturation is not None and self.saturation.passed

    @property
    def passed(self) -> bool:
        return self.direct_passed or self.saturation_passed or (self.integer is not None and self.integer.passed)

    @property
    def rule(self) -> str:
        """The rule that decided: ``relative`` (the output's own error), ``pre-activation`` or
        ``integer-exact``."""
        if self.direct_passed:
            return "relative"
        if self.integer is not None and not self.saturation_passed:
            return "integer-exact"
        return "relative" if self.saturation is None else "pre-activation"

    @property
    def min_passing_tol(self) -> float:
        """The smallest tolerance at which the rules evaluated would pass this output."""
        s = self.saturation
        best = min(self.rel_error, s.rel_error) if s is not None and s.explained else self.rel_error
        return min(best, self.integer.rel_error) if self.integer is not None else best

    @property
    def reason(self) -> str:
        """Why the pre-activation or the integer-exact rule decided (empty when the output's own error did)."""
        s = self.saturation
        if self.rule == "integer-exact":
            i = self.integer
            return (f"integer products judged on their exact integers, {i.weights} int8 weight(s) re-expressed as "
                    f"uint8: rel. error {i.rel_error:.3e}; this host computes the original itself "
                    f"{i.host_rel_error:.1e} from them (u8s8 kernels that saturate)")
        if s is None or self.direct_passed:
            return ""
        words = f"saturated {s.op}; judged on its input '{s.input}': rel. error {s.rel_error:.3e}"
        if not s.explained:
            return (f"{words}; output |Δ| {s.max_abs_diff:.1e} > {s.allowed_abs_diff:.1e}, more than its "
                    f"input's |Δ| and rounding explain")
        return f"{words}; output |Δ| {s.max_abs_diff:.1e} <= {s.allowed_abs_diff:.1e} (L·|Δinput| + rounding)"


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
                             "min_passing_tolerance": o.min_passing_tol, "passed": o.passed, "shape": list(o.shape),
                             "rule": o.rule, "reason": o.reason,
                             "pre_activation": o.saturation.to_json() if o.saturation else None,
                             "integer_exact": o.integer.to_json() if o.integer else None}
                            for o in self.outputs]}


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray], ep: str) -> tuple[list[np.ndarray], list[str], str]:
    sess, used = make_session(model, ep, precise=True)
    names = [o.name for o in sess.get_outputs()]
    return run_session(sess, feeds), names, used


def saturating_producers(masked: onnx.ModelProto, pruned: onnx.ModelProto,
                         names: list[str]) -> dict[str, onnx.NodeProto]:
    """Of the outputs ``names``, those made by the same saturating op, with the same inputs and
    attributes, in both models, and the node (of ``masked``) making each; the op's input must be
    computed in both (not a graph input or a constant)."""
    prod_m, prod_p = producers(masked.graph), producers(pruned.graph)
    found: dict[str, onnx.NodeProto] = {}
    for name in names:
        m, p = prod_m.get(name), prod_p.get(name)
        if m is None or p is None or m.op_type not in SATURATING or m.domain not in ("", "ai.onnx"):
            continue
        same = (m.op_type == p.op_type and m.domain == p.domain and list(m.input) == list(p.input)
                and sorted(a.SerializeToString() for a in m.attribute)
                == sorted(a.SerializeToString() for a in p.attribute))
        if same and m.input and m.input[0] in prod_m and m.input[0] in prod_p:
            found[name] = m
    return found


def allowance(node: onnx.NodeProto, opset: int, xp: np.ndarray, xm: np.ndarray, yp: np.ndarray,
              ym: np.ndarray) -> np.ndarray:
    """Per element, how far ``node``'s output may move (P vs M) given how far its input moved."""
    lip, span = SATURATING[node.op_type]
    if node.op_type == "HardSigmoid":
        lip, span = abs(get_attr(node, "alpha", opset)), 1.0 + abs(get_attr(node, "beta", opset))
    dx = np.abs(np.asarray(xp, np.float64) - np.asarray(xm, np.float64))
    y = np.maximum(np.abs(np.asarray(yp, np.float64)), np.abs(np.asarray(ym, np.float64)))
    rounding = ROUNDING_ULPS * float(np.finfo(np.asarray(ym).dtype).eps) * (span + y)
    if node.op_type == "Softmax":  # y_P / y_M = e^d_i / sum_j y_j e^d_j lies in [e^-2δ, e^2δ], δ = max |ΔX|
        return y * np.expm1(2.0 * float(dx.max(initial=0.0))) + rounding
    return lip * dx + rounding


def _exposing(model: onnx.ModelProto, names: list[str], feeds: dict[str, np.ndarray], ep: str) -> dict[str, np.ndarray]:
    """``names`` (graph outputs or intermediate tensors) of one run of ``model``. Intermediate ones are
    graph outputs only while the session is made: the model, possibly large, is not copied."""
    listed = {o.name for o in model.graph.output}
    extra = [n for n in dict.fromkeys(names) if n not in listed]
    model.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in extra)
    try:
        sess, _ = make_session(model, ep, precise=True)
    finally:
        if extra:
            del model.graph.output[-len(extra):]
    return dict(zip(names, run_session(sess, feeds, list(names)), strict=True))


def judge_saturated(masked: onnx.ModelProto, pruned: onnx.ModelProto, feeds: dict[str, np.ndarray], ep: str,
                    checks: list[OutputCheck]) -> None:
    """Judge the failing outputs made by a saturating op on that op's input (``OutputCheck.saturation``).
    Both models run once more with those inputs exposed; the outputs' differences are taken from the
    same run, so a fusion the exposed tensor prevents changes both sides alike."""
    nodes = saturating_producers(masked, pruned, [c.name for c in checks])
    if not nodes:
        return
    names = list(dict.fromkeys([*nodes, *(n.input[0] for n in nodes.values())]))
    got_m, got_p = _exposing(masked, names, feeds, ep), _exposing(pruned, names, feeds, ep)
    opset = default_opset(masked) or 1
    for c in checks:
        node = nodes.get(c.name)
        if node is None:
            continue
        x = node.input[0]
        xm, xp, ym, yp = got_m[x], got_p[x], got_m[c.name], got_p[c.name]
        if not np.issubdtype(ym.dtype, np.floating):
            continue
        if xm.shape != xp.shape or ym.shape != yp.shape or xm.shape != ym.shape:
            c.saturation = PreActivation(node.op_type, x, float("inf"), float("inf"), 0.0, c.tol)
            continue
        diff = np.abs(np.asarray(yp, np.float64) - np.asarray(ym, np.float64))
        allowed = allowance(node, opset, xp, xm, yp, ym)
        if not (np.isfinite(diff).all() and np.isfinite(allowed).all()):
            at_diff, at_allowed = float("inf"), 0.0
        elif diff.size:  # the element least explained: the largest |ΔY| / allowance
            ratio = np.divide(diff, allowed, out=np.where(diff > 0, np.inf, 0.0), where=allowed > 0)
            worst = np.unravel_index(int(np.argmax(ratio)), diff.shape)
            at_diff, at_allowed = float(diff[worst]), float(allowed[worst])
        else:
            at_diff = at_allowed = 0.0
        c.saturation = PreActivation(node.op_type, x, rel_error(xp, xm), at_diff, at_allowed, c.tol)


_INT8, _UINT8 = onnx.TensorProto.INT8, onnx.TensorProto.UINT8


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    """Tensor name -> element type, from onnx's type inference (empty where it fails)."""
    try:
        g = onnx.shape_inference.infer_shapes(weightless(model)).graph
    except Exception:  # noqa: BLE001 - an op onnx cannot infer: no integer-exact rule for this model
        return {}
    out = {t.name: t.data_type for t in g.initializer}
    for vi in [*g.input, *g.value_info, *g.output]:
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
            out[vi.name] = vi.type.tensor_type.elem_type
    return out


def integer_exact(model: onnx.ModelProto, registry=REGISTRY) -> tuple[onnx.ModelProto, int] | None:
    """``model`` with every int8 constant weight of an integer product whose activation is uint8 (the
    handlers' ``integer_products``), and its zero point, re-expressed as uint8 (both + 128, an absent
    zero point becoming 128): the same integers, computed by kernels that do not saturate. A weight or
    zero point read by anything else (another op, another role, a subgraph) is left as it is. Returns the
    copy and how many weights it re-expressed, or None when there is none."""
    g = model.graph
    opset = default_opset(model) or 1
    init = {t.name: t for t in g.initializer}
    types = _elem_types(model)
    inside = set().union({o.name for o in (*g.output, *g.input)}, *(used_names(sub) for sub in nested_graphs(g)))
    uses: dict[str, list[tuple[int, int]]] = {}  # name -> (node index, input index) of every read
    for k, n in enumerate(g.node):
        for i, t in enumerate(n.input):
            if t:
                uses.setdefault(t, []).append((k, i))
    products: list[tuple[int, int, int]] = []  # (node, weight input, zero-point input)
    for k, n in enumerate(g.node):
        for a, w, z in registry.facts_of(n, opset).integer_products:
            if max(a, w) >= len(n.input) or types.get(n.input[a]) != _UINT8:
                continue
            wn, zn = n.input[w], (n.input[z] if z < len(n.input) else "")
            if wn in init and init[wn].data_type == _INT8 and (not zn or (zn in init and init[zn].data_type == _INT8)):
                products.append((k, w, z))
    while True:  # keep the products whose weight and zero point are read by kept products' roles only
        roles = {(k, w) for k, w, _ in products} | {(k, z) for k, _, z in products}
        kept = [(k, w, z) for k, w, z in products
                if all(set(uses[name]) <= roles and name not in inside
                       for name in (g.node[k].input[w], g.node[k].input[z] if z < len(g.node[k].input) else "")
                       if name)]
        if len(kept) == len(products):
            break
        products = kept
    if not products:
        return None
    out = onnx.ModelProto()
    out.CopyFrom(model)
    oinit = {t.name: t for t in out.graph.initializer}
    taken = all_names(out.graph)
    done: set[str] = set()
    for k, w, z in products:
        node = out.graph.node[k]
        zn = node.input[z] if z < len(node.input) else ""
        for name in (node.input[w], zn):
            if name and name not in done:
                t = oinit[name]
                shifted = (tensor_value(t).astype(np.int16) + 128).astype(np.uint8)
                t.CopyFrom(numpy_helper.from_array(shifted, name))
                done.add(name)
        if not zn:
            zn = fresh_name(f"{node.input[w]}__uint8_zero_point", taken)
            out.graph.initializer.append(numpy_helper.from_array(np.array(128, np.uint8), zn))
            while len(node.input) <= z:
                node.input.append("")
            node.input[z] = zn
    return out, len({out.graph.node[k].input[w] for k, w, _ in products})


def judge_integer_exact(original: onnx.ModelProto, masked: onnx.ModelProto, pruned: onnx.ModelProto,
                        feeds: dict[str, np.ndarray], ep: str, outs_o: list, checks: list[OutputCheck]) -> None:
    """Judge the failing outputs of a model with u8 x int8 integer products on their exact integers
    (``OutputCheck.integer``, see the module docstring)."""
    wm, wp, wo = integer_exact(masked), integer_exact(pruned), integer_exact(original)
    if wm is None or wp is None or wo is None:
        return
    got_m, names, _ = run(wm[0], feeds, ep)
    got_p, _, _ = run(wp[0], feeds, ep)
    got_o, _, _ = run(wo[0], feeds, ep)
    by = {n: k for k, n in enumerate(names)}
    for c in checks:
        k = by[c.name]
        c.integer = IntegerExact(wm[1], _rel(got_p[k], got_m[k]), _rel(outs_o[k], got_o[k]), c.tol)


def _rel(a, ref) -> float:
    """``rel_error`` of two outputs as onnxruntime returns them (tensors, sequences of tensors, or
    sequences of maps such as ZipMap's, compared key by key; other keys in the two: inf)."""
    xa, xr = comparable(a), comparable(ref)
    if xa[1] != xr[1]:
        return float("inf")
    return rel_error(xa[0], xr[0])


def comparable(value) -> tuple[np.ndarray, tuple]:
    """An output as a float array and what it must match in: a tensor as it is; a sequence of
    tensors stacked (their shapes as the key); a sequence of maps (ZipMap's class -> probability per
    sample) as one row per map, the keys sorted (the keys as the key)."""
    if isinstance(value, np.ndarray):
        return value, ()
    if isinstance(value, (list, tuple)) and all(isinstance(v, dict) for v in value):
        keys = tuple(sorted({k for v in value for k in v}, key=repr))
        if any(len(v) != len(keys) for v in value):
            return np.full((len(value), len(keys)), np.nan), keys + ("<missing>",)
        return np.array([[float(v[k]) for k in keys] for v in value], np.float64).reshape(len(value), len(keys)), keys
    if isinstance(value, (list, tuple)) and all(isinstance(v, np.ndarray) for v in value):
        shapes = tuple(v.shape for v in value)
        flat = [np.asarray(v, np.float64).ravel() for v in value]
        return (np.concatenate(flat) if flat else np.zeros(0)), shapes
    return np.asarray(value), ()


def compare(original: onnx.ModelProto, masked: onnx.ModelProto, pruned: onnx.ModelProto,
            feeds: dict[str, np.ndarray], ep: str = "auto", tol: float = DEFAULT_TOL) -> Verification:
    outs_o, names, used = run(original, feeds, ep)
    outs_m, _, _ = run(masked, feeds, ep)
    outs_p, _, _ = run(pruned, feeds, ep)
    v = Verification(ep=used, tol=tol)
    for name, o, m, p in zip(names, outs_o, outs_m, outs_p, strict=True):
        v.outputs.append(OutputCheck(name, _rel(p, m), _rel(p, o), tol, tuple(np.shape(comparable(p)[0]))))
    failing = [c for c in v.outputs if not c.passed]
    if failing:
        judge_saturated(masked, pruned, feeds, ep, failing)
    failing = [c for c in v.outputs if not c.passed]
    if failing:
        judge_integer_exact(original, masked, pruned, feeds, ep, outs_o, failing)
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

