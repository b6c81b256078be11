"""Tiny random Hugging Face ``transformers`` models (issue 13, "LLM-style graphs"): Llama with
grouped-query attention (whole KV groups and query heads within every KV group), Qwen2, GPT-2, BERT,
the T5 encoder, the Whisper encoder and Wav2Vec2, exported with the dynamo exporter with dynamic batch
and sequence axes (``onnxprune.models.hf``), prune MLP hidden units (--ratio) and attention heads
(--head-ratio) in one run, pass the full ONNX checker and equal their masked originals at three
(batch, sequence) sizes other than the analysed one, by relative error.

What was removed is checked against the config, independently of the analysis: the number of
pruned head and MLP groups, their sizes and removed counts (floor(n * R)), and the parameters the
pruned model lost, computed from the layer shapes a config implies.

Default run: Llama (both GQA units) and GPT-2; the others are ``slow``. The first run exports into
the model cache (``$ONNXPRUNE_CACHE``, else ``~/.cache/onnxprune/zoo``): about a minute per model."""

from __future__ import annotations

import re
import time

import numpy as np
import onnx
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from onnxprune.models import hf  # noqa: E402

from onnxprune import pipeline  # noqa: E402
from onnxprune.measure.verify import masked_original  # noqa: E402
from onnxprune.planning.options import PlanOptions  # noqa: E402
from onnxprune.testing import checks  # noqa: E402

RATIO = 0.25  # MLP: kept units (3/4 of the hidden) differ from every other width of these configs
HEAD_RATIO = 0.5
ANALYSED = (2, 12)  # (batch, sequence) the analysis and the verification run at
SHAPES = ((1, 5), (3, 17), (4, 9))  # (batch, sequence) the pruned model is compared at
# convolutions of the audio front ends are channel groups too; they are left out here so that the
# removed parameters are exactly the MLP's and the heads' (tests/test_zoo_prune.py covers convs)
IGNORE = {"whisper": [r"(?i)conv"], "wav2vec2": [r"(?i)conv"]}


def _seq(arch: str, s: int) -> int:
    return 2 * s if arch == "whisper" else s  # whisper: mel frames, two per encoder position


def expected(arch: str, gqa: str) -> dict:
    """What a config implies: the head unit (and how many of them a layer has), the pruned head and
    MLP groups, and the parameters a removed head unit and a removed MLP unit carry."""
    c = hf.CONFIGS[arch]
    h, heads, kv, inter, layers = c["hidden"], c["heads"], c["kv_heads"], c["intermediate"], c["layers"]
    d = h // heads
    rep = heads // kv
    if arch in ("llama", "qwen2"):
        qb = d if arch == "qwen2" else 0  # Qwen2: q/k/v biases
        q_head = 2 * h * d + qb  # q columns (+ bias), o rows
        kv_head = 2 * (h * d + qb)  # k and v columns (+ biases)
        if gqa == "kv":  # a unit: a KV head and the `rep` query heads of its group
            unit, per_unit = kv, rep * q_head + kv_head
        else:  # a unit: one query-head position in every KV group
            unit, per_unit = rep, kv * q_head
        mlp = 3 * h  # gate and up columns, down rows (no biases)
    else:
        bias = {"gpt2": 3 * d, "bert": 3 * d, "t5": 0, "whisper": 2 * d, "wav2vec2": 3 * d}[arch]
        unit, per_unit = heads, 4 * h * d + bias  # q/k/v columns, o rows, biases (whisper: k has none)
        mlp = 2 * h + (0 if arch == "t5" else 1)
    removed_heads = int(np.floor(unit * HEAD_RATIO))
    removed_mlp = int(np.floor(inter * RATIO))
    # T5: the relative position bias of the first layer ([buckets, heads]) is shared by every layer,
    # so the heads of all layers are one group and the table loses the removed heads' columns
    head_groups = 1 if arch == "t5" else layers
    extra = 32 * removed_heads if arch == "t5" else 0
    params = (layers * removed_mlp * mlp + layers * removed_heads * per_unit + extra)
    return {"unit": unit, "head_groups": head_groups, "removed_heads": removed_heads,
            "inter": inter, "mlp_groups": layers, "removed_mlp": removed_mlp, "params": params}


def feeds_at(arch: str, shapes) -> list[dict[str, np.ndarray]]:
    return [hf.example_inputs(arch, b, _seq(arch, s), seed=20 + b + s) for b, s in shapes]


