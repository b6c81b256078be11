"""Gradient capture (``runtime.gradients``) and the gradient and Torch-Pruning criteria
(``planning.grad_importance``).

- Mask gradients are right: on a small CNN (residual Add, BatchNorm, depthwise conv) in float64, the
  gradient of every unit's shared mask equals the central finite difference of the loss when that
  unit's mask moves (relative 1e-5); it equals the gradient of scaling the consumers' input-channel
  weights (so the mask sits on the consumer's edge only, not on the residual path that reads the
  same tensor); per-sample masks in a batched run give what runs of one sample give.
- The losses are the documented ones: recomputed from onnxruntime's outputs with numpy.
- A dead channel (zero weights everywhere in its unit) scores zero under every criterion but FPGM
  (which scores redundancy: a zero filter is far from the others), and the live ones do not.
- group-fisher's ``flops`` saving of a unit is the MAC drop of the model pruned by that unit.
- An op without a torch forward disables the gradient criteria with one line; l2 stands in.
- Parity with Torch-Pruning 1.6.1 (skipped without it) on torchvision resnet18 and mobilenet_v2,
  BatchNorm unfused, same weights and calibration batch: Taylor and Hessian per-channel scores have
  Spearman >= 0.99 with TaylorImportance / HessianImportance on every group, LAMP and FPGM remove the
  same channels at ratio 0.3. Both sides compute in float64: in float32 the gradients of these
  random networks differ by up to 4% between two float32 implementations of the same network
  (mobilenet_v2: torch vs the executor, while both agree within 2e-9 in float64), which moves
  Spearman to 0.994 (taylor) / 0.999 (hessian). Hessian runs on a one-sample batch: TP 1.6.1's
  ``accumulate_grad`` tests a parameter's *name* against a dict keyed by the parameter, so it keeps
  only the last sample's squared gradient; on one sample its accumulation is right.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

torch = pytest.importorskip("torch")

from onnxprune.handlers import REGISTRY  # noqa: E402

from onnxprune.analysis.analyze import analyze_model  # noqa: E402
from onnxprune.analysis.contract import Role  # noqa: E402
from onnxprune.errors import UserError  # noqa: E402
from onnxprune.planning import grad_importance as gi  # noqa: E402
from onnxprune.planning.data_importance import consumer_taps  # noqa: E402
from onnxprune.planning.importance import group_importance  # noqa: E402
from onnxprune.runtime.calib import CalibSpec, open_calib  # noqa: E402
from onnxprune.runtime.gradients import (  # noqa: E402
    GradientRunner,
    GradRequest,
    collect_gradients,
    sample_labels,
)
from onnxprune.testing import checks, graphs  # noqa: E402

F64 = torch.float64

# x -> conv1 -> BN -> tanh = a1 -> conv2 -> tanh = a2; r = a1 + a2 (a1 feeds conv2 and the Add: the
# mask must sit on conv2's edge only) -> depthwise -> tanh -> conv3 (12 ch) -> tanh -> GAP -> Gemm
CNN = graphs.GRAD_CNN.replace("TAIL", graphs.GRAD_CNN_HEAD)
GRAD_KINDS = [("taylor", {}), ("taylor", {"taylor_form": "activation"}), ("hessian", {}), ("fisher", {}),
              ("group-fisher", {}), ("group-fisher", {"normalize": "memory"}), ("lamp", {})]


def cnn(seed: int = 0, tail: str = "y = Gemm <transB=1> (f, wf, bf)", out: str = "float[N,5] y") -> onnx.ModelProto:
    text = CNN.replace("y = Gemm <transB=1> (f, wf, bf)", tail).replace("float[N,5] y", out)
    return graphs.build(text, positive=("v1",), seed=seed)


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-300))


def images(n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, 8, 8)).astype(np.float32)


def prunable(an):
    return [g for g in an.cg.groups if g.prunable]


def view_of(tmp_path, model, x: np.ndarray, name: str = "input"):
    """A fit share holding every sample but one (the held-out one is never used here)."""
    path = tmp_path / "calib.npz"
    np.savez(path, **{name: x})
    data = open_calib(model, CalibSpec(path=str(path), holdout=1.0 / len(x)))
    return data.fit


def test_mask_gradient_equals_finite_difference_of_the_loss():
    an = analyze_model(cnn(), REGISTRY)
    groups = prunable(an)
    assert sorted(g.size for g in groups) == [8, 12]
    req = gi.gradient_request(an.cg, groups, gi.GradOptions("group-fisher"))
    runner = GradientRunner(an.model, REGISTRY, req, device="cpu", dtype=F64)
    feeds = {"x": images(3)}
    runner.step(feeds, np.arange(3))
    res = runner.result()
    _, targets = runner.loss_value(feeds)
    h = 1e-5
    checked = 0
    for g in groups:
        grad = res.sets[g.id].sum
        for u in range(g.size):
            up, down = np.ones(g.size), np.ones(g.size)
            up[u], down[u] = 1 + h, 1 - h
            lp, _ = runner.loss_value(feeds, moves={g.id: up}, targets=targets)
            lm, _ = runner.loss_value(feeds, moves={g.id: down}, targets=targets)
            fd = (lp - lm) / (2 * h)
            assert abs(grad[u] - fd) <= 1e-5 * abs(fd), (g.id, u, grad[u], fd)
            checked += 1
    assert checked == 20


def test_mask_sits_on_the_consumer_edge_and_is_per_sample():
    """dL/dm of a consumer tap's channel c is sum W[:, c] * dL/dW[:, c] of that consumer's weight:
    the mask scales what the consumer reads, not the residual Add that reads the same tensor. A
    batched run's per-sample masks give the runs of one sample."""
    an = analyze_model(cnn(), REGISTRY)
    cg, groups = an.cg, prunable(an)
    req = gi.gradient_request(cg, groups, gi.GradOptions("group-fisher"))
    taps = consumer_taps(cg, groups)
    consts = tuple(dict.fromkeys(t.const for ts in taps.consumers.values() for t in ts))
    both = GradRequest(taps=req.taps, sets=req.sets, params=consts)
    x = images(3)
    runner = GradientRunner(an.model, REGISTRY, both, device="cpu", dtype=F64)
    runner.step({"x": x}, np.arange(3))
    res = runner.result()
    assert all(m.per_sample for m in res.taps.values()) and all(m.per_sample for m in res.sets.values())
    for g in groups:
        expect = np.zeros(g.size)
        for t in taps.consumers[g.id]:
            w = cg.consts.get(t.const).astype(np.float64)
            wg = w * res.params[t.const].sum
            per = wg.sum(axis=tuple(a for a in range(w.ndim) if a != t.axis))
            expect += np.bincount(cg.unit_index(g, t.slot_space), weights=per, minlength=g.size)
        assert rel(res.sets[g.id].sum, expect) <= 1e-9
    singles = []
    for i in range(3):
        one = GradientRunner(an.model, REGISTRY, req, device="cpu", dtype=F64)
        one.step({"x": x[i:i + 1]}, np.arange(i, i + 1))
        singles.append(one.result())
    for g in groups:
        per = np.stack([s.sets[g.id].sum for s in singles])
        assert rel(res.sets[g.id].sq, (per ** 2).sum(0)) <= 1e-9
        assert rel(res.sets[g.id].abs, np.abs(per).sum(0)) <= 1e-9
    for tap, mg in res.taps.items():
        per = np.stack([s.taps[tap].sum for s in singles])
        assert rel(mg.sq, (per ** 2).sum(0)) <= 1e-9


