"""Gradient capture: run a model in the torch executor (``runtime.torch_exec``) on a calibration view,
differentiate a loss, and fold each batch's gradients into running sums before the next batch runs.
What the gradient criteria (``planning.grad_importance``) read, as ``runtime.capture`` gives the
activation criteria theirs. Nothing here knows groups: the caller names the tensors to mask, how
their channels form units, and the weights to differentiate (``GradRequest``).

**Masks.** A *tap* (``MaskTap``) is one edge of the graph: tensor ``tensor`` as read by one node
(named by its first output, ``reader``: outputs are unique, node names need not be), on channel axis
``axis``. Each tap gets its own edge: the model is copied and an Identity node is put on that edge,
so a ones-mask multiplied there (``TorchGraph.run(edit=...)``) changes what that node reads and
nothing else (a residual stream read by a convolution and by an Add is masked for the convolution
only). One backward pass gives dL/dm for every channel of every tap: ``dL/dm_c = sum over positions
of a_c * dL/da_c``, the channel's activation times its gradient. When the tapped tensor's axis 0 has
one entry per sample of the batch (and is not the channel axis) the mask is per sample ([N, C]), so
the gradient of each sample's own loss is known per channel: *per-sample* taps. Otherwise (a tensor
with samples merged into another axis, [N*T, C]) the mask is shared by the batch and only the
batch's sum is known. A *mask set* (``MaskSet``) is a shared mask over the units of one group: the
gradient of unit u is the sum over the set's taps of the gradients of u's channels (the chain rule
for one mask multiplied at every tap), per sample where every tap is per-sample (a batch-only tap's
sum is spread evenly over the batch's samples: ``MaskGrad.per_sample`` is then False).

Per tap and set, over every sample n: ``sum`` = sum_n g_n, ``abs`` = sum_n |g_n| and ``sq`` =
sum_n g_n² (float64, per channel or unit; g_n a batch's sum where not per sample). Per requested
weight (an initializer or Constant output): ``sum`` = the gradient of the whole loss (summed over
samples), and with ``per_sample`` also ``sq`` = sum_n (dL_n/dw)², elementwise: Torch-Pruning's
GroupHessianImportance accumulates it per sample, and so do we. Samples are taken not to interact
(eval-mode graphs: no op mixes samples), so the gradient of the summed loss on a per-sample mask row is
that sample's own.

**Per-sample passes** (``per_sample``) compute what one run per sample would (every sample is a batch of
one: its own targets, seeded by its own index, its own ``sigma``; every tap per sample), batched where
the graph allows: ``torch.func.vmap(torch.func.grad(loss of one sample))`` over the batch (the
sample's targets made inside from its own detached outputs, the random numbers drawn outside from its
own generator, in the order a run of that sample alone draws them), in chunks whose per-sample
gradients (every requested weight and mask, per sample) fit ``PER_SAMPLE_BYTES``, gives each sample's
gradients at once, and their sums and squares go into the same sums. The first sample of the first
batch runs alone (it fixes each output's loss and checks the graph); a graph vmap cannot run (an op
whose torch forward reads a per-sample value as a Python number, works in place, draws random numbers,
a feed without a sample axis, ...) falls back to one run per sample, with a log line saying why
(``GradientRunner.batched_off``). vmap does the same arithmetic as the runs of one sample, so it pays
where those are overhead-bound (small models: 8x on the gradient tests' CNN; accelerators). A
ResNet-50 at 224 px on the CPU is compute-bound: on one free core both take about 0.55 s a sample; on
2 cores shared with other work (load 4-5) chunks of 10 took 0.8-1.8 s a sample against 1.5-4.6 s
alone, 1.7 against 4.25 over 32 samples (``bench/grad_importance.py``), at 3.1 GB peak RSS.

**Losses** (no labels: the model's own outputs on the same pass are the targets, so the loss is what
the unpruned model scores on itself; a pure distance to the original would have zero gradient there):

- *classifier-shaped* outputs (the rule of ``measure.fidelity``: a float output with a sample axis
  whose last axis has C >= 2 entries and every other per-sample axis of size 1, or whose values
  are probability vectors on the last axis), judged on the first batch unless ``kinds`` says:
  cross-entropy, summed over samples and positions, of ``log_softmax`` of the output (logits) or of
  ``log`` of it (probability vectors), against ``loss="pseudo"``: the original's argmax (the
  default), or ``loss="sampled"``: labels drawn from the original's softmax (the *true* Fisher; seeded
  by ``seed`` and the batch's first sample index). With ``labels`` (one integer label per sample of
  the calibration data, indexed by the sample's global index; [N] or [N, positions...] matching the
  output's positions): cross-entropy against them, for the model's one classifier-shaped output.
- every other float output (*regression-shaped*: feature maps, embeddings, sequence logits): a
  Gaussian likelihood, ``sum (y - t)² / (2 sigma²)`` with ``t = y_original + sigma * eps``,
  ``eps ~ N(0, 1)`` seeded like the labels and ``sigma`` the output's root mean square on the batch
  (every output weighs alike whatever its scale). Its gradient at the start is ``-eps / sigma``: the
  targets are samples of the model's own predictive distribution, so squared gradients estimate the
  Fisher of that likelihood (``J^T J / sigma²``).
- ``loss="gaussian"``: every float output gets the Gaussian likelihood, classifier-shaped or not
  (a sentence embedding [N, 384] is classifier-shaped by the rule, and is no class vector).
- integer and bool outputs, and outputs no weight or mask influences: no loss.
The losses of all outputs add. ``Gradients.loss`` says which each output got.

**Never a wrong gradient.** An op without a torch forward (``torch_exec.NoTorchForward``), a missing
torch, a tensor whose channel count differs from the analysis', or a model that fixes its batch to
more than one sample when per-sample gradients are asked for: ``collect_gradients`` returns
``Gradients`` with ``unavailable`` set to the one-line reason and nothing else, and the caller falls
back to a gradient-free criterion.

**Memory.** One batch alive at a time: its inputs, the executor's activations for the backward pass
(grows linearly with ``batch_size``; ResNet-50 at 32 holds a few GB), the gradients of that batch,
and the float64 sums: 3 x channels per tap and units per set, 1x (2x with ``per_sample``) each
requested weight. The model is copied once when taps are requested (the Identity edges). Batched
per-sample passes hold, per chunk, every requested weight's and mask's gradient for each sample of it
(``PER_SAMPLE_BYTES``, 1 GiB: chunks of 10 for ResNet-50) and the chunk's activations.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx

from onnxprune.errors import UserError
from onnxprune.runtime.calib import CalibView
from onnxprune.runtime.capture import Progress

try:  # optional: the torch executor (``pip install onnxprune[torch]``), which says so without torch
    from onnxprune.runtime import torch_exec
    from onnxprune.runtime.torch_exec import NoTorchForward, torch
    _NO_TORCH = ""
except UserError as exc:  # pragma: no cover - exercised only without torch
    torch = None
    torch_exec = None
    NoTorchForward = None  # set below to GradientsUnavailable, which stands for it without torch
    _NO_TORCH = str(exc)

log = logging.getLogger(__name__)

# classifier outputs without labels: argmax, or labels drawn from the softmax; "gaussian": every float
# output gets the Gaussian likelihood (embeddings, which the classifier rule cannot tell from logits)
LOSSES = ("pseudo", "sampled", "gaussian")
DEFAULT_LOSS = "pseudo"
DEFAULT_GRAD_BATCH = 32
# per-sample passes batched with torch.func: the per-sample gradients of one vmapped chunk stay within
# this many bytes (ResNet-50's weights are 100 MB a sample: chunks of 10)
PER_SAMPLE_BYTES = 1 << 30
PROB_TOL = 1e-3  # probability vectors: >= 0, each summing to 1 within this (measure.fidelity's rule)
_MASK_SUFFIX = "::gradmask"


class GradientsUnavailable(UserError):
    """Why this model's gradients cannot be had (one line); ``collect_gradients`` returns it."""


