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
  - LSTM/GRU/RNN: the gate matrix products, ``seq·batch·(|W| + |R|)`` (the handler's ``macs()`` when
    one is registered).

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

* **Parameters** are the elements of floating-point constants (initializers and Constant nodes),
  each tensor once. A BatchNorm folded into a convolution by the exporter leaves its shift as the
  conv bias and its scale inside the weight, so the folded model has one vector per BN fewer than
  the torch module; an unfolded BN also counts its running mean and variance (buffers in torch).
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx

from onnxprune.analysis.contract import Handler, Registry, norm_domain
from onnxprune.analysis.shapes import Shapes, infer_shapes
from onnxprune.handlers import REGISTRY
from onnxprune.ir.attrs import attr as _attr
from onnxprune.ir.graph import default_opset, input_feeds_spec
from onnxprune.ir.io import load, model_bytes
from onnxprune.ir.tensors import ConstantTable
from onnxprune.runtime.inputs import make_inputs

log = logging.getLogger(__name__)

ShapeOf = Callable[[str], "tuple[int, ...] | None"]
ConstOf = Callable[[str], "np.ndarray | None"]


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
# MAC formulas for ops without a handler that counts them (a registered handler's macs() wins)


def _rnn_macs(node, shape_of: ShapeOf, const_of: ConstOf) -> int:
    """LSTM/GRU/RNN: every step multiplies the input by W and the hidden state by R (all gates,
    all directions): seq·batch·(|W| + |R|)."""
    xs, ws, rs = shape_of(node.input[0]), shape_of(node.input[1]), shape_of(node.input[2])
    if xs is None or ws is None or rs is None or len(xs) != 3:
        return 0
    seq, batch = (xs[1], xs[0]) if int(_attr(node, "layout", 0) or 0) == 1 else (xs[0], xs[1])
    return int(seq) * int(batch) * int(np.prod(ws, dtype=np.int64) + np.prod(rs, dtype=np.int64))


def _attention_macs(node, shape_of: ShapeOf, const_of: ConstOf) -> int:
    """ai.onnx Attention (opset 23): Q·Kᵀ and probabilities·V."""
    q, k, v = (shape_of(node.input[i]) if len(node.input) > i and node.input[i] else None for i in range(3))
    if q is None or k is None or v is None:
        return 0
    if len(q) == 4 and len(k) == 4 and len(v) == 4:  # (B, H, S, d)
        b, h, sq, dk = q
        skv, dv = k[2], v[3]
        return int(b * h * sq * skv * (dk + dv))
    if len(q) == 3 and len(k) == 3 and len(v) == 3:  # (B, S, H·d)
        hq = int(_attr(node, "q_num_heads", 1) or 1)
        hkv = int(_attr(node, "kv_num_heads", 1) or 1)
        b, sq, qd = q
        skv = k[1]
        dk, dv = qd // hq, v[2] // hkv
        return int(b * hq * sq * skv * (dk + dv))
    return 0


def _einsum_macs(node, shape_of: ShapeOf, const_of: ConstOf) -> int:
    """Two-operand Einsum: the product of the sizes of all indices (each output element sums over the
    contracted ones)."""
    eq = _attr(node, "equation", b"")
    eq = eq.decode() if isinstance(eq, bytes) else str(eq)
    if len(node.input) != 2 or "..." in eq or "->" not in eq:
        return 0
    lhs = eq.replace(" ", "").split("->")[0].split(",")
    sizes: dict[str, int] = {}
    for term, name in zip(lhs, node.input, strict=False):
        s = shape_of(name)
        if s is None or len(s) != len(term):
            return 0
        for ch, d in zip(term, s, strict=True):
            sizes[ch] = max(sizes.get(ch, 1), int(d))
    return int(np.prod(list(sizes.values()), dtype=np.int64)) if sizes else 0


FALLBACK_MACS: dict[tuple[str, str], Callable[..., int]] = {
    ("", "LSTM"): _rnn_macs,
    ("", "GRU"): _rnn_macs,
    ("", "RNN"): _rnn_macs,
    ("", "Attention"): _attention_macs,
    ("", "Einsum"): _einsum_macs,
}


def node_macs(node: onnx.NodeProto, opset: int, shape_of: ShapeOf, const_of: ConstOf,
              registry: Registry = REGISTRY) -> int:
    """MACs of one node: the handler's ``macs()`` where a handler overrides it, else the formulas
    above, else 0."""
    domain = norm_domain(node.domain)
    h = registry.lookup(domain, node.op_type, opset)
    if h is not None and type(h).macs is not Handler.macs:
        return int(h.macs(node, shape_of, const_of) or 0)
    fn = FALLBACK_MACS.get((domain, node.op_type))
    return int(fn(node, shape_of, const_of)) if fn is not None else 0


# ----------------------------------------------------------------------------------------------
# Torch-Pruning-compatible count (tp_ops; conventions in the module docstring)

