"""``group-fisher --normalize latency``: a unit's Δ divided by the measured time its removal saves,
each node's time from a per-node table (``measure.latency.node_latencies`` in the pipeline) taken as
linear in its channel axes, as MACs are for ``flops``. Independent checks: a table proportional to
the MACs ranks as ``flops`` does (the scores scale by the constant), a table that makes one node
free moves the ranking of the groups it touches, the greedy schedule with a MAC-proportional table
removes what the flops greedy removes, and a run without a table is refused."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from onnxprune import pipeline  # noqa: E402
from onnxprune.errors import UserError  # noqa: E402
from onnxprune.planning import grad_importance as gi  # noqa: E402
from onnxprune.planning.options import PlanOptions  # noqa: E402
from onnxprune.runtime.calib import CalibSpec, open_calib  # noqa: E402
from onnxprune.testing import graphs  # noqa: E402

CNN = graphs.GRAD_CNN.replace("TAIL", graphs.GRAD_CNN_HEAD)


@pytest.fixture(scope="module")
def collected(tmp_path_factory):
    model = graphs.build(CNN, positive=("v1",))
    an = pipeline.analyze_model(model)
    path = tmp_path_factory.mktemp("calib") / "calib.npz"
    np.savez(path, x=np.random.default_rng(1).standard_normal((16, 3, 8, 8)).astype(np.float32))
    view = open_calib(an.model, CalibSpec(path=str(path), holdout=1 / 16)).fit
    groups = [g for g in an.cg.groups if g.prunable]
    gopts = gi.GradOptions("group-fisher")
    from onnxprune.runtime.gradients import collect_gradients

    grads = collect_gradients(an.model, an.registry, view, gi.gradient_request(an.cg, groups, gopts), device="cpu")
    return an, groups, grads


def _scores(an, groups, grads, normalize, latency_of=None):
    return gi.gradient_scores(an.cg, groups, gi.GradOptions("group-fisher", normalize=normalize), grads,
                              latency_of=latency_of)


def test_a_table_proportional_to_the_macs_scores_as_flops_does(collected):
    an, groups, grads = collected
    macs = gi.handler_macs(an.cg)
    flops = _scores(an, groups, grads, "flops")
    lat = _scores(an, groups, grads, "latency", latency_of=lambda n: 3e-9 * macs(n))
    assert lat.scores.keys() == flops.scores.keys()
    for gid in flops.scores:
        np.testing.assert_allclose(lat.scores[gid], flops.scores[gid] / 3e-9, rtol=1e-9)
    assert lat.node_latency and all(v >= 0 for v in lat.node_latency.values())


def test_a_free_node_changes_what_its_groups_save(collected):
    an, groups, grads = collected
    macs = gi.handler_macs(an.cg)
    weighted = [n for n in an.model.graph.node if macs(n) > 0 and n.op_type == "Conv"]
    free = weighted[-1].name
    table = {n.name: 1e-9 * macs(n) for n in an.model.graph.node}
    base = _scores(an, groups, grads, "latency", latency_of=lambda n: table.get(n.name, 0.0))
    table[free] = 0.0
    cheap = _scores(an, groups, grads, "latency", latency_of=lambda n: table.get(n.name, 0.0))
    changed = [gid for gid in base.scores if not np.allclose(base.scores[gid], cheap.scores[gid])]
    assert changed, "making a conv free must change the savings of a group it reads or writes"
    for g in groups:
        if g.id in changed:
            assert any(s.node == free for s in g.slots)


def test_greedy_with_a_mac_proportional_table_removes_what_the_flops_greedy_removes(collected):
    an, groups, grads = collected
    macs = gi.handler_macs(an.cg)
    flops = _scores(an, groups, grads, "flops")
    count = sum(g.size for g in groups) // 3
    a = gi.greedy_removals(an.cg, groups, flops.deltas, "flops", count=count, batch=0.0)
    b = gi.greedy_removals(an.cg, groups, flops.deltas, "latency", count=count, batch=0.0,
                           latency_of=lambda n: 5e-9 * macs(n))
    assert a == b and sum(len(v) for v in a.values()) == count


def test_latency_without_a_table_is_refused(collected):
    an, groups, grads = collected
    with pytest.raises(UserError, match="latency table"):
        _scores(an, groups, grads, "latency")
    with pytest.raises(UserError, match="latency table"):
        gi.unit_savings(an.cg, groups[0], "latency")
    assert PlanOptions(importance="group-fisher", normalize="latency").validate() is None
