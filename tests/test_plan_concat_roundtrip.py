"""A plan file names each group by one space (its anchor) and lists that space's kept elements. A
group joined by a Concat (SqueezeNet's fire module: expand1x1 and expand3x3 concatenated) has spaces
that hold only part of its units; anchoring on one of those lost the other producer's units and the
replayed plan removed all of them. The anchor must hold every unit: replaying the saved plan gives the
same model, and standalone ``verify`` with the file passes."""

from __future__ import annotations

import numpy as np
import onnx

from onnxprune.testing import graphs
from onnxprune.testing.checks import rel_err as rel

FIRE = """
<ir_version: 8, opset_import: ["" : 17]>
fire (float[1,3,12,12] x) => (float[1,10] y)
<float[8,3,3,3] w0, float[8] b0, float[6,8,1,1] ws, float[6] bs, float[8,6,1,1] we1, float[8] be1,
 float[8,6,3,3] we3, float[8] be3, float[10,16,1,1] wc, float[10] bc>
{
  c0 = Conv <pads=[1,1,1,1]> (x, w0, b0)
  r0 = Relu (c0)
  s = Conv (r0, ws, bs)
  rs = Relu (s)
  e1 = Conv (rs, we1, be1)
  r1 = Relu (e1)
  e3 = Conv <pads=[1,1,1,1]> (rs, we3, be3)
  r3 = Relu (e3)
  cat = Concat <axis=1> (r1, r3)
  c = Conv (cat, wc, bc)
  p = GlobalAveragePool (c)
  y = Flatten (p)
}
"""



def test_concat_group_plan_replays(tmp_path, run_main, ort_run):
    src = tmp_path / "fire.onnx"
    onnx.save(graphs.build(FIRE, seed=0), str(src))
    first, again, plan = tmp_path / "a.onnx", tmp_path / "b.onnx", tmp_path / "plan.json"
    r = run_main("prune", src, "-o", first, "--ratio", "0.5", "--save-plan", plan, "--verify")
    assert r.returncode == 0, r.stdout + r.stderr
    r = run_main("prune", src, "-o", again, "--load-plan", plan, "--verify")
    assert r.returncode == 0, r.stdout + r.stderr
    feeds = {"x": np.random.default_rng(1).standard_normal((1, 3, 12, 12)).astype(np.float32)}
    assert rel(ort_run(str(again), feeds)[0], ort_run(str(first), feeds)[0]) == 0.0
    # the concatenated group was pruned on both sides of the Concat, and the file names it by a space
    # holding all 16 of its channels
    kept = {n.input[1]: onnx.numpy_helper.to_array(t).shape for n in onnx.load(str(again)).graph.node
            if n.op_type == "Conv" for t in onnx.load(str(again)).graph.initializer if t.name == n.input[1]}
    assert kept["we1"][0] < 8 and kept["we3"][0] < 8 and kept["wc"][1] == kept["we1"][0] + kept["we3"][0]
    r = run_main("verify", src, again, "--plan", plan)
    assert r.returncode == 0, r.stdout + r.stderr
