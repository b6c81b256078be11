"""``onnxprune demo``: build a torchvision model, prune it, verify it, benchmark it, print the table."""

from __future__ import annotations

import tempfile
from pathlib import Path

from onnxprune import pipeline
from onnxprune.cli.args import DemoArgs, ExecutionArgs, OutputArgs, PlanArgs
from onnxprune.cli.common import console
from onnxprune.cli.render import print_coverage, print_round_to, print_stats_table, print_verification
from onnxprune.errors import UserError
from onnxprune.ir.io import save_atomic
from onnxprune.measure.latency import measure
from onnxprune.runtime.inputs import make_inputs

DEMO = DemoArgs()
PLAN = PlanArgs()
EXECUTION = ExecutionArgs()
OUTPUT = OutputArgs(required=False)
GROUPS = (DEMO, PLAN, EXECUTION, OUTPUT)


NAME, HELP = "demo", "build ResNet-18, prune 50%%, verify, benchmark, print the table"
POSITIONALS = ()


def run(args) -> int:
    arch, ex = DEMO.parse(args), EXECUTION.parse(args)
    req = PLAN.parse(args, ep=ex.ep)
    opts = req.options
    output = OUTPUT.parse(args)
    try:
        from onnxprune.models import zoo  # the zoo extra: torch and torchvision
    except ImportError as exc:
        raise UserError(f"the demo needs torch and torchvision: pip install 'onnxprune[zoo]' ({exc})") from None
    c = console()
    print_round_to(c, req)
    with c.status(f"building and exporting torchvision {arch} (random weights, calibrated BatchNorm)..."):
        path = zoo.export(arch, "legacy")
    c.print(f"model: {path}")
    with c.status(f"pruning {opts.ratio:.0%} of every group and verifying..."):
        res = pipeline.run(str(path), opts, verify=True, ep=ex.ep, tol=ex.tol)
    out = Path(output) if output else Path(tempfile.gettempdir()) / f"{arch}_pruned.onnx"
    feeds = make_inputs(res.analysis.model)
    with c.status("benchmarking (interleaved runs)..."):
        lat = measure([res.analysis.model, res.pruned], feeds, ex.ep, warmup=3, repeat=20)
    print_stats_table(c, res.before, res.after, latency=lat, title=f"onnxprune demo: {arch}, ratio {opts.ratio}")
    print_coverage(c, res.analysis.cg)
    print_verification(c, res.verification)
    if not res.verification.passed:
        c.print("FAILED")
        return 1
    save_atomic(res.pruned, out)
    c.print(f"wrote {out}")
    c.print("PASSED")
    return 0
