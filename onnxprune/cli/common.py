"""What every command shares below the argument groups: the parser, the console, the parsers of
option values (argparse ``type=`` functions and NAME=VALUE lists), output-path checks, plan files.

The argument groups in ``cli/args.py`` are the only users of the value parsers: an option is parsed
in one place, and nothing below ``cli/`` sees its text.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
from rich.console import Console

from onnxprune.errors import UserError
from onnxprune.ir.io import data_file_name, is_data_file_of, model_files
from onnxprune.planning.plan import check_plan_json


class Parser(argparse.ArgumentParser):
    """One-line errors (exit 2); no abbreviated options (``sweep --ratio`` is not ``--ratios``)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # one line, exit 2
        sys.stderr.write(f"onnxprune: error: {message}\n")
        raise SystemExit(2)


def console():
    return Console(highlight=False, soft_wrap=True)


# ----------------------------------------------------------------------------------------------
# argparse types: a bad value is one argparse line naming the option


def _whole_number(text: str, minimum: int) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got '{text}'") from None
    if v < minimum:
        raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {v}")
    if v >= 2**63:
        raise argparse.ArgumentTypeError(f"must be < 2**63, got {text}")
    return v


def positive_int(text: str) -> int:
    return _whole_number(text, 1)


def non_negative_int(text: str) -> int:
    return _whole_number(text, 0)


def finite_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got '{text}'") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return v


def non_negative_float(text: str) -> float:
    v = finite_float(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {v:g}")
    return v


def positive_float(text: str) -> float:
    v = finite_float(text)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {v:g}")
    return v


def parse_round_to(value: str) -> int | str:
    """argparse type of ``--round-to``: a positive integer or ``auto`` (resolved by ``PlanArgs``)."""
    if str(value).strip().lower() == "auto":
        return "auto"
    try:
        int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'auto', got '{value}'") from None
    return positive_int(value)


# ----------------------------------------------------------------------------------------------
# option values that become UserErrors (one line, exit 2)


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
        got = np.load(path, allow_pickle=False)
        if isinstance(got, np.lib.npyio.NpzFile):
            with got:
                if len(got.files) != 1:
                    raise ValueError(f"a .npz after NAME= must hold one array, this one holds {len(got.files)} "
                                     "(give --input FILE.npz for one array per input)")
                return np.asarray(got[got.files[0]])
        return got
    except ValueError as exc:
        if "must hold one array" in str(exc):
            raise
        raise ValueError(f"cannot read ({type(exc).__name__})") from None
    except Exception as exc:  # noqa: BLE001 - numpy raises several types
        raise ValueError(f"cannot read ({type(exc).__name__})") from None


def parse_shapes(items: list[str]) -> dict[str, tuple[int, ...]]:
    return _split_items(items, "--input-shape", "NAME=DIMxDIMx...", _parse_dims)


def parse_arrays(items: list[str]) -> dict[str, np.ndarray]:
    """``--input NAME=FILE.npy`` (or a .npz holding one array) and ``--input FILE.npz`` (one array per
    graph input, by name)."""
    out: dict[str, np.ndarray] = {}
    named = []
    for it in items:
        if "=" not in it and it.lower().endswith(".npz"):
            try:
                with np.load(it, allow_pickle=False) as z:
                    out.update({k: np.asarray(z[k]) for k in z.files})
            except Exception as exc:  # noqa: BLE001 - numpy raises several types
                raise UserError(f"--input {it}: cannot read ({type(exc).__name__})") from None
        else:
            named.append(it)
    out.update(_split_items(named, "--input", "NAME=FILE.npy or FILE.npz", _load_npy))
    return out


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


def parse_ratios(text: str) -> list[float]:
    """``--ratios``: ``0,0.25,0.5`` or an arithmetic progression written ``first,second,...,last``."""
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    try:
        if "..." in items:
            i = items.index("...")
            if i < 2 or i != len(items) - 2:
                raise ValueError
            head = [float(x) for x in items[:i]]
            last = float(items[-1])
            step = head[-1] - head[-2]
            if step <= 0:
                raise ValueError
            n = int(math.floor((last - head[0]) / step + 1e-9))
            vals = [round(head[0] + k * step, 10) for k in range(n + 1)]
            if abs(vals[-1] - last) > 1e-9:
                vals.append(last)
        else:
            vals = [float(x) for x in items]
    except ValueError:
        raise UserError(f"--ratios {text}: expected numbers separated by commas, or 'a,b,...,z'") from None
    if not vals:
        raise UserError("--ratios: no ratio given")
    for v in vals:
        if not 0.0 <= v < 1.0:
            raise UserError(f"--ratios: every ratio must be in [0, 1), got {v}")
    return sorted(set(vals))


def load_plan_file(path: str | None) -> dict | None:
    if not path:
        return None
    if os.path.isdir(path):
        raise UserError(f"plan file {path} is a directory")
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise UserError(f"no such plan file: {path}") from None
    except IsADirectoryError:
        raise UserError(f"plan file {path} is a directory") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"plan file {path} is not JSON") from None
    except (ValueError, RecursionError, MemoryError) as exc:  # int digits limit, deep nesting
        raise UserError(f"plan file {path} is not a usable JSON plan ({type(exc).__name__})") from None
    except OSError as exc:
        raise UserError(f"plan file {path} cannot be read ({exc.strerror or type(exc).__name__})") from None
    check_plan_json(data)
    return data