def _log_softmax(y: np.ndarray) -> np.ndarray:
    y = y.astype(np.float64)
    m = y.max(-1, keepdims=True)
    return y - m - np.log(np.exp(y - m).sum(-1, keepdims=True))


def test_classifier_losses_match_onnxruntime():
    """Pseudo-labels: sum_n -log softmax(y_n)[argmax y_n]; labels: the same at the given labels; a
    softmax output: -log p at the label, no second softmax. Recomputed from onnxruntime's outputs."""
    model = cnn()
    an = analyze_model(model, REGISTRY)
    x = images(4)
    y = checks.run(an.model, {"x": x})[0]
    runner = GradientRunner(an.model, REGISTRY, GradRequest(params=("w1",)), device="cpu")
    loss, _ = runner.loss_value({"x": x})
    logp = _log_softmax(y)
    assert rel(loss, -logp[np.arange(4), y.argmax(-1)].sum()) <= 1e-5
    assert "argmax" in runner.result().loss["y"]
    labels = np.array([4, 0, 3, 1, 2, 2])  # one per calibration sample, by global index
    idx = np.array([5, 0, 2, 3])
    lab_runner = GradientRunner(an.model, REGISTRY, GradRequest(params=("w1",)), device="cpu", labels=labels)
    loss, _ = lab_runner.loss_value({"x": x}, indices=idx)
    assert rel(loss, -logp[np.arange(4), labels[idx]].sum()) <= 1e-5
    soft = analyze_model(cnn(tail="z = Gemm <transB=1> (f, wf, bf)\n  y = Softmax <axis=-1> (z)"), REGISTRY)
    p = checks.run(soft.model, {"x": x})[0]
    sr = GradientRunner(soft.model, REGISTRY, GradRequest(params=("w1",)), device="cpu")
    loss, _ = sr.loss_value({"x": x})
    assert rel(loss, -np.log(p[np.arange(4), p.argmax(-1)].astype(np.float64)).sum()) <= 1e-5
    assert "log of the probabilities" in sr.result().loss["y"]
    gauss = GradientRunner(an.model, REGISTRY, GradRequest(params=("w1",)), device="cpu", loss="gaussian")
    gauss.loss_value({"x": x})
    assert "gaussian" in gauss.result().loss["y"]
    with pytest.raises(UserError, match="no output of the model is classifier-shaped"):
        GradientRunner(an.model, REGISTRY, GradRequest(params=("w1",)), device="cpu", loss="gaussian",
                       labels=labels).loss_value({"x": x}, indices=idx)
    with pytest.raises(UserError, match=r"class indices in \[0, 5\)"):
        GradientRunner(an.model, REGISTRY, GradRequest(params=("w1",)), device="cpu",
                       labels=labels + 3).loss_value({"x": x}, indices=idx)


