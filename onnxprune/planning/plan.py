"""Plans: which units of which group to keep. A plan is pure data (JSON), replayable and reviewable."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from onnxprune.analysis.analyze import Analysis, barrier_summary
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



def _anchor(cg: CouplingGraph, g: Group) -> int:
    """The space that names a group in a plan file: a producer weight's output axis if any."""
    for s in g.slots:
        if s.role == Role.PRODUCER:
            return s.space
    return g.spaces[0]


def _check_regexes(cg: CouplingGraph, opts: PlanOptions) -> None:
    names = list(cg.node_by_name)
    for rx in [r for r, _ in opts.layer_ratios] + list(opts.ignore):
        try:
            pat = re.compile(rx)
        except re.error as exc:
            raise UserError(f"bad regular expression '{rx}': {exc}") from None
        if not any(pat.search(n) for n in names):
            raise UserError(f"regular expression '{rx}' matches no node of the model")


def _round_keep(size: int, keep: int, round_to: int) -> int:
    keep = max(1, min(size, keep))
    if round_to > 1 and size >= round_to:
        keep = min(size, int(math.ceil(keep / round_to)) * round_to)
    return keep


def grad_options(opts: PlanOptions) -> GradOptions:
    """The ``planning.grad_importance`` options of a gradient or Torch-Pruning criterion (imports torch)."""
    from onnxprune.planning.grad_importance import GradOptions  # optional torch: only for these criteria

    return GradOptions(opts.importance, group_reduction=opts.group_reduction, normalizer=opts.normalizer,
                       taylor_form=opts.taylor_form, normalize=opts.normalize, members=opts.tp_members)


def _grad_scores(cg: CouplingGraph, opts: PlanOptions, groups: list[Group],
                 gradients: GradScores | None) -> tuple[dict[int, np.ndarray], dict]:
    """Scores of ``groups`` by a gradient criterion (``gradients``: scored on every group a plan may
    prune, by ``pipeline.gradient_scores_for``) or a Torch-Pruning weight criterion (scored here when
    ``gradients`` is None); and the report entry, on ``groups`` only."""
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
    return mine.scores, mine.report(cg)


def make_plan(cg: CouplingGraph, opts: PlanOptions, activations: Activations | None = None,
              gradients: GradScores | None = None) -> Plan:
    """The plan ``opts`` asks for. ``activations``: what the data-aware importances (``act``,
    ``act-var``) read, captured on the fit share of the calibration data (``pipeline.capture_activations``);
    ``gradients``: the scores of a gradient criterion (``pipeline.gradient_scores_for``: collected
    once, reused at every ratio), at least on every group this plan may prune."""
    opts.validate()
    if opts.importance in DATA_IMPORTANCES and activations is None:
        raise UserError(f"--importance {opts.importance} needs calibration data (--calib or --calib-images)")
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
            reasons.append(f"approximate: {g.approximate[0]} (use --allow-approximate)")
        if g.size <= 1 and not reasons:
            reasons.append("a single channel")
        if reasons:
            frozen[g.id] = reasons
            continue
        if g.attention:
            r_attn = opts.head_ratio if opts.head_ratio is not None else opts.head_dim_ratio
            ratio = r_attn if r_attn is not None else 0.0
        else:
            ratio = opts.ratio
        for pat, r in layer:
            if any(pat.search(p) for p in g.producers):
                ratio = r
                break
        candidates.append((g, ratio))
    if opts.importance in DATA_IMPORTANCES:
        ds = data_scores(cg, [g for g, _ in candidates], opts.importance, activations)
        scores, importance = ds.scores, ds.report(cg, activations)
    elif opts.importance in GRAD_CRITERIA:
        scores, importance = _grad_scores(cg, opts, [g for g, _ in candidates], gradients)
    else:
        scores = {g.id: group_importance(cg, g, opts.importance, opts.seed) for g, _ in candidates}
        importance = {"criterion": opts.importance, "groups": len(candidates)}
    groups: dict[int, GroupPlan] = {}
    if opts.global_:
        groups = _plan_global(cg, candidates, scores, opts)
    else:
        for g, ratio in candidates:
            n_remove = int(math.floor(g.size * ratio))
            keep_n = _round_keep(g.size, g.size - n_remove, opts.round_to)
            groups[g.id] = GroupPlan(g.id, g.size, select_units(cg, g, scores[g.id], keep_n), g.is_approximate)
    return Plan(groups, frozen, options_json(opts), importance)


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
    spaces = g.spaces
    inc = np.zeros((n, len(spaces)), dtype=np.int64)
    for j, sid in enumerate(spaces):
        inc[:, j] = np.bincount(cg.unit_index(g, sid), minlength=n)
    sizes = inc.sum(axis=0)
    if np.all(inc == 1):
        return _top(score, keep_n)
    budget = np.minimum(-(-n_remove * sizes // n), sizes - 1)
    lost = np.zeros(len(spaces), dtype=np.int64)
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


def _plan_global(cg: CouplingGraph, candidates, scores, opts: PlanOptions) -> dict[int, GroupPlan]:
    entries = []
    total = 0
    for g, _ in candidates:
        total += g.size
        for u, s in enumerate(scores[g.id]):
            entries.append((s, g.id, u))
    entries.sort()
    target = int(math.floor(total * opts.ratio))
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
        keep_n = _round_keep(g.size, g.size - removed[gid], opts.round_to)
        out[gid] = GroupPlan(gid, g.size, select_units(cg, g, scores[gid], keep_n), g.is_approximate)
    return out



def build_plan(an: Analysis, opts: PlanOptions, plan_json: dict | None = None,
               activations: Activations | None = None, gradients: GradScores | None = None) -> Plan:
    """The plan for ``an``: loaded from ``plan_json`` (checked against the model) or made from
    ``opts`` (``activations``, ``gradients``: see ``make_plan``); NothingToPrune when every group is frozen."""
    if plan_json is not None:
        return Plan.from_json(plan_json, an.cg)
    plan = make_plan(an.cg, opts, activations, gradients)
    if not plan.groups:
        lines = barrier_summary(an.cg)
        raise NothingToPrune("nothing to prune: every group is frozen: " + "; ".join(lines))
    return plan
