"""Zoo-wide exactness with compensation (issue 10: "--verify passes on every zoo model with --calib;
reconstruction never breaks exactness"): every torchvision architecture of the zoo, from both
exporters with BatchNorm folded and from the legacy exporter with BatchNorm unfused (the models of
tests/test_zoo_prune.py and variant c of tests/test_variants.py), runs
``prune --ratio 0.3 --calib RANDOM.npz --verify`` with the defaults that data brings (data-aware
importance, ``--compensate lsq``, BatchNorm statistics recomputed after the changed consumers).

Each run must exit 0, verify by relative error against the compensated original, pass the full
checker, and report what compensation did: consumers refitted, and on unfused exports the
BatchNorms whose statistics were recomputed (a run that silently compensated nothing would prove
nothing). The weights are random (the zoo's), so fidelity is not judged here.

The full matrix is slow (``-m slow``; resnet18 takes 2-14 minutes here, mostly the lsq solves);
squeezenet1_1 from both exporters (no BatchNorm, ~10 s each) runs always. The BatchNorm statistics
themselves are tested on small graphs in tests/test_compensate.py.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnxprune.models import zoo

from onnxprune.cli import main
from onnxprune.testing import checks

SAMPLES = 10  # random images: 8 fit, 2 held out (--holdout 0.2)
NO_BATCHNORM = frozenset({"squeezenet1_1"})
FAST = [("squeezenet1_1", "legacy", "fold"), ("squeezenet1_1", "dynamo", "fold")]  # ~10 s each
ALL = [(a, "legacy", "unfused") for a in zoo.ARCHS] + [(a, e, "fold") for e in zoo.EXPORTERS for a in zoo.ARCHS]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Path of an .npz of SAMPLES standard-normal images (the zoo's BatchNorm was calibrated on
    standard-normal inputs), one per input shape."""
    made: dict[tuple[int, ...], str] = {}

    def get(shape: tuple[int, ...]) -> str:
        if shape not in made:
            path = tmp_path_factory.mktemp("calib") / "images.npz"
            x = np.random.default_rng(0).standard_normal((SAMPLES, *shape[1:]), dtype=np.float32)
            np.savez(path, **{zoo.INPUT_NAME: x})
            made[shape] = str(path)
        return made[shape]

    return get


def _prune_compensated(arch: str, exporter: str, bn: str, tmp_path, images) -> None:
    src = zoo.export(arch, exporter, bn=bn)
    calib = images(zoo.default_input_shape(arch))
    out, report = tmp_path / "pruned.onnx", tmp_path / "report.json"
    rc = main(["prune", str(src), "-o", str(out), "--ratio", "0.3", "--calib", calib, "--verify", "--ep", "cpu",
               "--report", str(report)])
    assert rc == 0
    onnx.checker.check_model(str(out), full_check=True)
    rep = json.loads(report.read_text())
    checks.assert_report_verified(rep, 1e-4)
    comp = rep["compensation"]
    assert comp["mode"] == "lsq", comp["mode"]
    assert comp["counts"].get("lsq", 0) > 0, comp["counts"]
    recomputed = [b for b in comp.get("batchnorms", []) if b["how"] == "recomputed"]
    if bn == "unfused" and arch not in NO_BATCHNORM:
        assert recomputed, [b for b in comp.get("batchnorms", [])]
    else:
        assert not recomputed


@pytest.mark.parametrize(("arch", "exporter", "bn"), FAST)
def test_zoo_compensated_fast(arch, exporter, bn, tmp_path, images):
    _prune_compensated(arch, exporter, bn, tmp_path, images)


@pytest.mark.slow
@pytest.mark.parametrize(("arch", "exporter", "bn"), ALL)
def test_zoo_compensated_all(arch, exporter, bn, tmp_path, images):
    _prune_compensated(arch, exporter, bn, tmp_path, images)
