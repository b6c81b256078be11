"""The graph index: opsets, graph inputs, value-info dims, subgraph references, dead-code removal
and the weightless copies used for shape inference and the checker."""

from __future__ import annotations

import onnx
from onnx import inliner

from onnxprune.ir.tensors import ConstantTable, is_external, tensor_nbytes


def default_opset(model: onnx.ModelProto) -> int | None:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    return None


def input_feeds_spec(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Every graph input a caller may feed. An initializer that is also a graph input (IR < 4
    models, or on purpose) is included: its value is only a default, overridable at run time, so it
    is a graph input like any other (fed, frozen), never a constant (``ConstantTable.of``)."""
    return list(model.graph.input)


def value_dims(vi: onnx.ValueInfoProto) -> list[int | str | None] | None:
    t = vi.type
    if not t.HasField("tensor_type") or not t.tensor_type.HasField("shape"):
        return None
    out: list[int | str | None] = []
    for d in t.tensor_type.shape.dim:
        if d.HasField("dim_value"):
            out.append(int(d.dim_value))
        elif d.HasField("dim_param"):
            out.append(d.dim_param)
        else:
            out.append(None)
    return out



def subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    out = []
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            out.append(a.g)
        elif a.type == onnx.AttributeProto.GRAPHS:
            out.extend(a.graphs)
    return out


def outer_refs(node: onnx.NodeProto) -> set[str]:
    """Names a node's subgraphs read from the enclosing scopes."""
    refs: set[str] = set()
    for g in subgraphs(node):
        defined = {i.name for i in g.input} | {i.name for i in g.initializer}
        for n in g.node:
            for t in n.input:
                if t and t not in defined:
                    refs.add(t)
            for r in outer_refs(n):
                if r not in defined:
                    refs.add(r)
            defined.update(o for o in n.output if o)
    return refs


def used_names(graph: onnx.GraphProto) -> set[str]:
    """Every tensor name read by a node of ``graph`` (subgraph outer references included) or output."""
    used = {o.name for o in graph.output}
    for n in graph.node:
        used.update(t for t in n.input if t)
        used.update(outer_refs(n))
    return used



def has_subgraph(node: onnx.NodeProto) -> bool:
    return any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)


def producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    """Tensor name -> the node that writes it."""
    return {o: n for n in graph.node for o in n.output if o}


def consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    """Tensor name -> the nodes that read it (in graph order)."""
    out: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for t in n.input:
            if t:
                out.setdefault(t, []).append(n)
    return out


