"""What the commands print: the summary table, verification lines, the coverage line."""

from __future__ import annotations

from contextlib import contextmanager

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from onnxprune.measure.stats import delta, human
from onnxprune.measure.stripes import CROP_SLACK


def print_stats_table(console, before, after, latency=None, title="onnxprune", fidelity=None) -> None:

    t = Table(title=title)
    t.add_column("")
    t.add_column("Original", justify="right")
    t.add_column("Pruned", justify="right")
    t.add_column("Δ", justify="right")
    t.add_row("nodes", str(before.nodes), str(after.nodes), delta(before.nodes, after.nodes))
    for op in sorted(set(before.ops) | set(after.ops), key=lambda o: -before.ops.get(o, 0))[:6]:
        b, a = before.ops.get(op, 0), after.ops.get(op, 0)
        t.add_row(f"  {op}", str(b), str(a), delta(b, a))
    t.add_row("parameters", human(before.params), human(after.params), delta(before.params, after.params))
    t.add_row("MACs", human(before.macs), human(after.macs), delta(before.macs, after.macs))
    t.add_row("size", human(before.size_bytes, "B"), human(after.size_bytes, "B"),
              delta(before.size_bytes, after.size_bytes))
    if latency is not None:
        lo, lp = latency
        t.add_row(f"latency median ({lo.ep}, batch {lo.batch})", f"{lo.median_ms:.2f} ms", f"{lp.median_ms:.2f} ms",
                  delta(lo.median_ms, lp.median_ms))
        t.add_row("latency p90", f"{lo.p90_ms:.2f} ms", f"{lp.p90_ms:.2f} ms", delta(lo.p90_ms, lp.p90_ms))
        t.add_row("speedup", "", f"{lo.median_ms / lp.median_ms:.2f}x", "")
    if fidelity is not None:
        add_fidelity_rows(t, fidelity)
    console.print(t)

def print_verification(console, v) -> None:
    scope = "pruned vs masked original" if v.exact else "EXACT GROUPS ONLY: pruned-by-exact-groups vs masked original"
    console.print(f"verification on {v.ep.upper()} ({scope}, tolerance {v.tol:g}):")
    for o in v.outputs:
        status = "PASSED" if o.passed else "FAILED"
        why = f" ({o.reason})" if o.reason else ""
        console.print(f"  {o.name} {list(o.shape)}: rel. error {o.rel_error:.3e}{why} (min passing tol "
                      f"{o.min_passing_tol:.1e}) {status}; fidelity vs original {o.fidelity:.3e}")
    if v.note:
        console.print(f"  note: {v.note}")
    if not v.exact:
        worst = max((o.fidelity for o in v.outputs), default=0.0)
        console.print(f"  APPROXIMATE: the pruned model changes the function (fidelity rel. error {worst:.3e}); "
                      "it is not exact")

def print_coverage(console, cg) -> None:
    prunable, total = cg.coverage()
    pct = 100.0 * prunable / total if total else 0.0
    console.print(f"coverage: {prunable}/{total} channels prunable ({pct:.1f}%), "
                  f"{sum(g.prunable for g in cg.groups)}/{len(cg.groups)} groups")
    if cg.unknown_ops:
        console.print("unknown ops (barriers): " + ", ".join(f"{k} x{len(v)}" for k, v in cg.unknown_ops.items()))



def print_round_to(console, req) -> None:
    """What ``--round-to auto`` resolved to, and why (nothing when a number was given)."""
    if req.round_to_why is not None:
        console.print(f"--round-to auto: {req.options.round_to} ({req.round_to_why})")


