"""``onnxprune groups MODEL``: every group with its members, like Torch-Pruning's group.details()."""

from __future__ import annotations

import json

from onnxprune.api import DependencyGraph
from onnxprune.cli.common import console, parse_shapes
from onnxprune.cli.render import print_coverage
from onnxprune.ir.io import json_default


def add(sub, parents) -> None:
    s = sub.add_parser("groups", parents=parents, help="every group with its members (like group.details())")
    s.add_argument("model")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=run)


def run(args) -> int:
    dg = DependencyGraph(args.model, parse_shapes(args.input_shape))
    groups = dg.groups
    if args.json:
        print(json.dumps({"groups": [g.to_json() for g in groups]}, indent=1, default=json_default))
        return 0
    c = console()
    for g in groups:
        c.print(g.details(), markup=False)
        c.print()
    print_coverage(c, dg.analysis.cg)
    return 0
