"""``onnxprune inspect MODEL``: ops, parameters, MACs, coverage, unknown ops."""

from __future__ import annotations

import json

from onnxprune.cli.common import console, parse_shapes
from onnxprune.cli.render import print_coverage
from onnxprune.ir.io import json_default
from onnxprune.measure.stats import human, model_stats
from onnxprune.pipeline import analyze_model


def add(sub, parents) -> None:
    s = sub.add_parser("inspect", parents=parents, help="summary: ops, parameters, MACs, coverage")
    s.add_argument("model")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=run)


def run(args) -> int:
    an = analyze_model(args.model, parse_shapes(args.input_shape))
    st = model_stats(an.model, an.shapes, registry=an.registry)
    report = {"model": args.model, "opset": an.cg.opset, "stats": st.to_json(),
              "groups": len(an.cg.groups), "prunable_groups": sum(g.prunable for g in an.cg.groups),
              "coverage": dict(zip(("prunable_channels", "channels"), an.cg.coverage(), strict=True)),
              "unknown_ops": {k: len(v) for k, v in an.cg.unknown_ops.items()}}
    if args.json:
        print(json.dumps(report, indent=1, default=json_default))
        return 0
    c = console()
    c.print(f"{args.model}: opset {an.cg.opset}, {st.nodes} nodes, {human(st.params)} parameters, "
            f"{human(st.macs)} MACs, {human(st.size_bytes, 'B')}")
    c.print("ops: " + ", ".join(f"{k} {v}" for k, v in st.ops.most_common()))
    print_coverage(c, an.cg)
    return 0