if NoTorchForward is None:  # pragma: no cover - without torch
    NoTorchForward = GradientsUnavailable


@dataclass(frozen=True)
class MaskTap:
    """Tensor ``tensor`` as node ``reader`` (its first output) reads it; ``channels`` entries on ``axis``."""

    tensor: str
    axis: int
    reader: str
    channels: int


@dataclass(frozen=True, eq=False)
class MaskSet:
    """A shared mask over ``size`` units: ``taps`` holds (tap index, unit of each of the tap's channels)."""

    key: int
    size: int
    taps: tuple[tuple[int, np.ndarray], ...]


@dataclass(frozen=True, eq=False)
class GradRequest:
    taps: tuple[MaskTap, ...] = ()
    sets: tuple[MaskSet, ...] = ()
    params: tuple[str, ...] = ()  # weights (initializers, Constant outputs) to differentiate
    per_sample: bool = False  # one sample per pass: squared per-sample weight gradients (``ParamGrad.sq``)

    @property
    def empty(self) -> bool:
        return not (self.taps or self.params)


@dataclass
class MaskGrad:
    """Sums over samples of dL_n/dm, |dL_n/dm| and (dL_n/dm)², per channel (tap) or unit (set)."""

    sum: np.ndarray
    abs: np.ndarray
    sq: np.ndarray
    per_sample: bool = True


@dataclass
class ParamGrad:
    """The gradient of the summed loss (``sum``) and, per sample, sum_n (dL_n/dw)² (``sq``)."""

    sum: np.ndarray
    sq: np.ndarray | None = None


