"""Gradient criteria (``taylor``, ``hessian``, ``fisher``, ``group-fisher``) and Torch-Pruning's weight
criteria (``lamp``, ``fpgm``): one score per unit of a group, shaped like ``importance.group_importance``.
Here nothing runs a model: ``gradient_request`` says what to differentiate, the caller runs
``runtime.gradients.collect_gradients`` on the fit share of the calibration data, and
``gradient_scores`` turns the sums into scores.

Terms. A *member* of a group is what one score vector comes from, as in Torch-Pruning (TP) 1.6.1,
where a member is one (layer, pruning function) of a group: here a weight slot (``Slot``: a
constant's axis with a role) or a consumer tap (``data_importance.consumer_taps``: the data operand
of a node whose weight contracts the group's channels). Each member gives a value per element of its
axis; a unit's value is the sum over its elements there (one element per unit in ordinary groups).

Members per criterion (``members="tp"``, the default: the members Torch-Pruning 1.6.1 actually
scores, so the scores agree with its on the same graph; biases are never members, TP's
``bias=False``):

- weight criteria (``taylor`` parameter form, ``hessian``, ``lamp``): the producer and consumer weight
  axes (Conv, ConvTranspose, Gemm, MatMul, recurrent weights: TP's conv/linear out and in channels)
  and the scale of LayerNormalization and BatchNormalization, with two exceptions TP 1.6.1 makes
  without saying so: its importance classes list the pruning functions of ordinary convolutions
  only, so a *depthwise* convolution (``group`` equal to its output channels, more than one: TP's
  ``DEPTHWISE_CONV``, which has its own pruning function) is never a member; and ``taylor`` leaves
  BatchNormalization out (its BatchNorm branch tests for the GroupNorm pruning function).
  ``members="all"`` counts both;
- ``fpgm``: producer and consumer axes only (TP: "FPGM should not care about BatchNorm and LayerNorm");
- ``taylor`` activation form, ``fisher``: the group's consumer taps;
- ``group-fisher``: one shared mask over the group's units at every consumer tap (``MaskSet``).

Per member, per element e of its axis (sums over every other axis of the weight; n samples; G the
gradient of the summed loss, g_i a sample's):

- ``taylor`` (parameter form, TP's TaylorImportance, Molchanov et al. 2019): ``sum |W * G|``;
- ``taylor`` activation form (Molchanov et al. 2017): ``mean_i |dL_i/dm_e|``, with
  ``dL_i/dm_e = sum over positions of a_e * dL_i/da_e``;
- ``hessian`` (OBD with the diagonal Fisher, TP's HessianImportance): ``sum 1/2 W² * mean_i g_i²``;
- ``fisher``: ``1/2 mean_i (dL_i/dm_e)²``, the Fisher information of a mask on the tap;
- ``lamp``: ``sum W²`` (TP's magnitude, p = 2), then the LAMP normalization below;
- ``fpgm``: TP's form: the rows of ``|W|^p`` (p = 2) along the axis, each scored by the sum of its
  Euclidean distances to the other rows (filters near the geometric median are redundant).

Reduction over the members (``group_reduction``, TP's ``_reduce``): ``mean`` (the default; per unit,
over the members that cover it), ``sum``, ``max``, ``prod``, ``first`` (the first member only:
producers first, then the others in graph order). Then the *normalizer* (TP's ``_normalize``):
``mean`` (the default), ``max``, ``sum``, ``standardization`` (min-max to [0, 1]), ``gaussian`` (zero
mean, unit sample standard deviation), ``none``; ``lamp`` always uses LAMP's: with the unit values
sorted ascending, ``s_i / sum_{j >= i} s_j``.

``group-fisher`` (Liu et al., ICML 2021) is not reduced: the mask is shared by every member, so the
gradient of unit u is the sum over the group's taps of its channels' gradients, per sample, and the
score is ``1/2 mean_i (dL_i/dm_u)²`` divided by what removing u saves (``normalize``):
``flops``: the MACs of every node with a producer or consumer weight slot in the group, times
``1 - prod over its axes in the group of (1 - the unit's share of the axis)`` (a node's MACs are
linear in each channel axis, so this is exact for one unit: a conv whose input and output channels
are both in the group loses ``1 - (1 - 1/C)²``);
``memory``: the elements of every computed tensor of the group, times the unit's share of its
channel axis; ``latency``: as ``flops`` with each node's measured time on the chosen execution
provider in place of its MACs (``measure.latency.node_latencies``: onnxruntime's per-node profile,
the pipeline measures it once; a node's time taken as linear in each channel axis, as its MACs are);
``none``: not divided. Its normalizer defaults to ``none``: divided scores are meant
to be compared across groups (``--global``), which a per-group normalization would undo. A unit
whose removal saves nothing is divided by the group's smallest positive saving.

Greedy (``greedy_removals``, ``PlanOptions.greedy``): the paper removes one channel at a time, and
what a channel saves depends on the widths its nodes are left with (conv3's MACs fall as either of
its groups narrows). ``CostModel`` holds the savings at the current widths (each node's MACs, or each
tensor's elements, linear in each of its channel axes: at full width exactly ``unit_savings``), and
the greedy divides the fixed Δ (``GradScores.deltas``) by them, batched: a round removes a share of
what is left, then the costs of the groups touched are recomputed.

Fallback: a group without a member that has a gradient (no tappable consumer, no weight in the
graph's parameters) is scored by ``l2`` (``GradScores.fallback`` says why); a model whose gradients
cannot be had (``Gradients.unavailable``: an op without a torch forward, ...) has every group scored
by ``l2`` and ``GradScores.disabled`` holds the one-line reason.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import onnx

from onnxprune.analysis.contract import Role
from onnxprune.analysis.coupling import CouplingGraph, Group, Slot
from onnxprune.errors import UserError
from onnxprune.ir.attrs import get_attr
from onnxprune.planning.costs import CostModel, divide_by_saving, handler_macs, node_terms
from onnxprune.planning.data_importance import ConsumerTap, consumer_taps
from onnxprune.planning.importance import (
    GRAD_CRITERIA,
    GRADIENT_IMPORTANCES,
    group_importance,
)
from onnxprune.planning.options import (
    GROUP_FISHER_NORMALIZE,
    GROUP_REDUCTIONS,
    NORMALIZERS,
    TAYLOR_FORMS,
    TP_MEMBERS,
)
from onnxprune.runtime.gradients import Gradients, GradRequest, MaskSet, MaskTap

log = logging.getLogger(__name__)

MEMBER_SETS = TP_MEMBERS  # the choices are declared once, in planning.importance and planning.options
FPGM_P = 2
_EPS = 1e-8  # TP's guard in the standardization and gaussian normalizers
_MATRIX_ROLES = (Role.PRODUCER, Role.CONSUMER)
_SCALE_OPS = ("LayerNormalization", "BatchNormalization")


@dataclass(frozen=True)
class GradOptions:
    """How a criterion scores (module docstring). ``normalizer=None``: the criterion's default."""

    kind: str
    group_reduction: str = "mean"
    normalizer: str | None = None
    taylor_form: str = "param"
    normalize: str = "flops"  # group-fisher: what a unit's score is divided by
    members: str = "tp"  # weight members: Torch-Pruning 1.6.1's ("tp") or every weight axis ("all")

    def validate(self) -> None:
        if self.kind not in GRAD_CRITERIA:
            raise UserError(f"unknown importance '{self.kind}' (gradient and Torch-Pruning criteria: "
                            f"{', '.join(GRAD_CRITERIA)})")
        if self.group_reduction not in GROUP_REDUCTIONS:
            raise UserError(f"--group-reduction must be one of {', '.join(GROUP_REDUCTIONS)}, got '{self.group_reduction}'")
        if self.normalizer is not None and self.normalizer not in NORMALIZERS:
            raise UserError(f"--normalizer must be one of {', '.join(NORMALIZERS)}, got '{self.normalizer}'")
        if self.taylor_form not in TAYLOR_FORMS:
            raise UserError(f"--taylor-form must be one of {', '.join(TAYLOR_FORMS)}, got '{self.taylor_form}'")
        if self.members not in MEMBER_SETS:
            raise UserError(f"members must be one of {', '.join(MEMBER_SETS)}, got '{self.members}'")
        if self.normalize not in GROUP_FISHER_NORMALIZE:
            raise UserError(f"--normalize must be one of {', '.join(GROUP_FISHER_NORMALIZE)}, got '{self.normalize}'")

    @property
    def resolved_normalizer(self) -> str:
        if self.kind == "lamp":
            return "lamp"
        if self.normalizer is not None:
            return self.normalizer
        return "none" if self.kind == "group-fisher" else "mean"

    @property
    def needs_gradients(self) -> bool:
        return self.kind in GRADIENT_IMPORTANCES

    def to_json(self) -> dict:
        return {"criterion": self.kind, "group_reduction": self.group_reduction,
                "normalizer": self.resolved_normalizer, "taylor_form": self.taylor_form if self.kind == "taylor" else None,
                "normalize": self.normalize if self.kind == "group-fisher" else None, "members": self.members}


