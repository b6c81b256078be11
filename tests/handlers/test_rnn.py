"""LSTM, GRU and RNN (handlers/rnn.py): the feature channels into the op and its hidden units are
pruned, on ONNX-text graphs and on torch exports (models/rnn.py)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from onnxprune.handlers import REGISTRY

from onnxprune import pipeline
from onnxprune.analysis.shapes import Shapes
from onnxprune.measure.verify import masked_original
from onnxprune.planning.options import PlanOptions
from onnxprune.runtime.inputs import make_inputs
from onnxprune.testing import checks, graphs
from onnxprune.testing.graphs import H17, Case

# ----------------------------------------------------------------------------------------------
# graphs written out in full: (id, text, expected initializer shapes after ratio 0.5, positive)

CASES = [
    Case("LSTM", H17 + """
g (float[5,N,8] x) => (float[5,N,6] y)
<float[8,16] w0, float[1,48,16] W, float[1,48,12] R, float[1,96] B, float[12,6] wo, int64[1] one = {1}>
{
  a = MatMul(x, w0)
  ys, yh, yc = LSTM<hidden_size=12>(a, W, R, B)
  s = Squeeze(ys, one)
  y = MatMul(s, wo)
}""", {"w0": (8, 8), "W": (1, 24, 8), "R": (1, 24, 6), "B": (1, 48), "wo": (6, 6)}),
    Case("GRU-bidirectional", H17 + """
g (float[5,N,8] x) => (float[5,N,6] y)
<float[8,16] w0, float[2,36,16] W, float[2,36,12] R, float[2,72] B, float[24,6] wo, int64[3] sh = {0, 0, -1}>
{
  a = MatMul(x, w0)
  ys = GRU<hidden_size=12, direction="bidirectional", linear_before_reset=1>(a, W, R, B)
  t = Transpose<perm=[0,2,1,3]>(ys)
  r = Reshape(t, sh)
  y = MatMul(r, wo)
}""", {"w0": (8, 8), "W": (2, 18, 8), "R": (2, 18, 6), "B": (2, 36), "wo": (12, 6)}),
    Case("RNN", H17 + """
g (float[5,N,8] x) => (float[N,6] y)
<float[8,16] w0, float[1,12,16] W, float[1,12,12] R, float[12,6] wo, int64[1] zero = {0}>
{
  a = MatMul(x, w0)
  ys, yh = RNN<hidden_size=12>(a, W, R)
  s = Squeeze(yh, zero)
  y = MatMul(s, wo)
}""", {"w0": (8, 8), "W": (1, 6, 8), "R": (1, 6, 6), "wo": (6, 6)}),
]


# ----------------------------------------------------------------------------------------------
# other ratios

# (case, ratio, expected shapes)
RATIO_CASES = [
    ("LSTM", 0.25, {"w0": (8, 12), "W": (1, 36, 12), "R": (1, 36, 9), "wo": (9, 6)}),
]


class TestRNN(checks.GraphCases, checks.RatioCases):
    """The standard tests over ``CASES`` and ``RATIO_CASES`` (``checks.CaseTests``)."""


# ----------------------------------------------------------------------------------------------
# hidden units: torch exports, states, attributes, barriers, MACs

GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
HIDDEN = 32  # models/rnn.py default
CHANNELS = 24  # front-end channels feeding the first layer


def _rnn_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.op_type in GATES]


def _hidden(node: onnx.NodeProto) -> int:
    return next(a.i for a in node.attribute if a.name == "hidden_size")


def _rnn_macs(model: onnx.ModelProto, shapes: Shapes) -> int:
    total = 0
    for n in _rnn_nodes(model):
        total += REGISTRY.lookup("", n.op_type, 17).macs(n, shapes.get, None)
    return total


@pytest.fixture(scope="module")
def rnn_cache(tmp_path_factory):
    pytest.importorskip("torch")
    return tmp_path_factory.mktemp("rnn")


TORCH_CASES = [(k, bi, nl) for k in ("LSTM", "GRU") for bi in (False, True) for nl in (1, 2)]


@pytest.mark.parametrize("kind,bidirectional,num_layers", TORCH_CASES,
                         ids=[f"{k}-{'bi' if b else 'uni'}-{n}l" for k, b, n in TORCH_CASES])
def test_torch_rnn_prunes_hidden_and_verifies(rnn_cache, kind, bidirectional, num_layers):
    from onnxprune.models.rnn import export_rnn

    head = "last" if num_layers == 2 else "y"
    front = "conv" if bidirectional else "linear"
    path = export_rnn(kind, bidirectional, num_layers, front=front, head=head, cache_dir=rnn_cache)
    original = onnx.load(str(path))
    assert len(_rnn_nodes(original)) == num_layers
    res = checks.prune_and_verify(original, 0.5)

    v = res.verification
    assert v.passed and v.exact
    for o in v.outputs:
        assert o.rel_error < 1e-4, (o.name, o.rel_error)

    G, dirs = GATES[kind], 2 if bidirectional else 1
    h = HIDDEN // 2
    inits = checks.shapes_of(res.pruned)
    for layer, node in enumerate(_rnn_nodes(res.pruned)):
        assert _hidden(node) == h
        n_in = CHANNELS // 2 if layer == 0 else dirs * h
        assert inits[node.input[1]] == (dirs, G * h, n_in)
        assert inits[node.input[2]] == (dirs, G * h, h)
        assert inits[node.input[3]] == (dirs, 2 * G * h)
    assert res.after.macs < res.before.macs
    rnn_before = _rnn_macs(res.analysis.model, res.analysis.shapes)
    rnn_after = _rnn_macs(res.pruned, res.pruned_shapes)
    assert rnn_before > 0 and rnn_after <= 0.3 * rnn_before  # hidden and inputs halved: ~1/4


@pytest.mark.slow  # the first torch.export in a process takes 15-35 s
def test_dynamo_export_prunes_and_verifies(rnn_cache):
    """torch.export (dynamo=True) also writes ONNX LSTM/GRU ops; its zero states are Expand -> Slice."""
    from onnxprune.models.rnn import export_rnn, load_meta

    path = export_rnn("GRU", True, 2, front="linear", head="y", exporter="dynamo", cache_dir=rnn_cache)
    assert load_meta(path)["rnn_ops"] == ["GRU"]
    res = checks.prune_and_verify(onnx.load(str(path)), 0.5)
    assert res.verification.passed and res.verification.exact
    assert max(o.rel_error for o in res.verification.outputs) < 1e-4
    assert [_hidden(n) for n in _rnn_nodes(res.pruned)] == [HIDDEN // 2] * 2
    assert res.after.macs < res.before.macs


def test_masked_original_differs_and_r_columns_matter(rnn_cache):
    """The check can fail: the masked original computes something else than the original, and
    leaving R's columns (the recurrent consumer) unmasked breaks the equality with the pruned model."""
    from onnxprune.models.rnn import export_rnn

    path = export_rnn("LSTM", True, 2, front="conv", head="last", cache_dir=rnn_cache)
    res = pipeline.run(str(path), PlanOptions(ratio=0.5), verify=True, ep="cpu")
    an = res.analysis
    feeds = make_inputs(an.model)
    masked = masked_original(an.model, an.cg, res.plan)
    o = checks.run(an.model, feeds)[0]
    m = checks.run(masked, feeds)[0]
    p = checks.run(res.pruned, feeds)[0]
    assert checks.rel_err(p, m) < 1e-4
    assert checks.rel_err(m, o) > 1e-2

    r_names = {n.input[2] for n in _rnn_nodes(an.model)}
    orig = {i.name: i for i in an.model.graph.initializer}
    mutant = onnx.ModelProto()
    mutant.CopyFrom(masked)
    for init in mutant.graph.initializer:
        if init.name in r_names:
            init.CopyFrom(orig[init.name])
    assert checks.rel_err(p, checks.run(mutant, feeds)[0]) > 1e-3


