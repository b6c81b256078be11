"""Stripe pruning (issue 12) across the model zoo, through the command line (slow: ``-m slow``).

1. Planted dead stripes in ResNet-18 and ResNet-50 from both exporters (ResNet-18 legacy runs by
   default in ``test_stripes_cli.py``): exactly the planted stripes go, kernels shrink to the bounding
   boxes of the live stripes (computed here from the planted mask, not with the package's helpers),
   and the pruned model equals the planted one.
2. Every zoo architecture with K×K convs, both exporters: ``--stripe-ratio 0.5`` verifies, passes the
   full checker and cuts the K×K conv MACs by at least 40%; the report's MAC figures are recounted
   from the ONNX files (weight shapes, output sizes from onnx shape inference).

Equality is judged by relative error (max |a - b| / max |b|) on random inputs run with onnxruntime."""

from __future__ import annotations

import json
import pathlib
import re
from collections import Counter

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from onnxprune.models import zoo

from onnxprune.planning.stripes import stripe_convs
from onnxprune.testing import checks

REL = 1e-5
PLANTED = [(a, e) for e in zoo.EXPORTERS for a in ("resnet18", "resnet50") if (a, e) != ("resnet18", "legacy")]
ALL = [(a, e) for e in zoo.EXPORTERS for a in zoo.ARCHS]

Box = tuple[int, int, int, int]


# ------------------------------------------------------------------------------------------------
# helpers (the tests directory is not a package: these follow tests/test_stripes_cli.py's, adapted)


def weights(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in model.graph.initializer}


def feeds_for(src: pathlib.Path, seed: int = 3) -> dict[str, np.ndarray]:
    """Random images for a zoo export: batch 2 where its batch is dynamic, else 1."""
    batch = 2 if zoo.load_meta(src).get("dynamic_batch", True) else 1
    shape = (batch, 3, 224, 224)
    return {zoo.INPUT_NAME: np.random.default_rng(seed).standard_normal(shape).astype(np.float32)}


def stem_key(model: onnx.ModelProto) -> str:
    """The ResNet stem, found by its 7x7 kernel (the dynamo exporter names it ``node_Conv_N``)."""
    (key,) = [c.key for c in stripe_convs(model)[0] if c.shape[2:] == (7, 7)]
    return key


def plant(src: pathlib.Path, dst: pathlib.Path, how: str, seed: int = 0) -> dict[str, np.ndarray]:
    """Copy ``src`` to ``dst`` with dead stripes planted in every 3x3 conv; returns {conv key: dead
    mask [F, 3, 3]}. ``rows``: kernel row 0 or 2 (alternating conv by conv) dead in every filter;
    ``random``: three of each filter's nine stripes (a third of the conv's, what ``--stripe-ratio 1/3``
    removes), at random positions."""
    m = onnx.load(str(src))
    rng = np.random.default_rng(seed)
    inits = weights(m)
    dead: dict[str, np.ndarray] = {}
    for c in stripe_convs(m)[0]:
        if c.shape[2:] != (3, 3):
            continue
        w = numpy_helper.to_array(inits[c.weight_name]).copy()
        d = np.zeros((w.shape[0], 3, 3), dtype=bool)
        if how == "rows":
            d[:, 0 if len(dead) % 2 else 2, :] = True
        else:
            for f in range(w.shape[0]):
                d[f].flat[rng.choice(9, size=3, replace=False)] = True
        w[np.broadcast_to(d[:, None], w.shape)] = 0.0
        inits[c.weight_name].CopyFrom(numpy_helper.from_array(w, c.weight_name))
        dead[c.key] = d
    onnx.save(m, str(dst))
    return dead


def live_box(live: np.ndarray) -> Box:
    """(r0, r1, c0, c1), inclusive, of the True entries of one filter's [K, K'] mask."""
    rows, cols = np.flatnonzero(live.any(axis=1)), np.flatnonzero(live.any(axis=0))
    return int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1])


def kernel_of(box: Box) -> tuple[int, int]:
    return box[1] - box[0] + 1, box[3] - box[2] + 1


def built_convs(model: onnx.ModelProto, key: str) -> list[onnx.NodeProto]:
    """The Convs the shrink built from conv ``key``: named ``key`` (one crop) or ``key__boxI`` (a split)."""
    pat = re.compile(rf"^{re.escape(key)}(__box\d+_*)?$")
    return [n for n in model.graph.node if n.op_type == "Conv" and pat.match(n.name)]


def stripe_report(path: pathlib.Path) -> dict:
    return json.loads(path.read_text())["stripes"]