@dataclass
class GradScores:
    """Scores per group id; groups scored by l2 instead (``fallback``) with why; ``disabled``: the
    reason no gradient could be had (every group then falls back)."""

    kind: str
    scores: dict[int, np.ndarray]
    fallback: dict[int, str] = field(default_factory=dict)
    disabled: str | None = None
    options: dict = field(default_factory=dict)
    gradients: dict | None = None  # Gradients.to_json of the pass the scores came from
    # group-fisher: the Fisher values before the division by the saving (what ``greedy_removals``
    # divides by the costs at the current widths), and the MACs of the nodes the ``flops`` savings read
    deltas: dict[int, np.ndarray] = field(default_factory=dict)
    node_macs: dict[str, float] = field(default_factory=dict)
    node_latency: dict[str, float] = field(default_factory=dict)  # seconds, --normalize latency

    def report(self, cg: CouplingGraph) -> dict:
        entries = [{"group": gid, "producers": cg.groups[gid].producers[:3], "reason": why}
                   for gid, why in list(self.fallback.items())[:10]]
        return {"criterion": self.kind, "groups": len(self.scores), "options": self.options,
                "disabled": self.disabled, "fallback_l2": len(self.fallback), "fallback": entries,
                "gradients": self.gradients}


# ----------------------------------------------------------------------------------------------
# members


