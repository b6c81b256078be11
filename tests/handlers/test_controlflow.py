"""If (handlers/controlflow.py): channels followed into both branches. What a branch reads from
outside is an ordinary tensor, output k of each branch is the If's output k (one index set across the
branches), weights inside a branch (its initializers and Constant nodes) are sliced where they live
and zeroed there in the masked original. Branches that disagree, an unknown op inside a branch, names
reused across scopes and Loop bodies freeze what they touch, each with its reason."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnxprune import pipeline
from onnxprune.errors import NothingToPrune
from onnxprune.measure.verify import compare, masked_original
from onnxprune.planning.options import PlanOptions
from onnxprune.runtime.inputs import make_inputs
from onnxprune.testing import checks, graphs
from onnxprune.testing.graphs import H17

# ----------------------------------------------------------------------------------------------
# building: graphs.build fills the main graph's declared initializers; a branch's declared tensors
# are filled here (He-scaled), some of them as Constant nodes, and its nodes get names


def _fill_branches(model: onnx.ModelProto, constants: tuple[str, ...] = (), seed: int = 1) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    stack = [model.graph]
    while stack:
        g = stack.pop()
        if g is not model.graph:
            _fill(g, rng, constants)
        stack.extend(a.g for n in g.node for a in n.attribute if a.type == onnx.AttributeProto.GRAPH)
    onnx.checker.check_model(model, full_check=True)
    return model


def _fill(g: onnx.GraphProto, rng: np.random.Generator, constants: tuple[str, ...]) -> None:
    """Fill the tensors a branch declares (He-scaled; those in ``constants`` as Constant nodes) and name its nodes."""
    produced = {o for n in g.node for o in n.output}
    declared = [vi for vi in g.value_info if vi.name not in produced]
    kept = [vi for vi in g.value_info if vi.name in produced]
    consts = []
    for vi in declared:
        dims = [d.dim_value for d in vi.type.tensor_type.shape.dim]
        arr = rng.standard_normal(dims).astype(np.float32)
        if arr.ndim >= 2:
            arr = (arr / np.sqrt(np.prod(dims[1:]))).astype(np.float32)
        t = numpy_helper.from_array(arr, vi.name)
        if vi.name in constants:
            consts.append(onnx.helper.make_node("Constant", [], [vi.name], value=t))
        else:
            g.initializer.append(t)
    del g.value_info[:]
    g.value_info.extend(kept)
    nodes = consts + list(g.node)
    del g.node[:]
    g.node.extend(nodes)
    for i, node in enumerate(g.node):
        if not node.name and node.op_type != "Constant":
            node.name = f"{g.name}_{node.op_type.lower()}_{i}"


def build(text: str, constants: tuple[str, ...] = ()) -> onnx.ModelProto:
    return _fill_branches(graphs.build(text), constants)


def weights(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    """Shapes of every constant, in every scope (initializers and Constant nodes)."""
    out: dict[str, tuple[int, ...]] = {}
    stack = [model.graph]
    while stack:
        g = stack.pop()
        out.update({i.name: tuple(i.dims) for i in g.initializer})
        for n in g.node:
            if n.op_type == "Constant":
                out[n.output[0]] = tuple(n.attribute[0].t.dims)
            stack.extend(a.g for a in n.attribute if a.type == onnx.AttributeProto.GRAPH)
    return out


def assert_both_branches_exact(res, tol: float = checks.TOL) -> None:
    """Pruned vs masked original with each branch taken, at two batch sizes: relative error below
    ``tol``, and the pruned model differs from the original (the check means something)."""
    an = res.analysis
    masked = masked_original(an.model, an.cg, res.plan)
    for cond in (True, False):
        for batch in (1, 3):
            feeds = make_inputs(an.model, batch=batch, seed=batch)
            feeds["c"] = np.array(cond)
            v = compare(an.model, masked, res.pruned, feeds, "cpu", tol)
            assert v.passed, (cond, batch, v.to_json())
            assert all(o.rel_error < tol for o in v.outputs), (cond, v.to_json())
            assert all(o.fidelity > 1e-3 for o in v.outputs), (cond, v.to_json())


# a conv chain in each branch, reading the main graph's `ar`; the If's output feeds one more conv.
# Channel groups: w0 (read in both branches), wt1 (then only), we1 (else only) and the If output
# (wt2 out = we2 out = wf in). The then branch keeps its weights as initializers, the else branch
# as Constant nodes (we1) and a main-graph initializer (we2)
CHAIN = H17 + """
g (float[N,3,8,8] x, bool c) => (float[N,4,8,8] y)
<float[6,3,3,3] w0, float[6] b0, float[8,5,3,3] we2, float[4,8,1,1] wf>
{
  a = Conv<pads=[1,1,1,1]>(x, w0, b0)
  ar = Relu(a)
  z = If(c) <then_branch = then_g () => (float[N,8,8,8] t2) <float[8,6,3,3] wt1, float[8] bt1, float[8,8,3,3] wt2> {
      t1 = Conv<pads=[1,1,1,1]>(ar, wt1, bt1)
      t1r = Relu(t1)
      t2 = Conv<pads=[1,1,1,1]>(t1r, wt2)
    }, else_branch = else_g () => (float[N,8,8,8] e2) <float[5,6,1,1] we1> {
      e1 = Conv(ar, we1)
      e1r = Relu(e1)
      e2 = Conv<pads=[1,1,1,1]>(e1r, we2)
    }>
  zr = Relu(z)
  y = Conv(zr, wf)
}"""

CHAIN_EXPECT = {"w0": (3, 3, 3, 3), "b0": (3,), "wt1": (4, 3, 3, 3), "bt1": (4,), "wt2": (4, 4, 3, 3),
                "we1": (3, 3, 1, 1), "we2": (4, 3, 3, 3), "wf": (4, 4, 1, 1)}


def test_conv_chain_in_both_branches_is_pruned_and_exact():
    model = build(CHAIN, constants=("we1",))
    res = checks.prune_and_verify(model, 0.5)
    checks.assert_exact(res, model, {k: v for k, v in CHAIN_EXPECT.items() if k in ("w0", "b0", "we2", "wf")})
    assert weights(res.pruned) == {**weights(model), **CHAIN_EXPECT}
    # the weights inside the branches were sliced where they live
    then_g = next(a.g for a in res.pruned.graph.node[2].attribute if a.name == "then_branch")
    assert {i.name for i in then_g.initializer} == {"wt1", "bt1", "wt2"}
    assert all(not frozen for gid, frozen in res.plan.frozen.items()
               if any(s.const in CHAIN_EXPECT for s in res.analysis.cg.groups[gid].slots)
               and res.analysis.cg.groups[gid].size > 1 and "graph" not in frozen[0])
    assert_both_branches_exact(res)
    # both branches' MACs are counted (see measure/stats.py) and both shrank
    assert res.before.macs > 0 and res.after.macs < 0.5 * res.before.macs


def test_if_output_is_one_index_set_across_branches():
    """Channel i of the If's output is channel i of each branch's output: the same positions are
    removed from wt2 (then), we2 (else) and read out of wf."""
    model = build(CHAIN, constants=("we1",))
    res = checks.prune_and_verify(model, 0.5)
    cg, g = res.analysis.cg, checks.group_of(res, "wf", 1)
    slots = {(s.const, s.axis): s.space for s in g.slots}
    assert set(slots) >= {("wt2", 0), ("we2", 0), ("wf", 1)}
    keep = next(gp.keep for gp in res.plan.pruned() if gp.group == g.id)
    kept = [cg.kept_elements(g, keep, slots[k]).tolist() for k in (("wt2", 0), ("we2", 0), ("wf", 1))]
    assert kept[0] == kept[1] == kept[2] and len(kept[0]) == 4
    # and the rewrite took those rows: wf's kept input columns are the original's at those positions
    wf = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "wf"))
    wf_p = numpy_helper.to_array(next(i for i in res.pruned.graph.initializer if i.name == "wf"))
    np.testing.assert_array_equal(wf_p, wf[:, kept[2]])


def test_nested_if_is_followed():
    """An If inside a branch: its branches are followed too (one level deeper)."""
    text = H17 + """
