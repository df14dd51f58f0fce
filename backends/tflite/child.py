"""Run native LiteRT / converter work in a child process, so a crash never takes ``deploy`` down.

The LiteRT interpreter can abort the process (SIGABRT on a kernel that cannot prepare) and onnx2tf
calls ``sys.exit`` on some errors (issue 17). Every step that loads a ``.tflite`` or converts runs as
``python -m backends.tflite.worker OP JOB_DIR`` (or the onnx2tf command line) with this module; a
non-zero exit or a signal becomes one :class:`~deployer.errors.ExternalToolError` line (exit 2) that
names the step, the signal or the last error line, and what to do.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from deployer.errors import BackendUnavailableError, ExternalToolError

TIMEOUT_S = 1800
"""Upper bound on one child step (seconds): a conversion of a large model takes minutes, never hours."""


def child_env() -> dict[str, str]:
    """The environment of a child: this interpreter's ``bin/`` first on PATH (onnx2tf shells out to
    ``onnxsim``), the parent's ``sys.path`` as PYTHONPATH (the worktree's packages win), quiet logs."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def last_error_line(text: str) -> str:
    """The most telling line of a child's output: the last line naming an error, else the last line."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith(("I0000", "WARNING:"))]
    for ln in reversed(lines):
        if any(k in ln for k in ("Error", "error", "Exception", "failed", "Failed", "abort", "Abort")):
            return ln[:300]
    return lines[-1][:300] if lines else "no output"


def run_child(argv: Sequence[str], step: str, cwd: Path, fix: str, timeout: float = TIMEOUT_S) -> str:
    """Run ``argv`` in ``cwd``; return its combined output.

    Raises:
        ExternalToolError: non-zero exit, a signal (native crash) or the timeout; one line naming
            ``step``, the cause and ``fix``.
        BackendUnavailableError: the child could not import a dependency (exit 3's error class).
    """
    try:
        p = subprocess.run(list(argv), cwd=cwd, env=child_env(), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise ExternalToolError(f"tflite: {step} did not finish within {timeout:.0f} s; {fix}") from None
    out = (p.stdout or "") + "\n" + (p.stderr or "")
    if p.returncode == 0:
        return out
    if "ModuleNotFoundError" in out:
        raise BackendUnavailableError(f"tflite: {step}: {last_error_line(out)}; "
                                      f"pip install -c constraints.txt '.[tflite]' and then "
                                      f"pip install --no-deps --ignore-requires-python onnx2tf==2.6.9")
    if p.returncode < 0:
        try:
            name = signal.Signals(-p.returncode).name
        except ValueError:
            name = f"signal {-p.returncode}"
        raise ExternalToolError(f"tflite: {step} crashed natively ({name}; {last_error_line(out)}); {fix}")
    raise ExternalToolError(f"tflite: {step} failed (exit {p.returncode}: {last_error_line(out)}); {fix}")


def run_worker(op: str, job: Path, step: str, fix: str) -> str:
    """Run ``backends.tflite.worker OP JOB`` in a child (see :func:`run_child`)."""
    return run_child([sys.executable, "-m", "backends.tflite.worker", op, str(job)], step, job, fix)
