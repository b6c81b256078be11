"""LSTM, GRU and RNN: hidden-size pruning (DepGraph's LSTM rule) and input-channel pruning.

Layout 0 (the only one onnxruntime runs): X [seq, batch, input], W [dirs, G*hidden, input],
R [dirs, G*hidden, hidden], B [dirs, 2*G*hidden], initial_h/initial_c [dirs, batch, hidden],
P [dirs, 3*hidden] (LSTM peepholes), Y [seq, dirs, batch, hidden], Y_h/Y_c [dirs, batch, hidden];
G = 4 for LSTM (gates i, o, f, c), 3 for GRU (z, r, h), 1 for RNN.

One *hidden unit* h owns row h of every gate block of W and R (element g*hidden + h of axis 1),
element h of every block of B (both the Wb and the Rb halves) and of P, column h of R, and index h
of the last axis of Y, Y_h, Y_c, initial_h and initial_c. Every such axis is a single space whose
element e is linked to unit e % hidden, so all gate blocks and both directions of a bidirectional
op share the same unit (``hidden_size`` is one attribute). Roles: W and R rows are producers, B and
P and constant initial states params, and R's column h is the *recurrent consumer*: unit h reaches
the other units only through R[:, :, h] and through the consumers of Y/Y_h/Y_c downstream.

Why the masked original is exact: with R[:, :, h] = 0, every gate of every other unit k is
f(W[k]·x + sum_{j != h} R[k, j]·H_j + b[k] (+ P[k]·C_k)), the same sum the pruned op computes
(activations, clip, peepholes, input_forget and the state update are all per unit). For GRU the
hidden gate reads (r ⊙ H_{t-1})·Rh^T (linear_before_reset=0) or r ⊙ (H_{t-1}·Rh^T + Rbh)
(linear_before_reset=1): in both, H_h enters other units only through column h of Rh, and r_h, Rbh_h
only touch unit h. So every attribute the spec defines is per unit and is kept as is; only
``layout=1`` (batch-first, which onnxruntime refuses to run) and unknown activation names are
barriers. X's feature axis and W's axis 2 are an ordinary consumer slot (like a Conv's input
channels), so the channels feeding the op can be pruned too.

Initial states: a constant state is sliced with the unit (param). A *computed all-zero* state (the
legacy exporter's ConstantOfShape(Concat(num_layers*dirs, batch, hidden)) -> Slice for a dynamic
batch) is equal to an omitted one: it is not linked, and the rewrite drops it ("") when hidden
changes. Any other computed state is linked to the unit; a state that is a graph input or output
stays frozen (graph inputs/outputs are).

MACs per op: seq * batch * dirs * G * hidden * (input + hidden) = seq * batch * (|W| + |R|), the W and
R matrix products of every step, all gates and directions (the definition in onnxprune/measure/stats.py).
Elementwise work (bias adds, peephole products, activations, the state update) is not counted.
Torch-Pruning's count adds the biases and its per-step gate arithmetic (``tp_gate_ops`` per hidden
unit and direction).
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
from onnx import numpy_helper

from onnxprune.analysis.contract import (
    AnalysisCtx,
    ConstOf,
    CountGraph,
    Handler,
    Node,
    RewriteCtx,
    Role,
    ShapeOf,
    numel,
    register,
)
from onnxprune.errors import Barrier
from onnxprune.ir.attrs import attr

# activation names of the ONNX spec (every one is elementwise, hence per unit)
ACTIVATIONS = ("Relu", "Tanh", "Sigmoid", "Affine", "LeakyRelu", "ThresholdedRelu", "ScaledTanh",
               "HardSigmoid", "Elu", "Softsign", "Softplus")
DIRECTIONS = ("forward", "reverse", "bidirectional")


def _is_computed_zero(name: str, ctx: AnalysisCtx | RewriteCtx) -> bool:
    """Whether ``name`` is a computed (non-constant) tensor that is provably all zeros: a
    ConstantOfShape of zero, then ops that keep zeros (``keeps_zeros``: data input 0)."""
    if not name or ctx.const(name) is not None:
        return False
    cur = name
    for _ in range(16):
        v = ctx.const(cur)
        if v is not None:
            return bool(np.issubdtype(v.dtype, np.number) and not np.any(v))
        p = ctx.producer(cur)
        if p is None or p.domain not in ("", "ai.onnx"):
            return False
        if p.op_type == "ConstantOfShape":
            for a in p.attribute:
                if a.name == "value":
                    return not np.any(numpy_helper.to_array(a.t))
            return True  # default value: float 0
        if ctx.handler_of(p).keeps_zeros and p.input:
            cur = p.input[0]
            continue
        return False
    return False


class _Recurrent(Handler):
    default_activations: ClassVar[tuple[str, ...]] = ("Tanh",)
    gates: ClassVar[int] = 1
    state_inputs: ClassVar[tuple[int, ...]] = (5,)  # initial_h (, initial_c)
    peephole: ClassVar[int | None] = None  # input index of P
    tp_gate_ops: ClassVar[int] = 1  # Torch-Pruning's elementwise gate arithmetic per step, x hidden size

    # -- analysis ---------------------------------------------------------------------------------
    def _check_attrs(self, node: Node, ctx: AnalysisCtx) -> None:
        layout = int(ctx.attr("layout") or 0)
        if layout != 0:
            raise Barrier(f"layout={layout} (batch-first) is not supported: onnxruntime cannot run it, "
                          f"so the pruned op could not be verified")
        direction = ctx.attr("direction") or "forward"
        if isinstance(direction, bytes):
            direction = direction.decode()
        if direction not in DIRECTIONS:
            raise Barrier(f"unknown direction '{direction}'")
        acts = ctx.attr("activations") or []
        for a in acts:
            a = a.decode() if isinstance(a, bytes) else a
            if a not in ACTIVATIONS:
                raise Barrier(f"activation '{a}' is not an ONNX RNN activation")

    def analyze(self, node: Node, ctx: AnalysisCtx) -> None:
        self._check_attrs(node, ctx)
        ins = list(node.input) + [""] * (8 - len(node.input))
        x, w, r, b = ins[0], ins[1], ins[2], ins[3]
        seq_lens = ins[4]
        xs, ws, rs = ctx.shape(x), ctx.shape(w), ctx.shape(r)
        if xs is None or ws is None or rs is None:
            return  # nothing covered: the coverage rule freezes every axis
        G = self.gates
        hidden = int(rs[2])
        attr_hidden = ctx.attr("hidden_size")
        if attr_hidden is not None and int(attr_hidden) != hidden:
            raise Barrier(f"hidden_size={attr_hidden} does not match R's shape {list(rs)}")
        if len(ws) != 3 or len(rs) != 3 or ws[1] != G * hidden or rs[1] != G * hidden or ws[0] != rs[0]:
            raise Barrier(f"W {list(ws)} / R {list(rs)} do not have {G} gate blocks of hidden_size {hidden}")
        dirs = int(ws[0])
        dir_reason = f"{node.op_type} '{node.name}': direction axis (num_directions is fixed by 'direction')"

        # the hidden unit: anchored on R's column axis
        gh = np.arange(G * hidden)
        ctx.slot(r, 2, Role.CONSUMER)
        ctx.slot(r, 1, Role.PRODUCER)
        ctx.link(r, 1, gh, r, 2, gh % hidden)
        ctx.slot(w, 1, Role.PRODUCER)
        ctx.link(w, 1, gh, r, 2, gh % hidden)
        ctx.freeze(w, 0, dir_reason)
        ctx.freeze(r, 0, dir_reason)
        if b:
            bs = ctx.shape(b)
            if bs is None or len(bs) != 2 or bs[0] != dirs or bs[1] != 2 * G * hidden:
                raise Barrier(f"B has shape {bs}, expected [{dirs}, {2 * G * hidden}]")
            e = np.arange(2 * G * hidden)
            ctx.slot(b, 1, Role.PARAM)
            ctx.link(b, 1, e, r, 2, e % hidden)
            ctx.freeze(b, 0, dir_reason)
        p = ins[self.peephole] if self.peephole is not None else ""
        if p:
            ps = ctx.shape(p)
            if ps is None or len(ps) != 2 or ps[0] != dirs or ps[1] != 3 * hidden:
                raise Barrier(f"P has shape {ps}, expected [{dirs}, {3 * hidden}]")
            e = np.arange(3 * hidden)
            ctx.slot(p, 1, Role.PARAM)
            ctx.link(p, 1, e, r, 2, e % hidden)
            ctx.freeze(p, 0, dir_reason)

        # input features: an ordinary consumer slot
        ctx.slot(w, 2, Role.CONSUMER)
        ctx.identity(x, 2, w, 2)

        # outputs
        outs = list(node.output) + [""] * 3
        y, y_states = outs[0], [t for t in outs[1:3] if t]
        if y:
            ctx.identity(y, 0, x, 0)
            ctx.identity(y, 2, x, 1)
            ctx.identity(y, 3, r, 2)
            ctx.freeze(y, 1, dir_reason)
        for t in y_states:
            ctx.identity(t, 1, x, 1)
            ctx.identity(t, 2, r, 2)
            ctx.freeze(t, 0, dir_reason)

        # initial states
        for idx in self.state_inputs:
            s = ins[idx]
            if not s:
                continue
            if _is_computed_zero(s, ctx):
                ctx.cover(s)  # equal to an omitted state: dropped by the rewrite
                continue
            if ctx.const_source(s) is not None:
                ctx.slot(s, 2, Role.PARAM)
            ctx.identity(s, 2, r, 2)
            ctx.identity(s, 1, x, 1)
            ctx.freeze(s, 0, dir_reason)
        ctx.cover(seq_lens)

    # -- torch forward ----------------------------------------------------------------------------
    def torch_forward(self, node: Node, xs: list, op):
        """Every step of every direction in turn, with the spec's equations (``torch_cell``);
        layout 1 is transposed in and out. Sequence lengths shorter than the input refuse."""
        xs = list(xs) + [None] * (8 - len(xs))
        x, w, r, b, seq_lens = xs[:5]
        layout = int(op.attr("layout", 0) or 0)
        if layout:
            x = x.transpose(0, 1)
        seq, batch = int(x.shape[0]), int(x.shape[1])
        if seq_lens is not None and any(v != seq for v in op.ints(seq_lens, "sequence_lens")):
            op.refuse("sequence_lens shorter than the sequence")
        dirs, hidden = int(w.shape[0]), int(r.shape[2])
        direction = op.attr("direction", "forward")
        states = [xs[i] for i in self.state_inputs]
        if layout:
            states = [None if s is None else s.transpose(0, 1) for s in states]
        acts = _torch_activations(op, self.default_activations, dirs)
        clip = op.attr("clip")
        T = op.torch
        ys, finals = [], []
        for d in range(dirs):
            reverse = direction == "reverse" or (direction == "bidirectional" and d == 1)
            xw = T.matmul(x, w[d].T)  # [seq, batch, G*hidden]
            if b is not None:
                wb, rb = b[d].chunk(2)
                xw = xw + wb
            else:
                rb = None
            state = [s[d] if s is not None else T.zeros(batch, hidden, dtype=x.dtype, device=x.device)
                     for s in states]
            p = xs[self.peephole][d] if self.peephole is not None and xs[self.peephole] is not None else None
            out = [None] * seq
            for t in (range(seq - 1, -1, -1) if reverse else range(seq)):
                state = self.torch_cell(T, xw[t], state, r[d], rb, p, acts[d], clip, op)
                out[t] = state[0]
            ys.append(T.stack(out, 0))
            finals.append(state)
        y = T.stack(ys, 1)  # [seq, dirs, batch, hidden]
        outs = [y] + [T.stack([f[k] for f in finals], 0) for k in range(len(self.state_inputs))]
        if layout:
            outs = [outs[0].permute(2, 0, 1, 3)] + [o.transpose(0, 1) for o in outs[1:]]
        return outs

    def torch_cell(self, T, xw, state, r, rb, p, acts, clip, op):
        """One step: ``xw`` = X_t·Wᵀ + Wb; returns the new state (H, or H and C)."""
        raise NotImplementedError

    # -- rewrite ----------------------------------------------------------------------------------
    def rewrite(self, node: Node, rw: RewriteCtx) -> None:
        r = node.input[2]
        old_h = int(rw.old_shape(r)[2])
        new_h = int(rw.new_shape(r)[2])
        if new_h == old_h:
            return
        rw.set_attr(node, "hidden_size", new_h)
        for idx in self.state_inputs:
            s = node.input[idx] if idx < len(node.input) else ""
            if not s:
                continue
            shape = rw.new_shape(s)
            unsliced = shape is None or len(shape) != 3 or int(shape[2]) != new_h
            if unsliced and _is_computed_zero(s, rw):
                node.input[idx] = ""  # an all-zero state is the omitted state

    # -- cost -------------------------------------------------------------------------------------
    def macs(self, node: Node, shape_of: ShapeOf, const_of: ConstOf) -> int:
        xs, ws, rs = shape_of(node.input[0]), shape_of(node.input[1]), shape_of(node.input[2])
        if xs is None or ws is None or rs is None or len(xs) != 3:
            return 0
        layout = int(attr(node, "layout", 0) or 0)
        seq, batch = (xs[0], xs[1]) if layout == 0 else (xs[1], xs[0])
        return int(seq) * int(batch) * int(np.prod(ws, dtype=np.int64) + np.prod(rs, dtype=np.int64))

    def tp_ops(self, node: Node, shape_of: ShapeOf, const_of: ConstOf, graph: CountGraph) -> int:
        """Every step: the W and R products, the bias, and ``tp_gate_ops`` per hidden unit and direction."""
        xs = shape_of(node.input[0])
        if xs is None or len(xs) != 3:
            return 0
        seq, batch = (xs[1], xs[0]) if int(attr(node, "layout", 0) or 0) == 1 else (xs[0], xs[1])
        ws = shape_of(node.input[1])
        dirs = int(ws[0]) if ws else 1
        bias = numel(shape_of(node.input[3])) if len(node.input) > 3 and node.input[3] else 0
        hidden = int(attr(node, "hidden_size", 0) or 0)
        return int(seq) * int(batch) * (numel(ws) + numel(shape_of(node.input[2])) + bias
                                        + dirs * self.tp_gate_ops * hidden)


@register
class LSTM(_Recurrent):
    op_types = ("LSTM",)
    gates = 4
    state_inputs = (5, 6)
    peephole = 7
    tp_gate_ops = 10
    default_activations = ("Sigmoid", "Tanh", "Tanh")

    def torch_cell(self, T, xw, state, r, rb, p, acts, clip, op):
        """Gates i, o, f, c; peepholes P = (Pi, Po, Pf); ``input_forget`` couples f = 1 - i."""
        h, c = state
        z = xw + T.matmul(h, r.T) + (rb if rb is not None else 0)
        if clip is not None:
            z = T.clamp(z, -float(clip), float(clip))
        zi, zo, zf, zc = z.chunk(4, dim=-1)
        f, g, hh = acts
        if p is not None:
            pi, po, pf = p.chunk(3)
            zi, zf = zi + pi * c, zf + pf * c
        i = f(zi)
        fg = 1 - i if int(op.attr("input_forget", 0) or 0) else f(zf)
        c_new = fg * c + i * g(zc)
        o = f(zo + po * c_new) if p is not None else f(zo)
        return [o * hh(c_new), c_new]


@register
class GRU(_Recurrent):
    op_types = ("GRU",)
    gates = 3
    state_inputs = (5,)
    tp_gate_ops = 7
    default_activations = ("Sigmoid", "Tanh")

    def torch_cell(self, T, xw, state, r, rb, p, acts, clip, op):
        """Gates z, r, h; ``linear_before_reset`` says where the reset gate applies."""
        (h,) = state
        f, g = acts
        xz, xr, xh = xw.chunk(3, dim=-1)
        rz, rr, rh = r.chunk(3, dim=0)
        bz, br, bh = rb.chunk(3) if rb is not None else (0, 0, 0)
        cl = (lambda v: T.clamp(v, -float(clip), float(clip))) if clip is not None else (lambda v: v)
        zt = f(cl(xz + T.matmul(h, rz.T) + bz))
        rt = f(cl(xr + T.matmul(h, rr.T) + br))
        if int(op.attr("linear_before_reset", 0) or 0):
            ht = g(cl(xh + rt * (T.matmul(h, rh.T) + bh)))
        else:
            ht = g(cl(xh + T.matmul(rt * h, rh.T) + bh))
        return [(1 - zt) * ht + zt * h]


@register
class RNN(_Recurrent):
    op_types = ("RNN",)
    gates = 1
    state_inputs = (5,)
    tp_gate_ops = 1

    def torch_cell(self, T, xw, state, r, rb, p, acts, clip, op):
        (h,) = state
        z = xw + T.matmul(h, r.T) + (rb if rb is not None else 0)
        if clip is not None:
            z = T.clamp(z, -float(clip), float(clip))
        return [acts[0](z)]


# -- torch: the activation functions of the spec ----------------------------------------------------

_NEEDS_ALPHA = {"Affine": 1.0, "LeakyRelu": 0.01, "ThresholdedRelu": 1.0, "ScaledTanh": 1.0, "HardSigmoid": 0.2,
                "Elu": 1.0}
_NEEDS_BETA = {"Affine": 0.0, "ScaledTanh": 1.0, "HardSigmoid": 0.5}


def _activation(T, F, name: str, alpha: float | None, beta: float | None):
    a = _NEEDS_ALPHA.get(name) if alpha is None else alpha
    b = _NEEDS_BETA.get(name) if beta is None else beta
    table = {
        "Relu": T.relu, "Tanh": T.tanh, "Sigmoid": T.sigmoid, "Softsign": lambda v: v / (1 + T.abs(v)),
        "Softplus": F.softplus, "Affine": lambda v: a * v + b, "LeakyRelu": lambda v: F.leaky_relu(v, a),
        "ThresholdedRelu": lambda v: T.where(v > a, v, T.zeros_like(v)), "ScaledTanh": lambda v: a * T.tanh(b * v),
        "HardSigmoid": lambda v: T.clamp(a * v + b, 0, 1), "Elu": lambda v: F.elu(v, a),
    }
    return table[name]


def _torch_activations(op, defaults: tuple[str, ...], dirs: int) -> list[list]:
    """Per direction, the activation functions; ``activation_alpha/beta`` are consumed in order by
    the activations that take them (onnxruntime's reading of the spec)."""
    names = list(op.attr("activations") or [])
    if not names:
        names = list(defaults) * dirs
    elif len(names) == len(defaults) and dirs == 2:
        names = names * 2
    if len(names) != len(defaults) * dirs:
        op.refuse(f"{len(names)} activations for {dirs} direction(s) of {len(defaults)}")
    alphas = list(op.attr("activation_alpha") or [])
    betas = list(op.attr("activation_beta") or [])
    fns = []
    for name in names:
        if name not in ACTIVATIONS:
            op.refuse(f"activation '{name}'")
        alpha = alphas.pop(0) if name in _NEEDS_ALPHA and alphas else None
        beta = betas.pop(0) if name in _NEEDS_BETA and betas else None
        fns.append(_activation(op.torch, op.F, name, alpha, beta))
    k = len(defaults)
    return [fns[d * k:(d + 1) * k] for d in range(dirs)]
