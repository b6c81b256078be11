"""A differentiable executor of ONNX graphs in torch: the gradients Taylor, Fisher and GroupFisher
importance need, and the training step distillation needs, without converting the model.

:class:`TorchGraph` runs an ``onnx.ModelProto`` node by node in topological order. Initializers (and
the values of Constant nodes, in every scope) are *leaf tensors* made once, ``requires_grad`` chosen
by name; graph inputs are fed as arrays or tensors; :meth:`TorchGraph.run` returns the graph outputs
and, on request, named intermediate tensors, and can replace any tensor as it is produced (``edit``:
the hook a channel mask multiplies in). Subgraphs (If, Loop) run in a scope that sees the enclosing
ones.

**One op, one home.** The torch forward of an op lives beside its handler: a handler class defines
``torch_forward(node, inputs, op) -> tensor | sequence of tensors`` (one per output), where ``inputs``
are the node's inputs (``None`` for an omitted optional one) and ``op`` a :class:`TorchOp`, which gives
torch itself (``op.torch``, ``op.F``), attributes with their schema defaults at the model's opset, the
values of integer shape inputs, element types and subgraph runs. Handlers never import torch: the
executor hands it in, so the handler modules stay importable without it. A handler class that serves
several op types lists the ones it computes in ``torch_table`` (op type -> function); versions are its
classes, picked by the registry as for the analysis. Ops that no handler owns (Constant, ScatterND,
Loop, ...) have their forwards in :mod:`onnxprune.runtime.torch_ops`; an op is never in both places.

**Never a wrong gradient.** An op without a torch forward, or one whose attributes a forward does
not implement (a Resize mode, an RNN with sequence lengths, ...), makes the executor refuse with
:class:`NoTorchForward`, one line that names the op: at construction for a missing forward, when it
runs for an attribute or input value. The caller turns it into "gradient criteria disabled for this
model: <reason>". A forward reads values only from integer inputs (shapes, indices, axes) through
:meth:`TorchOp.ints`, which refuses a tensor that carries a gradient, so nothing that should be
differentiated is ever read as a constant.

**Floors.** This module sits on the runtime floor, below the handlers, so it never imports them: the
caller passes the registry (``onnxprune.handlers.REGISTRY``), as it does to the analysis. torch is an
optional dependency (``pip install onnxprune[torch]``): importing this module without it raises a
:class:`~onnxprune.errors.UserError` saying so.

**Numerics.** Float tensors keep their element type (float32 models compute in float32, as
onnxruntime does); ``dtype=torch.float64`` promotes every float32 initializer, input and cast to
float64 (finite-difference checks of gradients). ``device="auto"`` picks CUDA when torch sees a GPU;
there, convolutions follow torch's TF32 setting (``torch.backends.cudnn.allow_tf32``, on by default),
which is fine for importance scores and too coarse for a 1e-4 comparison with onnxruntime: turn it off
for that. The executor changes no global torch setting.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NoReturn

import numpy as np
import onnx

from onnxprune.errors import UserError
from onnxprune.ir.attrs import get_attr
from onnxprune.ir.graph import outer_refs
from onnxprune.ir.tensors import tensor_value
from onnxprune.runtime import torch_ops

try:
    import torch
    import torch.nn.functional as F  # noqa: N812
except ImportError:  # pragma: no cover - exercised only without torch
    raise UserError("the torch executor needs torch: pip install onnxprune[torch]") from None

logger = logging.getLogger(__name__)

Tensor = torch.Tensor
Forward = Callable[[onnx.NodeProto, list, "TorchOp"], Any]

_DTYPES: dict[int, torch.dtype] = {
    onnx.TensorProto.FLOAT: torch.float32, onnx.TensorProto.DOUBLE: torch.float64,
    onnx.TensorProto.FLOAT16: torch.float16, onnx.TensorProto.BFLOAT16: torch.bfloat16,
    onnx.TensorProto.INT8: torch.int8, onnx.TensorProto.INT16: torch.int16, onnx.TensorProto.INT32: torch.int32,
    onnx.TensorProto.INT64: torch.int64, onnx.TensorProto.UINT8: torch.uint8, onnx.TensorProto.UINT16: torch.uint16,
    onnx.TensorProto.UINT32: torch.uint32, onnx.TensorProto.UINT64: torch.uint64, onnx.TensorProto.BOOL: torch.bool,
}


class NoTorchForward(UserError):
    """The executor cannot run (or differentiate) this model: ``op`` names the op, the message is one
    line. A UserError, so a command that needs gradients and meets one exits 2 with that line."""

    def __init__(self, op: str, reason: str):
        self.op = op
        self.reason = reason
        super().__init__(f"{op}: {reason}")


def op_name(node: onnx.NodeProto) -> str:
    """``Conv`` or ``com.microsoft::Attention``, with the node's name where it has one."""
    dom = node.domain if node.domain not in ("", "ai.onnx") else ""
    base = f"{dom}::{node.op_type}" if dom else node.op_type
    return f"{base} '{node.name}'" if node.name else base


