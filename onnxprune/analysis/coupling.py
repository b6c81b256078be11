"""The coupling graph: channel spaces, element links and groups.

Every static tensor axis of size > 1 is a *space*; every index of a space is an *element*.
Handlers link elements of the spaces of their inputs, outputs and constants (identity, offsets,
blocks, permutations). Connected components of elements are *units* (the smallest set of indices
that must be removed together); connected components of spaces through shared units are *groups*.
A space that any op touching it does not carry is frozen, with that op's reason; a frozen space
freezes its whole group. Analysis is pure: the model is never mutated here.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from onnxprune.analysis.contract import AnalysisCtx, Handler, Node, Registry, Role
from onnxprune.analysis.shapes import Shapes
from onnxprune.analysis.subgraphs import follower
from onnxprune.errors import Barrier
from onnxprune.ir.attrs import get_attr
from onnxprune.ir.graph import (
    ScopedConstantTable,
    consumers,
    default_opset,
    graph_free_names,
    has_subgraph,
    input_feeds_spec,
    producers,
    repeated_names,
)
from onnxprune.ir.tensors import ConstantTable

log = logging.getLogger(__name__)

# frozen-reason priorities: lower is shown first
_PRIO = {"unknown": 0, "ignore": 1, "io": 2, "rule": 3, "carry": 4}

SpaceKey = tuple[str, int]


@dataclass
class Slot:
    const: str  # name of the source constant (initializer or Constant output)
    axis: int  # axis of the source constant
    role: str
    node: str  # node that declared it
    space: int  # space id of (const, axis)


@dataclass(frozen=True)
class Quantization:
    """A constant holding quantized values (``AnalysisCtx.quantized``): its real value is
    ``(value - zero_point) * scale``, per tensor (``axis`` None) or along ``axis`` of the constant."""

    zero_point: str | None  # constant name; None: 0
    scale: str | None  # constant name; None: not known here (applied by a later op)
    axis: int | None

    def along(self, v: np.ndarray, ndim: int) -> np.ndarray:
        """A per-tensor or per-axis parameter shaped to broadcast against the constant."""
        v = np.asarray(v)
        if self.axis is None or v.size == 1:
            return v.reshape(())
        shape = [1] * ndim
        shape[self.axis] = v.size
        return v.reshape(shape)


@dataclass
class Group:
    """A set of coupled channel spaces, pruned together. DepGraph's *group*."""

    id: int
    spaces: list[int]
    units: np.ndarray  # global unit labels, sorted
    frozen: list[str] = field(default_factory=list)
    approximate: list[str] = field(default_factory=list)
    slots: list[Slot] = field(default_factory=list)
    producers: list[str] = field(default_factory=list)
    nodes: list[str] = field(default_factory=list)
    attention: bool = False  # channels take part in an activation x activation MatMul (heads, head dims)
    mask_producers: bool = False  # exactness needs producers zeroed too (q/k contraction)

    @property
    def size(self) -> int:
        return int(len(self.units))

    @property
    def prunable(self) -> bool:
        return not self.frozen and self.size > 1

    @property
    def is_approximate(self) -> bool:
        return bool(self.approximate)


