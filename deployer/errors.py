"""One error root for everything a user can cause; each message says what was wrong and what to do.

Exit codes (CLI): :class:`BadInputError` 2, :class:`BackendUnavailableError` 3, :class:`GateFailedError` 1.
Internal bugs are not :class:`DeployerError`: the CLI reports any other exception as an internal error,
exit 4, in one line saying where to report it (the traceback with ``--verbose``).
"""

from __future__ import annotations


class DeployerError(Exception):
    """Root of every user-facing error. ``exit_code`` is what the CLI returns."""

    exit_code = 2


class BadInputError(DeployerError):
    """A model, calibration set, plan, option or output path the user gave is unusable."""

    exit_code = 2


class UnsupportedModelError(BadInputError):
    """The model uses something a backend or pass cannot handle (op, attribute, dynamic weight)."""


class PlanError(BadInputError):
    """A quantization plan failed validation (schema version, keys, ranges, nodes)."""


class BackendUnavailableError(DeployerError):
    """A requested backend cannot run at all here (its extra or vendor tool is missing)."""

    exit_code = 3


class GateFailedError(DeployerError):
    """An enforced release gate failed. ``result`` holds the written deployment."""

    exit_code = 1

    def __init__(self, message: str, result: object = None) -> None:
        super().__init__(message)
        self.result = result


class ExternalToolError(DeployerError):
    """An external command (atc, trtexec, a converter) failed; the message carries its output tail."""

    exit_code = 2
