"""Which computed values are static: equal for every input size the model accepts.

A probe run shows a value at one input size. Two runs at two sizes can show that a value changes, never
that it does not: "pad H up to a multiple of 32" gives 0 at 224 and at 256. So a value is folded into a
constant only when it is *proven* static here, by abstract interpretation of the shape-computing part
of the graph:

- every element of a computed tensor is known (the same for every input) or not;
- ``Shape(x)[i]`` is known when axis ``i`` of ``x`` has an integer size in onnx's symbolic shape
  inference run from the dims the model *declares* (never from ``--input-shape``: a size the user chose
  for analysis is still dynamic in the model);
- elementwise ops know an element when every operand element it reads is known; structural ops
  (Gather, Slice, Concat, Reshape, Unsqueeze, ...) move knownness as they move values, their index
  inputs fully known; any other op knows its outputs only when every input is fully known.

The probe supplies values (onnxruntime's, at the analysis sizes); this module only says which of them
hold at every size. A weight stored quantized (an 8-32-bit integer constant dequantized with a float
scale) is never called static, so it is never folded into a float constant (``_dequantizes``).
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import helper

from onnxprune.ir.graph import value_dims, weightless
from onnxprune.ir.tensors import ConstantTable

log = logging.getLogger(__name__)

MAX_MASK_ELEMENTS = 1 << 20  # partly known tensors beyond this are treated as unknown

ELEMENTWISE = frozenset({
    "Add", "Sub", "Mul", "Div", "Mod", "Pow", "Neg", "Abs", "Floor", "Ceil", "Round", "Sqrt", "Reciprocal",
    "Exp", "Log", "Max", "Min", "Sum", "Mean", "Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual",
    "Not", "And", "Or", "Xor", "Where", "Cast", "CastLike", "Sign", "Relu", "Clip", "IsNaN", "IsInf",
})
# data on input 0 (every input for Concat); the other inputs are indices, bounds or shapes
STRUCTURAL = frozenset({
    "Gather", "GatherElements", "GatherND", "Slice", "Squeeze", "Unsqueeze", "Reshape", "Expand", "Tile",
    "Transpose", "Identity", "Flatten", "Split", "Concat",
})


def _stand_in(node: onnx.NodeProto, op_type: str, opset: int) -> onnx.NodeProto | None:
    """``node`` as the default-domain ``op_type`` for shape inference: attributes the schema does not
    know dropped, inputs cut to its maximum (an elementwise op with too few inputs: Identity)."""
    try:
        schema = onnx.defs.get_schema(op_type, opset)
    except Exception:  # noqa: BLE001 - no such op at this opset
        return None
    inputs = list(node.input)[:schema.max_input]
    if len(inputs) < schema.min_input:
        op_type, inputs = "Identity", inputs[:1]
        schema = onnx.defs.get_schema("Identity", opset)
    out = helper.make_node(op_type, inputs, list(node.output), name=node.name)
    out.attribute.extend(a for a in node.attribute if a.name in schema.attributes)
    return out


def symbolic_dims(model: onnx.ModelProto, stand_ins: dict[tuple[str, str], str] | None = None,
                  ) -> dict[str, tuple[int | None, ...]]:
    """Per tensor, the sizes onnx's shape inference proves from the declared input dims (None: not proven).

    Exporter-written value_info and output shapes are dropped first: only the declared inputs and the
    ops themselves are trusted. ``stand_ins`` (the handlers' ``shape_stand_in``) lets onnx infer
    through contrib ops it has no schema for (FusedConv as Conv)."""
    light = weightless(model)
    if stand_ins:
        opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
        for i, node in enumerate(light.graph.node):
            op = stand_ins.get((node.domain if node.domain != "ai.onnx" else "", node.op_type))
            new = _stand_in(node, op, opset) if op and node.domain not in ("", "ai.onnx") else None
            if new is not None:
                light.graph.node[i].CopyFrom(new)
    del light.graph.value_info[:]
    for o in light.graph.output:
        if o.type.HasField("tensor_type"):
            o.type.tensor_type.ClearField("shape")
    try:
        inferred = onnx.shape_inference.infer_shapes(light, data_prop=True)
    except Exception as exc:  # noqa: BLE001 - shape inference raises many types
        log.debug("symbolic shape inference failed: %s", exc)
        inferred = light
    out: dict[str, tuple[int | None, ...]] = {}
    g = inferred.graph
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        dims = value_dims(vi)
        if dims is not None:
            out[vi.name] = tuple(d if isinstance(d, int) and d >= 0 else None for d in dims)
    return out


def _eval(node: onnx.NodeProto, inputs: list[np.ndarray | None], opsets) -> list[np.ndarray]:
    from onnx.reference import ReferenceEvaluator  # noqa: PLC0415 - 0.8 s; only for partly known values

    names = [n for n in node.input if n]
    g = helper.make_graph([node], "one", [helper.make_value_info(n, onnx.TypeProto()) for n in names],
                          [helper.make_value_info(n, onnx.TypeProto()) for n in node.output if n])
    m = helper.make_model(g, opset_imports=list(opsets))
    feeds = {n: v for n, v in zip(node.input, inputs, strict=True) if n}
    return ReferenceEvaluator(m).run(None, feeds)


def known_elements(model: onnx.ModelProto, values: dict[str, np.ndarray], tracked: set[str],
                   stand_ins: dict[tuple[str, str], str] | None = None) -> dict[str, np.ndarray]:
    """For each tensor of ``tracked`` (computed from constants and shapes) whose probe value is in
    ``values``: a bool array of its value's shape, True where the element is the same for every input."""
    g = model.graph
    consts = ConstantTable.of(g)
    dims = symbolic_dims(model, stand_ins)
    opsets = [o for o in model.opset_import if o.domain in ("", "ai.onnx")]
    full: set[str] = set(consts.names())  # fully known tensors
    masks: dict[str, np.ndarray] = {}  # partly known ones

    def mask_of(name: str) -> np.ndarray | None:
        if name in masks:
            return masks[name]
        if name in full:
            shape = values[name].shape if name in values else consts.shape(name)
            return np.ones(shape, dtype=bool)
        return None

    def value_of(name: str) -> np.ndarray | None:
        if name in values:
            return values[name]
        return consts.get(name) if name in consts else None

    for node in g.node:
        outs = [o for o in node.output if o]
        if not outs or not all(o in tracked and o in values for o in outs):
            continue
        ins = [t for t in node.input if t]
        if node.op_type in ("Shape", "Size"):
            d = dims.get(node.input[0])
            v = values[outs[0]]
            if node.op_type == "Size":
                if d is not None and all(x is not None for x in d):
                    full.add(outs[0])
                continue
            if d is None:
                continue
            rank = len(d)
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            start, end = int(attrs.get("start", 0)), attrs.get("end")
            start = max(0, start + rank if start < 0 else min(start, rank))
            end = rank if end is None else int(end)
            end = max(0, end + rank if end < 0 else min(end, rank))
            m = np.array([x is not None for x in d[start:end]], dtype=bool)
            if m.shape != v.shape:
                continue
            if m.all():
                full.add(outs[0])
            elif m.any():
                masks[outs[0]] = m
            continue
        if _dequantizes(ins, outs, consts, values):
            continue  # a weight stored quantized is not shape data: folding it would store it as float
        if all(t in full for t in ins):
            full.update(outs)
            continue
        if not all(t in full or t in masks for t in ins):
            continue  # reads an unknown tensor: unknown
        if any(values[o].size > MAX_MASK_ELEMENTS for o in outs):
            continue
        try:
            if node.op_type in ELEMENTWISE:
                shape = values[outs[0]].shape
                m = np.ones(shape, dtype=bool)
                for t in ins:
                    m &= np.broadcast_to(mask_of(t), shape)
                new = [m]
            elif node.op_type in STRUCTURAL:
                data = set(ins) if node.op_type == "Concat" else {node.input[0]}
                feeds = []
                for i, t in enumerate(node.input):
                    if not t:
                        feeds.append(None)
                    elif t in data or (i == 0):
                        feeds.append(mask_of(t))
                    elif t in full:
                        feeds.append(value_of(t))
                    else:
                        raise LookupError(t)  # an index input only partly known
                new = [np.asarray(x, dtype=bool) for x in _eval(node, feeds, opsets)]
            else:
                continue
        except Exception as exc:  # noqa: BLE001 - an op we cannot interpret stays unknown
            log.debug("static: %s '%s' left unknown (%s)", node.op_type, node.name, exc)
            continue
        for o, m in zip(outs, new, strict=False):
            if m.shape != values[o].shape:
                continue
            if m.all():
                full.add(o)
            elif m.any():
                masks[o] = m
    result = {t: masks[t] for t in tracked if t in masks and t in values}
    for t in tracked:
        if t in full and t in values:
            result[t] = np.ones(values[t].shape, dtype=bool)
    return result


_QUANTIZED_STORAGE = (np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32)


def _dequantizes(ins: list[str], outs: list[str], consts: ConstantTable, values: dict[str, np.ndarray]) -> bool:
    """Whether a node writes floats of the shape of a constant it reads stored as 8-32-bit integers,
    beside a floating-point constant no larger (the scale): the dequantization of a stored weight
    (DequantizeLinear), whose output is never folded. onnxruntime runs a quantized model's integer
    kernels only while the dequantization stays in the graph, and a folded weight would be stored as
    float. (Slice or Gather of a float table by int32 indices writes another shape than the indices', and
    is folded as before.)"""
    if len(outs) != 1 or not np.issubdtype(values[outs[0]].dtype, np.floating):
        return False
    shape = tuple(values[outs[0]].shape)
    size = int(np.prod(shape, dtype=np.int64))
    stored = any(t in consts and consts.dtype(t) in _QUANTIZED_STORAGE and tuple(consts.shape(t)) == shape
                 for t in ins)
    scaled = any(t in consts and np.issubdtype(consts.dtype(t), np.floating)
                 and int(np.prod(consts.shape(t), dtype=np.int64)) <= size for t in ins)
    return stored and scaled


def proven_static(model: onnx.ModelProto, values: dict[str, np.ndarray], tracked: set[str],
                  stand_ins: dict[tuple[str, str], str] | None = None) -> set[str]:
    """The tensors of ``tracked`` whose every element is the same for every input."""
    return {t for t, m in known_elements(model, values, tracked, stand_ins).items() if m.all()}