LSTM_STATE_INPUT = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[7, 2, 6] X, float[1, 2, 8] h0) => (float[7, 2, 3] out)
<float[6, 10] Wf, float[1, 32, 10] W, float[1, 32, 8] R, float[1, 64] B, float[8, 3] Wo, int64[1] one = {1}> {
  Xf = MatMul(X, Wf)
  Y, Yh = LSTM <hidden_size: int = 8> (Xf, W, R, B, , h0)
  Ys = Squeeze(Y, one)
  out = MatMul(Ys, Wo)
}
"""


def test_state_graph_input_freezes_hidden_but_not_inputs():
    model = graphs.from_text(LSTM_STATE_INPUT)
    res = checks.prune_and_verify(model, 0.5)
    cg = res.analysis.cg
    reasons = checks.group_of(cg, "R", 1).frozen
    assert reasons and "graph input 'h0'" in reasons[0]
    assert not checks.group_of(cg, "W", 2).frozen  # the channels feeding the LSTM still prune
    (node,) = _rnn_nodes(res.pruned)
    assert _hidden(node) == 8
    assert checks.shapes_of(res.pruned)["W"] == (1, 32, 5)
    assert res.verification.passed


FEATURES = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[6, 3, 5] X) => (float[6, 3, 4] out, float[6, 3, 4] out2, float[6, 3, 4] out3)
<float[5, 8] Wf, float[2, 40, 8] W, float[2, 40, 10] R, float[2, 80] B, float[2, 30] P,
 float[2, 3, 10] h0, float[2, 3, 10] c0, int32[3] lens = {6, 4, 5},
 float[20, 4] Wo, int64[3] shp = {0, 0, -1}, int64[1] one = {1},
 float[2, 30, 20] Wg, float[2, 30, 10] Rg, float[2, 60] Bg, float[20, 10] Wg2, float[10, 4] Wgo,
 float[1, 10, 10] Wr, float[1, 10, 10] Rr, float[1, 20] Br, float[10, 4] Wro> {
  Xf = MatMul(X, Wf)
  Y, Yh, Yc = LSTM <hidden_size: int = 10, direction: string = "bidirectional", clip: float = 2.5,
                    input_forget: int = 1, activations: strings = ["HardSigmoid", "Tanh", "Softsign",
                    "Sigmoid", "Tanh", "Tanh"], activation_alpha: floats = [0.3, 0.0, 0.0, 0.0, 0.0, 0.0],
                    activation_beta: floats = [0.4, 0.0, 0.0, 0.0, 0.0, 0.0]> (Xf, W, R, B, lens, h0, c0, P)
  Yt = Transpose <perm = [0, 2, 1, 3]> (Y)
  Yr = Reshape(Yt, shp)
  out = MatMul(Yr, Wo)
  G, Gh = GRU <hidden_size: int = 10, direction: string = "bidirectional", linear_before_reset: int = 1> (Yr, Wg, Rg, Bg)
  Gt = Transpose <perm = [0, 2, 1, 3]> (G)
  Gr = Reshape(Gt, shp)
  Gq = MatMul(Gr, Wg2)
  out2 = MatMul(Gq, Wgo)
  Rn, Rh = RNN <hidden_size: int = 10, activations: strings = ["Relu"]> (Gq, Wr, Rr, Br)
  Rq = Squeeze(Rn, one)
  out3 = MatMul(Rq, Wro)
}
"""


