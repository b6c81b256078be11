"""Model statistics: op counts, parameters, MACs (on concrete shapes), file size.

Definitions, so that the numbers can be compared with other tools:

* **MACs** are the multiply-accumulates of the ops that multiply by weights or by each other, at the
  model's concrete input shapes (``--input-shape``; otherwise the generated inputs: batch 1,
  224x224 images, other dynamic dims 16):

  - Conv: ``N·Cout·prod(out spatial)·Cin/group·prod(kernel)``; ConvTranspose: ``N·Cin·prod(in
    spatial)·Cout/group·prod(kernel)``;
  - Gemm: ``M·N·K``; MatMul: ``prod(output)·K``, for a weight operand and for two activations alike,
    so attention (``Q·Kᵀ`` and ``softmax·V``, which exporters write as MatMuls) is counted;
    Einsum with two operands: the product of all index sizes; ``Attention`` (opset 23):
    ``Q·Kᵀ`` and ``·V``;
  - LSTM/GRU/RNN: the gate matrix products, ``seq·batch·(|W| + |R|)``.

  Each formula is the ``macs()`` of the op's handler (``handlers/``; Einsum and Attention have
  handlers for their MACs only, the analysis treats them as unknown ops); this module only walks
  the nodes and asks the registry.

  Inside an If, *both* branches are counted (every node of every branch the analysis follows, at the
  shapes the branch has when it runs alone on the probe inputs, ``analysis.subgraphs``): which branch
  runs depends on input values, and the count is of what the model holds, so it does not change with
  them. A model whose If picks one of two networks (silero-vad: 16 kHz or 8 kHz) counts both. A
  branch that does not run alone has no shapes and counts 0; Loop and Scan bodies are not counted.

  Not counted: bias adds, BatchNorm/LayerNorm/InstanceNorm, activations, pooling, Softmax,
  attention's scaling and elementwise ops. Torch-Pruning's ``tp.utils.count_ops_and_params`` adds
  those (BatchNorm 2 per element, activations and pooling 1 per element, conv/linear bias adds,
  softmax and Q scaling inside ``nn.MultiheadAttention``); its conv/linear/attention matrix products
  are what we count (see tests/test_macs.py: ResNet-50 and MobileNetV2 agree exactly on these, the
  totals differ by 0.8% and 6.1% respectively, all of it BN, activations and pooling).

* **tp_ops** (``ModelStats.tp_ops``) is a second count, computed from the same graph with the
  conventions of Torch-Pruning's ``tp.utils.count_ops_and_params`` (torch_pruning/utils/op_counter.py,
  which hooks modules only): Conv/ConvTranspose ``N·prod(out spatial)·|W|`` plus a bias add per output
  element; Gemm ``M·N·K`` plus ``|C|`` (a Linear's bias counted once, not per row), MatMul with a
  weight plus ``|b|`` of the Add of a constant bias after it; BatchNormalization, LayerNormalization,
  InstanceNormalization, GroupNormalization 2 per input element; Relu, PRelu, Elu, LeakyRelu, Gelu,
  Erf (exact GELU as exported), Clip(0, 6) (ReLU6) 1 per output element; MaxPool, AveragePool and
  global pooling 1 per input element; Resize/Upsample the output elements of one sample; attention
  (Q·Kᵀ → Softmax → ·V between activations), as ``nn.MultiheadAttention`` is counted: the products,
  plus Q scaling (|Q|), softmax (1 per score), in-projection bias per element (|Q|+|K|+|V|) and
  out-projection bias per element (|P·V|), the projections' bias adds not counted again;
  LSTM/GRU/RNN the gate products plus biases and TP's per-step gate arithmetic. Zero, as in TP
  (whose hooks do not see functional code or unlisted modules): residual and other elementwise
  Add/Mul, Sigmoid, HardSigmoid, HardSwish, SiLU, Tanh, Softmax outside attention, Clip other than
  (0, 6), ReduceMean, Einsum, Dropout/Identity. What the ONNX graph cannot tell: a pooling written
  functionally (MobileNetV2's ``adaptive_avg_pool2d``) is counted here and not by TP, attention built
  from ``nn.Linear`` + functional matmuls is counted like ``nn.MultiheadAttention`` (TP counts only
  the Linears), and a BatchNorm folded into the conv by the exporter is gone from the graph, so a
  BN-folded export has 2 per element less per BN than the torch module (compare on ``bn="unfused"``).
  Like ``macs``, tp_ops is for the whole input batch; TP divides its total by the batch size.
  Per node, the count is the ``tp_ops()`` of the op's handler (its ``tp_per_input``/``tp_per_output``
  by default); only the attention pattern, which spans nodes, is found here.

* **Parameters** are the elements of floating-point constants (initializers and Constant nodes),
  each tensor once. A BatchNorm folded into a convolution by the exporter leaves its shift as the
  conv bias and its scale inside the weight, so the folded model has one vector per BN fewer than
  the torch module; an unfolded BN also counts its running mean and variance (buffers in torch).
  A quantized model's weights count too: constants of 8- and 16-bit integers (int8, uint8, int16,
  uint16), which shape data never uses; int32 and int64 constants do not count (a quantized bias is
  int32, and so are some exporters' shape constants).
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx

from onnxprune.analysis.contract import ConstOf, Handler, Registry, ShapeOf, numel
from onnxprune.analysis.shapes import Shapes, infer_shapes
from onnxprune.analysis.subgraphs import followed_graphs, follower, with_body_shapes
from onnxprune.handlers import REGISTRY
from onnxprune.handlers.gemm import is_linear
from onnxprune.ir.graph import ScopedConstantTable, default_opset, input_feeds_spec
from onnxprune.ir.io import load, model_bytes
from onnxprune.ir.tensors import ConstantTable
from onnxprune.runtime.inputs import make_inputs

log = logging.getLogger(__name__)


@dataclass
class ModelStats:
    nodes: int
    ops: Counter = field(default_factory=Counter)
    params: int = 0
    macs: int = 0
    size_bytes: int = 0
    macs_by_op: Counter = field(default_factory=Counter)
    tp_ops: int = 0  # Torch-Pruning-compatible count (see the module docstring); an extra, not MACs

    def to_json(self) -> dict:
        return {"nodes": self.nodes, "ops": dict(self.ops), "params": self.params, "macs": self.macs,
                "size_bytes": self.size_bytes, "macs_by_op": dict(self.macs_by_op), "tp_ops": self.tp_ops}


# ----------------------------------------------------------------------------------------------
# MACs: the op knowledge is in the handlers (``Handler.macs``)


def node_macs(node: onnx.NodeProto, opset: int, shape_of: ShapeOf, const_of: ConstOf,
              registry: Registry = REGISTRY) -> int:
    """MACs of one node: its handler's ``macs()``, or 0 for an op without a handler."""
    h = registry.for_node(node, opset)
    return int(h.macs(node, shape_of, const_of) or 0) if h is not None else 0


