"""Torch forwards of the ops that no handler owns (the executor's table for them).

An op with a handler has its forward in the handler's module (``torch_forward``); the ops here have
none: Constant (its value is a leaf the executor makes once), the index ops the exporters write for
attention masks and windows (ScatterND, ScatterElements, GatherElements, GatherND, CumSum, Trilu),
ArgMax/ArgMin/TopK, DepthToSpace/SpaceToDepth, and Loop (a body run once per iteration). Every
function has the signature of a handler's ``torch_forward`` (``node``, inputs, ``op``: a
:class:`onnxprune.runtime.torch_exec.TorchOp`) and takes torch from ``op.torch``, so this module
imports without torch. ``FORWARDS`` maps ``(domain, op_type)`` to the function; a test checks that no
op here also has a handler.
"""

from __future__ import annotations

import numpy as np

from onnxprune.ir.tensors import constant_node_value


def constant(node, xs, op):
    for a in node.attribute:
        if a.name in ("sparse_value", "value_string", "value_strings"):
            op.refuse(f"a Constant with '{a.name}' has no torch value")
    v = constant_node_value(node)
    if v is None:
        op.refuse("a Constant without a value")
    return op.tensor(v)


def _norm_indices(T, idx, n):
    return T.where(idx < 0, idx + n, idx)


def scatter_nd(node, xs, op):
    T = op.torch
    data, indices, updates = xs
    red = op.attr("reduction", "none")
    k = indices.shape[-1]
    idx = indices.reshape(-1, k).long()
    idx = T.stack([_norm_indices(T, idx[:, j], data.shape[j]) for j in range(k)], 0) if k else idx.T
    upd = updates.reshape((-1,) + tuple(data.shape[k:]))
    key = tuple(idx[j] for j in range(k))
    if red == "none":
        return data.index_put(key, upd)
    if red == "add":
        return data.index_put(key, upd, accumulate=True)
    # mul / max / min: one index at a time keeps duplicates in order, as the spec's loop does
    out = data.clone()
    for i in range(upd.shape[0]):
        at = tuple(int(idx[j, i]) for j in range(k))
        cur = out[at]
        new = {"mul": cur * upd[i], "max": T.maximum(cur, upd[i]), "min": T.minimum(cur, upd[i])}.get(red)
        if new is None:
            op.refuse(f"reduction '{red}'")
        out = out.index_put(tuple(T.tensor(a, device=out.device) for a in at), new)
    return out


def scatter_elements(node, xs, op):
    T = op.torch
    data, indices, updates = xs
    axis = int(op.attr("axis", 0))
    axis = axis + data.dim() if axis < 0 else axis
    idx = _norm_indices(T, indices.long(), data.shape[axis])
    red = op.attr("reduction", "none")
    if red == "none":
        return data.scatter(axis, idx, updates)
    torch_red = {"add": "sum", "mul": "prod", "max": "amax", "min": "amin"}.get(red)
    if torch_red is None:
        op.refuse(f"reduction '{red}'")
    return data.scatter_reduce(axis, idx, updates, torch_red, include_self=True)


def gather_elements(node, xs, op):
    T = op.torch
    data, indices = xs
    axis = int(op.attr("axis", 0))
    axis = axis + data.dim() if axis < 0 else axis
    return T.gather(data, axis, _norm_indices(T, indices.long(), data.shape[axis]))


def gather_nd(node, xs, op):
    T = op.torch
    data, indices = xs
    b = int(op.attr("batch_dims", 0))
    k = indices.shape[-1]
    batch = tuple(data.shape[:b])
    nb = int(np.prod(batch, dtype=np.int64)) if b else 1
    d = data.reshape((nb,) + tuple(data.shape[b:]))
    idx = indices.reshape((nb, -1, k)).long()
    bi = T.arange(nb, device=d.device).reshape(nb, 1).expand(nb, idx.shape[1])
    key = (bi,) + tuple(_norm_indices(T, idx[..., j], d.shape[1 + j]) for j in range(k))
    out = d[key]
    return out.reshape(tuple(indices.shape[:-1]) + tuple(data.shape[b + k:]))


def cumsum(node, xs, op):
    T = op.torch
    x, axis_t = xs
    axis = op.ints(axis_t, "axis")[0]
    axis = axis + x.dim() if axis < 0 else axis
    y = x
    if int(op.attr("reverse", 0)):
        y = T.flip(y, (axis,))
    out = T.cumsum(y, axis)
    if int(op.attr("exclusive", 0)):
        out = out - y
    if int(op.attr("reverse", 0)):
        out = T.flip(out, (axis,))
    return out.to(x.dtype)


