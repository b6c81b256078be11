"""Property: every random DAG built from the supported ops, pruned with random options, computes
exactly what its masked original computes.

Generator design (so that hypothesis shrinks a failure to a *minimal* graph):

- hypothesis draws a ``Model`` spec: input channels, spatial size, an optional dense stem conv, a list
  of small "layer ops" (NamedTuples below), a head, the opset, a weight seed and whether weights are
  initializers or Constant nodes. Branching layers (``Branch``, ``SplitCat``) hold their own layer
  lists, nested two levels deep at most; half the specs are small (at most 6/3/2 layers per level),
  half bigger (10/4/3). Shrinking removes layers, empties branches, lowers parameters and moves to the
  small profile, and the spec prints as a Python literal in the falsifying example, so it can be
  pasted into a regression test.
- ``build_model`` turns a spec deterministically into an ONNX model with ``onnx.helper``: dynamic batch
  axis "N", every layer keeps the spatial size (stride 1, "same" padding), weights drawn from
  ``np.random.default_rng(spec.seed)`` with He-style scaling (activations stay O(1), so relative errors
  mean something), BatchNorm variances positive. Parameters that do not fit the current channel count
  are resolved deterministically (a grouped conv takes the smallest valid group count; a shuffle whose
  group count does not divide the channels is skipped; Add/Mul project the right branch with a 1x1
  conv when channel counts differ).
- ``check`` runs ``pipeline.run(..., verify=True, ep="cpu")`` and asserts the property (see its
  docstring). When the pipeline says there is nothing to prune it asserts that every group really is
  frozen, and that the builder saw no plainly prunable pattern (a dense conv reaching another dense
  conv or the head's Gemm through channel-wise ops only, or a hidden Gemm layer).

``python -m pytest tests/test_property.py --hypothesis-show-statistics`` shows what the examples
exercised (events: groups pruned, ops the pruned groups pass through); ``-m slow`` runs 3000 more
random examples and the shrinking demonstration.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import onnx
import pytest
from hypothesis import (
    HealthCheck,
    Phase,
    currently_in_test_context,
    event,
    example,
    find,
    given,
    note,
    settings,
)
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from onnxprune import pipeline
from onnxprune.errors import NothingToPrune
from onnxprune.measure import verify as measure_verify
from onnxprune.planning.options import PlanOptions
from onnxprune.planning.plan import GroupPlan, Plan
from onnxprune.rewrite import check as rewrite_check
from onnxprune.testing import checks

pytest.importorskip("onnxruntime")

TOL = checks.TOL

# ------------------------------------------------------------------------------------------------
# layer ops: the drawn data


class Conv(NamedTuple):
    cout: int  # requested output channels (grouped and depthwise adjust it to fit)
    groups: str  # "dense" | "grouped" | "depthwise"
    k: int = 1  # kernel 1 or 3, "same" padding, stride 1
    bias: bool = True


class BN(NamedTuple):
    eps: float = 1e-5


class Act(NamedTuple):
    op: str  # Relu | Sigmoid | HardSwish | LeakyRelu


class Pool(NamedTuple):
    op: str  # MaxPool | AveragePool
    k: int  # 1, 2 (asymmetric padding) or 3; stride 1, spatial size kept


class Shuffle(NamedTuple):
    g: int  # Reshape (N,g,C/g,H,W) -> Transpose -> Reshape (N,C,H,W); skipped where g does not divide C
    batch: int = 0  # batch entry of the Reshape targets: 0 (copy) or -1 (infer)


class ReshapeRT(NamedTuple):
    merge: str  # "hw": (N,C,H*W); "ch": (N,C*H,W); "chw": (N,C*H*W); "g2": (N,2,C/2,H,W); then back
    batch: int = 0


class SE(NamedTuple):
    r: int  # squeeze-excite: GlobalAveragePool -> 1x1 conv to r -> Relu -> 1x1 conv -> gate -> Mul
    gate: str = "Sigmoid"  # Sigmoid | HardSigmoid


class Branch(NamedTuple):
    op: str  # Add | Mul | Concat of two branches of the same input
    left: tuple
    right: tuple


class SplitCat(NamedTuple):
    parts: tuple  # Split on channels into len(parts) pieces, each piece through its block, then Concat
    equal: bool = False  # the equal-split encoding (num_outputs, or no sizes input) where it applies


class Head(NamedTuple):
    kind: str  # "gap_gemm" | "flatten_gemm" | "reshape_gemm" | "gap" | "none"
    hidden: int = 0  # > 0: Gemm -> Relu -> Gemm
    out: int = 3  # >= 2: the relative error is over max |output|, one scalar can cancel to ~0
    trans_b: bool = True
    batch: int = 0  # batch entry of the Reshape target of "reshape_gemm"
    bias_2d: bool = False  # Gemm bias of shape (1, out) instead of (out,)


class Model(NamedTuple):
    cin: int
    hw: int
    stem: int  # > 0: a dense 3x3 conv to ``stem`` channels first (the graph input's channels are frozen)
    layers: tuple
    head: Head
    opset: int = 18
    seed: int = 0
    const_nodes: bool = False  # weights and shape constants as Constant nodes instead of initializers


# ------------------------------------------------------------------------------------------------
# strategies

channels = st.integers(2, 12)


def convs():
    return st.builds(Conv, channels, st.sampled_from(["dense", "grouped", "depthwise"]), st.sampled_from([1, 3]),
                     st.booleans())


# one_of picks an alternative uniformly and drops alternatives that are the *same object*: convs
# (what makes groups prunable) are three distinct alternatives, so they are drawn three times as often
SIMPLE = (
    convs(), convs(), convs(),
    st.just(BN()),
    st.builds(Act, st.sampled_from(["Relu", "Sigmoid", "HardSwish", "LeakyRelu"])),
    st.builds(Pool, st.sampled_from(["MaxPool", "AveragePool"]), st.sampled_from([3, 1, 2])),
    st.builds(Shuffle, st.sampled_from([2, 3, 4]), st.sampled_from([0, -1])),
    st.builds(ReshapeRT, st.sampled_from(["hw", "ch", "chw", "g2"]), st.sampled_from([0, -1])),
    st.builds(SE, st.integers(2, 8), st.sampled_from(["Sigmoid", "HardSigmoid"])),
)
# list sizes per nesting level: top level, inside a branch, inside a branch of a branch
MAX_SIZES = (6, 3, 2)
MAX_SIZES_BIG = (10, 4, 3)


def blocks(sizes: tuple[int, ...] = MAX_SIZES, level: int = 0, min_size: int = 0):
    """A list of layers at nesting ``level``; branching layers (each twice as likely as a simple
    layer) only above the last level."""
    alternatives = list(SIMPLE)
    if level + 1 < len(sizes):
        inner = blocks(sizes, level + 1)
        for _ in range(2):
            alternatives += [
                st.builds(Branch, st.sampled_from(["Add", "Mul", "Concat"]), inner, inner),
                st.builds(SplitCat, st.lists(inner, min_size=2, max_size=3).map(tuple), st.booleans())]
    return st.lists(st.one_of(*alternatives), min_size=min_size, max_size=sizes[level]).map(tuple)


# The top level has at least one layer: hypothesis draws (and shrinks towards) the empty list far more
# often than its share would be, and head-only graphs are covered by explicit @example cases.
top_layers = blocks(MAX_SIZES, min_size=1)

heads = st.builds(
    Head,
    st.sampled_from(["gap_gemm", "flatten_gemm", "reshape_gemm", "gap_gemm", "flatten_gemm", "gap", "none"]),
    st.one_of(st.just(0), st.integers(2, 12), st.integers(2, 12)), st.integers(2, 6), st.booleans(),
    st.sampled_from([0, -1]), st.booleans())

# most real networks start with a dense stem conv: without one, chains of depthwise convs, pools and
# activations stay tied to the (frozen) graph input. A stem two times in three.
stems = st.one_of(channels, st.integers(2, 12), st.just(0))



def model_specs(layers=top_layers):
    return st.builds(Model, st.integers(1, 4), st.sampled_from([4, 6]), stems, layers, heads,
                     st.sampled_from([18, 14, 21]), st.integers(0, 2**32 - 1), st.booleans())


models = model_specs()
big_models = model_specs(blocks(MAX_SIZES_BIG, min_size=1))
any_models = st.one_of(models, big_models)  # shrinking moves a failure to the small alternative

plan_options = st.builds(
    PlanOptions,
    ratio=st.one_of(st.sampled_from([0.5, 0.25, 0.75, 0.9, 0.0]), st.floats(0.0, 0.9)),
    round_to=st.integers(1, 4),
    global_=st.booleans(),
    importance=st.sampled_from(["l2", "l1", "random", "bn"]),
    seed=st.integers(0, 1000),
    conv_groups=st.sampled_from(["positions", "whole"]),
)


# ------------------------------------------------------------------------------------------------
# the deterministic builder


class Built(NamedTuple):
    model: onnx.ModelProto
    out_shape: tuple[int, ...]  # for batch N = 1 (the batch of the pipeline's generated inputs)
    expect_prunable: bool


CHANNELWISE = (BN, Act, Pool, SE)  # keep a dense conv's output channels open for the oracle


class _Builder:
    def __init__(self, spec: Model):
        self.spec = spec
        self.hw = spec.hw
        self.rng = np.random.default_rng(spec.seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.count = 0
        self.expect_prunable = False
        self.open_at_end = False
        self.implicit_splits: set[str] = set()

    # -- helpers ----------------------------------------------------------------------------------
    def fresh(self, base: str) -> str:
        self.count += 1
        return f"{base}{self.count}"

    def const(self, base: str, value: np.ndarray) -> str:
        name = self.fresh(base)
        tensor = numpy_helper.from_array(np.asarray(value), name)
        if self.spec.const_nodes:
            self.nodes.append(helper.make_node("Constant", [], [name], name=f"{name}_const", value=tensor))
        else:
            self.inits.append(tensor)
        return name

    def f32(self, base: str, value) -> str:
        return self.const(base, np.asarray(value, dtype=np.float32))

    def i64(self, base: str, value) -> str:
        return self.const(base, np.asarray(value, dtype=np.int64))

    def node(self, op: str, inputs: list[str], n_out: int = 1, **attrs) -> list[str]:
        name = self.fresh(op.lower())
        outs = [f"{name}_out{i}" if n_out > 1 else f"{name}_out" for i in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=name, **attrs))
        return outs

    # -- layers ---------------------------------------------------------------------------------
    @staticmethod
    def conv_groups(c: int, layer: Conv) -> tuple[int, int]:
        """(group, output channels) the builder uses for ``layer`` on ``c`` input channels."""
        if layer.groups == "grouped":
            divs = [d for d in range(2, c + 1) if c % d == 0 and c // d >= 2]
            if divs:
                g = divs[0]
                return g, max(g, round(layer.cout / g) * g)
        elif layer.groups == "depthwise":
            return c, c * max(1, min(2, layer.cout // c))
        return 1, layer.cout

    def conv(self, x: str, c: int, layer: Conv) -> tuple[str, int]:
        g, cout = self.conv_groups(c, layer)
        k, p = layer.k, layer.k // 2
        fan_in = (c // g) * k * k
        w = self.rng.standard_normal((cout, c // g, k, k)) * math.sqrt(2.0 / fan_in)
        inputs = [x, self.f32("W", w)]
        if layer.bias:
            inputs.append(self.f32("B", self.rng.standard_normal(cout) * 0.1))
        (y,) = self.node("Conv", inputs, kernel_shape=[k, k], pads=[p, p, p, p], strides=[1, 1], group=g)
        return y, cout

    def bn(self, x: str, c: int, layer: BN) -> tuple[str, int]:
        r = self.rng
        (y,) = self.node("BatchNormalization", [
            x, self.f32("gamma", r.uniform(0.5, 1.5, c)), self.f32("beta", r.standard_normal(c) * 0.1),
            self.f32("mean", r.standard_normal(c) * 0.1), self.f32("var", r.uniform(0.5, 1.5, c))],
            epsilon=layer.eps)
        return y, c

    def act(self, x: str, c: int, layer: Act) -> tuple[str, int]:
        attrs = {"alpha": 0.1} if layer.op == "LeakyRelu" else {}
        (y,) = self.node(layer.op, [x], **attrs)
        return y, c

    def pool(self, x: str, c: int, layer: Pool) -> tuple[str, int]:
        k = layer.k
        pads = {1: [0, 0, 0, 0], 2: [0, 0, 1, 1], 3: [1, 1, 1, 1]}[k]
        (y,) = self.node(layer.op, [x], kernel_shape=[k, k], pads=pads, strides=[1, 1])
        return y, c

    def shuffle(self, x: str, c: int, layer: Shuffle) -> tuple[str, int]:
        g, hw, b = layer.g, self.hw, layer.batch
        if c % g:
            return x, c
        (t,) = self.node("Reshape", [x, self.i64("shape", [b, g, c // g, hw, hw])])
        (t,) = self.node("Transpose", [t], perm=[0, 2, 1, 3, 4])
        (y,) = self.node("Reshape", [t, self.i64("shape", [b, c, hw, hw])])
        return y, c

    def reshape_rt(self, x: str, c: int, layer: ReshapeRT) -> tuple[str, int]:
        hw, b = self.hw, layer.batch
        if layer.merge == "g2" and c % 2:
            return x, c
        mid = {"hw": [b, c, hw * hw], "ch": [b, c * hw, hw], "chw": [b, c * hw * hw],
               "g2": [b, 2, c // 2, hw, hw]}[layer.merge]
        (t,) = self.node("Reshape", [x, self.i64("shape", mid)])
        (y,) = self.node("Reshape", [t, self.i64("shape", [b, c, hw, hw])])
        return y, c

    def se(self, x: str, c: int, layer: SE) -> tuple[str, int]:
        (s,) = self.node("GlobalAveragePool", [x])
        s, r = self.conv(s, c, Conv(layer.r, "dense", 1, True))
        (s,) = self.node("Relu", [s])
        s, _ = self.conv(s, r, Conv(c, "dense", 1, True))
        (s,) = self.node(layer.gate, [s])
        (y,) = self.node("Mul", [x, s])
        return y, c

    def branch(self, x: str, c: int, layer: Branch, depth: int) -> tuple[str, int]:
        lx, lc = self.block(x, c, layer.left, depth + 1)
        rx, rc = self.block(x, c, layer.right, depth + 1)
        if layer.op == "Concat":
            (y,) = self.node("Concat", [lx, rx], axis=1)
            return y, lc + rc
        if rc != lc:
            rx, _ = self.conv(rx, rc, Conv(lc, "dense", 1, True))
        (y,) = self.node(layer.op, [lx, rx])
        return y, lc

    def split(self, x: str, c: int, layer: SplitCat, depth: int) -> tuple[str, int]:
        n = len(layer.parts)
        if c < n:
            return x, c
        if layer.equal and self.spec.opset >= 18:
            base = -(-c // n)  # num_outputs: equal chunks, the last one smaller
            sizes = [base] * (n - 1) + [c - base * (n - 1)]
            if sizes[-1] <= 0:
                return x, c
            outs = self.node("Split", [x], n_out=n, axis=1, num_outputs=n)
        elif layer.equal and c % n == 0 and x not in self.implicit_splits:
            # onnxruntime (1.32, any optimization level above "disable all") merges two Splits of one
            # tensor without sizes as common subexpressions even when their output counts differ: the
            # original would not run. One implicit Split per tensor.
            self.implicit_splits.add(x)
            sizes = [c // n] * n
            outs = self.node("Split", [x], n_out=n, axis=1)
        else:
            sizes = [c // n + (1 if i < c % n else 0) for i in range(n)]
            outs = self.node("Split", [x, self.i64("split", sizes)], n_out=n, axis=1)
        ys, cs = [], []
        for part, t, s in zip(layer.parts, outs, sizes, strict=True):
            y, cy = self.block(t, s, part, depth + 1)
            ys.append(y)
            cs.append(cy)
        (y,) = self.node("Concat", ys, axis=1)
        return y, sum(cs)

    def block(self, x: str, c: int, layers, depth: int, open_dense: bool = False) -> tuple[str, int]:
        """Apply ``layers``. ``open_dense``: the current channels come from a dense conv through
        channel-wise ops only (top level), so a dense conv consuming them makes a prunable group."""
        simple = {BN: self.bn, Act: self.act, Pool: self.pool, Shuffle: self.shuffle,
                  ReshapeRT: self.reshape_rt, SE: self.se}
        for layer in layers:
            kind = type(layer)
            if kind is Conv:
                dense = self.conv_groups(c, layer)[0] == 1
                if depth == 0 and open_dense and dense:
                    self.expect_prunable = True
                x, c = self.conv(x, c, layer)
                open_dense = dense and c >= 2
            elif kind is Branch:
                x, c = self.branch(x, c, layer, depth)
                open_dense = False
            elif kind is SplitCat:
                x, c = self.split(x, c, layer, depth)
                open_dense = False
            else:
                x, c = simple[kind](x, c, layer)
                open_dense = open_dense and kind in CHANNELWISE
        if depth == 0:
            self.open_at_end = open_dense
        return x, c

    def gemm(self, x: str, fin: int, fout: int, head: Head, last: bool = False) -> str:
        w = self.rng.standard_normal((fin, fout)) * math.sqrt(2.0 / fin)
        if head.trans_b:
            w = w.T
        # the output layer gets an O(1) bias: a few logits that happen to cancel to ~1e-4 (dead ReLUs,
        # a 2-unit hidden layer) would turn float32 rounding into a "relative error" above 1e-4
        b = self.rng.standard_normal((1, fout) if head.bias_2d else fout) * (1.0 if last else 0.1)
        (y,) = self.node("Gemm", [x, self.f32("W", w), self.f32("B", b)], transB=int(head.trans_b))
        return y

    def head(self, x: str, c: int, head: Head) -> tuple[str, tuple[int, ...]]:
        hw = self.hw
        if head.kind == "none":
            return x, (1, c, hw, hw)
        if head.kind in ("gap", "gap_gemm"):
            (x,) = self.node("GlobalAveragePool", [x])
            if head.kind == "gap":
                return x, (1, c, 1, 1)
            (x,) = self.node("Flatten", [x], axis=1)
            feats = c
        elif head.kind == "flatten_gemm":
            (x,) = self.node("Flatten", [x], axis=1)
            feats = c * hw * hw
        else:
            (x,) = self.node("Reshape", [x, self.i64("shape", [head.batch, c * hw * hw])])
            feats = c * hw * hw
        if self.open_at_end:
            self.expect_prunable = True
        if head.hidden:
            x = self.gemm(x, feats, head.hidden, head)
            (x,) = self.node("Relu", [x])
            feats = head.hidden
            self.expect_prunable = True
        return self.gemm(x, feats, head.out, head, last=True), (1, head.out)

    def build(self) -> Built:
        s = self.spec
        x, c = "x", s.cin
        if s.stem:
            x, c = self.conv(x, c, Conv(s.stem, "dense", 3, True))
        x, c = self.block(x, c, s.layers, 0, open_dense=bool(s.stem) and c >= 2)
        y, out_shape = self.head(x, c, s.head)
        (out,) = self.node("Identity", [y])
        graph = helper.make_graph(
            self.nodes, "prop",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", s.cin, s.hw, s.hw])],
            [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["N", *out_shape[1:]])],
            initializer=self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", s.opset)], ir_version=8)
        return Built(model, out_shape, self.expect_prunable)


def build_model(spec: Model) -> Built:
    return _Builder(spec).build()


# ------------------------------------------------------------------------------------------------
# the property


def _note(text: str) -> None:
    if currently_in_test_context():
        note(text)


def _event(text: str) -> None:
    if currently_in_test_context():
        event(text)


def _statistics(spec: Model, res) -> None:
    """Events for ``--hypothesis-show-statistics``: what the examples exercise."""
    _event(f"layers: {min(len(spec.layers), 4)}{'+' if len(spec.layers) >= 4 else ''}")
    if res is None:
        _event("nothing to prune")
        return
    pruned = res.plan.pruned()
    _event(f"pruned groups: {min(len(pruned), 3)}{'+' if len(pruned) >= 3 else ''}")
    cg = res.analysis.cg
    nodes = [cg.node_by_name[n] for gp in pruned for n in cg.groups[gp.group].nodes]
    for op in sorted({n.op_type for n in nodes}):
        _event(f"pruned through {op}")
    if any(n.op_type == "Conv" and any(a.name == "group" and a.i > 1 for a in n.attribute) for n in nodes):
        _event("pruned through a grouped or depthwise Conv")


def check(spec: Model, opts: PlanOptions):
    """Build ``spec``, prune it with ``opts``, assert the property, return the pipeline Result (None when
    there is nothing to prune).

    The property: the pruned model P verifies exactly against the masked original M (relative error
    < 1e-4); P passes the full ONNX checker; P's output has the original's shape and still follows a
    dynamic batch; the graph interface (inputs, declared outputs) is unchanged; parameters and MACs do
    not grow and parameters shrink when anything was removed; a plan that removes nothing leaves the
    function unchanged. NothingToPrune only where every group is frozen (and no prunable pattern).
    """
    built = build_model(spec)
    onnx.checker.check_model(built.model, full_check=True)  # the generator itself is sound
    _note(f"ops: {[n.op_type for n in built.model.graph.node if n.op_type != 'Constant']}")
    try:
        res = pipeline.run(built.model, opts, verify=True, ep="cpu", tol=TOL)
    except NothingToPrune:
        an = pipeline.analyze_model(built.model, head_mode=pipeline.head_mode_for(opts))
        live = [g for g in an.cg.groups if not g.frozen and g.size > 1 and not g.is_approximate]
        assert not live, f"NothingToPrune, yet groups of {[g.producers for g in live]} are prunable"
        assert not built.expect_prunable, "NothingToPrune on a graph with a plainly prunable dense layer"
        _statistics(spec, None)
        return None
    _statistics(spec, res)
    v = res.verification
    _note(f"pruned groups (id, units, kept): {[(gp.group, gp.size, len(gp.keep)) for gp in res.plan.pruned()]}")
    _note(f"verification: {v.to_json()}")
    assert v.exact, v.note
    assert v.passed, f"pruned model differs from the masked original: rel_error {[o.rel_error for o in v.outputs]}"
    for o in v.outputs:
        assert o.rel_error < TOL
        assert o.shape == built.out_shape, f"output shape {o.shape}, original {built.out_shape}"
        if not res.plan.pruned():
            assert o.fidelity < TOL, "the plan removes nothing, yet the output changed"
    onnx.checker.check_model(res.pruned, full_check=True)
    assert [(i.name, i.type) for i in res.pruned.graph.input] == [(i.name, i.type) for i in built.model.graph.input]
    assert [(o.name, o.type) for o in res.pruned.graph.output] == [(o.name, o.type) for o in built.model.graph.output]
    assert res.after.params <= res.before.params and res.after.macs <= res.before.macs
    if res.plan.pruned():
        assert res.after.params < res.before.params
    # the batch axis is still dynamic
    (y2,) = checks.run(res.pruned, {"x": np.ones((2, spec.cin, spec.hw, spec.hw), np.float32)}, threads=1)
    assert y2.shape == (2, *built.out_shape[1:]) and np.isfinite(y2).all()
    return res


PROPERTY_SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])
HEAD_ONLY = [Model(3, 4, 0, (), Head("gap_gemm", 6, 2)), Model(2, 6, 5, (), Head("flatten_gemm", 0, 3, False)),
             Model(2, 4, 4, (), Head("reshape_gemm", 4, 3, True, -1, True)), Model(1, 4, 3, (), Head("none"))]


@settings(max_examples=200, derandomize=True, **PROPERTY_SETTINGS)
@given(spec=any_models, opts=plan_options)
@example(spec=HEAD_ONLY[0], opts=PlanOptions())
@example(spec=HEAD_ONLY[1], opts=PlanOptions(ratio=0.75, round_to=2))
@example(spec=HEAD_ONLY[2], opts=PlanOptions(global_=True))
@example(spec=HEAD_ONLY[3], opts=PlanOptions())
def test_random_dags_prune_exactly(spec, opts):
    check(spec, opts)


@pytest.mark.slow
@settings(max_examples=3000, **PROPERTY_SETTINGS)
@given(spec=any_models, opts=plan_options)
def test_random_dags_prune_exactly_many(spec, opts):
    check(spec, opts)


# ------------------------------------------------------------------------------------------------
# the property can fail, and a failure shrinks


CHAIN = Model(cin=3, hw=4, stem=0, layers=(Conv(6, "dense", 3), Act("Relu"), Conv(8, "dense", 1)),
              head=Head("gap_gemm", 0, 3))


def _swap_kept_units(plan: Plan, only=None) -> Plan:
    """Same counts, wrong channels: the first pruned group (among ``only``, if given) keeps one removed
    unit instead of a kept one."""
    groups = dict(plan.groups)
    for gid, gp in groups.items():
        if gp.removed > 0 and (only is None or gid in only):
            removed = np.setdiff1d(np.arange(gp.size), gp.keep)
            keep = np.sort(np.concatenate([gp.keep[1:], removed[:1]]))
            groups[gid] = GroupPlan(gp.group, gp.size, keep, gp.approximate)
            break
    return Plan(groups, plan.frozen, plan.options)


@pytest.fixture
def broken_rewrite(monkeypatch):
    """The pruned model is built from a wrong plan; the masked original from the right one."""
    real = rewrite_check.rewrite
    broken = lambda model, cg, plan: real(model, cg, _swap_kept_units(plan))  # noqa: E731
    monkeypatch.setattr(rewrite_check, "rewrite", broken)
    monkeypatch.setattr(measure_verify, "rewrite", broken)


@pytest.fixture
def broken_concat_rewrite(monkeypatch):
    """A bug that only shows in groups that pass through a Concat: a failing graph must have one."""
    real = rewrite_check.rewrite

    def rewrite(model, cg, plan):
        concat = {g.id for g in cg.groups if any(cg.node_by_name[n].op_type == "Concat" for n in g.nodes)}
        return real(model, cg, _swap_kept_units(plan, only=concat))

    monkeypatch.setattr(rewrite_check, "rewrite", rewrite)
    monkeypatch.setattr(measure_verify, "rewrite", rewrite)


def test_chain_passes():
    res = check(CHAIN, PlanOptions(ratio=0.5))
    assert res is not None and [gp.size for gp in res.plan.pruned()] == [6, 8]


def test_check_reports_a_wrong_plan(broken_rewrite):
    with pytest.raises(AssertionError, match="differs from the masked original"):
        check(CHAIN, PlanOptions(ratio=0.5))


def test_property_fails_on_a_wrong_plan(broken_rewrite):
    """The property test itself (same strategies, same check) fails at once on a wrong rewrite."""

    @settings(max_examples=50, derandomize=True, database=None, phases=[Phase.generate],
              report_multiple_bugs=False, **PROPERTY_SETTINGS)
    @given(spec=models, opts=plan_options)
    def prop(spec, opts):
        check(spec, opts)

    with pytest.raises(AssertionError, match="differs from the masked original"):
        prop()


def _find_failure(strategy):
    def fails(example) -> bool:
        try:
            check(*example)
        except AssertionError:
            return True
        return False

    return find(strategy, fails, settings=settings(max_examples=500, database=None, derandomize=True,
                                                   deadline=None, suppress_health_check=list(HealthCheck)))


@pytest.mark.slow
def test_failure_shrinks_to_a_minimal_graph(broken_concat_rewrite):
    """A bug only Concat groups show: hypothesis first meets it in some larger random graph and
    shrinks it to the stem and one Concat of two empty branches."""
    spec, opts = _find_failure(st.tuples(models, plan_options))
    # e.g. Model(cin=1, hw=4, stem=0, layers=(Conv(4, 'dense', 1, False), SplitCat(((), ()), False)),
    # head=Head('gap_gemm', 0, 1, ...)): one producer conv (stem or layer), one Concat, the head
    assert spec.layers[-1] in (Branch("Concat", (), ()), SplitCat(((), ()), False)), spec
    assert len(spec.layers) + bool(spec.stem) == 2, spec
    assert spec.head.kind == "gap_gemm" and spec.head.hidden == 0, spec
    assert len(build_model(spec).model.graph.node) <= 8, spec
    assert opts.ratio == 0.5 and not opts.global_ and opts.round_to == 1, opts
