"""``onnxprune sweep MODEL --ratios 0,0.1,...,0.9``: MACs, parameters, latency, speedup and fidelity
against the pruning ratio, as a table, a JSON report and a PNG plot.

The model is analyzed once; every ratio is planned and rewritten from that analysis, and each pruned
model is timed interleaved with the original (one original session, warmed once), so every speedup is
a ratio of medians taken under the same conditions. Ratio 0 times the original against a second
session of itself: its speedup is the noise floor. Fidelity is the relative error of the pruned
model's output against the original's on the same (generated or given) inputs: max|P - O| / max|O|,
worst output. MACs and parameters are those of one inference at the analysis shapes (batch 1 unless
``--input-shape`` says otherwise), whatever ``--batch`` the latency is measured at.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from onnxprune.analysis.analyze import Analysis
from onnxprune.errors import UserError
from onnxprune.measure.latency import Runner, measure_runners, speedup
from onnxprune.measure.stats import model_stats
from onnxprune.measure.targets import prune_at
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
    fidelity: float  # relative error of the pruned output vs the original's
    pruned_groups: int

    def to_json(self) -> dict:
        return dict(self.__dict__)


def sweep(an: Analysis, opts: PlanOptions, ratios: list[float], *, ep: str = "auto", threads: int | None = None, batch: int = 1,
          input_shapes=None, input_arrays=None, warmup: int = 3, repeat: int = 20, progress=None) -> list[Row]:
    feeds = make_inputs(an.model, input_shapes, batch=batch, arrays=input_arrays)
    base = model_stats(an.model, an.shapes, registry=an.registry)  # MACs at the analysis shapes (batch 1 unless given)
    original = Runner(an.model, feeds, ep, threads)
    reference = original.outputs()
    rows: list[Row] = []
    for r in ratios:
        if r == 0.0:
            pruned, st, groups = an.model, base, 0
        else:
            pruned, shapes, plan = prune_at(an, opts, r)
            st = model_stats(pruned, shapes, registry=an.registry)
            groups = len(plan.pruned())
        other = Runner(pruned, feeds, ep, threads)
        fid = max((rel_error(p, o) for o, p in zip(reference, other.outputs(), strict=True)), default=0.0)
        lo, lp = measure_runners([original, other], warmup, repeat)
        row = Row(r, st.macs, st.params, lp.median_ms, lp.p90_ms, lo.median_ms, speedup(lo, lp),
                  base.macs / st.macs if st.macs else float("nan"), fid, groups)
        rows.append(row)
        if progress is not None:
            progress(row)
    return rows


def plot(rows: list[Row], path: str, title: str) -> None:
    try:
        import matplotlib
    except ImportError:
        raise UserError("--plot needs matplotlib: pip install 'onnxprune[bench]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [r.ratio for r in rows]
    fig, ax1 = plt.subplots(figsize=(7, 4.2), dpi=110)
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
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
