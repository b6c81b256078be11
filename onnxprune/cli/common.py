"""What every command shares: the parser, argument groups and their parsing, output-path checks,
the console."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
from rich.console import Console

from onnxprune.errors import UserError
from onnxprune.planning.options import PlanOptions
from onnxprune.runtime.machine import auto_round_to


def parse_round_to(value: str) -> int | str:
    """argparse type of ``--round-to``: a positive integer or ``auto``."""
    if str(value).strip().lower() == "auto":
        return "auto"
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'auto', got '{value}'") from None


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2
        sys.stderr.write(f"onnxprune: error: {message}\n")
        raise SystemExit(2)


def console():
    return Console(highlight=False, soft_wrap=True)


# ----------------------------------------------------------------------------------------------
# shared argument groups


def model_args() -> argparse.ArgumentParser:
    p = Parser(add_help=False)
    g = p.add_argument_group("model inputs")
    g.add_argument("--input-shape", action="append", default=[], metavar="NAME=1x3x224x224",
                   help="shape of a graph input (repeatable); dynamic dims otherwise: batch 1, "
                        "spatial 224, others 16")
    g.add_argument("--input", action="append", default=[], metavar="NAME=FILE.npy",
                   help="value of a graph input from a .npy file (repeatable)")
    return p


def ep_args() -> argparse.ArgumentParser:
    p = Parser(add_help=False)
    g = p.add_argument_group("execution")
    g.add_argument("--ep", default="auto", choices=["auto", "cpu", "cuda"],
                   help="onnxruntime execution provider (auto: CUDA when available)")
    g.add_argument("--tol", type=float, default=1e-4, help="relative-error tolerance (default 1e-4)")
    return p


def plan_args() -> argparse.ArgumentParser:
    p = Parser(add_help=False)
    g = p.add_argument_group("plan")
    g.add_argument("--ratio", type=float, default=None,
                   help="fraction of units removed per channel group (default 0.5; 0 when a head option is given). "
                        "Attention heads and head dimensions are only pruned by --head-ratio/--head-dim-ratio")
    g.add_argument("--head-ratio", type=float, default=None,
                   help="remove floor(H*R) whole heads of every attention block (never all)")
    g.add_argument("--head-dim-ratio", type=float, default=None,
                   help="remove the same head-dimension positions from q/k (and v/out) of every head")
    g.add_argument("--layer-ratio", action="append", default=[], metavar="REGEX=R",
                   help="ratio R for groups whose producing node matches REGEX (repeatable, first wins)")
    g.add_argument("--ignore", action="append", default=[], metavar="REGEX",
                   help="freeze groups touching a node matching REGEX (repeatable)")
    g.add_argument("--round-to", type=parse_round_to, default=1,
                   help="keep unit counts multiples of N (default 1); auto: the execution provider's channel "
                        "block (16 on AVX-512 CPUs, 8 on AVX2 and CUDA)")
    g.add_argument("--global", dest="global_", action="store_true", help="rank units across groups")
    g.add_argument("--max-ratio", type=float, default=0.9, help="per-group ceiling with --global (default 0.9)")
    g.add_argument("--importance", default="l2", choices=["l1", "l2", "bn", "random"])
    g.add_argument("--allow-approximate", action="store_true",
                   help="also prune groups mixed by LayerNorm/Softmax/reductions (changes the function)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--save-plan", metavar="FILE")
    g.add_argument("--load-plan", metavar="FILE")
    return p


def positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got '{text}'") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def add_timing_args(parser, warmup: int, repeat: int) -> None:
    """Execution provider and measurement options shared by bench and sweep (all validated)."""
    parser.add_argument("--ep", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--threads", type=positive_int, default=None)
    parser.add_argument("--batch", type=positive_int, default=1)
    parser.add_argument("--warmup", type=positive_int, default=warmup)
    parser.add_argument("--repeat", type=positive_int, default=repeat)


def _split_items(items: list[str], flag: str, form: str, parse):
    """NAME=VALUE options: {NAME: parse(VALUE)}; any failure is one line naming the option."""
    out = {}
    for it in items:
        if "=" not in it:
            raise UserError(f"{flag} {it}: expected {form}")
        name, value = it.rsplit("=", 1)
        try:
            out[name] = parse(value)
        except (ValueError, OSError) as exc:
            raise UserError(f"{flag} {it}: {exc}") from None
    return out


def _parse_dims(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(d) for d in text.lower().split("x"))
    except ValueError:
        raise ValueError("dims must be integers separated by 'x'") from None


def _load_npy(path: str) -> np.ndarray:
    try:
        return np.load(path)
    except Exception as exc:  # noqa: BLE001 - numpy raises several types
        raise ValueError(f"cannot read ({type(exc).__name__})") from None


def parse_shapes(items: list[str]) -> dict[str, tuple[int, ...]]:
    return _split_items(items, "--input-shape", "NAME=DIMxDIMx...", _parse_dims)


def parse_arrays(items: list[str]) -> dict[str, np.ndarray]:
    return _split_items(items, "--input", "NAME=FILE.npy", _load_npy)


def parse_layer_ratios(items: list[str]) -> list[tuple[str, float]]:
    out = []
    for it in items:
        if "=" not in it:
            raise UserError(f"--layer-ratio {it}: expected REGEX=R")
        rx, r = it.rsplit("=", 1)
        try:
            out.append((rx, float(r)))
        except ValueError:
            raise UserError(f"--layer-ratio {it}: R must be a number") from None
    return out


def _probe_dir(parent: Path, what: str) -> None:
    """The directory must really take a file (os.access lies for root on /proc and /sys)."""
    if not parent.is_dir():
        raise UserError(f"{what}: directory {parent} does not exist")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".onnxprune-probe.", dir=parent)
        os.close(fd)
        os.unlink(tmp)
    except OSError as exc:
        raise UserError(f"{what}: directory {parent} is not writable ({exc.strerror})") from None


def _same_file(a: str | Path, b: str | Path) -> bool:
    pa, pb = Path(a), Path(b)
    try:
        return pa.exists() and pb.exists() and pa.resolve() == pb.resolve() or (
            not pb.exists() and pa.exists() and pa.resolve() == pb.resolve())
    except OSError:
        return False


def check_output(inp: str, out: str) -> None:
    if _same_file(inp, out):
        raise UserError("output path equals the input path; the input is never overwritten")
    po = Path(out)
    if po.exists() and po.is_dir():
        raise UserError(f"output {po} is a directory")
    _probe_dir(po.parent if str(po.parent) else Path("."), "output")


def check_writable(path: str | None, what: str, protected: tuple[str, ...] = ()) -> None:
    if not path:
        return
    for other in protected:
        if other and _same_file(other, path):
            raise UserError(f"{what} {path} would overwrite {other}")
    p = Path(path)
    if p.exists() and p.is_dir():
        raise UserError(f"{what} {path} is a directory")
    _probe_dir(p.parent if str(p.parent) else Path("."), what)


def resolve_round_to(args) -> int:
    """``--round-to auto`` resolved for this run's --ep and CPU (the reason kept for the report)."""
    if args.round_to != "auto":
        return args.round_to
    value, args.round_to_auto = auto_round_to(getattr(args, "ep", "auto"))
    return value



def plan_options(args):
    ratio = args.ratio
    if ratio is None:
        ratio = 0.0 if (args.head_ratio is not None or args.head_dim_ratio is not None) else 0.5
    return PlanOptions(ratio=ratio, layer_ratios=parse_layer_ratios(args.layer_ratio), ignore=args.ignore,
                       head_ratio=args.head_ratio, head_dim_ratio=args.head_dim_ratio,
                       round_to=resolve_round_to(args), global_=args.global_, max_ratio=args.max_ratio,
                       importance=args.importance, allow_approximate=args.allow_approximate, seed=args.seed)



def load_plan_file(path: str | None) -> dict | None:
    if not path:
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise UserError(f"no such plan file: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"plan file {path} is not JSON") from None