_TP_ACTIVATIONS = {"Relu", "PRelu", "Elu", "LeakyRelu", "Gelu", "Erf"}  # nn.ReLU/PReLU/ELU/LeakyReLU/GELU
_TP_POOLS = {"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool"}
_TP_NORMS = {"BatchNormalization", "LayerNormalization", "InstanceNormalization", "GroupNormalization"}
_TP_RNN_GATE_OPS = {"LSTM": 10, "GRU": 7, "RNN": 1}  # TP's elementwise gate arithmetic, x hidden size
# ops that carry a tensor between attention's projections and its matrix products
_TP_PASS = {"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Cast", "Gather", "Split",
            "Slice", "Mul", "Div", "Dropout"}
TP_SHAPE_OPS = ({"Conv", "ConvTranspose", "Gemm", "MatMul", "Add", "Clip", "Softmax", "Resize", "Upsample"}
                | _TP_ACTIVATIONS | _TP_POOLS | _TP_NORMS | set(_TP_RNN_GATE_OPS))


def _numel(s) -> int:
    return int(np.prod(s, dtype=np.int64)) if s is not None else 0


def _is_relu6(node, const_of: ConstOf) -> bool:
    lo, hi = _attr(node, "min"), _attr(node, "max")
    if len(node.input) > 1 and node.input[1]:
        c = const_of(node.input[1])
        lo = None if c is None else float(np.asarray(c).reshape(-1)[0])
    if len(node.input) > 2 and node.input[2]:
        c = const_of(node.input[2])
        hi = None if c is None else float(np.asarray(c).reshape(-1)[0])
    return lo == 0.0 and hi == 6.0


def tp_ops(graph: onnx.GraphProto, shape_of: ShapeOf, const_of: ConstOf,
           is_const: Callable[[str], bool] | None = None) -> int:
    """Operations of ``graph`` counted as Torch-Pruning's ``count_ops_and_params`` counts the torch
    module it was exported from (see the module docstring). ``is_const``: whether a tensor is a
    constant, without decoding it (default: ``const_of``)."""
    producer = {o: n for n in graph.node for o in n.output if o}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    if is_const is None:
        is_const = lambda name: const_of(name) is not None  # noqa: E731

    def weight_product(node) -> bool:  # a MatMul/Gemm with a constant operand: a Linear
        return node is not None and node.op_type in ("MatMul", "Gemm") and any(is_const(i) for i in node.input[:2])

    def bias_of(add) -> str | None:  # the constant operand of an Add after a Linear's MatMul
        if add.op_type != "Add" or len(add.input) != 2:
            return None
        for b, x in ((add.input[0], add.input[1]), (add.input[1], add.input[0])):
            if is_const(b) and not is_const(x) and weight_product(producer.get(x)) and producer[x].op_type == "MatMul":
                return b
        return None

    # attention as nn.MultiheadAttention is counted: Q·Kᵀ -> Softmax -> ·V between activations
    uncounted_bias: set[int] = set()  # ids of Add/Gemm nodes whose bias is part of the attention extras
    extras = 0

    def projection_bias(name: str, backward: bool) -> bool:
        seen = 0
        frontier = [name]
        while frontier and seen < 64:
            t = frontier.pop()
            seen += 1
            nodes = [producer[t]] if backward and t in producer else ([] if backward else consumers.get(t, []))
            for n in nodes:
                if n.op_type == "Gemm" and weight_product(n):
                    if len(n.input) > 2 and n.input[2]:
                        uncounted_bias.add(id(n))
                        return True
                    continue
                if n.op_type == "Add" and bias_of(n) is not None:
                    uncounted_bias.add(id(n))
                    return True
                if n.op_type == "MatMul" and weight_product(n) and not backward:
                    frontier.extend(o for o in n.output if o)
                elif n.op_type in _TP_PASS:  # (a scale's or a shape's branch ends at Sqrt, Shape, Concat)
                    frontier.extend(t for t in (n.input if backward else n.output) if t and not is_const(t))
        return False

    for sm in graph.node:
        if sm.op_type != "Softmax":
            continue
        qk = producer.get(sm.input[0])
        pvs = [n for n in consumers.get(sm.output[0], []) if n.op_type == "MatMul"]
        if qk is None or qk.op_type != "MatMul" or any(is_const(i) for i in qk.input) or len(pvs) != 1:
            continue
        pv = pvs[0]
        v = pv.input[1] if pv.input[0] == sm.output[0] else pv.input[0]
        if is_const(v):
            continue
        extras += _numel(shape_of(qk.input[0]))  # Q scaling
        extras += _numel(shape_of(qk.output[0]))  # softmax, 1 per score
        for t in (qk.input[0], qk.input[1], v):  # in-projection bias adds, per element
            if projection_bias(t, backward=True):
                extras += _numel(shape_of(t))
        projection_bias(pv.output[0], backward=False)
        extras += _numel(shape_of(pv.output[0]))  # out-projection bias add (TP: always)

    total = extras
    for n in graph.node:
        op = n.op_type
        if op in ("Conv", "ConvTranspose"):
            out, w = shape_of(n.output[0]), shape_of(n.input[1])
            if out is not None and w is not None:
                total += out[0] * _numel(out[2:]) * _numel(w)
                if len(n.input) > 2 and n.input[2]:
                    total += _numel(out)
        elif op == "Gemm":
            total += _gemm_products(n, shape_of)
            if len(n.input) > 2 and n.input[2] and id(n) not in uncounted_bias:
                total += _numel(shape_of(n.input[2]))
        elif op == "MatMul":
            out, a = shape_of(n.output[0]), shape_of(n.input[0])
            if out is not None and a is not None:
                total += _numel(out) * int(a[-1])
        elif op == "Add":
            b = bias_of(n)
            if b is not None and id(n) not in uncounted_bias:
                total += _numel(shape_of(b))
        elif op in _TP_NORMS:
            total += 2 * _numel(shape_of(n.input[0]))
        elif op in _TP_ACTIVATIONS or (op == "Clip" and _is_relu6(n, const_of)):
            total += _numel(shape_of(n.output[0]))
        elif op in _TP_POOLS:
            total += _numel(shape_of(n.input[0]))
        elif op in ("Resize", "Upsample"):
            out = shape_of(n.output[0])
            total += _numel(out[1:]) if out else 0
        elif op in _TP_RNN_GATE_OPS:
            xs = shape_of(n.input[0])
            if xs is not None and len(xs) == 3:
                seq, batch = (xs[1], xs[0]) if int(_attr(n, "layout", 0) or 0) == 1 else (xs[0], xs[1])
                ws = shape_of(n.input[1])
                dirs = int(ws[0]) if ws else 1
                bias = _numel(shape_of(n.input[3])) if len(n.input) > 3 and n.input[3] else 0
                hidden = int(_attr(n, "hidden_size", 0) or 0)
                total += int(seq) * int(batch) * (_numel(ws) + _numel(shape_of(n.input[2])) + bias
                                                  + dirs * _TP_RNN_GATE_OPS[op] * hidden)
    return int(total)


