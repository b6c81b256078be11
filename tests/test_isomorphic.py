"""Isomorphic ranking (``PlanOptions.isomorphic``, ``planning.plan.isomorphic_classes``): groups of the
same structure are ranked together, each class at the target ratio.

- On torchvision ResNet-18 (legacy export, BN folded) the classes are what the architecture says:
  the inner groups (conv1 -> conv2) of the two blocks of a stage are one class, for every stage (the
  first block's input width, the previous stage's, is a width and does not count); no class spans
  two stages; each stage's trunk (with the stem, stage 1's) is a class of its own.
- Each class removes floor(ratio x its units), pooled: the units removed are the lowest scores of
  the class (so its groups may keep different counts), and the pruned model verifies.
- On a text model with two identical blocks whose scores differ in spread, the pooled ranking takes
  more from the block with the weak channels than a uniform ratio would.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from onnx import numpy_helper

from onnxprune import pipeline
from onnxprune.errors import UserError
from onnxprune.planning.importance import group_importance
from onnxprune.planning.options import PlanOptions
from onnxprune.planning.plan import group_signature, isomorphic_classes, make_plan
from onnxprune.testing import checks, graphs

# x -> conv0 (8) -> [conv a (8 -> 6) -> relu -> conv b (6 -> 8)] twice, each block residual, -> conv out
BLOCKS = """
<ir_version: 8, opset_import: ["" : 17]>
blocks (float[1,3,8,8] x) => (float[1,4,8,8] y)
<float[8,3,3,3] w0, float[6,8,3,3] wa1, float[6] ba1, float[8,6,3,3] wb1,
 float[6,8,3,3] wa2, float[6] ba2, float[8,6,3,3] wb2, float[4,8,1,1] wo>
{
  h0 = Conv <pads=[1,1,1,1]> (x, w0)
  a1 = Conv <pads=[1,1,1,1]> (h0, wa1, ba1)
  r1 = Relu (a1)
  b1 = Conv <pads=[1,1,1,1]> (r1, wb1)
  h1 = Add (h0, b1)
  a2 = Conv <pads=[1,1,1,1]> (h1, wa2, ba2)
  r2 = Relu (a2)
  b2 = Conv <pads=[1,1,1,1]> (r2, wb2)
  h2 = Add (h1, b2)
  y = Conv (h2, wo)
}
"""


def blocks_model():
    """Block 1's inner channels: one strong, five weak (spread scores); block 2's as built."""
    m = graphs.build(BLOCKS)
    inits = {i.name: i for i in m.graph.initializer}
    for name, axis in (("wa1", 0), ("ba1", 0), ("wb1", 1)):
        w = np.moveaxis(numpy_helper.to_array(inits[name]).copy(), axis, 0)
        w[1:] *= 0.05
        inits[name].CopyFrom(numpy_helper.from_array(np.moveaxis(w, 0, axis), name))
    return m


def test_identical_blocks_share_a_class_and_are_ranked_together():
    an = pipeline.analyze_model(blocks_model())
    cg = an.cg
    groups = [g for g in cg.groups if g.prunable]
    classes = isomorphic_classes(cg, groups)
    inner = [c for c in classes if len(c) > 1]
    assert len(inner) == 1 and sorted(g.size for g in inner[0]) == [6, 6]
    assert len(classes) == len(groups) - 1  # the trunk (8) is a class of its own
    a, b = inner[0]
    assert group_signature(cg, a) == group_signature(cg, b)
    plan = make_plan(cg, PlanOptions(ratio=0.5, isomorphic=True))
    kept = {tuple(cg.groups[gid].producers): len(gp.keep) for gid, gp in plan.groups.items()}
    by_block = {p[0]: n for p, n in kept.items() if len(p) == 1}
    assert by_block["conv_1"] + by_block["conv_5"] == 6  # 12 units, 6 removed, pooled
    assert (by_block["conv_1"], by_block["conv_5"]) == (1, 5)  # the weak channels go first, pooled
    uniform = make_plan(cg, PlanOptions(ratio=0.5))
    assert all(len(gp.keep) == 3 for gid, gp in uniform.groups.items() if cg.groups[gid].size == 6)
    entry = plan.importance["isomorphic"]
    assert sorted(len(e["groups"]) for e in entry) == [1, 2]
    assert plan.options["isomorphic"] is True


def test_isomorphic_options_are_checked():
    with pytest.raises(UserError, match="use one"):
        PlanOptions(isomorphic=True, greedy=True, importance="group-fisher").validate()


@pytest.fixture(scope="module")
def resnet18():
    pytest.importorskip("torch")
    pytest.importorskip("torchvision")
    from onnxprune.models import zoo

    return str(zoo.export("resnet18", "legacy"))


def _stage(producer: str) -> str:
    return producer.split("/")[1]  # "/layer2/layer2.0/conv1/Conv" -> "layer2"


def test_resnet18_classes_are_the_blocks_of_a_stage(resnet18):
    an = pipeline.analyze_model(resnet18)
    groups = [g for g in an.cg.groups if g.prunable]
    classes = isomorphic_classes(an.cg, groups)
    pairs = [c for c in classes if len(c) > 1]
    assert len(pairs) == 4 and all(len(c) == 2 for c in pairs)
    for c in pairs:
        stages = {_stage(p) for g in c for p in g.producers}
        assert len(stages) == 1
        stage = stages.pop()
        assert sorted(p for g in c for p in g.producers) == [f"/{stage}/{stage}.{i}/conv1/Conv" for i in (0, 1)]
    assert sorted(_stage(c[0].producers[0]) for c in pairs) == ["layer1", "layer2", "layer3", "layer4"]
    assert len(classes) == len(groups) - 4  # every other group (the stage trunks) is a class of its own


def test_resnet18_isomorphic_plan_pools_each_class_and_verifies(resnet18):
    ratio = 0.3
    res = pipeline.run(resnet18, PlanOptions(ratio=ratio, isomorphic=True), verify=True, ep="cpu")
    checks.assert_report_verified(res.to_json())
    assert max(o.rel_error for o in res.verification.outputs) < checks.TOL
    cg, plan = res.analysis.cg, res.plan
    groups = [cg.groups[gid] for gid in plan.groups]
    for c in isomorphic_classes(cg, groups):
        units = sum(g.size for g in c)
        kept = sum(len(plan.groups[g.id].keep) for g in c)
        assert units - kept == math.floor(units * ratio), [g.producers for g in c]
        scores = {g.id: group_importance(cg, g, "l2") for g in c}
        removed_max = max(float(np.max(np.delete(scores[g.id], plan.groups[g.id].keep))) for g in c)
        kept_min = min(float(np.min(scores[g.id][plan.groups[g.id].keep])) for g in c)
        assert removed_max <= kept_min  # pooled: the class's lowest scores go
    entry = plan.importance["isomorphic"]
    assert sum(e["units"] for e in entry) == sum(g.size for g in groups)
    assert sum(e["kept"] for e in entry) == sum(len(gp.keep) for gp in plan.groups.values())