class CouplingGraph:
    """Result of the analysis: spaces, unit labels and groups of one model."""

    def __init__(self, model: onnx.ModelProto, shapes: Shapes, consts: ConstantTable, registry: Registry):
        self.model = model
        self.registry = registry  # the handlers this graph was analysed with (the rewrite uses them too)
        self.shapes = shapes
        self.consts = consts
        self.opset = default_opset(model) or 0
        self.space_ids: dict[SpaceKey, int] = {}
        self.space_key: list[SpaceKey] = []
        self.space_base: list[int] = []
        self.space_size: list[int] = []
        self.n_elements = 0
        self.edges_a: list[np.ndarray] = []
        self.edges_b: list[np.ndarray] = []
        self.frozen: dict[int, list[tuple[int, str]]] = defaultdict(list)
        self.approx: dict[int, list[str]] = defaultdict(list)
        self.slots: list[Slot] = []
        self.producer_nodes: dict[int, set[str]] = defaultdict(set)
        self.tensor_nodes: dict[str, set[str]] = defaultdict(set)
        self.unknown_ops: dict[str, list[str]] = defaultdict(list)
        self.labels: np.ndarray = np.zeros(0, dtype=np.int64)
        self.groups: list[Group] = []
        self.group_of_space: np.ndarray = np.zeros(0, dtype=np.int64)
        self.node_by_name: dict[str, onnx.NodeProto] = {}
        self.producer_of: dict[str, onnx.NodeProto] = {}
        self.consumers_of: dict[str, list[onnx.NodeProto]] = {}
        self.elem_types: dict[str, int] = {}
        # the analysis mode: the reshape factor preferred at attention splits ("dim", "heads" or
        # "heads-query"), "+conv-groups" appended where a grouped conv's unit is a whole conv group
        self.head_mode = "dim"
        self.attn_kind: dict[int, str] = {}  # space -> "heads" | "dim"
        self.repeat_sids: set[int] = set()  # axes whose entries are copies of one another (Expand)
        self.contract_sids: set[int] = set()
        self.quant: dict[str, Quantization] = {}  # quantized constants (``AnalysisCtx.quantized``)

    # -- spaces ------------------------------------------------------------------------------
    def space(self, tensor: str, axis: int) -> int | None:
        key = (tensor, axis)
        sid = self.space_ids.get(key)
        if sid is not None:
            return sid
        shape = self.shapes.get(tensor)
        if shape is None or axis < 0 or axis >= len(shape):
            return None
        if shape[axis] <= 1 or (self.shapes.is_dynamic(tensor, axis) and not self.shapes.batch_scaled(tensor, axis)):
            return None
        sid = len(self.space_key)
        self.space_ids[key] = sid
        self.space_key.append(key)
        self.space_base.append(self.n_elements)
        self.space_size.append(shape[axis])
        self.n_elements += shape[axis]
        return sid

    def elements(self, sid: int) -> np.ndarray:
        b = self.space_base[sid]
        return np.arange(b, b + self.space_size[sid])

    def space_labels(self, sid: int) -> np.ndarray:
        b = self.space_base[sid]
        return self.labels[b:b + self.space_size[sid]]

    # -- results -----------------------------------------------------------------------------
    def finish(self) -> None:
        n = self.n_elements
        if self.edges_a:
            a = np.concatenate(self.edges_a)
            b = np.concatenate(self.edges_b)
        else:
            a = b = np.zeros(0, dtype=np.int64)
        mat = coo_matrix((np.ones(len(a), dtype=np.int8), (a, b)), shape=(n, n))
        _, self.labels = connected_components(mat, directed=False)
        n_sp = len(self.space_key)
        sizes = np.asarray(self.space_size, dtype=np.int64)
        space_of_el = np.repeat(np.arange(n_sp), sizes)
        n_lab = int(self.labels.max()) + 1 if n else 0
        bip = coo_matrix((np.ones(n, dtype=np.int8), (space_of_el, n_sp + self.labels)),
                         shape=(n_sp + n_lab, n_sp + n_lab))
        _, comp = connected_components(bip, directed=False)
        self.group_of_space = comp[:n_sp]
        self._build_groups(comp, n_sp)

    def _build_groups(self, comp: np.ndarray, n_sp: int) -> None:
        by_comp: dict[int, list[int]] = defaultdict(list)
        slot_comps: set[int] = set()
        for s in self.slots:
            slot_comps.add(int(comp[s.space]))
        # weights behind a barrier (unknown op) declare no slots: list their groups too, so the
        # report and the coverage line count what the tool did not understand
        for sid, reasons in self.frozen.items():
            if self.space_key[sid][0] in self.consts and any(p == _PRIO["unknown"] for p, _ in reasons):
                slot_comps.add(int(comp[sid]))
        for sid in range(n_sp):
            c = int(comp[sid])
            if c in slot_comps:
                by_comp[c].append(sid)
        groups = []
        slots_by_comp: dict[int, list[Slot]] = defaultdict(list)
        for s in self.slots:
            slots_by_comp[int(comp[s.space])].append(s)
        for c in sorted(by_comp, key=lambda c: min(by_comp[c])):
            sids = by_comp[c]
            units = np.unique(np.concatenate([self.space_labels(s) for s in sids]))
            frozen = sorted({r for s in sids for r in self.frozen.get(s, [])})
            approx = sorted({r for s in sids for r in self.approx.get(s, [])})
            producers = sorted({p for s in sids for p in self.producer_nodes.get(s, ())})
            nodes = sorted({nd for s in sids for nd in self.tensor_nodes.get(self.space_key[s][0], ())})
            g = Group(id=len(groups), spaces=sids, units=units, frozen=[r for _, r in frozen],
                      approximate=approx, slots=slots_by_comp[c], producers=producers, nodes=nodes,
                      attention=any(s in self.attn_kind for s in sids),
                      mask_producers=any(s in self.contract_sids for s in sids))
            if not producers and not g.frozen:
                g.frozen.append("no weights produce these channels")
            groups.append(g)
        self.groups = groups

    def zero_value(self, const: str, ndim: int) -> np.ndarray:
        """The value of constant ``const`` that means zero, broadcastable against it: its zero point
        where it holds quantized values, else 0."""
        q = self.quant.get(const)
        zp = self.consts.get(q.zero_point) if q is not None and q.zero_point else None
        return np.zeros(()) if zp is None else q.along(zp, ndim)

    def zeroed(self, const: str, arr: np.ndarray, where: list[tuple[int, np.ndarray]]) -> np.ndarray:
        """A copy of ``arr`` (the value of ``const``) with the indices ``where`` lists per axis set to the
        value that means zero (``zero_value``)."""
        arr = np.array(arr, copy=True)
        fill = np.broadcast_to(self.zero_value(const, arr.ndim).astype(arr.dtype), arr.shape)
        for ax, idx in where:
            sl = [slice(None)] * arr.ndim
            sl[ax] = idx
            arr[tuple(sl)] = fill[tuple(sl)]
        return arr

    def real_value(self, const: str) -> np.ndarray | None:
        """The value of ``const``, dequantized (``(q - zero_point) * scale``) where it holds quantized
        values, in float32 (float64 when the scale is)."""
        v = self.consts.get(const)
        q = self.quant.get(const)
        if v is None or q is None:
            return v
        scale = self.consts.get(q.scale) if q.scale else None
        dtype = np.float64 if scale is not None and scale.dtype == np.float64 else np.float32
        real = v.astype(dtype) - self.zero_value(const, v.ndim).astype(dtype)
        return real * q.along(scale, v.ndim).astype(dtype) if scale is not None else real

    def unit_index(self, group: Group, sid: int) -> np.ndarray:
        """Unit index (0..group.size-1) of every element of space ``sid``."""
        return np.searchsorted(group.units, self.space_labels(sid))

    def kept_elements(self, group: Group, keep_units: np.ndarray, sid: int) -> np.ndarray:
        mask = np.zeros(group.size, dtype=bool)
        mask[keep_units] = True
        return np.flatnonzero(mask[self.unit_index(group, sid)])

    def coverage(self) -> tuple[int, int]:
        """(prunable channels, all channels) over groups with weights, counted in producer spaces."""
        total = prunable = 0
        for g in self.groups:
            total += g.size
            if g.prunable:
                prunable += g.size
        return prunable, total


