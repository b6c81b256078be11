"""Dynamic axes stay dynamic (issue 9, causes 1, 2 and 12).

1. ``--input-shape`` fixes the size the model is *analysed* at, never the model: shape computations
   of a dynamic batch or sequence are not folded, and the pruned model equals its masked original at
   batch sizes and sequence lengths it was not analysed at.
2. A value two probe sizes agree on is not proven static: "pad H and W up to a multiple of 32" is 0 at
   224 and at 256 and still computed at 230.
12. The probes run on the ``--input`` arrays; a model that rejects the second probe's sizes is pruned
   (what the probe could not show stays dynamic, and the report says so).
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from onnxprune import pipeline
from onnxprune.planning.options import PlanOptions
from onnxprune.testing.checks import assert_matches_masked, run, run_cli

torch = pytest.importorskip("torch")
nn = torch.nn
F = torch.nn.functional


def _export(module, args, path, names, dynamic_axes, opset=17):
    module.eval()
    torch.onnx.export(module, args, str(path), dynamo=False, opset_version=opset, input_names=names,
                      output_names=["y"], dynamic_axes=dynamic_axes)
    return onnx.load(str(path))


def _prune(model, ratio=0.5, shapes=None, arrays=None):
    res = pipeline.run(model, PlanOptions(ratio=ratio), input_shapes=shapes, input_arrays=arrays, verify=True)
    assert res.plan.pruned(), "nothing pruned: the test would prove nothing"
    return res


def _folded(res) -> list[str]:
    return [c for c in res.analysis.changes if c.startswith("fold_static_shapes: folded")]


# ----------------------------------------------------------------------------------------------
# cause 1: --input-shape freezes nothing


class ViewNet(nn.Module):
    """``x.view(x.size(0), -1)`` after convs: the batch is read from the shape."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.c1, self.c2 = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x):
        x = F.adaptive_avg_pool2d(torch.relu(self.c2(torch.relu(self.c1(x)))), 4)
        return self.fc(x.view(x.size(0), -1))


def test_view_batch_survives_input_shape(tmp_path):
    m = _export(ViewNet(), (torch.randn(2, 3, 16, 16),), tmp_path / "v.onnx", ["x"], {"x": {0: "b"}})
    res = _prune(m, shapes={"x": (2, 3, 16, 16)})
    rng = np.random.default_rng(1)
    feeds = [{"x": rng.standard_normal((b, 3, 16, 16)).astype(np.float32)} for b in (1, 3, 7)]
    assert_matches_masked(res, feeds)
    assert not any("[2, -1]" in c for c in _folded(res)), _folded(res)


def test_view_batch_survives_input_shape_cli(tmp_path):
    _export(ViewNet(), (torch.randn(2, 3, 16, 16),), tmp_path / "v.onnx", ["x"], {"x": {0: "b"}})
    out = tmp_path / "p.onnx"
    r = run_cli("prune", str(tmp_path / "v.onnx"), "-o", str(out), "--ratio", "0.5", "--verify",
                "--input-shape", "x=4x3x16x16")
    assert r.returncode == 0, r.stderr
    for b in (1, 2, 5):
        (y,) = run(out, {"x": np.ones((b, 3, 16, 16), np.float32)})
        assert y.shape == (b, 10)


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_bert_batch_and_sequence_survive_input_shape(exporter):
    from onnxprune.models import transformers as tr

    path = tr.export_bert(exporter)
    res = _prune(str(path), shapes={"input_ids": (2, 8), "attention_mask": (2, 8)})
    feeds = [tr.example_tokens(b, s, 1000) for b, s in ((1, 5), (3, 11), (4, 13))]
    errors = assert_matches_masked(res, feeds)
    assert len(errors) == 3


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_rnn_batch_and_time_survive_input_shape(kind):
    from onnxprune.models import rnn

    path = rnn.export_rnn(kind)
    m = onnx.load(str(path))
    features = m.graph.input[0].type.tensor_type.shape.dim[2].dim_value
    res = _prune(m, shapes={"input": (2, 6, features)})
    rng = np.random.default_rng(2)
    feeds = [{"input": rng.standard_normal((b, t, features)).astype(np.float32)} for b, t in ((1, 3), (3, 9), (5, 17))]
    assert_matches_masked(res, feeds)


@pytest.mark.slow
def test_vit_batch_survives_input_shape():
    from onnxprune.models import transformers as tr

    path = tr.export_vision("vit_b_16")
    res = _prune(str(path), ratio=0.3, shapes={"input": (2, 3, 224, 224)})
    rng = np.random.default_rng(3)
    feeds = [{"input": rng.standard_normal((b, 3, 224, 224)).astype(np.float32)} for b in (1, 3, 4)]
    assert_matches_masked(res, feeds)


# ----------------------------------------------------------------------------------------------
# cause 2: two probes agreeing prove nothing