def _depthwise(cg: CouplingGraph, node: onnx.NodeProto) -> bool:
    """TP's DEPTHWISE_CONV: a (transposed) convolution whose ``group`` equals its output channels, > 1."""
    if node.op_type not in ("Conv", "ConvTranspose"):
        return False
    g = int(get_attr(node, "group", cg.opset) or 1)
    ys = cg.shapes.get(node.output[0])
    return g > 1 and ys is not None and len(ys) > 1 and ys[1] == g


def weight_members(cg: CouplingGraph, g: Group, kind: str, members: str = "tp") -> list[Slot]:
    """The weight slots ``kind`` reads in ``g`` (module docstring), one per (constant, axis),
    producers first."""
    out: list[Slot] = []
    seen: set[tuple[str, int]] = set()
    tp = members == "tp"
    for s in sorted(g.slots, key=lambda s: s.role != Role.PRODUCER):  # stable: graph order otherwise
        if (s.const, s.axis) in seen:
            continue
        node = cg.node_by_name.get(s.node)
        op = node.op_type if node is not None else ""
        if s.role in _MATRIX_ROLES:
            ok = not (tp and node is not None and _depthwise(cg, node))
        elif s.role == Role.SCALE and kind != "fpgm":
            ok = op == "LayerNormalization" or (op == "BatchNormalization" and not (tp and kind == "taylor"))
        else:
            ok = False
        if ok:
            seen.add((s.const, s.axis))
            out.append(s)
    return out