# ----------------------------------------------------------------------------------------------
# output paths: checked before any work, so a bad path costs nothing and writes nothing


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
    """Whether ``a`` and ``b`` name one file (symlinks, ``..``, hard links), existing or not."""
    try:
        pa, pb = Path(a).resolve(), Path(b).resolve()
        return pa == pb or (pa.exists() and pb.exists() and os.path.samefile(pa, pb))
    except (OSError, RuntimeError):
        return False


def _model_files(path: str | Path) -> list[Path]:
    """``model_files``, parsed once per file version (the guard asks about one input several times)."""
    try:
        st = os.stat(path)
    except OSError:
        return [Path(path)]
    return _model_files_of_version(str(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _model_files_of_version(path: str, *version: int) -> list[Path]:
    return model_files(path)


def _files_of(path: str | Path) -> list[Path]:
    """Every file a model path stands for: the file, the external-data files it references (an
    input's weights) and the data file a model saved there would write (an output's weights)."""
    p = Path(path)
    return [*_model_files(p), p.parent / data_file_name(p.name)]


def _overwrites(path: str | Path, other: str | Path) -> Path | None:
    """The file of ``other`` (see ``_files_of``) that writing ``path`` would overwrite, if any."""
    for f in _files_of(other):
        if _same_file(f, path):
            return f
    if is_data_file_of(other, path):  # <other>.<unique>.data: the data file of the model there
        return Path(path)
    return None


def check_output(inp: str, out: str) -> None:
    """The output model ``out`` and its data file never overwrite a file of the input ``inp``."""
    if _same_file(inp, out):
        raise UserError("output path equals the input path; the input is never overwritten")
    for f in _model_files(inp):
        if _same_file(f, out):
            raise UserError(f"output {out} would overwrite {f}, external data of the input")
        if _same_file(f, Path(out).parent / data_file_name(Path(out).name)) or is_data_file_of(out, f):
            raise UserError(f"output {out} would write its weights over {f}, a file of the input")
    po = Path(out)
    if po.exists() and po.is_dir():
        raise UserError(f"output {po} is a directory")
    _probe_dir(po.parent if str(po.parent) else Path("."), "output")


def check_writable(path: str | None, what: str, protected: tuple[str | None, ...] = ()) -> None:
    """``path`` (a report, plan, plot or model) overwrites no file of the ``protected`` models: the
    inputs with their external data, the outputs with their data files."""
    if not path:
        return
    for other in protected:
        if not other:
            continue
        hit = _overwrites(path, other)
        if hit is not None:
            of = "" if _same_file(hit, other) else f" (a file of {other})"
            raise UserError(f"{what} {path} would overwrite {hit}{of}")
    p = Path(path)
    if p.exists() and p.is_dir():
        raise UserError(f"{what} {path} is a directory")
    _probe_dir(p.parent if str(p.parent) else Path("."), what)
