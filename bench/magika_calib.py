"""Magika calibration data from real files of this machine, with magika's own feature extraction.

Run::

    pip install magika==1.0.3
    python bench/magika_calib.py --out calib.npz [--files 300] [--seed 0] [--roots /usr/share /usr/lib/python3*]
    onnxprune prune ~/.cache/onnxprune-real-models/magika.onnx -o /tmp/m.onnx --ratio 0.3 \\
        --calib calib.npz --report r.json
    python bench/magika_calib.py --judge /tmp/m.onnx --exclude calib.npz.files.txt [--files 300]

Files: every regular, readable file under ``--roots`` (symlinks not followed), sorted by path, then a
``--seed``-ed random sample drawn until ``--files`` of them need magika's model (empty and very short
files are answered by the client without the model and are skipped). Their paths go to
``OUT.files.txt`` beside the ``.npz``.

Features: ``Magika._get_result_or_features_from_path`` (the client's own extraction: the first and last
1,024 bytes after stripping whitespace, padded with token 256) and the row layout of
``Magika._get_raw_predictions`` (beg[:beg_size] + mid[:mid_size] + end[-end_size:]), as int32
``[files, 2048]`` under the model's input name ``bytes``.

``--judge PRUNED.onnx``: magika's client run twice on other files (not in ``--exclude``), once with its
own model folder and once with a copy whose ``model.onnx`` is PRUNED; prints the share of files whose
output label agrees (the label a user sees, thresholds and overwrites included).
"""

from __future__ import annotations

import argparse
import glob
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

DEFAULT_ROOTS = ["/usr/share", *sorted(glob.glob("/usr/lib/python3*"))]


def _client():
    try:
        from magika import Magika
    except ImportError:
        sys.exit("needs magika's client: pip install magika==1.0.3")
    return Magika


def candidates(roots: list[str], exclude: set[str]) -> list[str]:
    out = []
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
            dirnames.sort()
            for f in filenames:
                p = os.path.join(dirpath, f)
                if p in exclude or os.path.islink(p) or not os.path.isfile(p) or not os.access(p, os.R_OK):
                    continue
                out.append(p)
    return sorted(out)


def row(m, features) -> list[int]:
    cfg = m._model_config
    r: list[int] = []
    if cfg.beg_size > 0:
        r.extend(features.beg[: cfg.beg_size])
    if cfg.mid_size > 0:
        r.extend(features.mid[: cfg.mid_size])
    if cfg.end_size > 0:
        r.extend(features.end[-cfg.end_size:])
    return r


def pick(m, files: list[str], n: int, seed: int) -> tuple[list[str], list[list[int]]]:
    order = list(files)
    random.Random(seed).shuffle(order)
    paths, rows = [], []
    for p in order:
        if len(paths) == n:
            break
        try:
            result, features = m._get_result_or_features_from_path(Path(p))
        except OSError:
            continue
        if features is None:  # answered without the model (empty, too short)
            continue
        paths.append(p)
        rows.append(row(m, features))
    return paths, rows


def collect(args) -> None:
    magika = _client()()
    exclude = set(Path(args.exclude).read_text().split("\n")) if args.exclude else set()
    paths, rows = pick(magika, candidates(args.roots, exclude), args.files, args.seed)
    x = np.asarray(rows, dtype=np.int32)
    np.savez(args.out, bytes=x)
    Path(args.out + ".files.txt").write_text("\n".join(paths) + "\n")
    print(f"{args.out}: bytes {list(x.shape)} int32 from {len(paths)} files under {', '.join(args.roots)}; "
          f"paths in {args.out}.files.txt")


def judge(args) -> None:
    Magika = _client()
    exclude = set(Path(args.exclude).read_text().split("\n")) if args.exclude else set()
    original = Magika()
    paths, _ = pick(original, candidates(args.roots, exclude), args.files, args.seed + 1)
    with tempfile.TemporaryDirectory() as d:
        shutil.copytree(original._model_dir, d, dirs_exist_ok=True)
        shutil.copyfile(args.judge, Path(d) / "model.onnx")
        pruned = Magika(model_dir=Path(d))
        a = original.identify_paths([Path(p) for p in paths])
        b = pruned.identify_paths([Path(p) for p in paths])
    same = sum(x.output.label == y.output.label for x, y in zip(a, b, strict=True))
    print(f"label agreement of {args.judge} with magika's model on {len(paths)} other files: "
          f"{same}/{len(paths)} = {100 * same / max(len(paths), 1):.1f}%")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="calib.npz", help="the .npz to write (default calib.npz)")
    ap.add_argument("--files", type=int, default=300, help="files to take (default 300)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--roots", nargs="+", default=DEFAULT_ROOTS)
    ap.add_argument("--exclude", help="a file listing paths to skip (e.g. OUT.files.txt)")
    ap.add_argument("--judge", metavar="PRUNED.onnx", help="label agreement of a pruned magika with the client")
    args = ap.parse_args()
    judge(args) if args.judge else collect(args)


if __name__ == "__main__":
    main()