def _reader(cg: CouplingGraph, tap: ConsumerTap) -> onnx.NodeProto | None:
    """The main-graph node of ``tap``: named ``tap.node`` (or unnamed), reading the tapped tensor and
    the tap's weight (directly or through ops that show a constant)."""
    for n in cg.model.graph.node:
        if n.name != tap.node or tap.tensor not in n.input:
            continue
        for t in n.input:
            cur = t
            for _ in range(16):
                if cur == tap.const:
                    return n
                prod = cg.producer_of.get(cur)
                if not cur or prod is None or not cg.registry.facts_of(prod, cg.opset).shows_constant:
                    break
                cur = prod.input[0]
    return None


@dataclass
class _TapIndex:
    """The mask taps of the request and, per group, its taps (index into ``taps``, the space)."""

    taps: list[MaskTap] = field(default_factory=list)
    by_group: dict[int, list[tuple[int, int]]] = field(default_factory=dict)
    missing: dict[int, str] = field(default_factory=dict)


def _tap_index(cg: CouplingGraph, groups: list[Group]) -> _TapIndex:
    plan = consumer_taps(cg, groups)
    out = _TapIndex()
    keys: dict[tuple[str, int, str], int] = {}
    for g in groups:
        found: list[tuple[int, int]] = []
        for t in plan.consumers.get(g.id, []):
            node = _reader(cg, t)
            if node is None or not node.output or not node.output[0]:
                continue
            key = (t.tensor, t.tensor_axis, node.output[0])
            if key not in keys:
                keys[key] = len(out.taps)
                out.taps.append(MaskTap(t.tensor, t.tensor_axis, node.output[0], cg.space_size[t.space]))
            if (keys[key], t.space) not in found:
                found.append((keys[key], t.space))
        if found:
            out.by_group[g.id] = found
        else:
            why = plan.missing.get(g.id, ["no consumer whose input can be masked"])
            out.missing[g.id] = why[0]
    return out


# ----------------------------------------------------------------------------------------------
# the request


def gradient_request(cg: CouplingGraph, groups: Iterable[Group], opts: GradOptions | Iterable[GradOptions]) -> GradRequest:
    """What ``opts`` needs differentiated for ``groups`` (empty for lamp and fpgm). Several options:
    one request serving all of them, so one pass over the data scores every criterion (with a
    ``hessian`` among them every pass is per sample)."""
    many = [opts] if isinstance(opts, GradOptions) else list(opts)
    for o in many:
        o.validate()
    groups = list(groups)
    params: list[str] = []
    taps = sets = False
    for o in many:
        if o.kind in ("taylor", "hessian") and not (o.kind == "taylor" and o.taylor_form == "activation"):
            params += [s.const for g in groups for s in weight_members(cg, g, o.kind, o.members)]
        elif o.kind in ("taylor", "fisher", "group-fisher"):
            taps = True
            sets = sets or o.kind == "group-fisher"
    per_sample = any(o.kind == "hessian" for o in many)
    if not taps:
        return GradRequest(params=tuple(dict.fromkeys(params)), per_sample=per_sample)
    ti = _tap_index(cg, groups)
    masks: list[MaskSet] = []
    if sets:
        by_id = {g.id: g for g in groups}
        for gid, found in ti.by_group.items():
            g = by_id[gid]
            masks.append(MaskSet(gid, g.size, tuple((k, cg.unit_index(g, sid)) for k, sid in found)))
    return GradRequest(taps=tuple(ti.taps), sets=tuple(masks), params=tuple(dict.fromkeys(params)),
                       per_sample=per_sample)


