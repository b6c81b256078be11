"""Checks of a rewritten model: the full ONNX checker, and every static axis of every tensor against
the size the plan predicts (the safety net: a mismatch refuses the rewrite, nothing is written)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import onnx

from onnxprune.analysis.analyze import Analysis
from onnxprune.analysis.coupling import CouplingGraph
from onnxprune.analysis.passes import INVALID_INPUT
from onnxprune.analysis.shapes import Shapes, infer_shapes
from onnxprune.analysis.subgraphs import with_body_shapes
from onnxprune.errors import RewriteError, UserError
from onnxprune.ir.graph import weightless
from onnxprune.ir.io import LARGE_BYTES, approx_bytes, has_external, save_atomic
from onnxprune.planning.plan import Plan
from onnxprune.rewrite.apply import kept_map, rewrite


def expected_shapes(cg: CouplingGraph, plan: Plan) -> dict[str, tuple[int, ...]]:
    kept = kept_map(cg, plan)
    out = {}
    for (t, ax), k in kept.items():
        shape = list(out.get(t, cg.shapes.get(t)))
        shape[ax] = len(k)
        out[t] = tuple(shape)
    return out


def check_shapes(pruned: onnx.ModelProto, cg: CouplingGraph, plan: Plan, new_shapes: Shapes) -> None:
    """Every static axis of every tensor must have the size the plan predicts."""
    expected = expected_shapes(cg, plan)
    bad = []
    for t, old in cg.shapes.concrete.items():
        got = new_shapes.get(t)
        if got is None:
            continue
        want = expected.get(t, old)
        if len(got) != len(want):
            bad.append((t, want, got))
            continue
        for ax, (w, gv) in enumerate(zip(want, got, strict=True)):
            if cg.shapes.is_dynamic(t, ax) or new_shapes.is_dynamic(t, ax):
                continue
            if w != gv:
                bad.append((t, want, got))
                break
    if bad:
        t, want, got = bad[0]
        raise RewriteError(f"rewrite refused: tensor '{t}' would have shape {list(got)}, plan predicts "
                           f"{list(want)} ({len(bad)} tensors differ)")



def apply_plan(an: Analysis, plan: Plan, keep_bytes: bool = False):
    """Rewrite and check: (pruned model, its shapes), plus the checked serialization with
    ``keep_bytes`` (pass it to ``save_atomic(data=...)`` to save without serializing again). An input
    that fails the full ONNX checker (``Analysis.input_fault``) is refused first: the input's fault
    (exit 2, the checker's reason), not the rewrite's."""
    if an.input_fault is not None:
        raise UserError(INVALID_INPUT + an.input_fault)
    pruned = rewrite(an.model, an.cg, plan)
    try:
        data = full_check(pruned)
    except UserError:  # not the model's fault: the check could not be run (a full disk)
        raise
    except Exception as exc:  # noqa: BLE001
        if _input_invalid(an.model):
            raise UserError(INVALID_INPUT + str(exc).splitlines()[0][:300]) from None
        raise RewriteError(f"pruned model fails the ONNX checker: {str(exc).splitlines()[0][:300]}") from None
    new_shapes = infer_shapes(pruned, an.input_shapes, arrays=an.input_arrays)
    new_shapes = with_body_shapes(pruned, new_shapes, an.registry, an.input_shapes, an.input_arrays)
    check_shapes(pruned, an.cg, plan, new_shapes)
    return (pruned, new_shapes, data) if keep_bytes else (pruned, new_shapes)


def _input_invalid(model: onnx.ModelProto) -> bool:
    """Whether the original fails the same full check as the pruned model did: then the input is
    at fault (exit 2), not the rewrite (exit 4). Asked only once the pruned model failed, so loading
    and pruning valid models never pays for a second full check of a big input."""
    try:
        full_check(model)
    except UserError:
        return False
    except Exception:  # noqa: BLE001 - the checker raises several types
        return True
    return False


def checked_rewrite(model: onnx.ModelProto, what: str) -> bytes | None:
    """``full_check`` of a model onnxprune wrote (``what``: "finetuned", "stripe-pruned", ...): its
    serialization, or a RewriteError naming the checker's first line (a UserError from the check
    itself, e.g. a full disk, passes through)."""
    try:
        return full_check(model)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - the checker raises several types
        raise RewriteError(f"{what} model fails the ONNX checker: {str(exc).splitlines()[0][:300]}") from None


def full_check(model: onnx.ModelProto) -> bytes | None:
    """onnx.checker with full_check; models with external data are checked as saved files.

    Returns the serialized model that was checked (None for external data), so that saving it
    does not serialize it again."""
    if not has_external(model) and approx_bytes(model) < LARGE_BYTES:
        # full_check = the structural check + strict, type-checking shape inference; the latter only
        # needs the weights' types and dims, so it runs on a weightless copy (one serialization less)
        data = model.SerializeToString()
        onnx.checker.check_model(data)
        onnx.shape_inference.infer_shapes(weightless(model), check_type=True, strict_mode=True)
        return data
    with tempfile.TemporaryDirectory(prefix="onnxprune-check-") as d:
        path = Path(d) / "model.onnx"
        save_atomic(model, path, external=True)
        onnx.checker.check_model(str(path), full_check=True)
    return None
