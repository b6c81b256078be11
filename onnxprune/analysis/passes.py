"""Function-preserving passes run before analysis. Each returns a :class:`PassResult`: the model
and one line per change (shown with ``-v`` and kept in ``--report``).

- ``check_input``: ``onnx.checker.check_model(full_check=True)`` on the input; value_info entries
  contradicting shape inference (stale shape annotations: jax2onnx writes NHWC ones for NCHW tensors)
  are dropped and re-inferred; any other fault is kept (``PassResult.fault``) for the rewrite to
  refuse with (exit 2, the checker's reason);
- ``convert_opset``: a model below opset 11 is converted to opset 13 with ``onnx.version_converter``,
  kept only when the converted model computes the same outputs as the original on generated inputs
  (relative error <= ``EXACT_REL``); otherwise it is refused (exit 2). Later stages, ``--verify``
  and the fidelity column see the converted model: it is the function-equal original;
- ``inline_functions``: inline local ONNX functions;
- ``name_nodes``: give every node a unique name (plans and reports refer to nodes by name);
- ``fold_identity_constants``: ``Identity(constant)`` becomes a constant of its own (the legacy
  exporter deduplicates equal initializers behind Identity nodes, which would couple unrelated layers
  whose biases are zero);
- ``untie_constants``: a small constant used by several nodes gets one copy per use, so each use is
  sliced for its own need. Large constants used by several nodes (real weight tying) stay tied;
- ``fold_static_shapes``: shape computations proven not to depend on dynamic input sizes
  (``analysis.static``) become constants (Reshape targets, Slice bounds, head counts), so handlers can
  read and rewrite them; everything else stays computed;
- ``add_bias_inputs`` (only when asked, for compensation): a zero bias for every Conv, Gemm and
  constant-weight MatMul without one, so removed channels' contributions have a constant to go to.

``check_input``, ``convert_opset`` and ``inline_functions`` are functional (a new model when they
change anything); every other pass works in place on the model it is given, and :func:`normalize`
copies first unless the caller owns the model.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper, version_converter

from onnxprune.analysis.static import proven_static
from onnxprune.errors import UserError
from onnxprune.ir import graph as gr
from onnxprune.ir.io import MIN_OPSET
from onnxprune.ir.tensors import ConstantTable
from onnxprune.runtime.inputs import make_inputs
from onnxprune.runtime.probe import run_probe
from onnxprune.runtime.session import rel_error, run_model

log = logging.getLogger(__name__)

UNTIE_MAX_ELEMENTS = 1 << 22
CONVERT_TO = 13  # the opset models below MIN_OPSET are converted to
# An exact conversion only respells ops (attributes become inputs, Softmax's 2-D coercion becomes an
# axis, ...) and runs the same kernels: the nine opset-9 zoo classics convert with an error of exactly
# 0. 1e-6 (about 8 float32 ulps of the outputs' scale) still lets a kernel sum in another order, while
# a changed constant, axis or broadcast shows up orders of magnitude above it.
EXACT_REL = 1e-6


@dataclass(frozen=True)
class PassResult:
    model: onnx.ModelProto
    changes: tuple[str, ...] = ()  # one line per change, for -v and --report
    fault: str | None = None  # what a check of the pass found and could not repair (the caller decides)


Pass = Callable[[onnx.ModelProto], PassResult]


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:300] if lines else type(exc).__name__


def _check_error(model: onnx.ModelProto) -> str | None:
    """The reason ``onnx.checker.check_model(full_check=True)`` refuses ``model`` (None: it passes),
    checked on a copy without the large weights' data (``ir.graph.checkable``)."""
    try:
        onnx.checker.check_model(gr.checkable(model), full_check=True)
    except Exception as exc:  # noqa: BLE001 - the checker raises several types
        return _first_line(exc)
    return None


def _dims_text(vi: onnx.ValueInfoProto) -> str:
    dims = gr.value_dims(vi)
    return "?" if dims is None else "x".join(str(d) if d is not None else "?" for d in dims) or "scalar"


