"""Plan options: what the user asked for, validated once."""

from __future__ import annotations

from dataclasses import dataclass, field

from onnxprune.errors import UserError
from onnxprune.planning.importance import IMPORTANCES
from onnxprune.runtime.machine import auto_round_to


@dataclass
class PlanOptions:
    ratio: float = 0.5
    layer_ratios: list[tuple[str, float]] = field(default_factory=list)
    ignore: list[str] = field(default_factory=list)
    round_to: int | str = 1  # "auto": resolved by validate() (the CLI resolves it for its --ep first)
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
        if self.round_to == "auto":
            self.round_to = auto_round_to("auto")[0]
        if not isinstance(self.round_to, int):
            raise UserError(f"--round-to must be an integer or 'auto', got {self.round_to!r}")
        if self.round_to < 1:
            raise UserError(f"--round-to must be >= 1, got {self.round_to}")
        if self.importance not in IMPORTANCES:
            raise UserError(f"unknown importance '{self.importance}' (one of {', '.join(IMPORTANCES)})")



def options_json(opts: PlanOptions) -> dict:
    return {"ratio": opts.ratio, "layer_ratios": [list(x) for x in opts.layer_ratios], "ignore": opts.ignore,
            "round_to": opts.round_to, "global": opts.global_, "max_ratio": opts.max_ratio,
            "importance": opts.importance, "allow_approximate": opts.allow_approximate, "seed": opts.seed,
            "head_ratio": opts.head_ratio, "head_dim_ratio": opts.head_dim_ratio}