def test_regression_output_gets_a_gaussian_likelihood_with_nonzero_gradient(tmp_path):
    """A feature-map output: sum (y - y0 - sigma eps)² / 2 sigma² = sum eps² / 2 at the start (a
    chi-square with one degree per element: mean numel/2, sd sqrt(numel/2)), with a nonzero gradient."""
    an = analyze_model(cnn(tail="y = Identity (a4)", out="float[N,12,8,8] y"), REGISTRY)
    x = images(4)
    runner = GradientRunner(an.model, REGISTRY, GradRequest(params=("w1", "w3")), device="cpu", dtype=F64)
    loss, _ = runner.loss_value({"x": x})
    numel = 4 * 12 * 8 * 8
    assert abs(loss - numel / 2) <= 5 * np.sqrt(numel / 2)
    view = view_of(tmp_path, an.model, images(5), "x")
    grads = collect_gradients(an.model, REGISTRY, view, GradRequest(params=("w1", "w3")), device="cpu")
    assert grads.unavailable is None and "gaussian" in grads.loss["y"]
    assert all(np.all(np.isfinite(p.sum)) and np.abs(p.sum).max() > 0 for p in grads.params.values())


def test_sampled_labels_follow_the_softmax_and_the_seed(tmp_path):
    rng = np.random.default_rng(0)
    p = np.tile([[0.1, 0.6, 0.3]], (20000, 1))
    lab = sample_labels(p, rng)
    freq = np.bincount(lab, minlength=3) / len(lab)
    assert np.all(np.abs(freq - p[0]) <= 4 * np.sqrt(p[0] * (1 - p[0]) / len(lab)))
    an = analyze_model(cnn(), REGISTRY)
    view = view_of(tmp_path, an.model, images(6), "x")
    req = GradRequest(params=("w3",))
    a, b, c = (collect_gradients(an.model, REGISTRY, view, req, loss="sampled", seed=s, device="cpu",
                                 batch_size=2) for s in (0, 0, 1))
    assert "sampled" in a.loss["y"]
    assert np.array_equal(a.params["w3"].sum, b.params["w3"].sum)
    assert not np.array_equal(a.params["w3"].sum, c.params["w3"].sum)


def _dead(unit: int = 2, unit2: int = 5) -> onnx.ModelProto:
    """The CNN with unit ``unit`` of the 8-channel group and ``unit2`` of the 12-channel one dead:
    every weight of theirs zero (BatchNorm's shift and mean too, so the channel is 0 everywhere)."""
    model = cnn()
    for init in model.graph.initializer:
        a = numpy_helper.to_array(init).copy()
        if init.name in ("w1", "b1", "s1", "bb1", "m1", "b2", "wd"):
            a[unit] = 0
        elif init.name == "w2":
            a[unit] = 0
            a[:, unit] = 0
        elif init.name == "w3":
            a[:, unit] = 0
            a[unit2] = 0
        elif init.name == "wf":
            a[:, unit2] = 0
        init.CopyFrom(numpy_helper.from_array(a, init.name))
    return model