class PadToMultiple(nn.Module):
    """Pads H and W up to a multiple of 32 (a U-Net's input guard), convs, crops back."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.c1, self.c2 = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 4, 3, padding=1)

    def forward(self, x):
        h, w = x.shape[2], x.shape[3]
        x = F.pad(x, (0, (32 - w % 32) % 32, 0, (32 - h % 32) % 32))
        return self.c2(torch.relu(self.c1(x)))


@pytest.mark.parametrize("shapes", [None, {"x": (1, 3, 64, 96)}], ids=["generated", "input-shape"])
def test_pad_to_multiple_is_not_folded(tmp_path, shapes):
    m = _export(PadToMultiple(), (torch.randn(1, 3, 70, 50),), tmp_path / "pad.onnx", ["x"],
                {"x": {0: "b", 2: "h", 3: "w"}})
    res = _prune(m, shapes=shapes)
    rng = np.random.default_rng(4)
    feeds = [{"x": rng.standard_normal(s).astype(np.float32)} for s in ((1, 3, 230, 230), (2, 3, 37, 70),
                                                                       (1, 3, 64, 33))]
    assert_matches_masked(res, feeds)
    for f in feeds:  # the padded size is still computed: outputs grow to the next multiple of 32
        (y,) = run(res.pruned, f)
        assert y.shape[2:] == tuple(-(-d // 32) * 32 for d in f["x"].shape[2:])


def test_fixed_input_sizes_are_still_folded(tmp_path):
    """The proof is not timid: the same graph with its batch declared fixed folds the view target."""
    m = _export(ViewNet(), (torch.randn(2, 3, 16, 16),), tmp_path / "v.onnx", ["x"], {"x": {0: "b"}})
    assert any(n.op_type == "Shape" for n in m.graph.node)
    m.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 2
    res = _prune(m)
    assert any(c.endswith("= [2, -1]") for c in _folded(res)), res.analysis.changes
    assert not any(n.op_type == "Shape" for n in res.pruned.graph.node)


# ----------------------------------------------------------------------------------------------
# cause 12: the probes use the given arrays, and a probe that fails never aborts


class ReflectFront(nn.Module):
    """Reflect padding by 64 (a VAD's STFT front end): rejects inputs shorter than 65 samples."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.c1, self.c2 = nn.Conv1d(1, 16, 5, stride=2), nn.Conv1d(16, 8, 3)

    def forward(self, x):
        x = F.pad(x.unsqueeze(1), (64, 64), mode="reflect")
        return self.c2(torch.relu(self.c1(x))).mean(-1)


def test_probe_runs_on_given_arrays(tmp_path):
    m = _export(ReflectFront(), (torch.randn(1, 512),), tmp_path / "vad.onnx", ["x"], {"x": {0: "b", 1: "n"}})
    x = np.random.default_rng(5).standard_normal((1, 512)).astype(np.float32)
    res = _prune(m, arrays={"x": x})
    rng = np.random.default_rng(6)
    assert_matches_masked(res, [{"x": rng.standard_normal(s).astype(np.float32)} for s in ((1, 100), (2, 777),
                                                                                           (3, 4000))])
    np.save(tmp_path / "x.npy", x)
    out = tmp_path / "p.onnx"
    r = run_cli("prune", str(tmp_path / "vad.onnx"), "-o", str(out), "--ratio", "0.5", "--verify",
                "--input", f"x={tmp_path / 'x.npy'}")
    assert r.returncode == 0, r.stderr
    assert out.exists()


class FixedHeight(nn.Module):
    """A text recognizer's shape: H is declared dynamic but only 16 works (the head reads 8 * H/2)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.c1, self.c2 = nn.Conv2d(3, 12, 3, padding=1), nn.Conv2d(12, 8, 3, stride=2, padding=1)
        self.fc = nn.Linear(8 * 8, 6)

    def forward(self, x):
        x = self.c2(torch.relu(self.c1(x)))  # [b, 8, h/2, w/2]
        b, c, h, w = x.shape
        return self.fc(x.permute(0, 3, 1, 2).reshape(b, w, c * h))


def test_probe_rejected_at_second_size_does_not_abort(tmp_path):
    _export(FixedHeight(), (torch.randn(1, 3, 16, 40),), tmp_path / "rec.onnx", ["x"],
            {"x": {0: "b", 2: "h", 3: "w"}})
    out, report = tmp_path / "p.onnx", tmp_path / "r.json"
    r = run_cli("prune", str(tmp_path / "rec.onnx"), "-o", str(out), "--ratio", "0.5", "--verify",
                "--input-shape", "x=1x3x16x40", "--report", str(report))
    assert r.returncode == 0, r.stderr
    rep = json.loads(report.read_text())
    assert rep["verification"]["passed"]
    assert rep["groups"]["pruned"] >= 1
    for w in (24, 40, 64):  # other widths still run and keep their width
        (y,) = run(out, {"x": np.ones((2, 3, 16, w), np.float32)})
        assert y.shape == (2, w // 2, 6)


class ChunkNet(nn.Module):
    """``x.chunk(2, dim=1)`` after a fused conv: the chunk bounds are computed from Shape(x)[1]."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.c1, self.c2, self.c3 = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(16, 4, 1)

    def forward(self, x):
        a, b = torch.relu(self.c1(x)).chunk(2, dim=1)
        return self.c3(torch.cat([a, torch.relu(self.c2(b))], 1))


def test_sizes_proven_through_contrib_ops(tmp_path):
    """onnx has no schema for onnxruntime's FusedConv: the handler's stand-in (Conv) lets shape
    inference prove the channel count, so the chunk bounds fold and the channels prune."""
    from onnxprune.testing import variants

    _export(ChunkNet(), (torch.randn(2, 3, 16, 16),), tmp_path / "c.onnx", ["x"], {"x": {0: "b"}})
    m = variants.ort_optimize(tmp_path / "c.onnx", "extended")
    assert any(n.op_type == "FusedConv" for n in m.graph.node)
    res = _prune(m)
    assert _folded(res), res.analysis.changes
    assert not [g for g in res.analysis.cg.groups if g.frozen and "does not carry" in g.frozen[0]]
    rng = np.random.default_rng(7)
    assert_matches_masked(res, [{"x": rng.standard_normal((b, 3, 16, 16)).astype(np.float32)} for b in (1, 3)])
