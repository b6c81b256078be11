"""Exceptions with the exit codes the CLI maps them to."""

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


class VerificationFailed(OnnxPruneError):
    """The pruned model does not equal the masked original. Exit code 1."""

    exit_code = 1


class RewriteError(OnnxPruneError):
    """The rewrite produced shapes the plan did not predict: refused, nothing written. Exit code 4."""

    exit_code = 4
