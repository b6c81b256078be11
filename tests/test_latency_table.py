"""The per-layer latency table (``measure.latency.node_latencies``) that ``--normalize latency`` reads:
one entry per node of the model under its own name, from onnxruntime's profile. No timing is
asserted (the shared machine makes durations noise); the mapping and its use are."""

from __future__ import annotations

import numpy as np
import onnx

from onnxprune.measure.latency import node_latencies
from onnxprune.testing.graphs import small_cnn


def test_every_node_has_a_non_negative_time_under_its_own_name():
    m = small_cnn()
    for i, n in enumerate(m.graph.node):
        n.name = n.name or f"n{i}"
    x = {m.graph.input[0].name: np.random.default_rng(0).standard_normal(
        [d.dim_value or 1 for d in m.graph.input[0].type.tensor_type.shape.dim]).astype(np.float32)}
    t = node_latencies(m, x, "cpu", warmup=1, runs=3)
    assert set(t.seconds) == {n.name for n in m.graph.node}
    assert all(v >= 0.0 for v in t.seconds.values())
    assert t.total_s > 0 and t.ep == "cpu" and t.runs == 3
    node = m.graph.node[0]
    assert t(node) == t.seconds[node.name]
    assert t(onnx.helper.make_node("Relu", ["a"], ["b"], name="not-in-the-model")) == 0.0
    assert t.to_json()["nodes"] == len(m.graph.node)