@dataclass
class Gradients:
    samples: int = 0
    taps: dict[MaskTap, MaskGrad] = field(default_factory=dict)  # by tap (its value, not its index)
    sets: dict[int, MaskGrad] = field(default_factory=dict)
    params: dict[str, ParamGrad] = field(default_factory=dict)
    loss: dict[str, str] = field(default_factory=dict)  # output -> the loss it got (module docstring)
    missing: dict[str, str] = field(default_factory=dict)  # tap tensor or weight -> why it has no gradient
    seconds: dict[str, float] = field(default_factory=dict)  # build, forward, backward, accumulate, total
    batches: int = 0
    device: str = ""
    unavailable: str | None = None

    def to_json(self) -> dict:
        return {"samples": self.samples, "batches": self.batches, "device": self.device,
                "taps": len(self.taps), "sets": len(self.sets), "params": len(self.params),
                "batch_only_taps": sum(not g.per_sample for g in self.taps.values()),
                "loss": dict(self.loss), "missing": dict(list(self.missing.items())[:10]),
                "seconds": {k: round(v, 3) for k, v in self.seconds.items()}, "unavailable": self.unavailable}


# ----------------------------------------------------------------------------------------------
# the masked copy of the model


def masked_edges(model: onnx.ModelProto, taps: Iterable[MaskTap]) -> tuple[onnx.ModelProto, dict[int, str], dict[str, str]]:
    """A copy of ``model`` with an Identity node on every tap's edge (the reader reads the Identity's
    output); (copy, tap index -> the name to mask, tensor -> why a tap was not placed)."""
    taps = list(taps)
    if not taps:
        return model, {}, {}
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    by_output = {n.output[0]: i for i, n in enumerate(g.node) if n.output and n.output[0]}
    names = {t for n in g.node for t in list(n.input) + list(n.output)} | {i.name for i in g.initializer}
    names |= {i.name for i in g.input}
    placed: dict[int, str] = {}
    missing: dict[str, str] = {}
    inserts: dict[int, list[onnx.NodeProto]] = {}
    for k, tap in enumerate(taps):
        i = by_output.get(tap.reader)
        node = g.node[i] if i is not None else None
        slot = next((j for j, t in enumerate(node.input) if t == tap.tensor), None) if node is not None else None
        if slot is None:
            missing[tap.tensor] = f"no node of the main graph computing '{tap.reader}' reads it"
            continue
        new = f"{tap.tensor}{_MASK_SUFFIX}{k}"
        while new in names:
            new += "_"
        names.add(new)
        node.input[slot] = new
        inserts.setdefault(i, []).append(
            onnx.helper.make_node("Identity", [tap.tensor], [new], name=f"onnxprune_gradmask_{k}"))
        placed[k] = new
    nodes = list(g.node)
    order: list[onnx.NodeProto] = []
    for i, n in enumerate(nodes):
        order.extend(inserts.get(i, ()))
        order.append(n)
    del g.node[:]
    g.node.extend(order)
    return out, placed, missing


# ----------------------------------------------------------------------------------------------
# losses


def _is_probability(y: torch.Tensor) -> bool:
    y = y.detach()
    return bool((y >= 0).all()) and bool(((y.sum(-1) - 1).abs() <= PROB_TOL).all())


def classifier_shaped(y: torch.Tensor, n: int) -> bool:
    """``measure.fidelity``'s rule on one batch of ``n`` samples (module docstring)."""
    if not y.is_floating_point() or y.ndim < 2 or y.shape[0] != n or y.shape[-1] < 2:
        return False
    return all(d == 1 for d in y.shape[1:-1]) or _is_probability(y)


@dataclass
class _OutputLoss:
    kind: str  # "classifier" | "regression"
    probabilities: bool = False  # classifier outputs: the values are probability vectors (no softmax)
    labeled: bool = False

    def describe(self, loss: str) -> str:
        if self.kind == "regression":
            return "gaussian likelihood (MSE against the original output plus noise of its RMS)"
        src = "given labels" if self.labeled else ("the original's argmax" if loss == "pseudo"
                                                   else "labels sampled from the original's softmax")
        on = "log of the probabilities" if self.probabilities else "log_softmax of the logits"
        return f"cross-entropy ({on}) against {src}"