def conv_macs(model: onnx.ModelProto) -> dict[str, int]:
    """{Conv node name: MACs per sample}, from its weight's shape and its output's shape: inferred by
    onnx shape inference, or where that leaves a size unknown (a Reshape whose shape is computed, as in
    ShuffleNet's channel shuffle from the legacy exporter) observed on one image with onnxruntime."""
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    known = {v.name: v.type.tensor_type.shape.dim for v in [*inferred.graph.value_info, *inferred.graph.output]}
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    sizes: dict[str, tuple[int, ...]] = {}
    for n in convs:
        dims = known.get(n.output[0], [])
        if dims and all(d.HasField("dim_value") for d in dims[1:]):
            sizes[n.output[0]] = tuple(d.dim_value for d in dims[1:])
    missing = [n.output[0] for n in convs if n.output[0] not in sizes]
    if missing:
        probe = onnx.ModelProto()
        probe.CopyFrom(model)
        probe.graph.output.extend(onnx.helper.make_empty_tensor_value_info(t) for t in missing)
        image = [1, *(d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:])]
        x = np.zeros(image, dtype=np.float32)
        ys = checks.run(probe, {zoo.INPUT_NAME: x})[len(model.graph.output):]
        sizes.update({t: y.shape[1:] for t, y in zip(missing, ys, strict=True)})
    inits = weights(model)
    out: dict[str, int] = {}
    for n in convs:
        _, cin_per_group, *kernel = inits[n.input[1]].dims
        out[n.name] = int(np.prod(sizes[n.output[0]])) * int(cin_per_group) * int(np.prod(kernel))
    return out


# ------------------------------------------------------------------------------------------------
# 1. planted dead stripes


def _prune_planted(arch, exporter, how, tmp_path, run_main):
    src = zoo.export(arch, exporter)
    planted = tmp_path / "planted.onnx"
    dead = plant(src, planted, how)
    stem = stem_key(onnx.load(str(src)))
    out, rep, plan = tmp_path / "p.onnx", tmp_path / "r.json", tmp_path / "plan.json"
    r = run_main("prune", planted, "-o", out, "--stripe-ratio", str(1 / 3),
                 "--stripe-shape", "box" if how == "rows" else "free", "--stripe-gate", "off",
                 "--ignore", f"^{re.escape(stem)}$", "--ep", "cpu", "--verify", "--report", rep,
                 "--save-plan", plan)
    assert r.returncode == 0, r.stdout + r.stderr
    onnx.checker.check_model(str(out), full_check=True)
    s = stripe_report(rep)
    assert s["skipped"][stem].startswith("ignored by --ignore"), s["skipped"].get(stem)
    assert s["verification"]["passed"]
    # exactly the planted stripes go: the plan keeps every live stripe and nothing else
    keep = {k: np.array(c["keep"], dtype=bool) for k, c in json.loads(plan.read_text())["stripes"]["convs"].items()}
    assert set(keep) == set(dead)
    for key, d in dead.items():
        assert np.array_equal(keep[key], ~d), key
    assert s["stripes_removed"] == sum(int(d.sum()) for d in dead.values())
    # the pruned model computes what the planted one does
    f = feeds_for(src)
    err = checks.rel_err(checks.run(out, f)[0], checks.run(planted, f)[0])
    assert err <= REL, f"relative error {err:.3e}"
    return dead, {c["key"]: c for c in s["shrink"]["convs"]}, onnx.load(str(out))


def _boxes_by_filter(d: np.ndarray) -> list[Box]:
    return [live_box(~d[f]) for f in range(d.shape[0])]


def _live_stripes(model: onnx.ModelProto, nodes: list[onnx.NodeProto]) -> int:
    inits = weights(model)
    return sum(int((np.abs(numpy_helper.to_array(inits[n.input[1]])).sum(axis=1) > 0).sum()) for n in nodes)


@pytest.mark.slow
@pytest.mark.parametrize(("arch", "exporter"), PLANTED)
def test_planted_rows_shrink_to_2x3(arch, exporter, tmp_path, run_main):
    dead, recs, out = _prune_planted(arch, exporter, "rows", tmp_path, run_main)
    for key, d in dead.items():
        want = Counter(_boxes_by_filter(d))
        assert len(want) == 1 and kernel_of(next(iter(want))) == (2, 3)  # the planting itself
        rec = recs[key]
        assert Counter({tuple(b["box"]): b["filters"] for b in rec["boxes"]}) == want, key
        assert rec["shrunk"] and not rec["split"], rec
        nodes = built_convs(out, key)
        assert [tuple(weights(out)[n.input[1]].dims[2:]) for n in nodes] == [(2, 3)], key
        assert _live_stripes(out, nodes) == int((~d).sum()), key


