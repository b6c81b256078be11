"""``--round-to N``: kept channel counts that are multiples of N (the machine's channel block).

A group's *units* are what a plan keeps or removes; a unit usually is one channel, but in a grouped
convolution's group (RegNet's, ResNeXt's: ``group`` > 1 with several channels per group) one unit
stands for one position in every conv group, that is ``reps`` channels of the activations. Rounding
the unit count to N would then keep a group of 8 units (48 channels in 6 conv groups) whole at any
ratio; what must be a multiple of N is the channel count ``units x reps``, so units are rounded to
``N / gcd(N, reps)``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

from onnxprune.analysis.coupling import CouplingGraph, Group


def unit_step(cg: CouplingGraph, g: Group, round_to: int) -> int:
    """The multiple of units that keeps the group's widest space (its activations) at multiples of
    ``round_to`` channels."""
    if round_to <= 1 or not g.size:
        return max(1, round_to)
    reps = max((int(cg.space_size[s]) // g.size for s in g.spaces), default=1) or 1
    return round_to // math.gcd(round_to, reps)


def unit_steps(cg: CouplingGraph, groups: Iterable[Group], round_to: int) -> dict[int, int]:
    return {g.id: unit_step(cg, g, round_to) for g in groups}


def round_keep(size: int, keep: int, step: int) -> int:
    """``keep`` (at least 1, at most ``size``) rounded up to a multiple of ``step`` units, when the
    group has that many; a group smaller than ``step`` is kept at any count."""
    keep = max(1, min(size, keep))
    if step > 1 and size >= step:
        keep = min(size, int(math.ceil(keep / step)) * step)
    return keep


def step_of(steps: int | Mapping[int, int], gid: int) -> int:
    """``steps`` is one step for every group or a step per group id (``unit_steps``)."""
    return steps if isinstance(steps, int) else steps.get(gid, 1)