def assert_corruption_detected(res, feeds) -> None:
    """The comparison can fail: the pruned model with every weight sliced along axis 1 reversed along it
    (kept channels in the wrong places) differs from the masked original by far more than TOL."""
    before = checks.shapes_of(res.analysis.model)
    bad = onnx.ModelProto()
    bad.CopyFrom(res.pruned)
    n = 0
    for init in bad.graph.initializer:
        old = before.get(re.sub(r"__pruned\d+$", "", init.name))
        if init.data_type != onnx.TensorProto.FLOAT or old is None or len(old) != 2 or tuple(init.dims) == old:
            continue
        w = onnx.numpy_helper.to_array(init)
        if w.shape[1] == old[1]:  # only weights sliced along axis 1: a consistent flip of both sides of
            continue  # a group would be a symmetry (a permutation of channels), not a corruption
        axis = 1
        init.CopyFrom(onnx.numpy_helper.from_array(np.flip(w, axis).copy(), init.name))
        n += 1
    assert n, "no sliced weight found"
    masked = masked_original(res.analysis.model, res.analysis.cg, res.plan)
    (m,), (p,) = checks.run(masked, feeds), checks.run(bad, feeds)
    assert checks.rel_err(p, m) > 10 * checks.TOL, checks.rel_err(p, m)


def prune_exactly(arch: str, gqa: str = "kv"):
    t0 = time.perf_counter()
    path = hf.export(arch)
    t_export = time.perf_counter() - t0
    model = onnx.load(str(path))
    for vi in model.graph.input:  # batch and sequence are dynamic in the export
        dims = vi.type.tensor_type.shape.dim
        assert not dims[0].HasField("dim_value") and not dims[-1].HasField("dim_value"), (vi.name, dims)
    torch = pytest.importorskip("torch")
    # the export computes what the torch model computes (up to float reassociation and onnxruntime's
    # Erf/LayerNorm kernels: up to 3e-4 on BERT, Whisper, Wav2Vec2; pruning is compared at 1e-4 below)
    feeds = feeds_at(arch, SHAPES[1:2])[0]
    with torch.no_grad():
        ref = hf.build(arch)(*(torch.from_numpy(feeds[n]) for n in hf.input_names(arch))).numpy()
    (y,) = checks.run(model, feeds)
    assert y.shape == ref.shape and checks.rel_err(y, ref) < 1e-3, (y.shape, ref.shape, checks.rel_err(y, ref))
    opts = PlanOptions(ratio=RATIO, head_ratio=HEAD_RATIO, gqa=gqa, ignore=IGNORE.get(arch, []))
    res = pipeline.run(str(path), opts, verify=True, ep="cpu",
                       input_arrays=feeds_at(arch, [ANALYSED])[0])
    errors = checks.assert_matches_masked(res, feeds_at(arch, SHAPES))  # full checker, exact at 3 sizes
    assert len(errors) == len(SHAPES)

    exp = expected(arch, gqa)
    pruned = res.plan.pruned()
    cg = res.analysis.cg
    heads = [gp for gp in pruned if cg.groups[gp.group].attention]
    mlp = [gp for gp in pruned if not cg.groups[gp.group].attention]
    assert [(gp.size, gp.removed) for gp in heads] == [(exp["unit"], exp["removed_heads"])] * exp["head_groups"], \
        [(gp.size, gp.removed) for gp in heads]
    assert [(gp.size, gp.removed) for gp in mlp] == [(exp["inter"], exp["removed_mlp"])] * exp["mlp_groups"], \
        [(gp.size, gp.removed) for gp in mlp]
    assert res.before.params - res.after.params == exp["params"], (res.before.params, res.after.params, exp)
    assert_corruption_detected(res, feeds_at(arch, SHAPES[:1])[0])
    fid = max(o.fidelity for o in res.verification.outputs)
    print(f"\nFIGURES {arch} gqa={gqa}: groups pruned {len(pruned)} ({len(heads)} head, {len(mlp)} MLP) of "
          f"{len(cg.groups)} | params {res.before.params} -> {res.after.params} | pruned vs masked "
          + ", ".join(f"{'x'.join(map(str, s))}: {e:.1e}" for s, e in errors)
          + f" | fidelity {fid:.2e} | export {t_export:.1f} s, total {time.perf_counter() - t0:.1f} s")
    return res


@pytest.mark.parametrize("gqa", ["kv", "query"])
def test_llama_gqa(gqa):
    res = prune_exactly("llama", gqa)
    c = hf.CONFIGS["llama"]
    assert c["kv_heads"] < c["heads"]  # grouped-query attention, several query heads per KV head
    if gqa == "query":  # the KV projections keep their heads, and say why
        assert any("--gqa query" in r for r in checks.frozen_reasons(res))


def test_gpt2():
    prune_exactly("gpt2")


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["qwen2", "bert", "t5", "whisper", "wav2vec2"])
def test_hf_slow(arch):
    prune_exactly(arch, "query" if arch == "qwen2" else "kv")


@pytest.mark.slow
def test_qwen2_kv_groups():
    prune_exactly("qwen2", "kv")


def test_gqa_option_reaches_the_plan_file():
    opts = PlanOptions(ratio=0.0, head_ratio=0.5, gqa="query")
    assert opts.head_mode == "heads-query"
    assert pipeline.head_mode_for(PlanOptions(), {"options": {"head_ratio": 0.5, "gqa": "query"}}) == "heads-query"
    assert pipeline.head_mode_for(PlanOptions(), {"options": {"head_ratio": 0.5}}) == "heads"