class AnalysisContext:
    """What a handler sees while analysing one node (the :class:`AnalysisCtx` Protocol)."""

    def __init__(self, cg: CouplingGraph):
        self.cg = cg
        self.node: onnx.NodeProto | None = None
        self.covered: set[SpaceKey] = set()
        self.deferred: list[tuple[onnx.NodeProto, Callable[[AnalysisCtx], None]]] = []
        self._phase2 = False
        self._uf: list[int] = []
        self._graph_outputs = {o.name for o in cg.model.graph.output}

    # -- queries -------------------------------------------------------------------------------
    @property
    def opset(self) -> int:
        return self.cg.opset

    @property
    def head_mode(self) -> str:
        head = self.cg.head_mode.split("+")[0]
        return "heads" if head.startswith("heads") else head

    @property
    def gqa_unit(self) -> str:
        return "query" if self.cg.head_mode.split("+")[0] == "heads-query" else "kv"

    @property
    def conv_groups(self) -> str:
        return "whole" if "conv-groups" in self.cg.head_mode.split("+")[1:] else "positions"

    def shape(self, name: str) -> tuple[int, ...] | None:
        return self.cg.shapes.get(name) if name else None

    def rank(self, name: str) -> int | None:
        s = self.shape(name)
        return None if s is None else len(s)

    def is_dynamic(self, name: str, axis: int) -> bool:
        return self.cg.shapes.is_dynamic(name, axis)

    def producer(self, name: str) -> Node | None:
        return self.cg.producer_of.get(name)

    def consumers(self, name: str) -> Sequence[Node]:
        return self.cg.consumers_of.get(name, ())

    def is_graph_output(self, name: str) -> bool:
        return name in self._graph_outputs

    def elem_type(self, name: str) -> int | None:
        return self.cg.elem_types.get(name)

    def handler_of(self, node: Node) -> Handler:
        return self.cg.registry.facts_of(node, self.opset)

    def const(self, name: str) -> np.ndarray | None:
        """Value of a constant, seen through the ops that show one (``shows_constant``: Identity,
        Cast, Transpose)."""
        src = self.const_source(name)
        if src is None:
            return None
        shp = self.cg.consts.shape(src[0])
        if shp is not None and int(np.prod(shp, dtype=np.int64)) > 4096:
            return None  # weights are never shape data: do not read them here
        value = self.cg.consts.get(src[0])
        return np.transpose(value, src[1]) if value.ndim > 1 else value

    def value(self, name: str) -> np.ndarray | None:
        """A constant (static shape computations were folded into constants before analysis)."""
        return self.const(name)

    def const_source(self, name: str) -> tuple[str, tuple[int, ...]] | None:
        """(constant name, axis map from this tensor's axes to the constant's) or None.

        Follows the ops whose handler ``shows_constant`` (Identity, Cast, Transpose), at most 16.
        """
        perm: list[int] | None = None
        cur = name
        for _ in range(16):
            if cur in self.cg.consts:
                rank = len(self.cg.consts.shape(cur))
                return cur, tuple(perm) if perm is not None else tuple(range(rank))
            prod = self.producer(cur)
            if prod is None:
                return None
            h = self.handler_of(prod)
            if not h.shows_constant:
                return None
            p = h.view_axes(prod, self)
            if p is None:
                return None
            # output axis i is input axis p[i]
            perm = p if perm is None else [p[perm_i] for perm_i in perm]
            cur = prod.input[0]
        return None

    def attr(self, name: str, node: Node | None = None):
        return get_attr(self.node if node is None else node, name, self.opset)

    def has_space(self, tensor: str, axis: int) -> bool:
        return self.cg.space(tensor, axis) is not None

    # -- declarations --------------------------------------------------------------------------
    def cover(self, tensor: str, axis: int | None = None) -> None:
        if not tensor:
            return
        if axis is None:
            r = self.rank(tensor) or 0
            for ax in range(r):
                self.covered.add((tensor, ax))
        else:
            self.covered.add((tensor, _norm_axis(axis, self.rank(tensor))))

    def _covered_spaces(self, ta: str, aa: int, tb: str, ab: int) -> tuple[int | None, int | None]:
        """Cover both axes; their space ids (None: dynamic or size 1)."""
        aa = _norm_axis(aa, self.rank(ta))
        ab = _norm_axis(ab, self.rank(tb))
        self.cover(ta, aa)
        self.cover(tb, ab)
        return self.cg.space(ta, aa), self.cg.space(tb, ab)

    def identity(self, ta: str, aa: int, tb: str, ab: int) -> None:
        """Element i of (ta, aa) is element i of (tb, ab)."""
        sa, sb = self._covered_spaces(ta, aa, tb, ab)
        if sa is None or sb is None:
            if (sa is None) != (sb is None):
                # a static axis meets a dynamic or size-1 one: cannot follow it
                sid = sa if sa is not None else sb
                self._freeze_sid(sid, "rule", f"{self._where()}: axis sizes differ")
            return
        if self.cg.space_size[sa] != self.cg.space_size[sb]:
            self._freeze_sid(sa, "rule", f"{self._where()}: axis sizes differ")
            self._freeze_sid(sb, "rule", f"{self._where()}: axis sizes differ")
            return
        self._add_edges(self.cg.elements(sa), self.cg.elements(sb))
        self._union(sa, sb)

    def link(self, ta: str, aa: int, ia: np.ndarray, tb: str, ab: int, ib: np.ndarray) -> None:
        """Element ia[k] of (ta, aa) is coupled with element ib[k] of (tb, ab)."""
        sa, sb = self._covered_spaces(ta, aa, tb, ab)
        if sa is None or sb is None:
            for sid in (sa, sb):
                if sid is not None:
                    self._freeze_sid(sid, "rule", f"{self._where()}: linked axis is dynamic or size 1")
            return
        ia = np.asarray(ia, dtype=np.int64)
        ib = np.asarray(ib, dtype=np.int64)
        self._add_edges(self.cg.space_base[sa] + ia, self.cg.space_base[sb] + ib)
        self._union(sa, sb)

    def slot(self, tensor: str, axis: int, role: Role | str) -> None:
        """Axis ``axis`` of input ``tensor`` is a weight slot with ``role``."""
        role = Role(role)
        axis = _norm_axis(axis, self.rank(tensor))
        self.cover(tensor, axis)
        sid = self.cg.space(tensor, axis)
        if sid is None:
            return
        if role == Role.PRODUCER:
            self.cg.producer_nodes[sid].add(self.node.name)
        src = self.const_source(tensor)
        if src is None:
            if role == Role.CONSUMER:
                self.approximate(tensor, axis, f"{self._where()}: contracts channels with a computed "
                                               f"(non-constant) operand")
            return
        cname, amap = src
        caxis = amap[axis]
        csid = self.cg.space(cname, caxis)
        if csid is None:
            return
        if csid != sid:
            # the chain of Identity/Cast/Transpose links them through its own handlers
            pass
        self.cg.slots.append(Slot(cname, caxis, role, self.node.name, csid))
        if role == Role.PRODUCER:
            self.cg.producer_nodes[csid].add(self.node.name)

    def approximate(self, tensor: str, axis: int, reason: str) -> None:
        axis = _norm_axis(axis, self.rank(tensor))
        sid = self.cg.space(tensor, axis)
        if sid is not None:
            self.cg.approx[sid].append(reason)

    def freeze(self, tensor: str, axis: int | None, reason: str, kind: str = "rule") -> None:
        if not tensor:
            return
        axes = range(self.rank(tensor) or 0) if axis is None else [_norm_axis(axis, self.rank(tensor))]
        for ax in axes:
            self.cover(tensor, ax)
            sid = self.cg.space(tensor, ax)
            if sid is not None:
                self._freeze_sid(sid, kind, reason)

    def mark_attention(self, tensor: str, axis: int, kind: str) -> None:
        """Axis of an activation x activation MatMul: ``heads`` (a batch axis) or ``dim``."""
        sid = self.cg.space(tensor, _norm_axis(axis, self.rank(tensor)))
        if sid is not None:
            self.cg.attn_kind.setdefault(sid, kind)

    def mark_repeat(self, tensor: str, axis: int) -> None:
        """Axis whose entries are copies of one another (Expand of a size-1 axis): kind "repeat"."""
        sid = self.cg.space(tensor, _norm_axis(axis, self.rank(tensor)))
        if sid is not None:
            self.cg.repeat_sids.add(sid)

    def mark_contraction(self, tensor: str, axis: int) -> None:
        """Exact act x act contraction: masking must zero the producers of the removed positions."""
        sid = self.cg.space(tensor, _norm_axis(axis, self.rank(tensor)))
        if sid is not None:
            self.cg.contract_sids.add(sid)

    def quantized(self, tensor: str, zero_point: str | None, scale: str | None, axis: int | None) -> None:
        """Record that the constant behind ``tensor`` (if any) holds quantized values (the Protocol's
        docstring); the zero point and scale must be constants themselves."""
        src = self.const_source(tensor)
        if src is None:
            return
        cname, amap = src
        names = []
        for what, t in (("zero point", zero_point), ("scale", scale)):
            if not t:
                names.append(None)
                continue
            s = self.const_source(t)
            if s is None:
                raise Barrier(f"the {what} '{t}' of quantized constant '{cname}' is computed")
            names.append(s[0])
        caxis = None if axis is None else amap[_norm_axis(axis, self.rank(tensor))]
        q = Quantization(names[0], names[1], caxis)
        old = self.cg.quant.get(cname)
        if old is not None and not self._same_quantization(old, q):
            raise Barrier(f"constant '{cname}' is dequantized with two different scales or zero points")
        self.cg.quant[cname] = q

    def _same_quantization(self, a, b) -> bool:
        """Same axis and the same values (untied copies of one parameter have other names)."""
        def value(name):
            return None if name is None else self.cg.consts.get(name)

        def same(x, y):
            return (x is None) == (y is None) and (x is None or np.array_equal(np.ravel(x), np.ravel(y)))

        return a.axis == b.axis and same(value(a.zero_point), value(b.zero_point)) and same(value(a.scale), value(b.scale))

    def class_kind(self, tensor: str, axis: int) -> set[str]:
        """Attention kinds marked anywhere in the identity class of (tensor, axis) (phase 2)."""
        sid = self.cg.space(tensor, _norm_axis(axis, self.rank(tensor)))
        if sid is None:
            return set()
        return self._kinds_by_root.get(self._find(sid), set())

    def defer(self, fn: Callable[[AnalysisCtx], None]) -> None:
        """Run ``fn`` after every node was analysed once (``class_frozen`` is then meaningful)."""
        self.deferred.append((self.node, fn))

    def class_frozen(self, tensor: str, axis: int) -> bool:
        sid = self.cg.space(tensor, _norm_axis(axis, self.rank(tensor)))
        if sid is None:
            return True
        root = self._find(sid)
        return root in self._frozen_roots

    # -- internals -------------------------------------------------------------------------------
    def _where(self) -> str:
        return f"{self.node.op_type} '{self.node.name}'" if self.node is not None else "graph"

    def _freeze_sid(self, sid: int, kind: str, reason: str) -> None:
        self.cg.frozen[sid].append((_PRIO[kind], reason))

    def _add_edges(self, a: np.ndarray, b: np.ndarray) -> None:
        self.cg.edges_a.append(np.asarray(a, dtype=np.int64))
        self.cg.edges_b.append(np.asarray(b, dtype=np.int64))

    def _find(self, x: int) -> int:
        uf = self._uf
        while len(uf) <= x:
            uf.append(len(uf))
        root = x
        while uf[root] != root:
            root = uf[root]
        while uf[x] != root:
            uf[x], x = root, uf[x]
        return root

    def _union(self, a: int, b: int) -> None:
        ra, rb = self._find(a), self._find(b)
        if ra != rb:
            self._uf[ra] = rb