class GradientRunner:
    """The executor for one request: ``step(feeds, indices)`` runs a batch forward and backward and adds
    its gradients to the sums; ``result()`` gives them. ``loss_value`` evaluates the loss with some
    units' masks moved (finite-difference checks). Raises NoTorchForward or GradientsUnavailable."""

    def __init__(self, model: onnx.ModelProto, registry, request: GradRequest, *, loss: str = DEFAULT_LOSS,
                 labels: np.ndarray | None = None, kinds: Mapping[str, bool] | None = None,
                 device: str = "auto", dtype=None, seed: int = 0, batched: bool = True,
                 per_sample_bytes: int = PER_SAMPLE_BYTES):
        if torch is None:
            raise GradientsUnavailable(_NO_TORCH)
        if loss not in LOSSES:
            raise UserError(f"unknown gradient loss '{loss}' (one of {', '.join(LOSSES)})")
        t0 = time.perf_counter()
        self.request, self.loss_kind, self.seed = request, loss, int(seed)
        self.labels = None if labels is None else np.asarray(labels)
        if self.labels is not None and not np.issubdtype(self.labels.dtype, np.integer):
            raise UserError(f"labels must be integers (class indices), got {self.labels.dtype}")
        self.kinds = dict(kinds) if kinds is not None else None
        masked, self.names, self.missing = masked_edges(model, request.taps)
        self.graph = torch_exec.TorchGraph(masked, registry, device=device, dtype=dtype)
        params = [p for p in request.params if p in self.graph.params and self.graph.params[p].is_floating_point()]
        for p in request.params:
            if p not in params:
                self.missing[p] = "not a float weight of the graph (a graph input, or computed)"
        self.params = params
        self.graph.set_requires_grad(params)
        self.outputs: dict[str, _OutputLoss] = {}
        self._shapes: dict[str, tuple] = {}  # output -> (shape, dtype) on a run of one sample
        self.samples = self.batches = 0
        self.seconds = {"build": time.perf_counter() - t0, "forward": 0.0, "backward": 0.0, "accumulate": 0.0}
        self._taps = {k: request.taps[k] for k in self.names}
        self._set_taps = {s.key: [(k, torch.as_tensor(u, dtype=torch.long, device=self.graph.device))
                                  for k, u in s.taps if k in self.names] for s in request.sets}
        acc = {"dtype": torch.float64, "device": self.graph.device}
        self._tap_acc = {k: [torch.zeros(t.channels, **acc) for _ in range(3)] for k, t in self._taps.items()}
        self._tap_batch_only: set[int] = set()
        self._set_acc = {s.key: [torch.zeros(s.size, **acc) for _ in range(3)] for s in request.sets}
        self._set_batch_only: set[int] = set()
        # weight sums: float64 over batches; per sample (one run per sample, many adds) in the weight's
        # own type, added in place (float32 sums of squares over thousands of samples lose < 1e-4)
        def zeros(p: str) -> torch.Tensor:
            t = self.graph.params[p]
            return torch.zeros(t.shape, dtype=t.dtype if request.per_sample else torch.float64, device=t.device)

        self._p_sum = {p: zeros(p) for p in params}
        self._p_sq = {p: zeros(p) for p in params} if request.per_sample else {}
        # per-sample passes: why they run one sample at a time (None: batched with torch.func)
        self.batched_off: str | None = None if batched else "turned off"
        self.per_sample_bytes = int(per_sample_bytes)

    # -- one pass -------------------------------------------------------------------------------
    def _forward(self, feeds: Mapping[str, np.ndarray], moves: Mapping[int, np.ndarray] | None = None):
        """Outputs and the mask leaves (tap index -> [rows, 1.., C, ..1] tensor) of one run; ``moves``:
        set key -> a factor per unit multiplied on top of the ones-masks at every tap of the set."""
        n = _rows(feeds)
        leaves: dict[int, torch.Tensor] = {}
        factors: dict[int, torch.Tensor] = {}
        for key, f in (moves or {}).items():
            for k, units in self._set_taps.get(key, ()):
                fac = torch.as_tensor(np.asarray(f), device=self.graph.device)[units]
                factors[k] = fac if k not in factors else factors[k] * fac

        def masker(k: int, tap: MaskTap):
            def edit(x: torch.Tensor) -> torch.Tensor:
                shape = _mask_shape(x, tap)
                if tap.axis != 0 and x.shape[0] == n:
                    shape[0] = n
                m = torch.ones(shape, dtype=x.dtype, device=x.device, requires_grad=True)
                leaves[k] = m
                y = x * m
                if k in factors:
                    fshape = [1] * x.ndim
                    fshape[tap.axis] = tap.channels
                    y = y * factors[k].to(x.dtype).reshape(fshape)
                return y
            return edit

        edit = {self.names[k]: masker(k, t) for k, t in self._taps.items()}
        out = self.graph.run(feeds, edit=edit)
        return out, leaves

    def _targets(self, out: Mapping[str, torch.Tensor], n: int, indices: np.ndarray) -> dict:
        rng = np.random.default_rng([self.seed, int(indices[0]) if len(indices) else 0])
        targets = {}
        for name, y in out.items():
            if not y.is_floating_point() or not y.requires_grad:
                self.outputs.setdefault(name, None)
                continue
            spec = self.outputs.get(name)
            if spec is None:
                spec = self._kind_of(name, y, n)
                self.outputs[name] = spec
            if n == 1:  # what the batched per-sample passes check their outputs against
                self._shapes.setdefault(name, (tuple(y.shape), y.dtype))
            yd = y.detach()
            if spec.kind == "classifier":
                if spec.labeled:
                    lab = self._labels_for(y, indices)
                elif self.loss_kind == "pseudo":
                    lab = yd.argmax(-1)
                else:
                    p = yd.double() if spec.probabilities else torch.softmax(yd.double(), -1)
                    lab = sample_labels(p.reshape(-1, p.shape[-1]).cpu().numpy(), rng).reshape(tuple(y.shape[:-1]))
                    lab = torch.as_tensor(lab, device=y.device)
                targets[name] = lab
            else:
                sigma = float(yd.double().pow(2).mean().sqrt()) or 1.0
                eps = torch.as_tensor(rng.standard_normal(tuple(y.shape)), dtype=y.dtype, device=y.device)
                targets[name] = (yd + sigma * eps, sigma)
        if self.labels is not None and not any(s is not None and s.labeled for s in self.outputs.values()):
            raise UserError("labels given, but no output of the model is classifier-shaped (one class vector "
                            "per sample, or probability vectors on the last axis) with loss "
                            f"'{self.loss_kind}'")
        return targets

    def _kind_of(self, name: str, y: torch.Tensor, n: int) -> _OutputLoss:
        if self.loss_kind == "gaussian":
            classifier = False
        elif self.kinds is not None and name in self.kinds:
            classifier = self.kinds[name]
        else:
            classifier = classifier_shaped(y, n)
        if not classifier:
            return _OutputLoss("regression")
        probs = _is_probability(y)
        labeled = False
        if self.labels is not None:
            labeled = True
            others = [o for o, s in self.outputs.items() if s is not None and s.labeled]
            if others:
                raise UserError(f"labels given, but the model has more than one classifier-shaped output "
                                f"('{others[0]}', '{name}'): cannot tell which they label")
        return _OutputLoss("classifier", probs, labeled)

    def _labels_for(self, y: torch.Tensor, indices: np.ndarray) -> torch.Tensor:
        if self.labels.shape[0] <= int(np.max(indices)):
            raise UserError(f"labels hold {self.labels.shape[0]} entries; the calibration data has sample "
                            f"{int(np.max(indices))}")
        lab = self.labels[indices]
        if lab.shape != tuple(y.shape[:-1]):
            lab = lab.reshape(-1) if lab.size == int(np.prod(y.shape[:-1])) else lab
        if lab.size != int(np.prod(y.shape[:-1])):
            raise UserError(f"labels of shape {list(self.labels.shape[1:])} per sample do not match the "
                            f"output's positions {list(y.shape[1:-1])}")
        c = int(y.shape[-1])
        if lab.min() < 0 or lab.max() >= c:
            raise UserError(f"labels must be class indices in [0, {c}), got {int(lab.min())}..{int(lab.max())}")
        return torch.as_tensor(lab.astype(np.int64), device=y.device).reshape(tuple(y.shape[:-1]))

    def _loss(self, out: Mapping[str, torch.Tensor], targets: dict) -> torch.Tensor | None:
        total = None
        for name, t in targets.items():
            y, spec = out[name], self.outputs[name]
            if spec.kind == "classifier":
                logp = torch.log(y.clamp_min(torch.finfo(y.dtype).tiny)) if spec.probabilities else torch.log_softmax(y, -1)
                term = -logp.gather(-1, t.unsqueeze(-1)).sum()
            else:
                tgt, sigma = t
                term = (y - tgt).pow(2).sum() / (2.0 * sigma * sigma)
            total = term if total is None else total + term
        return total

    def loss_value(self, feeds: Mapping[str, np.ndarray], indices: np.ndarray | None = None,
                   moves: Mapping[int, np.ndarray] | None = None, targets: dict | None = None) -> tuple[float, dict]:
        """(loss, targets) on ``feeds``: the targets come from the unmoved model unless given."""
        n = _rows(feeds)
        idx = np.arange(n) if indices is None else np.asarray(indices)
        with torch.enable_grad():  # the mask leaves make the outputs differentiable, as in ``step``
            if targets is None:
                out, _ = self._forward(feeds)
                targets = self._targets(out, n, idx)
            out, _ = self._forward(feeds, moves)
            loss = self._loss(out, targets)
        return (float(loss.detach()) if loss is not None else 0.0), targets

    def step(self, feeds: Mapping[str, np.ndarray], indices: np.ndarray) -> None:
        """One batch: forward, targets, backward, sums. With ``per_sample``, what one run per sample
        gives: batched with torch.func where the graph allows (module docstring), else one run each."""
        n = _rows(feeds)
        if self.request.per_sample and n > 1:
            idx = np.asarray(indices)

            def alone(i: int) -> None:
                self.step({k: v[i:i + 1] for k, v in feeds.items()}, idx[i:i + 1])

            start = 0
            if not self.samples or self.batched_off is not None:  # the first sample alone fixes the losses
                alone(0)
                start = 1
            while start < n and self.batched_off is None:
                start += self._step_batched({k: v[start:] for k, v in feeds.items()}, idx[start:])
            for i in range(start, n):
                alone(i)
            return
        with torch.enable_grad():
            t0 = time.perf_counter()
            out, leaves = self._forward(feeds)
            targets = self._targets(out, n, np.asarray(indices))
            loss = self._loss(out, targets)
            if loss is None or not loss.requires_grad:
                raise GradientsUnavailable("no float output of the model depends on the masked tensors or weights")
            t1 = time.perf_counter()
            keys = list(leaves)
            wrt = [leaves[k] for k in keys] + [self.graph.params[p] for p in self.params]
            grads = torch.autograd.grad(loss, wrt, allow_unused=True)
            del out, loss
            t2 = time.perf_counter()
        with torch.no_grad():
            self._accumulate(n, dict(zip(keys, grads[:len(keys)], strict=True)), grads[len(keys):])
        self.samples += n
        self.batches += 1
        t3 = time.perf_counter()
        self.seconds["forward"] += t1 - t0
        self.seconds["backward"] += t2 - t1
        self.seconds["accumulate"] += t3 - t2

    # -- per-sample passes batched with torch.func ---------------------------------------------
    def _chunk(self, n: int) -> int:
        """How many samples one vmapped run takes: their per-sample gradients fit ``per_sample_bytes``."""
        per = sum(self.graph.params[p].numel() * self.graph.params[p].element_size() for p in self.params)
        per += sum(8 * t.channels for t in self._taps.values())
        return max(1, min(n, self.per_sample_bytes // max(per, 1)))

    def _step_batched(self, feeds: Mapping[str, np.ndarray], indices: np.ndarray) -> int:
        """The first chunk of ``feeds`` (a sample axis on every feed), as one run per sample would give
        it; the number of samples done, 0 (and ``batched_off`` set) where torch.func cannot run it."""
        m = self._chunk(_rows(feeds))
        feeds = {k: v[:m] for k, v in feeds.items()}
        indices = np.asarray(indices)[:m]
        try:
            grads = self._vmapped(feeds, indices)
        except Exception as exc:  # noqa: BLE001 - any failure of the batched pass: the loop decides
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            self.batched_off = f"{type(exc).__name__}: {msg}"[:300]
            log.info("per-sample gradients run one sample at a time: torch.func.vmap cannot batch this "
                     "graph (%s)", self.batched_off)
            return 0
        t0 = time.perf_counter()
        with torch.no_grad():
            tap_rows, param_rows = grads
            self._accumulate(m, tap_rows, param_rows, rows=True)
        self.samples += m
        self.batches += 1
        self.seconds["accumulate"] += time.perf_counter() - t0
        return m

    def _draws(self, indices: np.ndarray) -> dict:
        """Per output with a loss, what its targets need from outside the graph, stacked over the samples:
        given labels, the uniforms of sampled labels or the Gaussian noise, each sample's drawn from its
        own generator in the order ``_targets`` draws them on a batch of that one sample."""
        per: dict[str, list] = {}
        for i in indices:
            rng = np.random.default_rng([self.seed, int(i)])
            for name, spec in self.outputs.items():
                if spec is None:
                    continue
                shape, dtype = self._shapes[name]
                if spec.kind == "classifier":
                    if spec.labeled:
                        v = self._labels_for(torch.empty(shape, dtype=dtype), np.asarray([i]))[0]
                    elif self.loss_kind == "pseudo":
                        continue
                    else:
                        v = torch.as_tensor(rng.random(int(np.prod(shape[:-1], dtype=np.int64))), dtype=torch.float64)
                else:
                    v = torch.as_tensor(rng.standard_normal(shape), dtype=dtype)[0]
                per.setdefault(name, []).append(v)
        return {name: torch.stack(vs).to(self.graph.device) for name, vs in per.items()}

    def _vmapped(self, feeds: Mapping[str, np.ndarray], indices: np.ndarray):
        """({tap index: [m, C]}, [per weight: [m, *shape]]): each sample's gradients of its own loss, the
        loss ``_loss`` gives on a run of that one sample against the targets ``_targets`` makes there."""
        func = torch.func
        n = _rows(feeds)
        t0 = time.perf_counter()
        xs = {k: self.graph.feed(v) for k, v in feeds.items()}
        bad = [k for k, v in xs.items() if v.ndim == 0 or v.shape[0] != n]
        if bad:
            raise GradientsUnavailable(f"input '{bad[0]}' has no sample axis of {n}")
        draws = self._draws(indices)
        fdt = self.graph.float_dtype or torch.float32
        params = {p: self.graph.params[p].detach() for p in self.params}
        masks = {k: torch.ones(t.channels, dtype=fdt, device=self.graph.device) for k, t in self._taps.items()}
        specs = [(name, spec) for name, spec in self.outputs.items() if spec is not None]

        def masker(tap: MaskTap, mk: torch.Tensor):
            def edit(x: torch.Tensor) -> torch.Tensor:
                shape = _mask_shape(x, tap)
                return x * mk.to(x.dtype).reshape(shape)
            return edit

        def one(ps, ms, x, dr):  # one sample's loss: its feeds, and so its outputs, a batch of one
            edit = {p: (lambda _t, v=v: v) for p, v in ps.items()}
            edit.update({self.names[k]: masker(self._taps[k], mk) for k, mk in ms.items()})
            out = self.graph.run({k: v.unsqueeze(0) for k, v in x.items()}, edit=edit)
            total = None
            for name, spec in specs:
                y = out[name]
                if tuple(y.shape) != self._shapes[name][0]:
                    raise GradientsUnavailable(f"output '{name}' has shape {list(y.shape)} for one sample, "
                                               f"not {list(self._shapes[name][0])} as on the first")
                yd = y.detach()
                if spec.kind == "classifier":  # as _targets, then _loss
                    if spec.labeled:
                        lab = dr[name].unsqueeze(0)
                    elif self.loss_kind == "pseudo":
                        lab = yd.argmax(-1)
                    else:  # sample_labels, in torch
                        pr = yd.double() if spec.probabilities else torch.softmax(yd.double(), -1)
                        c = torch.cumsum(pr.reshape(-1, pr.shape[-1]), 1)
                        lab = (c < (dr[name] * c[:, -1])[:, None]).sum(1).clamp_max(pr.shape[-1] - 1)
                        lab = lab.reshape(tuple(y.shape[:-1]))
                    logp = (torch.log(y.clamp_min(torch.finfo(y.dtype).tiny)) if spec.probabilities
                            else torch.log_softmax(y, -1))
                    term = -logp.gather(-1, lab.unsqueeze(-1)).sum()
                else:
                    sigma = yd.double().pow(2).mean().sqrt()
                    sigma = torch.where(sigma != 0, sigma, torch.ones_like(sigma))  # `or 1.0`
                    tgt = yd + sigma.to(y.dtype) * dr[name].unsqueeze(0)
                    term = (y - tgt).pow(2).sum() / (2.0 * sigma * sigma).to(y.dtype)
                total = term if total is None else total + term
            return total

        with torch.no_grad():  # torch.func.grad differentiates inside; nothing outside builds a graph
            gp, gm = func.vmap(func.grad(one, argnums=(0, 1)), in_dims=(None, None, 0, 0))(params, masks, xs, draws)
        self.seconds["backward"] += time.perf_counter() - t0  # the vmapped forward and backward
        return {k: gm[k] for k in masks}, [gp[p] for p in self.params]

    def _accumulate(self, n: int, tap_grads: dict, param_grads, rows: bool = False) -> None:
        """Add one run's gradients; ``rows``: per-sample gradients of a vmapped run ([n, C] per tap,
        [n, *shape] per weight), each sample as a run of its own would add it."""
        rows_of: dict[int, torch.Tensor] = {}
        for k, g in tap_grads.items():
            tap = self._taps[k]
            if g is None:
                g = torch.zeros(tap.channels, dtype=torch.float64, device=self.graph.device)[None]
            elif rows:
                g = g.double()
            else:
                g = g.double().movedim(tap.axis, -1).reshape(-1, tap.channels)  # [rows, C]
            if g.shape[0] != n and n > 1:
                self._tap_batch_only.add(k)
            rows_of[k] = g
            s, a, q = self._tap_acc[k]
            s += g.sum(0)
            a += g.abs().sum(0)
            q += g.pow(2).sum(0)
        for key, taps in self._set_taps.items():
            size = self._set_acc[key][0].shape[0]
            u = torch.zeros((n, size), dtype=torch.float64, device=self.graph.device)
            for k, units in taps:
                g = rows_of.get(k)
                if g is None:
                    continue
                part = torch.zeros((g.shape[0], size), dtype=torch.float64, device=self.graph.device)
                part.index_add_(1, units, g)
                if g.shape[0] != n:  # a batch-only tap: its sum spread over the batch
                    part = part.sum(0, keepdim=True) / n
                    self._set_batch_only.add(key)
                u += part
            s, a, q = self._set_acc[key]
            s += u.sum(0)
            a += u.abs().sum(0)
            q += u.pow(2).sum(0)
        for p, g in zip(self.params, param_grads, strict=True):
            if g is None:
                continue
            if rows:  # sample by sample, in place, as the runs of one sample add (no [n, *shape] temporaries)
                for row in g.to(self._p_sum[p].dtype):
                    self._p_sum[p].add_(row)
                    if p in self._p_sq:
                        self._p_sq[p].addcmul_(row, row)
                continue
            self._p_sum[p].add_(g)
            if p in self._p_sq:
                self._p_sq[p].addcmul_(g, g)

    def result(self) -> Gradients:
        def np_(t):
            return t.double().cpu().numpy()

        taps = {self._taps[k]: MaskGrad(*(np_(t) for t in acc), per_sample=k not in self._tap_batch_only)
                for k, acc in self._tap_acc.items()}
        sets = {key: MaskGrad(*(np_(t) for t in acc), per_sample=key not in self._set_batch_only)
                for key, acc in self._set_acc.items()}
        params = {p: ParamGrad(np_(self._p_sum[p]), np_(self._p_sq[p]) if p in self._p_sq else None)
                  for p in self.params}
        loss = {name: spec.describe(self.loss_kind) if spec is not None else "none (integer, bool or constant output)"
                for name, spec in self.outputs.items()}
        return Gradients(self.samples, taps, sets, params, loss, dict(self.missing), dict(self.seconds),
                         self.batches, str(self.graph.device))


def _mask_shape(x, tap: MaskTap) -> list[int]:
    """The shape a tap's mask is reshaped to so it broadcasts on ``x``'s channel axis; refuses a
    tensor that is not float or has not the tap's channels there (at run time), never guessing."""
    if not x.is_floating_point():
        raise GradientsUnavailable(f"tensor '{tap.tensor}' is not a float tensor: it cannot be masked")
    if x.ndim <= tap.axis or x.shape[tap.axis] != tap.channels:
        raise GradientsUnavailable(f"tensor '{tap.tensor}' has shape {list(x.shape)} at run time, "
                                   f"not {tap.channels} channels on axis {tap.axis}")
    shape = [1] * x.ndim
    shape[tap.axis] = tap.channels
    return shape


def _rows(feeds: Mapping[str, np.ndarray]) -> int:
    first = next(iter(feeds.values()), None)
    return int(first.shape[0]) if first is not None and getattr(first, "ndim", 0) else 1


def sample_labels(p: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One class per row of ``p`` (rows of probabilities), by inverse transform sampling."""
    c = np.cumsum(p, axis=1)
    u = rng.random(p.shape[0]) * c[:, -1]
    return np.minimum((c < u[:, None]).sum(axis=1), p.shape[1] - 1).astype(np.int64)


def collect_gradients(model: onnx.ModelProto, registry, view: CalibView, request: GradRequest, *,
                      batch_size: int = DEFAULT_GRAD_BATCH, loss: str = DEFAULT_LOSS,
                      labels: np.ndarray | None = None, kinds: Mapping[str, bool] | None = None,
                      device: str = "auto", dtype=None, seed: int = 0, max_samples: int | None = None,
                      progress: Progress | None = None, batched: bool = True) -> Gradients:
    """The sums of ``request``'s gradients over every sample of ``view`` (module docstring), in
    batches of ``batch_size`` (the model's fixed batch when it fixes one; with ``request.per_sample``
    what one run per sample gives, batched with torch.func where it can). ``kinds``: output name ->
    classifier-shaped (``measure.fidelity.output_kinds``; None: judged on the first batch);
    ``dtype=torch.float64`` computes in float64 (``TorchGraph``);
    ``max_samples``: only the view's first samples (whole batches where the model fixes one: the
    per-sample passes of ``hessian`` cost a model run a sample: for ResNet-50 on 2 busy cores 1.7 s
    batched, 4.25 s one run each); ``batched=False``: per-sample passes one run per sample, never
    batched with torch.func (the same sums). A model whose gradients cannot be had returns
    ``Gradients`` with ``unavailable`` set (the one-line reason) and nothing else."""
    t0 = time.perf_counter()
    if request.per_sample and (view.batch_rows or 1) > 1:
        return Gradients(unavailable=f"the model fixes its batch to {view.batch_rows} samples: per-sample "
                                     "gradients need runs of one sample")
    try:
        runner = GradientRunner(model, registry, request, loss=loss, labels=labels, kinds=kinds, device=device,
                                dtype=dtype, seed=seed, batched=batched)
        done = 0
        limit = view.n if max_samples is None else max(1, min(view.n, int(max_samples)))
        for batch in view.batches(batch_size):
            if done >= limit:
                break
            feeds, idx = batch.feeds, batch.indices
            if done + batch.n > limit and not view.batch_rows:
                cut = limit - done
                feeds, idx = {k: v[:cut] for k, v in feeds.items()}, idx[:cut]
            runner.step(feeds, idx)
            done += len(idx)
            if progress is not None:
                progress(done, limit)
    except (NoTorchForward, GradientsUnavailable) as exc:
        log.info("gradients unavailable: %s", exc)
        return Gradients(unavailable=str(exc))
    res = runner.result()
    res.seconds["total"] = time.perf_counter() - t0
    log.info("gradients of %d samples in %d runs on %s: %s", res.samples, res.batches, res.device,
             ", ".join(f"{k} {v:.1f} s" for k, v in res.seconds.items()))
    return res