@pytest.mark.parametrize(("kind", "kw"), GRAD_KINDS, ids=[k + "-" + "-".join(v.values()) for k, v in GRAD_KINDS])
def test_dead_channel_scores_zero(tmp_path, kind, kw):
    an = analyze_model(_dead(), REGISTRY)
    groups = prunable(an)
    opts = gi.GradOptions(kind, **kw)
    req = gi.gradient_request(an.cg, groups, opts)
    view = view_of(tmp_path, an.model, images(5), "x")
    grads = None if req.empty else collect_gradients(an.model, REGISTRY, view, req, device="cpu", batch_size=2)
    sc = gi.gradient_scores(an.cg, groups, opts, grads)
    assert sc.disabled is None and not sc.fallback
    for g in groups:
        dead = 2 if g.size == 8 else 5
        unit = int(np.unique(an.cg.unit_index(g, g.spaces[0])[[dead]])[0])  # the dead channel's unit
        s = sc.scores[g.id]
        assert s[unit] == 0.0
        assert np.all(np.delete(s, unit) > 0)


def test_group_fisher_flops_saving_is_the_mac_drop_of_pruning_the_unit():
    from onnxprune.api import DependencyGraph
    from onnxprune.measure.stats import stats_at

    model = cnn()
    dg = DependencyGraph(model)
    cg = dg.analysis.cg
    base = stats_at(dg.analysis.model).macs
    for g in prunable(dg.analysis):
        save = gi.unit_savings(cg, g, "flops")
        for u in (0, g.size - 1):
            pruned = DependencyGraph(model).prune({g.id: [u]})
            assert save[u] == pytest.approx(base - stats_at(pruned).macs, rel=1e-12)


def test_op_without_torch_forward_disables_gradients_with_one_line(tmp_path):
    """tf_crop_and_resize has no torch forward: refused when it runs; every group falls back to l2."""
    model = cnn(tail="u = Resize <mode=\"linear\", coordinate_transformation_mode=\"tf_crop_and_resize\"> "
                     "(a4, roi, sc)\n  q = GlobalAveragePool (u)\n  g2 = Flatten (q)\n"
                     "  y = Gemm <transB=1> (g2, wf, bf)")
    text_inits = {"roi": np.array([0, 0, 0, 0, 1, 1, 1, 1], np.float32), "sc": np.ones(4, np.float32)}
    model.graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in text_inits.items())
    an = analyze_model(model, REGISTRY)
    groups = prunable(an)
    assert groups
    view = view_of(tmp_path, an.model, images(3), "x")
    opts = gi.GradOptions("taylor")
    grads = collect_gradients(an.model, REGISTRY, view, gi.gradient_request(an.cg, groups, opts), device="cpu")
    assert grads.unavailable and "Resize" in grads.unavailable and "\n" not in grads.unavailable
    assert not grads.params
    sc = gi.gradient_scores(an.cg, groups, opts, grads)
    assert sc.disabled == grads.unavailable
    for g in groups:
        assert np.array_equal(sc.scores[g.id], group_importance(an.cg, g, "l2"))
        assert "gradients unavailable" in sc.fallback[g.id]


