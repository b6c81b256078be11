"""One analysis of a model: load (or check) it, run the normalization passes (which check it and
convert opsets 7..10 to 13), infer shapes and build the coupling graph. Every later stage (plan,
rewrite, verify, measure) takes an Analysis."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import onnx

from onnxprune.analysis.contract import Registry
from onnxprune.analysis.coupling import CouplingGraph, analyze
from onnxprune.analysis.passes import normalize
from onnxprune.analysis.shapes import Shapes, infer_shapes
from onnxprune.analysis.subgraphs import with_body_shapes
from onnxprune.ir.io import MIN_CONVERTIBLE, check_opset, load
from onnxprune.ir.tensors import ConstantTable


@dataclass
class Analysis:
    model: onnx.ModelProto  # normalized original
    shapes: Shapes
    cg: CouplingGraph
    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    seconds: float = 0.0
    changes: tuple[str, ...] = ()  # what the normalization passes changed
    input_arrays: dict[str, np.ndarray] = field(default_factory=dict)  # --input: the probes ran on them
    input_fault: str | None = None  # why the input fails the full ONNX checker (None: it passes)

    @property
    def registry(self) -> Registry:
        return self.cg.registry


def analyze_model(model: onnx.ModelProto | str, registry: Registry,
                  input_shapes: dict[str, tuple[int, ...]] | None = None, head_mode: str = "dim",
                  owned: bool | None = None, input_arrays: dict[str, np.ndarray] | None = None,
                  bias_inputs: bool = False) -> Analysis:
    """``owned``: the caller hands the ModelProto over (it may be normalized in place); a path is
    always loaded and owned here. ``input_arrays`` (``--input``): the probes run on them.
    ``bias_inputs``: give bias-less linear ops a zero bias first (``passes.add_bias_inputs``)."""
    t0 = time.perf_counter()
    owned = (not isinstance(model, onnx.ModelProto)) or bool(owned)
    if not isinstance(model, onnx.ModelProto):
        model = load(model, MIN_CONVERTIBLE)
    else:
        check_opset(model, min_opset=MIN_CONVERTIBLE)
    res = normalize(model, inplace=owned, input_shapes=input_shapes, input_arrays=input_arrays,
                    bias_inputs=bias_inputs, stand_ins=registry.shape_stand_ins())
    model = res.model
    shapes = infer_shapes(model, input_shapes, arrays=input_arrays)
    shapes = with_body_shapes(model, shapes, registry, input_shapes, input_arrays)  # inside If branches
    consts = ConstantTable.of(model.graph)
    cg = analyze(model, shapes, registry, consts, head_mode=head_mode)
    return Analysis(model, shapes, cg, dict(input_shapes or {}), time.perf_counter() - t0,
                    res.changes + tuple(f"infer_shapes: {n}" for n in shapes.notes), dict(input_arrays or {}),
                    res.fault)


def barrier_summary(cg: CouplingGraph, limit: int = 8) -> list[str]:
    """The most common reasons groups are frozen, with counts."""
    reasons: dict[str, int] = {}
    for g in cg.groups:
        if g.frozen:
            reasons[g.frozen[0]] = reasons.get(g.frozen[0], 0) + 1
    return [f"{r} ({n} group{'s' if n > 1 else ''})" for r, n in sorted(reasons.items(), key=lambda x: -x[1])][:limit]
