"""``onnxprune groups MODEL``: every group with its members, like Torch-Pruning's group.details()."""

from __future__ import annotations

import json

from onnxprune.api import DependencyGraph
from onnxprune.cli.args import JsonArgs, ModelInputArgs
from onnxprune.cli.common import console
from onnxprune.cli.render import print_coverage
from onnxprune.ir.io import json_default

INPUTS = ModelInputArgs(values=False)
JSON = JsonArgs()
GROUPS = (INPUTS, JSON)


NAME, HELP = "groups", "every group with its members (like group.details())"
POSITIONALS = (("model", {}),)


def run(args) -> int:
    dg = DependencyGraph(args.model, INPUTS.parse(args).shapes)
    groups = dg.groups
    if JSON.parse(args):
        print(json.dumps({"groups": [g.to_json() for g in groups]}, indent=1, default=json_default))
        return 0
    c = console()
    for g in groups:
        c.print(g.details(), markup=False)
        c.print()
    print_coverage(c, dg.analysis.cg)
    return 0