def test_without_torch_the_gradient_modules_import_and_say_why(tmp_path):
    an = analyze_model(cnn(), REGISTRY)
    path = tmp_path / "m.onnx"
    onnx.save(an.model, path)
    np.savez(tmp_path / "c.npz", x=images(3))
    code = ("import sys; sys.modules['torch'] = None\n"
            "import onnx\n"
            "from onnxprune.handlers import REGISTRY\n"
            "from onnxprune.planning import grad_importance\n"
            "from onnxprune.runtime.calib import CalibSpec, open_calib\n"
            "from onnxprune.runtime.gradients import GradRequest, collect_gradients\n"
            f"m = onnx.load({str(path)!r})\n"
            f"v = open_calib(m, CalibSpec(path={str(tmp_path / 'c.npz')!r})).fit\n"
            "print('REASON', collect_gradients(m, REGISTRY, v, GradRequest(params=('w1',))).unavailable)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "REASON" in proc.stdout and "pip install onnxprune[torch]" in proc.stdout


def test_one_pass_serves_several_criteria_and_max_samples_bounds_it(tmp_path):
    """A request for taylor, fisher and group-fisher at once scores as the three requests alone; a
    pass over the first 3 samples equals a pass over a view of those 3."""
    an = analyze_model(cnn(), REGISTRY)
    cg, groups = an.cg, prunable(an)
    x = images(7)
    view = view_of(tmp_path, an.model, x, "x")  # 6 samples
    many = [gi.GradOptions("taylor"), gi.GradOptions("fisher"), gi.GradOptions("group-fisher")]
    both = collect_gradients(an.model, REGISTRY, view, gi.gradient_request(cg, groups, many), device="cpu",
                             dtype=F64, batch_size=4)
    for o in many:
        alone = collect_gradients(an.model, REGISTRY, view, gi.gradient_request(cg, groups, o), device="cpu",
                                  dtype=F64, batch_size=4)
        a, b = gi.gradient_scores(cg, groups, o, both), gi.gradient_scores(cg, groups, o, alone)
        for g in groups:
            assert rel(a.scores[g.id], b.scores[g.id]) <= 1e-9
    req = gi.gradient_request(cg, groups, many)
    first = collect_gradients(an.model, REGISTRY, view, req, device="cpu", dtype=F64, batch_size=2, max_samples=3)
    assert first.samples == 3
    runner = GradientRunner(an.model, REGISTRY, req, device="cpu", dtype=F64)
    runner.step({"x": x[view.indices[:3]]}, view.indices[:3])
    ref = runner.result()
    for g in groups:
        assert rel(first.sets[g.id].sq, ref.sets[g.id].sq) <= 1e-9


def test_reductions_and_normalizers_are_torch_pruning_s():
    """Two members over 3 units (one member covering units 0 and 1 only)."""
    a = (np.array([0, 1, 2]), np.array([1.0, 2.0, 4.0]))
    b = (np.array([0, 1]), np.array([3.0, 1.0]))
    assert np.allclose(gi.reduce_members([a, b], 3, "sum"), [4, 3, 4])
    assert np.allclose(gi.reduce_members([a, b], 3, "mean"), [2, 1.5, 4])
    assert np.allclose(gi.reduce_members([a, b], 3, "max"), [3, 2, 4])
    assert np.allclose(gi.reduce_members([a, b], 3, "prod"), [3, 2, 4])
    assert np.allclose(gi.reduce_members([a, b], 3, "first"), [1, 2, 4])
    s = np.array([1.0, 3.0, 2.0, 6.0])
    assert np.allclose(gi.normalize_scores(s, "mean"), s / 3)
    assert np.allclose(gi.normalize_scores(s, "max"), s / 6)
    assert np.allclose(gi.normalize_scores(s, "sum"), s / 12)
    assert np.allclose(gi.normalize_scores(s, "standardization"), (s - 1) / 5, atol=1e-7)
    assert np.allclose(gi.normalize_scores(s, "gaussian"), (s - 3) / np.std(s, ddof=1), atol=1e-7)
    assert np.allclose(gi.lamp_normalize(s), [1 / 12, 3 / 9, 2 / 11, 6 / 6])


# ----------------------------------------------------------------------------------------------
# parity with Torch-Pruning 1.6.1


def _tp():
    tp = pytest.importorskip("torch_pruning")
    from importlib.metadata import version

    if version("torch-pruning") != "1.6.1":
        pytest.skip(f"parity is with torch-pruning 1.6.1, found {version('torch-pruning')}")
    pytest.importorskip("torchvision")
    return tp


def _producer_conv(cg, g):
    for s in g.slots:
        if s.role == Role.PRODUCER and cg.node_by_name[s.node].op_type == "Conv":
            return s
    return None


def _parity(tmp_path, arch: str, size: int) -> dict[str, list[float]]:
    """Per criterion, per group: Spearman of our per-channel scores with TP's (taylor, hessian) or
    whether the same channels go at ratio 0.3 (lamp, fpgm; 1.0 or 0.0)."""
    from onnxprune.models import zoo
    from scipy.stats import spearmanr

    tp = _tp()
    an = analyze_model(str(zoo.export(arch, "legacy", bn="unfused", input_size=size)), REGISTRY)
    cg, groups = an.cg, prunable(an)
    model = zoo.build_model(arch, input_size=size).double()
    inits = {i.name: numpy_helper.to_array(i) for i in an.model.graph.initializer}
    for k, v in model.state_dict().items():  # the premise: the same weights on both sides
        if k in inits and inits[k].dtype == np.float32:
            assert np.array_equal(inits[k], v.float().numpy()), k
    x = np.random.default_rng(0).standard_normal((5, 3, size, size)).astype(np.float32)
    path = tmp_path / "calib.npz"
    np.savez(path, input=x)
    batch = open_calib(an.model, CalibSpec(path=str(path), holdout=0.2)).fit  # 4 samples
    single = open_calib(an.model, CalibSpec(path=str(path), holdout=0.2, samples=2)).fit  # 1 sample
    ours = {}
    for kind, view in (("taylor", batch), ("hessian", single), ("lamp", None), ("fpgm", None)):
        opts = gi.GradOptions(kind)
        req = gi.gradient_request(cg, groups, opts)
        grads = None if req.empty else collect_gradients(an.model, REGISTRY, view, req, device="cpu", dtype=F64,
                                                         batch_size=4)
        ours[kind] = gi.gradient_scores(cg, groups, opts, grads)
        assert not ours[kind].fallback
    xb, x1 = torch.from_numpy(x[batch.indices]).double(), torch.from_numpy(x[single.indices]).double()
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=x1)
    tp_groups = {}
    for g in groups:
        s = _producer_conv(cg, g)
        assert s is not None, g.producers
        mod = model.get_submodule(s.const.rsplit(".", 1)[0])
        tp_groups[g.id] = (s, dg.get_pruning_group(mod, tp.prune_conv_out_channels, idxs=list(range(mod.out_channels))))
    theirs: dict[str, dict[int, np.ndarray]] = {k: {} for k in ours}
    model.zero_grad()
    out = model(xb)
    torch.nn.functional.cross_entropy(out, out.argmax(1).detach(), reduction="sum").backward()
    for kind, imp in (("taylor", tp.importance.TaylorImportance()), ("lamp", tp.importance.LAMPImportance()),
                      ("fpgm", tp.importance.FPGMImportance())):
        for gid, (_, tg) in tp_groups.items():
            theirs[kind][gid] = imp(tg).detach().numpy()
    hess = tp.importance.HessianImportance()
    model.zero_grad()
    out = model(x1)
    for loss in torch.nn.functional.cross_entropy(out, out.argmax(1).detach(), reduction="none"):
        model.zero_grad()
        loss.backward(retain_graph=True)
        hess.accumulate_grad(model)
    for gid, (_, tg) in tp_groups.items():
        theirs["hessian"][gid] = hess(tg).detach().numpy()
    result: dict[str, list[float]] = {k: [] for k in ours}
    for kind in ours:
        for g in groups:
            s, _ = tp_groups[g.id]
            mine = ours[kind].scores[g.id][cg.unit_index(g, s.space)]  # per channel of the producer
            ref = theirs[kind][g.id]
            if kind in ("taylor", "hessian"):
                result[kind].append(float(spearmanr(mine, ref).statistic))
            else:
                k = int(np.floor(len(mine) * 0.3))
                same = set(np.argsort(mine, kind="stable")[:k]) == set(np.argsort(ref, kind="stable")[:k])
                result[kind].append(float(same))
    return result


def _check_parity(res: dict[str, list[float]], groups: int) -> None:
    print({k: (min(v), len(v)) for k, v in res.items()})
    for kind in ("taylor", "hessian"):
        assert len(res[kind]) == groups and min(res[kind]) >= 0.99, (kind, res[kind])
    for kind in ("lamp", "fpgm"):
        assert all(v == 1.0 for v in res[kind]), (kind, res[kind])


def test_parity_with_torch_pruning_resnet18_small(tmp_path):
    """resnet18 at 32 px (the default run; the 224 px runs are marked slow)."""
    _check_parity(_parity(tmp_path, "resnet18", 32), 12)


@pytest.mark.slow
@pytest.mark.parametrize(("arch", "groups"), [("resnet18", 12), ("mobilenet_v2", 25)])
def test_parity_with_torch_pruning(tmp_path, arch, groups):
    _check_parity(_parity(tmp_path, arch, 224), groups)


@pytest.mark.slow
def test_parity_with_torch_pruning_mobilenet_v2_small(tmp_path):
    _check_parity(_parity(tmp_path, "mobilenet_v2", 64), 25)
