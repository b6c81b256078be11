"""The handler contract: what a handler is, what it may see, and how handlers are registered.

A handler owns all knowledge of its op: how channels flow through it (``analyze``), how its
attributes and shape constants change (``rewrite``), how much it computes (``macs``, ``tp_ops``)
and the facts other code asks about it (the ``ClassVar`` attributes of :class:`Handler`: whether a
constant is seen through it, whether it only moves values, which inputs only set shapes, ...).
Handlers see a model only through the Protocols below (:class:`AnalysisCtx`, :class:`RewriteCtx`,
:class:`CountGraph`), never through the coupling graph itself.

Versions are classes: a behaviour change across opsets is a subclass with its own ``since``, and a
:class:`Registry` holds one instance per ``(domain, op_type, since)`` and looks up the greatest
``since`` <= the model's opset for the domain. The registry is built from an explicit list of
handler modules (``onnxprune.handlers.REGISTRY``) and passed to the analysis by its caller.

A handler with ``follows_channels = False`` only declares facts (MACs, shape inputs, counts): the
analysis treats its op exactly like an op without a handler (a barrier, listed as unknown).
"""

from __future__ import annotations

import functools
import types
from collections import defaultdict
from collections.abc import Callable, Sequence
from enum import Enum
from typing import Any, ClassVar, Protocol, TypeAlias

import numpy as np
import onnx

Node: TypeAlias = onnx.NodeProto
ShapeOf = Callable[[str], "tuple[int, ...] | None"]
ConstOf = Callable[[str], "np.ndarray | None"]


class Role(str, Enum):
    """What a weight axis is to the channels of its space.

    PRODUCER: writes the channels (conv filters); CONSUMER: reads them (input-channel axis: zeroed in
    the masked original); SCALE: multiplies them (BatchNorm gamma); PARAM: is added or applied per
    channel (biases); STAT: statistics per channel (running mean and variance); QUANT: a quantization
    parameter per channel (the scale or zero point of a quantized constant or activation): sliced with
    the channels, never zeroed.
    """

    PRODUCER = "producer"
    CONSUMER = "consumer"
    SCALE = "scale"
    PARAM = "param"
    STAT = "stat"
    QUANT = "quant"

    def __str__(self) -> str:
        return self.value


class AnalysisCtx(Protocol):
    """What a handler sees while analysing one node (implemented by ``coupling.AnalysisContext``).

    Axes may be negative (counted from the end). A *space* is a static tensor axis of size > 1.
    """

    # -- queries ---------------------------------------------------------------------------------
    @property
    def head_mode(self) -> str:
        """What a unit is where an attention projection is split into heads: "dim" or "heads"."""

    @property
    def gqa_unit(self) -> str:
        """With "heads", what a unit is in grouped-query attention (query heads made of repeated KV
        heads): "kv" (a KV head with the query heads reading it) or "query" (a query-head position
        within every KV group)."""

    @property
    def conv_groups(self) -> str:
        """What a unit is in a grouped convolution (``group`` > 1, several channels per group):
        "positions" (one in-group position in every conv group; the groups stay) or "whole" (one conv
        group; ``group`` shrinks)."""

    def shape(self, name: str) -> tuple[int, ...] | None: ...

    def rank(self, name: str) -> int | None: ...

    def attr(self, name: str, node: Node | None = None) -> Any:
        """Attribute of the node being analysed (or of ``node``), else its schema default."""

    def const(self, name: str) -> np.ndarray | None:
        """Value of a small constant, seen through the ops that show one (Identity, Cast, ...)."""

    def value(self, name: str) -> np.ndarray | None:
        """A constant value (static shape computations were folded into constants)."""

    def const_source(self, name: str) -> tuple[str, tuple[int, ...]] | None:
        """(constant name, its axis for each axis of ``name``), or None if ``name`` is computed."""

    def has_space(self, tensor: str, axis: int) -> bool: ...

    def producer(self, name: str) -> Node | None: ...

    def consumers(self, name: str) -> Sequence[Node]: ...

    def is_graph_output(self, name: str) -> bool: ...

    def elem_type(self, name: str) -> int | None:
        """``onnx.TensorProto`` element type, where known."""

    def handler_of(self, node: Node) -> Handler:
        """The handler of another node, for its declared facts (:data:`UNKNOWN` if it has none)."""

    # -- declarations ----------------------------------------------------------------------------
    def cover(self, tensor: str, axis: int | None = None) -> None:
        """This node carries the axis (or every axis) without linking it to anything."""

    def identity(self, ta: str, aa: int, tb: str, ab: int) -> None:
        """Element i of (ta, aa) is element i of (tb, ab)."""

    def link(self, ta: str, aa: int, ia: np.ndarray, tb: str, ab: int, ib: np.ndarray) -> None:
        """Element ia[k] of (ta, aa) is coupled with element ib[k] of (tb, ab)."""

    def slot(self, tensor: str, axis: int, role: Role) -> None:
        """Axis ``axis`` of input ``tensor`` is a weight slot with ``role``."""

    def approximate(self, tensor: str, axis: int, reason: str) -> None:
        """Removing channels of this axis changes the result (the group is approximate)."""

    def freeze(self, tensor: str, axis: int | None, reason: str, kind: str = "rule") -> None: ...

    def mark_attention(self, tensor: str, axis: int, kind: str) -> None:
        """Axis of an activation x activation MatMul: ``heads`` (a batch axis) or ``dim``."""

    def mark_repeat(self, tensor: str, axis: int) -> None:
        """Axis whose entries are copies of one another (an Expand of a size-1 axis); ``class_kind``
        then holds "repeat" for its class."""

    def mark_contraction(self, tensor: str, axis: int) -> None:
        """Exact only when the removed positions are zero (an act x act contraction, a quantization
        range taken over the whole tensor): masking must zero the producers of the removed positions."""

    def quantized(self, tensor: str, zero_point: str | None, scale: str | None, axis: int | None) -> None:
        """Input ``tensor`` holds quantized values: its real value is ``(tensor - zero_point) * scale``,
        both per tensor (``axis`` None) or 1-D along ``axis`` of ``tensor``; no ``zero_point``: 0, no
        ``scale``: unknown (applied later). Where ``tensor`` is a constant, the masked original (and
        soft pruning) set its removed channels to the zero point, the value that dequantizes to 0, and
        weight importance scores the real values. Raises Barrier if the constant is already declared
        with other parameters (one constant, two meanings of zero)."""

    # -- phase 2 (after every node was analysed once) ----------------------------------------------
    def defer(self, fn: Callable[[AnalysisCtx], None]) -> None: ...

    def class_frozen(self, tensor: str, axis: int) -> bool: ...

    def class_kind(self, tensor: str, axis: int) -> set[str]: ...