def _gemm_products(node, shape_of: ShapeOf) -> int:
    a, y = shape_of(node.input[0]), shape_of(node.output[0])
    if a is None or y is None or len(a) != 2:
        return 0
    k = a[0] if int(_attr(node, "transA", 0) or 0) else a[1]
    return _numel(y) * int(k)


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


def count_params(consts: ConstantTable) -> int:
    return sum(int(np.prod(consts.shape(n), dtype=np.int64)) for n in consts.names()
               if np.issubdtype(consts.dtype(n), np.floating))


def model_stats(model: onnx.ModelProto, shapes: Shapes, consts: ConstantTable | None = None,
                registry: Registry = REGISTRY) -> ModelStats:
    """Op counts, parameters and MACs of ``model`` at the concrete shapes of ``shapes``."""
    ops = Counter(n.op_type for n in model.graph.node if n.op_type != "Constant")
    consts = consts if consts is not None else ConstantTable.of(model.graph)
    opset = default_opset(model) or 0
    counted = [n for n in model.graph.node if _counts_macs(n, opset, registry)]
    needed = {t for n in model.graph.node if n.op_type in TP_SHAPE_OPS or _counts_macs(n, opset, registry)
              for t in list(n.input) + list(n.output) if t}
    shape_of = real_shapes(model, shapes, needed)
    by_op: Counter = Counter()
    for node in counted:
        m = node_macs(node, opset, shape_of, consts.get, registry)
        if m:
            by_op[node.op_type] += m
    return ModelStats(nodes=sum(ops.values()), ops=ops, params=count_params(consts), macs=int(sum(by_op.values())),
                      size_bytes=model_bytes(model), macs_by_op=by_op,
                      tp_ops=tp_ops(model.graph, shape_of, consts.get, consts.__contains__))


def _counts_macs(node: onnx.NodeProto, opset: int, registry: Registry = REGISTRY) -> bool:
    domain = norm_domain(node.domain)
    if (domain, node.op_type) in FALLBACK_MACS:
        return True
    h = registry.lookup(domain, node.op_type, opset)
    return h is not None and type(h).macs is not Handler.macs


def stats_at(model: onnx.ModelProto | str, input_shapes: dict[str, tuple[int, ...]] | None = None,
             registry: Registry = REGISTRY) -> ModelStats:
    """Stats of a model file or proto at the given input shapes (no pruning analysis needed)."""
    if not isinstance(model, onnx.ModelProto):
        model = load(model)
    opset = default_opset(model) or 0
    needed = {t for n in model.graph.node if n.op_type in TP_SHAPE_OPS or _counts_macs(n, opset, registry)
              for t in list(n.input) + list(n.output) if t}
    feeds = make_inputs(model, input_shapes)  # the concrete input sizes (generated where not given)
    pinned = {k: tuple(v.shape) for k, v in feeds.items()}
    with _pinned_inputs(model, pinned):
        shapes = infer_shapes(model, pinned, needed=needed)
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