def pick_device(device: str | torch.device = "auto") -> torch.device:
    """``auto``: CUDA when torch sees a GPU, else the CPU; anything else as torch spells it."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise UserError(f"unknown torch device '{device}': {exc}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError("device 'cuda' asked for, but torch sees no GPU")
    return dev


def torch_dtype(elem_type: int, float_dtype: torch.dtype | None = None) -> torch.dtype | None:
    """The torch dtype of an ONNX element type (None: none, e.g. strings); ``float_dtype`` replaces
    float32 (the executor's float64 mode)."""
    dt = _DTYPES.get(int(elem_type))
    if dt is torch.float32 and float_dtype is not None:
        return float_dtype
    return dt


def forward_of(registry, node: onnx.NodeProto, opset: int) -> tuple[Forward | None, str]:
    """The torch forward of ``node`` and, where there is none, why (one phrase)."""
    h = registry.for_node(node, opset)
    if h is None:
        fwd = torch_ops.FORWARDS.get((node.domain if node.domain not in ("", "ai.onnx") else "", node.op_type))
        return (fwd, "") if fwd is not None else (None, "no handler and no torch forward")
    fwd = getattr(h, "torch_forward", None)
    if fwd is None:
        return None, f"handler {type(h).__name__} has no torch forward"
    table = getattr(h, "torch_table", None)
    if table is not None and node.op_type not in table:
        return None, f"handler {type(h).__name__} has no torch forward for {node.op_type}"
    return fwd, ""


class TorchOp:
    """What a torch forward sees of its node and of the executor."""

    torch = torch
    F = F

    def __init__(self, graph: TorchGraph, plan: _Plan, k: int, scope: Mapping[str, Tensor],
                 edit: Mapping[str, Callable[[Tensor], Tensor]] | None = None):
        self._graph = graph
        self._plan = plan
        self._k = k
        self.node = plan.nodes[k]
        self._scope = scope
        self._edit = edit or {}
        self.opset = graph.opset
        self.device = graph.device
        self.float_dtype = graph.float_dtype

    @property
    def where(self) -> str:
        return op_name(self.node)

    def refuse(self, reason: str) -> NoReturn:
        raise NoTorchForward(self.where, reason)

    def attr(self, name: str, default: Any = None) -> Any:
        """The node's attribute, else its schema default at the model's opset, else ``default``;
        strings are decoded."""
        v = get_attr(self.node, name, self.opset if self.node.domain in ("", "ai.onnx") else 1)
        if v is None:
            return default
        if isinstance(v, bytes):
            return v.decode()
        if isinstance(v, list) and v and isinstance(v[0], bytes):
            return [s.decode() for s in v]
        return v

    def tensor_attr(self, name: str) -> Tensor | None:
        """A TENSOR attribute (ConstantOfShape's ``value``) as a tensor on the device."""
        for a in self.node.attribute:
            if a.name == name and a.type == onnx.AttributeProto.TENSOR:
                return self.tensor(tensor_value(a.t))
        return None

    def tensor(self, value: np.ndarray | Sequence) -> Tensor:
        """A constant made here (float32 follows the float64 mode)."""
        return self._graph.as_tensor(np.asarray(value))

    def ints(self, t: Tensor | None, what: str = "value") -> list[int] | None:
        """The values of an integer input (shape, indices, axes, sizes) as Python ints (None for an
        omitted input). Refuses a tensor that carries a gradient: its value would be read as a constant."""
        if t is None:
            return None
        if t.requires_grad:
            self.refuse(f"its {what} input carries a gradient but is read as a constant")
        return [int(v) for v in t.reshape(-1).tolist()]

    def floats(self, t: Tensor | None, what: str = "value") -> list[float] | None:
        """Like :meth:`ints`, for float inputs read as constants (Resize scales, Pad's constant);
        refuses a tensor that carries a gradient."""
        if t is None:
            return None
        if t.requires_grad:
            self.refuse(f"its {what} input carries a gradient but is read as a constant")
        return [float(v) for v in t.reshape(-1).tolist()]

    def dtype(self, elem_type: int) -> torch.dtype:
        dt = torch_dtype(elem_type, self.float_dtype)
        if dt is None:
            self.refuse(f"element type {onnx.TensorProto.DataType.Name(int(elem_type))} has no torch dtype")
        return dt

    def run_subgraph(self, attr: str, inputs: Sequence[Tensor] = ()) -> list[Tensor]:
        """Run the node's subgraph ``attr`` (an If branch, a Loop body) with ``inputs`` bound to its
        inputs, in a scope that sees this node's."""
        sub = self._plan.subplans.get((self._k, attr))
        if sub is None:
            self.refuse(f"no subgraph '{attr}'")
        return self._graph.run_plan(sub, self._scope, list(inputs), self._edit)


class _Plan:
    """One scope, compiled: its nodes in topological order, their forwards, its leaves (initializers
    and Constant values) and the plans of the nodes' subgraphs, by (node index, attribute name).
    The protobuf objects are held here, so the executor never relies on the identity of a wrapper
    protobuf hands out anew on each access."""

    def __init__(self, graph: onnx.GraphProto, nodes: list[onnx.NodeProto], forwards: list[Forward]):
        self.graph = graph
        self.nodes = nodes
        self.forwards = forwards
        self.params: dict[str, Tensor] = {}
        self.subplans: dict[tuple[int, str], _Plan] = {}
        self.inputs = [i.name for i in graph.input]
        self.outputs = [o.name for o in graph.output]


class TorchGraph:
    """An ONNX model as a torch computation.

    ``registry``: the handler registry (``onnxprune.handlers.REGISTRY``). ``requires_grad``: names of
    initializers (or Constant outputs) that become leaves with ``requires_grad``, or True for every
    float one. ``dtype``: ``torch.float64`` computes float32 models in float64. Raises
    :class:`NoTorchForward` when an op has no torch forward.
    """

    def __init__(self, model: onnx.ModelProto, registry, *, device: str | torch.device = "auto",
                 requires_grad: Iterable[str] | bool = (), dtype: torch.dtype | None = None):
        self.model = model
        self.registry = registry
        self.device = pick_device(device)
        self.float_dtype = None if dtype in (None, torch.float32) else dtype
        self.opset = next((int(i.version) for i in model.opset_import if i.domain in ("", "ai.onnx")), 1)
        self.params: dict[str, Tensor] = {}  # every scope's leaves, by name
        self.plan = self._compile(model.graph)
        self._load(self.plan, top=True)
        self._defaults = {n: self.plan.params[n] for n in self.plan.inputs if n in self.plan.params}
        self.set_requires_grad(requires_grad)

    # -- construction -----------------------------------------------------------------------------
    def _compile(self, graph: onnx.GraphProto) -> _Plan:
        nodes = _toposort(graph)
        forwards = []
        for node in nodes:
            fwd, why = forward_of(self.registry, node, self.opset)
            if fwd is None:
                raise NoTorchForward(op_name(node), why)
            forwards.append(fwd)
        plan = _Plan(graph, nodes, forwards)
        for k, node in enumerate(nodes):
            for a in node.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    plan.subplans[(k, a.name)] = self._compile(a.g)
                elif a.type == onnx.AttributeProto.GRAPHS:
                    raise NoTorchForward(op_name(node), f"attribute '{a.name}' holds several graphs")
        return plan

    def _load(self, plan: _Plan, top: bool = False) -> None:
        for init in plan.graph.initializer:
            plan.params[init.name] = self.as_tensor(tensor_value(init))
        for k, node in enumerate(plan.nodes):
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                plan.params[node.output[0]] = plan.forwards[k](node, [], TorchOp(self, plan, k, plan.params))
        for sub in plan.subplans.values():
            self._load(sub)
        for name, t in plan.params.items():
            if top and name in plan.inputs:
                continue  # an overridable default is a graph input, not a weight
            if name in self.params and self.params[name] is not t:
                logger.debug("constant '%s' is defined in more than one scope", name)
            self.params.setdefault(name, t)

    def as_tensor(self, value: np.ndarray) -> Tensor:
        if value.dtype == object:
            raise NoTorchForward("tensor", "string tensors have no torch dtype")
        if value.dtype == np.float32 and self.float_dtype is not None:
            value = value.astype(np.float64)
        if value.dtype.byteorder not in ("=", "|", "<"):
            value = value.astype(value.dtype.newbyteorder("="))
        if not value.flags.writeable or not value.flags.c_contiguous:
            value = np.array(value, copy=True, order="C")
        return torch.from_numpy(value).to(self.device)

    def set_requires_grad(self, names: Iterable[str] | bool) -> None:
        """Make the named leaves (True: every float one) require gradients; the others not."""
        if names is True:
            chosen = {n for n, t in self.params.items() if t.is_floating_point()}
        elif names is False:
            chosen = set()
        else:
            chosen = set(names)
            unknown = chosen - set(self.params)
            if unknown:
                raise UserError(f"not an initializer of the model: {', '.join(sorted(unknown))}")
        for name, t in self.params.items():
            want = name in chosen
            if want and not t.is_floating_point():
                raise UserError(f"'{name}' is not a float tensor: it cannot require a gradient")
            t.requires_grad_(want)

    # -- running ----------------------------------------------------------------------------------
    def feed(self, value) -> Tensor:
        if isinstance(value, torch.Tensor):
            t = value.to(self.device)
            if self.float_dtype is not None and t.dtype == torch.float32:
                t = t.to(self.float_dtype)
            return t
        return self.as_tensor(np.asarray(value))

    def run(self, feeds: Mapping[str, Any], *, keep: Iterable[str] = (),
            edit: Mapping[str, Callable[[Tensor], Tensor]] | None = None) -> dict[str, Tensor]:
        """The graph outputs (and the tensors named in ``keep``) on ``feeds`` (arrays or tensors, by
        graph input name). ``edit[name](t)`` replaces tensor ``name`` wherever it is read (a mask
        multiplied on a channel axis)."""
        plan = self.plan
        missing = [n for n in plan.inputs if n not in feeds and n not in self._defaults]
        if missing:
            raise UserError(f"no value fed for graph input(s) {', '.join(missing)}")
        extra = set(feeds) - set(plan.inputs)
        if extra:
            raise UserError(f"not a graph input: {', '.join(sorted(extra))}")
        env: dict[str, Tensor] = dict(self._defaults)
        env.update({n: self.feed(v) for n, v in feeds.items()})
        keep = list(keep)
        env = self._execute(plan, env, keep=set(keep), edit=dict(edit or {}), top=True)
        unknown = [k for k in keep if k not in env]
        if unknown:
            raise UserError(f"no tensor named {', '.join(unknown)} in the graph")
        out = {o: env[o] for o in plan.outputs}
        out.update({k: env[k] for k in keep})
        return out

    __call__ = run

    def run_plan(self, plan: _Plan, outer: Mapping[str, Tensor], inputs: list[Tensor],
                 edit: Mapping[str, Callable[[Tensor], Tensor]] | None = None) -> list[Tensor]:
        """Run a subgraph: ``inputs`` bound to its inputs, names it does not define read from ``outer``."""
        if len(inputs) > len(plan.inputs):
            raise NoTorchForward(f"subgraph '{plan.graph.name}'",
                                 f"{len(inputs)} inputs given, it has {len(plan.inputs)}")
        local = dict(zip(plan.inputs, inputs, strict=False))
        env = collections.ChainMap(local, outer)
        env = self._execute(plan, env, keep=set(), edit=dict(edit or {}), top=False)
        return [env[o] for o in plan.outputs]

    def _execute(self, plan: _Plan, env, *, keep: set[str], edit: dict, top: bool):
        for name, t in plan.params.items():
            if not (top and name in env):  # a fed graph input overrides its default
                env[name] = edit[name](t) if name in edit else t
        if top:
            for name in plan.inputs:
                if name in edit and name in env:
                    env[name] = edit[name](env[name])
        last = _last_use(plan, keep) if top else {}
        for k, node in enumerate(plan.nodes):
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                continue  # a leaf, made once
            xs = []
            for t in node.input:
                if not t:
                    xs.append(None)
                    continue
                try:
                    xs.append(env[t])
                except KeyError:
                    raise NoTorchForward(op_name(node), f"input '{t}' is not computed before it") from None
            op = TorchOp(self, plan, k, env, edit)
            try:
                ys = plan.forwards[k](node, xs, op)
            except NoTorchForward:
                raise
            except (RuntimeError, ValueError, IndexError, TypeError) as exc:
                msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise NoTorchForward(op_name(node), f"torch failed: {msg}") from exc
            if isinstance(ys, torch.Tensor):
                ys = (ys,)
            ys = list(ys)
            for i, name in enumerate(node.output):
                if not name:
                    continue
                if i >= len(ys) or ys[i] is None:
                    op.refuse(f"output {i} ('{name}') is not computed by its torch forward")
                env[name] = edit[name](ys[i]) if name in edit else ys[i]
            for t in last.get(k, ()):
                env.pop(t, None)
        return env


def _toposort(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """The nodes in an order where each follows the producers of its inputs (and of the names its
    subgraphs read); ties keep the file's order. A cycle raises NoTorchForward."""
    nodes = list(graph.node)
    prod: dict[str, int] = {}
    for i, n in enumerate(nodes):
        for o in n.output:
            if o:
                prod[o] = i
    deps: list[set[int]] = []
    for i, n in enumerate(nodes):
        names = set(n.input) | outer_refs(n)
        deps.append({prod[t] for t in names if t in prod and prod[t] != i})
    if all(all(d < i for d in ds) for i, ds in enumerate(deps)):
        return nodes
    users: dict[int, list[int]] = collections.defaultdict(list)
    for i, ds in enumerate(deps):
        for d in ds:
            users[d].append(i)
    pending = [len(ds) for ds in deps]
    ready = collections.deque(i for i, p in enumerate(pending) if p == 0)
    out = []
    while ready:
        i = ready.popleft()
        out.append(nodes[i])
        for u in users[i]:
            pending[u] -= 1
            if pending[u] == 0:
                ready.append(u)
    if len(out) != len(nodes):
        raise NoTorchForward(f"graph '{graph.name}'", "its nodes form a cycle")
    return out


def _last_use(plan: _Plan, keep: set[str]) -> dict[int, list[str]]:
    """node index -> the names read for the last time there (freed after it), sparing the graph's
    outputs and ``keep``."""
    spare = set(plan.outputs) | keep
    last: dict[str, int] = {}
    for k, n in enumerate(plan.nodes):
        for t in list(n.input) + sorted(outer_refs(n)):
            if t:
                last[t] = k
    out: dict[int, list[str]] = collections.defaultdict(list)
    for t, k in last.items():
        if t not in spare:
            out[k].append(t)
    return out
