"""Model zoo: randomly initialised torchvision networks exported to ONNX.

Every network is built with ``weights=None`` (nothing is ever downloaded), seeded, given
non-degenerate parameters and realistic BatchNorm running statistics, then exported with
either the legacy TorchScript exporter or the torch.export-based ("dynamo") exporter.
Exports are cached on disk; see :func:`export`.

Command line::

    python -m onnxprune.models.zoo resnet18 --exporter dynamo --bn fold
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import pathlib
import re
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import onnx
from onnx import inliner

if TYPE_CHECKING:
    import torch
    from torch import nn

logger = logging.getLogger(__name__)

ARCHS: tuple[str, ...] = (
    "resnet18",
    "resnet50",
    "resnext50_32x4d",
    "wide_resnet50_2",
    "vgg16_bn",
    "mobilenet_v2",
    "mobilenet_v3_large",
    "efficientnet_b0",
    "regnet_y_400mf",
    "densenet121",
    "shufflenet_v2_x1_0",
    "squeezenet1_1",
    "googlenet",
    "mnasnet1_0",
    "fcn_resnet50",
)
#: Networks whose channels are mixed by LayerNorm: their groups are approximate (prune them with
#: ``--allow-approximate``; without it only the groups LayerNorm does not touch, such as ConvNeXt's MLP
#: hidden units, are pruned). Not in :data:`ARCHS`, so the matrices that prune every zoo model exactly at
#: ``--ratio 0.5`` leave them out; :data:`ALL_ARCHS` is every name :func:`export` takes.
APPROXIMATE_ARCHS: tuple[str, ...] = ("convnext_tiny",)
ALL_ARCHS: tuple[str, ...] = ARCHS + APPROXIMATE_ARCHS
EXPORTERS: tuple[str, ...] = ("legacy", "dynamo")
BN_MODES: tuple[str, ...] = ("fold", "unfused")

#: Bump when the build recipe changes, so stale cache entries are not reused.
ZOO_FORMAT = 1
SEED = 0
LEGACY_DEFAULT_OPSET = 17
#: Gamma multiplier of the last BatchNorm in ResNet blocks (see damp_residual_branches).
RESIDUAL_GAMMA_SCALE = 0.25
#: Range of ConvNeXt's per-channel layer scale (see spread_layer_scale).
LAYER_SCALE_RANGE = (0.1, 0.3)
#: Batch of the example input used while tracing (>1 avoids 0/1 specialisation).
TRACE_BATCH = 2
INPUT_NAME = "input"
OUTPUT_NAME = "output"
CACHE_ENV = "ONNXPRUNE_CACHE"
_FILE_MODE = 0o644  # mkstemp creates 0600 files; cache entries are meant to be shared

_SEGMENTATION = frozenset({"fcn_resnet50"})
_EXTRA_KWARGS: dict[str, dict[str, Any]] = {
    "googlenet": {"aux_logits": False, "init_weights": True},
    "fcn_resnet50": {"aux_loss": False, "weights_backbone": None},
}
_NOISY_LOGGERS = ("torch", "torch.onnx", "torch.export", "torch._dynamo", "torch.fx", "onnxscript", "onnx_ir")


# --------------------------------------------------------------------------- building


def default_input_shape(name: str, input_size: int = 224) -> tuple[int, int, int, int]:
    """NCHW shape of one input image for ``name`` (batch 1)."""
    _check_name(name)
    return (1, 3, int(input_size), int(input_size))


def _check_name(name: str) -> None:
    if name not in ALL_ARCHS:
        raise ValueError(f"unknown arch {name!r}; expected one of {', '.join(ALL_ARCHS)}")


def _segmentation_wrapper() -> type[nn.Module]:
    from torch import nn

    class SegmentationOut(nn.Module):
        """Return only the ``out`` entry of a torchvision segmentation model's dict."""

        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(x)["out"]

    return SegmentationOut