def inline_functions(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with its local functions inlined (``model`` itself when it has none)."""
    if len(model.functions):
        model = inliner.inline_local_functions(model)
    return model


def drop_dead_nodes(model: onnx.ModelProto) -> None:
    """Remove nodes none of whose outputs is used (shape computations replaced by constants)."""
    g = model.graph
    while True:
        used = used_names(g)
        keep = [n for n in g.node if any(o in used for o in n.output if o)]
        if len(keep) == len(g.node):
            return
        del g.node[:]
        g.node.extend(keep)



def drop_unused(model: onnx.ModelProto) -> list[str]:
    """Remove initializers and Constant nodes nobody reads; returns the names removed."""
    g = model.graph
    used = used_names(g)
    removed = [i.name for i in g.initializer if i.name not in used]
    if removed:
        keep = [i for i in g.initializer if i.name in used]
        del g.initializer[:]
        g.initializer.extend(keep)
    nodes = [n for n in g.node if not (n.op_type == "Constant" and n.output[0] not in used)]
    if len(nodes) != len(g.node):
        removed += [n.output[0] for n in g.node if n.op_type == "Constant" and n.output[0] not in used]
        del g.node[:]
        g.node.extend(nodes)
    return removed


def all_names(graph: onnx.GraphProto) -> set[str]:
    """Every name a new tensor must not take: initializers, node outputs, graph inputs."""
    return ({i.name for i in graph.initializer} | {o for n in graph.node for o in n.output}
            | {i.name for i in graph.input})


def fresh_name(base: str, taken: set[str]) -> str:
    """``base`` made unique against ``taken`` (which receives it)."""
    name = base
    while name in taken:
        name += "_"
    taken.add(name)
    return name


def weightless(model: onnx.ModelProto, keep_bytes: int = 4096) -> onnx.ModelProto:
    """A copy for shape inference: large initializers keep name, type and dims but no data (shape
    inference reads only their types; data propagation needs only the small ones)."""
    out = onnx.ModelProto()
    for f in ("ir_version", "producer_name", "producer_version", "domain", "model_version", "doc_string"):
        if model.HasField(f):
            setattr(out, f, getattr(model, f))
    out.opset_import.extend(model.opset_import)
    out.functions.extend(model.functions)
    g, g2 = model.graph, out.graph
    g2.name = g.name
    g2.node.extend(g.node)
    g2.input.extend(g.input)
    g2.output.extend(g.output)
    g2.value_info.extend(g.value_info)
    for t in g.initializer:
        if is_external(t) or tensor_nbytes(t) > keep_bytes:
            light = g2.initializer.add()
            light.name, light.data_type = t.name, t.data_type
            light.dims.extend(t.dims)
        else:
            g2.initializer.append(t)
    return out


def checkable(model: onnx.ModelProto, keep_bytes: int = 4096) -> onnx.ModelProto:
    """A copy for ``onnx.checker.check_model(full_check=True)`` that costs what the graph costs, not
    what the weights do: ``weightless``, with every initializer it emptied turned into a graph input
    of the same type and dims (the checker wants data in an initializer, shape inference only its
    type). What only the data could fail (its size against its dims) is checked on load
    (``tensors.check_tensor_data``)."""
    out = weightless(model, keep_bytes)
    g = out.graph
    inputs = {i.name for i in g.input}
    kept = []
    for t, orig in zip(list(g.initializer), model.graph.initializer, strict=True):
        if is_external(orig) or tensor_nbytes(orig) > keep_bytes:
            if t.name not in inputs:
                g.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
        else:
            kept.append(t)
    del g.initializer[:]
    g.initializer.extend(kept)
    return out



# ----------------------------------------------------------------------------------------------
# subgraphs: every scope of a model, and whether its names are unique across scopes


def nested_graphs(graph: onnx.GraphProto) -> list[onnx.GraphProto]:
    """Every subgraph of ``graph``'s nodes at any depth (``graph`` itself not included), outer first."""
    out: list[onnx.GraphProto] = []
    stack = [graph]
    while stack:
        g = stack.pop(0)
        for n in g.node:
            for sub in subgraphs(n):
                out.append(sub)
                stack.append(sub)
    return out


def defined_names(graph: onnx.GraphProto) -> set[str]:
    """Names ``graph`` itself defines: its inputs, initializers and node outputs (not its subgraphs')."""
    return ({i.name for i in graph.input} | {i.name for i in graph.initializer}
            | {o for n in graph.node for o in n.output if o})


def repeated_names(graph: onnx.GraphProto) -> list[str]:
    """Names defined in more than one scope of ``graph`` and its subgraphs (a subgraph shadowing an
    outer name, or two branches reusing one). Empty when every name of the model is unique, so a name
    alone tells which tensor of which scope it is."""
    seen: set[str] = set()
    repeated: set[str] = set()
    for g in [graph, *nested_graphs(graph)]:
        names = defined_names(g)
        repeated |= names & seen
        seen |= names
    return sorted(repeated)


def graph_free_names(graph: onnx.GraphProto) -> set[str]:
    """Names a subgraph reads from its enclosing scopes (its nodes' inputs, its nested subgraphs'
    outer references and its outputs that it does not define)."""
    defined = {i.name for i in graph.input} | {i.name for i in graph.initializer}
    free: set[str] = set()
    for n in graph.node:
        for t in list(n.input) + sorted(outer_refs(n)):
            if t and t not in defined:
                free.add(t)
        defined.update(o for o in n.output if o)
    free.update(o.name for o in graph.output if o.name and o.name not in defined)
    return free


def drop_unused_in(graph: onnx.GraphProto) -> list[str]:
    """``drop_unused`` for a subgraph: its initializers and Constant nodes that neither its nodes
    (their subgraphs included) nor its outputs read; returns the names removed."""
    used = used_names(graph)
    removed = [i.name for i in graph.initializer if i.name not in used]
    if removed:
        keep = [i for i in graph.initializer if i.name in used]
        del graph.initializer[:]
        graph.initializer.extend(keep)
    dead = [n.output[0] for n in graph.node if n.op_type == "Constant" and n.output and n.output[0] not in used]
    if dead:
        nodes = [n for n in graph.node if not (n.op_type == "Constant" and n.output and n.output[0] not in used)]
        del graph.node[:]
        graph.node.extend(nodes)
    return removed + dead


class ScopedConstantTable(ConstantTable):
    """The constants of a graph and of every subgraph in it (valid only when ``repeated_names`` is
    empty: a name then names one constant of one scope)."""

    @classmethod
    def of_scopes(cls, graph: onnx.GraphProto, base: ConstantTable | None = None) -> ScopedConstantTable:
        table = cls()
        for part in [base if base is not None else ConstantTable.of(graph)] + [ConstantTable.of(g)
                                                                                for g in nested_graphs(graph)]:
            table._protos.update(part._protos)
            table._cache.update(part._cache)
            table.constant_nodes.update(part.constant_nodes)
        return table
