"""Argument groups, Polygraphy style: each group owns its options, declares them once (``add``) and
parses them once (``parse``) into a typed, frozen value. Nothing below ``cli/`` sees option text.

A command module lists the groups it takes in ``GROUPS`` and installs them with ``install``; two
commands that take an option take it from the same group, so they cannot disagree about its type,
choices or meaning (tests/test_cli.py checks that every option of every command belongs to exactly
one group class). A group's constructor may set a default that differs per command (``bench`` times
longer than ``sweep``) or leave out options a command has no use for (``--tol`` where nothing is
verified). Groups whose value depends on another's take it as an argument of ``parse`` (``PlanArgs``
resolves ``--round-to auto`` for the ``--ep`` of ``ExecutionArgs``), and groups that write files take
the paths they must never overwrite.

Errors: a value argparse can check alone fails in argparse (one line naming the option); the rest
raise ``UserError`` in ``parse``. Either way: exit 2, one line, before any work or any file written.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from onnxprune.cli.common import (
    Parser,
    check_output,
    check_writable,
    load_plan_file,
    non_negative_float,
    non_negative_int,
    parse_arrays,
    parse_layer_ratios,
    parse_ratios,
    parse_round_to,
    parse_shapes,
    positive_float,
    positive_int,
)
from onnxprune.errors import UserError
from onnxprune.measure.exchange import EVALS as EXCHANGE_EVALS
from onnxprune.measure.fidelity import METRICS
from onnxprune.measure.verify import DEFAULT_TOL
from onnxprune.planning.importance import (
    DEFAULT_BIAS_IMPORTANCE,
    DEFAULT_DATA_IMPORTANCE,
    DEFAULT_IMPORTANCE,
    DEFAULT_UNCOMPENSATED_IMPORTANCE,
    GRADIENT_IMPORTANCES,
    IMPORTANCES,
    NEEDS_DATA,
    default_importance,
)
from onnxprune.planning.options import (
    ALLOCATE_CHOICES,
    ALLOCATE_VALUES,
    CONV_GROUP_UNITS,
    GROUP_FISHER_NORMALIZE,
    GROUP_REDUCTIONS,
    HESSIAN_DEFAULT_SAMPLES,
    NORMALIZERS,
    STRIPE_GATES,
    STRIPE_MODES,
    STRIPE_NORMS,
    STRIPE_SHAPES,
    TAYLOR_FORMS,
    TP_MEMBERS,
    GradientSettings,
    PlanOptions,
    StripeOptions,
    grad_option_conflicts,
)
from onnxprune.rewrite.compensate import BN_STATS, CompensateOptions
from onnxprune.rewrite.compensate import MODES as COMPENSATIONS
from onnxprune.runtime.calib import CHANNEL_ORDERS, DEFAULT_HOLDOUT, LAYOUTS, CalibSpec, ImageSpec
from onnxprune.runtime.machine import auto_round_to
from onnxprune.runtime.session import EPS


def given_options(ns, flags) -> list[str]:
    """The options of ``flags`` the command line set: not None, and for switches and counts not False
    or the integer 0 (``--finetune 0`` trains nothing; ``--head-ratio 0.0`` is still given); options a
    command does not declare count as not given."""
    out = []
    for flag in flags:
        v = getattr(ns, flag.lstrip("-").replace("-", "_"), None)
        if v is None or v is False or (type(v) is int and v == 0):
            continue
        out.append(flag)
    return out


class ArgGroup:
    """Owns some options: ``add`` declares them on an argparse group; ``parse(ns)`` (in each
    subclass, with the arguments it needs) returns their typed value."""

    title: ClassVar[str] = ""

    def add(self, g) -> None:
        raise NotImplementedError

    def install(self, parser: argparse.ArgumentParser) -> None:
        self.add(parser.add_argument_group(self.title))

    def options(self) -> frozenset[str]:
        """The option strings this group declares (``--ratio``, ``-o``, ...)."""
        p = Parser(add_help=False)
        self.install(p)
        return frozenset(o for a in p._actions for o in a.option_strings)


def install(parser: argparse.ArgumentParser, groups: Iterable[ArgGroup]) -> None:
    for group in groups:
        group.install(parser)


# ----------------------------------------------------------------------------------------------
# values


@dataclass(frozen=True, eq=False)
class ModelInputs:
    shapes: dict[str, tuple[int, ...]]  # --input-shape NAME=1x3x224x224
    arrays: dict[str, np.ndarray]  # --input NAME=FILE.npy


@dataclass(frozen=True)
class Execution:
    ep: str  # as asked: auto, cpu or cuda (runtime.session.resolve_ep says which one runs)
    tol: float = DEFAULT_TOL


@dataclass(frozen=True)
class PlanRequest:
    options: PlanOptions  # validated; round_to is an int
    round_to_why: str | None = None  # why --round-to auto resolved to options.round_to (None: a number)

    def report(self) -> dict:
        if self.round_to_why is None:
            return {}
        return {"round_to": {"requested": "auto", "resolved": self.options.round_to, "why": self.round_to_why}}


@dataclass(frozen=True)
class PlanFiles:
    load: dict | None  # --load-plan, parsed JSON
    save: str | None  # --save-plan, checked writable


@dataclass(frozen=True)
class Targets:
    macs: float | None
    latency: float | None
    fidelity: float | None = None  # --target-fidelity: held-out fidelity >= this (needs calibration data)
    metric: str | None = None  # what --target-fidelity judges (None: agreement where classifier-shaped, else cosine)
    allocate: str = "uniform"  # how --target-latency/--target-macs is met: one ratio searched, or per-group counts
    value: str = "importance"  # what the per-group allocation keeps most of: importance | sensitivity (measured)
    exchange: int | None = None  # --allocate-exchange: prunes the measured exchange may spend (None: its default)

    @property
    def given(self) -> bool:
        return self.macs is not None or self.latency is not None or self.fidelity is not None


@dataclass(frozen=True)
class Timing:
    threads: int | None  # None: onnxruntime's default
    batch: int
    warmup: int
    repeat: int


@dataclass(frozen=True)
class Rounds:
    min_seconds: float
    block: int


@dataclass(frozen=True)
class SweepSpec:
    ratios: tuple[float, ...]
    plot: str | None


# ----------------------------------------------------------------------------------------------
# groups


class VerbosityArgs(ArgGroup):
    """-v on the root parser: INFO logging; prune also prints the normalization passes' changes."""

    title = "output"

    def add(self, g) -> None:
        g.add_argument("-v", "--verbose", action="store_true",
                       help="log progress; prune also lists what normalization changed")

    def parse(self, ns) -> bool:
        return bool(ns.verbose)