g (float[N,3,8,8] x, bool c) => (float[N,4,8,8] y)
<float[6,3,3,3] w0, float[4,8,1,1] wf>
{
  a = Conv<pads=[1,1,1,1]>(x, w0)
  ar = Relu(a)
  z = If(c) <then_branch = then_g () => (float[N,8,8,8] u) <float[8,6,3,3] wt> {
      t = Conv<pads=[1,1,1,1]>(ar, wt)
      tr = Relu(t)
      u = If(c) <then_branch = inner_then () => (float[N,8,8,8] it) <float[8,8,1,1] wi> {
          it = Conv(tr, wi)
        }, else_branch = inner_else () => (float[N,8,8,8] ie) {
          ie = Sigmoid(tr)
        }>
    }, else_branch = else_g () => (float[N,8,8,8] e) <float[8,6,1,1] we> {
      e = Conv(ar, we)
    }>
  zr = Relu(z)
  y = Conv(zr, wf)
}"""
    model = build(text)
    res = checks.prune_and_verify(model, 0.5)
    checks.assert_exact(res, model, {"w0": (3, 3, 3, 3), "wf": (4, 4, 1, 1)})
    got = weights(res.pruned)
    # wt out = the inner If's output (an identity in one inner branch, wi in the other) = we out = wf in
    assert got["wt"] == (4, 3, 3, 3) and got["wi"] == (4, 4, 1, 1) and got["we"] == (4, 3, 1, 1)
    assert_both_branches_exact(res)


def test_shape_constants_inside_a_branch_are_rewritten():
    """A Slice of the channels inside a branch, its bounds Constant nodes of the branch: the Slice's
    handler rewrites them there (a new constant of the branch), as in the main graph."""
    text = H17 + """