# ----------------------------------------------------------------------------------------------
# scores


def _per_axis(a: np.ndarray, axis: int) -> np.ndarray:
    """Sum over every axis but ``axis`` (float64)."""
    a = np.asarray(a, dtype=np.float64)
    return a.sum(axis=tuple(i for i in range(a.ndim) if i != axis)) if a.ndim > 1 else a


def reduce_members(values: list[tuple[np.ndarray, np.ndarray]], n: int, how: str) -> np.ndarray | None:
    """TP's group reduction of member values: ``values`` holds (unit index of each element, value of
    each element); a unit's value in a member is the sum over its elements there. None: no member."""
    if not values:
        return None
    per = []
    for units, v in values:
        per.append((np.bincount(units, weights=v, minlength=n), np.bincount(units, minlength=n) > 0))
    if how == "first":
        out = np.zeros(n)
        out[per[0][1]] = per[0][0][per[0][1]]
        return out
    if how in ("sum", "mean"):
        total = sum(v for v, _ in per)
        if how == "sum":
            return total
        count = sum(c.astype(np.int64) for _, c in per)
        return total / np.maximum(count, 1)
    if how == "max":
        out = np.full(n, -np.inf)
        for v, c in per:
            out[c] = np.maximum(out[c], v[c])
        return np.where(np.isfinite(out), out, 0.0)
    if how == "prod":
        out = np.ones(n)
        for v, c in per:
            out[c] *= v[c]
        return out
    raise UserError(f"unknown group reduction '{how}'")


def normalize_scores(s: np.ndarray, how: str) -> np.ndarray:
    """TP's normalizers (module docstring); a zero denominator leaves the scores as they are."""
    s = np.asarray(s, dtype=np.float64)
    if how == "none" or s.size == 0:
        return s
    if how == "lamp":
        return lamp_normalize(s)
    if how in ("mean", "max", "sum"):
        d = float({"mean": np.mean, "max": np.max, "sum": np.sum}[how](s))
        return s / d if d != 0 else s
    if how == "standardization":
        return (s - s.min()) / (s.max() - s.min() + _EPS)
    if how == "gaussian":
        sd = float(np.std(s, ddof=1)) if s.size > 1 else 0.0
        return (s - s.mean()) / (sd + _EPS)
    raise UserError(f"unknown normalizer '{how}'")


