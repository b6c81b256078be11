"""Reshape, Flatten, Transpose, Squeeze, Unsqueeze: axes move, merge or split.

Reshape and Flatten factor the input and output shapes into aligned blocks. A block of one axis on
each side is an identity. A block that merges several axes into one (C x H x W -> C*H*W) or splits
one into several (C -> g x C/g) makes every element of the single axis belong to one index of a
chosen factor axis: the largest factor whose class is not frozen (so flatten follows the channels
and not the spatial axes, and a channel shuffle Reshape -> Transpose -> Reshape follows the in-group
position through both reshapes). The other factors keep their size. Reshape targets are rewritten
where their entries are constants; computed entries stay computed (and the rewrite checks them).
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from onnxprune.analysis.contract import AnalysisCtx, Handler, Node, RewriteCtx, register
from onnxprune.errors import Barrier


def factor_blocks(a: tuple[int, ...], b: tuple[int, ...]) -> list[tuple[list[int], list[int]]] | None:
    """Minimal aligned blocks of axes with equal products; size-1 axes are blocks of their own."""
    blocks: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(a) or j < len(b):
        if i < len(a) and a[i] == 1:
            if j < len(b) and b[j] == 1:
                blocks.append(([i], [j]))
                i += 1
                j += 1
            else:
                blocks.append(([i], []))
                i += 1
            continue
        if j < len(b) and b[j] == 1:
            blocks.append(([], [j]))
            j += 1
            continue
        if i >= len(a) or j >= len(b):
            return None
        pa, pb, ii, jj = a[i], b[j], [i], [j]
        i += 1
        j += 1
        while pa != pb:
            if pa < pb:
                if i >= len(a):
                    return None
                pa *= a[i]
                ii.append(i)
                i += 1
            else:
                if j >= len(b):
                    return None
                pb *= b[j]
                jj.append(j)
                j += 1
        blocks.append((ii, jj))
    return blocks


def analyze_reshape(node: Node, ctx: AnalysisCtx, x: str, y: str) -> None:
    xs, ys = ctx.shape(x), ctx.shape(y)
    if xs is None or ys is None:
        return
    blocks = factor_blocks(xs, ys)
    ctx.cover(x)
    ctx.cover(y)
    if blocks is None:
        ctx.freeze(x, None, f"Reshape '{node.name}': shapes do not factor")
        ctx.freeze(y, None, f"Reshape '{node.name}': shapes do not factor")
        return
    for ii, jj in blocks:
        if len(ii) == 1 and len(jj) == 1:
            ctx.identity(x, ii[0], y, jj[0])
        elif len(ii) == 1 and len(jj) > 1:
            _defer_factor(node, ctx, x, ii[0], y, jj)
        elif len(jj) == 1 and len(ii) > 1:
            _defer_factor(node, ctx, y, jj[0], x, ii)
        elif ii and jj:
            _regroup(node, ctx, x, ii, y, jj)


def _atoms(sizes: list[int]) -> list[int]:
    """Suffix products of a block's axis sizes (inner to outer)."""
    out, p = [], 1
    for n in reversed(sizes):
        p *= n
        out.append(p)
    return out


