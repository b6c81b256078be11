"""Apply a plan in one pass: slice every constant once, let handlers fix attributes and shape
constants, refresh value_info. Validates the whole plan before the first mutation.

Subgraphs (If branches) are rewritten in place inside the op's attribute: their constants are sliced
where they live, their nodes fixed by their handlers, the shapes their outputs declare refreshed. This
relies on names being unique across scopes (``ir.graph.repeated_names``), which the analysis requires
before it follows a subgraph; a model that reuses a name is rewritten in its main graph only."""

from __future__ import annotations

import logging
from collections import defaultdict

import numpy as np
import onnx
from onnx import numpy_helper

from onnxprune.analysis.contract import Handler, Node
from onnxprune.analysis.coupling import CouplingGraph
from onnxprune.errors import RewriteError
from onnxprune.ir.attrs import get_attr
from onnxprune.ir.graph import (
    ScopedConstantTable,
    drop_dead_nodes,
    drop_unused,
    drop_unused_in,
    nested_graphs,
    producers,
    repeated_names,
)
from onnxprune.ir.tensors import ConstantTable, constant_node_value, set_tensor, tensor_value
from onnxprune.planning.plan import Plan

log = logging.getLogger(__name__)


def kept_map(cg: CouplingGraph, plan: Plan) -> dict[tuple[str, int], np.ndarray]:
    """(tensor, axis) -> kept indices, for every axis the plan changes."""
    out: dict[tuple[str, int], np.ndarray] = {}
    for gp in plan.pruned():
        g = cg.groups[gp.group]
        for sid in g.spaces:
            kept = cg.kept_elements(g, gp.keep, sid)
            if len(kept) == 0:
                t, ax = cg.space_key[sid]
                raise RewriteError(f"plan removes every channel of axis {ax} of '{t}'")
            if len(kept) < cg.space_size[sid]:
                out[cg.space_key[sid]] = kept
    return out


def validate(cg: CouplingGraph, plan: Plan) -> None:
    for gp in plan.groups.values():
        if gp.group >= len(cg.groups):
            raise RewriteError(f"plan names group {gp.group}, which does not exist")
        g = cg.groups[gp.group]
        if gp.removed > 0 and not g.prunable:
            raise RewriteError(f"plan prunes frozen group {gp.group}: {g.frozen[0]}")
        if len(gp.keep) == 0:
            raise RewriteError(f"plan removes every channel of group {gp.group}")
        if gp.keep.min() < 0 or gp.keep.max() >= g.size or len(np.unique(gp.keep)) != len(gp.keep):
            raise RewriteError(f"plan keeps invalid units in group {gp.group}")