def _norm_axis(axis: int, rank: int | None) -> int:
    if axis < 0 and rank is not None:
        return axis + rank
    return axis


def analyze(model: onnx.ModelProto, shapes: Shapes, registry: Registry, consts: ConstantTable | None = None,
            head_mode: str = "dim") -> CouplingGraph:
    """Build the coupling graph of ``model`` (pure).

    ``head_mode`` decides what a unit is where an attention projection is split into heads:
    ``"dim"`` (a head-dimension position, shared by every head) or ``"heads"`` (a whole head; in
    grouped-query attention a whole KV group), or ``"heads-query"`` (whole heads; in grouped-query
    attention a query-head position within every KV group).

    The nodes of the subgraphs the analysis follows (``analysis.subgraphs``: If branches whose
    tensors all have shapes) are analysed like the main graph's; what a subgraph reads from outside
    is an ordinary tensor, and the op's handler links what its subgraphs return to its outputs.
    """
    consts = consts or ConstantTable.of(model.graph)
    g = model.graph
    follows = follower(model, registry)
    order = _analysis_order(model, follows, shapes)
    bodies = [b for _, how in order if how is not None for b in how.followed]
    if bodies:  # names are unique across scopes (``follower``): one table for every scope
        consts = ScopedConstantTable.of_scopes(g, consts)
    cg = CouplingGraph(model, shapes, consts, registry)
    cg.head_mode = head_mode
    cg.producer_of = producers(g)
    cg.elem_types = shapes.elem_types
    cg.consumers_of = defaultdict(list, consumers(g))
    for body in bodies:
        cg.producer_of.update(producers(body))
        for t, readers in consumers(body).items():
            cg.consumers_of[t].extend(readers)
    for node, how in order:
        for body in how.followed if how is not None else []:  # the op reads what its subgraphs return
            for o in body.output:
                if o.name:
                    cg.consumers_of[o.name].append(node)
    ctx = AnalysisContext(cg)
    for i, (node, how) in enumerate(order):
        if not node.name:
            node_name = f"{node.op_type}_{i}"
        else:
            node_name = node.name
        cg.node_by_name[node_name] = node
        refs = sorted({r for body, _ in how.barred for r in graph_free_names(body)}) if how is not None else []
        for t in list(node.input) + list(node.output) + refs:
            if t:
                cg.tensor_nodes[t].add(node_name)
    # graph inputs and outputs are frozen
    for vi in input_feeds_spec(model):
        ctx.freeze(vi.name, None, f"graph input '{vi.name}'", kind="io")
    for vi in g.output:
        ctx.freeze(vi.name, None, f"graph output '{vi.name}'", kind="io")
    for node, how in order:
        _analyze_node(node, ctx, how)
    # phase 2: decisions that depend on what is frozen (reshape factor choice)
    def refresh():
        ctx._frozen_roots = {ctx._find(sid) for sid in cg.frozen}
        kinds: dict[int, set[str]] = defaultdict(set)
        for sid, kind in cg.attn_kind.items():
            kinds[ctx._find(sid)].add(kind)
        for sid in cg.repeat_sids:
            kinds[ctx._find(sid)].add("repeat")
        ctx._kinds_by_root = kinds

    refresh()
    for node, fn in ctx.deferred:
        ctx.node = node
        fn(ctx)
        refresh()
    ctx.node = None
    cg.finish()
    return cg


