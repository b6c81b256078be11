"""Zoo acceptance: every torchvision architecture, both exporters, prunes at 0.5 and verifies.

The full matrix is slow (select it with ``-m slow``); resnet18 from the legacy exporter runs always.
"""

from __future__ import annotations

import json

import onnx
import pytest
from onnxprune.models import zoo

from onnxprune.cli import main
from onnxprune.runtime.inputs import make_inputs
from onnxprune.testing import checks

FAST = [("resnet18", "legacy")]
ALL = [(a, e) for e in ("legacy", "dynamo") for a in zoo.ARCHS]


def _prune_and_check(arch, exporter, tmp_path):
    src = zoo.export(arch, exporter)
    out = tmp_path / "pruned.onnx"
    report = tmp_path / "report.json"
    rc = main(["prune", str(src), "-o", str(out), "--ratio", "0.5", "--verify", "--ep", "cpu",
               "--report", str(report)])
    assert rc == 0
    onnx.checker.check_model(str(out), full_check=True)
    rep = json.loads(report.read_text())
    checks.assert_report_verified(rep, 1e-4)
    macs_before, macs_after = rep["stats"]["original"]["macs"], rep["stats"]["pruned"]["macs"]
    assert macs_after <= 0.4 * macs_before, f"MACs only dropped {1 - macs_after / macs_before:.1%}"
    original = onnx.load(str(src))
    batches = (1, 8) if zoo.load_meta(src).get("dynamic_batch", True) else (1,)
    feeds = [make_inputs(original, batch=b) for b in batches]
    checks.assert_same_output_shapes(original, onnx.load(str(out)), feeds)


@pytest.mark.parametrize(("arch", "exporter"), FAST)
def test_zoo_prune_fast(arch, exporter, tmp_path):
    _prune_and_check(arch, exporter, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize(("arch", "exporter"), ALL)
def test_zoo_prune_all(arch, exporter, tmp_path):
    _prune_and_check(arch, exporter, tmp_path)
