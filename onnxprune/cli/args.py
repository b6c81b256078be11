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
from onnxprune.measure.verify import DEFAULT_TOL
from onnxprune.planning.importance import IMPORTANCES
from onnxprune.planning.options import PlanOptions
from onnxprune.runtime.machine import auto_round_to
from onnxprune.runtime.session import EPS


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

    @property
    def given(self) -> bool:
        return self.macs is not None or self.latency is not None


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
                           help="value of a graph input from a .npy file (repeatable)")

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
            g.add_argument("--head-dim-ratio", type=float, default=None, metavar="R",
                           help="remove the same head-dimension positions from q/k (and v/out) of every head")
            g.add_argument("--layer-ratio", action="append", default=[], metavar="REGEX=R",
                           help="ratio R for groups whose producing node matches REGEX (repeatable, first wins)")
        g.add_argument("--ignore", action="append", default=[], metavar="REGEX",
                       help="freeze groups touching a node matching REGEX (repeatable)")
        g.add_argument("--round-to", type=parse_round_to, default=1, metavar="N|auto",
                       help="keep unit counts multiples of N (default 1); auto: the execution provider's channel "
                            "block (16 on AVX-512 CPUs, 8 on AVX2 and CUDA)")
        g.add_argument("--global", dest="global_", action="store_true", help="rank units across groups")
        g.add_argument("--max-ratio", type=float, default=0.9, metavar="R", help="per-group ceiling with --global (default 0.9)")
        g.add_argument("--importance", default="l2", choices=sorted(IMPORTANCES),
                       help="unit scores (default l2; bn: |gamma| of BatchNorm members, else l2)")
        g.add_argument("--allow-approximate", action="store_true",
                       help="also prune groups mixed by LayerNorm/Softmax/reductions (changes the function)")
        g.add_argument("--seed", type=non_negative_int, default=0, metavar="N", help="seed of --importance random (default 0)")

    def parse(self, ns, ep: str = "auto", ratio: float | None = None) -> PlanRequest:
        """``ep``: the execution provider ``--round-to auto`` aligns for; ``ratio``: the ratio when
        this group has no ``--ratio`` (``amounts=False``)."""
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
                           round_to=round_to, global_=ns.global_, max_ratio=ns.max_ratio, importance=ns.importance,
                           allow_approximate=ns.allow_approximate, seed=ns.seed)
        opts.validate()
        return PlanRequest(opts, why)


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
    """Pruning to a target: the uniform ratio is searched (bisection) until it is met."""

    title = "targets (search the uniform --ratio)"

    def add(self, g) -> None:
        g.add_argument("--target-macs", type=positive_float, default=None, metavar="F",
                       help="prune until MACs <= F x original (bisection over the ratio)")
        g.add_argument("--target-latency", type=positive_float, default=None, metavar="F",
                       help="prune until measured latency <= F x original on --ep (interleaved runs; "
                            "timing options below)")

    def parse(self, ns) -> Targets:
        return Targets(ns.target_macs, ns.target_latency)


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

    def __init__(self, required: bool = True):
        self.required = required

    def add(self, g) -> None:
        g.add_argument("-o", "--output", required=self.required, metavar="FILE.onnx",
                       help="where the pruned model goes (never over the input)")

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


class DemoArgs(ArgGroup):
    """What the demo builds."""

    title = "demo"

    def add(self, g) -> None:
        g.add_argument("--arch", default="resnet18", metavar="NAME", help="torchvision architecture (default resnet18)")

    def parse(self, ns) -> str:
        return ns.arch