class ModelInputArgs(ArgGroup):
    """Input shapes (every command) and input values (commands that run the model)."""

    title = "model inputs"

    def __init__(self, values: bool = True):
        self.values = values

    def add(self, g) -> None:
        g.add_argument("--input-shape", action="append", default=[], metavar="NAME=1x3x224x224",
                       help="shape of a graph input (repeatable); dynamic dims otherwise: batch 1, "
                            "spatial 224, others 16")
        if self.values:
            g.add_argument("--input", action="append", default=[], metavar="NAME=FILE.npy",
                           help="value of a graph input from a .npy file (repeatable), or FILE.npz: one array "
                                "per graph input, by name; the probes run at these sizes")

    def parse(self, ns) -> ModelInputs:
        shapes = parse_shapes(ns.input_shape)
        return ModelInputs(shapes, parse_arrays(ns.input) if self.values else {})


class ExecutionArgs(ArgGroup):
    """The onnxruntime execution provider and, where something is verified, the tolerance."""

    title = "execution"

    def __init__(self, tolerance: bool = True):
        self.tolerance = tolerance

    def add(self, g) -> None:
        g.add_argument("--ep", default="auto", choices=list(EPS),
                       help="onnxruntime execution provider (auto: CUDA when available)")
        if self.tolerance:
            g.add_argument("--tol", type=non_negative_float, default=DEFAULT_TOL, metavar="TOL",
                           help=f"relative-error tolerance of verification (default {DEFAULT_TOL:g})")

    def parse(self, ns) -> Execution:
        return Execution(ns.ep, ns.tol if self.tolerance else DEFAULT_TOL)


