"""Small recurrent test models: a Linear or Conv1d front end -> nn.LSTM / nn.GRU -> Linear head,
randomly initialised (seeded) and exported to ONNX without state inputs. Cached like the zoo
(:func:`onnxprune.models.zoo.cache_root`, in an ``rnn/`` subfolder); see :func:`export_rnn`.

Inputs (batch first so that onnxprune's generated inputs get a real sequence: dynamic axis 0 -> 1,
other dynamic axes -> 16):

- ``front="linear"``: ``input`` [batch, time, features] -> Linear -> ReLU -> RNN (batch_first);
- ``front="conv"``: ``input`` [batch, features, time] -> Conv1d(k=3) -> ReLU -> permute to
  [time, batch, channels] -> RNN (sequence first).

Heads: ``head="y"``: Linear on Y at every step (output [.., time, classes]);
``head="last"``: Linear on the last layer's final hidden state(s) (h_n, both directions
concatenated; output [batch, classes]).

Exporters: ``legacy`` (TorchScript, opset 17, dynamic batch and time; the zero initial states
become ConstantOfShape(Concat(L*D, batch, hidden)) -> Slice) and ``dynamo`` (torch.export, the
exporter's default opset (20 with torch 2.14), dynamic batch and time, static if torch.export
refuses; zero initial states become Expand(0, shape) -> Slice, or constant initializers when
static). Both produce ONNX ``LSTM`` / ``GRU`` ops with torch 2.14 (no Scan/Loop).

Command line::

    python -m onnxprune.models.rnn LSTM --bidirectional --layers 2 --exporter dynamo
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import pathlib
import re
import sys
import tempfile
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import onnx
from onnx import inliner
from onnxprune.models import zoo

if TYPE_CHECKING:
    import torch
    from torch import nn

logger = logging.getLogger(__name__)

KINDS = ("LSTM", "GRU")
FRONTS = ("linear", "conv")
HEADS = ("y", "last")
EXPORTERS = ("legacy", "dynamo")
#: Bump when the build recipe changes, so stale cache entries are not reused.
RNN_FORMAT = 1
SEED = 0
LEGACY_OPSET = 17
TRACE_BATCH = 2
TRACE_TIME = 12
INPUT_NAME = "input"
OUTPUT_NAME = "output"


def _module_class() -> type[nn.Module]:
    import torch
    from torch import nn

    class RecurrentNet(nn.Module):
        def __init__(self, kind: str, bidirectional: bool, num_layers: int, front: str, head: str,
                     features: int, channels: int, hidden: int, classes: int) -> None:
            super().__init__()
            self.front_kind, self.head_kind = front, head
            self.dirs = 2 if bidirectional else 1
            if front == "linear":
                self.front = nn.Linear(features, channels)
            else:
                self.front = nn.Conv1d(features, channels, kernel_size=3, padding=1)
            self.rnn = getattr(nn, kind)(channels, hidden, num_layers=num_layers, bidirectional=bidirectional,
                                         batch_first=(front == "linear"))
            self.head = nn.Linear(hidden * self.dirs, classes)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            z = torch.relu(self.front(x))
            if self.front_kind == "conv":
                z = z.permute(2, 0, 1)  # [time, batch, channels]
            y, state = self.rnn(z)
            if self.head_kind == "y":
                return self.head(y)
            h_n = state[0] if isinstance(state, tuple) else state  # [layers*dirs, batch, hidden]
            last = h_n[-self.dirs:]  # the last layer's directions
            return self.head(last.permute(1, 0, 2).reshape(last.shape[1], -1))

    return RecurrentNet


def build_model(kind: str, bidirectional: bool = False, num_layers: int = 1, *, front: str = "linear",
                head: str = "y", features: int = 16, channels: int = 24, hidden: int = 32, classes: int = 5,
                seed: int = SEED) -> nn.Module:
    """The seeded torch module (eval mode)."""
    import torch

    _check(kind, front, head, "legacy")
    torch.manual_seed(seed)
    model = _module_class()(kind, bidirectional, num_layers, front, head, features, channels, hidden, classes)
    return model.eval()


def example_input(front: str = "linear", batch: int = TRACE_BATCH, time: int = TRACE_TIME, features: int = 16,
                  seed: int = SEED) -> torch.Tensor:
    import torch

    g = torch.Generator().manual_seed(seed + 1)
    shape = (batch, time, features) if front == "linear" else (batch, features, time)
    return torch.randn(*shape, generator=g)


def _check(kind: str, front: str, head: str, exporter: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")
    if front not in FRONTS:
        raise ValueError(f"unknown front {front!r}; expected one of {FRONTS}")
    if head not in HEADS:
        raise ValueError(f"unknown head {head!r}; expected one of {HEADS}")
    if exporter not in EXPORTERS:
        raise ValueError(f"unknown exporter {exporter!r}; expected one of {EXPORTERS}")


def _torch_tag() -> str:

    import torch

    return re.sub(r"[^0-9A-Za-z.]+", "_", torch.__version__)


def cache_path(kind: str, bidirectional: bool = False, num_layers: int = 1, *, front: str = "linear",
               head: str = "y", exporter: str = "legacy", opset: int | None = None, hidden: int = 32,
               cache_dir: str | os.PathLike[str] | None = None) -> pathlib.Path:
    _check(kind, front, head, exporter)
    op = opset if opset is not None else (LEGACY_OPSET if exporter == "legacy" else "default")
    stem = (f"{kind.lower()}-{'bi' if bidirectional else 'uni'}-l{num_layers}-{front}-{head}-h{hidden}-"
            f"{exporter}-opset{op}-torch{_torch_tag()}-r{RNN_FORMAT}")
    return zoo.cache_root(cache_dir) / "rnn" / f"{stem}.onnx"


def _export_legacy(model: nn.Module, x: torch.Tensor, dest: pathlib.Path, opset: int, front: str) -> None:
    import torch

    time_axis = 1 if front == "linear" else 2
    torch.onnx.export(model, (x,), str(dest), dynamo=False, opset_version=opset, do_constant_folding=True,
                      input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                      dynamic_axes={INPUT_NAME: {0: "batch", time_axis: "time"}})


def _export_dynamo(model: nn.Module, x: torch.Tensor, dest: pathlib.Path, opset: int | None, front: str) -> bool:
    """Export with dynamic batch and time if torch.export allows it, else static; returns which."""
    import torch

    kwargs: dict[str, Any] = {} if opset is None else {"opset_version": opset}
    time_axis = 1 if front == "linear" else 2
    dynamic = {0: torch.export.Dim("batch"), time_axis: torch.export.Dim("time")}
    try:
        program = torch.onnx.export(model, (x,), dynamo=True, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                    dynamic_shapes=(dynamic,), external_data=False, optimize=True, verbose=False,
                                    report=False, **kwargs)
        is_dynamic = True
    except Exception as exc:  # torch.export raises many different types here
        logger.info("dynamo export with dynamic shapes failed (%s); retrying static", type(exc).__name__)
        program = torch.onnx.export(model, (x,), dynamo=True, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                    external_data=False, optimize=True, verbose=False, report=False, **kwargs)
        is_dynamic = False
    program.save(str(dest), external_data=False)
    m = onnx.load(str(dest))
    if m.functions:
        onnx.save(inliner.inline_local_functions(m), str(dest))
    return is_dynamic


def _atomic_write_text(path: pathlib.Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def export_rnn(kind: str, bidirectional: bool = False, num_layers: int = 1, *, front: str = "linear",
               head: str = "y", exporter: str = "legacy", opset: int | None = None, hidden: int = 32,
               cache_dir: str | os.PathLike[str] | None = None, force: bool = False) -> pathlib.Path:
    """Export the model (or reuse the cached file) and return its path.

    ``kind``: ``"LSTM"`` or ``"GRU"``. The graph has one input ``input`` and one output ``output``
    and no state inputs or outputs. A JSON sidecar records the settings and the recurrent op types
    found in the file (``rnn_ops``).
    """

    path = cache_path(kind, bidirectional, num_layers, front=front, head=head, exporter=exporter, opset=opset,
                      hidden=hidden, cache_dir=cache_dir)
    if path.exists() and not force:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    model = build_model(kind, bidirectional, num_layers, front=front, head=head, hidden=hidden)
    x = example_input(front)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".onnx.tmp", dir=path.parent)
    os.close(fd)
    tmp = pathlib.Path(tmp_name)
    try:
        with zoo._quiet():
            if exporter == "legacy":
                _export_legacy(model, x, tmp, opset or LEGACY_OPSET, front)
                dynamic = True
            else:
                dynamic = _export_dynamo(model, x, tmp, opset, front)
        m = onnx.load(str(tmp))
        ops = sorted({n.op_type for n in m.graph.node if n.op_type in ("LSTM", "GRU", "RNN", "Scan", "Loop")})
        meta = {"kind": kind, "bidirectional": bidirectional, "num_layers": num_layers, "front": front,
                "head": head, "hidden": hidden, "exporter": exporter,
                "opset": next((int(i.version) for i in m.opset_import if i.domain in ("", "ai.onnx")), None),
                "rnn_ops": ops, "dynamic": dynamic, "input_shape": list(x.shape), "seed": SEED, "rnn_format": RNN_FORMAT}
        _atomic_write_text(path.with_suffix(".json"), json.dumps(meta, indent=2) + "\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    logger.info("exported %s -> %s", path.stem, path)
    return path


def load_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
    return json.loads(pathlib.Path(path).with_suffix(".json").read_text())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m onnxprune.models.rnn", description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=KINDS)
    parser.add_argument("--bidirectional", action="store_true")
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--front", choices=FRONTS, default="linear")
    parser.add_argument("--head", choices=HEADS, default="y")
    parser.add_argument("--exporter", choices=EXPORTERS, default="legacy")
    parser.add_argument("--opset", type=int, default=None)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args(argv)
    print(export_rnn(args.kind, args.bidirectional, args.layers, front=args.front, head=args.head,
                     exporter=args.exporter, opset=args.opset, hidden=args.hidden, cache_dir=args.cache_dir,
                     force=args.force))
    return 0


if __name__ == "__main__":
    sys.exit(main())