def _regroup(node: Node, ctx: AnalysisCtx, x: str, ii: list[int], y: str, jj: list[int]) -> None:
    """Several axes on both sides (``[2048, 64] -> [512, 256]``): refine both into common atoms
    (here 512 x 4 x 64); an axis that is a run of atoms inside an axis of the other side is followed
    like a merge factor, the others keep their size."""
    xs, ys = ctx.shape(x), ctx.shape(y)
    sa, sb = [xs[a] for a in ii], [ys[b] for b in jj]
    cuts = sorted(set(_atoms(sa)) | set(_atoms(sb)))
    if any(c2 % c1 for c1, c2 in zip(cuts, cuts[1:], strict=False)):
        for ax in ii:
            ctx.freeze(x, ax, f"Reshape '{node.name}': axes regroup without a common factor")
        for ax in jj:
            ctx.freeze(y, ax, f"Reshape '{node.name}': axes regroup without a common factor")
        return

    def spans(sizes):  # (inner stride, outer stride) of each axis in flat-index units
        out, p = [], 1
        for n in reversed(sizes):
            out.append((p, p * n))
            p *= n
        return out[::-1]

    span_a, span_b = spans(sa), spans(sb)
    contained = set()
    linked_big = set()
    for (t_small, axes_small, sp_small), (t_big, axes_big, sp_big) in (
            ((x, ii, span_a), (y, jj, span_b)), ((y, jj, span_b), (x, ii, span_a))):
        for k, ax in enumerate(axes_small):
            lo, hi = sp_small[k]
            for m, bx in enumerate(axes_big):
                blo, bhi = sp_big[m]
                if blo <= lo and hi <= bhi and (lo, hi) != (blo, bhi):
                    # element e of the big axis holds index (e * blo // lo) % size of the small axis
                    size_small, size_big = hi // lo, bhi // blo
                    if (size_small > 1 and ctx.has_space(t_small, ax) and ctx.has_space(t_big, bx)
                            and (t_big, bx) not in linked_big):  # one factor per axis, or all would merge
                        linked_big.add((t_big, bx))
                        e = np.arange(size_big)
                        ctx.link(t_big, bx, e, t_small, ax, (e * blo // lo) % size_small)
                        contained.add((t_small, ax))
                        contained.add((t_big, bx))
                elif (lo, hi) == (blo, bhi):
                    ctx.identity(t_small, ax, t_big, bx)
                    contained.add((t_small, ax))
    for t, axes in ((x, ii), (y, jj)):
        for ax in axes:
            if (t, ax) not in contained:
                ctx.freeze(t, ax, f"Reshape '{node.name}': axis {ax} is split across other axes")


def _defer_factor(node: Node, ctx: AnalysisCtx, single: str, s_axis: int, multi: str, m_axes: list[int]) -> None:
    shape = ctx.shape(multi)
    sizes = [shape[a] for a in m_axes]
    strides = [int(np.prod(sizes[k + 1:], dtype=np.int64)) for k in range(len(sizes))]

    def decide(ctx: AnalysisCtx) -> None:
        cands = [k for k, a in enumerate(m_axes) if ctx.has_space(multi, a)]
        free = [k for k in cands if not ctx.class_frozen(multi, m_axes[k])]
        pool = free or cands
        if not pool or not ctx.has_space(single, s_axis):
            # a static factor merged into a dynamic (or size-1) axis cannot be followed either
            ctx.freeze(single, s_axis, f"Reshape '{node.name}': no factor to follow")
            for k in cands:
                ctx.freeze(multi, m_axes[k], f"Reshape '{node.name}': axis {m_axes[k]} merges into a dynamic or size-1 axis")
            return
        want = "heads" if ctx.head_mode == "heads" else "dim"
        kinds = {k: ctx.class_kind(multi, m_axes[k]) for k in pool}
        preferred = [k for k in pool if want in kinds[k]]
        if preferred:
            pool = preferred
        elif want == "heads":  # a KV projection split into [kv heads, head dim]: the dim is the contraction
            not_dim = [k for k in pool if "dim" not in kinds[k]]
            pool = not_dim or pool
        # grouped-query attention merges [kv heads, copies] (Expand) into the query heads: a unit is a
        # KV group ("kv") or a query-head position within every group ("query", the copies)
        repeat = [k for k in pool if "repeat" in kinds[k]]
        why = "keeps its size"
        if repeat and len(repeat) < len(pool):
            if ctx.gqa_unit == "query":
                pool = repeat
                why = "keeps its size (KV heads; --gqa query prunes query heads within each KV group)"
            else:
                pool = [k for k in pool if k not in repeat]
                why = "keeps its size (repeated KV heads; --gqa kv prunes whole KV groups)"
        best = max(pool, key=lambda k: (sizes[k], -k))
        e = np.arange(int(np.prod(sizes, dtype=np.int64)))
        ctx.link(single, s_axis, e, multi, m_axes[best], (e // strides[best]) % sizes[best])
        for k in cands:
            if k != best:
                ctx.freeze(multi, m_axes[k], f"Reshape '{node.name}': factor axis {m_axes[k]} {why}")

    ctx.defer(decide)


def _target_sources(rw: RewriteCtx, node: Node, shape_input_index: int):
    """For each entry of a Reshape/Expand target: (node, input index, position) of a constant, or None."""
    t = node.input[shape_input_index]
    owner, idx = node, shape_input_index
    for _ in range(8):  # look through Cast/Identity (tf2onnx casts shape vectors)
        if rw.const(t) is not None:
            break
        p = rw.producer(t)
        if p is None or p.op_type not in ("Cast", "Identity"):
            break
        if len(rw.consumers(t)) > 1:
            p = rw.clone_producer(owner, idx)  # a shared shape vector: give this node its own copy
        owner, idx, t = p, 0, p.input[0]
    if rw.const(t) is not None:
        n = rw.const(t).size
        return [(owner, idx, k) for k in range(n)]
    prod = rw.producer(t)
    if prod is None or prod.op_type != "Concat":
        return None
    if len(rw.consumers(t)) > 1:
        prod = rw.clone_producer(owner, idx)
    out = []
    for idx, part in enumerate(prod.input):
        ps = rw.old_shape(part)
        if ps is None or len(ps) != 1:
            return None
        if rw.const(part) is not None:
            out.extend((prod, idx, k) for k in range(ps[0]))
        else:
            out.extend([None] * ps[0])
    return out


def rewrite_target(rw: RewriteCtx, node: Node, shape_input_index: int, new_entry) -> None:
    """Rewrite the constant entries of a shape input whose output axis changed."""
    y = node.output[0]
    old, new = rw.old_shape(y), rw.new_shape(y)
    if old == new:
        return
    sources = _target_sources(rw, node, shape_input_index)
    if sources is None:
        return
    for pos, (o, n) in enumerate(zip(old, new, strict=True)):
        if o == n or pos >= len(sources) or sources[pos] is None:
            continue
        src_node, idx, k = sources[pos]
        value = rw.const(src_node.input[idx]).copy()
        flat = value.reshape(-1)
        cur = int(flat[k])
        repl = new_entry(pos, cur, n)
        if repl is None or repl == cur:
            continue
        flat[k] = repl
        rw.set_input_const(src_node, idx, flat.reshape(value.shape))


@register
class Reshape(Handler):
    op_types = ("Reshape",)
    moves_values = True
    keeps_zeros = True
    carries_tensor = True
    shape_sinks = frozenset({1})

    def analyze(self, node: Node, ctx: AnalysisCtx) -> None:
        ctx.cover(node.input[1])
        analyze_reshape(node, ctx, node.input[0], node.output[0])

    def torch_forward(self, node: Node, xs: list, op):
        """0 copies the input's size (unless ``allowzero``), -1 is inferred."""
        x = xs[0]
        target = op.ints(xs[1], "shape")
        if not int(op.attr("allowzero", 0) or 0):
            target = [int(x.shape[i]) if v == 0 else v for i, v in enumerate(target)]
        return x.reshape(target)

    def rewrite(self, node: Node, rw: RewriteCtx) -> None:
        y = node.output[0]
        if rw.old_shape(y) == rw.new_shape(y):
            return
        sources = _target_sources(rw, node, 1)
        changed = [i for i, (o, n) in enumerate(zip(rw.old_shape(y), rw.new_shape(y), strict=True)) if o != n]
        if sources is None or any(i >= len(sources) or sources[i] is None for i in changed):
            target = _rebuilt_target(rw, node)
            if target is not None:
                rw.set_input_const(node, 1, target)
                return

        def entry(pos, cur, n):
            if cur == -1:
                return None
            return n

        rewrite_target(rw, node, 1, entry)


def _rebuilt_target(rw: RewriteCtx, node: Node) -> np.ndarray | None:
    """A constant target for a Reshape whose computed target hides a changed channel count:
    static axes get their new size, a dynamic axis copied from the same input axis gets 0, and at
    most one other dynamic axis gets -1."""
    if int(rw.attr(node, "allowzero") or 0):
        return None
    x, y = node.input[0], node.output[0]
    target = []
    free = 0
    for i, n in enumerate(rw.new_shape(y)):
        if not rw.is_dynamic(y, i):
            target.append(int(n))
            continue
        if rw.same_dynamic_size(x, i, y, i):
            target.append(0)
        else:
            target.append(-1)
            free += 1
    if free > 1:
        return None
    return np.array(target, dtype=np.int64)


@register
class Flatten(Handler):
    op_types = ("Flatten",)
    moves_values = True
    keeps_zeros = True
    carries_tensor = True

    def analyze(self, node: Node, ctx: AnalysisCtx) -> None:
        analyze_reshape(node, ctx, node.input[0], node.output[0])

    def torch_forward(self, node: Node, xs: list, op):
        x = xs[0]
        axis = int(op.attr("axis", 1))
        axis = axis + x.dim() if axis < 0 else axis
        return x.reshape(int(np.prod(x.shape[:axis], dtype=np.int64)), int(np.prod(x.shape[axis:], dtype=np.int64)))


def transpose_perm(node: Node, ctx: AnalysisCtx, rank: int) -> list[int]:
    """Output axis i of a Transpose is input axis perm[i] (default: the axes reversed)."""
    perm = ctx.attr("perm", node)
    return list(perm) if perm else list(range(rank))[::-1]


@register
class Transpose(Handler):
    op_types = ("Transpose",)
    shows_constant = True
    moves_values = True
    keeps_zeros = True
    carries_tensor = True

    def analyze(self, node: Node, ctx: AnalysisCtx) -> None:
        x, y = node.input[0], node.output[0]
        r = ctx.rank(x)
        if r is None:
            return
        for i, p in enumerate(transpose_perm(node, ctx, r)):
            ctx.identity(x, p, y, i)

    def view_axes(self, node: Node, ctx: AnalysisCtx) -> list[int] | None:
        r = ctx.rank(node.input[0])
        return None if r is None else transpose_perm(node, ctx, r)

    def torch_forward(self, node: Node, xs: list, op):
        x = xs[0]
        perm = op.attr("perm")
        return x.permute(list(perm) if perm else list(range(x.dim()))[::-1])


class _SqueezeAxes(Handler):
    """Squeeze and Unsqueeze: the axes of the longer side (input of Squeeze, output of Unsqueeze)
    that are not in ``axes`` are, in order, the axes of the shorter side. ``axes`` is an attribute
    below opset 13."""

    moves_values = True
    keeps_zeros = True
    carries_tensor = True
    shape_arith = True
    squeezes: ClassVar[bool] = True  # the input is the longer side

    def analyze(self, node: Node, ctx: AnalysisCtx) -> None:
        x, y = node.input[0], node.output[0]
        shape = ctx.shape(x if self.squeezes else y)
        if shape is None:
            return
        axes = self.axes(node, ctx)
        r = len(shape)
        if axes is None:
            axes = self.default_axes(shape)
        axes = {a + r if a < 0 else a for a in axes}
        kept = [a for a in range(r) if a not in axes]
        for i, a in enumerate(kept):
            if self.squeezes:
                ctx.identity(x, a, y, i)
            else:
                ctx.identity(x, i, y, a)

    def axes(self, node: Node, ctx: AnalysisCtx) -> list[int] | None:
        a = ctx.attr("axes")
        return None if a is None else [int(v) for v in a]

    def default_axes(self, shape: tuple[int, ...]) -> list[int]:
        """The axes when none are given: Squeeze removes every size-1 axis."""
        return [a for a in range(len(shape)) if shape[a] == 1]

    def torch_forward(self, node: Node, xs: list, op):
        x = xs[0]
        axes = self.torch_axes(xs, op)
        if self.squeezes:
            r = x.dim()
            axes = self.default_axes(tuple(x.shape)) if axes is None else [a + r if a < 0 else a for a in axes]
            for a in axes:
                if x.shape[a] != 1:
                    op.refuse(f"axis {a} of size {x.shape[a]} cannot be squeezed")
            keep = [int(d) for a, d in enumerate(x.shape) if a not in set(axes)]
            return x.reshape(keep)
        r = x.dim() + len(axes or [])
        for a in sorted(a + r if a < 0 else a for a in axes or []):
            x = x.unsqueeze(a)
        return x

    def torch_axes(self, xs: list, op) -> list[int] | None:
        a = op.attr("axes")
        return None if a is None else [int(v) for v in a]


class _AxesInput:
    """Mixin, opset 13: ``axes`` is input 1 (constant, or the node is a barrier)."""

    shape_sinks = frozenset({1})

    def torch_axes(self, xs: list, op) -> list[int] | None:
        return op.ints(xs[1], "axes") if len(xs) > 1 and xs[1] is not None else None

    def axes(self, node: Node, ctx: AnalysisCtx) -> list[int] | None:
        if len(node.input) > 1 and node.input[1]:
            ctx.cover(node.input[1])
            v = ctx.value(node.input[1])
            if v is None:
                raise Barrier("axes are not constant")
            return [int(a) for a in v.reshape(-1)]
        return None


@register
class Squeeze1(_SqueezeAxes):
    op_types = ("Squeeze",)


@register
class Squeeze13(_AxesInput, Squeeze1):
    since = 13


@register
class Unsqueeze1(_SqueezeAxes):
    op_types = ("Unsqueeze",)
    squeezes = False

    def default_axes(self, shape: tuple[int, ...]) -> list[int]:
        return []


@register
class Unsqueeze13(_AxesInput, Unsqueeze1):
    since = 13
