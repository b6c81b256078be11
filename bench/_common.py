"""Shared by the bench scripts: sections of bench/RESULTS.md replaced in place, JSON results, machine."""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_MD = BENCH_DIR / "RESULTS.md"
RESULTS_DIR = BENCH_DIR / "results"

HEADER = ("# Benchmark results\n\n"
          "Sections are appended by the scripts in `bench/`; each names the command that produced it.\n\n")


def write_section(name: str, lines: list[str], path: Path = RESULTS_MD) -> None:
    """Replace the section ``name`` of RESULTS.md (between its BEGIN/END markers) or append it;
    the rest of the file is left as it is."""
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    replace_section(begin, end, "\n".join([begin, *lines, end]) + "\n", path)


def replace_section(begin: str, end: str, section: str, path: Path = RESULTS_MD, header: str = HEADER) -> None:
    """Write ``section`` (which starts with ``begin`` and ends with ``end``) in place of the old one,
    or append it; atomic."""
    text = path.read_text() if path.exists() else header
    pat = re.compile(re.escape(begin) + r".*?" + re.escape(end) + r"\n?", re.S)
    if pat.search(text):
        text = pat.sub(lambda _: section, text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    fd, tmp = tempfile.mkstemp(prefix=".RESULTS.md.", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def write_json(name: str, data: dict) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    p = RESULTS_DIR / f"{name}.json"
    p.write_text(json.dumps(data, indent=1, default=str) + "\n")
    return p


def publish(name: str, lines: list[str], data: dict, write: bool = True) -> int:
    """Print a benchmark's section; with ``write``, put it in RESULTS.md and its data in results/NAME.json.
    Returns 0 (the script's exit code)."""
    print("\n".join(lines))
    if write:
        write_section(name, lines)
        write_json(name, data)
    return 0


def machine_line(extra: str = "") -> str:
    from onnxprune.runtime.machine import describe_markdown

    load = ""
    try:
        load = " 1/5/15-min load average at the start: " + ", ".join(f"{x:.2f}" for x in os.getloadavg()) + "."
    except OSError:
        pass
    return describe_markdown() + load + (f" {extra}" if extra else "")


def md_table(header: list[str], rows: list[list], align: str | None = None) -> list[str]:
    align = align or ("l" + "r" * (len(header) - 1))
    sep = ["---:" if a == "r" else "---" for a in align]
    out = ["| " + " | ".join(header) + " |", "| " + " | ".join(sep) + " |"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return out
