"""Soft pruning (``rewrite.soft``): the plan as zeroed weights in the unchanged graph.

- The soft model passes the full ONNX checker, has the original's nodes (the same protos) and
  initializer names and shapes, and computes what the hard-pruned model computes (relative error
  1e-5 of the output's norm) on random inputs: a CNN with BatchNorm, a residual CNN with a depthwise
  conv, and an MLP with a dynamic batch.
- What it zeroes: a removed channel's producer filter, bias and BatchNorm scale and bias, and its
  consumer columns; kept weights and running statistics are untouched.
- A group whose tensor some node divides by keeps its producers (a zero channel would be 0/0, and
  NaN times a zero consumer weight is NaN); the soft model still equals the pruned one.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from onnxprune import pipeline
from onnxprune.planning.options import PlanOptions
from onnxprune.rewrite.apply import kept_map
from onnxprune.rewrite.soft import soft_prune, soft_zeros, zeroes_producers
from onnxprune.testing import checks, graphs

MLP = graphs.MLP
GRAD_CNN = graphs.GRAD_CNN.replace("TAIL", graphs.GRAD_CNN_HEAD)
# a channel group read by a Div: zeroing h's producer would make q = 0 / 0
DIV_MLP = """
<ir_version: 8, opset_import: ["" : 17]>
mlp (float[N,8] x) => (float[N,5] y)
<float[16,8] w1, float[16] b1, float[5,16] w2, float[5] b2>
{
  h = Gemm <transB=1> (x, w1, b1)
  t = Tanh (h)
  q = Div (t, h)
  y = Gemm <transB=1> (q, w2, b2)
}
"""


def _models():
    return {
        "small_cnn": (graphs.small_cnn(), {"x": (1, 3, 16, 16)}),
        "grad_cnn": (graphs.build(GRAD_CNN, positive=("v1",)), {"x": (2, 3, 8, 8)}),
        "mlp": (graphs.build(MLP), {"x": (4, 8)}),
        "div_mlp": (graphs.build(DIV_MLP), {"x": (4, 8)}),
    }


def _feeds(shapes, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}


def _norm_rel(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(a.astype(np.float64) - ref) / max(np.linalg.norm(ref.astype(np.float64)), 1e-30))


@pytest.mark.parametrize("name", ["small_cnn", "grad_cnn", "mlp", "div_mlp"])
def test_soft_model_is_the_original_graph_computing_the_pruned_model(name):
    model, shapes = _models()[name]
    res = pipeline.run(model, PlanOptions(ratio=0.5), input_shapes={k: v for k, v in shapes.items()})
    assert res.plan.pruned()
    soft = soft_prune(res.analysis, res.plan)
    onnx.checker.check_model(soft, full_check=True)
    orig = res.analysis.model
    assert [n.SerializeToString() for n in soft.graph.node] == [n.SerializeToString() for n in orig.graph.node]
    assert checks.shapes_of(soft) == checks.shapes_of(orig)
    assert [i.name for i in soft.graph.input] == [i.name for i in orig.graph.input]
    for seed in range(3):
        feeds = _feeds(shapes, seed)
        for s, p in zip(checks.run(soft, feeds), checks.run(res.pruned, feeds), strict=True):
            assert np.all(np.isfinite(s))
            assert _norm_rel(s, p) <= 1e-5, (name, seed, _norm_rel(s, p))


def test_soft_zeroes_producers_biases_norms_and_consumers_only_of_removed_channels():
    model = graphs.small_cnn()
    res = pipeline.run(model, PlanOptions(ratio=0.5))
    soft = soft_prune(res.analysis, res.plan)
    before, after = checks.inits(res.analysis.model), checks.inits(soft)
    kept_of = kept_map(res.analysis.cg, res.plan)
    kept = list(kept_of[("w1", 0)])
    gone = sorted(set(range(8)) - set(kept))
    assert len(gone) == 4
    for name in ("w1", "b1", "s1", "bb1"):
        assert np.all(after[name][gone] == 0), name
        np.testing.assert_array_equal(after[name][kept], before[name][kept])
    assert np.all(after["w2"][:, gone] == 0)
    for name in ("m1", "v1"):  # running statistics stay (a zero variance would divide by sqrt(eps))
        np.testing.assert_array_equal(after[name], before[name])
    # conv2's 16 filters are a group too (read by the Gemm): its removed filters are zero
    kept2 = list(kept_of[("w2", 0)])
    gone2 = sorted(set(range(16)) - set(kept2))
    assert gone2 and np.all(after["w2"][gone2] == 0) and np.all(after["wf"][:, gone2] == 0)
    np.testing.assert_array_equal(after["w2"][np.ix_(kept2, kept)], before["w2"][np.ix_(kept2, kept)])


def test_a_group_read_by_a_divisor_keeps_its_producers():
    model = graphs.build(DIV_MLP)
    res = pipeline.run(model, PlanOptions(ratio=0.5), input_shapes={"x": (4, 8)})
    cg = res.analysis.cg
    (gp,) = res.plan.pruned()
    assert not zeroes_producers(cg, cg.groups[gp.group])
    zero = soft_zeros(cg, res.plan)
    assert set(zero) == {"w2"}  # consumers only
    assert set(soft_zeros(cg, res.plan, producers=False)) == {"w2"}
    # without the Div, the same MLP's soft model zeroes w1 and b1 too
    plain = pipeline.run(graphs.build(MLP), PlanOptions(ratio=0.5), input_shapes={"x": (4, 8)})
    assert set(soft_zeros(plain.analysis.cg, plain.plan)) == {"w1", "b1", "w2"}
    assert set(soft_zeros(plain.analysis.cg, plain.plan, producers=False)) == {"w2"}