def lamp_normalize(s: np.ndarray) -> np.ndarray:
    """LAMP (Lee et al. 2021): with the scores sorted ascending, ``s_i / sum_{j >= i} s_j``."""
    order = np.argsort(s, kind="stable")
    srt = s[order]
    tail = np.cumsum(srt[::-1])[::-1]
    out = np.zeros_like(s, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        out[order] = np.where(tail > 0, srt / np.where(tail > 0, tail, 1.0), 0.0)
    return out


def _distance_sums(rows: np.ndarray, chunk: int = 1024) -> np.ndarray:
    """For each row, the sum of its Euclidean distances to every row (float64, chunked: memory
    ``chunk x rows``)."""
    rows = rows.astype(np.float64, copy=False)
    sq = np.einsum("ij,ij->i", rows, rows)
    out = np.zeros(rows.shape[0])
    for a in range(0, rows.shape[0], chunk):
        blk = rows[a:a + chunk]
        d2 = sq[a:a + chunk, None] + sq[None, :] - 2.0 * blk @ rows.T
        out[a:a + chunk] = np.sqrt(np.maximum(d2, 0.0)).sum(axis=1)
    return out


def _weight_value(kind: str, w: np.ndarray, axis: int, grads: Gradients | None, const: str) -> np.ndarray | None:
    w64 = np.asarray(w, dtype=np.float64)
    if kind == "lamp":
        return _per_axis(w64 * w64, axis)
    if kind == "fpgm":
        rows = np.moveaxis(np.abs(w64) ** FPGM_P, axis, 0).reshape(w64.shape[axis], -1)
        return _distance_sums(rows)
    pg = grads.params.get(const) if grads is not None else None
    if pg is None:
        return None
    if kind == "taylor":
        return _per_axis(np.abs(w64 * pg.sum), axis)
    if pg.sq is None or grads.samples == 0:
        return None
    return _per_axis(0.5 * w64 * w64 * (pg.sq / grads.samples), axis)  # hessian


def _weight_scores(cg: CouplingGraph, g: Group, opts: GradOptions, grads: Gradients | None) -> np.ndarray | str:
    values = []
    for s in weight_members(cg, g, opts.kind, opts.members):
        w = cg.consts.get(s.const)
        if w is None or not np.issubdtype(w.dtype, np.floating):
            continue
        v = _weight_value(opts.kind, w, s.axis, grads, s.const)
        if v is not None:
            values.append((cg.unit_index(g, s.space), v))
    red = reduce_members(values, g.size, opts.group_reduction)
    if red is None:
        return "no weight member with a gradient" if opts.needs_gradients else "no weight member"
    return red


def _tap_scores(cg: CouplingGraph, g: Group, opts: GradOptions, grads: Gradients,
                ti: _TapIndex) -> np.ndarray | str:
    if g.id not in ti.by_group:
        return ti.missing.get(g.id, "no consumer whose input can be masked")
    n = max(grads.samples, 1)
    values = []
    for k, sid in ti.by_group[g.id]:
        mg = grads.taps.get(ti.taps[k])
        if mg is None:
            continue
        v = mg.abs / n if opts.kind == "taylor" else 0.5 * mg.sq / n
        values.append((cg.unit_index(g, sid), v))
    red = reduce_members(values, g.size, opts.group_reduction)
    return red if red is not None else "its consumer taps were not placed in the graph"


def unit_savings(cg: CouplingGraph, g: Group, how: str,
                 macs_of: Callable[[onnx.NodeProto], float] | None = None) -> np.ndarray:
    """What removing each unit of ``g`` saves (module docstring): ``flops`` (MACs, by ``macs_of``;
    default: the node's handler at the analysis shapes, as ``measure.stats.node_macs`` counts them)
    or ``memory`` (tensor elements), or ``latency`` (``macs_of`` then gives each node's measured time)."""
    n = g.size
    out = np.zeros(n)
    if how in ("flops", "latency"):
        if how == "latency" and macs_of is None:
            raise UserError("group-fisher --normalize latency needs a per-node latency table "
                            "(measure.latency.node_latencies)")
        for m, sids in node_terms(cg, g.slots, macs_of or handler_macs(cg)):
            kept = np.ones(n)  # the share of the term left once the unit goes: prod of (1 - share)
            for sid in sids:
                kept *= 1.0 - np.bincount(cg.unit_index(g, sid), minlength=n) / cg.space_size[sid]
            out += m * (1.0 - kept)
    elif how == "memory":
        for sid in g.spaces:
            tensor, axis = cg.space_key[sid]
            shape = cg.shapes.get(tensor)
            if tensor in cg.consts or not shape:
                continue
            per_channel = float(np.prod(shape, dtype=np.float64)) / shape[axis]
            out += per_channel * np.bincount(cg.unit_index(g, sid), minlength=n)
    else:
        out[:] = 1.0
    return out


def _group_fisher(cg: CouplingGraph, g: Group, opts: GradOptions, grads: Gradients, ti: _TapIndex,
                  macs_of, out: GradScores) -> np.ndarray | str:
    mg = grads.sets.get(g.id)
    if mg is None:
        return ti.missing.get(g.id, "no consumer whose input can be masked")
    delta = 0.5 * mg.sq / max(grads.samples, 1)
    out.deltas[g.id] = delta
    if opts.normalize == "none":
        return delta
    return divide_by_saving(delta, unit_savings(cg, g, opts.normalize, macs_of))


def gradient_scores(cg: CouplingGraph, groups: Iterable[Group], opts: GradOptions, grads: Gradients | None = None,
                    *, macs_of: Callable[[onnx.NodeProto], float] | None = None,
                    latency_of: Callable[[onnx.NodeProto], float] | None = None, seed: int = 0) -> GradScores:
    """Scores of ``groups`` by ``opts`` from ``grads`` (``collect_gradients`` on ``gradient_request``'s
    request; None for lamp and fpgm). ``macs_of``: MACs of a node for ``group-fisher --normalize flops``
    (the pipeline passes ``measure.stats.node_macs`` at the real input shapes; default: the handlers at
    the analysis shapes). ``latency_of``: a node's measured time, for ``--normalize latency`` (required
    there: ``measure.latency.node_latencies``)."""
    opts.validate()
    groups = list(groups)
    norm = opts.resolved_normalizer
    out = GradScores(opts.kind, {}, options=opts.to_json(),
                     gradients=grads.to_json() if grads is not None else None)
    if opts.needs_gradients and (grads is None or grads.unavailable):
        out.disabled = (grads.unavailable if grads is not None else None) or "no gradients were collected"
        for g in groups:
            out.scores[g.id] = group_importance(cg, g, "l2", seed)
            out.fallback[g.id] = f"gradients unavailable: {out.disabled}"
        return out
    if opts.kind == "group-fisher" and opts.normalize == "latency":
        if latency_of is None:
            raise UserError("group-fisher --normalize latency needs a per-node latency table "
                            "(measure.latency.node_latencies)")
        table = latency_of

        def latency_cost(node: onnx.NodeProto) -> float:  # recorded for greedy_removals
            if node.name and node.name not in out.node_latency:
                out.node_latency[node.name] = float(table(node))
            return out.node_latency.get(node.name, 0.0) if node.name else float(table(node))
        macs_of = latency_cost
    elif opts.kind == "group-fisher" and opts.normalize == "flops":
        base = macs_of or handler_macs(cg)

        def macs_of(node: onnx.NodeProto, base=base) -> float:  # recorded for greedy_removals
            if not node.name:
                return float(base(node))
            if node.name not in out.node_macs:
                out.node_macs[node.name] = float(base(node))
            return out.node_macs[node.name]
    ti = None
    if opts.kind == "group-fisher" or opts.kind == "fisher" or (opts.kind == "taylor" and opts.taylor_form == "activation"):
        ti = _tap_index(cg, groups)
    for g in groups:
        if opts.kind == "group-fisher":
            got = _group_fisher(cg, g, opts, grads, ti, macs_of, out)
        elif ti is not None:
            got = _tap_scores(cg, g, opts, grads, ti)
        else:
            got = _weight_scores(cg, g, opts, grads)
        if isinstance(got, str):
            out.scores[g.id] = group_importance(cg, g, "l2", seed)
            out.fallback[g.id] = got
        else:
            out.scores[g.id] = normalize_scores(got, norm)
    return out


# ----------------------------------------------------------------------------------------------
# greedy: GroupFisher's one unit at a time, batched


def greedy_removals(cg: CouplingGraph, groups: list[Group], deltas: dict[int, np.ndarray], how: str, *,
                    count: int | None = None, macs_share: float | None = None,
                    ceilings: dict[int, int] | None = None, batch: float = 0.05,
                    macs_of: Callable[[onnx.NodeProto], float] | None = None,
                    latency_of: Callable[[onnx.NodeProto], float] | None = None) -> dict[int, list[int]]:
    """GroupFisher's greedy schedule (Liu et al. 2021): repeatedly remove the unit with the smallest
    ``delta / saving`` over every group, the saving (``CostModel`` for ``how``: flops, memory or none)
    recomputed at the widths left by the removals before it; ``delta`` stays fixed (no retraining
    between steps). Batched: a round removes the ``max(1, ceil(batch x left))`` cheapest units at the
    round's costs (``batch=0``: one unit a round, the exact greedy), then recomputes the costs of the
    groups whose widths or neighbours changed. Stops after ``count`` units, or (``macs_share``) once the
    model's MACs (nodes of the groups modelled, the others fixed) are at most that share of the
    original's; in that mode a round removes units until their savings reach ``batch`` of the gap.
    ``ceilings``: the most units a group may lose (default: all but one). Returns per group the units
    removed, in the order removed. ``how="latency"``: the saving from ``latency_of`` (each node's
    measured time), the MACs of a ``macs_share`` stop from ``macs_of``."""
    if (count is None) == (macs_share is None):
        raise UserError("greedy_removals: give one of count and macs_share")
    macs_of = macs_of or handler_macs(cg)
    if how == "latency" and latency_of is None:
        raise UserError("greedy --normalize latency needs a per-node latency table (measure.latency.node_latencies)")
    model = CostModel(cg, groups, how, latency_of if how == "latency" else macs_of)
    macs = model if how == "flops" else CostModel(cg, groups, "flops", macs_of) if macs_share is not None else None
    target = fixed = 0.0
    if macs_share is not None:
        whole = float(sum(macs_of(n) for n in cg.model.graph.node))
        fixed = whole - macs.total()
        target = macs_share * whole
    ceil_of = {g.id: (ceilings or {}).get(g.id, g.size - 1) for g in groups}
    order: dict[int, list[int]] = {g.id: [] for g in groups}
    score: dict[int, np.ndarray] = {}

    def rescore(gid: int) -> None:
        cost = model.savings(gid)
        alive = model.alive[gid]
        s = divide_by_saving(np.asarray(deltas[gid], dtype=np.float64), np.where(alive, cost, 0.0)) \
            if how in ("flops", "memory", "latency") else np.asarray(deltas[gid], dtype=np.float64)
        score[gid] = np.where(alive, s, np.inf)

    for g in groups:
        rescore(g.id)
    done = 0
    while True:
        if count is not None:
            left = count - done
            if left <= 0:
                break
            k, budget = max(1, math.ceil(batch * left)), None
        else:
            gap = fixed + macs.total() - target
            if gap <= 0:
                break
            k, budget = None, batch * gap
        open_ = [g.id for g in groups if len(order[g.id]) < ceil_of[g.id]]
        if not open_:
            break
        s = np.concatenate([score[gid] for gid in open_])
        gids = np.concatenate([np.full(len(score[gid]), gid) for gid in open_])
        units = np.concatenate([np.arange(len(score[gid])) for gid in open_])
        ok = np.isfinite(s)
        if not ok.any():
            break
        s, gids, units = s[ok], gids[ok], units[ok]
        srt = np.lexsort((units, gids, s))
        room = {gid: ceil_of[gid] - len(order[gid]) for gid in open_}
        saved_of = {gid: macs.savings(gid) for gid in open_} if budget is not None else {}
        picked: dict[int, list[int]] = {}
        n_picked, saved = 0, 0.0
        for i in srt:
            gid, u = int(gids[i]), int(units[i])
            if room[gid] <= 0:
                continue
            room[gid] -= 1
            picked.setdefault(gid, []).append(u)
            n_picked += 1
            if budget is not None:
                saved += float(saved_of[gid][u])
                if saved >= budget:
                    break
            elif n_picked >= k:
                break
        changed: set[int] = set()
        for gid, us in picked.items():
            order[gid] += us
            changed |= model.remove(gid, np.asarray(us))
            if macs is not None and macs is not model:
                macs.remove(gid, np.asarray(us))
        done += n_picked
        for gid in changed:
            rescore(gid)
    return order
