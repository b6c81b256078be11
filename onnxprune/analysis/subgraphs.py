"""Subgraphs the analysis follows (If branches): which they are, and the shapes of their tensors.

The analysis follows channels into the subgraphs of an op whose handler ``follows_subgraphs``, when
every name of the model is unique across scopes (``ir.graph.repeated_names`` is empty): a name then
names one tensor of one scope, so the coupling graph, the rewrite and the masked original address
tensors inside a subgraph by name, like any other. A model that reuses a name across scopes is not
followed into at all (its subgraphs stay barriers, with that reason).

Shapes inside a subgraph: onnx shape inference rarely resolves them (sizes computed inside a branch
stay symbolic), so each followed subgraph runs alone in onnxruntime: a model whose graph is the
subgraph, whose inputs are the tensors it reads from outside (their values from a probe run of the
enclosing graph), and whose outputs are every tensor it computes. It runs at the analysis sizes and
at the second sizes (``runtime.probe``, ``scale=2``); an axis whose size differs between the two is
dynamic, as in the main graph (``shapes.infer_shapes``). A branch that does not run alone (the other
branch of an If on a sample rate, fed an input length it was not made for) gets no shapes, and the
analysis does not follow it: never a guessed shape. Subgraphs with inputs of their own (Loop, Scan
bodies) are never run here.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

import numpy as np
import onnx

from onnxprune.analysis.contract import Registry
from onnxprune.analysis.shapes import Shapes
from onnxprune.errors import UserError
from onnxprune.ir.graph import (
    all_names,
    default_opset,
    fresh_name,
    graph_free_names,
    repeated_names,
    subgraphs,
)
from onnxprune.ir.tensors import ConstantTable
from onnxprune.runtime.probe import run_probe
from onnxprune.runtime.session import make_session, run_session

log = logging.getLogger(__name__)

Follows = Callable[[onnx.NodeProto], bool]


def follower(model: onnx.ModelProto, registry: Registry) -> Follows:
    """Whether the analysis follows channels into a node's subgraphs: its handler follows channels
    and ``follows_subgraphs``, and no name of ``model`` repeats across scopes."""
    if repeated_names(model.graph):
        return lambda node: False
    opset = default_opset(model) or 0

    def follows(node: onnx.NodeProto) -> bool:
        h = registry.for_node(node, opset)
        return bool(subgraphs(node)) and h is not None and h.follows_channels and h.follows_subgraphs

    return follows


def followed_graphs(graph: onnx.GraphProto, follows: Follows) -> list[onnx.GraphProto]:
    """The subgraphs followed into, at any depth (through followed ops only), outer first."""
    out: list[onnx.GraphProto] = []
    stack = [graph]
    while stack:
        g = stack.pop(0)
        for n in g.node:
            if follows(n):
                for sub in subgraphs(n):
                    out.append(sub)
                    stack.append(sub)
    return out


def with_body_shapes(model: onnx.ModelProto, shapes: Shapes, registry: Registry,
                     overrides: dict[str, tuple[int, ...]] | None = None,
                     arrays: dict[str, np.ndarray] | None = None) -> Shapes:
    """``shapes`` plus the shapes of every tensor inside the followed subgraphs that run alone (see
    the module docstring); ``shapes`` itself when the model has none."""
    follows = follower(model, registry)
    holders = [n for n in model.graph.node if follows(n)]
    if not holders:
        return shapes
    consts = ConstantTable.of(model.graph)
    refs = sorted({r for n in holders for b in subgraphs(n) for r in graph_free_names(b) if r not in consts})
    outer1 = _outer_values(model, refs, overrides, arrays, scale=1)
    if outer1 is None:
        return shapes
    outer2 = _outer_values(model, refs, overrides, arrays, scale=2)
    acc = _Acc()
    for n in holders:
        for body in subgraphs(n):
            _probe_body(model, body, outer1, outer2, consts, follows, acc)
    for body in followed_graphs(model.graph, follows):
        table = ConstantTable.of(body)
        for name in table.names():
            shp = table.shape(name)
            acc.add(name, shp, shp, onnx.helper.np_dtype_to_tensor_dtype(np.dtype(table.dtype(name))))
    if not acc.concrete:
        return shapes
    return dataclasses.replace(shapes, concrete={**shapes.concrete, **acc.concrete},
                               dynamic={**shapes.dynamic, **acc.dynamic},
                               concrete2={**shapes.concrete2, **acc.concrete2},
                               elem_types={**shapes.elem_types, **acc.elem_types})


@dataclasses.dataclass
class _Acc:
    concrete: dict[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)
    concrete2: dict[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)
    dynamic: dict[str, tuple[bool, ...]] = dataclasses.field(default_factory=dict)
    elem_types: dict[str, int] = dataclasses.field(default_factory=dict)

    def add(self, name: str, shape: tuple[int, ...], shape2: tuple[int, ...] | None, elem: int | None) -> None:
        self.concrete[name] = shape
        if shape2 is not None:
            self.concrete2[name] = shape2
        # dynamic: the size changed between the two runs, or the second run did not show it
        same = shape2 is not None and len(shape2) == len(shape)
        self.dynamic[name] = tuple(not same or shape2[ax] != d for ax, d in enumerate(shape))
        if elem:
            self.elem_types[name] = elem


def _outer_values(model: onnx.ModelProto, names: list[str], overrides, arrays, scale: int) -> dict[str, np.ndarray] | None:
    """Values of ``names`` (main-graph tensors, graph inputs included) in one probe run, or None."""
    g = model.graph
    inputs = {i.name for i in g.input}
    taken = all_names(g)
    alias = {n: fresh_name(f"{n}__body_feed", taken) for n in names if n in inputs}
    extra = [onnx.helper.make_node("Identity", [n], [a]) for n, a in alias.items()]
    g.node.extend(extra)  # graph inputs are read through an Identity (a probe shows node outputs only)
    try:
        kw = {"arrays": arrays} if arrays else {}
        values = run_probe(model, [alias.get(n, n) for n in names], overrides, scale, **kw)
    except UserError as exc:
        log.debug("subgraph shapes: the main graph did not run: %s", exc)
        values = None
    finally:
        if extra:
            del g.node[len(g.node) - len(extra):]
    if values is None or (scale != 1 and not values):
        return None
    out = {n: values[alias.get(n, n)] for n in names if alias.get(n, n) in values}
    return out if len(out) == len(names) else None


def _standalone(model: onnx.ModelProto, body: onnx.GraphProto, feeds: dict[str, np.ndarray]) -> onnx.ModelProto:
    """A model whose graph is ``body``: the names it reads from outside are inputs, every tensor it
    computes is an output."""
    m = onnx.ModelProto()
    m.ir_version = model.ir_version
    m.opset_import.extend(model.opset_import)
    m.functions.extend(model.functions)
    g = m.graph
    g.name = body.name or "subgraph"
    g.node.extend(body.node)
    g.initializer.extend(body.initializer)
    g.sparse_initializer.extend(body.sparse_initializer)
    for name, value in feeds.items():
        g.input.append(onnx.helper.make_tensor_value_info(
            name, onnx.helper.np_dtype_to_tensor_dtype(value.dtype), None))
    for n in body.node:
        for o in n.output:
            if o:
                g.output.append(onnx.ValueInfoProto(name=o))
    return m


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray] | None:
    try:
        sess, _ = make_session(model, "cpu")
        outs = run_session(sess, feeds)
    except UserError as exc:
        log.debug("subgraph '%s' does not run alone: %s", model.graph.name, exc)
        return None
    return {meta.name: np.asarray(v) for meta, v in zip(sess.get_outputs(), outs, strict=True)}


def _feeds(free: list[str], outer: dict[str, np.ndarray] | None, consts: ConstantTable) -> dict[str, np.ndarray] | None:
    if outer is None:
        return None
    feeds = {}
    for r in free:
        v = outer.get(r)
        if v is None and r in consts:
            v = consts.get(r)
        if v is None or np.asarray(v).dtype == object:
            return None
        feeds[r] = np.asarray(v)
    return feeds


def _probe_body(model: onnx.ModelProto, body: onnx.GraphProto, outer1: dict[str, np.ndarray],
                outer2: dict[str, np.ndarray] | None, consts: ConstantTable, follows: Follows, acc: _Acc) -> None:
    if len(body.input):
        return  # a body with inputs of its own (Loop, Scan) is never run alone
    free = sorted(graph_free_names(body))
    feeds1 = _feeds(free, outer1, consts)
    if feeds1 is None:
        return
    standalone = _standalone(model, body, feeds1)
    run1 = _run(standalone, feeds1)
    if run1 is None:
        return
    feeds2 = _feeds(free, outer2, consts)
    run2 = _run(standalone, feeds2) if feeds2 is not None else None
    for name, v in run1.items():
        v2 = run2.get(name) if run2 is not None else None
        elem = onnx.helper.np_dtype_to_tensor_dtype(v.dtype) if v.dtype != object else None
        acc.add(name, tuple(v.shape), None if v2 is None else tuple(v2.shape), elem)
    inner1 = {**outer1, **run1}
    inner2 = {**outer2, **run2} if outer2 is not None and run2 is not None else None
    for n in body.node:
        if follows(n):
            for sub in subgraphs(n):
                _probe_body(model, sub, inner1, inner2, consts, follows, acc)
