"""What ``deploy`` prints: lines fitted to the terminal, third-party noise kept off it.

- :func:`width`: ``COLUMNS`` when set, else the terminal's width, else 80 (not a terminal).
- :func:`fit`: a message wrapped to :func:`width` (continuation lines indented two spaces).
- :func:`quiet_libraries`: log levels of TensorFlow / absl / LiteRT set *before* they are imported
  (environment variables read at import, and their Python loggers).
- :func:`captured_stderr`: file descriptor 2 goes to a log file for the run (what C++ libraries print:
  TensorFlow's oneDNN and absl banners, the TFLite converter's ``fully_quantize`` line, XNNPACK's INFO
  line; Python warnings too), while ``sys.stderr`` keeps writing to the terminal. ``deploy`` copies the
  captured text to ``<out>/log.txt``.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import sys
import tempfile
import textwrap
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

_CAPTURE: list[Path] = []


def width() -> int:
    """Columns available: ``COLUMNS`` if set, else the terminal's, else 80."""
    env = os.environ.get("COLUMNS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    if sys.stderr.isatty() or sys.stdout.isatty():
        return shutil.get_terminal_size((80, 24)).columns
    return 80


def fit(msg: str, columns: int | None = None) -> str:
    """``msg`` with every line wrapped to ``columns`` (default :func:`width`); no word is cut unless it
    alone is longer than a line."""
    cols = max(20, columns or width())
    out: list[str] = []
    for line in msg.splitlines() or [""]:
        out.extend(textwrap.wrap(line, cols, subsequent_indent="  ", break_on_hyphens=False) or [""])
    return "\n".join(out)


def quiet_libraries() -> None:
    """Lower third-party log levels before those libraries are imported (idempotent; a user's own
    setting of these variables wins)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # TensorFlow / LiteRT C++ INFO and WARNING
    os.environ.setdefault("GLOG_minloglevel", "2")
    os.environ.setdefault("AUTOGRAPH_VERBOSITY", "0")
    for name in ("tensorflow", "absl", "onnx2tf", "tf_keras", "h5py"):
        logging.getLogger(name).setLevel(logging.ERROR)


def captured_log() -> str:
    """What the innermost active :func:`captured_stderr` has captured so far ('' outside one)."""
    if not _CAPTURE:
        return ""
    if sys.stderr is not None:
        sys.stderr.flush()
    try:
        return _CAPTURE[-1].read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


@contextlib.contextmanager
def captured_stderr() -> Iterator[None]:
    """Send file descriptor 2 (C/C++ output, child processes) and Python warnings to a log file, and
    ``sys.stderr`` to the terminal. A no-op where ``sys.stderr`` is not the process's own (a test's
    capture): there is then no terminal to protect."""
    err: TextIO | None = sys.stderr
    if err is None or err is not sys.__stderr__:
        yield
        return
    quiet_libraries()
    if err is not None:  # (narrowed above; mypy takes __stderr__'s Optional type)
        err.flush()
    fd, name = tempfile.mkstemp(prefix="deploy-", suffix=".log")
    saved = os.dup(2)
    term = io.TextIOWrapper(os.fdopen(os.dup(saved), "wb", buffering=0), encoding="utf-8", errors="replace",
                            line_buffering=True, write_through=True)
    old_stderr, old_show = sys.stderr, warnings.showwarning
    log_file = os.fdopen(os.dup(fd), "a", encoding="utf-8", buffering=1)

    def to_log(message, category, filename, lineno, file=None, line=None):  # type: ignore[no-untyped-def]
        log_file.write(warnings.formatwarning(message, category, filename, lineno, line))

    _CAPTURE.append(Path(name))
    try:
        os.dup2(fd, 2)
        sys.stderr = term
        warnings.showwarning = to_log
        yield
    finally:
        warnings.showwarning = old_show
        sys.stderr = old_stderr
        term.flush()
        os.dup2(saved, 2)
        for f in (saved, fd):
            os.close(f)
        log_file.close()
        term.close()
        _CAPTURE.pop()
        with contextlib.suppress(OSError):
            os.unlink(name)