class RewriteContext:
    """What a handler sees while fixing one node (the ``contract.RewriteCtx`` Protocol)."""

    def __init__(self, model: onnx.ModelProto, cg: CouplingGraph, kept: dict[tuple[str, int], np.ndarray]):
        self.model = model
        self.cg = cg
        self._kept = kept
        self.opset = cg.opset
        self._graphs = scopes(model)
        self._consts = (ScopedConstantTable.of_scopes(model.graph) if len(self._graphs) > 1
                        else ConstantTable.of(model.graph))
        self._producer: dict[str, onnx.NodeProto] = {}
        self._graph_of: dict[str, onnx.GraphProto] = {}  # tensor -> the graph whose node writes it
        for g in self._graphs:
            self._producer.update(producers(g))
            self._graph_of.update({o: g for n in g.node for o in n.output if o})
        self._new_shapes: dict[str, tuple[int, ...]] = {}
        by_tensor = defaultdict(dict)
        for (t, ax), k in kept.items():
            by_tensor[t][ax] = len(k)
        for t, axes in by_tensor.items():
            old = list(cg.shapes.get(t))
            for ax, n in axes.items():
                old[ax] = n
            self._new_shapes[t] = tuple(old)
        self._counter = 0
        self._names = {i.name for g in self._graphs for i in g.initializer} | set(self._graph_of)

    @property
    def changed_tensors(self) -> set[str]:
        return set(self._new_shapes)

    def old_shape(self, t: str) -> tuple[int, ...] | None:
        return self.cg.shapes.get(t)

    def new_shape(self, t: str) -> tuple[int, ...] | None:
        return self._new_shapes.get(t, self.cg.shapes.get(t))

    def kept(self, t: str, axis: int) -> np.ndarray:
        k = self._kept.get((t, axis))
        return np.arange(self.cg.shapes.get(t)[axis]) if k is None else k

    def is_dynamic(self, t: str, axis: int) -> bool:
        return self.cg.shapes.is_dynamic(t, axis)

    def same_dynamic_size(self, a: str, axis_a: int, b: str, axis_b: int) -> bool:
        """Whether dynamic axis ``axis_a`` of ``a`` and axis ``axis_b`` of ``b`` had the same size at
        both probe sizes (``b``'s axis is a copy of ``a``'s)."""
        shapes = self.cg.shapes
        sa, sb = shapes.get(a), shapes.get(b)
        c2a, c2b = shapes.concrete2.get(a), shapes.concrete2.get(b)
        return (sa is not None and sb is not None and axis_a < len(sa) and axis_b < len(sb)
                and shapes.is_dynamic(a, axis_a) and sa[axis_a] == sb[axis_b]
                and c2a is not None and c2b is not None and axis_a < len(c2a) and axis_b < len(c2b)
                and c2a[axis_a] == c2b[axis_b])

    def handler_of(self, node: Node) -> Handler:
        """The handler of ``node``, for its declared facts (``contract.UNKNOWN`` if none)."""
        return self.cg.registry.facts_of(node, self.opset)

    def const(self, name: str) -> np.ndarray | None:
        return self._consts.get(name)

    def value(self, name: str) -> np.ndarray | None:
        """A constant (static shape computations were folded into constants before analysis)."""
        return self._consts.get(name)

    def producer(self, name: str) -> onnx.NodeProto | None:
        return self._producer.get(name)

    def consumers(self, name: str) -> list[onnx.NodeProto]:
        return [n for g in self._graphs for n in g.node if name in n.input]

    def graph_of(self, node: onnx.NodeProto) -> onnx.GraphProto:
        """The graph (main graph or subgraph) that holds ``node``."""
        out = next((o for o in node.output if o), None)
        return self._graph_of.get(out, self.model.graph) if out is not None else self.model.graph

    def clone_producer(self, consumer: onnx.NodeProto, idx: int) -> onnx.NodeProto:
        """Give ``consumer`` a private copy of the node producing its input ``idx`` (placed right
        after the original, so the graph stays sorted); returns the copy."""
        orig = self._producer[consumer.input[idx]]
        new = onnx.NodeProto()
        new.CopyFrom(orig)
        new.name = self._fresh(orig.name or orig.op_type)
        for k, o in enumerate(orig.output):
            if o:
                new.output[k] = self._fresh(o)
                self._producer[new.output[k]] = new
        graph = self.graph_of(orig)
        nodes = graph.node
        pos = next(i for i, n in enumerate(nodes) if n == orig)
        nodes.insert(pos + 1, new)
        new = nodes[pos + 1]
        for o in new.output:
            if o:
                self._producer[o] = new
                self._graph_of[o] = graph
        consumer.input[idx] = new.output[list(orig.output).index(consumer.input[idx])]
        return new

    def attr(self, node: onnx.NodeProto, name: str):
        return get_attr(node, name, self.opset)

    def set_attr(self, node: onnx.NodeProto, name: str, value) -> None:
        self.remove_attr(node, name)
        node.attribute.append(onnx.helper.make_attribute(name, value))

    def remove_attr(self, node: onnx.NodeProto, name: str) -> None:
        for i, a in enumerate(node.attribute):
            if a.name == name:
                del node.attribute[i]
                return

    def _fresh(self, base: str) -> str:
        while True:
            self._counter += 1
            name = f"{base}__pruned{self._counter}"
            if name not in self._names:
                self._names.add(name)
                return name

    def set_input_const(self, node: onnx.NodeProto, idx: int, value: np.ndarray) -> None:
        """Give input ``idx`` of ``node`` a new constant of its own (clone on write)."""
        old = node.input[idx]
        name = self._fresh(old or f"{node.name}_in{idx}")
        self.graph_of(node).initializer.append(numpy_helper.from_array(np.asarray(value), name))
        self._consts.values[name] = np.asarray(value)
        node.input[idx] = name

    def add_input_const(self, node: onnx.NodeProto, idx: int, value: np.ndarray) -> None:
        while len(node.input) <= idx:
            node.input.append("")
        self.set_input_const(node, idx, value)