@dataclass
class _Scopes:
    """How the analysis treats the subgraphs of one node: those it follows (their nodes are
    analysed, what they read from outside is theirs to link) and, for each other, why not."""

    followed: list[onnx.GraphProto] = field(default_factory=list)
    barred: list[tuple[onnx.GraphProto, str]] = field(default_factory=list)


def _analysis_order(model: onnx.ModelProto, follows: Callable[[onnx.NodeProto], bool],
                    shapes: Shapes) -> list[tuple[onnx.NodeProto, _Scopes | None]]:
    """Every node to analyse, the nodes of a followed subgraph right before the op that holds it,
    with how its subgraphs are treated (None: it has none). Constant nodes are left out."""
    repeated = repeated_names(model.graph) if any(has_subgraph(n) for n in model.graph.node) else []
    out: list[tuple[onnx.NodeProto, _Scopes | None]] = []

    def walk(graph: onnx.GraphProto) -> None:
        for node in graph.node:
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                continue
            if not has_subgraph(node):
                out.append((node, None))
                continue
            how = _scopes(node, follows, shapes, repeated)
            for body in how.followed:
                walk(body)
            out.append((node, how))

    walk(model.graph)
    return out


def _scopes(node: onnx.NodeProto, follows: Callable[[onnx.NodeProto], bool], shapes: Shapes,
            repeated: list[str]) -> _Scopes:
    """Which subgraphs of ``node`` the analysis follows into, and why not into the others."""
    bodies = [(a.name, b) for a in node.attribute
              for b in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs))]
    if repeated:
        more = f" and {len(repeated) - 1} more" if len(repeated) > 1 else ""
        why = f"names repeat across subgraphs ('{repeated[0]}'{more})"
        return _Scopes(barred=[(b, why) for _, b in bodies])
    if not follows(node):
        return _Scopes(barred=[(b, "its op is not followed into its subgraphs") for _, b in bodies])
    how = _Scopes()
    for attr, body in bodies:
        unknown = [o for n in body.node for o in n.output if o and shapes.get(o) is None]
        if len(body.input):
            how.barred.append((body, f"its {attr} has inputs of its own"))
        elif unknown:
            how.barred.append((body, f"shapes inside its {attr} are unknown: it does not run alone at the "
                                     f"analysis inputs ('{unknown[0]}')"))
        else:
            how.followed.append(body)
    return how