class PlanArgs(ArgGroup):
    """Which units go: how many (``--ratio``, heads, per layer) and how they are chosen. Parsed into
    validated ``PlanOptions``, ``--round-to auto`` resolved for the run's execution provider.
    ``amounts=False`` (sweep, whose ``--ratios`` says how much) leaves out --ratio, --head-ratio,
    --head-dim-ratio and --layer-ratio."""

    title = "plan"

    def __init__(self, amounts: bool = True):
        self.amounts = amounts

    def add(self, g) -> None:
        if self.amounts:
            g.add_argument("--ratio", type=float, default=None, metavar="R",
                           help="fraction of units removed per channel group (default 0.5; 0 when a head option "
                                "is given). Attention heads and head dimensions are only pruned by "
                                "--head-ratio/--head-dim-ratio")
            g.add_argument("--head-ratio", type=float, default=None, metavar="R",
                           help="remove floor(H*R) whole heads of every attention block (never all)")
            g.add_argument("--gqa", choices=["kv", "query"], default="kv",
                           help="with --head-ratio on grouped-query attention (several query heads share a KV "
                                "head): remove whole KV groups, a KV head with its query heads (kv, default), or "
                                "query heads within every KV group, the same positions in each (query)")
            g.add_argument("--head-dim-ratio", type=float, default=None, metavar="R",
                           help="remove the same head-dimension positions from q/k (and v/out) of every head")
            g.add_argument("--layer-ratio", action="append", default=[], metavar="REGEX=R",
                           help="ratio R for groups whose producing node matches REGEX (repeatable, first wins)")
        g.add_argument("--conv-groups", choices=list(CONV_GROUP_UNITS), default="positions",
                       help="what a unit of a grouped convolution (group > 1, several channels per group: "
                            "RegNet, ResNeXt) is: the same in-group position in every conv group, the groups "
                            "kept, each narrower (positions, default; Torch-Pruning's unit), or a whole conv "
                            "group, fewer groups as wide as before (whole: faster on onnxruntime, which runs "
                            "a grouped conv group by group)")
        g.add_argument("--ignore", action="append", default=[], metavar="REGEX",
                       help="freeze groups touching a node matching REGEX (repeatable)")
        g.add_argument("--round-to", type=parse_round_to, default=1, metavar="N|auto",
                       help="keep unit counts multiples of N (default 1); auto: the execution provider's channel "
                            "block (16 on AVX-512 CPUs, 8 on AVX2 and CUDA)")
        g.add_argument("--global", dest="global_", action="store_true", help="rank units across groups")
        g.add_argument("--max-ratio", type=float, default=0.9, metavar="R", help="per-group ceiling with --global and --allocate latency (default 0.9)")
        g.add_argument("--importance", default=None, choices=sorted(IMPORTANCES),
                       help=f"unit scores (default {DEFAULT_IMPORTANCE}; with calibration data {DEFAULT_DATA_IMPORTANCE}, "
                            f"{DEFAULT_BIAS_IMPORTANCE} with --compensate bias, "
                            f"{DEFAULT_UNCOMPENSATED_IMPORTANCE} with --compensate none; bn: |gamma| of BatchNorm members, else l2; act: activation energy fed into each "
                            "consumer, act-var: its variance (what is lost after bias compensation); recon: the "
                            "reconstruction error left after refitting the consumers; taylor |w*dL/dw|, hessian "
                            "(OBD, diagonal Fisher), fisher (of a mask on each consumer input), group-fisher (one "
                            "mask per group, divided by --normalize); act*, recon and the gradient criteria need "
                            "--calib or --calib-images; lamp and fpgm: Torch-Pruning's weight criteria, no data)")
        g.add_argument("--group-reduction", default=None, choices=list(GROUP_REDUCTIONS),
                       help="gradient/Torch-Pruning criteria: how a group's members' scores combine (default mean)")
        g.add_argument("--normalizer", default=None, choices=list(NORMALIZERS),
                       help="gradient/Torch-Pruning criteria: per-group normalization of the scores (default mean; "
                            "group-fisher none; lamp has its own)")
        g.add_argument("--taylor-form", default=None, choices=list(TAYLOR_FORMS),
                       help="taylor: param |w*dL/dw| (Torch-Pruning's, default) or activation |a*dL/da|")
        g.add_argument("--normalize", default=None, choices=list(GROUP_FISHER_NORMALIZE),
                       help="group-fisher: divide a unit's Fisher by the MACs (flops, default), tensor elements "
                            "(memory) or measured time (latency: onnxruntime's per-node profile on the chosen "
                            "execution provider) its removal saves, or not (none)")
        g.add_argument("--tp-members", default=None, choices=list(TP_MEMBERS),
                       help="taylor/hessian/lamp: the weight members Torch-Pruning 1.6.1 scores (tp, default: no "
                            "depthwise convolutions) or every weight axis of the group (all)")
        g.add_argument("--isomorphic", action="store_true",
                       help="rank units together within each class of structurally identical groups (Torch-Pruning's "
                            "isomorphic pruning), every class at the ratio")
        g.add_argument("--greedy", action="store_true",
                       help="group-fisher: GroupFisher's greedy schedule, removing the units of smallest Fisher per "
                            "saving across every group with the savings recomputed at the widths left (batched)")
        g.add_argument("--greedy-batch", type=float, default=None, metavar="F",
                       help="--greedy: the share of what is left to remove taken per round (default 0.05; 0: one unit "
                            "a round)")
        g.add_argument("--allow-approximate", action="store_true",
                       help="also prune groups mixed by LayerNorm/Softmax/reductions (changes the function)")
        g.add_argument("--seed", type=non_negative_int, default=0, metavar="N", help="seed of --importance random (default 0)")

    def parse(self, ns, ep: str = "auto", ratio: float | None = None, data: bool = False,
              compensated: bool | str | None = False) -> PlanRequest:
        """``ep``: the execution provider ``--round-to auto`` aligns for; ``ratio``: the ratio when
        this group has no ``--ratio`` (``amounts=False``); ``data``: calibration data was given (the
        default importance is then the data-aware one, and only then may ``act*`` be asked for);
        ``compensated``: the compensation mode, or falsy for none (lsq makes the default recon, bias
        act-var: ``planning.importance.default_importance``)."""
        importance = ns.importance or default_importance(data, compensated)
        if importance in NEEDS_DATA and not data:
            raise UserError(f"--importance {importance} needs calibration data (--calib or --calib-images)")
        for flag, why in grad_option_conflicts(importance, ns.group_reduction is not None, ns.normalizer is not None,
                                               ns.taylor_form is not None, ns.normalize is not None,
                                               ns.tp_members is not None):
            raise UserError(f"{flag} {why}")
        head_ratio = ns.head_ratio if self.amounts else None
        head_dim_ratio = ns.head_dim_ratio if self.amounts else None
        if self.amounts:
            ratio = ns.ratio
        if ratio is None:
            ratio = 0.0 if (head_ratio is not None or head_dim_ratio is not None) else 0.5
        why = None
        round_to = ns.round_to
        if round_to == "auto":
            round_to, why = auto_round_to(ep)
        opts = PlanOptions(ratio=ratio, layer_ratios=parse_layer_ratios(ns.layer_ratio) if self.amounts else [],
                           ignore=list(ns.ignore), head_ratio=head_ratio, head_dim_ratio=head_dim_ratio,
                           gqa=getattr(ns, "gqa", "kv") if self.amounts else "kv",
                           conv_groups=getattr(ns, "conv_groups", "positions"),
                           round_to=round_to, global_=ns.global_, max_ratio=ns.max_ratio, importance=importance,
                           allow_approximate=ns.allow_approximate, seed=ns.seed,
                           group_reduction=ns.group_reduction or "mean", normalizer=ns.normalizer,
                           taylor_form=ns.taylor_form or "param", normalize=ns.normalize or "flops",
                           tp_members=ns.tp_members or "tp", isomorphic=ns.isomorphic, greedy=ns.greedy,
                           **({"greedy_batch": ns.greedy_batch} if ns.greedy_batch is not None else {}))
        if ns.greedy_batch is not None and not ns.greedy:
            raise UserError("--greedy-batch applies to --greedy")
        opts.validate()
        return PlanRequest(opts, why)