def _features_model() -> onnx.ModelProto:
    return graphs.from_text(FEATURES)


def test_peepholes_states_seq_lens_attributes_gru_lbr_and_rnn_verify():
    """Every per-unit attribute stays exact: peepholes, constant initial states, sequence_lens, clip,
    input_forget, non-default activations (bidirectional LSTM), linear_before_reset (GRU), RNN."""
    model = _features_model()
    res = checks.prune_and_verify(model, 0.5)
    assert res.verification.passed and res.verification.exact
    assert max(o.rel_error for o in res.verification.outputs) < 1e-4
    nodes = {n.op_type: n for n in _rnn_nodes(res.pruned)}
    assert {k: _hidden(n) for k, n in nodes.items()} == {"LSTM": 5, "GRU": 5, "RNN": 5}
    inits = checks.shapes_of(res.pruned)
    lstm = nodes["LSTM"]
    assert inits[lstm.input[7]] == (2, 15)  # P
    assert inits[lstm.input[5]] == (2, 3, 5) and inits[lstm.input[6]] == (2, 3, 5)
    assert inits[nodes["GRU"].input[1]] == (2, 15, 10)  # its input: 2 directions x 5 units
    assert res.after.macs < res.before.macs


def test_layout_1_is_a_barrier():
    text = LSTM_STATE_INPUT.replace("float[7, 2, 6] X, float[1, 2, 8] h0", "float[2, 7, 6] X").replace(
        "(Xf, W, R, B, , h0)", "(Xf, W, R, B)").replace("hidden_size: int = 8>", "hidden_size: int = 8, layout: int = 1>")
    text = text.replace("Ys = Squeeze(Y, one)", "Ys = Squeeze(Y, two)").replace(
        "int64[1] one = {1}", "int64[1] two = {2}").replace("float[7, 2, 3] out", "float[2, 7, 3] out")
    an = pipeline.analyze_model(graphs.from_text(text))
    cg = an.cg
    reasons = [r for _, r in cg.frozen[cg.space_ids[("R", 1)]]]
    assert any("layout=1" in r for r in reasons)
    assert any("layout=1" in r for r in checks.group_of(cg, "Wf", 1).frozen)  # the channels feeding it too


def test_macs_formula():
    model = graphs.from_text(LSTM_STATE_INPUT)
    an = pipeline.analyze_model(model)
    (node,) = _rnn_nodes(an.model)
    seq, batch, dirs, G, hid, inp = 7, 2, 1, 4, 8, 10
    assert _rnn_macs(an.model, an.shapes) == seq * batch * dirs * G * hid * (inp + hid)


def test_computed_zero_state_is_dropped_when_hidden_changes(rnn_cache):
    """The legacy exporter's ConstantOfShape -> Slice zero states are omitted in the pruned op."""
    from onnxprune.models.rnn import export_rnn

    path = export_rnn("LSTM", False, 2, front="linear", head="y", cache_dir=rnn_cache)
    original = onnx.load(str(path))
    assert "ConstantOfShape" in {n.op_type for n in original.graph.node}
    assert all(n.input[5] for n in _rnn_nodes(original))
    res = checks.prune_and_verify(original, 0.5)
    assert res.verification.passed
    for n in _rnn_nodes(res.pruned):
        assert list(n.input[5:7]) in ([], [""], ["", ""])
    assert "ConstantOfShape" not in {n.op_type for n in res.pruned.graph.node}


def test_constant_state_is_sliced_not_dropped():
    model = _features_model()
    res = checks.prune_and_verify(model, 0.5)
    lstm = next(n for n in res.pruned.graph.node if n.op_type == "LSTM")
    h0 = numpy_helper.to_array(next(i for i in res.pruned.graph.initializer if i.name == lstm.input[5]))
    assert h0.shape == (2, 3, 5) and np.any(h0)
