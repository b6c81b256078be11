"""Command line: inspect, groups, prune, verify, bench, sweep, demo (one module per command).

A command module declares ``NAME``, ``HELP``, its ``POSITIONALS``, the argument groups it takes
(``GROUPS``, from ``cli/args.py``) and ``run(args)``; the parser is built from them here. User errors are one line on stderr with exit code 2 and no output file; verification
failure exits 1; nothing to prune exits 3; a refused rewrite exits 4. The last line of
prune/verify/demo says PASSED or FAILED. Exceptions are mapped to exit codes here, in one place.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
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
    previous = _on_sigterm(_raise_terminated)
    try:
        return args.fn(args)
    except OnnxPruneError as exc:
        sys.stderr.write(f"onnxprune: error: {exc}\n")
        return exc.exit_code
    except KeyboardInterrupt:
        sys.stderr.write("onnxprune: interrupted\n")
        return 130
    except Terminated:
        sys.stderr.write("onnxprune: terminated\n")
        return 128 + signal.SIGTERM
    finally:
        _on_sigterm(previous)


class Terminated(BaseException):  # noqa: N818 - a signal, not an error: ``except Exception`` never eats it
    """SIGTERM, raised in the main thread so that the cleanup of the save paths (``except
    BaseException``: temporary files removed) runs as for Ctrl-C; ``main`` returns 143."""


def _raise_terminated(signum, frame):
    raise Terminated


def _on_sigterm(handler):
    """Install ``handler`` for SIGTERM; returns the previous one (None off the main thread, where
    signals cannot be handled, and where ``handler`` is None)."""
    if handler is None or threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, handler)


if __name__ == "__main__":
    sys.exit(main())
