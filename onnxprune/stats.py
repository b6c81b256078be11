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

from onnxprune import registry
from onnxprune.model import ConstantTable, Shapes, default_opset, model_bytes

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

    def to_json(self) -> dict:
        return {"nodes": self.nodes, "ops": dict(self.ops), "params": self.params, "macs": self.macs,
                "size_bytes": self.size_bytes, "macs_by_op": dict(self.macs_by_op)}


# ----------------------------------------------------------------------------------------------
# MAC formulas for ops without a handler that counts them (a registered handler's macs() wins)


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


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


def node_macs(node: onnx.NodeProto, opset: int, shape_of: ShapeOf, const_of: ConstOf) -> int:
    """MACs of one node: the handler's ``macs()`` where a handler overrides it, else the formulas
    above, else 0."""
    import onnxprune.handlers  # noqa: F401  (registers the handlers)

    domain = "" if node.domain in ("", "ai.onnx") else node.domain
    h = registry.lookup(domain, node.op_type, opset)
    if h is not None and type(h).macs is not registry.Handler.macs:
        return int(h.macs(node, shape_of, const_of) or 0)
    fn = FALLBACK_MACS.get((domain, node.op_type))
    return int(fn(node, shape_of, const_of)) if fn is not None else 0


# ----------------------------------------------------------------------------------------------
# shapes: symbolic dims take the real input sizes


def _input_names(model: onnx.ModelProto) -> list[str]:
    inits = {i.name for i in model.graph.initializer}
    return [vi.name for vi in model.graph.input if vi.name not in inits]


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
    from onnxprune import model as io

    pinned: dict[str, tuple[int, ...]] = {}
    for name in _input_names(model):
        s = shapes.get(name)
        if s is not None and any(shapes.is_dynamic(name, ax) and d != 1 for ax, d in enumerate(s)):
            pinned[name] = tuple(int(d) for d in s)
    if not pinned:
        return shapes.get
    try:
        with _pinned_inputs(model, pinned):
            real = io.infer_shapes(model, pinned, needed=needed)
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


def model_stats(model: onnx.ModelProto, shapes: Shapes, consts: ConstantTable | None = None) -> ModelStats:
    """Op counts, parameters and MACs of ``model`` at the concrete shapes of ``shapes``."""
    import onnxprune.handlers  # noqa: F401

    ops = Counter(n.op_type for n in model.graph.node if n.op_type != "Constant")
    consts = consts if consts is not None else ConstantTable.of(model.graph)
    opset = default_opset(model) or 0
    counted = [n for n in model.graph.node if _counts_macs(n, opset)]
    needed = {t for n in counted for t in list(n.input) + list(n.output) if t}
    shape_of = real_shapes(model, shapes, needed)
    by_op: Counter = Counter()
    for node in counted:
        m = node_macs(node, opset, shape_of, consts.get)
        if m:
            by_op[node.op_type] += m
    return ModelStats(nodes=sum(ops.values()), ops=ops, params=count_params(consts), macs=int(sum(by_op.values())),
                      size_bytes=model_bytes(model), macs_by_op=by_op)


def _counts_macs(node: onnx.NodeProto, opset: int) -> bool:
    domain = "" if node.domain in ("", "ai.onnx") else node.domain
    if (domain, node.op_type) in FALLBACK_MACS:
        return True
    h = registry.lookup(domain, node.op_type, opset)
    return h is not None and type(h).macs is not registry.Handler.macs


def stats_at(model: onnx.ModelProto | str, input_shapes: dict[str, tuple[int, ...]] | None = None) -> ModelStats:
    """Stats of a model file or proto at the given input shapes (no pruning analysis needed)."""
    from onnxprune import model as io

    if not isinstance(model, onnx.ModelProto):
        model = io.load(model)
    opset = default_opset(model) or 0
    needed = {t for n in model.graph.node if _counts_macs(n, opset) for t in list(n.input) + list(n.output) if t}
    feeds = io.make_inputs(model, input_shapes)  # the concrete input sizes (generated where not given)
    pinned = {k: tuple(v.shape) for k, v in feeds.items()}
    with _pinned_inputs(model, pinned):
        shapes = io.infer_shapes(model, pinned, needed=needed)
        return model_stats(model, shapes)


def human(n: float, unit: str = "") -> str:
    for div, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= div:
            return f"{n / div:.2f}{suffix}{unit}"
    return f"{n:.0f}{unit}"


def delta(before: float, after: float) -> str:
    if before == 0:
        return "-"
    return f"{(after - before) / before * 100:+.1f}%"
