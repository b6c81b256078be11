"""Transformers: MLP hidden units (--ratio), whole heads (--head-ratio) and head dimensions
(--head-dim-ratio) of a small BERT-style encoder exported with both exporters; planted dead units and
heads are exactly what L2 removes; stream-width pruning is approximate and says so.

Slow: torchvision vit_b_16 and swin_t (both exporters) and all-MiniLM-L6-v2 (real weights from
shared/real-models/fetch.sh; skipped when it cannot be fetched)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torchvision")

from onnxprune.models import transformers as T  # noqa: E402
from onnxprune.models import zoo  # noqa: E402

from onnxprune import pipeline  # noqa: E402
from onnxprune.ir.tensors import ConstantTable  # noqa: E402
from onnxprune.planning.options import PlanOptions  # noqa: E402
from onnxprune.testing import checks  # noqa: E402

EXPORTERS = ("legacy", "dynamo")
# the small encoder of the fast tests: 2 layers, 4 heads of 16, MLP 128
CFG = {"hidden": 64, "heads": 4, "layers": 2, "intermediate": 128, "vocab": 1000}
HEAD_DIM = CFG["hidden"] // CFG["heads"]
CASES = {
    "mlp": {"ratio": 0.5},
    "heads": {"ratio": 0.0, "head_ratio": 0.25},
    "head_dim": {"ratio": 0.0, "head_dim_ratio": 0.25},
}
SHAPES = ((1, 7), (4, 16), (1, 16), (4, 7))  # (batch, seq)


# ---------------------------------------------------------------------------------------------- helpers


def token_feeds(vocab: int) -> list[dict[str, np.ndarray]]:
    return [T.example_tokens(b, s, vocab, seed=10 + b + s) for b, s in SHAPES]


def check_pruned(res, feeds_list: list[dict[str, np.ndarray]], tol: float = 1e-4) -> None:
    """``checks.assert_matches_masked`` (verification passed and exact; full checker; the pruned model
    runs on every feed with the original's output shapes and equals the masked original there; MACs
    dropped). Prints one FIGURES line (-s)."""
    errors = checks.assert_matches_masked(res, feeds_list, tol)
    v = res.verification
    print(f"\nFIGURES verify rel_error {max(o.rel_error for o in v.outputs):.2e} fidelity "
          f"{max(o.fidelity for o in v.outputs):.3e} | MACs {res.before.macs} -> {res.after.macs} "
          f"({100 * (res.after.macs / res.before.macs - 1):+.1f}%) | params {res.before.params} -> "
          f"{res.after.params} | groups pruned {len(res.plan.pruned())} | pruned vs masked at "
          + ", ".join(f"{'x'.join(map(str, s))}: {e:.1e}" for s, e in errors))


def linear_weights(model) -> dict[str, np.ndarray]:
    """Every nn.Linear weight of a torch model as [out, in] float32 arrays, by module name."""
    return {n: m.weight.detach().numpy().copy() for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear)}


def plan_by_linear(res, weights: dict[str, np.ndarray]) -> dict[str, dict]:
    """Plan-JSON entries of the pruned groups keyed by the torch Linear whose weight is the group's anchor (the
    anchor constant, its channel axis moved first, equals the Linear's [out, in] weight); each entry
    also gets the pruned anchor constant (channel axis first) as ``pruned``."""
    consts = ConstantTable.of(res.analysis.model.graph)
    pconsts = ConstantTable.of(res.pruned.graph)
    out = {}
    for entry in res.plan.to_json(res.analysis.cg)["groups"]:
        if entry["kept_units"] == entry["units"]:
            continue
        name, axis = entry["anchor"]["tensor"], entry["anchor"]["axis"]
        value = np.moveaxis(consts.get(name), axis, 0)
        owner = [k for k, w in weights.items() if w.shape == value.shape and np.array_equal(w, value)]
        assert len(owner) == 1, (name, value.shape, owner)
        out[owner[0]] = {**entry, "pruned": np.moveaxis(pconsts.get(name), axis, 0)}
    return out


def find_weight(model: onnx.ModelProto, expected: np.ndarray) -> bool:
    """Some constant of ``model`` equals ``expected`` or its transpose."""
    consts = ConstantTable.of(model.graph)
    for name in consts.names():
        v = consts.get(name)
        if v is None or v.ndim != 2:
            continue
        if (v.shape == expected.shape and np.array_equal(v, expected)) or (
                v.shape == expected.T.shape and np.array_equal(v, expected.T)):
            return True
    return False


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def tf_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("transformers")


@pytest.fixture(scope="session")
def bert_model():
    return T.build_bert(**CFG)


@pytest.fixture(scope="session", params=EXPORTERS)
def bert_onnx(request, tf_cache):
    return request.param, T.export_bert(request.param, cache_dir=tf_cache, **CFG)


# ---------------------------------------------------------------------------------------------- fast


def test_bert_export_is_dynamic_and_matches_torch(bert_onnx, bert_model):
    exporter, path = bert_onnx
    m = onnx.load(str(path))
    for vi in m.graph.input:
        dims = vi.type.tensor_type.shape.dim
        assert [d.HasField("dim_value") for d in dims] == [False, False], (exporter, vi.name, dims)
    assert zoo.load_meta(path)["dynamic_batch"] is True
    for feeds in token_feeds(CFG["vocab"])[:2]:
        (y,) = checks.run(m, feeds)
        with torch.no_grad():
            ref = bert_model(*(torch.from_numpy(feeds[n]) for n in T.BERT_INPUTS)).numpy()
        assert y.shape == ref.shape
        assert checks.rel_err(y, ref) < 1e-5


@pytest.mark.parametrize("case", list(CASES))
def test_prune_bert(bert_onnx, bert_model, case):
    exporter, path = bert_onnx
    feeds_list = token_feeds(CFG["vocab"])
    res = pipeline.run(str(path), PlanOptions(importance="l2", **CASES[case]), verify=True, ep="cpu",
                       input_arrays=T.example_tokens(2, 12, CFG["vocab"], seed=3))
    check_pruned(res, feeds_list)
    weights = linear_weights(bert_model)
    groups = plan_by_linear(res, weights)
    n_layers = CFG["layers"]
    for i in range(n_layers):
        att = f"layers.{i}.attention"
        if case == "mlp":
            g = groups[f"layers.{i}.intermediate"]
            assert (g["units"], g["kept_units"]) == (CFG["intermediate"], CFG["intermediate"] // 2)
            keep = np.asarray(g["keep"])
            np.testing.assert_array_equal(g["pruned"], weights[f"layers.{i}.intermediate"][keep])
            assert find_weight(res.pruned, weights[f"layers.{i}.output"][:, keep])
            assert not any(k.startswith(att) for k in groups)  # attention is never pruned by --ratio
        elif case == "heads":
            (name, g), = [(k, v) for k, v in groups.items() if k.startswith(att)]
            assert (g["units"], g["kept_units"]) == (CFG["heads"], CFG["heads"] - 1)
            keep = np.asarray(g["keep"])
            heads = np.unique(keep // HEAD_DIM)
            assert len(heads) == CFG["heads"] - 1 and len(keep) == len(heads) * HEAD_DIM
            np.testing.assert_array_equal(keep, (heads[:, None] * HEAD_DIM + np.arange(HEAD_DIM)).ravel())
            for proj in ("query", "key", "value"):  # q/k/v rows of the removed head are gone
                assert find_weight(res.pruned, weights[f"{att}.{proj}"][keep]), proj
            assert find_weight(res.pruned, weights[f"{att}.output"][:, keep])
            assert not any(k.startswith(f"layers.{i}.intermediate") for k in groups)
        else:
            att_groups = {k: v for k, v in groups.items() if k.startswith(att)}
            assert len(att_groups) == 2, sorted(att_groups)  # q/k positions, v/out positions
            for g in att_groups.values():
                keep = np.asarray(g["keep"])
                assert (g["units"], g["kept_units"]) == (HEAD_DIM, HEAD_DIM - HEAD_DIM // 4)
                pos = keep.reshape(CFG["heads"], -1) % HEAD_DIM  # the same positions in every head
                assert (pos == pos[0]).all()
            qk = next(v for k, v in att_groups.items() if k.endswith(("query", "key")))
            vo = next(v for k, v in att_groups.items() if k.endswith("value"))
            for proj in ("query", "key"):
                assert find_weight(res.pruned, weights[f"{att}.{proj}"][np.asarray(qk["keep"])]), proj
            assert find_weight(res.pruned, weights[f"{att}.value"][np.asarray(vo["keep"])])
            assert find_weight(res.pruned, weights[f"{att}.output"][:, np.asarray(vo["keep"])])


def _plant_dead_mlp(model, ratio: float, seed: int) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    dead = {}
    with torch.no_grad():
        for i, layer in enumerate(model.layers):
            n = layer.intermediate.out_features
            idx = np.sort(rng.choice(n, size=int(n * ratio), replace=False))
            layer.intermediate.weight[idx] = 0
            layer.intermediate.bias[idx] = 0
            layer.output.weight[:, idx] = 0
            dead[i] = idx
    return dead


def _plant_dead_heads(model, heads_per_layer: dict[int, list[int]]) -> None:
    with torch.no_grad():
        for i, heads in heads_per_layer.items():
            att = model.layers[i].attention
            d = att.head_dim
            for h in heads:
                rows = slice(h * d, (h + 1) * d)
                for lin in (att.query, att.key, att.value):  # Linear weight [out, in]: a head's rows
                    lin.weight[rows] = 0
                    lin.bias[rows] = 0
                att.output.weight[:, rows] = 0  # the output projection's input columns


PLANT_EXPORTERS = ["legacy", pytest.param("dynamo", marks=pytest.mark.slow)]


@pytest.mark.parametrize("exporter", PLANT_EXPORTERS)
def test_planted_dead_mlp_units_are_removed(tmp_path, exporter):
    model = T.build_bert(**CFG, seed=1)
    dead = _plant_dead_mlp(model, 0.5, seed=7)
    path = tmp_path / "planted_mlp.onnx"
    T.export_bert_module(model, exporter, path)
    feeds = T.example_tokens(3, 11, CFG["vocab"], seed=4)
    res = pipeline.run(str(path), PlanOptions(ratio=0.5, importance="l2"), verify=True, ep="cpu",
                       input_arrays=feeds)
    check_pruned(res, token_feeds(CFG["vocab"])[:2])
    groups = plan_by_linear(res, linear_weights(model))
    for i, idx in dead.items():
        g = groups[f"layers.{i}.intermediate"]
        removed = np.setdiff1d(np.arange(g["units"]), g["keep"])
        np.testing.assert_array_equal(removed, idx)
    for f in [feeds, *token_feeds(CFG["vocab"])[:2]]:
        (p,), (o,) = checks.run(res.pruned, f), checks.run(str(path), f)
        assert checks.rel_err(p, o) < 1e-5


@pytest.mark.parametrize("exporter", PLANT_EXPORTERS)
def test_planted_dead_heads_are_removed(tmp_path, exporter):
    model = T.build_bert(**CFG, seed=2)
    planted = {0: [2], 1: [0]}
    _plant_dead_heads(model, planted)
    path = tmp_path / "planted_heads.onnx"
    T.export_bert_module(model, exporter, path)
    feeds = T.example_tokens(3, 11, CFG["vocab"], seed=5)
    res = pipeline.run(str(path), PlanOptions(ratio=0.0, head_ratio=0.25, importance="l2"), verify=True,
                       ep="cpu", input_arrays=feeds)
    check_pruned(res, token_feeds(CFG["vocab"])[:2])
    groups = plan_by_linear(res, linear_weights(model))
    for i, heads in planted.items():
        (g,) = [v for k, v in groups.items() if k.startswith(f"layers.{i}.attention")]
        kept_heads = np.unique(np.asarray(g["keep"]) // HEAD_DIM)
        assert sorted(set(range(CFG["heads"])) - set(kept_heads.tolist())) == heads
    for f in [feeds, *token_feeds(CFG["vocab"])[:2]]:
        (p,), (o,) = checks.run(res.pruned, f), checks.run(str(path), f)
        assert checks.rel_err(p, o) < 1e-5


def test_stream_width_is_approximate(tf_cache, tmp_path, run_main):
    """The residual stream (mixed by LayerNorm) prunes only with --allow-approximate and is never exact.
    A final Linear after the pooling keeps the stream off the graph output."""
    path = T.export_bert("legacy", cache_dir=tf_cache, out_features=16, **CFG)
    np.save(tmp_path / "ids.npy", T.example_tokens(2, 9, CFG["vocab"], seed=6)["input_ids"])
    np.save(tmp_path / "mask.npy", T.example_tokens(2, 9, CFG["vocab"], seed=6)["attention_mask"])
    out, report = tmp_path / "stream.onnx", tmp_path / "report.json"
    r = run_main("prune", path, "-o", out, "--ratio", "0.25", "--allow-approximate", "--verify", "--ep", "cpu",
                 "--report", report, "--input", f"input_ids={tmp_path / 'ids.npy'}",
                 "--input", f"attention_mask={tmp_path / 'mask.npy'}")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "APPROXIMATE" in r.stdout
    js = json.loads(report.read_text())
    v = js["verification"]
    assert v["exact"] is False and v["passed"] is True
    for o in v["outputs"]:
        assert np.isfinite(o["fidelity_rel_error"]) and o["fidelity_rel_error"] > 0
    stream = [g for g in js["plan"]["groups"] if g["approximate"]]
    assert len(stream) == 1 and (stream[0]["units"], stream[0]["kept_units"]) == (64, 48)
    pruned = onnx.load(str(out))
    onnx.checker.check_model(pruned, full_check=True)
    for feeds in token_feeds(CFG["vocab"])[:2]:
        (p,), (o,) = checks.run(pruned, feeds), checks.run(str(path), feeds)
        assert p.shape == o.shape and np.isfinite(p).all()


# ---------------------------------------------------------------------------------------------- slow: torchvision


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("arch", T.VISION_ARCHS)
def test_prune_vision(arch, exporter, case):
    path = T.export_vision(arch, exporter)
    dynamic = zoo.load_meta(path)["dynamic_batch"]
    res = pipeline.run(str(path), PlanOptions(importance="l2", **CASES[case]), verify=True, ep="cpu")
    rng = np.random.default_rng(0)
    feeds = [{"input": rng.standard_normal((b, 3, 224, 224)).astype(np.float32)} for b in ((1, 4) if dynamic else (1,))]
    check_pruned(res, feeds)
    assert any(gp.removed for gp in res.plan.pruned())
    attn = [gp for gp in res.plan.pruned() if res.analysis.cg.groups[gp.group].attention]
    assert bool(attn) == (case != "mlp")


@pytest.mark.slow
def test_vision_stream_width_is_approximate():
    """vit_b_16's residual stream (LayerNorm-mixed, off the output through the head) at 0.25 with
    allow_approximate: runs, keeps the output shape, reports fidelity, never claims to be exact."""
    path = T.export_vision("vit_b_16", "legacy")
    res = pipeline.run(str(path), PlanOptions(ratio=0.25, allow_approximate=True), verify=True, ep="cpu")
    js = res.to_json()["verification"]
    assert js["exact"] is False and js["passed"] is True
    assert any(gp.approximate and gp.removed for gp in res.plan.pruned())
    onnx.checker.check_model(res.pruned, full_check=True)
    x = {"input": np.random.default_rng(1).standard_normal((4, 3, 224, 224)).astype(np.float32)}
    (p,), (o,) = checks.run(res.pruned, x), checks.run(res.analysis.model, x)
    assert p.shape == o.shape and np.isfinite(p).all()
    print(f"\nFIGURES stream fidelity {max(o['fidelity_rel_error'] for o in js['outputs']):.3e} | MACs "
          f"{res.before.macs} -> {res.after.macs} ({100 * (res.after.macs / res.before.macs - 1):+.1f}%)")


# ---------------------------------------------------------------------------------------------- slow: MiniLM

MINILM_SENTENCES = ["A man is eating food.", "A man is eating a piece of bread.", "The girl is carrying a baby.",
                    "A man is riding a horse.", "Naïve café-goers don't pre-order; they improvise!"]


@pytest.fixture(scope="session")
def minilm_dir():
    try:
        return T.fetch_minilm()
    except T.FetchError as exc:
        pytest.skip(f"all-MiniLM-L6-v2 not available (offline?): {exc}")


def _minilm_feeds(tok, batch: int, seq: int) -> dict[str, np.ndarray]:
    """Real tokens, ``[batch, seq]``; row r holds seq - 2r tokens (at least 3), the rest padding."""
    body = tok.encode(" ".join(MINILM_SENTENCES * 8))[1:-1]
    ids = np.full((batch, seq), tok.pad, dtype=np.int64)
    mask = np.zeros((batch, seq), dtype=np.int64)
    for r in range(batch):
        n = max(3, seq - 2 * r)
        ids[r, :n] = [tok.cls, *body[r: r + n - 2], tok.sep]
        mask[r, :n] = 1
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.network
@pytest.mark.slow
def test_minilm_loads_and_embeds(minilm_dir):
    tok = T.minilm_tokenizer(minilm_dir)
    assert tok.encode("Naïve café, don't!") == [tok.vocab[t] for t in
                                                ("[CLS]", "naive", "cafe", ",", "don", "'", "t", "!", "[SEP]")]
    model = T.load_minilm(minilm_dir)
    feeds = tok(MINILM_SENTENCES)
    with torch.no_grad():
        emb = model(*(torch.from_numpy(feeds[n]) for n in T.BERT_INPUTS)).numpy()
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    # sentence-transformers' documented example: 0.7553 for these two sentences
    assert abs(float(emb[0] @ emb[1]) - 0.7553) < 2e-3
    for exporter in EXPORTERS:
        e = T.sentence_embeddings(T.export_minilm(exporter, model_dir=minilm_dir), feeds)
        assert np.abs(e - emb).max() < 1e-4, exporter


@pytest.mark.network
@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("exporter", EXPORTERS)
def test_prune_minilm(minilm_dir, exporter, case):
    tok = T.minilm_tokenizer(minilm_dir)
    path = T.export_minilm(exporter, model_dir=minilm_dir)
    res = pipeline.run(str(path), PlanOptions(importance="l2", **CASES[case]), verify=True, ep="cpu",
                       input_arrays=tok(MINILM_SENTENCES))
    check_pruned(res, [_minilm_feeds(tok, b, s) for b, s in SHAPES[:2]])
    pruned_attn = [gp for gp in res.plan.pruned() if res.analysis.cg.groups[gp.group].attention]
    assert len(pruned_attn) == {"mlp": 0, "heads": 6, "head_dim": 12}[case]


@pytest.mark.network
@pytest.mark.slow
def test_minilm_planted_dead_heads(minilm_dir, tmp_path):
    """Real weights: three planted dead heads per layer (of 12) are exactly those L2 removes at 0.25."""
    model = T.load_minilm(minilm_dir)
    planted = {i: sorted({(3 * i) % 12, (3 * i + 5) % 12, (3 * i + 7) % 12}) for i in range(6)}
    _plant_dead_heads(model, planted)
    path = tmp_path / "minilm_planted.onnx"
    T.export_bert_module(model, "legacy", path)
    tok = T.minilm_tokenizer(minilm_dir)
    feeds = tok(MINILM_SENTENCES)
    res = pipeline.run(str(path), PlanOptions(ratio=0.0, head_ratio=0.25, importance="l2"), verify=True,
                       ep="cpu", input_arrays=feeds)
    check_pruned(res, [])
    groups = plan_by_linear(res, linear_weights(model))
    for i, heads in planted.items():
        (g,) = [v for k, v in groups.items() if k.startswith(f"layers.{i}.attention")]
        kept = set((np.asarray(g["keep"]) // 32).tolist())
        assert sorted(set(range(12)) - kept) == heads
    (p,), (o,) = checks.run(res.pruned, feeds), checks.run(str(path), feeds)
    assert checks.rel_err(p, o) < 1e-5