class StepsArgs(ArgGroup):
    """``prune --steps K``: iterative pruning (Torch-Pruning's ``iterative_steps``, linear schedule):
    K rounds of plan, compensate, rewrite and verify, each on the model the previous one left, with
    importance scored (and activations or gradients captured) anew. Only with a ratio: no target
    search, plan file, head options, finetuning, --soft or --save-plan."""

    title = "iterative pruning"

    def add(self, g) -> None:
        g.add_argument("--steps", type=positive_int, default=1, metavar="K",
                       help="prune in K steps (default 1): after step k, (1 - R*k/K) of each group's original units "
                            "are left; units re-scored and the consumers re-compensated at every step, each step "
                            "verified against its own masked original (with --verify); stats and held-out fidelity "
                            "against the original")

    def parse(self, ns) -> int:
        steps = int(ns.steps)
        if steps == 1:
            return steps
        given = given_options(ns, ("--target-macs", "--target-latency", "--target-fidelity", "--load-plan",
                                   "--save-plan", "--head-ratio", "--head-dim-ratio", "--finetune", "--soft"))
        if given:
            raise UserError(f"--steps prunes a share --ratio in steps; it cannot be used with {given[0]}")
        return steps


GRAD_LOSSES = ("pseudo", "sampled", "gaussian")  # runtime.gradients.LOSSES (repeated: it imports torch)


class GradientArgs(ArgGroup):
    """How the gradient criteria collect gradients (``runtime.gradients``): loss, labels, batch,
    samples. Only with a gradient criterion (``taylor``, ``hessian``, ``fisher``, ``group-fisher``)."""

    title = "gradients"

    def add(self, g) -> None:
        g.add_argument("--grad-loss", default=None, choices=list(GRAD_LOSSES),
                       help="loss differentiated without --labels (default pseudo): classifier-shaped outputs (the "
                            "fidelity rule: last axis C >= 2, no other per-sample axis; not those produced by a "
                            "normalization, mean/sum pooling or a division by a computed tensor, which are taken "
                            "for embeddings) get cross-entropy against the original's argmax (pseudo) or labels "
                            "drawn from its softmax (sampled: the true Fisher); every other float output a "
                            "Gaussian likelihood around its own value (gaussian: for every output)")
        g.add_argument("--labels", metavar="FILE.npy",
                       help="integer class per calibration sample (by its index in the calibration file): "
                            "cross-entropy against them for the model's classifier-shaped output")
        g.add_argument("--grad-batch", type=positive_int, default=None, metavar="N",
                       help="samples per forward/backward pass (default 32; hessian runs one per pass)")
        g.add_argument("--grad-samples", type=positive_int, default=None, metavar="N",
                       help=f"differentiate only the first N fit samples (default all; hessian "
                            f"{HESSIAN_DEFAULT_SAMPLES}: one pass per sample)")

    def parse(self, ns, importance: str, ep: str = "auto", seed: int = 0) -> GradientSettings | None:
        """None unless ``importance`` needs gradients (then no option of this group may be given)."""
        given = [flag for flag, v in (("--grad-loss", ns.grad_loss), ("--labels", ns.labels),
                                      ("--grad-batch", ns.grad_batch), ("--grad-samples", ns.grad_samples))
                 if v is not None]
        if importance not in GRADIENT_IMPORTANCES:
            if given:
                raise UserError(f"{given[0]} applies to the gradient criteria ({', '.join(GRADIENT_IMPORTANCES)}), "
                                f"not to --importance {importance}")
            return None
        if ns.labels is not None and ns.grad_loss is not None:
            raise UserError("--grad-loss chooses the loss without labels; with --labels the loss is cross-entropy "
                            "against them: give one of the two")
        labels = load_labels(ns.labels) if ns.labels is not None else None
        return GradientSettings(loss=ns.grad_loss or "pseudo", batch_size=ns.grad_batch or 32,
                                max_samples=ns.grad_samples, labels=labels,
                                device={"cpu": "cpu", "cuda": "cuda"}.get(ep, "auto"), seed=seed)


def load_labels(path: str) -> np.ndarray:
    """``--labels FILE.npy``: integer class indices, one per calibration sample (axis 0)."""
    if not os.path.isfile(path):
        raise UserError(f"no such labels file: {path}")
    try:
        arr = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise UserError(f"--labels {path}: not a .npy array ({str(exc)[:120]})") from None
    if not isinstance(arr, np.ndarray) or arr.ndim == 0:
        raise UserError(f"--labels {path}: expected an array with one entry per calibration sample")
    if not np.issubdtype(arr.dtype, np.integer):
        raise UserError(f"--labels {path}: labels must be integer class indices, got {arr.dtype}")
    if arr.size and int(arr.min()) < 0:
        raise UserError(f"--labels {path}: class indices must be >= 0, got {int(arr.min())}")
    return arr


def check_labels(labels: np.ndarray | None, samples: int, path: str | None = None) -> None:
    """The labels hold one entry per sample of the calibration file (``CalibData.available``)."""
    if labels is not None and labels.shape[0] != samples:
        raise UserError(f"--labels{' ' + path if path else ''} holds {labels.shape[0]} labels; the calibration "
                        f"data has {samples} samples (one label per sample, in the file's order)")


class PlanFileArgs(ArgGroup):
    """Replayable pruning: write the plan, or prune by a plan written before."""

    title = "plan files"

    def add(self, g) -> None:
        g.add_argument("--save-plan", metavar="FILE.json", help="write the plan (JSON) for verify and --load-plan")
        g.add_argument("--load-plan", metavar="FILE.json",
                       help="prune by this plan (the plan decides; plan options are ignored)")

    def parse(self, ns, protect: tuple[str | None, ...] = ()) -> PlanFiles:
        check_writable(ns.save_plan, "--save-plan", protect)
        return PlanFiles(load_plan_file(ns.load_plan), ns.save_plan)


class VerifyPlanArgs(ArgGroup):
    """The plan a pruned model is verified against (``verify``)."""

    title = "plan"

    def add(self, g) -> None:
        g.add_argument("--plan", required=True, metavar="FILE.json", help="the plan prune wrote (--save-plan)")

    def parse(self, ns) -> dict:
        return load_plan_file(ns.plan)


