"""Python API in Torch-Pruning's vocabulary: DependencyGraph, groups, details(), Pruner.step()."""

from __future__ import annotations

import numpy as np
import pytest

from onnxprune.api import DependencyGraph, Pruner
from onnxprune.errors import UserError
from onnxprune.planning.options import PlanOptions
from onnxprune.testing import checks, graphs

CNN = """<ir_version: 8, opset_import: ["" : 17]>
g (float[N,3,8,8] x) => (float[N,4,8,8] y)
<float[8,3,3,3] w1, float[8] b1, float[8,1,3,3] wd, float[4,8,1,1] w2>
{ t = Conv<pads=[1,1,1,1]>(x, w1, b1)  r = Relu(t)  d = Conv<group=8, pads=[1,1,1,1]>(r, wd)
  y = Conv(d, w2) }"""


@pytest.fixture
def dg():
    return DependencyGraph(graphs.from_text(CNN))


def test_groups_and_details(dg):
    prunable = list(dg.prunable_groups())
    assert len(prunable) == 1
    g = prunable[0]
    assert g.size == 8 and g.status == "prunable"
    text = g.details()
    # every member of the group is listed: producer weight, bias, the depthwise conv and the consumer
    for name in ("w1", "b1", "wd", "w2"):
        assert name in text
    assert "<producer>" in text and "<consumer>" in text
    frozen = [x for x in dg.groups if x.status == "frozen"]
    assert any("graph input" in x.frozen[0] for x in frozen)


def test_get_group_by_tensor(dg):
    assert dg.get_group("t", 1).id == dg.get_group("w2", 1).id
    with pytest.raises(UserError):
        dg.get_group("nope", 1)


def test_prune_by_indices_removes_exactly_those(dg):
    g = dg.get_group("t", 1)
    pruned = dg.prune({g.id: [1, 5, 6]})
    w1 = checks.inits(pruned)["w1"]
    orig = checks.inits(graphs.from_text(CNN))["w1"]
    np.testing.assert_array_equal(w1, orig[[0, 2, 3, 4, 7]])
    assert checks.run(pruned, {"x": np.ones((2, 3, 8, 8), np.float32)})[0].shape == (2, 4, 8, 8)


def test_pruner_step_and_history(dg):
    pr = Pruner(dg, PlanOptions(ratio=0.5))
    pruned = pr.step()
    assert checks.shapes_of(pruned)["w1"] == (4, 3, 3, 3)
    assert len(pr.history) == 1 and pr.history[0]["groups"][0]["kept_units"] == 4


def test_interactive_step_with_own_indices(dg):
    pr = Pruner(dg, PlanOptions(ratio=0.5))
    seen = 0
    for group in pr.step(interactive=True):
        seen += 1
        group.prune(idxs=[0, 1])
    assert seen == 1
    pruned = pr.apply()
    assert checks.shapes_of(pruned)["wd"] == (6, 1, 3, 3)


def test_group_prune_outside_interactive_is_an_error(dg):
    with pytest.raises(UserError):
        next(dg.prunable_groups()).prune()
