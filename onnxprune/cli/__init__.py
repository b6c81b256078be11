"""Command line: inspect, groups, prune, verify, bench, sweep, demo (one module per command).

A command module declares ``NAME``, ``HELP``, its ``POSITIONALS``, the argument groups it takes
(``GROUPS``, from ``cli/args.py``) and ``run(args)``; the parser is built from them here. User errors are one line on stderr with exit code 2 and no output file; verification
failure exits 1; nothing to prune exits 3; a refused rewrite exits 4. The last line of
prune/verify/demo says PASSED or FAILED. Exceptions are mapped to exit codes here, in one place.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings

from onnxprune.cli import cmd_bench, cmd_demo, cmd_groups, cmd_inspect, cmd_prune, cmd_sweep, cmd_verify
from onnxprune.cli.args import VerbosityArgs, install
from onnxprune.cli.common import Parser
from onnxprune.errors import OnnxPruneError

COMMANDS = (cmd_inspect, cmd_groups, cmd_prune, cmd_verify, cmd_bench, cmd_sweep, cmd_demo)
VERBOSITY = VerbosityArgs()


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="onnxprune", description="Structural pruning of ONNX models, verified with onnxruntime.")
    VERBOSITY.install(p)
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=Parser)
    for cmd in COMMANDS:
        s = sub.add_parser(cmd.NAME, help=cmd.HELP)
        for name, kwargs in cmd.POSITIONALS:
            s.add_argument(name, **kwargs)
        install(s, cmd.GROUPS)
        s.set_defaults(fn=cmd.run)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if VERBOSITY.parse(args) else logging.WARNING,
                        format="%(name)s: %(message)s")
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