class TargetArgs(ArgGroup):
    """Pruning to a target: the uniform ratio is searched (bisection) until it is met. ``parse`` takes
    whether calibration data was given (``--target-fidelity`` is measured on its held-out share)."""

    title = "targets (search the uniform --ratio, or allocate per group: --allocate)"

    def add(self, g) -> None:
        g.add_argument("--target-macs", type=positive_float, default=None, metavar="F",
                       help="prune until MACs <= F x original (bisection over the ratio); with --target-fidelity "
                            "a cap: MACs <= F x original and the fidelity target both hold")
        g.add_argument("--target-latency", type=positive_float, default=None, metavar="F",
                       help="prune until measured latency <= F x original on --ep (interleaved runs; "
                            "timing options below)")
        g.add_argument("--target-fidelity", type=_fidelity_target, default=None, metavar="F",
                       help="prune as far as held-out fidelity (--metric) stays >= F, F in (0, 1]: bisection over "
                            "the ratio, each step compensated and measured on the held-out share (needs --calib or "
                            "--calib-images)")
        g.add_argument("--metric", choices=list(METRICS), default=None,
                       help="what --target-fidelity judges, worst output: agreement (top-1 of classifier-shaped "
                            "outputs) or cosine (mean cosine); default agreement when an output is "
                            "classifier-shaped, else cosine")
        g.add_argument("--allocate", choices=list(ALLOCATE_CHOICES), default=None,
                       help="how --target-latency / --target-macs is met: uniform (search one --ratio) or latency "
                            "(per-group kept counts keeping the most importance within the budget, from latency "
                            "tables measured on --ep at --batch and cached, or from MACs; the pruned model's latency "
                            "is measured and the allocation refined, at most 4 rounds); default latency with "
                            "--target-latency, uniform otherwise")
        g.add_argument("--allocate-value", choices=list(ALLOCATE_VALUES), default=None,
                       help="what --allocate latency keeps most of: importance (the criterion's scores, weighted by "
                            "the weights a unit owns; the default without --calib) or sensitivity (the default "
                            "with --calib: each group's cut measured, the output error of the model pruned at a "
                            "few counts of that group, compensated as the run is, on the fit share; slower). With "
                            "--calib the allocation's candidates (the knapsack; the knapsack with --max-ratio capped "
                            "at the uniform ratio + 0.05/0.1/0.2/0.3; the uniform plan) are pruned and the least "
                            "damaged on the fit share is taken")
        g.add_argument("--allocate-exchange", type=non_negative_int, default=None, metavar="N",
                       help="with --allocate latency and --calib: the most prunes the measured exchange spends per "
                            "allocation round (each group narrowed one step in context, then moves that widen the "
                            "most damaged group and narrow the least, kept when the output damage on the fit share "
                            f"falls, within the same predicted budget; default {EXCHANGE_EVALS}: off; 40 is a start)")

    def parse(self, ns, data: bool = False) -> Targets:
        allocate = self._allocate(ns)
        if ns.metric is not None and ns.target_fidelity is None:
            raise UserError("--metric says what --target-fidelity judges; give --target-fidelity F")
        if ns.target_fidelity is not None:
            if not data:
                raise UserError("--target-fidelity is measured on held-out calibration samples: it needs --calib "
                                "or --calib-images")
            if ns.target_latency is not None:
                raise UserError("--target-fidelity combines with --target-macs, not with --target-latency")
        value = getattr(ns, "allocate_value", None)
        if value is None:  # measured damage where there is data to measure it on (README: sensitivity)
            value = "sensitivity" if data and allocate == "latency" else "importance"
        elif value != "importance" and allocate != "latency":
            raise UserError(f"--allocate-value {value} says what --allocate latency keeps; this run searches one "
                            "ratio (give --target-latency F or --target-macs F with --allocate latency)")
        if value == "sensitivity" and not data:
            raise UserError("--allocate-value sensitivity measures each group's cut on calibration data: it needs "
                            "--calib or --calib-images")
        exchange = getattr(ns, "allocate_exchange", None)
        if exchange is not None and allocate != "latency":
            raise UserError("--allocate-exchange improves the plan of --allocate latency; this run searches one ratio "
                            "(give --target-latency F or --target-macs F with --allocate latency)")
        if exchange and not data:
            raise UserError("--allocate-exchange judges its moves on calibration data: it needs --calib or "
                            "--calib-images")
        return Targets(ns.target_macs, ns.target_latency, ns.target_fidelity, ns.metric, allocate, value, exchange)

    @staticmethod
    def _allocate(ns) -> str:
        """``--allocate``, defaulted (latency with --target-latency and no other schedule) and checked."""
        schedule = next((flag for flag, on in (("--global", getattr(ns, "global_", False)),
                                               ("--isomorphic", getattr(ns, "isomorphic", False)),
                                               ("--greedy", getattr(ns, "greedy", False))) if on), None)
        if ns.allocate is None:
            return "latency" if ns.target_latency is not None and ns.target_fidelity is None and schedule is None \
                and ns.target_macs is None else "uniform"
        if ns.allocate == "uniform":
            return "uniform"
        if ns.target_fidelity is not None:
            raise UserError("--allocate latency meets a latency or MAC budget; --target-fidelity searches a ratio: "
                            "use one")
        if ns.target_latency is None and ns.target_macs is None:
            raise UserError("--allocate latency distributes a budget over the groups: give --target-latency F or "
                            "--target-macs F")
        if ns.target_latency is not None and ns.target_macs is not None:
            raise UserError("--allocate latency takes one budget: --target-latency F or --target-macs F, not both "
                            "(--allocate uniform searches a ratio meeting both)")
        if schedule is not None:
            raise UserError(f"--allocate latency chooses every group's count; {schedule} ranks units another way: "
                            "use one")
        return "latency"


