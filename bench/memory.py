"""Peak memory (RSS) of the prune pipeline on ResNet-50.

    python bench/memory.py [--arch resnet50] [--no-write]

Each case runs in a fresh child process, and its peak resident set size is that process's own
high-water mark (VmHWM from /proc/self/status at exit; not ru_maxrss, which Linux carries over from
the parent across exec):

- baseline: the interpreter with onnxprune, onnx, onnxruntime, numpy and scipy imported;
- ``onnxprune prune MODEL -o OUT --ratio 0.5`` (load, analyze, plan, rewrite, check, stats, save);
- the same with ``--verify`` (adds onnxruntime sessions of the original, masked original and pruned model);
- ``onnxprune inspect MODEL`` (load + analysis + stats).

Writes the ``memory`` section of bench/RESULTS.md and bench/results/memory.json.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import machine_line, md_table, publish
from onnxprune.models import zoo

# Runs a module (or code with -c) and reports the process's own high-water mark (VmHWM) at exit. The
# kernel's ru_maxrss of a child is not used: it keeps the parent's RSS from before the exec.
WRAP = """
import atexit, runpy, sys
def _report():
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith('VmHWM'):
                sys.stderr.write('PEAK_RSS_KB ' + line.split()[1] + '\\n')
atexit.register(_report)
if sys.argv[1] == '-c':
    exec(sys.argv[2])
else:
    sys.argv = sys.argv[1:]
    runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)
"""


def peak_rss(args: list[str]) -> tuple[float, float, int]:
    """(peak RSS MiB, wall s, exit code) of ``python -m args...`` (or ``-c CODE``) in a child process."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", WRAP, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True)
    peak = [int(line.split()[1]) for line in proc.stderr.splitlines() if line.startswith("PEAK_RSS_KB")]
    if proc.returncode != 0 or not peak:
        print(f"{' '.join(args)} exited {proc.returncode}: {proc.stderr[-500:]}", file=sys.stderr)
    return (peak[-1] / 1024.0 if peak else float("nan")), time.perf_counter() - t0, proc.returncode


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="resnet50")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    started = _dt.datetime.now().isoformat(timespec="seconds")
    machine = machine_line()
    src = zoo.export(args.arch, "legacy")
    size_mib = Path(src).stat().st_size / 2**20
    cli = ["onnxprune.cli"]
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "pruned.onnx")
        cases = [
            ("baseline: python + imports", ["-c", "import numpy, scipy.sparse, onnx, onnxruntime, onnxprune.cli, "
                                             "onnxprune.pipeline, onnxprune.handlers"]),
            (f"inspect {args.arch}", [*cli, "inspect", str(src)]),
            (f"prune {args.arch} --ratio 0.5", [*cli, "prune", str(src), "-o", out, "--ratio", "0.5", "--ep", "cpu"]),
            (f"prune {args.arch} --ratio 0.5 --verify", [*cli, "prune", str(src), "-o", out, "--ratio", "0.5",
                                                         "--verify", "--ep", "cpu"]),
        ]
        rows, data = [], {"machine": machine, "model_file_mib": size_mib, "cases": []}
        base = None
        for name, cmd in cases:
            rss, wall, rc = peak_rss(cmd)
            base = rss if base is None else base
            rows.append([name, f"{rss:.0f}", f"{rss - base:.0f}" if name != cases[0][0] else "",
                         f"{(rss - base) / size_mib:.1f}x" if name != cases[0][0] else "", f"{wall:.1f}", rc])
            data["cases"].append({"case": name, "peak_rss_mib": rss, "wall_s": wall, "exit": rc})
            print(f"{name}: {rss:.0f} MiB peak RSS, {wall:.1f} s", file=sys.stderr)
    cmd = "python bench/memory.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [f"## Peak memory of the prune pipeline ({args.arch})", "",
             f"Run {started} with `{cmd.strip()}`. {machine}", "",
             f"Model: the zoo's legacy export of {args.arch} ({size_mib:.0f} MiB fp32 ONNX). Peak RSS = the "
             "high-water mark (VmHWM at exit) of a fresh child process per case.", ""]
    lines += md_table(["case", "peak RSS MiB", "above baseline MiB", "above baseline / model size", "wall s", "exit"],
                      rows)
    lines.append("")
    return publish("memory", lines, data, write=not args.no_write)


if __name__ == "__main__":
    sys.exit(main())