def _construct(name: str) -> nn.Module:
    import torchvision

    kwargs = {"weights": None, **_EXTRA_KWARGS.get(name, {})}
    if name in _SEGMENTATION:
        inner = getattr(torchvision.models.segmentation, name)(**kwargs)
        return _segmentation_wrapper()(inner)
    return torchvision.models.get_model(name, **kwargs)


def randomize_constant_params(model: nn.Module, seed: int = SEED) -> int:
    """Perturb parameters whose entries are all equal (BN gamma=1/beta=0, zero biases).

    Freshly initialised networks contain many identical tensors. The legacy exporter
    de-duplicates identical initializers (one tensor feeding several layers, partly via
    ``Identity`` nodes: 18 of them in squeezenet1_1), which creates artificial weight
    sharing between unrelated layers; trained networks never look like that. (onnxscript's
    optimizer also de-duplicates small constants, e.g. shared Reshape/ReduceMean shape
    inputs, but leaves the parameters alone.) Returns the number of tensors changed.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    changed = 0
    with torch.no_grad():
        for param in model.parameters():
            if param.numel() < 2 or not bool((param == param.flatten()[0]).all()):
                continue
            value = float(param.flatten()[0])
            noise = torch.rand(param.shape, generator=gen, dtype=param.dtype) - 0.5
            # ones (BN gamma) -> U(0.75, 1.25); zeros (biases, BN beta) -> U(-0.05, 0.05)
            scale = 0.5 * abs(value) if value != 0.0 else 0.1
            param.add_(noise * scale)
            changed += 1
    return changed


def damp_residual_branches(model: nn.Module, scale: float = RESIDUAL_GAMMA_SCALE) -> int:
    """Scale the gamma of the last BatchNorm in every ResNet block by ``scale``.

    Random ResNets with unit-gain residual branches are chaotic: float32 rounding
    differences grow ~1.3x per block, so fcn_resnet50's own float32 output is 1e-4 away
    from float64 and no exporter can match it to 1e-4. Trained ResNets have small gammas
    there (what ``zero_init_residual`` imitates); with 0.25 the error drops ~20x.
    Returns the number of blocks changed.
    """
    import torch
    from torchvision.models.resnet import BasicBlock, Bottleneck

    changed = 0
    with torch.no_grad():
        for module in model.modules():
            last = {BasicBlock: "bn2", Bottleneck: "bn3"}.get(type(module))
            if last is not None:
                getattr(module, last).weight.mul_(scale)
                changed += 1
    return changed


def spread_layer_scale(model: nn.Module, low: float = LAYER_SCALE_RANGE[0], high: float = LAYER_SCALE_RANGE[1],
                       seed: int = SEED) -> int:
    """Draw every ConvNeXt block's layer scale from U(``low``, ``high``), per channel.

    torchvision initialises it to 1e-6, so a freshly built ConvNeXt is its stem, downsampling layers
    and head: every block's branch (depthwise conv, LayerNorm, MLP) is scaled away and pruning it
    changes nothing measurable. Trained ConvNeXts have layer scales of order 0.1 to 1. Returns the
    number of blocks changed.
    """
    import torch
    from torchvision.models.convnext import CNBlock

    gen = torch.Generator().manual_seed(seed + 2)
    changed = 0
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, CNBlock):
                ls = module.layer_scale
                ls.copy_(low + (high - low) * torch.rand(ls.shape, generator=gen, dtype=ls.dtype))
                changed += 1
    return changed


def _batchnorm_layers(model: nn.Module) -> list[nn.Module]:
    from torch.nn.modules.batchnorm import _BatchNorm

    return [m for m in model.modules() if isinstance(m, _BatchNorm)]


def calibrate_bn(
    model: nn.Module,
    input_shape: Sequence[int],
    batches: int = 3,
    seed: int = SEED,
    batch_size: int = 4,
) -> nn.Module:
    """Give every BatchNorm layer realistic running statistics; returns ``model`` in eval mode.

    Runs ``batches`` random-normal batches (``batch_size`` x ``input_shape[1:]``) through the
    network with only the BatchNorm layers in train mode and ``momentum=None``, so the
    running statistics become the cumulative average over all batches. Dropout and
    stochastic depth stay in eval mode, keeping the calibration deterministic.
    """
    import torch

    bns = _batchnorm_layers(model)
    model.eval()
    if not bns:
        return model
    shape = (max(int(batch_size), 2), *(int(s) for s in input_shape[1:]))
    gen = torch.Generator().manual_seed(seed)
    momenta = [bn.momentum for bn in bns]
    try:
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None
            bn.train()
        with torch.no_grad():
            for _ in range(batches):
                model(torch.randn(shape, generator=gen))
    finally:
        for bn, momentum in zip(bns, momenta, strict=True):
            bn.momentum = momentum
        model.eval()
    logger.debug("calibrated %d BatchNorm layers with %d batches of %s", len(bns), batches, shape)
    return model


def build_model(name: str, *, input_size: int = 224, seed: int = SEED) -> nn.Module:
    """Construct, perturb and BN-calibrate ``name`` deterministically (eval mode)."""
    import torch

    _check_name(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with _quiet():
            model = _construct(name)
    spread_layer_scale(model, seed=seed)
    randomize_constant_params(model, seed=seed)
    damp_residual_branches(model)
    return calibrate_bn(model, default_input_shape(name, input_size), seed=seed)


def example_input(name: str, batch: int = 1, input_size: int = 224, seed: int = SEED) -> torch.Tensor:
    """Deterministic random-normal input of shape ``(batch, 3, input_size, input_size)``."""
    import torch

    shape = (batch, *default_input_shape(name, input_size)[1:])
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed + 1))


# --------------------------------------------------------------------------- caching


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> pathlib.Path:
    """``cache_dir``, else ``$ONNXPRUNE_CACHE``, else ``~/.cache/onnxprune/zoo``."""
    if cache_dir is not None:
        return pathlib.Path(cache_dir)
    env = os.environ.get(CACHE_ENV)
    if env:
        return pathlib.Path(env)
    return pathlib.Path.home() / ".cache" / "onnxprune" / "zoo"


def _resolve_opset(exporter: str, opset: int | None) -> int:
    if opset is not None:
        return int(opset)
    if exporter == "legacy":
        return LEGACY_DEFAULT_OPSET
    from torch.onnx import _constants

    return int(_constants.ONNX_DEFAULT_OPSET)


def _torch_tag() -> str:
    import torch

    return re.sub(r"[^0-9A-Za-z.]+", "_", torch.__version__)


def cache_path(
    name: str,
    exporter: str = "legacy",
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    bn: str = "fold",
    opset: int | None = None,
    input_size: int = 224,
) -> pathlib.Path:
    """Path :func:`export` uses for these settings (the file may not exist yet)."""
    _check_args(name, exporter, bn)
    resolved = _resolve_opset(exporter, opset)
    stem = f"{name}-{exporter}-bn_{bn}-opset{resolved}-{int(input_size)}px-torch{_torch_tag()}-z{ZOO_FORMAT}"
    return cache_root(cache_dir) / f"{stem}.onnx"


def meta_path(path: str | os.PathLike[str]) -> pathlib.Path:
    """Location of the JSON sidecar for the ONNX file ``path``."""
    return pathlib.Path(path).with_suffix(".json")


def load_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read the sidecar of an exported file.

    Always contains ``dynamic_batch``; without a sidecar it is inferred from the graph
    input (a symbolic first dimension means a dynamic batch).
    """
    sidecar = meta_path(path)
    if sidecar.exists():
        return json.loads(sidecar.read_text())

    model = onnx.load(str(path), load_external_data=False)
    dim0 = model.graph.input[0].type.tensor_type.shape.dim[0]
    return {"dynamic_batch": dim0.HasField("dim_param") or not dim0.HasField("dim_value")}