def add_fidelity_rows(t, fid) -> None:
    """Held-out fidelity (measure/fidelity.py) as rows of the summary table; the original's column
    holds what the original scores against itself."""
    t.add_row(f"held-out fidelity ({fid.samples} samples)", "", "", "")
    for o in fid.outputs:
        if o.top1 is not None:
            t.add_row(f"  {o.name} top-1 agreement", "100.0%", f"{100 * o.top1:.1f}%", "")
        if o.match is not None:
            t.add_row(f"  {o.name} equal elements", "100.0%", f"{100 * o.match:.1f}%", "")
        t.add_row(f"  {o.name} mean cosine", "1.0000", f"{o.cosine:.4f}", "")
        t.add_row(f"  {o.name} rel. error (L2)", "0", f"{o.rel_error_l2:.3e}", "")


@contextmanager
def progress_bar(console, what: str):
    """A rich progress bar (transient; off when the console is not a terminal); yields the
    ``(done, total)`` callback the runtime's batched runs call."""
    bar = Progress(TextColumn(what), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=console,
                   transient=True, disable=not console.is_terminal)
    with bar:
        task = bar.add_task(what, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update


def _fidelity_change(before, after) -> str:
    """``top-1 93.7% -> 94.8%, cosine 0.964 -> 0.977`` (the worst output's, held-out)."""
    b, a = before.summary(), after.summary()
    parts = []
    if b["min_top1_agreement"] is not None and a["min_top1_agreement"] is not None:
        parts.append(f"top-1 {100 * b['min_top1_agreement']:.1f}% -> {100 * a['min_top1_agreement']:.1f}%")
    parts.append(f"cosine {b['min_cosine']:.4f} -> {a['min_cosine']:.4f}")
    return "held-out " + ", ".join(parts)


def print_finetune(console, d, before=None, after=None) -> None:
    """One line: what ``--finetune`` did (steps, the step kept, the validation loss, what was trained),
    then the held-out fidelity before and after it when measured."""
    kept = f"kept step {d.best_step}" if d.changed else "no step improved: model unchanged"
    loss = ""
    if d.val_loss_start is not None and d.val_loss_best is not None:
        loss = (f", validation loss {d.val_loss_start:.4g} -> {d.val_loss_best:.4g} on {d.val_samples} samples")
    stop = {"early": ", stopped early", "nonfinite": ", stopped on a non-finite loss"}.get(d.stopped, "")
    frozen = (f", {len(d.frozen)} frozen (e.g. {next(iter(d.frozen))}: {next(iter(d.frozen.values()))})"
              if d.frozen else "")
    line = (f"finetune: {d.steps_run} of {d.steps} steps ({kept}{stop}){loss}; {d.trained_values:,} values in "
            f"{len(d.trained)} tensors trained on {d.train_samples} samples{frozen}; {d.seconds:.1f}s")
    if before is not None and after is not None:
        line += "; " + _fidelity_change(before, after)
    console.print(line, markup=False)
    if d.changed:
        console.print("  --verify checks the finetuned model against the masked original rebuilt from its "
                      "trained weights", markup=False)


STRIPE_ROWS = 40  # convs listed in the stripe table (the report has every one)


def _boxes_text(boxes) -> str:
    return " ".join(f"{b.kernel[0]}x{b.kernel[1]}:{b.filters}" for b in boxes)


def _short(name: str, width: int = 24) -> str:
    return name if len(name) <= width else "…" + name[-(width - 1):]


def print_stripes(console, stage) -> None:
    """The stripe stage: a table per conv (kernel, boxes kept with their filter counts, stripes
    removed, MACs, the latency gate's timings and what was built), then a summary line."""
    removed = stage.plan.removed()
    recs = {c.key: c for c in stage.shrink.convs} if stage.shrink is not None else {}
    t = Table(title=f"stripes ({stage.options.mode}, {stage.plan.shape} selection, {stage.plan.norm} importance)")
    for col in ("conv", "k", "boxes:filters", "removed", "MACs", "ms dense→shrunk", "built"):
        t.add_column(col, justify="left" if col in ("conv", "boxes:filters", "built") else "right")
    keys = list(stage.plan.keep)
    for key in keys[:STRIPE_ROWS]:
        m, mac = stage.plan.keep[key], stage.macs[key]
        rec, g = recs.get(key), stage.gate.get(key)
        after = rec.macs_after if rec is not None and rec.macs_after is not None else (
            mac.dense if rec is not None else mac.kept)
        timing = (f"{g.dense_ms:.2f}→{g.shrunk_ms:.2f}" + (f" {g.verdict}" if g.verdict else "")
                  + (" (immaterial)" if g.immaterial else "")
                  if g is not None and g.dense_ms is not None and g.shrunk_ms is not None else "")
        if rec is None:
            built = "zeroed (mask)"
        elif rec.split:
            built = f"split {len(rec.built)}" + (" (reordered)" if rec.permuted else "")
        elif rec.shrunk:
            built = f"crop {rec.built[0].kernel[0]}x{rec.built[0].kernel[1]}" + (" +Slice" if rec.sliced else "")
        else:
            built = "dense" + (f" ({rec.reason})" if rec.reason else (" (gate: split not faster)" if g is not None and g.verdict == "tie" else
                                           " (slower shrunk)" if g is not None else ""))
        boxes = _boxes_text(rec.boxes) if rec is not None else f"{int(m.sum())}/{m.size} kept"
        t.add_row(_short(key), f"{m.shape[1]}x{m.shape[2]}", boxes, f"{100 * removed[key] / m.size:.0f}%",
                  f"{human(mac.dense)}→{human(after)}", timing, built)
    if len(keys) > STRIPE_ROWS:
        t.add_row(f"... {len(keys) - STRIPE_ROWS} more (see --report)", "", "", "", "", "", "")
    console.print(t)
    before, after = stage.conv_macs()
    total = sum(int(m.size) for m in stage.plan.keep.values())
    gone = sum(removed.values())
    line = (f"stripes: {gone:,} of {total:,} removed ({100 * gone / max(1, total):.1f}%) in {len(keys)} K×K convs; "
            f"their MACs {human(before)} -> {human(after)} ({delta(before, after)}, "
            + ("physical" if stage.shrink is not None else "counted by kept stripes; the graph is unchanged") + ")")
    if stage.shrink is not None:
        done = [c for c in stage.shrink.convs if c.shrunk]
        dense = [c for c in stage.shrink.convs if not c.shrunk]
        line += f"; {len(done)} shrunk ({sum(c.split for c in done)} split), {len(dense)} kept dense"
        if stage.gate:
            timed = [g for g in stage.gate.values() if g.dense_ms is not None and g.shrunk_ms is not None
                     and not g.pays]
            slower = sum(g.verdict in (None, "slower") for g in timed)
            ties = len(timed) - slower
            why = ([f"{slower} measured slower when shrunk"] if slower else []) + (
                [f"{ties} splits not measured faster"] if ties else [])
            line += f" ({', '.join(why)})" if why else ""
            slack = sum(1 for g in stage.gate.values() if g.immaterial)
            if slack:
                line += (f"; {slack} crop{'s' if slack > 1 else ''} measured slower made anyway (together within "
                         f"{100 * CROP_SLACK:g}% of the model's latency: see --report)")
    if stage.skipped:
        why = next(iter(stage.skipped.values()))
        line += f"; {len(stage.skipped)} convs skipped (e.g. {why})"
    console.print(line, markup=False)
    rf = getattr(stage, "compensation", None)
    if rf is not None:
        done = rf.refitted
        errs = [(r.error_before, r.error_after) for r in done if r.error_before is not None]
        fit = (f"; fit rel. error {max(b for b, _ in errs):.3f} -> {max(a for _, a in errs):.3f} (worst conv)"
               if errs else "")
        console.print(f"stripe refit (lsq): {len(done)} of {len(rf.convs)} convs refitted on {rf.rows} patch rows in "
                      f"{rf.seconds + rf.capture_s:.1f}s{fit}; --verify checks against the refitted source, masked",
                      markup=False)
