"""Per-sample gradients (``GradRequest.per_sample``: hessian's squared per-sample weight gradients)
batched with torch.func (``runtime.gradients``, module docstring) give what one run per sample gives.

- On the gradient tests' CNN (residual Add, BatchNorm, depthwise conv; taps, mask sets, weights), the
  small CNN and an MLP, in float64, with every loss (pseudo labels, sampled labels, given labels, the
  Gaussian likelihood of a feature-map output): the weights' sums and sums of squares and the taps'
  and sets' sum, abs and sq equal the per-sample loop's within 1e-9 relative; in float32 within 1e-4.
- Chunks sized to the per-sample gradient budget: several chunks, the same sums.
- A tap whose tensor merges the samples into another axis ([2N, C]) is per sample in both.
- A graph vmap cannot run (an op reading a per-sample value as a Python number), and a forced failure
  of vmap, fall back to the loop, say why in the log, and give the loop's sums.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from onnxprune.handlers import REGISTRY  # noqa: E402

from onnxprune.analysis.analyze import analyze_model  # noqa: E402
from onnxprune.planning import grad_importance as gi  # noqa: E402
from onnxprune.runtime.calib import CalibSpec, open_calib  # noqa: E402
from onnxprune.runtime.gradients import GradientRunner, GradRequest, MaskTap, collect_gradients  # noqa: E402
from onnxprune.testing import graphs  # noqa: E402

F64 = torch.float64
CNN = graphs.GRAD_CNN.replace("TAIL", graphs.GRAD_CNN_HEAD)
# hessian with the mask criteria: weights, taps and mask sets in one per-sample request
KINDS = [gi.GradOptions("hessian"), gi.GradOptions("fisher"), gi.GradOptions("group-fisher")]

# samples merged into the batch axis: r is [2N, 16], a batch-only tensor in a batched pass
MERGED = """
<ir_version: 8, opset_import: ["" : 17]>
merged (float[N,8] x) => (float[N,5] y)
<float[16,4] w1, float[16] b1, float[5,32] w2, float[5] b2, int64[2] s1 = {-1, 4}, int64[2] s2 = {-1, 32}>
{
  xr = Reshape (x, s1)
  h = Gemm <transB=1> (xr, w1, b1)
  r = Relu (h)
  rr = Reshape (r, s2)
  y = Gemm <transB=1> (rr, w2, b2)
}
"""

# an op that reads a per-sample value as a Python number: Slice's end is computed from the data
# (always 5: zero times x, plus 5), which a run of one sample reads and vmap cannot
DATA_END = """
<ir_version: 8, opset_import: ["" : 17]>
dataend (float[N,8] x) => (float[N,5] y)
<float[16,8] w1, float[16] b1, float[7,16] w2, float[7] b2, float[1] zero = {0.0},
 int64[1] five = {5}, int64[1] st = {0}, int64[1] ax = {1}>
{
  h = Gemm <transB=1> (x, w1, b1)
  r = Relu (h)
  z = Mul (x, zero)
  s = ReduceSum <keepdims=0> (z)
  si = Cast <to=7> (s)
  e = Add (si, five)
  full = Gemm <transB=1> (r, w2, b2)
  y = Slice (full, st, e, ax)
}
"""


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-300))


def analyzed(model, kinds=KINDS):
    an = analyze_model(model, REGISTRY)
    groups = [g for g in an.cg.groups if g.prunable]
    req = gi.gradient_request(an.cg, groups, kinds)
    assert req.per_sample and req.params
    return an.model, req


def run(model, req, feeds, *, batched, n=None, dtype=F64, **kw):
    n = n or len(next(iter(feeds.values())))
    r = GradientRunner(model, REGISTRY, req, device="cpu", dtype=dtype, batched=batched, **kw)
    half = n // 2  # two batches: the second starts batched at once
    r.step({k: v[:half] for k, v in feeds.items()}, np.arange(half))
    r.step({k: v[half:] for k, v in feeds.items()}, np.arange(half, n))
    return r, r.result()


def assert_same(a, b, tol):
    assert a.samples == b.samples
    assert set(a.params) == set(b.params) and a.params
    for p in a.params:
        assert rel(a.params[p].sq, b.params[p].sq) <= tol, p
        assert rel(a.params[p].sum, b.params[p].sum) <= tol, p
    assert set(a.taps) == set(b.taps) and set(a.sets) == set(b.sets)
    for tap in a.taps:
        assert a.taps[tap].per_sample == b.taps[tap].per_sample
        for f in ("sum", "abs", "sq"):
            assert rel(getattr(a.taps[tap], f), getattr(b.taps[tap], f)) <= tol, (tap.tensor, f)
    for key in a.sets:
        assert a.sets[key].per_sample == b.sets[key].per_sample
        for f in ("sum", "abs", "sq"):
            assert rel(getattr(a.sets[key], f), getattr(b.sets[key], f)) <= tol, (key, f)
    assert a.loss == b.loss


def images(n, shape=(3, 8, 8), seed=1):
    return np.random.default_rng(seed).standard_normal((n, *shape)).astype(np.float32)


CASES = {
    "cnn-pseudo": (lambda: graphs.build(CNN, positive=("v1",)), (3, 8, 8), "pseudo"),
    "cnn-sampled": (lambda: graphs.build(CNN, positive=("v1",)), (3, 8, 8), "sampled"),
    "cnn-gaussian": (lambda: graphs.build(CNN, positive=("v1",)), (3, 8, 8), "gaussian"),
    "small-cnn": (graphs.small_cnn, (3, 16, 16), "pseudo"),
    "mlp": (lambda: graphs.build(graphs.MLP), (8,), "sampled"),
    "feature-map": (lambda: graphs.build(graphs.CONV_1X1), (3, 6, 6), "pseudo"),  # gaussian: no classifier
}


@pytest.mark.parametrize("case", list(CASES))
def test_batched_per_sample_gradients_equal_the_loop(case):
    make, shape, loss = CASES[case]
    model, req = analyzed(make())
    x = {model.graph.input[0].name: images(9, shape)}
    loop_r, loop = run(model, req, x, batched=False, loss=loss)
    vm_r, vm = run(model, req, x, batched=True, loss=loss)
    assert loop_r.batched_off == "turned off" and loop.batches == 9
    assert vm_r.batched_off is None and vm.batches == 3  # the first sample alone, then a chunk a batch
    assert_same(vm, loop, 1e-9)


def test_float32_within_1e_4():
    model, req = analyzed(graphs.build(CNN, positive=("v1",)))
    x = {"x": images(8)}
    _, loop = run(model, req, x, batched=False, dtype=None)
    vm_r, vm = run(model, req, x, batched=True, dtype=None)
    assert vm_r.batched_off is None
    assert_same(vm, loop, 1e-4)


def test_given_labels():
    model, req = analyzed(graphs.build(CNN, positive=("v1",)))
    x = {"x": images(7)}
    labels = np.random.default_rng(3).integers(0, 5, size=7)
    _, loop = run(model, req, x, batched=False, labels=labels)
    vm_r, vm = run(model, req, x, batched=True, labels=labels)
    assert vm_r.batched_off is None and "given labels" in next(iter(vm.loss.values()))
    assert_same(vm, loop, 1e-9)


def test_chunks_fit_the_per_sample_budget():
    model, req = analyzed(graphs.build(CNN, positive=("v1",)))
    x = {"x": images(11)}
    whole = GradientRunner(model, REGISTRY, req, device="cpu", dtype=F64)._chunk(10)
    _, loop = run(model, req, x, batched=False)
    r = GradientRunner(model, REGISTRY, req, device="cpu", dtype=F64, per_sample_bytes=1)
    assert r._chunk(10) == 1 and whole == 10  # budget 1 GiB: the whole batch
    bytes3 = 3 * (sum(r.graph.params[p].numel() * 8 for p in r.params) + sum(8 * t.channels for t in req.taps))
    vm_r, vm = run(model, req, x, batched=True, per_sample_bytes=bytes3)
    assert vm_r._chunk(10) == 3
    assert vm.batches == 1 + 2 + 2  # 1 alone + 4 (chunks 3, 1) + 6 (chunks 3, 3)
    assert_same(vm, loop, 1e-9)


def test_tap_with_samples_merged_is_per_sample_in_both():
    model = graphs.build(MERGED)
    taps = (MaskTap("r", 1, "rr", 16),)
    req = GradRequest(taps=taps, params=("w1", "w2", "b1"), per_sample=True)
    x = {"x": images(6, (8,))}
    _, loop = run(model, req, x, batched=False)
    vm_r, vm = run(model, req, x, batched=True)
    assert vm_r.batched_off is None
    assert all(m.per_sample for m in loop.taps.values())
    assert_same(vm, loop, 1e-9)
    # a batched pass of the same graph cannot tell the samples' mask gradients apart
    batch = GradientRunner(model, REGISTRY, GradRequest(taps=taps), device="cpu", dtype=F64)
    batch.step(x, np.arange(6))
    assert not batch.result().taps[taps[0]].per_sample


def test_graph_vmap_cannot_run_falls_back_to_the_loop(caplog):
    model = graphs.build(DATA_END)
    req = GradRequest(params=("w1", "w2", "b2"), per_sample=True)
    x = {"x": images(6, (8,))}
    _, loop = run(model, req, x, batched=False)
    with caplog.at_level(logging.INFO, logger="onnxprune.runtime.gradients"):
        vm_r, vm = run(model, req, x, batched=True)
    assert vm_r.batched_off and vm_r.batched_off != "turned off"
    assert "torch.func.vmap cannot batch this graph" in caplog.text
    assert vm.batches == 6
    assert_same(vm, loop, 1e-12)


def test_forced_vmap_failure_falls_back_mid_batch(monkeypatch, caplog):
    """A chunk that fails adds nothing: the loop does it, and every chunk after it."""
    model, req = analyzed(graphs.build(CNN, positive=("v1",)))
    x = {"x": images(9)}
    _, loop = run(model, req, x, batched=False)
    real = torch.func.vmap
    calls = []

    def flaky(*a, **k):
        calls.append(1)
        if len(calls) >= 2:
            raise RuntimeError("vmap: forced failure")
        return real(*a, **k)

    monkeypatch.setattr(torch.func, "vmap", flaky)
    with caplog.at_level(logging.INFO, logger="onnxprune.runtime.gradients"):
        vm_r, vm = run(model, req, x, batched=True, per_sample_bytes=1)  # chunks of one
    assert "forced failure" in vm_r.batched_off and "forced failure" in caplog.text
    assert vm.batches == 9
    assert_same(vm, loop, 1e-9)


def test_collect_gradients_batches_by_default(tmp_path):
    model, req = analyzed(graphs.build(CNN, positive=("v1",)))
    x = images(11)
    np.savez(tmp_path / "calib.npz", x=x)
    view = open_calib(model, CalibSpec(path=str(tmp_path / "calib.npz"), holdout=1.0 / len(x))).fit
    loop = collect_gradients(model, REGISTRY, view, req, batch_size=4, dtype=F64, batched=False)
    vm = collect_gradients(model, REGISTRY, view, req, batch_size=4, dtype=F64)
    assert loop.unavailable is None and vm.unavailable is None
    assert loop.batches == 10 and vm.batches == 1 + 1 + 1 + 1  # 1 alone + 3, then 4, then 2
    assert_same(vm, loop, 1e-9)
    sc_loop = gi.gradient_scores(*_cg(model), gi.GradOptions("hessian"), loop)
    sc_vm = gi.gradient_scores(*_cg(model), gi.GradOptions("hessian"), vm)
    for gid, s in sc_loop.scores.items():
        assert rel(sc_vm.scores[gid], s) <= 1e-9


def _cg(model):
    an = analyze_model(model, REGISTRY)
    return an.cg, [g for g in an.cg.groups if g.prunable]