def trilu(node, xs, op):
    T = op.torch
    x = xs[0]
    k = op.ints(xs[1], "k")[0] if len(xs) > 1 and xs[1] is not None else 0
    return T.triu(x, k) if int(op.attr("upper", 1)) else T.tril(x, k)


def _arg(fn):
    def forward(node, xs, op):
        T = op.torch
        x = xs[0]
        axis = int(op.attr("axis", 0))
        axis = axis + x.dim() if axis < 0 else axis
        keep = bool(int(op.attr("keepdims", 1)))
        if int(op.attr("select_last_index", 0)):
            flipped = T.flip(x, (axis,))
            idx = (x.shape[axis] - 1) - fn(T, flipped, axis, keep)
        else:
            idx = fn(T, x, axis, keep)
        return idx.to(T.int64)
    return forward


def topk(node, xs, op):
    T = op.torch
    x = xs[0]
    k = op.ints(xs[1], "k")[0] if len(xs) > 1 else int(op.attr("k"))  # an attribute below opset 10
    axis = int(op.attr("axis", -1))
    largest, sort = bool(int(op.attr("largest", 1))), bool(int(op.attr("sorted", 1)))
    v, i = T.topk(x, k, dim=axis, largest=largest, sorted=sort)
    return v, i.to(T.int64)


def depth_to_space(node, xs, op):
    x = xs[0]
    b = int(op.attr("blocksize"))
    n, c, h, w = x.shape
    if op.attr("mode", "DCR") == "DCR":
        y = x.reshape(n, b, b, c // (b * b), h, w).permute(0, 3, 4, 1, 5, 2)
    else:
        y = x.reshape(n, c // (b * b), b, b, h, w).permute(0, 1, 4, 2, 5, 3)
    return y.reshape(n, c // (b * b), h * b, w * b)


def space_to_depth(node, xs, op):
    x = xs[0]
    b = int(op.attr("blocksize"))
    n, c, h, w = x.shape
    y = x.reshape(n, c, h // b, b, w // b, b).permute(0, 3, 5, 1, 2, 4)
    return y.reshape(n, c * b * b, h // b, w // b)


def loop(node, xs, op):
    """Loop: the body runs while the trip count and the condition allow; carried values pass from
    one iteration to the next, scan outputs are stacked on a new axis 0."""
    T = op.torch
    body = next(a.g for a in node.attribute if a.name == "body")  # for its signature only
    m = op.ints(xs[0], "trip count")[0] if xs and xs[0] is not None else None
    cond = bool(op.ints(xs[1], "condition")[0]) if len(xs) > 1 and xs[1] is not None else True
    carried = list(xs[2:])
    n_carried = len(carried)
    n_scan = len(body.output) - 1 - n_carried
    scans: list[list] = [[] for _ in range(n_scan)]
    i = 0
    limit = 1 << 20
    while cond and (m is None or i < m):
        if i >= limit:
            op.refuse(f"more than {limit} iterations")
        outs = op.run_subgraph("body", [op.tensor(np.array(i, dtype=np.int64)),
                                      op.tensor(np.array(cond)), *carried])
        cond = bool(op.ints(outs[0], "condition")[0])
        carried = outs[1:1 + n_carried]
        for k in range(n_scan):
            scans[k].append(outs[1 + n_carried + k])
        i += 1
    stacked = []
    for k, s in enumerate(scans):
        if not s:
            op.refuse(f"scan output {k} of a loop that ran no iteration has no known shape")
        stacked.append(T.stack(s, 0))
    return [*carried, *stacked]


FORWARDS = {
    ("", "Constant"): constant,
    ("", "ScatterND"): scatter_nd,
    ("", "ScatterElements"): scatter_elements,
    ("", "Scatter"): scatter_elements,
    ("", "GatherElements"): gather_elements,
    ("", "GatherND"): gather_nd,
    ("", "CumSum"): cumsum,
    ("", "Trilu"): trilu,
    ("", "ArgMax"): _arg(lambda T, x, a, k: T.argmax(x, a, keepdim=k)),
    ("", "ArgMin"): _arg(lambda T, x, a, k: T.argmin(x, a, keepdim=k)),
    ("", "TopK"): topk,
    ("", "DepthToSpace"): depth_to_space,
    ("", "SpaceToDepth"): space_to_depth,
    ("", "Loop"): loop,
}