def _counts_macs(node: onnx.NodeProto, opset: int, registry: Registry = REGISTRY) -> bool:
    h = registry.for_node(node, opset)
    return h is not None and h.counts_macs()


# ----------------------------------------------------------------------------------------------
# Torch-Pruning-compatible count (tp_ops; conventions in the module docstring): each handler's
# ``tp_ops()``, plus the attention blocks, a pattern across nodes that stays here

# attention's scores: Softmax between a MatMul of two activations and a MatMul with V
_SCORES = "Softmax"


def _needs_shapes(node: onnx.NodeProto, opset: int, registry: Registry) -> bool:
    """Whether counting ``node`` reads shapes (so they are worth a probe run where inference fails)."""
    if node.op_type == _SCORES:
        return True
    h = registry.for_node(node, opset)
    return h is not None and (h.counts_macs() or h.counts_tp())


class _CountGraph:
    """The ``CountGraph`` handlers see while counting: producers, constants, and the bias adds that
    an attention block already counted."""

    def __init__(self, graph: onnx.GraphProto, is_const: Callable[[str], bool]):
        self._is_const = is_const
        self.producers = {o: n for n in graph.node for o in n.output if o}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for n in graph.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.counted: set[int] = set()  # ids of the Add/Gemm nodes whose bias is an attention extra

    def is_const(self, name: str) -> bool:
        return self._is_const(name)

    def producer(self, name: str) -> onnx.NodeProto | None:
        return self.producers.get(name)

    def bias_counted(self, node: onnx.NodeProto) -> bool:
        return id(node) in self.counted


