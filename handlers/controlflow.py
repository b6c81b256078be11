"""Control flow: If.

The analysis follows channels into both branches (``follows_subgraphs``; ``analysis.subgraphs`` says
when): every node of a branch is analysed like a node of the main graph, and what a branch reads from
outside is an ordinary tensor. Here the op itself only links output k of each branch to its output k,
axis by axis: whichever branch runs, the channels of an output are the same index set, so a channel
removed in one branch is removed in the other. Branches that disagree (a rank or a static size that
differs between them, a Squeeze in one branch and an Identity in the other) freeze the output with
that reason. Weights inside a branch are slots of the ops that read them, sliced where they live.

Loop and Scan have no handler: their bodies carry values across iterations (loop-carried state, scan
slices), which this analysis does not model, so they are barriers (every tensor they touch or their
bodies read is frozen, listed as an unknown op).
"""

from __future__ import annotations

from onnxprune.analysis.contract import AnalysisCtx, Handler, Node, register


def branches(node: Node) -> list[tuple[str, object]]:
    """(attribute name, graph) of an If's branches, in attribute order."""
    return [(a.name, a.g) for a in node.attribute if a.name in ("then_branch", "else_branch")]


def _dims(shape: tuple[int, ...] | None) -> str:
    return "unknown" if shape is None else "[" + ", ".join(map(str, shape)) + "]"


@register
class If(Handler):
    op_types = ("If",)
    since = 1
    follows_subgraphs = True

    def torch_forward(self, node: Node, xs: list, op):
        """The branch the condition picks, run in a scope that sees this graph's tensors."""
        return op.run_subgraph("then_branch" if op.ints(xs[0], "condition")[0] else "else_branch")

    def analyze(self, node: Node, ctx: AnalysisCtx) -> None:
        ctx.cover(node.input[0])  # the condition: a scalar
        where = f"If '{node.name}'"
        bs = branches(node)
        for k, out in enumerate(node.output):
            if not out:
                continue
            names = [(attr, g.output[k].name) for attr, g in bs if k < len(g.output)]
            shapes = [ctx.shape(t) for _, t in names]
            so = ctx.shape(out)
            if len(names) != len(bs) or so is None or any(s is None for s in shapes):
                reason = f"{where}: the shape of output {k} in a branch is unknown"
            elif any(len(s) != len(so) or s != shapes[0] for s in shapes):
                told = ", ".join(f"{_dims(s)} in {attr}" for (attr, _), s in zip(names, shapes, strict=True))
                reason = f"{where}: branches disagree on output {k} ({told})"
            else:
                reason = ""
            if reason:
                ctx.freeze(out, None, reason)
                for _, t in names:
                    ctx.freeze(t, None, reason)
                continue
            for _, t in names:
                for ax in range(len(so)):
                    ctx.identity(t, ax, out, ax)