def _contradicts(declared: onnx.ValueInfoProto, inferred: onnx.ValueInfoProto) -> bool:
    """Whether a declared tensor type disagrees with the inferred one: another element type, rank or
    fixed size (a symbolic or unknown dim agrees with anything)."""
    a, b = declared.type, inferred.type
    if not (a.HasField("tensor_type") and b.HasField("tensor_type")):
        return False
    ta, tb = a.tensor_type, b.tensor_type
    if ta.elem_type and tb.elem_type and ta.elem_type != tb.elem_type:
        return True
    if not (ta.HasField("shape") and tb.HasField("shape")):
        return False
    da, db = ta.shape.dim, tb.shape.dim
    if len(da) != len(db):
        return True
    return any(x.HasField("dim_value") and y.HasField("dim_value") and x.dim_value != y.dim_value
               for x, y in zip(da, db, strict=True))


def stale_value_info(model: onnx.ModelProto) -> list[tuple[onnx.ValueInfoProto, onnx.ValueInfoProto]]:
    """(declared, inferred) for every main-graph value_info entry that contradicts what shape
    inference derives from the model without any value_info (``_contradicts``)."""
    bare = gr.checkable(model)
    del bare.graph.value_info[:]
    try:
        inferred = onnx.shape_inference.infer_shapes(bare)
    except Exception:  # noqa: BLE001 - shape inference raises many types; nothing to compare with
        return []
    derived = {vi.name: vi for vi in list(inferred.graph.value_info) + list(inferred.graph.output)}
    return [(vi, derived[vi.name]) for vi in model.graph.value_info
            if vi.name in derived and _contradicts(vi, derived[vi.name])]


def check_input(model: onnx.ModelProto) -> PassResult:
    """The full ONNX checker on the input. The one fault repaired: value_info entries that
    contradict shape inference (stale shape annotations), dropped (in a copy) when the model passes
    the checker without them; the analysis infers those shapes again. Any other fault is the
    result's ``fault`` (the checker's reason): the model is still analysed (onnxruntime runs models
    the checker refuses, e.g. its own LayerNormalization below opset 17), and a rewrite refuses it as
    the input's fault (``rewrite.check.apply_plan``, exit 2), never as one of the pruned model."""
    err = _check_error(model)
    if err is None:
        return PassResult(model)
    stale = stale_value_info(model)
    if not stale:
        return PassResult(model, fault=err)
    names = {d.name for d, _ in stale}
    out = onnx.ModelProto()
    out.CopyFrom(model)
    keep = [vi for vi in out.graph.value_info if vi.name not in names]
    del out.graph.value_info[:]
    out.graph.value_info.extend(keep)
    d, i = stale[0]
    many = len(stale) > 1
    change = (f"dropped {len(stale)} stale value_info entr{'ies' if many else 'y'} that contradict{'' if many else 's'} "
              f"shape inference (e.g. '{d.name}': declared {_dims_text(d)}, inferred {_dims_text(i)}) and inferred "
              "the shapes again")
    return PassResult(out, (change,), _check_error(out))


INVALID_INPUT = "the input model is invalid (it fails the ONNX checker before any pruning): "


