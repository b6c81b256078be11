"""Function-preserving clean-ups run before analysis (each returns a new model).

- inline local ONNX functions;
- fold ``Identity(constant)`` into a constant of its own (the legacy exporter deduplicates equal
  initializers behind Identity nodes, which would couple unrelated layers whose biases are zero);
- untie small constants used by several nodes, so each use is sliced for its own need.
Large constants used by several nodes (real weight tying) stay tied: their uses are coupled.
"""

from __future__ import annotations

import logging
from collections import defaultdict

import numpy as np
import onnx
from onnx import numpy_helper

from onnxprune.model import ConstantTable, inline_functions, used_names

log = logging.getLogger(__name__)

UNTIE_MAX_ELEMENTS = 1 << 22


def normalize(model: onnx.ModelProto, inplace: bool = False) -> onnx.ModelProto:
    """Normalized model; ``inplace=True`` reuses ``model`` (for a model the caller just loaded)."""
    inlined = inline_functions(model)
    if inplace or inlined is not model:
        out = inlined
    else:
        out = onnx.ModelProto()
        out.CopyFrom(model)
    _name_nodes(out)
    _fold_identity_constants(out)
    _untie_constants(out)
    return out


def _name_nodes(model: onnx.ModelProto) -> None:
    used = {n.name for n in model.graph.node if n.name}
    for i, node in enumerate(model.graph.node):
        if not node.name:
            name = f"{node.op_type}_{i}"
            while name in used:
                name += "_"
            node.name = name
            used.add(name)


def _fold_identity_constants(model: onnx.ModelProto) -> None:
    g = model.graph
    outputs = {o.name for o in g.output}
    for _ in range(8):
        consts = ConstantTable.of(g)
        keep_nodes = []
        changed = False
        for node in g.node:
            if (node.op_type == "Identity" and node.domain in ("", "ai.onnx") and node.input[0] in consts
                    and node.output[0] not in outputs):
                g.initializer.append(numpy_helper.from_array(consts.get(node.input[0]), node.output[0]))
                changed = True
                continue
            keep_nodes.append(node)
        if not changed:
            break
        del g.node[:]
        g.node.extend(keep_nodes)
    _drop_unused(model)


def _untie_constants(model: onnx.ModelProto) -> None:
    g = model.graph
    consts = ConstantTable.of(g)
    uses: dict[str, list[tuple[onnx.NodeProto, int]]] = defaultdict(list)
    for node in g.node:
        for i, t in enumerate(node.input):
            if t in consts:
                uses[t].append((node, i))
    names = {i.name for i in g.initializer} | {o for n in g.node for o in n.output} | {i.name for i in g.input}
    for name, lst in uses.items():
        if len(lst) < 2:
            continue
        if int(np.prod(consts.shape(name), dtype=np.int64)) > UNTIE_MAX_ELEMENTS:
            continue
        value = consts.get(name)
        for k, (node, i) in enumerate(lst[1:], start=1):
            new = f"{name}__use{k}"
            while new in names:
                new += "_"
            names.add(new)
            g.initializer.append(numpy_helper.from_array(np.array(value, copy=True), new))
            node.input[i] = new
    _drop_unused(model)


def _drop_unused(model: onnx.ModelProto) -> None:
    g = model.graph
    used = used_names(g)
    keep = [i for i in g.initializer if i.name in used]
    if len(keep) != len(g.initializer):
        del g.initializer[:]
        g.initializer.extend(keep)
    nodes = [n for n in g.node if not (n.op_type == "Constant" and n.output[0] not in used)]
    if len(nodes) != len(g.node):
        del g.node[:]
        g.node.extend(nodes)


# ops whose output depends only on their inputs' values (deterministic, no randomness)
_NONDETERMINISTIC = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial",
                     "Bernoulli", "Dropout"}


def shape_derived(model: onnx.ModelProto) -> set[str]:
    """Tensors computed only from constants and the *shapes* (not values) of activations."""
    g = model.graph
    derived = set(ConstantTable.of(g).names())
    out: set[str] = set()
    for node in g.node:
        if node.domain not in ("", "ai.onnx") or node.op_type in _NONDETERMINISTIC or subgraphs_of(node):
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


def fold_static_shapes(model: onnx.ModelProto, overrides=None) -> onnx.ModelProto:
    """Replace shape computations whose value does not depend on dynamic input sizes by constants.

    Reshape targets, Slice bounds, head counts and attention scales computed from ``Shape`` become
    plain constants that handlers can read and rewrite; computations that do depend on dynamic sizes
    (batch, sequence) stay computed. The function is unchanged for every input.
    """
    from onnxprune.model import probe_static_values

    derived = shape_derived(model)
    if not derived:
        return model
    g = model.graph
    values = probe_static_values(model, sorted(derived), overrides)
    # fold the largest static sub-expressions: static tensors read by a node whose result is not static
    frontier = {t for n in g.node if not all(o in values for o in n.output if o) for t in n.input if t in values}
    values = {t: v for t, v in values.items() if t in frontier}
    if not values:
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    names = {i.name for i in g.initializer} | {o for n in g.node for o in n.output} | {i.name for i in g.input}
    new_names: dict[str, str] = {}
    for t, v in values.items():
        name = f"{t}__static"
        while name in names:
            name += "_"
        names.add(name)
        new_names[t] = name
        g.initializer.append(numpy_helper.from_array(np.asarray(v), name))
    for n in g.node:
        for i, t in enumerate(n.input):
            if t in new_names:
                n.input[i] = new_names[t]
    from onnxprune.rewrite import _drop_dead_nodes

    _drop_dead_nodes(out)
    _drop_unused(out)
    return out


def subgraphs_of(node: onnx.NodeProto) -> bool:
    return any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)