class RewriteCtx(Protocol):
    """What a handler sees while fixing one node (implemented by ``rewrite.apply.RewriteContext``).

    Shapes are the analysed ones (``old_shape``) and those the plan gives (``new_shape``).
    """

    def old_shape(self, t: str) -> tuple[int, ...] | None: ...

    def new_shape(self, t: str) -> tuple[int, ...] | None: ...

    def kept(self, t: str, axis: int) -> np.ndarray:
        """Indices of axis ``axis`` of ``t`` that the plan keeps (all where it changes nothing)."""

    def is_dynamic(self, t: str, axis: int) -> bool: ...

    def same_dynamic_size(self, a: str, axis_a: int, b: str, axis_b: int) -> bool:
        """Whether dynamic axis ``axis_a`` of ``a`` and axis ``axis_b`` of ``b`` had the same size at
        both probe sizes (``b``'s axis is a copy of ``a``'s)."""

    def const(self, name: str) -> np.ndarray | None: ...

    def value(self, name: str) -> np.ndarray | None: ...

    def producer(self, name: str) -> Node | None: ...

    def consumers(self, name: str) -> list[Node]: ...

    def handler_of(self, node: Node) -> Handler: ...

    def clone_producer(self, consumer: Node, idx: int) -> Node:
        """Give ``consumer`` a private copy of the node producing its input ``idx``."""

    def attr(self, node: Node, name: str) -> Any: ...

    def set_attr(self, node: Node, name: str, value: Any) -> None: ...

    def remove_attr(self, node: Node, name: str) -> None: ...

    def set_input_const(self, node: Node, idx: int, value: np.ndarray) -> None:
        """Give input ``idx`` of ``node`` a new constant of its own (clone on write)."""

    def add_input_const(self, node: Node, idx: int, value: np.ndarray) -> None: ...


class CountGraph(Protocol):
    """What a handler sees of the graph while counting one node (``measure/stats.py``)."""

    def is_const(self, name: str) -> bool: ...

    def producer(self, name: str) -> Node | None: ...

    def bias_counted(self, node: Node) -> bool:
        """Whether this node's bias add was already counted with an attention block."""


def numel(shape: Sequence[int] | None) -> int:
    return int(np.prod(shape, dtype=np.int64)) if shape is not None else 0


