"""Stripe pruning, soft mode (issue 12 item 2, ``--stripe-mode mask`` to come): the stripes a
:class:`~onnxprune.planning.stripes.StripePlan` removes become zeros in the conv weights.

``mask_stripes`` returns a copy of the model; the graph, its nodes and every tensor's shape are
unchanged, only the removed stripes ``W[f, :, i, j]`` of the planned convs are zeroed (the weight
written back as raw data, in its own dtype). The plan is validated in full first (every conv it names
is a prunable conv of the model, with a keep-mask of shape ``[F, K, K']``); nothing is zeroed if one
check fails (plan, validate, then mutate).

Not built yet: physical shrink mode (smaller kernels per bounding-box group, pads and Slices,
concatenation with the permutation absorbed by the consumers), latency-driven grouping, the CLI and
``--verify`` against the masked original.
"""

from __future__ import annotations

import numpy as np
import onnx

from onnxprune.errors import UserError
from onnxprune.ir.tensors import set_tensor, tensor_value
from onnxprune.planning.stripes import StripeConv, StripePlan, stripe_convs


def validate_stripes(model: onnx.ModelProto, plan: StripePlan) -> dict[str, StripeConv]:
    """``{conv key: conv}`` for every conv the plan names; a UserError if one is not a prunable conv
    of ``model`` or its keep-mask does not match the weight's ``[F, K, K']``."""
    convs, skipped = stripe_convs(model)
    by_key = {c.key: c for c in convs}
    out: dict[str, StripeConv] = {}
    for key, mask in plan.keep.items():
        conv = by_key.get(key)
        if conv is None:
            why = skipped.get(key, "no Conv of that name")
            raise UserError(f"stripe plan names conv {key!r}, which cannot be stripe-pruned: {why}")
        f, _, k, k2 = conv.shape
        if mask.shape != (f, k, k2):
            raise UserError(f"stripe plan for {key!r}: keep-mask shape {mask.shape} does not match the "
                            f"weight {list(conv.shape)} (expected {(f, k, k2)})")
        out[key] = conv
    return out


def mask_stripes(model: onnx.ModelProto, plan: StripePlan) -> onnx.ModelProto:
    """A copy of ``model`` with every stripe the plan removes zeroed; the graph is unchanged."""
    masked = onnx.ModelProto()
    masked.CopyFrom(model)
    convs = validate_stripes(masked, plan)  # checked in full before any weight is written
    weights = _tensors(masked.graph)
    for key, conv in convs.items():
        t = weights[conv.weight_name]
        w = np.array(tensor_value(t))  # writable copy
        drop = ~plan.keep[key]  # [F, K, K']
        w[np.broadcast_to(drop[:, None, :, :], w.shape)] = 0
        set_tensor(t, w)
    return masked


def _tensors(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    out = {t.name: t for t in graph.initializer}
    for n in graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    out[n.output[0]] = a.t
    return out
