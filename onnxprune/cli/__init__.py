"""Command line: inspect, groups, prune, verify, bench, sweep, demo (one module per command).

User errors are one line on stderr with exit code 2 and no output file; verification failure exits
1; nothing to prune exits 3; a refused rewrite exits 4. The last line of prune/verify/demo says
PASSED or FAILED. Exceptions are mapped to exit codes here, in one place.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings

from onnxprune.cli import cmd_bench, cmd_demo, cmd_groups, cmd_inspect, cmd_prune, cmd_sweep, cmd_verify
from onnxprune.cli.common import Parser, ep_args, model_args, plan_args
from onnxprune.errors import OnnxPruneError


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="onnxprune", description="Structural pruning of ONNX models, verified with onnxruntime.")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=Parser)
    m, e, pl = model_args(), ep_args(), plan_args()
    cmd_inspect.add(sub, [m])
    cmd_groups.add(sub, [m])
    cmd_prune.add(sub, [m, e, pl])
    cmd_verify.add(sub, [m, e])
    cmd_bench.add(sub, [m])
    cmd_sweep.add(sub, [m])
    cmd_demo.add(sub, [])
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    warnings.filterwarnings("ignore")
    try:
        return args.fn(args)
    except OnnxPruneError as exc:
        sys.stderr.write(f"onnxprune: error: {exc}\n")
        return exc.exit_code
    except KeyboardInterrupt:
        sys.stderr.write("onnxprune: interrupted\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