@pytest.mark.slow
@pytest.mark.parametrize(("arch", "exporter"), PLANTED)
def test_planted_random_free_shrinks_per_filter(arch, exporter, tmp_path, run_main):
    dead, recs, out = _prune_planted(arch, exporter, "random", tmp_path, run_main)
    inits = weights(out)
    smaller = 0
    for key, d in dead.items():
        boxes = _boxes_by_filter(d)
        want = Counter(boxes)
        rec = recs[key]
        assert Counter({tuple(b["box"]): b["filters"] for b in rec["boxes"]}) == want, key
        nodes = built_convs(out, key)
        got = Counter()
        for n in nodes:
            dims = inits[n.input[1]].dims
            got[(dims[2], dims[3])] += dims[0]
        if rec["split"]:  # one Conv per distinct box, each with that box's kernel
            by_kernel = Counter()
            for b, n in want.items():
                by_kernel[kernel_of(b)] += n
            assert len(nodes) == len(want) and got == by_kernel, key
            smaller += sum(n for b, n in want.items() if kernel_of(b) != (3, 3))
        else:  # no new channel order here: one Conv cropped to the union of the boxes, or left dense
            union = (min(b[0] for b in boxes), max(b[1] for b in boxes), min(b[2] for b in boxes),
                     max(b[3] for b in boxes))
            assert rec["reason"], rec
            assert got == Counter({kernel_of(union): d.shape[0]}), (key, rec["reason"])
        # free shape: the dead stripes inside a box stay as zeros; every live one is kept as it was
        assert _live_stripes(out, nodes) == int((~d).sum()), key
    assert smaller > 0, "no filter got a smaller kernel"


# ------------------------------------------------------------------------------------------------
# 2. the whole zoo at --stripe-ratio 0.5

_PRUNED: dict[tuple[str, str], tuple[pathlib.Path, pathlib.Path, dict]] = {}


def _prune_zoo(arch, exporter, tmp_path, run_main) -> tuple[pathlib.Path, pathlib.Path, dict]:
    """(source, pruned file, stripe report) of ``arch`` at ``--stripe-ratio 0.5``, pruned once per run."""
    if (arch, exporter) in _PRUNED:
        return _PRUNED[arch, exporter]
    src = zoo.export(arch, exporter)
    if not stripe_convs(onnx.load(str(src)))[0]:
        pytest.skip(f"{arch} has no K×K convs")
    out, rep = tmp_path / "s.onnx", tmp_path / "r.json"
    r = run_main("prune", src, "-o", out, "--stripe-ratio", "0.5", "--stripe-gate", "off", "--ep", "cpu",
                 "--verify", "--report", rep)
    assert r.returncode == 0, r.stdout + r.stderr
    _PRUNED[arch, exporter] = src, out, stripe_report(rep)
    return _PRUNED[arch, exporter]


@pytest.mark.slow
@pytest.mark.parametrize(("arch", "exporter"), ALL)
def test_zoo_stripes_half(arch, exporter, tmp_path, run_main):
    _, out, s = _prune_zoo(arch, exporter, tmp_path, run_main)
    onnx.checker.check_model(str(out), full_check=True)
    assert s["verification"]["passed"], s["verification"]
    macs = s["kxk_conv_macs"]
    assert macs["counted"] == "physical"
    assert macs["after"] <= 0.6 * macs["before"], f"K×K conv MACs only dropped {1 - macs['after'] / macs['before']:.1%}"


@pytest.mark.slow
@pytest.mark.parametrize(("arch", "exporter"), ALL)
def test_zoo_stripes_macs_recounted(arch, exporter, tmp_path, run_main):
    """The report's K×K MACs, recounted from the files: the planned convs' MACs in the source, those of
    the Convs built from them in the output; every other Conv is unchanged."""
    src, out, s = _prune_zoo(arch, exporter, tmp_path, run_main)
    a, b = onnx.load(str(src)), onnx.load(str(out))
    before, after = conv_macs(a), conv_macs(b)
    keys = [c["key"] for c in s["shrink"]["convs"]]
    built = {n.name for k in keys for n in built_convs(b, k)}
    assert sum(before[k] for k in keys) == s["kxk_conv_macs"]["before"]
    assert sum(after[n] for n in built) == s["kxk_conv_macs"]["after"]
    assert {k: v for k, v in before.items() if k not in keys} == {k: v for k, v in after.items() if k not in built}
