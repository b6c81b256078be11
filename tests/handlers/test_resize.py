"""Resize and Pad (handlers/resize.py): scales, sizes (with a channel entry), pads on the spatial
axes; a pad on the channel axis is a barrier."""

from __future__ import annotations

from onnxprune.testing import checks, graphs
from onnxprune.testing.graphs import H17, Case, prefixed_text, sandwich_case

# (id, mid nodes, extra initializers, opset, positive initializers, output spatial size)
SANDWICHES = [
    # resize and pad on the spatial axes
    sandwich_case("Resize-scales", "m = Resize<mode=\"nearest\">(h, , sc)", "float[4] sc = {1.0, 1.0, 2.0, 2.0}", 17, (), 16),
    sandwich_case("Resize-linear", "m = Resize<mode=\"linear\">(h, , sc)", "float[4] sc = {1.0, 1.0, 0.5, 0.5}", 13, (), 4),
    sandwich_case("Resize-opset11", "m = Resize<mode=\"nearest\">(h, roi, sc)",
     "float[0] roi = {}, float[4] sc = {1.0, 1.0, 2.0, 2.0}", 11, (), 16),
    sandwich_case("Resize-sizes-axes", "m = Resize<axes=[2,3]>(h, , , sz)", "int64[2] sz = {12, 12}", 18, (), 12),
    sandwich_case("Pad", "m = Pad(h, p)", "int64[8] p = {0,0,1,1,0,0,1,1}", 17, (), 10),
    sandwich_case("Pad-reflect", "m = Pad<mode=\"reflect\">(h, p)", "int64[8] p = {0,0,2,1,0,0,0,1}", 13, (), 10),
    sandwich_case("Pad-value-opset11", "m = Pad(h, p, v)", "int64[8] p = {0,0,1,1,0,0,1,1}, float v = {0.5}", 11, (), 10),
    sandwich_case("Pad-axes-opset18", "m = Pad(h, p, , a)", "int64[4] p = {1,1,1,1}, int64[2] a = {2,3}", 18, (), 10),
]


# ----------------------------------------------------------------------------------------------
# graphs written out in full: (id, text, expected initializer shapes after ratio 0.5, positive)

CASES = [
    # --- Resize with a constant `sizes` that includes the channel axis (static batch) --------
    Case("Resize-sizes-with-channel-entry", H17 + """
g (float[1,3,8,8] x) => (float[1,4,16,16] y)
<float[8,3,3,3] w1, float[4,8,3,3] w2, int64[4] sz = {1, 8, 16, 16}>
{
  h = Conv<pads=[1,1,1,1]>(x, w1)
  u = Resize<mode="nearest">(h, , , sz)
  y = Conv<pads=[1,1,1,1]>(u, w2)
}""", {"w1": (4, 3, 3, 3), "w2": (4, 4, 3, 3)}),
    # FPN top-down: upsampled coarse map + lateral 1x1 conv
    Case("FPN-Resize-Add", H17 + """
g (float[N,3,8,8] x) => (float[N,4,8,8] y)
<float[8,3,3,3] wc, float[8,3,1,1] wl, float[4,8,3,3] w2, float[4] sc = {1.0, 1.0, 2.0, 2.0}>
{
  c = Conv<pads=[1,1,1,1], strides=[2,2]>(x, wc)
  u = Resize<mode="nearest">(c, , sc)
  l = Conv(x, wl)
  s = Add(u, l)
  y = Conv<pads=[1,1,1,1]>(s, w2)
}""", {"wc": (4, 3, 3, 3), "wl": (4, 3, 1, 1), "w2": (4, 4, 3, 3)}),
]


BY_ID = graphs.index(CASES, SANDWICHES)  # cases by id, sandwiches as "sandwich-<id>"


# ----------------------------------------------------------------------------------------------
# barriers: the group touching the op is frozen (weights untouched) with a reason naming it

FROZEN_CASES = [
    ("Pad-channels", prefixed_text("p = Pad(h, pd)\n  m = Slice(p, st, en, ax)",
                                   "int64[8] pd = {0,1,0,0,0,1,0,0}, int64[1] st = {1}, int64[1] en = {9}, "
                                   "int64[1] ax = {1}"),
     ["Pad", "does not carry axis 1"]),
]


class TestResize(checks.SandwichCases, checks.GraphCases, checks.FrozenCases):
    """The standard tests over ``SANDWICHES``, ``CASES`` and ``FROZEN_CASES`` (``checks.CaseTests``)."""


# ----------------------------------------------------------------------------------------------
# rewritten constants


def test_resize_sizes_channel_entry_rewritten():
    model = BY_ID["Resize-sizes-with-channel-entry"].model()
    res = checks.prune_and_verify(model)
    checks.assert_exact(res, model)
    assert list(checks.const_input(res.pruned, "Resize", 3)) == [1, 4, 16, 16]
