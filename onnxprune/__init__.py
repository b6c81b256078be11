"""onnxprune: structural channel pruning of ONNX files through a coupling graph.

Command line: ``onnxprune --help``. Python: ``onnxprune.api.DependencyGraph`` and ``Pruner``;
``onnxprune.pipeline.run`` for the whole load → analyze → plan → rewrite → check → verify pipeline.
"""

__version__ = "0.1.0"
