"""Peak memory of pruning a model over 2 GB with external data.

Generates a dense MLP whose weights (>= 2.5 GB) live in external data, prunes it at 0.5 in a child
process (`onnxprune prune`), and reports the child's peak RSS against the weight bytes. The issue's
budget is 2.2 x the weight bytes.

    python bench/large_model.py [--width 8192] [--layers 10] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from onnxprune.testing.synth import external_mlp


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--width", type=int, default=8192)
    ap.add_argument("--layers", type=int, default=10)
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--results", default=str(Path(__file__).parent / "results" / "large_model.json"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="onnxprune-large-") as d:
        src = Path(d) / "big.onnx"
        t0 = time.perf_counter()
        weight_bytes = external_mlp(src, args.width, args.layers)
        t_gen = time.perf_counter() - t0
        out = Path(d) / "big_pruned.onnx"
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "onnxprune.cli", "prune", str(src), "-o", str(out),
                               "--ratio", str(args.ratio)], capture_output=True, text=True)
        t_prune = time.perf_counter() - t0
        if proc.returncode != 0:
            print(proc.stdout, proc.stderr)
            return 1
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # Linux: KiB
        out_bytes = (Path(d) / "big_pruned.onnx.data").stat().st_size
    res = {"weight_bytes": weight_bytes, "peak_rss_bytes": peak, "ratio_rss_to_weights": peak / weight_bytes,
           "pruned_weight_bytes": out_bytes, "generate_s": t_gen, "prune_s": t_prune,
           "machine": f"{platform.machine()}, {platform.processor() or platform.platform()}"}
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(json.dumps(res, indent=1))
    table = ["| weights | pruned weights | peak RSS (prune) | RSS / weights | prune time |",
             "|---|---|---|---|---|",
             f"| {weight_bytes / 1e9:.2f} GB | {out_bytes / 1e9:.2f} GB | {peak / 1e9:.2f} GB | "
             f"{peak / weight_bytes:.2f}x (budget 2.2x) | {t_prune:.1f} s |"]
    print("\n".join(table))
    from _common import machine_line, write_section  # bench/ is the script's directory

    write_section("large_model", [
        "## Pruning a model over 2 GB with external data (peak memory)", "",
        f"`python bench/large_model.py --width {args.width} --layers {args.layers}`: a dense MLP whose "
        "weights live in external data, pruned at ratio 0.5 by `onnxprune prune` in a child process; "
        "peak RSS of that process against the weight bytes. " + machine_line(), "", *table])
    return 0 if peak <= 2.2 * weight_bytes else 1


if __name__ == "__main__":
    sys.exit(main())
