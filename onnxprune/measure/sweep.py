"""``onnxprune sweep MODEL --ratios 0,0.1,...,0.9``: MACs, parameters, latency, speedup and fidelity
against the pruning ratio, as a table, a JSON report and a PNG plot.

The model is analyzed once; every ratio is planned and rewritten from that analysis, and each pruned
model is timed interleaved with the original (one original session, warmed once), so every speedup is
a ratio of medians taken under the same conditions. Ratio 0 times the original against a second
session of itself: its speedup is the noise floor. MACs and parameters are those of one inference at
the analysis shapes (batch 1 unless ``--input-shape`` says otherwise), whatever ``--batch`` the
latency is measured at.

Two kinds of closeness to the original, never confused:
- ``rel_error_generated`` (every sweep): max|P - O| / max|O| of the pruned model's outputs on the
  same generated (or ``--input``) inputs, worst output. Not fidelity: random inputs say nothing about
  the inputs the model was made for, and without compensation this only says how much changed;
- held-out fidelity (``sweep --calib``): ``trial(ratio)`` is the run ``prune`` makes at that ratio
  (data-aware importance, compensation, ``measure.fidelity`` on the held-out share), so a row's
  ``agreement`` (worst classifier-shaped output's top-1 agreement; None without one), ``cosine``
  (worst mean cosine) and ``rel_error_l2`` are the figures ``prune --ratio R --calib ...`` reports.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from onnxprune.analysis.analyze import Analysis
from onnxprune.errors import UserError
from onnxprune.measure.latency import Runner, measure_runners, speedup
from onnxprune.measure.stats import model_stats
from onnxprune.measure.targets import Trial, prune_at
from onnxprune.measure.verify import rel_error
from onnxprune.planning.options import PlanOptions
from onnxprune.runtime.inputs import make_inputs

log = logging.getLogger(__name__)


@dataclass
class Row:
    ratio: float
    macs: int
    params: int
    latency_ms: float
    latency_p90_ms: float
    original_ms: float
    speedup: float
    mac_ratio: float  # original / pruned
    rel_error_generated: float  # max|P - O| / max|O| on generated inputs, worst output (not fidelity)
    pruned_groups: int
    held_out: int | None = None  # held-out samples the fidelity below was measured on (None: no --calib)
    agreement: float | None = None  # worst classifier-shaped output's top-1 agreement
    cosine: float | None = None  # worst output's mean cosine
    rel_error_l2: float | None = None  # worst output's ||P - O|| / ||O|| on the held-out share

    def to_json(self) -> dict:
        return dict(self.__dict__)


def sweep(an: Analysis, opts: PlanOptions, ratios: list[float], *, ep: str = "auto", threads: int | None = None, batch: int = 1,
          input_shapes=None, input_arrays=None, warmup: int = 3, repeat: int = 20, progress=None,
          trial: Callable[[float], Trial] | None = None) -> list[Row]:
    """One row per ratio. ``trial``: the data-aware run at a ratio, with held-out fidelity (module
    docstring); None: plan and rewrite with ``opts`` alone, no fidelity."""
    feeds = make_inputs(an.model, input_shapes, batch=batch, arrays=input_arrays)
    base = model_stats(an.model, an.shapes, registry=an.registry)  # MACs at the analysis shapes (batch 1 unless given)
    original = Runner(an.model, feeds, ep, threads)
    reference = original.outputs()
    rows: list[Row] = []
    for r in ratios:
        fid = None
        if trial is not None:
            res = trial(r)
            pruned, st, groups, fid = res.pruned, res.after, len(res.plan.pruned()), res.fidelity
        elif r == 0.0:
            pruned, st, groups = an.model, base, 0
        else:
            pruned, shapes, plan = prune_at(an, opts, r)
            st = model_stats(pruned, shapes, registry=an.registry)
            groups = len(plan.pruned())
        other = Runner(pruned, feeds, ep, threads)
        err = max((rel_error(p, o) for o, p in zip(reference, other.outputs(), strict=True)), default=0.0)
        lo, lp = measure_runners([original, other], warmup, repeat)
        row = Row(r, st.macs, st.params, lp.median_ms, lp.p90_ms, lo.median_ms, speedup(lo, lp),
                  base.macs / st.macs if st.macs else float("nan"), err, groups)
        if fid is not None:
            s = fid.summary()
            row.held_out, row.agreement = fid.samples, s["min_top1_agreement"]
            row.cosine, row.rel_error_l2 = s["min_cosine"], s["worst_rel_error_l2"]
        rows.append(row)
        if progress is not None:
            progress(row)
    return rows


def plot(rows: list[Row], path: str, title: str) -> None:
    """Latency and MACs (left) and, beside them, fidelity (right): held-out agreement and cosine
    with ``--calib``, else the relative error on generated inputs (log scale, labelled as such)."""
    try:
        import matplotlib
    except ImportError:
        raise UserError("--plot needs matplotlib: pip install 'onnxprune[bench]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [r.ratio for r in rows]
    fig, (ax1, ax3) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110)
    ax1.plot(x, [r.latency_ms for r in rows], "o-", color="tab:blue", label="latency (median)")
    ax1.plot(x, [r.original_ms for r in rows], ":", color="tab:blue", alpha=0.6, label="original latency")
    ax1.set_xlabel("pruning ratio")
    ax1.set_ylabel("latency [ms]", color="tab:blue")
    ax1.set_ylim(bottom=0)
    ax2 = ax1.twinx()
    ax2.plot(x, [r.macs / 1e9 for r in rows], "s--", color="tab:red", label="MACs")
    ax2.set_ylabel("GMACs", color="tab:red")
    ax2.set_ylim(bottom=0)
    lines = ax1.get_lines() + ax2.get_lines()
    ax1.legend(lines, [ln.get_label() for ln in lines], loc="upper right", fontsize=8)
    ax1.set_title(title, fontsize=9)
    ax1.grid(alpha=0.3)
    _fidelity_axes(ax3, rows, x)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _fidelity_axes(ax, rows: list[Row], x: list[float]) -> None:
    ax.set_xlabel("pruning ratio")
    ax.grid(alpha=0.3)
    if any(r.held_out is not None for r in rows):
        if any(r.agreement is not None for r in rows):
            ax.plot(x, [r.agreement for r in rows], "o-", color="tab:green", label="top-1 agreement (worst output)")
        ax.plot(x, [r.cosine for r in rows], "s--", color="tab:purple", label="mean cosine (worst output)")
        ax.set_ylabel("held-out fidelity")
        ax.set_ylim(min(0.0, *(v for r in rows for v in (r.agreement, r.cosine) if v is not None)), 1.02)
        ax.set_title(f"fidelity on {rows[0].held_out} held-out calibration samples", fontsize=9)
    else:
        ys = [r.rel_error_generated for r in rows]
        ax.plot(x, ys, "o-", color="tab:gray", label="max|P-O| / max|O|, worst output")
        if any(y > 0 for y in ys):
            ax.set_yscale("symlog", linthresh=min(y for y in ys if y > 0))
        ax.set_ylabel("relative error on generated inputs")
        ax.set_title("not fidelity: generated inputs (give --calib for held-out fidelity)", fontsize=9)
    ax.legend(loc="best", fontsize=8)
