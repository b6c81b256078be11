"""``onnxprune verify ORIGINAL PRUNED --plan PLAN``: the pruned model against its masked original."""

from __future__ import annotations

from onnxprune.cli.common import check_writable, console, load_plan_file, parse_arrays, parse_shapes
from onnxprune.cli.render import print_verification
from onnxprune.ir.io import load, write_json
from onnxprune.measure.verify import verify_plan
from onnxprune.pipeline import analyze_model, head_mode_for
from onnxprune.planning.options import PlanOptions
from onnxprune.planning.plan import build_plan
from onnxprune.runtime.inputs import make_inputs


def add(sub, parents) -> None:
    s = sub.add_parser("verify", parents=parents, help="verify a pruned model against its original and plan")
    s.add_argument("original")
    s.add_argument("pruned")
    s.add_argument("--plan", required=True)
    s.add_argument("--report", metavar="FILE.json")
    s.set_defaults(fn=run)


def run(args) -> int:
    check_writable(args.report, "--report", (args.original, args.pruned))
    plan_json = load_plan_file(args.plan)
    shapes = parse_shapes(args.input_shape)
    an = analyze_model(args.original, shapes, head_mode=head_mode_for(PlanOptions(), plan_json))
    plan = build_plan(an, PlanOptions(), plan_json)
    pruned = load(args.pruned)
    feeds = make_inputs(an.model, shapes, arrays=parse_arrays(args.input))
    v = verify_plan(an, plan, pruned, feeds, args.ep, args.tol)
    c = console()
    print_verification(c, v)
    if args.report:
        write_json(args.report, {"verification": v.to_json()})
    c.print("PASSED" if v.passed else "FAILED")
    return 0 if v.passed else 1