def _attention_extras(graph: onnx.GraphProto, g: _CountGraph, shape_of: ShapeOf,
                      facts: Callable[[onnx.NodeProto], Handler]) -> int:
    """Attention as ``nn.MultiheadAttention`` is counted: Q·Kᵀ -> Softmax -> ·V between activations
    gives Q scaling, softmax, and the in- and out-projection bias adds per element (whose nodes are
    then marked counted). The path from a projection to the products runs through the ops whose
    handler ``carries_tensor``; a projection's bias is its handler's ``linear_bias``."""
    extras = 0

    def projection_bias(name: str, backward: bool) -> bool:
        seen = 0
        frontier = [name]
        while frontier and seen < 64:
            t = frontier.pop()
            seen += 1
            nodes = [g.producers[t]] if backward and t in g.producers else ([] if backward else g.consumers.get(t, []))
            for n in nodes:
                h = facts(n)
                if h.linear_bias(n, g) is not None:
                    g.counted.add(id(n))
                    return True
                if n.op_type == "MatMul" and is_linear(n, g) and not backward:
                    frontier.extend(o for o in n.output if o)
                elif h.carries_tensor:  # (a scale's or a shape's branch ends at Sqrt, Shape, Concat)
                    frontier.extend(t for t in (n.input if backward else n.output) if t and not g.is_const(t))
        return False

    for sm in graph.node:
        if sm.op_type != _SCORES:
            continue
        qk = g.producer(sm.input[0])
        pvs = [n for n in g.consumers.get(sm.output[0], []) if n.op_type == "MatMul"]
        if qk is None or qk.op_type != "MatMul" or any(g.is_const(i) for i in qk.input) or len(pvs) != 1:
            continue
        pv = pvs[0]
        v = pv.input[1] if pv.input[0] == sm.output[0] else pv.input[0]
        if g.is_const(v):
            continue
        extras += numel(shape_of(qk.input[0]))  # Q scaling
        extras += numel(shape_of(qk.output[0]))  # softmax, 1 per score
        for t in (qk.input[0], qk.input[1], v):  # in-projection bias adds, per element
            if projection_bias(t, backward=True):
                extras += numel(shape_of(t))
        projection_bias(pv.output[0], backward=False)
        extras += numel(shape_of(pv.output[0]))  # out-projection bias add (TP: always)
    return extras


def tp_ops(graph: onnx.GraphProto, opset: int, shape_of: ShapeOf, const_of: ConstOf,
           is_const: Callable[[str], bool] | None = None, registry: Registry = REGISTRY) -> int:
    """Operations of ``graph`` counted as Torch-Pruning's ``count_ops_and_params`` counts the torch
    module it was exported from (see the module docstring): the attention blocks, then every node's
    handler ``tp_ops()``. ``is_const``: whether a tensor is a constant, without decoding it
    (default: ``const_of``)."""
    if is_const is None:
        is_const = lambda name: const_of(name) is not None  # noqa: E731
    g = _CountGraph(graph, is_const)
    total = _attention_extras(graph, g, shape_of, lambda n: registry.facts_of(n, opset))
    for n in graph.node:
        h = registry.for_node(n, opset)
        if h is not None:
            total += h.tp_ops(n, shape_of, const_of, g)
    return int(total)


# ----------------------------------------------------------------------------------------------
# shapes: symbolic dims take the real input sizes


def _input_names(model: onnx.ModelProto) -> list[str]:
    return [vi.name for vi in input_feeds_spec(model)]


@contextlib.contextmanager
def _pinned_inputs(model: onnx.ModelProto, pinned: dict[str, tuple[int, ...]]):
    """Temporarily give the graph inputs in ``pinned`` these static shapes (restored on exit)."""
    saved = {}
    for vi in model.graph.input:
        if vi.name in pinned and vi.type.HasField("tensor_type"):
            saved[vi.name] = onnx.TypeProto()
            saved[vi.name].CopyFrom(vi.type)
            shp = vi.type.tensor_type.shape
            del shp.dim[:]
            for d in pinned[vi.name]:
                shp.dim.add().dim_value = int(d)
    try:
        yield model
    finally:
        for vi in model.graph.input:
            if vi.name in saved:
                vi.type.CopyFrom(saved[vi.name])


