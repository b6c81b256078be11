"""Plans: which units of which group to keep. A plan is pure data (JSON), replayable and reviewable."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from onnxprune.analysis.analyze import Analysis
from onnxprune.analysis.contract import Role
from onnxprune.analysis.coupling import CouplingGraph, Group
from onnxprune.errors import NothingToPrune, UserError
from onnxprune.planning.data_importance import Activations, data_scores
from onnxprune.planning.importance import (
    DATA_IMPORTANCES,
    GRAD_CRITERIA,
    GRADIENT_IMPORTANCES,
    group_importance,
)
from onnxprune.planning.options import PlanOptions, options_json
from onnxprune.planning.rounding import round_keep, unit_step

if TYPE_CHECKING:
    from onnxprune.planning.grad_importance import GradOptions, GradScores

_MAX_INDEX = 2**62  # channel indices and axes beyond this are nonsense (and overflow int64)


def _small_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and -_MAX_INDEX < v < _MAX_INDEX


def check_plan_json(data) -> None:
    """The shape of a plan file, before anything reads it: a dict with version 1, a list of group
    entries, each an anchor (tensor name, integer axis) and a list of integer indices; options a
    dict. Anything else (wrong types, huge integers, nesting) is one UserError line."""
    if not isinstance(data, dict) or data.get("version") != 1 or not isinstance(data.get("groups"), list):
        raise UserError("plan file is not an onnxprune plan (version 1)")
    if not isinstance(data.get("options", {}), dict):
        raise UserError("plan file is malformed: 'options' is not an object")
    if not isinstance(data.get("frozen", []), list):
        raise UserError("plan file is malformed: 'frozen' is not a list")
    for i, entry in enumerate(data["groups"]):
        if not isinstance(entry, dict):
            raise UserError(f"plan file is malformed: group entry {i} is not an object")
        anchor = entry.get("anchor")
        if not isinstance(anchor, dict) or not isinstance(anchor.get("tensor"), str):
            raise UserError(f"plan file is malformed: group entry {i} has no anchor tensor name")
        if not _small_int(anchor.get("axis")):
            raise UserError(f"plan file is malformed: group entry {i} has no integer anchor axis")
        keep = entry.get("keep")
        if not isinstance(keep, list):
            raise UserError(f"plan file is malformed: group entry {i} has no 'keep' list")
        if not all(_small_int(k) for k in keep):
            raise UserError(f"plan keeps non-integer channel indices for '{anchor['tensor']}'")


@dataclass
class GroupPlan:
    group: int
    size: int
    keep: np.ndarray  # unit indices kept, sorted
    approximate: bool = False

    @property
    def removed(self) -> int:
        return self.size - len(self.keep)


@dataclass
class Plan:
    groups: dict[int, GroupPlan]
    frozen: dict[int, list[str]]
    options: dict
    importance: dict = field(default_factory=dict)  # how units were scored (the report's "importance")

    def pruned(self) -> list[GroupPlan]:
        return [gp for gp in self.groups.values() if gp.removed > 0]

    def exact_only(self) -> Plan:
        return Plan({k: v for k, v in self.groups.items() if not v.approximate}, self.frozen, self.options,
                    self.importance)

    # -- JSON ----------------------------------------------------------------------------------
    def to_json(self, cg: CouplingGraph) -> dict:
        groups = []
        for gp in self.groups.values():
            g = cg.groups[gp.group]
            anchor = _anchor(cg, g)
            kept_el = cg.kept_elements(g, gp.keep, anchor)
            groups.append({
                "group": gp.group, "anchor": {"tensor": cg.space_key[anchor][0], "axis": cg.space_key[anchor][1]},
                "channels": cg.space_size[anchor], "units": gp.size, "kept_units": len(gp.keep),
                "keep": [int(i) for i in kept_el], "approximate": gp.approximate, "producers": g.producers,
            })
        frozen = [{"group": gid, "producers": cg.groups[gid].producers, "reasons": reasons[:5]}
                  for gid, reasons in self.frozen.items()]
        return {"version": 1, "options": self.options, "groups": groups, "frozen": frozen}

    @classmethod
    def from_json(cls, data: dict, cg: CouplingGraph) -> Plan:
        check_plan_json(data)
        try:
            return cls._from_json(data, cg)
        except (KeyError, TypeError, ValueError, AttributeError, IndexError, OverflowError,
                RecursionError) as exc:
            raise UserError(f"plan file is malformed ({type(exc).__name__}: {str(exc)[:200]})") from None

    @classmethod
    def _from_json(cls, data: dict, cg: CouplingGraph) -> Plan:
        if not isinstance(data, dict) or data.get("version") != 1 or not isinstance(data.get("groups"), list):
            raise UserError("plan file is not an onnxprune plan (version 1)")
        by_space = {}
        for g in cg.groups:
            for sid in g.spaces:
                by_space[cg.space_key[sid]] = (g, sid)
        groups: dict[int, GroupPlan] = {}
        for entry in data["groups"]:
            key = (entry["anchor"]["tensor"], int(entry["anchor"]["axis"]))
            if key not in by_space:
                raise UserError(f"plan does not match this model: no channel axis {key[1]} of '{key[0]}'")
            g, sid = by_space[key]
            if not g.prunable:
                raise UserError(f"plan prunes group of '{key[0]}', which is frozen here: {g.frozen[0]}")
            if g.is_approximate and not data.get("options", {}).get("allow_approximate", False):
                raise UserError(f"plan prunes approximate group of '{key[0]}' without allow_approximate")
            if not all(isinstance(k, int) and not isinstance(k, bool) for k in entry["keep"]):
                raise UserError(f"plan keeps non-integer channel indices for '{key[0]}'")
            keep_el = np.asarray(entry["keep"], dtype=np.int64)
            if keep_el.size and (keep_el.min() < 0 or keep_el.max() >= cg.space_size[sid]):
                raise UserError(f"plan keeps channel indices outside '{key[0]}' axis {key[1]}")
            units = np.unique(cg.unit_index(g, sid)[keep_el]) if keep_el.size else np.zeros(0, np.int64)
            if units.size == 0:
                raise UserError(f"plan removes every channel of '{key[0]}'")
            groups[g.id] = GroupPlan(g.id, g.size, units, g.is_approximate)
        frozen = {g.id: g.frozen for g in cg.groups if not g.prunable}
        return cls(groups, frozen, data.get("options", {}), {"criterion": "plan file"})



def _covers(cg: CouplingGraph, g: Group, sid: int) -> bool:
    """Whether every unit of ``g`` has an element in space ``sid`` (a concat input holds only its part)."""
    return np.unique(cg.unit_index(g, sid)).size == g.size


def _anchor(cg: CouplingGraph, g: Group) -> int:
    """The space that names a group in a plan file, which must hold every unit (the file lists the
    kept elements of this one space): a producer weight's output axis that does, else any space that
    does (a concat's output), else the first (a group no single space covers cannot round-trip)."""
    covering = [sid for sid in g.spaces if _covers(cg, g, sid)]
    for s in g.slots:
        if s.role == Role.PRODUCER and s.space in covering:
            return s.space
    return covering[0] if covering else g.spaces[0]


def _check_regexes(cg: CouplingGraph, opts: PlanOptions) -> None:
    names = list(cg.node_by_name)
    for rx in [r for r, _ in opts.layer_ratios] + list(opts.ignore):
        try:
            pat = re.compile(rx)
        except re.error as exc:
            raise UserError(f"bad regular expression '{rx}': {exc}") from None
        if not any(pat.search(n) for n in names):
            raise UserError(f"regular expression '{rx}' matches no node of the model")


def grad_options(opts: PlanOptions) -> GradOptions:
    """The ``planning.grad_importance`` options of a gradient or Torch-Pruning criterion (imports torch)."""
    from onnxprune.planning.grad_importance import GradOptions  # optional torch: only for these criteria

    return GradOptions(opts.importance, group_reduction=opts.group_reduction, normalizer=opts.normalizer,
                       taylor_form=opts.taylor_form, normalize=opts.normalize, members=opts.tp_members)


def _grad_scores(cg: CouplingGraph, opts: PlanOptions, groups: list[Group],
                 gradients: GradScores | None) -> tuple[dict[int, np.ndarray], dict, GradScores]:
    """Scores of ``groups`` by a gradient criterion (``gradients``: scored on every group a plan may
    prune, by ``pipeline.gradient_scores_for``) or a Torch-Pruning weight criterion (scored here when
    ``gradients`` is None); the report entry, on ``groups`` only; and the scores it read."""
    if gradients is None:
        if opts.importance in GRADIENT_IMPORTANCES:
            raise UserError(f"--importance {opts.importance} needs gradients on calibration data (--calib or "
                            "--calib-images)")
        from onnxprune.planning.grad_importance import gradient_scores  # optional torch

        gradients = gradient_scores(cg, groups, grad_options(opts), None, seed=opts.seed)
    elif gradients.kind != opts.importance:
        raise UserError(f"gradient scores are {gradients.kind}'s, the plan asks for {opts.importance}")
    missing = [g.id for g in groups if g.id not in gradients.scores]
    if missing:
        raise UserError(f"gradient scores do not cover group {missing[0]} (scored on other groups)")
    ids = {g.id for g in groups}
    mine = dataclasses.replace(gradients, scores={k: v for k, v in gradients.scores.items() if k in ids},
                               fallback={k: v for k, v in gradients.fallback.items() if k in ids})
    return mine.scores, mine.report(cg), gradients


def make_plan(cg: CouplingGraph, opts: PlanOptions, activations: Activations | None = None,
              gradients: GradScores | None = None) -> Plan:
    """The plan ``opts`` asks for. ``activations``: what the data-aware importances (``act``,
    ``act-var``) read, captured on the fit share of the calibration data (``pipeline.capture_activations``);
    ``gradients``: the scores of a gradient criterion (``pipeline.gradient_scores_for``: collected
    once, reused at every ratio), at least on every group this plan may prune. ``opts.keep_counts``
    (a budget allocation, ``planning.allocate``): those groups keep that many units."""
    opts.validate()
    if cg.head_mode != opts.head_mode:  # a unit is not what the options mean (whole heads, whole conv groups)
        raise UserError(f"these options need an analysis in mode {opts.head_mode!r} (pipeline.head_mode_for); "
                        f"this one is {cg.head_mode!r}")
    if opts.importance in DATA_IMPORTANCES and activations is None:
        raise UserError(f"--importance {opts.importance} needs calibration data (--calib or --calib-images)")
    candidates, frozen = plan_candidates(cg, opts)
    scores, importance, gradients = candidate_scores(cg, opts, [g for g, _ in candidates], activations, gradients)
    groups: dict[int, GroupPlan] = {}
    counts = dict(opts.keep_counts)
    if opts.greedy:
        groups, importance["greedy"] = _plan_greedy(cg, candidates, scores, gradients, opts)
    elif opts.isomorphic:
        groups, importance["isomorphic"] = _plan_isomorphic(cg, candidates, scores, opts)
    elif opts.global_:
        groups = _plan_global(cg, candidates, scores, opts)
    else:
        for g, ratio in candidates:
            n_remove = int(math.floor(g.size * ratio))
            keep_n = round_keep(g.size, counts.get(g.id, g.size - n_remove), unit_step(cg, g, opts.round_to))
            groups[g.id] = GroupPlan(g.id, g.size, select_units(cg, g, scores[g.id], keep_n), g.is_approximate)
    return Plan(groups, frozen, options_json(opts), importance)


def plan_candidates(cg: CouplingGraph, opts: PlanOptions) -> tuple[list[tuple[Group, float]], dict[int, list[str]]]:
    """The groups a plan with ``opts`` may prune, each with its ratio (``group_ratio``), and the
    frozen ones with their reasons (``--ignore``, approximate, a single channel, the analysis')."""
    _check_regexes(cg, opts)
    ignore = [re.compile(r) for r in opts.ignore]
    layer = [(re.compile(r), v) for r, v in opts.layer_ratios]
    frozen: dict[int, list[str]] = {}
    candidates: list[tuple[Group, float]] = []
    for g in cg.groups:
        reasons = list(g.frozen)
        hit = next((p.pattern for p in ignore if any(p.search(n) for n in g.nodes)), None)
        if hit is not None:
            reasons.insert(0, f"ignored by --ignore {hit}")
        if g.is_approximate and not opts.allow_approximate and not reasons:
            reasons.append(f"{APPROXIMATE}{g.approximate[0]} (use --allow-approximate)")
        if g.size <= 1 and not reasons:
            reasons.append("a single channel")
        if reasons:
            frozen[g.id] = reasons
            continue
        candidates.append((g, group_ratio(g, opts, layer)))
    return candidates, frozen


def candidate_scores(cg: CouplingGraph, opts: PlanOptions, groups: list[Group], activations: Activations | None = None,
                     gradients: GradScores | None = None) -> tuple[dict[int, np.ndarray], dict, GradScores | None]:
    """One score per unit of each of ``groups`` by ``opts.importance``; the report's ``importance``
    entry; the gradient scores read (a Torch-Pruning weight criterion: scored here)."""
    if opts.importance in DATA_IMPORTANCES and activations is None:
        raise UserError(f"--importance {opts.importance} needs calibration data (--calib or --calib-images)")
    if opts.importance in DATA_IMPORTANCES:
        ds = data_scores(cg, groups, opts.importance, activations)
        return ds.scores, ds.report(cg, activations), gradients
    if opts.importance in GRAD_CRITERIA:
        return _grad_scores(cg, opts, groups, gradients)
    scores = {g.id: group_importance(cg, g, opts.importance, opts.seed) for g in groups}
    return scores, {"criterion": opts.importance, "groups": len(groups)}, gradients


def _top(score: np.ndarray, keep_n: int) -> np.ndarray:
    order = np.argsort(-score, kind="stable")
    return np.sort(order[:keep_n])


def select_units(cg: CouplingGraph, g: Group, score: np.ndarray, keep_n: int) -> np.ndarray:
    """Keep ``keep_n`` units, removing the least important first, such that no member space loses
    more than its share of the removal (and none is emptied). In an ordinary group every space has one
    element per unit and this is plain top-k; where units are entangled lineages (channel shuffles)
    it stops a branch from being hollowed out."""
    n = g.size
    n_remove = n - keep_n
    if n_remove <= 0:
        return np.arange(n)
    inc = _incidence(cg, g)
    if np.all(inc == 1):
        return _top(score, keep_n)
    return _balanced(score, inc, n_remove)


def _incidence(cg: CouplingGraph, g: Group) -> np.ndarray:
    """Elements of each unit (rows) in each member space (columns)."""
    inc = np.zeros((g.size, len(g.spaces)), dtype=np.int64)
    for j, sid in enumerate(g.spaces):
        inc[:, j] = np.bincount(cg.unit_index(g, sid), minlength=g.size)
    return inc


def _balanced(score: np.ndarray, inc: np.ndarray, n_remove: int) -> np.ndarray:
    n = len(score)
    sizes = inc.sum(axis=0)
    budget = np.minimum(-(-n_remove * sizes // n), sizes - 1)
    lost = np.zeros(inc.shape[1], dtype=np.int64)
    removed = np.zeros(n, dtype=bool)
    k = 0
    for u in np.argsort(score, kind="stable"):
        if k >= n_remove:
            break
        if np.all(lost + inc[u] <= budget):
            lost += inc[u]
            removed[u] = True
            k += 1
    return np.flatnonzero(~removed)


def _plan_global(cg: CouplingGraph, candidates, scores, opts: PlanOptions,
                 ratio: float | None = None) -> dict[int, GroupPlan]:
    """Rank the units of every candidate together; remove the lowest ``ratio`` (default ``opts.ratio``)
    of their total, no group beyond ``max_ratio``."""
    entries = []
    total = 0
    for g, _ in candidates:
        total += g.size
        for u, s in enumerate(scores[g.id]):
            entries.append((s, g.id, u))
    entries.sort()
    target = int(math.floor(total * (opts.ratio if ratio is None else ratio)))
    by_id = {g.id: g for g, _ in candidates}
    removed: dict[int, int] = {g.id: 0 for g, _ in candidates}
    ceiling = {g.id: min(g.size - 1, int(math.floor(g.size * opts.max_ratio))) for g, _ in candidates}
    done = 0
    for _, gid, _ in entries:
        if done >= target:
            break
        if removed[gid] < ceiling[gid]:
            removed[gid] += 1
            done += 1
    out = {}
    for gid, g in by_id.items():
        keep_n = round_keep(g.size, g.size - removed[gid], unit_step(cg, g, opts.round_to))
        out[gid] = GroupPlan(gid, g.size, select_units(cg, g, scores[gid], keep_n), g.is_approximate)
    return out



# ----------------------------------------------------------------------------------------------
# isomorphic pruning (Fang et al., ECCV 2024: "Isomorphic Pruning for Vision Models")


def group_signature(cg: CouplingGraph, g: Group, group_of_space: dict[int, int] | None = None) -> tuple:
    """The structure of ``g``, equal for isomorphic groups: the sorted multiset of its members, each a
    weight slot (op type, role, axis, the constant's shape) or a computed tensor (its producer's op
    type, axis, shape). In a shape the pruned axis reads ``P`` and an axis that is a channel axis of
    any group reads ``C``: widths are what pruning changes (so the blocks of a stage stay one class
    after a first pruning step, and a stage's first block, whose input is the previous stage's
    width, joins the others), while kernel sizes and spatial sizes are structure (stages differ).
    Torch-Pruning 1.6.1 tags a group by its dependencies' module types and in/out only, so its
    classes ignore sizes altogether and pool blocks of different stages."""
    gos = group_of_space if group_of_space is not None else _group_of_space(cg)

    def dims(tensor: str, axis: int, shape) -> str:
        out = []
        for i, d in enumerate(shape or ()):
            sid = cg.space_ids.get((tensor, i))
            out.append("P" if i == axis else "C" if sid is not None and sid in gos else str(d))
        return "x".join(out)

    members = []
    for s in g.slots:
        node = cg.node_by_name.get(s.node)
        members.append(("w", node.op_type if node is not None else "?", str(s.role), str(s.axis),
                        dims(s.const, s.axis, cg.consts.shape(s.const))))
    for sid in g.spaces:
        tensor, axis = cg.space_key[sid]
        if tensor in cg.consts:
            continue
        prod = cg.producer_of.get(tensor)
        members.append(("t", prod.op_type if prod is not None else "input", "", str(axis),
                        dims(tensor, axis, cg.shapes.get(tensor))))
    return tuple(sorted(members))


def _group_of_space(cg: CouplingGraph) -> dict[int, int]:
    return {sid: g.id for g in cg.groups for sid in g.spaces}


def isomorphic_classes(cg: CouplingGraph, groups: list[Group]) -> list[list[Group]]:
    """``groups`` by ``group_signature``, in order of each class's first group."""
    gos = _group_of_space(cg)
    classes: dict[tuple, list[Group]] = {}
    for g in groups:
        classes.setdefault(group_signature(cg, g, gos), []).append(g)
    return list(classes.values())


def _plan_isomorphic(cg: CouplingGraph, candidates, scores, opts: PlanOptions) -> tuple[dict[int, GroupPlan], list]:
    """Each class of isomorphic candidates with one ratio ranked on its own: their (per-group
    normalized) scores pooled, the lowest ``ratio`` of the class's units removed (``_plan_global`` on
    the class, so no group loses more than ``max_ratio``). A group given its own ratio (``--layer-ratio``,
    attention) forms classes with the groups of that ratio only."""
    ratio_of = {g.id: r for g, r in candidates}
    out: dict[int, GroupPlan] = {}
    report = []
    for cls in isomorphic_classes(cg, [g for g, _ in candidates]):
        by_ratio: dict[float, list] = {}
        for g in cls:
            by_ratio.setdefault(ratio_of[g.id], []).append((g, ratio_of[g.id]))
        for ratio, members in by_ratio.items():
            got = _plan_global(cg, members, scores, opts, ratio)
            out.update(got)
            report.append({"groups": [g.id for g, _ in members], "producers": members[0][0].producers[:2],
                           "ratio": ratio, "units": sum(g.size for g, _ in members),
                           "kept": sum(len(got[g.id].keep) for g, _ in members)})
    return out, report


# ----------------------------------------------------------------------------------------------
# GroupFisher's greedy schedule


def _plan_greedy(cg: CouplingGraph, candidates, scores, gradients: GradScores | None,
                 opts: PlanOptions) -> tuple[dict[int, GroupPlan], dict]:
    """Group-fisher's greedy removal (``grad_importance.greedy_removals``) across every candidate, to
    ``opts.ratio`` of their units (as ``--global``) or to ``opts.greedy_macs`` of the model's MACs. Δ is
    the scores' ``deltas``; a group scored by the l2 fallback instead gets ``score x saving at full
    width`` (so it starts where the one-shot plan ranks it). Rounding (``round_to``) puts back the
    units removed last; a group of entangled units keeps the greedy's count, chosen by ``select_units``."""
    from onnxprune.planning.grad_importance import CostModel, greedy_removals, handler_macs  # optional torch

    groups = [g for g, _ in candidates]
    deltas = dict(gradients.deltas) if gradients is not None else {}
    node_macs = gradients.node_macs if gradients is not None else {}
    base = handler_macs(cg)

    def macs_of(node) -> float:  # the MACs the scores were divided by, where they read any
        return node_macs[node.name] if node.name in node_macs else base(node)

    node_latency = gradients.node_latency if gradients is not None else {}

    def latency_of(node) -> float:  # --normalize latency: the measured time the scores were divided by
        return node_latency.get(node.name, 0.0)

    cost_of = latency_of if opts.normalize == "latency" else macs_of
    missing = [g for g in groups if g.id not in deltas]
    if missing:
        full = CostModel(cg, missing, opts.normalize, cost_of)
        for g in missing:
            deltas[g.id] = scores[g.id] * full.savings(g.id)
    total = sum(g.size for g in groups)
    ceilings = {g.id: min(g.size - 1, int(math.floor(g.size * opts.max_ratio))) for g in groups}
    count = None if opts.greedy_macs is not None else int(math.floor(total * opts.ratio))
    order = greedy_removals(cg, groups, deltas, opts.normalize, count=count, macs_share=opts.greedy_macs,
                            ceilings=ceilings, batch=opts.greedy_batch, macs_of=macs_of,
                            latency_of=latency_of if opts.normalize == "latency" else None)
    out = {}
    for g in groups:
        keep_n = round_keep(g.size, g.size - len(order[g.id]), unit_step(cg, g, opts.round_to))
        if np.all(_incidence(cg, g) == 1):
            mask = np.ones(g.size, dtype=bool)
            mask[np.asarray(order[g.id][:g.size - keep_n], dtype=np.int64)] = False
            keep = np.flatnonzero(mask)
        else:
            keep = select_units(cg, g, scores[g.id], keep_n)
        out[g.id] = GroupPlan(g.id, g.size, keep, g.is_approximate)
    return out, {"batch": opts.greedy_batch, "macs_share": opts.greedy_macs, "removed": total - sum(
        len(gp.keep) for gp in out.values()), "fallback_deltas": len(missing)}


def group_ratio(g: Group, opts: PlanOptions, layer: list[tuple[re.Pattern, float]]) -> float:
    """The ratio a plan with ``opts`` gives group ``g``: the first ``--layer-ratio`` whose pattern
    matches one of its producers (``layer``: compiled), else the head ratio for attention groups,
    else ``--ratio``."""
    for pat, r in layer:
        if any(pat.search(p) for p in g.producers):
            return r
    if g.attention:
        r_attn = opts.head_ratio if opts.head_ratio is not None else opts.head_dim_ratio
        return r_attn if r_attn is not None else 0.0
    return opts.ratio


def build_plan(an: Analysis, opts: PlanOptions, plan_json: dict | None = None,
               activations: Activations | None = None, gradients: GradScores | None = None) -> Plan:
    """The plan for ``an``: loaded from ``plan_json`` (checked against the model) or made from
    ``opts`` (``activations``, ``gradients``: see ``make_plan``); NothingToPrune when every group is frozen."""
    if plan_json is not None:
        return Plan.from_json(plan_json, an.cg)
    plan = make_plan(an.cg, opts, activations, gradients)
    if not plan.groups:
        raise nothing_to_prune(plan)
    return plan


APPROXIMATE = "approximate: "  # how the frozen reason of a group left out for being approximate starts


def _reason_summary(reasons: list[str], limit: int = 8) -> str:
    """The most common reasons, with counts."""
    counts: dict[str, int] = {}
    for r in reasons:
        counts[r] = counts.get(r, 0) + 1
    return "; ".join(f"{r} ({n} group{'s' if n > 1 else ''})"
                     for r, n in sorted(counts.items(), key=lambda x: -x[1])[:limit])


def nothing_to_prune(plan: Plan) -> NothingToPrune:
    """Why ``plan`` prunes nothing, from each left-out group's first reason. Groups left out only
    for being approximate come first, with what would prune them: they are not frozen, and a model
    whose every group mixes channels (ConvNeXt-V2: LayerNorm and GRN) is not one with nothing to
    prune."""
    firsts = {gid: r[0] for gid, r in plan.frozen.items() if r}
    approx = [gid for gid, r in firsts.items() if r.startswith(APPROXIMATE)]
    others = [r for gid, r in firsts.items() if gid not in set(approx)]
    if not approx:
        if not others:
            return NothingToPrune("nothing to prune: the model has no channel groups")
        return NothingToPrune("nothing to prune: every group is frozen: " + _reason_summary(others))
    n = len(approx)
    example = firsts[approx[0]][len(APPROXIMATE):].removesuffix(" (use --allow-approximate)")
    msg = (f"nothing to prune: {n} group{'s are' if n > 1 else ' is'} approximate: --allow-approximate prunes "
           f"{'them' if n > 1 else 'it'}; with --calib the fidelity is measured (e.g. {example})")
    if others:
        msg += f"; the other {len(others)} {'are' if len(others) > 1 else 'is'} frozen: " + _reason_summary(others)
    return NothingToPrune(msg)
