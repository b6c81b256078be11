"""Models with external data: weights stay in files, the pruned model keeps external data beside it."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from onnxprune.cli import main
from onnxprune.testing import checks
from onnxprune.testing.synth import external_mlp


def test_external_data_in_and_out(tmp_path):
    src = tmp_path / "mlp.onnx"
    weight_bytes = external_mlp(src, width=256, layers=3)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "p.onnx"
    assert main(["prune", str(src), "-o", str(out), "--ratio", "0.5", "--verify", "--ep", "cpu"]) == 0
    data = out_dir / "p.onnx.data"
    assert data.exists(), "pruned weights must live in external data beside the model"
    assert out.stat().st_size < 10_000  # the .onnx itself holds no weights
    # hidden layers halved: 2 of the 3 weight matrices lose half their rows or columns
    assert data.stat().st_size < 0.7 * weight_bytes
    onnx.checker.check_model(str(out), full_check=True)
    y = checks.run(out, {"x": np.ones((3, 256), np.float32)})[0]
    assert y.shape == (3, 256)
    # the input and its data file are untouched
    assert (tmp_path / "mlp.onnx.data").stat().st_size == weight_bytes


@pytest.mark.slow
def test_large_model_over_2gb_prunes(tmp_path):
    """A 2.7 GB model (over protobuf's 2 GB limit) prunes; its weights never load all at once."""
    src = tmp_path / "big.onnx"
    weight_bytes = external_mlp(src, width=8192, layers=10)
    assert weight_bytes > 2.5e9
    out = tmp_path / "big_pruned.onnx"
    assert main(["prune", str(src), "-o", str(out), "--ratio", "0.5"]) == 0
    assert (tmp_path / "big_pruned.onnx.data").stat().st_size < 0.5 * weight_bytes
    onnx.checker.check_model(str(out), full_check=True)
    assert checks.run(out, {"x": np.ones((1, 8192), np.float32)})[0].shape == (1, 8192)
