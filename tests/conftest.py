"""Shared fixtures: small ONNX models built from ONNX text, a torchvision ResNet-18 export, and a
runner for the ``onnxprune`` command line as a subprocess."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import numpy as np
import onnx
import pytest

from onnxprune.testing import from_text

# conv1 -> BN -> Relu -> conv2 -> Relu -> GlobalAveragePool -> Flatten -> Gemm -> y
SMALL_CNN = """
<ir_version: 8, opset_import: ["" : 17]>
small (float[1,3,16,16] x) => (float[1,10] y)
<float[8,3,3,3] w1, float[8] b1, float[8] s1, float[8] bb1, float[8] m1, float[8] v1,
 float[16,8,3,3] w2, float[16] b2, float[10,16] wf, float[10] bf>
{
  c1 = Conv <pads=[1,1,1,1]> (x, w1, b1)
  n1 = BatchNormalization (c1, s1, bb1, m1, v1)
  r1 = Relu (n1)
  c2 = Conv <pads=[1,1,1,1]> (r1, w2, b2)
  r2 = Relu (c2)
  p = GlobalAveragePool (r2)
  f = Flatten (p)
  y = Gemm <transB=1> (f, wf, bf)
}
"""
SMALL_CNN_NODE_NAMES = ["conv1", "bn1", "relu1", "conv2", "relu2", "gap", "flatten", "fc"]

# a single Conv from graph input to graph output: nothing can be pruned
SINGLE_CONV = """
<ir_version: 8, opset_import: ["" : 17]>
single (float[1,3,8,8] x) => (float[1,4,8,8] y)
<float[4,3,3,3] w>
{
  y = Conv <pads=[1,1,1,1]> (x, w)
}
"""

# conv1 (+bias) -> BN -> Relu -> depthwise conv -> Relu -> conv2 -> y
PLANTED_CNN = """
<ir_version: 8, opset_import: ["" : 17]>
planted (float[1,3,16,16] x) => (float[1,4,16,16] y)
<float[8,3,3,3] w1, float[8] b1, float[8] s1, float[8] bb1, float[8] m1, float[8] v1,
 float[8,1,3,3] wd, float[4,8,1,1] w2>
{
  c1 = Conv <pads=[1,1,1,1]> (x, w1, b1)
  n1 = BatchNormalization (c1, s1, bb1, m1, v1)
  r1 = Relu (n1)
  d = Conv <group=8, pads=[1,1,1,1]> (r1, wd)
  r2 = Relu (d)
  y = Conv (r2, w2)
}
"""
PLANTED_CNN_NODE_NAMES = ["conv1", "bn1", "relu1", "dwconv", "relu2", "conv2"]


def _named(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    assert len(model.graph.node) == len(names)
    for node, name in zip(model.graph.node, names, strict=True):
        node.name = name
    onnx.checker.check_model(model, full_check=True)
    return model


def build_small_cnn(seed: int = 0) -> onnx.ModelProto:
    return _named(from_text(SMALL_CNN, seed=seed, positive=("v1",)), SMALL_CNN_NODE_NAMES)


def build_single_conv(seed: int = 0) -> onnx.ModelProto:
    m = from_text(SINGLE_CONV, seed=seed)
    onnx.checker.check_model(m, full_check=True)
    return m


def build_planted_cnn(seed: int = 0) -> onnx.ModelProto:
    return _named(from_text(PLANTED_CNN, seed=seed, positive=("v1",)), PLANTED_CNN_NODE_NAMES)


@pytest.fixture
def small_onnx(tmp_path: pathlib.Path) -> pathlib.Path:
    """The small CNN saved alone in its own directory ``src/``."""
    d = tmp_path / "src"
    d.mkdir()
    p = d / "small.onnx"
    onnx.save(build_small_cnn(), str(p))
    return p


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
    """Run ``python -m onnxprune.cli ARGS`` in a subprocess; returns the CompletedProcess."""

    def run(*args, cwd: str | os.PathLike | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
        env = dict(os.environ, PYTHONWARNINGS="ignore", COLUMNS="200")
        return subprocess.run([sys.executable, "-m", "onnxprune.cli", *map(str, args)], cwd=cwd, env=env,
                              capture_output=True, text=True, timeout=timeout)

    return run


def ort_outputs(path_or_model, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    src = path_or_model.SerializeToString() if isinstance(path_or_model, onnx.ModelProto) else str(path_or_model)
    sess = ort.InferenceSession(src, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


@pytest.fixture(scope="session")
def ort_run():
    return ort_outputs


@pytest.fixture(scope="session")
def model_builders():
    """Builders of the text-defined test models: small_cnn, single_conv, planted_cnn (seed -> ModelProto)."""
    from types import SimpleNamespace

    return SimpleNamespace(small_cnn=build_small_cnn, single_conv=build_single_conv, planted_cnn=build_planted_cnn)


@pytest.fixture
def run_main(capsys, monkeypatch):
    """Run ``onnxprune.cli.main(ARGS)`` in this process (fast); returns a CompletedProcess-like object.
    An exception escaping ``main`` becomes exit 1 with its traceback on stderr, as in a subprocess."""
    import traceback
    from types import SimpleNamespace

    import onnxprune.cli

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