class TimingArgs(ArgGroup):
    """How latency is measured: bench, sweep, and prune --target-latency."""

    title = "timing"

    def __init__(self, warmup: int = 3, repeat: int = 20):
        self.warmup, self.repeat = warmup, repeat

    def add(self, g) -> None:
        g.add_argument("--threads", type=positive_int, default=None, metavar="N",
                       help="onnxruntime intra-op threads (default: onnxruntime's)")
        g.add_argument("--batch", type=positive_int, default=1, metavar="N",
                       help="batch size of the timed inputs (dynamic batch axes only; default 1)")
        g.add_argument("--warmup", type=positive_int, default=self.warmup, metavar="N",
                       help=f"untimed runs per model first (default {self.warmup})")
        g.add_argument("--repeat", type=positive_int, default=self.repeat, metavar="N",
                       help=f"timed runs per model (default {self.repeat})")

    def parse(self, ns) -> Timing:
        return Timing(ns.threads, ns.batch, ns.warmup, ns.repeat)


class RoundsArgs(ArgGroup):
    """How bench interleaves the runs of two models."""

    title = "rounds"

    def add(self, g) -> None:
        g.add_argument("--min-seconds", type=non_negative_float, default=0.0, metavar="S",
                       help="keep measuring at least this long (default 0)")
        g.add_argument("--block", type=positive_int, default=3, metavar="N",
                       help="runs per model per round, the first of each block not recorded (default 3; "
                            "1: strict alternation, each run after the other model's)")

    def parse(self, ns) -> Rounds:
        return Rounds(ns.min_seconds, ns.block)


class SweepArgs(ArgGroup):
    """The ratios a sweep prunes at, and its plot."""

    title = "sweep"
    DEFAULT_RATIOS = "0,0.1,...,0.9"

    def add(self, g) -> None:
        g.add_argument("--ratios", default=self.DEFAULT_RATIOS, metavar="LIST",
                       help=f"ratios to try: a,b,c or a,b,...,z (default {self.DEFAULT_RATIOS})")
        g.add_argument("--plot", metavar="FILE.png", help="plot latency, MACs and fidelity against the ratio")

    def parse(self, ns, protect: tuple[str | None, ...] = ()) -> SweepSpec:
        ratios = tuple(parse_ratios(ns.ratios))
        check_writable(ns.plot, "--plot", protect)
        if ns.plot and importlib.util.find_spec("matplotlib") is None:
            raise UserError("--plot needs matplotlib: pip install 'onnxprune[bench]'")
        return SweepSpec(ratios, ns.plot)


class ReportArgs(ArgGroup):
    """The JSON report of a run (same permissions as the model files)."""

    title = "report"

    def add(self, g) -> None:
        g.add_argument("--report", metavar="FILE.json", help="write what was printed, and more, as JSON")

    def parse(self, ns, protect: tuple[str | None, ...] = ()) -> str | None:
        check_writable(ns.report, "--report", protect)
        return ns.report


class OutputArgs(ArgGroup):
    """The model a command writes (never its input)."""

    title = "output model"

    def __init__(self, required: bool = True, soft: bool = False):
        self.required = required
        self.soft = soft

    def add(self, g) -> None:
        g.add_argument("-o", "--output", required=self.required, metavar="FILE.onnx",
                       help="where the pruned model goes (never over the input)")
        if self.soft:
            g.add_argument("--soft", action="store_true",
                           help="write the plan as zeroed weights in the unchanged graph (Torch-Pruning's soft "
                                "mode: same nodes and shapes, same MACs; computes what the pruned model computes), "
                                "to inspect the selection or retrain with the mask")

    def parse(self, ns, source: str | None = None) -> str | None:
        if ns.output is None:
            return None
        if source is not None:
            check_output(source, ns.output)
        else:
            check_writable(ns.output, "output")
        return ns.output


class VerifyArgs(ArgGroup):
    """Verification of a pruned model against its masked original."""

    title = "verification"

    def add(self, g) -> None:
        g.add_argument("--verify", action="store_true",
                       help="verify against the masked original (exit 1 on failure, nothing written)")

    def parse(self, ns) -> bool:
        return bool(ns.verify)


class JsonArgs(ArgGroup):
    """Print JSON instead of text."""

    title = "format"

    def add(self, g) -> None:
        g.add_argument("--json", action="store_true", help="print JSON instead of text")

    def parse(self, ns) -> bool:
        return bool(ns.json)


