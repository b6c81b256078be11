"""Plan options: what the user asked for, as typed values, validated once.

Frozen: a run that needs other options makes new ones (``dataclasses.replace(opts, ratio=r)``).
Nothing here reads option text: the command line turns ``--round-to auto`` into a number first
(``onnxprune.runtime.machine.auto_round_to``, which the Python API may call too).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from onnxprune.errors import UserError
from onnxprune.planning.importance import IMPORTANCES


@dataclass(frozen=True)
class PlanOptions:
    ratio: float = 0.5
    layer_ratios: list[tuple[str, float]] = field(default_factory=list)
    ignore: list[str] = field(default_factory=list)
    round_to: int = 1  # keep unit counts multiples of this (auto_round_to(ep)[0]: the machine's channel block)
    global_: bool = False
    max_ratio: float = 0.9
    importance: str = "l2"
    allow_approximate: bool = False
    seed: int = 0
    head_ratio: float | None = None  # whole attention heads (analysis in "heads" mode)
    head_dim_ratio: float | None = None  # head-dimension positions (analysis in "dim" mode)

    @property
    def head_mode(self) -> str:
        return "heads" if self.head_ratio is not None else "dim"

    def validate(self) -> None:
        if not 0.0 <= self.ratio < 1.0:
            raise UserError(f"--ratio must be in [0, 1), got {self.ratio}")
        if self.head_ratio is not None and self.head_dim_ratio is not None:
            raise UserError("use one of --head-ratio / --head-dim-ratio per run (prune twice to combine)")
        for name, r in (("--head-ratio", self.head_ratio), ("--head-dim-ratio", self.head_dim_ratio)):
            if r is not None and not 0.0 <= r < 1.0:
                raise UserError(f"{name} must be in [0, 1), got {r}")
        for rx, r in self.layer_ratios:
            if not 0.0 <= r < 1.0:
                raise UserError(f"--layer-ratio {rx}={r}: ratio must be in [0, 1)")
        if not 0.0 < self.max_ratio < 1.0:
            raise UserError(f"--max-ratio must be in (0, 1), got {self.max_ratio}")
        if isinstance(self.round_to, bool) or not isinstance(self.round_to, int):
            raise UserError(f"--round-to must be an integer, got {self.round_to!r} "
                            "(for the machine's channel block: onnxprune.runtime.machine.auto_round_to(ep)[0])")
        if self.round_to < 1:
            raise UserError(f"--round-to must be >= 1, got {self.round_to}")
        if self.importance not in IMPORTANCES:
            raise UserError(f"unknown importance '{self.importance}' (one of {', '.join(IMPORTANCES)})")


def options_json(opts: PlanOptions) -> dict:
    return {"ratio": opts.ratio, "layer_ratios": [list(x) for x in opts.layer_ratios], "ignore": opts.ignore,
            "round_to": opts.round_to, "global": opts.global_, "max_ratio": opts.max_ratio,
            "importance": opts.importance, "allow_approximate": opts.allow_approximate, "seed": opts.seed,
            "head_ratio": opts.head_ratio, "head_dim_ratio": opts.head_dim_ratio}

