"""Plan options: what the user asked for, as typed values, validated once.

Frozen: a run that needs other options makes new ones (``dataclasses.replace(opts, ratio=r)``).
Nothing here reads option text: the command line turns ``--round-to auto`` into a number first
(``onnxprune.runtime.machine.auto_round_to``, which the Python API may call too).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from onnxprune.errors import UserError
from onnxprune.planning.importance import GRAD_CRITERIA, GRADIENT_IMPORTANCES, IMPORTANCES

# the choices of planning.grad_importance.GradOptions (checked there too; repeated here so that
# validating options does not import torch)
GROUP_REDUCTIONS = ("mean", "sum", "max", "prod", "first")
NORMALIZERS = ("mean", "max", "sum", "standardization", "gaussian", "none")
GROUP_FISHER_NORMALIZE = ("flops", "memory", "latency", "none")
TAYLOR_FORMS = ("param", "activation")
TP_MEMBERS = ("tp", "all")
GQA_UNITS = ("kv", "query")  # --gqa: what --head-ratio removes in grouped-query attention
# --conv-groups: what a unit of a grouped convolution (group > 1, several channels per group) is: one
# in-group position in every conv group (the groups stay, each narrower; Torch-Pruning's unit) or a whole
# conv group (fewer groups, each as wide: what onnxruntime's group-by-group kernels run faster)
CONV_GROUP_UNITS = ("positions", "whole")
CONV_GROUPS_MODE = "+conv-groups"  # the analysis mode's suffix for whole conv groups (head_mode_for)
GREEDY_BATCH = 0.05  # greedy: a round removes this share of what is left (ResNet-50 plans in a second)
ALLOCATE_CHOICES = ("uniform", "latency")  # --allocate: one ratio searched, or per-group counts (planning.allocate)
ALLOCATE_VALUES = ("importance", "sensitivity")  # --allocate-value: measured damage or the criterion's scores
HESSIAN_DEFAULT_SAMPLES = 64  # hessian runs one sample per pass: its default cap on the fit samples


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
    # grouped-query attention with --head-ratio: a unit is a whole KV group (its KV head and every query
    # head reading it: "kv") or a query-head position within every KV group ("query"; analysis in
    # "heads-query" mode)
    gqa: str = "kv"
    conv_groups: str = "positions"  # CONV_GROUP_UNITS
    # how the gradient and Torch-Pruning criteria score (planning.grad_importance.GradOptions); each
    # only with the criteria it applies to (validate)
    group_reduction: str = "mean"  # over a group's members (not group-fisher: one shared mask)
    normalizer: str | None = None  # None: the criterion's default (mean; group-fisher none; lamp its own)
    taylor_form: str = "param"  # taylor only
    normalize: str = "flops"  # group-fisher only: what a unit's score is divided by
    tp_members: str = "tp"  # weight members: Torch-Pruning 1.6.1's or every weight axis
    # schedules (planning.plan): rank within classes of isomorphic groups (each class at its ratio,
    # pooled across its groups), or group-fisher's greedy removal with costs recomputed as widths shrink
    isomorphic: bool = False
    greedy: bool = False  # group-fisher only; ranks across groups (as --global), not with --isomorphic
    greedy_batch: float = GREEDY_BATCH  # share of what is left to remove taken per round (0: one unit)
    greedy_macs: float | None = None  # greedy: stop at this share of the model's MACs instead of --ratio
    # a budget allocation (planning.allocate, --allocate latency): (group id, kept units) per group it
    # decided, in place of the ratio; the ids are the analysis' (one run's), like --layer-ratio's regexes
    keep_counts: tuple[tuple[int, int], ...] = ()

    @property
    def head_mode(self) -> str:
        """The analysis mode this plan needs (``pipeline.head_mode_for``): what a unit is at attention
        splits (``dim``, ``heads``, ``heads-query``), with ``CONV_GROUPS_MODE`` appended for whole conv
        groups."""
        if self.head_ratio is None:
            head = "dim"
        else:
            head = "heads-query" if self.gqa == "query" else "heads"
        return head + (CONV_GROUPS_MODE if self.conv_groups == "whole" else "")

    def validate(self) -> None:
        if not 0.0 <= self.ratio < 1.0:
            raise UserError(f"--ratio must be in [0, 1), got {self.ratio}")
        if self.gqa not in GQA_UNITS:
            raise UserError(f"--gqa must be one of {', '.join(GQA_UNITS)}, got {self.gqa!r}")
        if self.conv_groups not in CONV_GROUP_UNITS:
            raise UserError(f"--conv-groups must be one of {', '.join(CONV_GROUP_UNITS)}, got {self.conv_groups!r}")
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
        self._validate_grad()
        self._validate_schedule()

    def _validate_schedule(self) -> None:
        if self.keep_counts:
            if self.global_ or self.isomorphic or self.greedy:
                raise UserError("--allocate latency chooses every group's count; --global, --isomorphic and --greedy "
                                "rank units another way: use one")
            for gid, k in self.keep_counts:
                if isinstance(k, bool) or not isinstance(k, int) or k < 1:
                    raise UserError(f"an allocation keeps {k!r} units of group {gid}: counts must be integers >= 1")
        if self.greedy and self.importance != "group-fisher":
            raise UserError(f"--greedy applies to --importance group-fisher, not {self.importance}")
        if self.greedy and self.isomorphic:
            raise UserError("--greedy ranks across every group; --isomorphic ranks within classes: use one")
        if not 0.0 <= self.greedy_batch < 1.0:
            raise UserError(f"--greedy-batch must be in [0, 1), got {self.greedy_batch}")
        if self.greedy_batch != GREEDY_BATCH and not self.greedy:
            raise UserError("--greedy-batch applies to --greedy only")
        if self.greedy_macs is not None:
            if not self.greedy:
                raise UserError("greedy_macs applies to --greedy only (otherwise --target-macs searches the ratio)")
            if not 0.0 < self.greedy_macs <= 1.0:
                raise UserError(f"greedy_macs must be in (0, 1], got {self.greedy_macs}")

    def _validate_grad(self) -> None:
        for flag, value, choices in (("--group-reduction", self.group_reduction, GROUP_REDUCTIONS),
                                     ("--taylor-form", self.taylor_form, TAYLOR_FORMS),
                                     ("--normalize", self.normalize, GROUP_FISHER_NORMALIZE),
                                     ("--tp-members", self.tp_members, TP_MEMBERS)):
            if value not in choices:
                raise UserError(f"{flag} must be one of {', '.join(choices)}, got {value!r}")
        if self.normalizer is not None and self.normalizer not in NORMALIZERS:
            raise UserError(f"--normalizer must be one of {', '.join(NORMALIZERS)}, got {self.normalizer!r}")
        for flag, bad in grad_option_conflicts(self.importance, self.group_reduction != "mean",
                                               self.normalizer is not None, self.taylor_form != "param",
                                               self.normalize != "flops", self.tp_members != "tp"):
            raise UserError(f"{flag} {bad}")


def grad_option_conflicts(importance: str, group_reduction: bool, normalizer: bool, taylor_form: bool,
                          normalize: bool, tp_members: bool) -> list[tuple[str, str]]:
    """(flag, why) for each gradient-criterion option given (True) that ``importance`` does not use."""
    out = []
    if importance not in GRAD_CRITERIA:
        for flag, given in (("--group-reduction", group_reduction), ("--normalizer", normalizer),
                            ("--taylor-form", taylor_form), ("--normalize", normalize), ("--tp-members", tp_members)):
            if given:
                out.append((flag, f"applies to the gradient and Torch-Pruning criteria "
                                  f"({', '.join(GRAD_CRITERIA)}), not to --importance {importance}"))
        return out
    if taylor_form and importance != "taylor":
        out.append(("--taylor-form", f"applies to --importance taylor, not {importance}"))
    if normalize and importance != "group-fisher":
        out.append(("--normalize", f"applies to --importance group-fisher, not {importance} (--normalizer "
                                   "normalizes the others' scores)"))
    if group_reduction and importance == "group-fisher":
        out.append(("--group-reduction", "does not apply to --importance group-fisher (one mask shared by the "
                                         "group's members: nothing to reduce)"))
    if normalizer and importance == "lamp":
        out.append(("--normalizer", "does not apply to --importance lamp (LAMP's normalization is the criterion)"))
    if tp_members and importance in ("fisher", "group-fisher", "fpgm") or (
            tp_members and importance == "taylor" and taylor_form):
        out.append(("--tp-members", f"applies to the weight members of taylor (parameter form), hessian and "
                                    f"lamp, not to {importance}"))
    return out


def needs_gradients(opts: PlanOptions) -> bool:
    return opts.importance in GRADIENT_IMPORTANCES


def options_json(opts: PlanOptions) -> dict:
    return {"ratio": opts.ratio, "layer_ratios": [list(x) for x in opts.layer_ratios], "ignore": opts.ignore,
            "round_to": opts.round_to, "global": opts.global_, "max_ratio": opts.max_ratio,
            "importance": opts.importance, "allow_approximate": opts.allow_approximate, "seed": opts.seed,
            "head_ratio": opts.head_ratio, "head_dim_ratio": opts.head_dim_ratio,
            **({"gqa": opts.gqa} if opts.gqa != "kv" else {}),
            **({"conv_groups": opts.conv_groups} if opts.conv_groups != "positions" else {}),
            **({"group_reduction": opts.group_reduction, "normalizer": opts.normalizer, "taylor_form": opts.taylor_form,
                "normalize": opts.normalize, "tp_members": opts.tp_members}
               if opts.importance in GRAD_CRITERIA else {}),
            **({"isomorphic": True} if opts.isomorphic else {}),
            **({"greedy": True, "greedy_batch": opts.greedy_batch, "greedy_macs": opts.greedy_macs}
               if opts.greedy else {}),
            **({"allocated": {str(gid): k for gid, k in opts.keep_counts}} if opts.keep_counts else {})}


@dataclass(frozen=True, eq=False)
class GradientSettings:
    """How gradients are collected for a gradient criterion (``runtime.gradients.collect_gradients``):
    the loss of classifier-shaped outputs without labels (``pseudo``, ``sampled``, or ``gaussian`` for
    every output), the batch, how many fit samples (None: all; ``hessian``: HESSIAN_DEFAULT_SAMPLES),
    integer labels by global sample index, the device (``auto``: CUDA when torch sees one) and the seed
    of sampled labels and Gaussian targets."""

    loss: str = "pseudo"
    batch_size: int = 32
    max_samples: int | None = None
    labels: object = None  # np.ndarray of integers, or None
    device: str = "auto"
    seed: int = 0

    def samples_for(self, importance: str) -> int | None:
        if self.max_samples is not None:
            return self.max_samples
        return HESSIAN_DEFAULT_SAMPLES if importance == "hessian" else None

    def to_json(self, importance: str) -> dict:
        lab = self.labels
        return {"loss": "labels" if lab is not None else self.loss, "batch_size": self.batch_size,
                "max_samples": self.samples_for(importance), "device": self.device, "seed": self.seed,
                "labels": None if lab is None else int(len(lab))}



STRIPE_MODES = ("shrink", "mask")  # physical smaller kernels (default) | zeroed stripes, graph unchanged
STRIPE_SHAPES = ("box", "free")  # one rectangle of stripes per filter | any stripes (the paper's)
STRIPE_NORMS = ("l1", "l2")
STRIPE_GATES = ("latency", "off")  # shrink a conv only when measured faster | always


@dataclass(frozen=True)
class StripeOptions:
    """Stripe pruning (issue 12): ``ratio`` of the stripes ``W[f, :, i, j]`` of every K×K conv removed
    (per conv, or ranked across convs with ``global_``, no conv losing more than ``max_ratio``).
    ``shape``: ``box`` keeps one rectangle per filter (so kernels shrink), ``free`` any stripes; None
    takes ``box`` for ``shrink`` and ``free`` for ``mask``. ``boxes``: distinct rectangles per conv
    (each becomes one Conv of the split). ``gate``: ``latency`` makes a shrink only where the conv's
    shrunk form measures faster than its masked dense form on the run's execution provider."""

    ratio: float
    mode: str = "shrink"
    shape: str | None = None
    norm: str = "l1"
    boxes: int = 2
    gate: str = "latency"
    global_: bool = False
    max_ratio: float = 0.9
    ignore: tuple[str, ...] = ()  # regexes: convs whose key matches one (re.search) are left alone

    @property
    def stripe_shape(self) -> str:
        return self.shape or ("box" if self.mode == "shrink" else "free")

    def validate(self) -> None:
        if not 0.0 <= self.ratio < 1.0:
            raise UserError(f"--stripe-ratio must be in [0, 1), got {self.ratio}")
        if not 0.0 < self.max_ratio <= 1.0:
            raise UserError(f"--max-ratio must be in (0, 1], got {self.max_ratio}")
        for name, value, choices in (("--stripe-mode", self.mode, STRIPE_MODES),
                                     ("--stripe-shape", self.stripe_shape, STRIPE_SHAPES),
                                     ("--stripe-norm", self.norm, STRIPE_NORMS),
                                     ("--stripe-gate", self.gate, STRIPE_GATES)):
            if value not in choices:
                raise UserError(f"{name} must be one of {', '.join(choices)}, not {value!r}")
        if self.boxes < 1:
            raise UserError(f"--stripe-boxes must be >= 1, got {self.boxes}")
        for rx in self.ignore:
            try:
                re.compile(rx)
            except re.error as exc:
                raise UserError(f"--ignore {rx!r} is not a regular expression: {exc}") from None
