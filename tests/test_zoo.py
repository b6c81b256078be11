"""Tests for the model zoo (onnxprune.models.zoo)."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("torchvision")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from onnxprune.models import zoo  # noqa: E402

from onnxprune.testing import checks  # noqa: E402


def _run(path: pathlib.Path, x: np.ndarray) -> np.ndarray:
    (y,) = checks.run(path, {zoo.INPUT_NAME: x})
    return y


def _input(name: str, batch: int) -> np.ndarray:
    return zoo.example_input(name, batch).numpy()


def _torch_outputs(name: str, inputs: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
    import torch

    model = zoo.build_model(name)
    with torch.no_grad():
        return {batch: model(torch.from_numpy(x)).numpy() for batch, x in inputs.items()}


@pytest.fixture(scope="module")
def resnet18_legacy(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return zoo.export("resnet18", "legacy", cache_dir=tmp_path_factory.mktemp("zoo"))


def test_resnet18_legacy_runs_in_onnxruntime(resnet18_legacy: pathlib.Path) -> None:
    path = resnet18_legacy
    assert path.exists() and path.suffix == ".onnx"
    assert zoo.load_meta(path)["dynamic_batch"] is True
    model = onnx.load(str(path))
    assert [i.name for i in model.graph.input] == ["input"]
    assert [o.name for o in model.graph.output] == ["output"]
    assert "BatchNormalization" not in {n.op_type for n in model.graph.node}

    outputs = {}
    for batch in (1, 2):
        y = _run(path, _input("resnet18", batch))
        assert y.shape == (batch, 1000)
        assert np.isfinite(y).all()
        assert 1e-3 < np.abs(y).max() < 1e4
        outputs[batch] = y
    # the batch is genuinely dynamic: sample 0 does not depend on the batch size
    checks.assert_close(outputs[2][:1], outputs[1], 1e-4)


def test_export_reuses_cache_and_names_file(resnet18_legacy: pathlib.Path) -> None:
    path = resnet18_legacy
    mtime = path.stat().st_mtime_ns
    again = zoo.export("resnet18", "legacy", cache_dir=path.parent)
    assert again == path
    assert path.stat().st_mtime_ns == mtime
    assert path == zoo.cache_path("resnet18", "legacy", cache_dir=path.parent)
    for part in ("resnet18", "legacy", "fold", "opset17", "224", "torch"):
        assert part in path.name
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]


def test_cache_dir_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path) -> None:
    monkeypatch.setenv(zoo.CACHE_ENV, str(tmp_path))
    assert zoo.cache_path("resnet18").parent == tmp_path
    monkeypatch.delenv(zoo.CACHE_ENV)
    assert zoo.cache_path("resnet18").parent == pathlib.Path.home() / ".cache" / "onnxprune" / "zoo"


def test_rejects_unknown_arguments(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ValueError):
        zoo.export("not_a_net", cache_dir=tmp_path)
    with pytest.raises(ValueError):
        zoo.export("resnet18", "tracer", cache_dir=tmp_path)
    with pytest.raises(ValueError):
        zoo.export("resnet18", bn="maybe", cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_default_input_shape() -> None:
    assert zoo.default_input_shape("resnet18") == (1, 3, 224, 224)
    assert zoo.default_input_shape("fcn_resnet50", 96) == (1, 3, 96, 96)


def test_calibrate_bn_sets_running_statistics() -> None:
    import torch

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU())
    zoo.calibrate_bn(net, (1, 3, 16, 16), batches=2, seed=0)
    bn = net[1]
    assert not net.training
    assert bn.momentum == 0.1  # restored
    assert int(bn.num_batches_tracked) == 2
    assert not torch.allclose(bn.running_var, torch.ones(8))
    # eval-mode output is (approximately) normalised per channel
    with torch.no_grad():
        y = net[:2](torch.randn(8, 3, 16, 16))
    assert torch.allclose(y.mean(dim=(0, 2, 3)), bn.bias, atol=0.2)


def test_convnext_is_in_the_zoo_but_not_in_the_exact_matrices() -> None:
    assert "convnext_tiny" in zoo.ALL_ARCHS and "convnext_tiny" not in zoo.ARCHS
    assert zoo.cache_path("convnext_tiny").name.startswith("convnext_tiny-legacy-")
    assert zoo.default_input_shape("convnext_tiny") == (1, 3, 224, 224)


def test_spread_layer_scale_gives_convnext_blocks_a_branch() -> None:
    import torch
    from torchvision.models.convnext import CNBlock

    net = torch.nn.Sequential(CNBlock(8, 1e-6, 0.0), CNBlock(8, 1e-6, 0.0))
    assert zoo.spread_layer_scale(net) == 2
    lo, hi = zoo.LAYER_SCALE_RANGE
    for blk in net:
        ls = blk.layer_scale.detach().flatten()
        assert bool(((ls >= lo) & (ls <= hi)).all()) and len(set(ls.tolist())) == 8
    x = torch.randn(1, 8, 6, 6, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # the residual branch now changes the output
        assert float((net[0](x) - x).abs().max()) > 1e-2


@pytest.mark.slow
@pytest.mark.parametrize("flags", [[], ["--allow-approximate"]], ids=["exact", "approximate"])
def test_convnext_allocates_and_verifies(flags: list[str], tmp_path: pathlib.Path) -> None:
    """convnext_tiny's MLP hidden units are exact groups; its LayerNorm-mixed streams need the flag
    (a MAC budget: nothing timed)."""
    import json

    from onnxprune.cli import main

    src = zoo.export("convnext_tiny", "legacy")
    out, rep = tmp_path / "p.onnx", tmp_path / "r.json"
    rc = main(["prune", str(src), "-o", str(out), "--target-macs", "0.5", "--allocate", "latency", "--verify",
               "--round-to", "8", "--ep", "cpu", "--report", str(rep), *flags])
    assert rc == 0
    data = json.loads(rep.read_text())
    a = data["allocation"]
    assert a["measured"] <= 0.5 and a["approximate_groups_left"] == (0 if flags else 4)
    assert data["verification"]["passed"]


@pytest.mark.slow
@pytest.mark.parametrize("exporter", zoo.EXPORTERS)
@pytest.mark.parametrize("name", zoo.ALL_ARCHS)
def test_zoo_export(name: str, exporter: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    path = zoo.export(name, exporter, cache_dir=tmp_path_factory.mktemp("zoo"))
    onnx.checker.check_model(str(path), full_check=True)
    model = onnx.load(str(path))
    assert not model.functions
    assert [i.name for i in model.graph.input] == ["input"]
    assert len(model.graph.output) == 1
    del model

    meta = zoo.load_meta(path)
    if exporter == "legacy":
        assert meta["dynamic_batch"] is True
    inputs = {batch: _input(name, batch) for batch in ((1, 8) if meta["dynamic_batch"] else (1,))}
    expected = _torch_outputs(name, inputs)
    for batch, x in inputs.items():
        y = _run(path, x)
        ref = expected[batch]
        assert y.shape == ref.shape
        assert y.shape[0] == batch
        assert 1e-3 < float(np.abs(ref).max()) < 1e4
        checks.assert_close(y, ref, 1e-4)


def test_dynamo_falls_back_to_static_batch(tmp_path: pathlib.Path) -> None:
    import torch

    class BatchSpecific(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            # control flow on the batch size cannot be exported with a symbolic batch
            return x * 2 if x.shape[0] == 2 else x + 1

    dest = tmp_path / "toy.onnx"
    dynamic = zoo._export_dynamo(
        BatchSpecific().eval(), torch.zeros(2, 3, 4, 4), torch.zeros(1, 3, 4, 4), dest, opset=18, bn="fold"
    )
    assert dynamic is False
    model = onnx.load(str(dest))
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1
    assert zoo.load_meta(dest) == {"dynamic_batch": False}  # inferred without a sidecar
    (y,) = checks.run(dest, {model.graph.input[0].name: np.zeros((1, 3, 4, 4), np.float32)})
    np.testing.assert_array_equal(y, np.ones((1, 3, 4, 4), np.float32))