def _numbers(text: str, count: int, kind, what: str) -> tuple:
    parts = [t.strip() for t in str(text).replace("x", ",").split(",")] if kind is int else \
        [t.strip() for t in str(text).split(",")]
    if len(parts) != count:
        raise argparse.ArgumentTypeError(f"expected {count} {what} separated by commas, got '{text}'")
    try:
        vals = tuple(kind(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {count} {what} separated by commas, got '{text}'") from None
    if kind is int and any(v < 1 for v in vals):
        raise argparse.ArgumentTypeError(f"every size must be >= 1, got '{text}'")
    if kind is float and not all(np.isfinite(vals)):
        raise argparse.ArgumentTypeError(f"every value must be finite, got '{text}'")
    return vals


def _image_size(text: str) -> tuple[int, int]:
    return _numbers(text, 2, int, "whole numbers (H,W)")


def _three_floats(text: str) -> tuple[float, float, float]:
    return _numbers(text, 3, float, "numbers (one per channel, R,G,B)")


def _fidelity_target(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got '{text}'") from None
    if not 0.0 < v <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return v


def _share(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got '{text}'") from None
    if not 0.0 < v < 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1), got {text}")
    return v


class CalibArgs(ArgGroup):
    """Calibration data (runtime/calib.py): arrays (``--calib``) or images (``--calib-images`` and its
    preprocessing), how many samples, and the held-out share fidelity is measured on."""

    title = "calibration data"
    IMAGE_OPTIONS = ("image_size", "mean", "std", "layout", "channels")

    def add(self, g) -> None:
        g.add_argument("--calib", metavar="PATH",
                       help="calibration samples: .npz (one array per graph input, samples on axis 0), .npy "
                            "(single-input models) or a folder of them (concatenated)")
        g.add_argument("--calib-images", metavar="DIR",
                       help="calibration samples from the images in DIR (recursive; needs Pillow)")
        g.add_argument("--image-size", type=_image_size, default=None, metavar="H,W",
                       help="resize images to H x W (bilinear, no crop; default: the model's fixed size)")
        g.add_argument("--mean", type=_three_floats, default=None, metavar="R,G,B",
                       help="subtracted from pixel/255 per channel (default 0,0,0)")
        g.add_argument("--std", type=_three_floats, default=None, metavar="R,G,B",
                       help="divides (pixel/255 - mean) per channel (default 1,1,1)")
        g.add_argument("--layout", choices=list(LAYOUTS), default=None, help="image tensor layout (default nchw)")
        g.add_argument("--channels", choices=list(CHANNEL_ORDERS), default=None, help="channel order (default rgb)")
        g.add_argument("--calib-samples", type=positive_int, default=None, metavar="N",
                       help="use at most N samples (a seeded random subset; default all)")
        g.add_argument("--holdout", type=_share, default=None, metavar="F",
                       help=f"share of the samples held out, never used for fitting; fidelity is measured "
                            f"there (default {DEFAULT_HOLDOUT:g})")

    def parse(self, ns) -> CalibSpec | None:
        """None without calibration data (then no other calibration option may be given)."""
        images = [f"--{k.replace('_', '-')}" for k in self.IMAGE_OPTIONS if getattr(ns, k) is not None]
        if ns.calib is not None and ns.calib_images is not None:
            raise UserError("give calibration data with one of --calib and --calib-images, not both")
        if ns.calib_images is None and images:
            raise UserError(f"{images[0]} describes --calib-images preprocessing; it needs --calib-images DIR")
        if ns.calib is None and ns.calib_images is None:
            for flag, value in (("--calib-samples", ns.calib_samples), ("--holdout", ns.holdout)):
                if value is not None:
                    raise UserError(f"{flag} needs calibration data (--calib or --calib-images)")
            return None
        holdout = DEFAULT_HOLDOUT if ns.holdout is None else ns.holdout
        source = ns.calib if ns.calib is not None else ns.calib_images
        if not os.path.exists(source):  # before any work; the contents are checked against the model
            raise UserError(f"no such calibration {'file or folder' if ns.calib is not None else 'folder'}: {source}")
        if ns.calib is not None:
            return CalibSpec(path=ns.calib, samples=ns.calib_samples, holdout=holdout)
        img = ImageSpec(ns.calib_images, ns.image_size, ns.mean or (0.0, 0.0, 0.0), ns.std or (1.0, 1.0, 1.0),
                        ns.layout or "nchw", ns.channels or "rgb")
        if any(v == 0 for v in img.std):
            raise UserError("--std: every value must be non-zero")
        return CalibSpec(images=img, samples=ns.calib_samples, holdout=holdout)


class CompensateArgs(ArgGroup):
    """Compensation and reconstruction of the pruned channels' consumers (rewrite/compensate.py);
    needs calibration data, so ``parse`` takes whether it was given."""

    title = "compensation"

    def add(self, g) -> None:
        g.add_argument("--compensate", choices=list(COMPENSATIONS), default=None,
                       help="refit the consumers of removed channels on the fit share: bias (fold their mean "
                            "contribution into the bias), lsq (ridge least squares of the kept weights and "
                            "bias, layer by layer); default lsq with calibration data, else none")
        g.add_argument("--ridge", type=non_negative_float, default=None, metavar="L",
                       help="lsq ridge, relative to the mean diagonal of each consumer's input covariance; "
                            "shrinks toward the kept weights (default: chosen per consumer by 2-fold "
                            "cross-validation on the fit share)")
        g.add_argument("--bn-stats", choices=list(BN_STATS), default=None,
                       help="running mean and variance of each BatchNormalization after a refitted consumer "
                            "(only with compensation, so only with calibration data): match (default: the "
                            "original's statistics moved by the change measured on the fit share), recompute "
                            "(taken anew from the pruned model on the fit share) or off (kept)")

    def parse(self, ns, data: bool = False) -> CompensateOptions | None:
        """None when nothing is compensated."""
        mode = ns.compensate or ("lsq" if data else "none")
        if mode != "none" and not data:
            raise UserError(f"--compensate {mode} needs calibration data (--calib or --calib-images)")
        if ns.ridge is not None and mode != "lsq":
            raise UserError("--ridge applies to --compensate lsq")
        bn_stats = ns.bn_stats
        if bn_stats is not None and mode == "none":
            raise UserError("--bn-stats applies to compensation (--compensate bias or lsq), which needs calibration "
                            "data (--calib or --calib-images)")
        if mode == "none":
            return None
        opts = CompensateOptions(mode=mode, ridge=ns.ridge, **({"bn_stats": bn_stats} if bn_stats else {}))
        opts.validate()
        return opts


# DistillOptions' defaults, stated in the help (rewrite/distill.py imports torch: not at parse time;
# tests/test_finetune_cli.py checks that these are its defaults)
FINETUNE_DEFAULTS = {"lr": 1e-2, "batch": 16, "temperature": 4.0}


class StripeArgs(ArgGroup):
    """``prune --stripe-ratio R``: stripe pruning of K×K convs (Pruning Filter in Filter), alone or
    after channel pruning in the same run (``--ratio``); ``--global`` and ``--max-ratio`` of the plan
    group apply to it too. Not with a target search, ``--steps``, ``--finetune`` or ``--soft``."""

    title = "stripe pruning (K×K convs)"

    def add(self, g) -> None:
        g.add_argument("--stripe-ratio", type=float, default=None, metavar="R",
                       help="remove the share R of the stripes W[f,:,i,j] of every K×K conv (never a whole filter)")
        g.add_argument("--stripe-mode", choices=list(STRIPE_MODES), default="shrink",
                       help="shrink (default): smaller kernels, filters grouped by the box of their kept stripes, "
                            "one Conv per box; mask: removed stripes zeroed, graph unchanged")
        g.add_argument("--stripe-shape", choices=list(STRIPE_SHAPES), default=None,
                       help="box: each filter keeps one rectangle of stripes (default with shrink); free: any "
                            "stripes, the paper's (default with mask; shrink then crops to their bounding boxes)")
        g.add_argument("--stripe-norm", choices=list(STRIPE_NORMS), default="l1",
                       help="stripe importance: l1 (default) or l2 of W[f,:,i,j]; with --calib weighted by the "
                            "conv input's per-channel root mean square")
        g.add_argument("--stripe-boxes", type=positive_int, default=2, metavar="N",
                       help="at most N distinct kernel boxes per conv (default 2; each becomes one Conv)")
        g.add_argument("--stripe-gate", choices=list(STRIPE_GATES), default="latency",
                       help="latency (default): shrink a conv only where its shrunk form measures faster than the "
                            "masked dense conv on --ep (interleaved timing, at batch 1 and at --batch); off: shrink every "
                            "planned conv")

    def parse(self, ns, ratio: float | None = None) -> StripeOptions | None:
        """None without ``--stripe-ratio`` (``ratio``: the one a loaded plan file's stripes carry)."""
        ratio = ns.stripe_ratio if ns.stripe_ratio is not None else ratio
        if ratio is None:
            return None
        given = given_options(ns, ("--target-macs", "--target-latency", "--target-fidelity", "--finetune", "--soft"))
        if (getattr(ns, "steps", 1) or 1) > 1:
            given.insert(0, "--steps")
        if given:
            raise UserError(f"--stripe-ratio cannot be used with {given[0]}")
        opts = StripeOptions(ratio=float(ratio), mode=ns.stripe_mode, shape=ns.stripe_shape,
                             norm=ns.stripe_norm, boxes=int(ns.stripe_boxes), gate=ns.stripe_gate,
                             global_=bool(getattr(ns, "global_", False)),
                             max_ratio=float(getattr(ns, "max_ratio", 0.9)),
                             ignore=tuple(getattr(ns, "ignore", None) or ()))
        opts.validate()
        return opts


class FinetuneArgs(ArgGroup):
    """Distillation of the original into the pruned model's weights after the rewrite
    (``rewrite.distill``): ``--finetune N`` steps on the fit share of the calibration data."""

    title = "finetuning (distillation)"

    def add(self, g) -> None:
        d = FINETUNE_DEFAULTS
        g.add_argument("--finetune", type=non_negative_int, default=None, metavar="N",
                       help="after pruning, N steps of knowledge distillation from the original to the pruned "
                            "model on the fit share (torch needed; 0, the default: none); only the pruned "
                            "model's float weights change, early-stopped on a validation slice of the fit share; "
                            "--verify then checks it against the masked original rebuilt from its trained weights")
        g.add_argument("--finetune-lr", type=positive_float, default=None, metavar="LR",
                       help=f"Adam's peak learning rate, relative to each tensor's RMS (default {d['lr']:g}), "
                            "cosine-decayed over the N steps")
        g.add_argument("--finetune-batch", type=positive_int, default=None, metavar="N",
                       help=f"samples per step (default {d['batch']}; a model with a fixed batch uses it)")
        g.add_argument("--finetune-temperature", type=positive_float, default=None, metavar="T",
                       help=f"temperature of the KL divergence on softmax outputs (default {d['temperature']:g})")

    def parse(self, ns, data: bool = False, ep: str = "auto", seed: int = 0):
        """The ``DistillOptions`` (``rewrite.distill``), or None without ``--finetune`` (then none of
        its other options may be given) or with ``--finetune 0`` (they are then ignored: a script can
        loop over N with the same options)."""
        given = [flag for flag, v in (("--finetune-lr", ns.finetune_lr), ("--finetune-batch", ns.finetune_batch),
                                      ("--finetune-temperature", ns.finetune_temperature)) if v is not None]
        if ns.finetune is None and given:
            raise UserError(f"{given[0]} applies to --finetune N")
        if not ns.finetune:
            return None
        if not data:
            raise UserError("--finetune needs calibration data (--calib or --calib-images)")
        from onnxprune.rewrite.distill import DistillOptions  # here: it imports torch when installed

        kw = {k: v for k, v in (("lr", ns.finetune_lr), ("batch", ns.finetune_batch),
                                ("temperature", ns.finetune_temperature)) if v is not None}
        opts = DistillOptions(steps=ns.finetune, seed=seed, device={"cpu": "cpu", "cuda": "cuda"}.get(ep, "auto"), **kw)
        opts.validate()
        return opts


class DemoArgs(ArgGroup):
    """What the demo builds."""

    title = "demo"

    def add(self, g) -> None:
        g.add_argument("--arch", default="resnet18", metavar="NAME", help="torchvision architecture (default resnet18)")

    def parse(self, ns) -> str:
        return ns.arch