def _analyze_node(node: onnx.NodeProto, ctx: AnalysisContext, how: _Scopes | None = None) -> None:
    """``how``: how the node's subgraphs are treated (``_analysis_order``; None: it has none)."""
    cg = ctx.cg
    ctx.node = node
    ctx.covered = set()
    domain = node.domain or ""
    handler = cg.registry.for_node(node, cg.opset)
    tensors = [t for t in list(node.input) + list(node.output) if t]
    refs: set[str] = set()
    for body, why in (how.barred if how is not None else []):
        free = sorted(graph_free_names(body))
        for t in free:
            ctx.freeze(t, None, f"{ctx._where()}: read inside its subgraph ({why})", kind="unknown")
        refs.update(free)
    tensors.extend(sorted(refs - set(tensors)))
    if how is not None and not how.followed and handler is not None and handler.follows_subgraphs:
        # an op that returns what its subgraphs compute, followed into none: nothing is carried
        for t in tensors:
            ctx.freeze(t, None, f"{ctx._where()}: {how.barred[0][1]}", kind="unknown")
        return
    if handler is None or not handler.follows_channels:  # facts-only handlers are barriers too
        op = f"{domain}::{node.op_type}" if domain not in ("", "ai.onnx") else node.op_type
        cg.unknown_ops[op].append(node.name)
        for t in tensors:
            ctx.freeze(t, None, f"unknown op {op} ('{node.name}')", kind="unknown")
        return
    try:
        handler.analyze(node, ctx)
    except Barrier as exc:
        for t in tensors:
            ctx.freeze(t, None, f"{ctx._where()}: {exc}", kind="unknown")
        return
    for t in tensors:
        r = ctx.rank(t) or 0
        for ax in range(r):
            if (t, ax) not in ctx.covered:
                sid = cg.space(t, ax)
                if sid is not None:
                    ctx._freeze_sid(sid, "carry", f"{ctx._where()} does not carry axis {ax} of '{t}'")
