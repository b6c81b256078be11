"""``onnxprune inspect MODEL``: ops, parameters, MACs, coverage, unknown ops."""

from __future__ import annotations

import json

from onnxprune.cli.args import JsonArgs, ModelInputArgs
from onnxprune.cli.common import console
from onnxprune.cli.render import print_coverage
from onnxprune.ir.io import json_default
from onnxprune.measure.stats import human, model_stats
from onnxprune.pipeline import analyze_model

INPUTS = ModelInputArgs(values=False)
JSON = JsonArgs()
GROUPS = (INPUTS, JSON)


NAME, HELP = "inspect", "summary: ops, parameters, MACs, coverage"
POSITIONALS = (("model", {}),)


def run(args) -> int:
    inputs = INPUTS.parse(args)
    an = analyze_model(args.model, inputs.shapes, input_arrays=inputs.arrays)
    st = model_stats(an.model, an.shapes, registry=an.registry)
    report = {"model": args.model, "opset": an.cg.opset, "stats": st.to_json(),
              "groups": len(an.cg.groups), "prunable_groups": sum(g.prunable for g in an.cg.groups),
              "coverage": dict(zip(("prunable_channels", "channels"), an.cg.coverage(), strict=True)),
              "unknown_ops": {k: len(v) for k, v in an.cg.unknown_ops.items()}}
    if JSON.parse(args):
        print(json.dumps(report, indent=1, default=json_default))
        return 0
    c = console()
    c.print(f"{args.model}: opset {an.cg.opset}, {st.nodes} nodes, {human(st.params)} parameters, "
            f"{human(st.macs)} MACs, {human(st.size_bytes, 'B')}")
    c.print("ops: " + ", ".join(f"{k} {v}" for k, v in st.ops.most_common()))
    print_coverage(c, an.cg)
    return 0
