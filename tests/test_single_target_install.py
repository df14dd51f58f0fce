"""A single-target environment built as the README says (``python -m venv``; torch first from
constraints.txt; ``.[tflite]``; onnx2tf with --no-deps) lists exactly what is there (``deploy targets``)
and deploys a tiny model to ``tflite``; the default example without the examples extra is exit 3 with
the install command (was: exit 1, ``No module named 'skimage'``).

pip's cache is reused (no --no-cache-dir), so a second run installs from cached wheels.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from tests.test_int4 import _mlp, _samples

ROOT = Path(__file__).resolve().parents[1]
PY311 = shutil.which("python3.11") or (sys.executable if sys.version_info[:2] == (3, 11) else None)


PIP_STEPS = [["-c", "constraints.txt", "torch==2.13.0"], ["-c", "constraints.txt", ".[tflite]"],
             ["--no-deps", "--ignore-requires-python", "onnx2tf==2.6.9"]]
"""The README's tflite-only install (torch first, the CPU wheel), also docker/tflite's pip step."""


def _run(cmd: list[str], cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(COLUMNS="80", OMP_NUM_THREADS="1")
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_tflite_only_environment(tmp_path: Path) -> None:
    assert PY311 is not None, "python3.11 is needed to build the single-target environment"
    venv = tmp_path / "venv"
    assert _run([PY311, "-m", "venv", str(venv)], tmp_path).returncode == 0
    py = str(venv / "bin" / "python")
    pip = [py, "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    for step in PIP_STEPS:
        p = _run([*pip, *step], ROOT)
        assert p.returncode == 0, f"pip install {' '.join(step)}: {p.stderr[-2000:]}"
    deploy = str(venv / "bin" / "deploy")
    p = _run([deploy, "targets", "--json"], tmp_path)
    assert p.returncode == 0, p.stderr
    rows = {r["target"]: r for r in json.loads(p.stdout)}
    assert rows["tflite"]["available"] is True
    assert rows["onnxruntime"]["available"] is True  # the core's runtime serves it
    assert set(rows) == {"tflite", "tensorrt", "ascend", "onnxruntime"}
    assert all(r["available"] or r["reason"] for r in rows.values())  # unavailable ones say why
    p = _run([deploy, "targets"], tmp_path)
    last = p.stdout.strip().splitlines()
    examples = " ".join(line.strip() for line in last[next(i for i, x in enumerate(last) if x.startswith("examples:")):])
    assert "examples: none can run here" in examples and "efficientnet-lite0 (needs" in examples
    assert "skimage" in examples and "'.[examples]'" in examples
    # the default example needs the examples extra: exit 3 and the command, no traceback
    p = _run([deploy, "--target", "tflite", "--out", str(tmp_path / "ex")], tmp_path)
    assert p.returncode == 3, p.stderr
    assert "'.[examples]'" in p.stderr and "Traceback" not in p.stderr
    # a tiny model deploys to tflite
    onnx.save(_mlp(), tmp_path / "m.onnx")
    (tmp_path / "calib").mkdir()
    for i, s in enumerate(_samples(24)):
        np.save(tmp_path / "calib" / f"{i}.npy", s["x"])
    p = _run([deploy, "--model", "m.onnx", "--calib", "calib", "--target", "tflite", "--out", "out"], tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["targets"]["tflite"]["verdict"]["ships"] is True
    assert all(len(line) <= 80 for line in (p.stdout + p.stderr).splitlines())


def test_missing_example_module_is_exit_3_with_the_command(monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """Checked before any model work (no output is written)."""
    import deployer.examples as ex
    from deployer.cli import main

    monkeypatch.setitem(ex.EXAMPLE_MODULES, "mnist", ("torch", "no_such_module_for_this_test"))
    monkeypatch.setenv("COLUMNS", "400")  # one line per row, to match whole phrases
    assert main(["--model", "mnist", "--target", "onnxruntime", "--out", "never-written"]) == 3
    err = capsys.readouterr().err
    assert "no_such_module_for_this_test" in err and "'.[examples]'" in err
    assert not Path("never-written").exists()
    assert main(["targets"]) == 0
    out = capsys.readouterr().out
    assert "mnist (needs no_such_module_for_this_test)" in out and "efficientnet-lite0" in out