def _atomic_write_text(path: pathlib.Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _check_args(name: str, exporter: str, bn: str) -> None:
    _check_name(name)
    if exporter not in EXPORTERS:
        raise ValueError(f"unknown exporter {exporter!r}; expected one of {EXPORTERS}")
    if bn not in BN_MODES:
        raise ValueError(f"unknown bn mode {bn!r}; expected one of {BN_MODES}")


# --------------------------------------------------------------------------- exporting


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence Python warnings, exporter logging and stray prints; echo them at DEBUG."""
    saved = {n: logging.getLogger(n).level for n in _NOISY_LOGGERS}
    buffer = io.StringIO()
    try:
        for n in _NOISY_LOGGERS:
            logging.getLogger(n).setLevel(logging.ERROR)
        with (
            warnings.catch_warnings(),
            contextlib.redirect_stdout(buffer),
            contextlib.redirect_stderr(buffer),
        ):
            warnings.simplefilter("ignore")
            yield
    finally:
        for n, level in saved.items():
            logging.getLogger(n).setLevel(level)
        if buffer.getvalue().strip():
            logger.debug("suppressed exporter output:\n%s", buffer.getvalue())


def _export_legacy(model: nn.Module, x: torch.Tensor, dest: pathlib.Path, opset: int, bn: str) -> bool:
    import torch

    # TrainingMode.PRESERVE with the model in eval mode skips the Conv+BN fusing peephole
    # pass while still constant-folding everything else; BatchNormalization stays.
    training = torch.onnx.TrainingMode.PRESERVE if bn == "unfused" else torch.onnx.TrainingMode.EVAL
    torch.onnx.export(
        model,
        (x,),
        str(dest),
        dynamo=False,
        opset_version=opset,
        do_constant_folding=True,
        training=training,
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
    )
    return True


@contextlib.contextmanager
def _keep_batchnorm_in_dynamo(keep: bool) -> Iterator[None]:
    """Drop onnxscript's Conv+BatchNormalization fusing rules from the exporter's optimizer."""
    if not keep:
        yield
        return
    from onnxscript import rewriter
    from onnxscript.rewriter.rules.common import _fuse_batchnorm

    saved = rewriter._DEFAULT_REWRITE_RULES
    fuse = set(map(id, _fuse_batchnorm.rules))
    rewriter._DEFAULT_REWRITE_RULES = tuple(r for r in saved if id(r) not in fuse)
    try:
        yield
    finally:
        rewriter._DEFAULT_REWRITE_RULES = saved


def _dynamo_program(model: nn.Module, x: torch.Tensor, opset: int, dynamic: bool, bn: str) -> Any:
    import torch

    dynamic_shapes = ({0: torch.export.Dim("batch")},) if dynamic else None
    with _keep_batchnorm_in_dynamo(bn == "unfused"):
        return torch.onnx.export(
            model,
            (x,),
            dynamo=True,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes=dynamic_shapes,
            external_data=False,
            optimize=True,
            verbose=False,
            report=False,
        )


def _export_dynamo(
    model: nn.Module, x_dynamic: torch.Tensor, x_static: torch.Tensor, dest: pathlib.Path, opset: int, bn: str
) -> bool:
    """Export with a dynamic batch if possible, else static; returns whether it is dynamic.

    torch.export either raises or silently specialises the batch dimension to the example
    size; in both cases the model is re-exported with the static (batch 1) example.
    """
    program = None
    try:
        program = _dynamo_program(model, x_dynamic, opset, dynamic=True, bn=bn)
    except Exception as exc:  # torch.export raises many different types here
        logger.info(
            "dynamo export with a dynamic batch failed (%s); exporting a static batch", type(exc).__name__
        )
        logger.debug("dynamic export failure", exc_info=True)
    dynamic = program is not None and _program_has_dynamic_batch(program)
    if program is not None and not dynamic:
        logger.info("dynamo specialised the batch dimension; exporting a static batch")
    if not dynamic:
        program = _dynamo_program(model, x_static, opset, dynamic=False, bn=bn)
    program.save(str(dest), external_data=False)
    _inline_functions(dest)
    return dynamic


def _program_has_dynamic_batch(program: Any) -> bool:
    dim = program.model.graph.inputs[0].shape[0]
    return not isinstance(dim, int)


def _inline_functions(path: pathlib.Path) -> None:

    model = onnx.load(str(path))
    if not model.functions:
        return
    logger.debug("inlining %d local functions in %s", len(model.functions), path.name)
    onnx.save(inliner.inline_local_functions(model), str(path))


def _versions() -> dict[str, str]:
    import torch
    import torchvision

    return {"torch": torch.__version__, "torchvision": torchvision.__version__, "onnx": onnx.__version__}


def export(
    name: str,
    exporter: str = "legacy",
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    bn: str = "fold",
    opset: int | None = None,
    input_size: int = 224,
    force: bool = False,
) -> pathlib.Path:
    """Export ``name`` to ONNX (or reuse the cached file) and return its path.

    ``exporter``: ``"legacy"`` (TorchScript, opset 17 by default) or ``"dynamo"``
    (torch.export, the exporter's default opset). ``bn``: ``"fold"`` folds BatchNorm into
    the preceding convolutions, ``"unfused"`` keeps ``BatchNormalization`` nodes. The graph
    has one input ``input`` (N, 3, H, W) and one output ``output``; the batch dimension is
    symbolic unless :func:`load_meta` says ``dynamic_batch`` is false.
    """
    path = cache_path(name, exporter, cache_dir=cache_dir, bn=bn, opset=opset, input_size=input_size)
    if path.exists() and not force:
        logger.debug("zoo cache hit: %s", path)
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    resolved = _resolve_opset(exporter, opset)
    start = time.perf_counter()
    model = build_model(name, input_size=input_size)
    x_trace = example_input(name, TRACE_BATCH, input_size)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".onnx.tmp", dir=path.parent)
    os.close(fd)
    tmp = pathlib.Path(tmp_name)
    try:
        with _quiet():
            if exporter == "legacy":
                dynamic = _export_legacy(model, x_trace, tmp, resolved, bn)
            else:
                x_static = example_input(name, 1, input_size)
                dynamic = _export_dynamo(model, x_trace, x_static, tmp, resolved, bn)
        seconds = time.perf_counter() - start
        meta = {
            "name": name,
            "exporter": exporter,
            "bn": bn,
            "opset": resolved,
            "input_size": int(input_size),
            "input_shape": list(default_input_shape(name, input_size)),
            "dynamic_batch": dynamic,
            "seed": SEED,
            "zoo_format": ZOO_FORMAT,
            "export_seconds": round(seconds, 3),
            **_versions(),
        }
        _atomic_write_text(meta_path(path), json.dumps(meta, indent=2) + "\n")
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    logger.info("exported %s (%s, bn=%s) in %.1f s -> %s", name, exporter, bn, seconds, path)
    return path


# --------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m onnxprune.models.zoo", description=__doc__.splitlines()[0]
    )
    parser.add_argument("name", choices=ALL_ARCHS)
    parser.add_argument("--exporter", choices=EXPORTERS, default="legacy")
    parser.add_argument("--bn", choices=BN_MODES, default="fold")
    parser.add_argument("--opset", type=int, default=None)
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--force", action="store_true", help="re-export even if cached")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    path = export(
        args.name,
        args.exporter,
        cache_dir=args.cache_dir,
        bn=args.bn,
        opset=args.opset,
        input_size=args.input_size,
        force=args.force,
    )
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