def _output_error(a: np.ndarray, b: np.ndarray) -> float:
    """Relative error of output ``a`` against ``b`` (``rel_error``); elements equal in both (NaN and
    infinities included) count as equal, any other non-finite difference and any difference in an
    integer or boolean output is infinite."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or a.dtype != b.dtype:
        return float("inf")
    if not np.issubdtype(b.dtype, np.floating):
        return 0.0 if np.array_equal(a, b) else float("inf")
    same = (a == b) | (np.isnan(a) & np.isnan(b))
    if bool(same.all()):
        return 0.0
    if not (np.isfinite(a[~same]).all() and np.isfinite(b[~same]).all()):
        return float("inf")
    b2 = np.where(np.isfinite(b), b, 0)
    return rel_error(np.where(same, b2, a), b2)


def convert_opset(model: onnx.ModelProto, input_shapes=None, input_arrays=None) -> PassResult:
    """Below opset ``MIN_OPSET`` (7..10; load refuses less): the model converted to ``CONVERT_TO`` with
    ``onnx.version_converter``, when that is exact: original and converted run in onnxruntime (CPU,
    unoptimized) on the same inputs (the analysis sizes, or the ``--input`` arrays) and every output
    must agree within ``EXACT_REL`` (relative error); otherwise a UserError (exit 2). An IR < 4 model
    lists its initializers as graph inputs because that IR requires it (onnxruntime treats them as
    constants); the converted model, at the IR version opset 13 needs, no longer lists them."""
    opset = gr.default_opset(model)
    if opset is None or opset >= MIN_OPSET:
        return PassResult(model)
    what = f"opset {opset} model"
    try:
        out = version_converter.convert_version(model, CONVERT_TO)
    except Exception as exc:  # noqa: BLE001 - the converter raises several types
        raise UserError(f"{what}: onnx.version_converter cannot convert it to opset {CONVERT_TO} "
                        f"({_first_line(exc)}); below opset {MIN_OPSET} only exact conversions are supported") from None
    changes = []
    if model.ir_version < 4:
        inits = {t.name for t in out.graph.initializer}
        kept = [i for i in out.graph.input if i.name not in inits]
        if len(kept) < len(out.graph.input):
            changes.append(f"IR {model.ir_version}: {len(out.graph.input) - len(kept)} initializers listed as graph "
                           "inputs (as IR < 4 requires; onnxruntime reads them as constants) are constants only")
            del out.graph.input[:]
            out.graph.input.extend(kept)
    ir = onnx.helper.find_min_ir_version_for([onnx.helper.make_opsetid("", CONVERT_TO)])
    if out.ir_version < ir:
        changes.append(f"IR version {out.ir_version} -> {ir} (what opset {CONVERT_TO} needs)")
        out.ir_version = ir
    on = "the given --input arrays" if input_arrays else "generated inputs"
    feeds = make_inputs(out, input_shapes, arrays=input_arrays)
    try:
        ref = run_model(model, feeds, optimize=False)
    except UserError as exc:
        raise UserError(f"{what}: the conversion to opset {CONVERT_TO} cannot be checked: {exc}") from None
    try:
        got = run_model(out, feeds, optimize=False)
    except UserError as exc:
        raise UserError(f"{what}: the conversion to opset {CONVERT_TO} with onnx.version_converter is not exact "
                        f"(the converted model does not run: {exc})") from None
    err = max((_output_error(g, r) for g, r in zip(got, ref, strict=True)), default=0.0) \
        if len(got) == len(ref) else float("inf")
    if not err <= EXACT_REL:
        raise UserError(f"{what}: the conversion to opset {CONVERT_TO} with onnx.version_converter is not exact "
                        f"(outputs differ on {on}: rel. error {err:.1e} > {EXACT_REL:.0e}); below opset "
                        f"{MIN_OPSET} only exact conversions are supported")
    changes.insert(0, f"converted opset {opset} -> {CONVERT_TO} with onnx.version_converter; outputs equal on {on} "
                      f"(rel. error {err:.1e})")
    return PassResult(out, tuple(changes))


def inline_functions(model: onnx.ModelProto) -> PassResult:
    if not len(model.functions):
        return PassResult(model)
    names = [f"{f.domain}::{f.name}" if f.domain else f.name for f in model.functions]
    return PassResult(gr.inline_functions(model), tuple(f"inlined local function {n}" for n in names))


def name_nodes(model: onnx.ModelProto) -> PassResult:
    used = {n.name for n in model.graph.node if n.name}
    changes = []
    for i, node in enumerate(model.graph.node):
        if not node.name:
            node.name = gr.fresh_name(f"{node.op_type}_{i}", used)
            changes.append(f"named node {i} ({node.op_type}) '{node.name}'")
    if len(changes) > 3:
        changes = [f"named {len(changes)} unnamed nodes ({changes[0]}, ...)"]
    return PassResult(model, tuple(changes))


def fold_identity_constants(model: onnx.ModelProto) -> PassResult:
    g = model.graph
    outputs = {o.name for o in g.output}
    changes = []
    for _ in range(8):
        consts = ConstantTable.of(g)
        keep_nodes = []
        for node in g.node:
            if (node.op_type == "Identity" and node.domain in ("", "ai.onnx") and node.input[0] in consts
                    and node.output[0] not in outputs):
                g.initializer.append(numpy_helper.from_array(consts.get(node.input[0]), node.output[0]))
                changes.append(f"folded Identity '{node.name}' of constant '{node.input[0]}'")
                continue
            keep_nodes.append(node)
        if len(keep_nodes) == len(g.node):
            break
        del g.node[:]
        g.node.extend(keep_nodes)
    gr.drop_unused(model)
    return PassResult(model, tuple(changes))


def untie_constants(model: onnx.ModelProto) -> PassResult:
    g = model.graph
    consts = ConstantTable.of(g)
    uses: dict[str, list[tuple[onnx.NodeProto, int]]] = defaultdict(list)
    for node in g.node:
        for i, t in enumerate(node.input):
            if t in consts:
                uses[t].append((node, i))
    names = gr.all_names(g)
    changes = []
    for name, lst in uses.items():
        if len(lst) < 2:
            continue
        if int(np.prod(consts.shape(name), dtype=np.int64)) > UNTIE_MAX_ELEMENTS:
            continue
        value = consts.get(name)
        for k, (node, i) in enumerate(lst[1:], start=1):
            new = gr.fresh_name(f"{name}__use{k}", names)
            g.initializer.append(numpy_helper.from_array(np.array(value, copy=True), new))
            node.input[i] = new
        changes.append(f"untied constant '{name}' ({len(lst)} uses)")
    gr.drop_unused(model)
    return PassResult(model, tuple(changes))


# ops whose output is not a function of their inputs' values (random) or that we never fold
_NONDETERMINISTIC = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial",
                     "Bernoulli", "Dropout"}


def shape_derived(model: onnx.ModelProto) -> set[str]:
    """Tensors computed only from constants and the *shapes* (not values) of activations."""
    g = model.graph
    derived = set(ConstantTable.of(g).names())
    out: set[str] = set()
    for node in g.node:
        if node.domain not in ("", "ai.onnx") or node.op_type in _NONDETERMINISTIC or gr.has_subgraph(node):
            continue
        if node.op_type in ("Shape", "Size"):
            ok = True
        elif node.op_type == "Constant":
            ok = False
        else:
            ok = bool(node.input) and all((not t) or t in derived for t in node.input)
        if ok:
            for o in node.output:
                if o:
                    derived.add(o)
                    out.add(o)
    return out


def fold_static_shapes(model: onnx.ModelProto, overrides=None, arrays=None, stand_ins=None) -> PassResult:
    """Replace shape computations that are proven the same for every input (``analysis.static``) by
    constants, so handlers can read and rewrite them. The function is unchanged for every input.

    The values come from one onnxruntime run at the analysis sizes (``overrides``, ``arrays``); a run
    that fails folds nothing and says so (never aborts)."""
    derived = shape_derived(model)
    if not derived:
        return PassResult(model)
    g = model.graph
    try:
        values = run_probe(model, sorted(derived), overrides, scale=1, arrays=arrays)
    except UserError as exc:
        return PassResult(model, (f"no shape value folded: {exc}",))
    values = {t: v for t, v in values.items() if t in derived}
    folded: dict[str, np.ndarray] = {}
    removed = 0
    for _ in range(256):  # a fold can let shape inference prove more sizes downstream (chains of blocks)
        static = proven_static(model, values, derived, stand_ins)
        # fold the largest static sub-expressions: static tensors read by a node whose result is not static
        frontier = {t for n in g.node if not all(o in static for o in n.output if o)
                    for t in n.input if t in static and t not in folded}
        if not frontier:
            break
        names = gr.all_names(g)
        new_names: dict[str, str] = {}
        for t in sorted(frontier):
            name = gr.fresh_name(f"{t}__static", names)
            new_names[t] = name
            g.initializer.append(numpy_helper.from_array(np.asarray(values[t]), name))
            folded[t] = values[t]
        for n in g.node:
            for i, t in enumerate(n.input):
                if t in new_names:
                    n.input[i] = new_names[t]
        before = len(g.node)
        gr.drop_dead_nodes(model)
        gr.drop_unused(model)
        removed += before - len(g.node)
    if not folded:
        return PassResult(model)
    return PassResult(model, tuple([f"folded static shape value '{t}' = {np.asarray(v).tolist()}"
                                    for t, v in sorted(folded.items())][:50]
                                   + [f"removed {removed} shape-computation nodes"]))


def normalize(model: onnx.ModelProto, inplace: bool = False, input_shapes=None, input_arrays=None,
              bias_inputs: bool = False, stand_ins=None) -> PassResult:
    """Every pass in order; ``inplace=True`` reuses ``model`` (for a model the caller just loaded).
    ``bias_inputs``: also ``add_bias_inputs`` (for compensation), after ``untie_constants``. The
    result's ``fault``: the input's checker fault that ``check_input`` could not repair."""
    r = check_input(model)
    changes, fault = [f"check_input: {c}" for c in r.changes], r.fault
    r = convert_opset(r.model, input_shapes, input_arrays)
    changes += [f"convert_opset: {c}" for c in r.changes]
    r = inline_functions(r.model)
    changes += list(r.changes)
    out = r.model  # the three passes above are functional: ``model`` itself while they change nothing
    if not inplace and out is model:
        out = onnx.ModelProto()
        out.CopyFrom(model)
    for p in (name_nodes, fold_identity_constants, untie_constants, *((add_bias_inputs,) if bias_inputs else ())):
        r = p(out)
        out = r.model
        changes += [f"{p.__name__}: {c}" for c in r.changes]
    r = fold_static_shapes(out, input_shapes, input_arrays, stand_ins)
    changes += [f"fold_static_shapes: {c}" for c in r.changes]
    for c in changes:
        log.info("%s", c)
    return PassResult(r.model, tuple(changes), fault)


def add_bias_inputs(model: onnx.ModelProto) -> PassResult:
    """Give every linear consumer with a constant weight a bias of zeros, so compensation
    (``rewrite.compensate``) has a constant to fold removed channels' contributions into and the
    coupling graph knows it: Conv without input 2 gets ``B = 0`` ([C_out]), Gemm without input 2 gets
    ``C = 0`` ([N]); a MatMul ``x @ W`` (W a 2-D constant) whose result is not read by exactly one
    Add of a constant gets ``Add(x @ W, 0)`` ([N]) under its output's name. Function-preserving
    (x + 0 = x); only run when asked (``normalize(bias_inputs=True)``). Main graph only."""
    g = model.graph
    consts = ConstantTable.of(g)
    readers = gr.consumers(g)
    outputs = {o.name for o in g.output}
    names = gr.all_names(g)
    changes: list[str] = []
    nodes: list[onnx.NodeProto] = []

    def zeros(base: str, n: int, dtype) -> str:
        name = gr.fresh_name(base, names)
        g.initializer.append(numpy_helper.from_array(np.zeros(n, dtype=dtype), name))
        return name

    def float_weight(name: str, rank: int | None = None):
        shape, dtype = consts.shape(name), consts.dtype(name)
        if shape is None or dtype is None or not np.issubdtype(np.dtype(dtype), np.floating):
            return None
        return shape if rank is None or len(shape) == rank else None

    for node in g.node:
        nodes.append(node)
        if node.domain not in ("", "ai.onnx") or len(node.input) < 2:
            continue
        w = node.input[1]
        has_bias = len(node.input) > 2 and bool(node.input[2])
        if node.op_type == "Conv" and not has_bias and (shape := float_weight(w)) is not None and len(shape) >= 3:
            while len(node.input) < 3:
                node.input.append("")
            node.input[2] = zeros(f"{node.name}_bias", shape[0], consts.dtype(w))
            changes.append(f"added a zero bias to Conv '{node.name}'")
        elif node.op_type == "Gemm" and not has_bias and (shape := float_weight(w, 2)) is not None:
            trans_b = any(a.name == "transB" and a.i for a in node.attribute)
            while len(node.input) < 3:
                node.input.append("")
            node.input[2] = zeros(f"{node.name}_bias", shape[0] if trans_b else shape[1], consts.dtype(w))
            changes.append(f"added a zero bias to Gemm '{node.name}'")
        elif node.op_type == "MatMul" and (shape := float_weight(w, 2)) is not None and node.input[0] not in consts:
            y = node.output[0]
            rd = readers.get(y, [])
            if (y not in outputs and len(rd) == 1 and rd[0].op_type == "Add"
                    and any(t in consts for t in rd[0].input if t != y)):
                continue
            inner = gr.fresh_name(f"{y}__nobias", names)
            node.output[0] = inner
            bias = zeros(f"{node.name}_bias", shape[1], consts.dtype(w))
            nodes.append(onnx.helper.make_node("Add", [inner, bias], [y], name=gr.fresh_name(f"{node.name}_bias_add", names)))
            changes.append(f"added a zero bias Add after MatMul '{node.name}'")
    if changes:
        del g.node[:]
        g.node.extend(nodes)
    if len(changes) > 3:
        changes = [f"added zero biases to {len(changes)} linear ops ({changes[0]}, ...)"]
    return PassResult(model, tuple(changes))
