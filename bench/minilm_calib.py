"""MiniLM calibration and evaluation sentences from real English text of this machine, kept apart.

Run::

    python bench/minilm_calib.py --out /tmp/minilm [--fit 3000] [--eval 700] [--seq 64]
    python bench/compensation.py MINILM.onnx --calib /tmp/minilm/fit.npz --eval /tmp/minilm/eval.npz \\
        --ratios 0.3 --modes none bias lsq

Fit sentences: docstrings of the Python standard library (``/usr/lib/python3.*``, every ``*.py`` file
sorted by path; module, class and function docstrings in file order), split into sentences with the rule
of ``minilm_fidelity.license_sentences`` (5 to 80 words, ending in ``.``/``!``/``?``), sentences that
look like code (``>>>``, ``::``, ``=``, braces or a backquote) dropped, duplicates dropped, then a seeded
sample of ``--fit``. Evaluation sentences: the license texts of ``/usr/share/common-licenses``
(``minilm_fidelity.license_sentences`` over every file there), never seen by the fit: a sentence that is
also a fit sentence is dropped from the evaluation set. Two different sources, so the evaluation is held
out in the strict sense (other documents, other register), not a random share of one pool.

Tokens: the model's own WordPiece vocabulary (``models.transformers.minilm_tokenizer``), truncated or
padded to ``--seq`` tokens; ``attention_mask`` marks the real ones, so compensation leaves the padding
out of its fit (``rewrite.compensate``: ``row_mask``). Writes ``fit.npz`` and ``eval.npz`` (inputs
``input_ids`` and ``attention_mask``, int64) and the sentences as ``fit.txt`` / ``eval.txt``.
"""

from __future__ import annotations

import argparse
import ast
import glob
import os
import random
import re
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from minilm_fidelity import LICENSE_DIR, license_sentences  # noqa: E402

CODE = re.compile(r">>>|::|=|[{}\[\]`]|\\|\w\(\)|\w_\w")


def split_sentences(text: str) -> list[str]:
    text = re.sub(r"\s+", " ", text)
    out = []
    for s in re.split(r"(?<=[.!?])\s+(?=[A-Z\"(])", text):
        s = re.sub(r"^(\d+\.|\([a-z0-9]\))\s+", "", s.strip())
        if 5 <= len(s.split()) <= 80 and s.endswith((".", "!", "?")) and not CODE.search(s):
            out.append(s)
    return out


def docstring_sentences() -> list[str]:
    seen, out = set(), []
    roots = sorted(glob.glob("/usr/lib/python3.*"))
    if not roots:
        raise SystemExit("minilm_calib: no /usr/lib/python3.* standard library on this machine")
    for root in roots:
        for path in sorted(glob.glob(os.path.join(root, "**", "*.py"), recursive=True)):
            if "/test" in path or "site-packages" in path or "dist-packages" in path:
                continue
            try:
                tree = ast.parse(Path(path).read_text(encoding="utf-8"))
            except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(node)
                    for s in split_sentences(doc) if doc else ():
                        if s not in seen:
                            seen.add(s)
                            out.append(s)
    return out


def tokenize(tok, sentences: list[str], seq: int) -> dict[str, np.ndarray]:
    ids = np.full((len(sentences), seq), tok.pad, np.int64)
    mask = np.zeros((len(sentences), seq), np.int64)
    for i, t in enumerate(sentences):
        e = tok.encode(t)
        e = e[: seq - 1] + [tok.sep] if len(e) > seq else e
        ids[i, : len(e)] = e
        mask[i, : len(e)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="folder for fit.npz, eval.npz and the sentence lists")
    ap.add_argument("--fit", type=int, default=3000, help="fit sentences (default 3000)")
    ap.add_argument("--eval", type=int, default=700, help="evaluation sentences (default 700)")
    ap.add_argument("--seq", type=int, default=64, help="tokens per sentence (default 64)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    from onnxprune.models import transformers as T

    pool = docstring_sentences()
    if len(pool) < args.fit:
        raise SystemExit(f"minilm_calib: only {len(pool)} docstring sentences; asked for {args.fit}")
    fit = random.Random(args.seed).sample(pool, args.fit)
    files = sorted(f for f in os.listdir(LICENSE_DIR) if not os.path.islink(LICENSE_DIR / f))
    fit_set = set(fit)
    evals = [s for s in license_sentences(args.eval, files=files) if s not in fit_set]
    tok = T.minilm_tokenizer(T.fetch_minilm())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, sents in (("fit", fit), ("eval", evals)):
        np.savez(out / f"{name}.npz", **tokenize(tok, sents, args.seq))
        (out / f"{name}.txt").write_text("\n".join(sents) + "\n", encoding="utf-8")
    print(f"{len(fit)} fit sentences (of {len(pool)} docstring sentences), {len(evals)} evaluation sentences "
          f"-> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