def real_shapes(model: onnx.ModelProto, shapes: Shapes, needed: set[str] | None = None) -> ShapeOf:
    """``shapes.get``, except where a dynamic input dim has a size other than 1.

    The analysis shapes write a symbolic dim that shape inference carries through the graph (batch,
    sequence length) as 1. That is harmless for channels but wrong for MACs at a real input size
    (``--input-shape x=8x3x224x224``, a sequence of 128): there the graph's inputs are pinned to
    their concrete sizes for one more shape inference (and, for what it leaves unknown, an
    onnxruntime run on the tensors in ``needed``)."""
    pinned: dict[str, tuple[int, ...]] = {}
    for name in _input_names(model):
        s = shapes.get(name)
        if s is not None and any(shapes.is_dynamic(name, ax) and d != 1 for ax, d in enumerate(s)):
            pinned[name] = tuple(int(d) for d in s)
    if not pinned:
        return shapes.get
    try:
        with _pinned_inputs(model, pinned):
            real = infer_shapes(model, pinned, needed=needed)
    except Exception as exc:  # noqa: BLE001 - fall back to the analysis shapes
        log.debug("shapes at the real input sizes failed: %s", exc)
        return shapes.get

    def shape_of(name: str) -> tuple[int, ...] | None:
        s = real.get(name)
        return s if s is not None else shapes.get(name)

    return shape_of


# ----------------------------------------------------------------------------------------------
# stats


_QUANTIZED_WEIGHTS = (np.int8, np.uint8, np.int16, np.uint16)


def count_params(consts: ConstantTable) -> int:
    return sum(int(np.prod(consts.shape(n), dtype=np.int64)) for n in consts.names()
               if np.issubdtype(consts.dtype(n), np.floating) or consts.dtype(n) in _QUANTIZED_WEIGHTS)


def model_stats(model: onnx.ModelProto, shapes: Shapes, consts: ConstantTable | None = None,
                registry: Registry = REGISTRY) -> ModelStats:
    """Op counts, parameters and MACs of ``model`` at the concrete shapes of ``shapes``. The nodes
    and constants of the If branches the analysis follows count too, every branch (see the module
    docstring), at the branch shapes ``shapes`` holds (``analysis.subgraphs.with_body_shapes``)."""
    graphs = [model.graph, *followed_graphs(model.graph, follower(model, registry))]
    nodes = [n for g in graphs for n in g.node]
    ops = Counter(n.op_type for n in nodes if n.op_type != "Constant")
    if consts is None:
        consts = ScopedConstantTable.of_scopes(model.graph) if len(graphs) > 1 else ConstantTable.of(model.graph)
    opset = default_opset(model) or 0
    counted = [n for n in nodes if _counts_macs(n, opset, registry)]
    needed = {t for n in model.graph.node if _needs_shapes(n, opset, registry)
              for t in list(n.input) + list(n.output) if t}
    shape_of = real_shapes(model, shapes, needed)
    by_op: Counter = Counter()
    for node in counted:
        m = node_macs(node, opset, shape_of, consts.get, registry)
        if m:
            by_op[node.op_type] += m
    return ModelStats(nodes=sum(ops.values()), ops=ops, params=count_params(consts), macs=int(sum(by_op.values())),
                      size_bytes=model_bytes(model), macs_by_op=by_op,
                      tp_ops=sum(tp_ops(g, opset, shape_of, consts.get, consts.__contains__, registry) for g in graphs))


def stats_at(model: onnx.ModelProto | str, input_shapes: dict[str, tuple[int, ...]] | None = None,
             registry: Registry = REGISTRY) -> ModelStats:
    """Stats of a model file or proto at the given input shapes (no pruning analysis needed)."""
    if not isinstance(model, onnx.ModelProto):
        model = load(model)
    opset = default_opset(model) or 0
    needed = {t for n in model.graph.node if _needs_shapes(n, opset, registry)
              for t in list(n.input) + list(n.output) if t}
    feeds = make_inputs(model, input_shapes)  # the concrete input sizes (generated where not given)
    pinned = {k: tuple(v.shape) for k, v in feeds.items()}
    with _pinned_inputs(model, pinned):
        shapes = infer_shapes(model, pinned, needed=needed)
        shapes = with_body_shapes(model, shapes, registry, pinned)
        return model_stats(model, shapes, registry=registry)


def human(n: float, unit: str = "") -> str:
    for div, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= div:
            return f"{n / div:.2f}{suffix}{unit}"
    return f"{n:.0f}{unit}"


def delta(before: float, after: float) -> str:
    if before == 0:
        return "-"
    return f"{(after - before) / before * 100:+.1f}%"
