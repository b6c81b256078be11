"""Graph builders and checks for tests (nothing in the package imports this): small models from
ONNX text (``graphs``), prune-and-verify and the assertions on its result (``checks``), synthetic
large models (``synth``) and re-encodings (``variants``)."""

from __future__ import annotations

from onnxprune.testing.checks import prune_and_verify
from onnxprune.testing.graphs import from_text

__all__ = ["from_text", "prune_and_verify"]
