"""``onnxprune verify ORIGINAL PRUNED --plan PLAN``: the pruned model against its masked original."""

from __future__ import annotations

from onnxprune.cli.args import ExecutionArgs, ModelInputArgs, ReportArgs, VerifyPlanArgs
from onnxprune.cli.common import console
from onnxprune.cli.render import print_verification
from onnxprune.ir.io import load, write_json
from onnxprune.measure.verify import verify_plan
from onnxprune.pipeline import analyze_model, head_mode_for
from onnxprune.planning.options import PlanOptions
from onnxprune.planning.plan import build_plan
from onnxprune.runtime.inputs import make_inputs

PLAN = VerifyPlanArgs()
INPUTS = ModelInputArgs()
EXECUTION = ExecutionArgs()
REPORT = ReportArgs()
GROUPS = (PLAN, INPUTS, EXECUTION, REPORT)


NAME, HELP = "verify", "verify a pruned model against its original and plan"
POSITIONALS = (("original", {}), ("pruned", {}),)


def run(args) -> int:
    report = REPORT.parse(args, protect=(args.original, args.pruned))
    plan_json = PLAN.parse(args)
    inputs = INPUTS.parse(args)
    ex = EXECUTION.parse(args)
    an = analyze_model(args.original, inputs.shapes, head_mode=head_mode_for(PlanOptions(), plan_json),
                       input_arrays=inputs.arrays)
    plan = build_plan(an, PlanOptions(), plan_json)
    pruned = load(args.pruned)
    feeds = make_inputs(an.model, inputs.shapes, arrays=inputs.arrays)
    v = verify_plan(an, plan, pruned, feeds, ex.ep, ex.tol)
    c = console()
    print_verification(c, v)
    if report:
        write_json(report, {"verification": v.to_json()})
    c.print("PASSED" if v.passed else "FAILED")
    return 0 if v.passed else 1
