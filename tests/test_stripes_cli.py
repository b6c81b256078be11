"""``onnxprune prune --stripe-ratio`` (issue 12) through the command line: planted dead stripes in
torchvision ResNets are found and only they are removed, kernels shrink to the planted boxes, and the
pruned model equals the planted one; mask mode leaves the graph as it is; plans save and load; stripe
and channel pruning compose; refusals are one line with exit 2.

Equality is judged by relative error (max |a - b| / max |b|) on random inputs run with onnxruntime."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnxprune.planning.stripes import stripe_convs
from onnxprune.rewrite.stripes import filter_boxes
from onnxprune.testing.checks import rel_err as rel

REL = 1e-5



def outputs(path, feeds, ort_run):
    return ort_run(str(path), feeds)


def feeds_for(batch: int = 2, size: int = 224, seed: int = 3) -> dict[str, np.ndarray]:
    return {"input": np.random.default_rng(seed).standard_normal((batch, 3, size, size)).astype(np.float32)}


def weights(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in model.graph.initializer}


def plant(src, dst, how: str, seed: int = 0) -> dict[str, np.ndarray]:
    """Copy ``src`` to ``dst`` with dead stripes planted in every 3x3 conv: ``rows``: kernel row 0 or 2
    (alternating by conv) zero in every filter (a third of the stripes); ``random``: a third of each
    conv's stripes (``floor(n/3)``, what ``--stripe-ratio 1/3`` removes) zero at random positions, never
    all of a filter. Returns {conv key: planted dead mask [F, 3, 3]}."""
    m = onnx.load(str(src))
    rng = np.random.default_rng(seed)
    convs, _ = stripe_convs(m)
    inits = weights(m)
    dead: dict[str, np.ndarray] = {}
    for i, c in enumerate(convs):
        if c.shape[2:] != (3, 3):
            continue
        w = numpy_helper.to_array(inits[c.weight_name]).copy()
        f = w.shape[0]
        d = np.zeros((f, 3, 3), dtype=bool)
        if how == "rows":
            d[:, 0 if i % 2 else 2, :] = True
        else:
            n = (f * 9) // 3
            per = np.full(f, n // f)
            per[: n - per.sum()] += 1  # spread the count over filters, at most 8 each
            for k in range(f):
                d[k].flat[rng.choice(9, size=per[k], replace=False)] = True
        w[np.broadcast_to(d[:, None], w.shape)] = 0.0
        inits[c.weight_name].CopyFrom(numpy_helper.from_array(w, c.weight_name))
        dead[c.key] = d
    onnx.save(m, str(dst))
    return dead


def conv_kernels(path) -> dict[str, list[tuple[int, int]]]:
    """{original conv name: kernels of the Convs built from it} (the shrink names them after it)."""
    m = onnx.load(str(path))
    inits = weights(m)
    out: dict[str, list[tuple[int, int]]] = {}
    for n in m.graph.node:
        if n.op_type == "Conv":
            dims = tuple(inits[n.input[1]].dims[2:])
            out.setdefault(n.name, []).append(dims)
    return out


def stripe_report(path) -> dict:
    return json.loads(path.read_text())["stripes"]


@pytest.mark.parametrize("how", ["rows", "random"])
def test_planted_stripes_resnet18(resnet18_onnx, tmp_path, run_main, ort_run, how):
    src = tmp_path / "planted.onnx"
    dead = plant(resnet18_onnx, src, how)
    out, rep = tmp_path / "p.onnx", tmp_path / "r.json"
    shape = ["--stripe-shape", "box"] if how == "rows" else ["--stripe-shape", "free"]
    r = run_main("prune", src, "-o", out, "--stripe-ratio", str(1 / 3), *shape, "--stripe-gate", "off",
                 "--ignore", r"^/conv1/", "--verify", "--report", rep)
    assert r.returncode == 0, r.stdout + r.stderr
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)
    s = stripe_report(rep)
    assert set(s["skipped"]) >= {"/conv1/Conv"}
    plan = json.loads(json.dumps(s))  # the report's per-conv records
    recs = {c["key"]: c for c in plan["shrink"]["convs"]}
    assert set(recs) == set(dead)
    for key, d in dead.items():
        # only the planted stripes go: the boxes kept are the bounding boxes of the live stripes
        want = filter_boxes(~d)
        got = {tuple(b["box"]): b["filters"] for b in recs[key]["boxes"]}
        uniq, counts = np.unique(want, axis=0, return_counts=True)
        assert got == {tuple(int(x) for x in u): int(n) for u, n in zip(uniq, counts, strict=True)}, key
    if how == "rows":  # every 3x3 kernel is now 2x3
        kernels = conv_kernels(out)
        assert all(kernels[k] == [(2, 3)] for k in dead), kernels
    assert s["stripes_removed"] == sum(int(d.sum()) for d in dead.values())
    f = feeds_for()
    assert rel(outputs(out, f, ort_run)[0], outputs(src, f, ort_run)[0]) <= REL


def test_mask_mode_keeps_the_graph(resnet18_onnx, tmp_path, run_main, ort_run):
    out, rep = tmp_path / "m.onnx", tmp_path / "r.json"
    r = run_main("prune", resnet18_onnx, "-o", out, "--stripe-ratio", "0.5", "--stripe-mode", "mask", "--verify",
                 "--report", rep)
    assert r.returncode == 0, r.stdout + r.stderr
    a, b = onnx.load(str(resnet18_onnx)), onnx.load(str(out))
    assert [(n.op_type, list(n.input)) for n in a.graph.node] == [(n.op_type, list(n.input)) for n in b.graph.node]
    wa, wb = weights(a), weights(b)
    zeroed = 0
    for c in stripe_convs(a)[0]:
        x, y = numpy_helper.to_array(wa[c.weight_name]), numpy_helper.to_array(wb[c.weight_name])
        assert x.shape == y.shape
        live = np.abs(y).sum(axis=1) > 0  # [F, K, K']
        assert np.array_equal(y[np.broadcast_to(live[:, None], y.shape)], x[np.broadcast_to(live[:, None], x.shape)])
        assert live.reshape(live.shape[0], -1).any(axis=1).all()  # no filter emptied
        zeroed += int((~live).sum())
        assert (~live).sum() == (live.size * 5) // 10  # the share 0.5, per conv
    s = stripe_report(rep)
    assert s["stripes_removed"] == zeroed and s["kxk_conv_macs"]["counted"] == "kept stripes"
    assert s["verification"]["passed"]


def test_shrink_cuts_kxk_macs_and_plan_replays(resnet18_onnx, tmp_path, run_main, ort_run):
    out, rep, plan = tmp_path / "s.onnx", tmp_path / "r.json", tmp_path / "plan.json"
    r = run_main("prune", resnet18_onnx, "-o", out, "--stripe-ratio", "0.5", "--stripe-gate", "off", "--verify",
                 "--report", rep, "--save-plan", plan)
    assert r.returncode == 0, r.stdout + r.stderr
    s = stripe_report(rep)
    macs = s["kxk_conv_macs"]
    assert macs["counted"] == "physical" and macs["after"] <= 0.6 * macs["before"]
    # MACs of the whole graph drop by what the K×K convs lost (1x1 convs and the FC are untouched)
    st = json.loads(rep.read_text())["stats"]
    assert st["original"]["macs"] - st["pruned"]["macs"] == macs["before"] - macs["after"]
    again = tmp_path / "again.onnx"
    r2 = run_main("prune", resnet18_onnx, "-o", again, "--load-plan", plan, "--stripe-gate", "off", "--verify")
    assert r2.returncode == 0, r2.stdout + r2.stderr
    f = feeds_for(batch=1)
    assert rel(outputs(again, f, ort_run)[0], outputs(out, f, ort_run)[0]) <= REL
    saved = json.loads(plan.read_text())
    assert all(g["kept_units"] == g["units"] for g in saved["groups"]) and saved["stripes"]["shape"] == "box"


def test_stripes_compose_with_channels(resnet18_onnx, tmp_path, run_main):
    out, rep = tmp_path / "c.onnx", tmp_path / "r.json"
    r = run_main("prune", resnet18_onnx, "-o", out, "--ratio", "0.3", "--stripe-ratio", "0.4", "--verify",
                 "--report", rep)
    assert r.returncode == 0, r.stdout + r.stderr
    d = json.loads(rep.read_text())
    assert d["verification"]["passed"] and d["stripes"]["verification"]["passed"]
    assert d["groups"]["pruned"] > 0 and d["stripes"]["stripes_removed"] > 0
    # stripes are counted on the channel-pruned convs: fewer than the original's
    total = sum(int(np.prod(c.shape[:1] + c.shape[2:])) for c in stripe_convs(onnx.load(str(resnet18_onnx)))[0])
    assert d["stripes"]["stripes"] < total


@pytest.mark.parametrize("extra, flag", [(["--target-macs", "0.5"], "--target-macs"), (["--steps", "2"], "--steps"),
                                         (["--soft"], "--soft")])
def test_refusals(resnet18_onnx, tmp_path, run_main, extra, flag):
    out = tmp_path / "x.onnx"
    r = run_main("prune", resnet18_onnx, "-o", out, "--stripe-ratio", "0.5", *extra)
    assert r.returncode == 2
    assert flag in r.stderr and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not out.exists()


@pytest.mark.parametrize("value", ["1.0", "-0.1", "nan"])
def test_bad_stripe_ratio(resnet18_onnx, tmp_path, run_main, value):
    r = run_main("prune", resnet18_onnx, "-o", tmp_path / "x.onnx", f"--stripe-ratio={value}")
    assert r.returncode == 2 and "--stripe-ratio" in r.stderr and "Traceback" not in r.stderr


def test_gate_falls_back_to_one_box_where_a_split_is_slower(resnet18_onnx, monkeypatch):
    """Injected timings (tests never time): every split measures slower than its dense conv, every crop
    faster; the stage then crops those convs to one box each instead of leaving them dense."""
    from onnxprune import pipeline
    from onnxprune.measure.stripes import SplitTiming
    from onnxprune.planning.options import StripeOptions
    from onnxprune.planning.stripes import distinct_boxes

    def fake_gate(model, plan, ep="auto", threads=None, batch=1, repeat=30, *, cg=None, **_):
        return {k: SplitTiming(k, "x", 1.0, 2.0 if distinct_boxes(m) > 1 else 0.5) for k, m in plan.keep.items()}

    monkeypatch.setattr(pipeline, "gate_splits", fake_gate)
    model = onnx.load(str(resnet18_onnx))
    stage = pipeline.run_stripes(model, StripeOptions(ratio=0.5), verify=True)
    assert stage.verification.passed
    assert all(distinct_boxes(m) == 1 for m in stage.plan.keep.values())
    assert all(c.shrunk and not c.split for c in stage.shrink.convs)
    before, after = stage.conv_macs()
    assert after <= 0.6 * before
    # the same options without the gate split some convs: the fallback changed the plan
    free = pipeline.run_stripes(model, StripeOptions(ratio=0.5, gate="off"))
    assert any(distinct_boxes(m) > 1 for m in free.plan.keep.values())


def test_conv_whose_order_cannot_change_gets_one_box(tmp_path, ort_run):
    """A conv feeding a graph output cannot carry a new channel order: its plan is selected with one box
    (a crop) up front, not split and not left at the union of two boxes."""
    from onnx import TensorProto, helper

    from onnxprune import pipeline
    from onnxprune.planning.options import StripeOptions
    from onnxprune.planning.stripes import distinct_boxes

    rng = np.random.default_rng(0)
    w = rng.standard_normal((16, 4, 3, 3)).astype(np.float32)
    w[0::2, :, 2, :] = 0.01 * w[0::2, :, 2, :]  # two interleaved populations: the best plan has two boxes,
    w[1::2, :, :, 2] = 0.01 * w[1::2, :, :, 2]  # whose split would need a new channel order
    g = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1, 1, 1, 1])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 10, 10])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, 10, 10])],
                          [numpy_helper.from_array(w, "w")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    opened = pipeline.run_stripes(m, StripeOptions(ratio=1 / 3, gate="off", mode="mask"))
    assert distinct_boxes(opened.plan.keep["conv"]) == 2  # what the conv would get if it could split
    stage = pipeline.run_stripes(m, StripeOptions(ratio=1 / 3, gate="off"), verify=True)
    assert distinct_boxes(stage.plan.keep["conv"]) == 1
    rec = stage.shrink.conv("conv")
    assert rec.shrunk and not rec.split and rec.built[0].kernel in ((2, 3), (3, 2))
    assert stage.verification.passed