g (float[N,3,8,8] x, bool c) => (float[N,4,8,8] y)
<float[6,3,3,3] w0, float[4,8,1,1] wf>
{
  a = Conv<pads=[1,1,1,1]>(x, w0)
  ar = Relu(a)
  z = If(c) <then_branch = then_g () => (float[N,8,8,8] t3) <float[10,6,3,3] wt1, float[8,6,3,3] wt2> {
      st = Constant<value = int64[1] {0}>()
      en = Constant<value = int64[1] {6}>()
      ax = Constant<value = int64[1] {1}>()
      t1 = Conv<pads=[1,1,1,1]>(ar, wt1)
      t2 = Slice(t1, st, en, ax)
      t2r = Relu(t2)
      t3 = Conv<pads=[1,1,1,1]>(t2r, wt2)
    }, else_branch = else_g () => (float[N,8,8,8] e) <float[8,6,1,1] we> {
      e = Conv(ar, we)
    }>
  zr = Relu(z)
  y = Conv(zr, wf)
}"""
    model = build(text)
    res = checks.prune_and_verify(model, 0.5)
    checks.assert_exact(res, model, {"w0": (3, 3, 3, 3), "wf": (4, 4, 1, 1)})
    got = weights(res.pruned)
    then_g = next(a.g for a in res.pruned.graph.node[2].attribute if a.name == "then_branch")
    sl = next(n for n in then_g.node if n.op_type == "Slice")
    ends = {i.name: numpy_helper.to_array(i) for i in then_g.initializer}.get(sl.input[2])
    assert ends is not None, "the new bound lives in the branch"
    assert got["wt1"][0] == 5 and got["wt2"][1] == int(ends[0]) < 6
    assert "en" not in weights(res.pruned)  # the old bound is gone with its last reader
    assert_both_branches_exact(res)


# ----------------------------------------------------------------------------------------------
# what stays frozen, and why

# a prunable group in front (w0, read by both branches) and, behind it, branches that disagree on
# the shape of what they return: a strided conv in one branch; a reduction dropping axes in the other
DISAGREE = {
    "sizes": H17 + """
g (float[N,3,8,8] x, bool c) => (float[N,4,1,1] y)
<float[6,3,3,3] w0, float[4,8,1,1] wf>
{
  a = Conv<pads=[1,1,1,1]>(x, w0)
  ar = Relu(a)
  z = If(c) <then_branch = then_g () => (float[N,8,8,8] t) <float[8,6,3,3] wt> {
      t = Conv<pads=[1,1,1,1]>(ar, wt)
    }, else_branch = else_g () => (float[N,8,4,4] e) <float[8,6,3,3] we> {
      e = Conv<pads=[1,1,1,1], strides=[2,2]>(ar, we)
    }>
  p = GlobalAveragePool(z)
  y = Conv(p, wf)
}""",
    "rank": H17 + """
