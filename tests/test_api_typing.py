"""mypy on a user's release-pipeline script outside the package sees deployer's types under the README's
install (``scripts/install.sh``: editable, compat mode), catches a mistyped built-in target and a
wrongly typed fidelity / verdict field.

Run with the venv's interpreter and without PYTHONPATH, from a temporary folder, as a user would.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

GOOD = '''
from pathlib import Path

import deployer
from deployer.errors import GateFailedError


def release(model: Path) -> bool:
    try:
        result = deployer.deploy(str(model), "calib/", targets=["tflite", "tensorrt"], out_dir="out",
                                 gates={"cosine_mean": 0.99, "speed-per-fidelity": 2.0})
    except GateFailedError:
        return False
    t = result.targets["tflite"]
    cos: float = t.fidelity["cosine_mean"]
    sq: float | None = t.fidelity["outputs"]["logits"]["sqnr_db"]
    ok: bool = t.verdict["ships"]
    status: str = t.gates["cosine_mean"]["status"]
    return ok and cos > 0.99 and status == "pass" and sq is not None
'''

BAD = '''
import deployer

result = deployer.deploy("m.onnx", "calib/", targets=["tflte"])
name: str = result.targets["tflite"].fidelity["cosine_mean"]
ships: str = result.targets["tflite"].verdict["ships"]
'''


def _mypy(tmp_path: Path, name: str, text: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / name).write_text(text, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MYPYPATH")}
    return subprocess.run([sys.executable, "-m", "mypy", "--cache-dir", str(tmp_path / ".mypy_cache"), name],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)


def test_mypy_sees_the_types_from_a_script_outside_the_package(tmp_path: Path) -> None:
    good = _mypy(tmp_path, "pipeline.py", GOOD)
    assert "import-not-found" not in good.stdout, (
        "mypy cannot see the installed package: install it with scripts/install.sh (pip install -e . "
        "--config-settings editable_mode=compat)\n" + good.stdout)
    assert good.returncode == 0, good.stdout
    bad = _mypy(tmp_path, "bad.py", BAD)
    assert bad.returncode == 1, bad.stdout
    assert 'bad.py:4: error: List item 0 has incompatible type "Literal[\'tflte\']"' in bad.stdout
    assert 'bad.py:5: error: Incompatible types in assignment (expression has type "float"' in bad.stdout
    assert 'bad.py:6: error: Incompatible types in assignment (expression has type "bool"' in bad.stdout