class Handler:
    """Base class. Subclasses set ``op_types`` (and ``domain``, ``since``), the facts that hold for
    their ops, and override the methods whose default does not fit.

    The facts are declared data that other code reads through the registry; each default says
    "the op computes something of its own" (so an op without a handler is never assumed to move
    values, keep zeros or be shape arithmetic).
    """

    op_types: ClassVar[tuple[str, ...]] = ()
    domain: ClassVar[str] = ""
    since: ClassVar[int] = 1

    # False: only facts are declared; the analysis treats the op as unknown (a barrier)
    follows_channels: ClassVar[bool] = True
    # the analysis follows channels into the op's subgraphs (If): their nodes are analysed like any
    # other, the tensors they read from outside are ordinary tensors, and ``analyze`` links what the
    # subgraphs return to the op's outputs. False: every tensor a subgraph reads is frozen
    follows_subgraphs: ClassVar[bool] = False
    # output 0 shows input 0's value, axes reordered by ``view_axes`` (Identity, Cast, Transpose): a
    # weight slot reaches a constant through it
    shows_constant: ClassVar[bool] = False
    # output 0 holds values of input 0, only moved (layout ops): a zero-preserving chain from a
    # weight-producing op continues through it (gemm.zero_preserving)
    moves_values: ClassVar[bool] = False
    # an all-zero input 0 gives an all-zero output: a computed zero RNN state is traced through it
    keeps_zeros: ClassVar[bool] = False
    # Torch-Pruning count: passes a tensor on between attention's projections and its products
    carries_tensor: ClassVar[bool] = False
    # a default-domain op whose onnx shape inference gives this op's output shapes (contrib ops onnx
    # does not know: FusedConv -> Conv); used to prove sizes static (analysis/static.py)
    shape_stand_in: ClassVar[str | None] = None
    # integer arithmetic on shape vectors: a Shape's value is still only shape data after it
    shape_arith: ClassVar[bool] = False
    # inputs whose value only sets a shape or indexes (a Shape's value ends there harmlessly)
    shape_sinks: ClassVar[frozenset[int]] = frozenset()
    # Torch-Pruning count (``tp_ops``' default): operations per element of input 0 / output 0
    tp_per_input: ClassVar[int] = 0
    tp_per_output: ClassVar[int] = 0
    # integer products, as input indices (activation, weight, weight's zero point): the op computes
    # (a - a_zp)·(w - w_zp) exactly in int32 and takes a uint8 weight as well as an int8 one, so an int8
    # weight and its zero point re-expressed as uint8 (both + 128) define the same integers; with a
    # uint8 activation, kernels without saturation then compute them (measure.verify, integer-exact rule)
    integer_products: ClassVar[tuple[tuple[int, int, int], ...]] = ()

    def analyze(self, node: Node, ctx: AnalysisCtx) -> None:
        raise NotImplementedError

    def rewrite(self, node: Node, rw: RewriteCtx) -> None:
        """Fix attributes and shape constants after the channels changed. Default: nothing to fix."""

    def macs(self, node: Node, shape_of: ShapeOf, const_of: ConstOf) -> int:
        """Multiply-accumulates (definition in ``measure/stats.py``). Default: none."""
        return 0

    def tp_ops(self, node: Node, shape_of: ShapeOf, const_of: ConstOf, graph: CountGraph) -> int:
        """Operations as Torch-Pruning counts them (conventions in ``measure/stats.py``)."""
        n = 0
        if self.tp_per_input:
            n += self.tp_per_input * numel(shape_of(node.input[0]))
        if self.tp_per_output:
            n += self.tp_per_output * numel(shape_of(node.output[0]))
        return n

    def linear_bias(self, node: Node, graph: CountGraph) -> str | None:
        """Torch-Pruning count: the constant bias this node adds to an ``nn.Linear`` product, if any."""
        return None

    def view_axes(self, node: Node, ctx: AnalysisCtx) -> list[int] | None:
        """For ``shows_constant`` ops: the input-0 axis of each output axis (None: rank unknown)."""
        r = ctx.rank(node.input[0])
        return None if r is None else list(range(r))

    @classmethod
    def counts_tp(cls) -> bool:
        """Whether ``tp_ops`` can be non-zero (the count then needs this node's shapes)."""
        return cls.tp_ops is not Handler.tp_ops or bool(cls.tp_per_input or cls.tp_per_output)

    @classmethod
    def counts_macs(cls) -> bool:
        return cls.macs is not Handler.macs


class _Unknown(Handler):
    """The facts of an op without a handler: every default."""

    follows_channels = False


UNKNOWN = _Unknown()


class DuplicateHandler(Exception):  # noqa: N818
    pass


class InvalidSince(Exception):  # noqa: N818
    pass


def register(cls: type[Handler]) -> type[Handler]:
    """Class decorator: marks a handler class for :meth:`Registry.of_modules` (which registers it
    under every op type it lists, at its ``since``)."""
    cls._registered = True
    return cls


def norm_domain(domain: str) -> str:
    return "" if domain in ("", "ai.onnx") else domain