def rewrite(model: onnx.ModelProto, cg: CouplingGraph, plan: Plan) -> onnx.ModelProto:
    """Return a pruned copy of ``model`` (``model`` itself is not touched)."""
    validate(cg, plan)
    kept = kept_map(cg, plan)
    new = _copy_without(model, {t for t, _ in kept})
    _slice_constants(new, kept, model)
    rw = RewriteContext(new, cg, kept)
    changed = rw.changed_tensors
    graphs = scopes(new)
    for node in [n for g in graphs for n in g.node]:
        if not any(t in changed for t in list(node.input) + list(node.output)):
            continue
        handler = cg.registry.for_node(node, cg.opset)
        if handler is not None:
            handler.rewrite(node, rw)
    for g in graphs:
        keep_vi = [vi for vi in g.value_info if vi.name not in changed]
        del g.value_info[:]
        g.value_info.extend(keep_vi)
    for g in graphs[1:]:
        _refresh_outputs(g, rw)
    drop_dead_nodes(new)
    drop_unused(new)
    for g in graphs[1:]:
        drop_unused_in(g)
    return new


def scopes(model: onnx.ModelProto) -> list[onnx.GraphProto]:
    """The graphs a plan may change: the main graph, and its subgraphs when no name repeats across
    scopes (a name then says where its tensor lives)."""
    g = model.graph
    subs = nested_graphs(g)
    return [g, *subs] if subs and not repeated_names(g) else [g]


def _refresh_outputs(graph: onnx.GraphProto, rw: RewriteContext) -> None:
    """A subgraph's outputs declare their shapes: give the changed axes their new sizes."""
    for vi in graph.output:
        old, new = rw.old_shape(vi.name), rw.new_shape(vi.name)
        if old is None or new == old or not vi.type.tensor_type.HasField("shape"):
            continue
        dims = vi.type.tensor_type.shape.dim
        if len(dims) != len(new):
            continue
        for ax, (a, b) in enumerate(zip(old, new, strict=True)):
            if a != b:
                dims[ax].Clear()
                dims[ax].dim_value = int(b)


def _copy_fields(src, dst, skip: str) -> None:
    for fd, value in src.ListFields():
        if fd.name == skip:
            continue
        if hasattr(value, "extend"):
            getattr(dst, fd.name).extend(value)
        elif hasattr(value, "CopyFrom"):
            getattr(dst, fd.name).CopyFrom(value)
        else:
            setattr(dst, fd.name, value)


def _copy_without(model: onnx.ModelProto, sliced: set[str]) -> onnx.ModelProto:
    """Copy of ``model`` where initializers about to be sliced keep only name and type (their old
    bytes are never copied); ``_slice_constants`` fills them from the original."""
    new = onnx.ModelProto()
    _copy_fields(model, new, skip="graph")
    _copy_fields(model.graph, new.graph, skip="initializer")
    for t in model.graph.initializer:
        if t.name in sliced:
            light = new.graph.initializer.add()
            light.name, light.data_type = t.name, t.data_type
        else:
            new.graph.initializer.append(t)
    return new


def _slice_constants(model: onnx.ModelProto, kept: dict[tuple[str, int], np.ndarray],
                     source: onnx.ModelProto | None = None) -> None:
    by_tensor: dict[str, dict[int, np.ndarray]] = defaultdict(dict)
    for (t, ax), k in kept.items():
        by_tensor[t][ax] = k
    originals = {t.name: t for t in source.graph.initializer} if source is not None else {}
    graphs = scopes(model)
    for init in [i for g in graphs for i in g.initializer]:
        axes = by_tensor.get(init.name)
        if axes:
            arr = tensor_value(originals.get(init.name, init))
            # one take per axis, the one that drops most first (each take copies whole blocks)
            for ax, k in sorted(axes.items(), key=lambda a: len(a[1]) / arr.shape[a[0]]):
                arr = np.take(arr, k, axis=ax)
            set_tensor(init, np.ascontiguousarray(arr))
    for node in [n for g in graphs for n in g.node]:
        if node.op_type != "Constant" or not node.output or node.output[0] not in by_tensor:
            continue
        arr = constant_node_value(node)
        for ax, k in by_tensor[node.output[0]].items():
            arr = np.take(arr, k, axis=ax)
        del node.attribute[:]
        node.attribute.append(onnx.helper.make_attribute("value", numpy_helper.from_array(np.ascontiguousarray(arr))))
