"""``onnxprune demo``: build a torchvision model, prune it, verify it, benchmark it, print the table."""

from __future__ import annotations

import tempfile
from pathlib import Path

from onnxprune import pipeline
from onnxprune.cli.common import console
from onnxprune.cli.render import print_coverage, print_stats_table, print_verification
from onnxprune.errors import UserError
from onnxprune.ir.io import save_atomic
from onnxprune.measure.latency import measure
from onnxprune.planning.options import PlanOptions
from onnxprune.runtime.inputs import make_inputs


def add(sub, parents) -> None:
    s = sub.add_parser("demo", help="build ResNet-18, prune 50%%, verify, benchmark, print the table")
    s.add_argument("--arch", default="resnet18")
    s.add_argument("--ratio", type=float, default=0.5)
    s.add_argument("--ep", default="auto", choices=["auto", "cpu", "cuda"])
    s.add_argument("-o", "--output")
    s.set_defaults(fn=run)


def run(args) -> int:
    try:
        from onnxprune.models import zoo  # the zoo extra: torch and torchvision
    except ImportError as exc:
        raise UserError(f"the demo needs torch and torchvision: pip install 'onnxprune[zoo]' ({exc})") from None
    c = console()
    with c.status(f"building and exporting torchvision {args.arch} (random weights, calibrated BatchNorm)..."):
        path = zoo.export(args.arch, "legacy")
    c.print(f"model: {path}")
    with c.status(f"pruning {args.ratio:.0%} of every group and verifying..."):
        res = pipeline.run(str(path), PlanOptions(ratio=args.ratio), verify=True, ep=args.ep)
    out = Path(args.output) if args.output else Path(tempfile.gettempdir()) / f"{args.arch}_pruned.onnx"
    feeds = make_inputs(res.analysis.model)
    with c.status("benchmarking (interleaved runs)..."):
        lat = measure([res.analysis.model, res.pruned], feeds, args.ep, warmup=3, repeat=20)
    print_stats_table(c, res.before, res.after, latency=lat, title=f"onnxprune demo: {args.arch}, ratio {args.ratio}")
    print_coverage(c, res.analysis.cg)
    print_verification(c, res.verification)
    if not res.verification.passed:
        c.print("FAILED")
        return 1
    save_atomic(res.pruned, out)
    c.print(f"wrote {out}")
    c.print("PASSED")
    return 0
