"""Exceptions with the exit codes the CLI maps them to, and ``Barrier`` (a handler's reason).

The bottom floor: every other module may raise these; this module imports nothing of onnxprune.
"""

from __future__ import annotations


class OnnxPruneError(Exception):
    """Base class; ``exit_code`` is what the CLI returns."""

    exit_code = 1


class UserError(OnnxPruneError):
    """Bad input from the user: a one-line message, exit code 2, nothing written."""

    exit_code = 2


class NothingToPrune(OnnxPruneError):
    """Every group is frozen; the message lists the barriers. Exit code 3."""

    exit_code = 3


class RewriteError(OnnxPruneError):
    """The rewrite produced shapes the plan did not predict: refused, nothing written. Exit code 4."""

    exit_code = 4


class Barrier(Exception):  # noqa: N818 - a barrier is not an error: the analysis records it and goes on
    """Raised by a handler that cannot follow a node: every tensor the node touches is frozen with
    the message as the reason. It never escapes the analysis."""
