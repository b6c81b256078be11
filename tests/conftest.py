"""Shared fixtures over ``onnxprune.testing``: the small CNNs of ``graphs`` saved to files, a
torchvision ResNet-18 export, and runners for the ``onnxprune`` command line (a subprocess, or
``main`` in this process)."""

from __future__ import annotations

import os
import pathlib
import sys
import traceback
from types import SimpleNamespace

import numpy as np
import onnx
import pytest

from onnxprune.testing import checks, graphs


@pytest.fixture(autouse=True, scope="session")
def _fresh_sensitivity_cache(tmp_path_factory: pytest.TempPathFactory):
    """Damage curves measured by a test are never read from an earlier run's cache (~/.cache)."""
    os.environ["ONNXPRUNE_SENSITIVITY_CACHE"] = str(tmp_path_factory.mktemp("sensitivity-cache"))
    yield


@pytest.fixture
def small_onnx(tmp_path: pathlib.Path) -> pathlib.Path:
    """The small CNN saved alone in its own directory ``src/``."""
    d = tmp_path / "src"
    d.mkdir()
    p = d / "small.onnx"
    onnx.save(graphs.small_cnn(), str(p))
    return p


@pytest.fixture
def grad_cnn(tmp_path: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    """(the gradient test CNN saved as .onnx, an .npz of 40 standard-normal images for it)."""
    path = tmp_path / "cnn.onnx"
    onnx.save(graphs.build(graphs.GRAD_CNN.replace("TAIL", graphs.GRAD_CNN_HEAD), positive=("v1",), seed=0), path)
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.random.default_rng(1).standard_normal((40, 3, 8, 8)).astype(np.float32))
    return path, calib


@pytest.fixture
def out_dir(tmp_path: pathlib.Path) -> pathlib.Path:
    """An empty directory for outputs."""
    d = tmp_path / "out"
    d.mkdir()
    return d


@pytest.fixture(scope="session")
def resnet18_onnx(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """torchvision ResNet-18 (random weights, BN folded), legacy exporter; exported once."""
    pytest.importorskip("torch")
    pytest.importorskip("torchvision")
    from onnxprune.models import zoo

    return zoo.export("resnet18", "legacy", cache_dir=tmp_path_factory.mktemp("zoo"))


@pytest.fixture(scope="session")
def run_cli():
    """Run ``python -m onnxprune.cli ARGS`` in a subprocess (``checks.run_cli``); returns the
    CompletedProcess."""
    return checks.run_cli


@pytest.fixture(scope="session")
def ort_run():
    """The outputs of a model or file on given feeds, on the CPU provider (``checks.run``)."""
    return checks.run


@pytest.fixture(scope="session")
def model_builders():
    """Builders of the text-defined test models: small_cnn, single_conv, planted_cnn (seed -> ModelProto)."""
    return SimpleNamespace(small_cnn=graphs.small_cnn, single_conv=graphs.single_conv,
                           planted_cnn=graphs.planted_cnn)


@pytest.fixture
def run_main(capsys, monkeypatch):
    """Run ``onnxprune.cli.main(ARGS)`` in this process (fast); returns a CompletedProcess-like object.
    An exception escaping ``main`` becomes exit 1 with its traceback on stderr, as in a subprocess."""
    import onnxprune.cli  # here, not at the top: a broken command line fails only the tests using it

    def run(*args, cwd: str | os.PathLike | None = None) -> SimpleNamespace:
        capsys.readouterr()
        with monkeypatch.context() as mp:
            if cwd is not None:
                mp.chdir(cwd)
            try:
                rc = onnxprune.cli.main([str(a) for a in args])
            except SystemExit as exc:
                rc = exc.code if isinstance(exc.code, int) else 1
            except Exception:  # noqa: BLE001
                sys.stderr.write(traceback.format_exc())
                rc = 1
        cap = capsys.readouterr()
        return SimpleNamespace(returncode=rc, stdout=cap.out, stderr=cap.err)

    return run