@functools.cache
def schema_versions() -> dict[tuple[str, str], tuple[int, ...]]:
    """``(domain, op_type)`` -> the opset versions at which onnx (re)defined the op's schema."""
    out: dict[tuple[str, str], set[int]] = defaultdict(set)
    for s in onnx.defs.get_all_schemas_with_history():
        out[(norm_domain(s.domain), s.name)].add(int(s.since_version))
    return {k: tuple(sorted(v)) for k, v in out.items()}


# ops onnxruntime defines in the default domain itself (its optimizer writes them there), at version 1
ORT_DEFAULT_DOMAIN_OPS = frozenset({("", "SimplifiedLayerNormalization")})


def check_since(handler: type[Handler]) -> None:
    """Refuse a ``since`` that does not fall where the op's spec changed.

    For a domain onnx defines (the default one, ``ai.onnx.ml``, ...), every op type must be an onnx
    op, and ``since`` must be either a version at which its schema was (re)defined
    (``onnx.defs.get_schema(op, since).since_version == since``), or at most its first version
    (meaning "from the op's first version on": base classes of op families use 1). A class boundary
    between two schema versions would handle two models with the same spec of the op differently,
    which is a typo or a misreading of the changelog. Other domains (``com.microsoft`` lives in
    onnxruntime, not in ``onnx.defs``) are only checked for ``since >= 1``.
    """
    name, since = handler.__name__, handler.since
    if not isinstance(since, int) or since < 1:
        raise InvalidSince(f"{name}: since must be an opset version >= 1, not {since!r}")
    domain = norm_domain(handler.domain)
    versions = schema_versions()
    if domain not in {d for d, _ in versions}:
        return
    for op in handler.op_types:
        known = versions.get((domain, op))
        where = f"{domain}::{op}" if domain else op
        if known is None and (domain, op) in ORT_DEFAULT_DOMAIN_OPS:
            known = (1,)  # onnxruntime's own schema, at version 1
        if known is None:
            raise InvalidSince(f"{name}: onnx {onnx.__version__} defines no op {where}")
        if since > known[0] and since not in known:
            raise InvalidSince(f"{name}: {where} did not change at opset {since} (its schema versions: "
                               f"{', '.join(map(str, known))}); since must be one of them or <= {known[0]}")


class Registry:
    """Handlers by ``(domain, op_type)``, each list sorted by ``since``."""

    def __init__(self) -> None:
        self._entries: dict[tuple[str, str], list[tuple[int, Handler]]] = defaultdict(list)

    @classmethod
    def of_modules(cls, modules: list[types.ModuleType]) -> Registry:
        """Register every class marked with :func:`register` that a module defines (not imports)."""
        reg = cls()
        for mod in modules:
            for obj in vars(mod).values():
                if (isinstance(obj, type) and issubclass(obj, Handler) and obj.__dict__.get("_registered")
                        and obj.__module__ == mod.__name__):
                    reg.add(obj)
        return reg

    def add(self, handler: type[Handler]) -> type[Handler]:
        """Register ``handler`` under each of its op types; raises :class:`InvalidSince` (see
        :func:`check_since`) or :class:`DuplicateHandler` before changing anything."""
        check_since(handler)
        keys = [(norm_domain(handler.domain), op) for op in handler.op_types]
        for key in keys:
            if any(since == handler.since for since, _ in self._entries.get(key, ())):
                raise DuplicateHandler(f"handler for {key} since {handler.since} registered twice")
        inst = handler()
        for key in keys:
            self._entries[key].append((handler.since, inst))
            self._entries[key].sort(key=lambda x: x[0])
        return handler

    def lookup(self, domain: str, op_type: str, opset: int) -> Handler | None:
        entries = self._entries.get((norm_domain(domain), op_type))
        if not entries:
            return None
        best = None
        for since, inst in entries:
            if since <= opset:
                best = inst
        return best

    def for_node(self, node: Node, opset: int) -> Handler | None:
        """The handler of ``node`` in a model of default-domain ``opset`` (other domains: version 1)."""
        domain = norm_domain(node.domain)
        return self.lookup(domain, node.op_type, opset if domain == "" else 1)

    def facts_of(self, node: Node, opset: int) -> Handler:
        """Like :meth:`for_node`, but :data:`UNKNOWN` (every fact at its default) where none."""
        h = self.for_node(node, opset)
        return UNKNOWN if h is None else h

    def items(self) -> dict[tuple[str, str], list[tuple[int, Handler]]]:
        return dict(self._entries)

    def shape_stand_ins(self) -> dict[tuple[str, str], str]:
        """``(domain, op_type) -> default-domain op`` for every handler that declares ``shape_stand_in``."""
        return {key: entries[-1][1].shape_stand_in for key, entries in self._entries.items()
                if entries and entries[-1][1].shape_stand_in}
