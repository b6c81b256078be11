"""MiniLM fidelity: sentence-embedding cosine similarity, MACs and CPU latency of pruned all-MiniLM-L6-v2.

Run::

    python bench/minilm_fidelity.py [--exporter legacy] [--sentences 200] [--repeat 40] [--no-write]

all-MiniLM-L6-v2 (real weights from ``shared/real-models/fetch.sh``) is exported with
``onnxprune.models.transformers.export_minilm`` and pruned four ways with ``onnxprune.pipeline.run``:
MLP hidden units 30% (``--ratio 0.3``) and whole attention heads 25% (``--head-ratio 0.25``), each under
L1 and L2 importance; every plan is verified exactly against the masked original (onnxruntime, CPU).

Sentences: the first N (default 200) sentences of the license texts Debian ships in
``/usr/share/common-licenses`` -- GPL-3, then Apache-2.0, then GFDL-1.3 -- whitespace-normalised, split
after ``.``/``!``/``?`` before a capital letter, quote or parenthesis, a leading section number such as
``4.`` or ``(a)`` removed, kept if 5 to 80 words long and ending in ``.``/``!``/``?``, duplicates dropped.
The texts are fixed documents, so the selection is deterministic; its SHA-256 is printed and recorded.

Fidelity: each sentence is tokenized with the model's own vocab.txt (WordPiece, lower case), embedded by
the original and by the pruned ONNX model in onnxruntime on the CPU (batches of 25 padded to their
longest sentence; mean pooling over the attention mask, then L2 normalisation), and the cosine
similarity of the two embeddings of the same sentence is averaged over the sentences (min also shown).

MACs: ``onnxprune.measure.stats.stats_at`` at the latency input (MatMul/Gemm MACs, attention products included).
Latency: ``onnxprune.measure.latency.measure`` with the original and the four pruned models in one interleaved
run (rotated order each round) on the same real input, batch 8 x 64 tokens (8 sentences truncated or
padded to 64), onnxruntime CPU with 2 intra-op threads, ``--repeat`` rounds after 5 warm-up runs
each. The change is the median over the rounds of (pruned time / original time of the same round) - 1,
with its interquartile range.

Output: the table on stdout and the ``minilm_fidelity`` section of ``bench/RESULTS.md`` (replaced in
place on a re-run; the rest of the file is untouched). Exit 2 when MiniLM cannot be fetched.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import re
import sys
import time
from datetime import datetime
from pathlib import Path

import numpy as np

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_MD = BENCH_DIR / "RESULTS.md"
BEGIN, END = "<!-- BEGIN minilm_fidelity -->", "<!-- END minilm_fidelity -->"
LICENSE_DIR = Path("/usr/share/common-licenses")
LICENSE_FILES = ("GPL-3", "Apache-2.0", "GFDL-1.3")
CONFIGS = (  # label, plan options
    ("MLP 30%", {"ratio": 0.3}),
    ("heads 25%", {"ratio": 0.0, "head_ratio": 0.25}),
)
IMPORTANCES = ("l1", "l2")
EMBED_BATCH = 25
LAT_BATCH, LAT_SEQ = 8, 64


def license_sentences(n: int, directory: Path = LICENSE_DIR, files=LICENSE_FILES) -> list[str]:
    """The first ``n`` sentences of the license texts (see the module docstring)."""
    out: list[str] = []
    seen: set[str] = set()
    for name in files:
        path = directory / name
        if not path.exists():
            raise SystemExit(f"minilm_fidelity: {path} is missing (Debian's base-files ships it)")
        text = re.sub(r"\s+", " ", path.read_text(encoding="utf-8"))
        for s in re.split(r"(?<=[.!?])\s+(?=[A-Z\"(])", text):
            s = re.sub(r"^(\d+\.|\([a-z0-9]\))\s+", "", s.strip())
            if not 5 <= len(s.split()) <= 80 or not s.endswith((".", "!", "?")) or s in seen:
                continue
            seen.add(s)
            out.append(s)
            if len(out) == n:
                return out
    raise SystemExit(f"minilm_fidelity: only {len(out)} sentences in {', '.join(files)}; asked for {n}")


def embed(session, tok, sentences: list[str]) -> np.ndarray:
    from onnxprune.models.transformers import sentence_embeddings

    parts = [sentence_embeddings(session, tok(sentences[i: i + EMBED_BATCH]))
             for i in range(0, len(sentences), EMBED_BATCH)]
    return np.concatenate(parts)


def latency_feeds(tok, sentences: list[str]) -> dict[str, np.ndarray]:
    """Batch LAT_BATCH x LAT_SEQ of real tokens (longer sentences truncated, shorter padded)."""
    ids = np.full((LAT_BATCH, LAT_SEQ), tok.pad, dtype=np.int64)
    mask = np.zeros((LAT_BATCH, LAT_SEQ), dtype=np.int64)
    for i, s in enumerate(sentences[:LAT_BATCH]):
        e = tok.encode(s)
        e = e[: LAT_SEQ - 1] + [tok.sep] if len(e) > LAT_SEQ else e
        ids[i, : len(e)] = e
        mask[i, : len(e)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def pct(before: float, after: float) -> str:
    return f"{100.0 * (after / before - 1.0):+.1f}%" if before else "n/a"


def rpct(ratio: float) -> str:
    return f"{100.0 * (ratio - 1.0):+.1f}%"


def human(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.3g}{unit}"
    return f"{n:.0f}"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def write_section(section: str, path: Path = RESULTS_MD) -> None:
    """Replace (or append) this script's section of RESULTS.md, leaving the rest of the file as it is."""
    from _common import replace_section

    replace_section(BEGIN, END, section, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--exporter", choices=("legacy", "dynamo"), default="legacy")
    ap.add_argument("--sentences", type=int, default=200)
    ap.add_argument("--repeat", type=int, default=60, help="interleaved latency rounds")
    ap.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads")
    ap.add_argument("--no-write", action="store_true", help="print only; do not touch RESULTS.md")
    args = ap.parse_args(argv)

    import onnxruntime as ort
    from onnxprune.models import transformers as T

    from onnxprune import pipeline
    from onnxprune.ir.io import load
    from onnxprune.measure.latency import measure
    from onnxprune.measure.stats import stats_at
    from onnxprune.planning.options import PlanOptions
    from onnxprune.runtime.session import make_session

    try:
        model_dir = T.fetch_minilm()
    except T.FetchError as exc:
        print(f"minilm_fidelity: cannot fetch all-MiniLM-L6-v2: {exc}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    sentences = license_sentences(args.sentences)
    digest = hashlib.sha256("\n".join(sentences).encode()).hexdigest()[:16]
    tok = T.minilm_tokenizer(model_dir)
    n_tokens = [len(tok.encode(s)) for s in sentences]
    path = T.export_minilm(args.exporter, model_dir=model_dir)
    original = load(path)
    verify_feeds = tok(sentences[:4])
    lat_feeds = latency_feeds(tok, sentences)
    lat_shapes = {k: v.shape for k, v in lat_feeds.items()}

    def session(model):
        sess, _ = make_session(model, "cpu", args.threads)
        return sess

    emb_o = embed(session(original), tok, sentences)
    st_o = stats_at(original, lat_shapes)
    rows, models = [], [original]
    for label, opts in CONFIGS:
        for imp in IMPORTANCES:
            res = pipeline.run(original, PlanOptions(importance=imp, **opts), verify=True, ep="cpu",
                               input_arrays=verify_feeds)
            v = res.verification
            emb_p = embed(session(res.pruned), tok, sentences)
            cos = np.sum(emb_o * emb_p, axis=1)
            st_p = stats_at(res.pruned, lat_shapes)
            rows.append({"label": label, "importance": imp, "mean_cos": float(cos.mean()), "min_cos": float(cos.min()),
                         "macs": (st_o.macs, st_p.macs), "params": (st_o.params, st_p.params),
                         "verified": v.passed and v.exact, "rel_error": max(o.rel_error for o in v.outputs),
                         "groups": len(res.plan.pruned())})
            models.append(res.pruned)
            print(f"{label} {imp}: mean cos {cos.mean():.4f}, verification "
                  f"{'PASSED' if v.passed else 'FAILED'} (exact={v.exact})", file=sys.stderr)
    lats = measure(models, lat_feeds, ep="cpu", threads=args.threads, warmup=5, repeat=args.repeat)
    lo = lats[0]
    for row, lp in zip(rows, lats[1:], strict=True):
        ratios = np.asarray(lp.samples_ms) / np.asarray(lo.samples_ms)  # paired: same round
        row["latency"] = (lo.median_ms, lp.median_ms)
        row["ratio"] = (float(np.median(ratios)), float(np.percentile(ratios, 25)), float(np.percentile(ratios, 75)))

    load_avg = [round(x, 2) for x in os.getloadavg()]
    cmd = "python bench/minilm_fidelity.py" + (f" --exporter {args.exporter}" if args.exporter != "legacy" else "")
    lines = [
        BEGIN,
        "## MiniLM (all-MiniLM-L6-v2): sentence-embedding fidelity, MACs and CPU latency after pruning",
        "",
        f"Run {datetime.now().isoformat(timespec='seconds')} with `{cmd}` ({time.perf_counter() - t0:.0f} s); "
        f"{args.exporter} export; onnxruntime {ort.__version__} CPU, {args.threads} threads.",
        "",
        f"Machine: {cpu_name()}, {os.cpu_count()} cores, 1-min load average {load_avg[0]} after the run; "
        f"Python {platform.python_version()}.",
        "",
        "| pruning | importance | mean cosine | min cosine | MACs | MACs change | params change "
        "| latency (ms, median) | latency change (IQR) | verified exact |",
        "|---|---|---:|---:|---|---:|---:|---|---:|---|",
    ]
    for r in rows:
        (mb, ma), (pb, pa), (lb, la) = r["macs"], r["params"], r["latency"]
        lines.append(f"| {r['label']} | {r['importance'].upper()} | {r['mean_cos']:.4f} | {r['min_cos']:.4f} "
                     f"| {human(mb)} → {human(ma)} | {pct(mb, ma)} | {pct(pb, pa)} | {lb:.2f} → {la:.2f} "
                     f"| {rpct(r['ratio'][0])} ({rpct(r['ratio'][1])} … {rpct(r['ratio'][2])}) "
                     f"| {'yes' if r['verified'] else 'NO'} (rel. err. {r['rel_error']:.1e}) |")
    lines += [
        "",
        f"- Sentences: the first {len(sentences)} sentences of `/usr/share/common-licenses/` GPL-3, Apache-2.0 and "
        f"GFDL-1.3 (split as described in the script; SHA-256 of the list {digest}…), {min(n_tokens)}–"
        f"{max(n_tokens)} tokens each (mean {np.mean(n_tokens):.0f}) with [CLS]/[SEP].",
        "- Cosine: between the original's and the pruned model's L2-normalised mean-pooled embedding of the same "
        "sentence, averaged over the sentences (min: the worst sentence).",
        "- MLP 30%: `--ratio 0.3` removes 30% of the 1536 MLP hidden units of each of the 6 layers "
        "(attention is never pruned by --ratio; the LayerNorm-mixed residual stream stays frozen). "
        "heads 25%: `--head-ratio 0.25` removes 3 of the 12 heads of every layer (q/k/v rows and "
        "output-projection columns).",
        f"- MACs: MatMul/Gemm MACs at the latency input (batch {LAT_BATCH} x {LAT_SEQ} tokens), attention "
        "products included; params change: all parameters, the embedding tables (never pruned here) included.",
        f"- Latency: original and the four pruned models measured in one interleaved run "
        f"(`onnxprune.measure.latency.measure`, {args.repeat} rounds, 5 warm-up runs each) on batch {LAT_BATCH} x "
        f"{LAT_SEQ} real tokens; the original's median is that of the same run. Latency change: the median "
        "(and interquartile range) over the rounds of pruned time / original time in the same round, which "
        "cancels most of the drift of a shared machine; absolute times are noisy.",
        "- Verified exact: the pruned model equals the masked original (removed channels' consumer weights "
        "zeroed) in onnxruntime on 4 real sentences; the cosine measures what pruning those channels costs.",
        END,
        "",
    ]
    section = "\n".join(lines)
    print(section)
    if not args.no_write:
        write_section(section)
        print(f"wrote the minilm_fidelity section of {RESULTS_MD}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
