"""The measurement caches' keys (measure.cache): a cached damage curve is read back only for the weights,
data, options and code it was measured with."""

from __future__ import annotations

import dataclasses

from onnxprune import pipeline
from onnxprune.ir.io import load
from onnxprune.ir.tensors import external_info, external_tensors
from onnxprune.measure import cache
from onnxprune.measure import sensitivity as sens_mod
from onnxprune.planning.options import PlanOptions
from onnxprune.testing import graphs
from onnxprune.testing.synth import external_mlp

GROUPED = graphs.H17 + """
g (float[N,3,8,8] x) => (float[N,4,8,8] y)
<float[12,3,3,3] w1, float[16,3,3,3] wg, float[4,16,1,1] w3>
{
  h = Conv<pads=[1,1,1,1]>(x, w1)
  gg = Conv<pads=[1,1,1,1], group=4>(h, wg)
  y = Conv(gg, w3)
}"""


def test_external_weights_are_hashed_by_value_where_values_matter(tmp_path):
    """Two models whose external data files sit at the same place with the same sizes but other
    weights: the same digest as stored (a latency table depends on shapes), another one by value."""
    src = tmp_path / "mlp.onnx"
    external_mlp(src, width=16, layers=2)
    before = load(src)
    stored, by_value = cache.model_digest(before), cache.model_digest(before, values=True)
    t = next(external_tensors(before))
    info = external_info(t)
    with open(info["location"], "r+b") as f:  # another weight, in place: same file, offset, length
        f.seek(int(info.get("offset", 0)))
        old = f.read(4)
        f.seek(int(info.get("offset", 0)))
        f.write(bytes(b ^ 0xFF for b in old))
    after = load(src)  # (external values are read when hashed, so each digest is taken before the edit)
    assert cache.model_digest(after) == stored
    assert cache.model_digest(after, values=True) != by_value
    assert cache.model_digest(after, values=True) == cache.model_digest(load(src), values=True)


def test_the_sensitivity_key_changes_with_the_conv_group_mode_and_the_weights(monkeypatch):
    monkeypatch.setattr(sens_mod, "view_digest", lambda view: "data")
    model = graphs.from_text(GROUPED, seed=1)

    def key(m, opts):
        an = pipeline.analyze_model(m, head_mode=pipeline.head_mode_for(opts))
        return sens_mod.sensitivity_key(an, opts, {0: 12}, {0: [12, 8, 4]}, None, {}, ep="cpu")

    by_position = key(model, PlanOptions())
    assert key(model, PlanOptions()) == by_position  # a key is reproducible
    assert key(model, PlanOptions(conv_groups="whole")) != by_position
    other = graphs.from_text(GROUPED, seed=2)  # the same graph, other weights
    assert key(other, PlanOptions()) != by_position
    assert by_position["format"] == sens_mod.FORMAT and by_position["version"]
    # what the curves do not depend on: the ratio and kept counts the options carry
    assert key(model, dataclasses.replace(PlanOptions(), ratio=0.3, keep_counts=((0, 4),))) == by_position


def test_a_cache_entry_is_read_back_only_under_its_own_key(tmp_path):
    k1, k2 = {"model": "a"}, {"model": "b"}
    sens = sens_mod.Sensitivity({0: [4, 2]}, {0: [0.0, 0.123456789]}, rows=8, seconds=1.0)
    assert sens_mod.store(k1, sens, tmp_path) is not None
    back = sens_mod.load_cached(k1, tmp_path)
    assert back is not None and back.cached and back.damage[0] == [0.0, 0.123456789]  # unrounded
    assert sens_mod.load_cached(k2, tmp_path) is None
    # a file that holds another key under this key's name (a hash collision, a hand edit) is not read
    (tmp_path / cache.key_name(k2)).write_text((tmp_path / cache.key_name(k1)).read_text())
    assert sens_mod.load_cached(k2, tmp_path) is None
    (tmp_path / cache.key_name(k1)).write_text("not json")
    assert sens_mod.load_cached(k1, tmp_path) is None
