"""``--round-to`` on grouped convolutions (issue 14: RegNet's grouped convs were never pruned).

A group of a grouped conv's channels has one unit per position within a conv group, so 8 units can
stand for 48 channels (6 conv groups of 8). Rounding must keep the *channel* count a multiple of N,
not the unit count: 8 units rounded to 8 would keep every channel at any ratio.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest

from onnxprune.planning.rounding import round_keep, unit_step
from onnxprune.testing import checks, graphs

# x -> Conv 1x1 (16 -> 48) -> Relu -> grouped Conv 3x3 (48 -> 48, group 6: 8 channels per group) -> Relu
# -> Conv 1x1 (48 -> 16) -> y
GROUPED = graphs.H17 + """
g (float[N,16,8,8] x) => (float[N,16,8,8] y)
<float[48,16,1,1] w1, float[48] b1, float[48,8,3,3] w2, float[48] b2, float[16,48,1,1] w3, float[16] b3>
{
  a = Conv(x, w1, b1)
  r = Relu(a)
  c = Conv<group=6, pads=[1,1,1,1]>(r, w2, b2)
  s = Relu(c)
  y = Conv(s, w3, b3)
}
"""


def test_round_keep():
    assert round_keep(8, 4, 4) == 4 and round_keep(8, 3, 4) == 4 and round_keep(8, 5, 4) == 8
    assert round_keep(8, 4, 8) == 8  # what unit rounding did to a group of 8 units at --round-to 8
    assert round_keep(3, 1, 8) == 1  # a group smaller than the step: any count
    assert round_keep(10, 0, 1) == 1


@pytest.mark.parametrize("round_to", [4, 8, 16])
def test_grouped_conv_prunes_at_round_to_and_keeps_channel_multiples(round_to):
    model = graphs.build(GROUPED, seed=0)
    res = checks.prune_and_verify(model, 0.5, round_to=round_to)
    assert res.verification.passed
    an = res.analysis
    grouped = [g for g in an.cg.groups if g.prunable and g.size == 8]
    assert grouped, [(g.id, g.size) for g in an.cg.groups]
    for g in grouped:
        reps = 48 // 8
        assert unit_step(an.cg, g, round_to) == round_to // math.gcd(round_to, reps)
    w2 = next(t for t in res.pruned.graph.initializer if t.name == "w2")
    out_channels = int(w2.dims[0])
    # ratio 0.5 of 8 units = 4 kept = 24 channels, a multiple of 4 and 8 (not of 16: then 8 units, 48)
    want = 24 if round_to in (4, 8) else 48
    assert out_channels == want, (round_to, list(w2.dims))
    assert out_channels % round_to == 0 or out_channels == 48
    conv = next(n for n in res.pruned.graph.node if n.op_type == "Conv" and n.input[1] == "w2")
    assert next(a.i for a in conv.attribute if a.name == "group") == 6
    x = np.random.default_rng(1).standard_normal((2, 16, 8, 8)).astype(np.float32)
    assert checks.run(res.pruned, {"x": x})[0].shape == (2, 16, 8, 8)
    onnx.checker.check_model(res.pruned, full_check=True)
