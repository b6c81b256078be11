"""Python API in DepGraph's vocabulary: a dependency graph of groups you can list, inspect with
``details()`` and prune by indices, and a pruner with ``step()`` (also interactive)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import onnx

from onnxprune.analysis.coupling import Group
from onnxprune.errors import UserError
from onnxprune.pipeline import Analysis, analyze_model, apply_plan
from onnxprune.planning.importance import group_importance
from onnxprune.planning.options import PlanOptions
from onnxprune.planning.plan import GroupPlan, Plan, make_plan


class GroupView:
    """One group of coupled channel spaces (Torch-Pruning's ``Group``)."""

    def __init__(self, dg: DependencyGraph, group: Group):
        self._dg = dg
        self.group = group

    @property
    def id(self) -> int:
        return self.group.id

    @property
    def size(self) -> int:
        """Number of prunable units (root indices) of the group."""
        return self.group.size

    @property
    def prunable(self) -> bool:
        return self.group.prunable

    @property
    def frozen(self) -> list[str]:
        return list(self.group.frozen)

    @property
    def approximate(self) -> list[str]:
        return list(self.group.approximate)

    @property
    def status(self) -> str:
        if self.group.frozen:
            return "frozen"
        return "approximate" if self.group.approximate else "prunable"

    def members(self) -> list[dict]:
        cg = self._dg.analysis.cg
        roles = {(s.const, s.axis): str(s.role) for s in self.group.slots}
        out = []
        for sid in self.group.spaces:
            t, ax = cg.space_key[sid]
            prod = cg.producer_of.get(t)
            out.append({"tensor": t, "axis": ax, "size": cg.space_size[sid],
                        "node": prod.name if prod is not None else None,
                        "op": prod.op_type if prod is not None else ("constant" if t in cg.consts else "input"),
                        "slot": roles.get((t, ax))})
        return out

    def importance(self, kind: str = "l2", seed: int = 0) -> np.ndarray:
        return group_importance(self._dg.analysis.cg, self.group, kind, seed)

    def details(self) -> str:
        g = self.group
        head = (f"Group {g.id}: {g.size} units, {self.status}"
                + (f" ({g.frozen[0]})" if g.frozen else "")
                + (f" [approximate: {g.approximate[0]}]" if g.approximate and not g.frozen else ""))
        lines = [head]
        if g.producers:
            lines.append("  producers: " + ", ".join(g.producers[:6]) + (" ..." if len(g.producers) > 6 else ""))
        for i, m in enumerate(self.members()):
            slot = f" <{m['slot']}>" if m["slot"] else ""
            src = f"{m['op']} '{m['node']}'" if m["node"] else m["op"]
            lines.append(f"  [{i}] {m['tensor']} axis {m['axis']} ({m['size']}) from {src}{slot}")
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {"id": self.id, "units": self.size, "status": self.status, "frozen": self.frozen[:5],
                "approximate": self.approximate[:5], "producers": self.group.producers,
                "members": self.members()}

    def prune(self, idxs=None) -> None:
        """Interactive pruning: mark units ``idxs`` (default: the pruner's choice) for removal."""
        pr = self._dg._interactive
        if pr is None:
            raise UserError("group.prune() works inside Pruner.step(interactive=True)")
        pr._choose(self, idxs)


class DependencyGraph:
    """Coupling graph of an ONNX model: ``DependencyGraph('model.onnx').groups``."""

    def __init__(self, model: onnx.ModelProto | str, input_shapes: dict[str, tuple[int, ...]] | None = None,
                 mode: str = "dim"):
        """``mode``: the analysis mode (``PlanOptions.head_mode``: ``"dim"``, ``"heads"``, with
        ``"+conv-groups"`` for whole conv groups); a ``Pruner`` needs the one of its options."""
        self.analysis: Analysis = analyze_model(model, input_shapes, head_mode=mode)
        self._interactive: Pruner | None = None

    @property
    def groups(self) -> list[GroupView]:
        """Every group that holds weights."""
        return [GroupView(self, g) for g in self.analysis.cg.groups]

    def prunable_groups(self) -> Iterator[GroupView]:
        return (g for g in self.groups if g.prunable)

    def get_group(self, tensor: str, axis: int = 1) -> GroupView:
        cg = self.analysis.cg
        sid = cg.space_ids.get((tensor, axis))
        if sid is not None:
            for g in cg.groups:
                if sid in g.spaces:
                    return GroupView(self, g)
        raise UserError(f"no group holds axis {axis} of '{tensor}'")

    def prune(self, choices: dict[int, np.ndarray]) -> onnx.ModelProto:
        """Remove units by group id: ``{group_id: indices to remove}``. Returns the pruned model."""
        cg = self.analysis.cg
        groups = {}
        for gid, rem in choices.items():
            g = cg.groups[gid]
            keep = np.setdiff1d(np.arange(g.size), np.asarray(rem, dtype=np.int64))
            groups[gid] = GroupPlan(gid, g.size, keep, g.is_approximate)
        plan = Plan(groups, {g.id: g.frozen for g in cg.groups if not g.prunable}, {})
        return apply_plan(self.analysis, plan)[0]


class Pruner:
    """High-level pruner: ``Pruner(dg, PlanOptions(ratio=0.5)).step()`` returns the pruned model."""

    def __init__(self, dg: DependencyGraph, options: PlanOptions | None = None):
        self.dg = dg
        self.options = options or PlanOptions()
        want, have = self.options.head_mode, dg.analysis.cg.head_mode
        if want != have:  # whole heads or whole conv groups need their own analysis
            raise UserError(f"these options need DependencyGraph(..., mode={want!r}) (this one: {have!r})")
        self.history: list[dict] = []  # replayable: every step's plan as JSON
        self._chosen: dict[int, np.ndarray] = {}

    def plan(self) -> Plan:
        return make_plan(self.dg.analysis.cg, self.options)

    def step(self, interactive: bool = False):
        if interactive:
            return self._interactive_step()
        plan = self.plan()
        self.history.append(plan.to_json(self.dg.analysis.cg))
        return apply_plan(self.dg.analysis, plan)[0]

    def _interactive_step(self) -> Iterator[GroupView]:
        self._plan = self.plan()
        self._chosen = {}
        self.dg._interactive = self
        try:
            for gid in self._plan.groups:
                yield GroupView(self.dg, self.dg.analysis.cg.groups[gid])
        finally:
            self.dg._interactive = None

    def _choose(self, view: GroupView, idxs) -> None:
        if idxs is None:
            gp = self._plan.groups[view.id]
            idxs = np.setdiff1d(np.arange(gp.size), gp.keep)
        self._chosen[view.id] = np.asarray(idxs, dtype=np.int64)

    def apply(self) -> onnx.ModelProto:
        """After an interactive step: apply the chosen removals."""
        return self.dg.prune(self._chosen)