g (float[N,3,8,8] x, bool c) => (float[N,4] y)
<float[6,3,3,3] w0, float[8,4] wf>
{
  a = Conv<pads=[1,1,1,1]>(x, w0)
  ar = Relu(a)
  z = If(c) <then_branch = then_g () => (float[N,8] t) <float[8,6,3,3] wt> {
      tc = Conv<pads=[1,1,1,1]>(ar, wt)
      t = ReduceMean<axes=[2,3], keepdims=0>(tc)
    }, else_branch = else_g () => (float[N,8,1,1] e) <float[8,6,3,3] we> {
      ec = Conv<pads=[1,1,1,1]>(ar, we)
      e = ReduceMean<axes=[2,3], keepdims=1>(ec)
    }>
  f = Flatten(z)
  y = MatMul(f, wf)
}""",
}


@pytest.mark.parametrize("kind", sorted(DISAGREE))
def test_branches_that_disagree_stay_frozen_with_a_reason(kind):
    model = build(DISAGREE[kind])
    res = checks.prune_and_verify(model, 0.5)
    got = weights(res.pruned)
    assert got["w0"] == (3, 3, 3, 3)  # the group in front is still pruned (exact, both branches)
    assert got["wt"] == (8, 3, 3, 3) and got["we"] == (8, 3, 3, 3)
    for w in ("wt", "we"):  # each branch's output channels: frozen, with the reason
        g = checks.group_of(res, w, 0)
        assert not g.prunable
        assert any("If 'if_2': branches disagree on output 0" in r for r in g.frozen), g.frozen
        if kind == "sizes":
            assert any("[1, 8, 8, 8] in then_branch, [1, 8, 4, 4] in else_branch" in r for r in g.frozen), g.frozen
    assert res.verification.passed and res.verification.exact


def test_unknown_op_inside_a_branch_freezes_only_its_groups():
    """LRN has no handler: the then branch's wt1 group, which it reads, is frozen with that reason;
    the groups around it (w0 read in both branches, the If's output, the else branch's we1) are pruned
    and exact whichever branch runs."""
    text = CHAIN.replace("t1r = Relu(t1)", "t1r = LRN<size=3>(t1)")
    model = build(text, constants=("we1",))
    res = checks.prune_and_verify(model, 0.5)
    g = checks.group_of(res, "wt1", 0)
    assert not g.prunable and any("unknown op LRN" in r for r in g.frozen), g.frozen
    got = weights(res.pruned)
    assert got["wt1"] == (8, 3, 3, 3) and got["bt1"] == (8,) and got["wt2"] == (4, 8, 3, 3)
    assert {k: got[k] for k in ("w0", "we1", "we2", "wf")} == {k: CHAIN_EXPECT[k] for k in ("w0", "we1", "we2", "wf")}
    assert "LRN" in res.analysis.cg.unknown_ops
    assert_both_branches_exact(res)


def test_names_reused_across_scopes_are_not_followed():
    """Both branches call their conv output `o`: a name no longer says which tensor it is, so the
    analysis does not follow the If (what it reads is frozen, with that reason)."""
    text = CHAIN.replace("t2 = Conv", "o = Conv").replace("(float[N,8,8,8] t2)", "(float[N,8,8,8] o)")
    text = text.replace("e2 = Conv", "o = Conv").replace("(float[N,8,8,8] e2)", "(float[N,8,8,8] o)")
    model = graphs.build(text)
    with pytest.raises(NothingToPrune):
        pipeline.run(model, PlanOptions(ratio=0.5))
    an = pipeline.analyze_model(model)
    g = checks.group_of(an.cg, "w0", 0)
    assert any("read inside its subgraph (names repeat across subgraphs ('o'" in r for r in g.frozen), g.frozen


def test_loop_body_reads_are_frozen_with_a_reason():
    """Loop bodies carry values across iterations, which the analysis does not model: a Loop is a
    barrier; the conv in front of it is frozen, the one behind still pruned."""
    text = H17 + """
g (float[N,3,8,8] x, int64 n) => (float[N,4,8,8] y)
<float[6,3,3,3] w0, float[8,6,3,3] w1, float[4,8,3,3] w2>
{
  a = Conv<pads=[1,1,1,1]>(x, w0)
  ar = Relu(a)
  cond = Constant<value = bool {1}>()
  acc = Loop(n, cond, ar) <body = body_g (int64 i, bool ci, float[N,6,8,8] s) => (bool co, float[N,6,8,8] so) {
      co = Identity(ci)
      so = Add(s, ar)
    }>
  h = Conv<pads=[1,1,1,1]>(acc, w1)
  hr = Relu(h)
  y = Conv<pads=[1,1,1,1]>(hr, w2)
}"""
    model = graphs.build(text)
    an = pipeline.analyze_model(model)
    g0 = checks.group_of(an.cg, "w0", 0)
    assert not g0.prunable
    assert any("unknown op Loop" in r for r in g0.frozen) and any("read inside its subgraph" in r for r in g0.frozen)
    assert checks.group_of(an.cg, "w1", 0).prunable
