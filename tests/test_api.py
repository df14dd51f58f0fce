"""The Python API for release pipelines: typed results, one error root, and the README's pipeline example
(executed here, as CI runs it)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import deployer
from deployer.errors import BackendUnavailableError, BadInputError, DeployerError, GateFailedError, PlanError
from deployer.pipeline import DeployResult, TargetResult

ROOT = Path(__file__).resolve().parents[1]


def readme_block(marker: str) -> str:
    text = (ROOT / "README.md").read_text()
    m = re.search(rf"<!-- {re.escape(marker)} -->\s*```python\n(.*?)```", text, re.S)
    assert m, f"README has no python block after <!-- {marker} -->"
    return m.group(1)


def test_errors_share_one_root() -> None:
    for e in (BadInputError, BackendUnavailableError, GateFailedError, PlanError):
        assert issubclass(e, DeployerError)
    assert deployer.DeployerError is DeployerError
    with pytest.raises(DeployerError) as info:
        deployer.deploy("no/such/model.onnx", "calib/", targets="tensorrt", out_dir="unused")
    assert info.value.exit_code == 2


def test_package_is_typed() -> None:
    assert (ROOT / "deployer" / "py.typed").is_file()
    import typing

    hints = typing.get_type_hints(deployer.deploy, localns={"DeployResult": DeployResult})
    assert hints["return"] is DeployResult
    assert typing.get_type_hints(DeployResult)["targets"] == dict[str, TargetResult]


def test_readme_release_pipeline_example_runs(tmp_path: Path) -> None:
    """Runs the README's release-pipeline block in a fresh interpreter, in a folder holding model.onnx and
    calib/ (built by the tiny-model helper), exactly as a release job would."""
    sys.path.insert(0, str(Path(__file__).parent))
    from test_report import write_inputs

    write_inputs(tmp_path)
    code = readme_block("release-pipeline example")
    (tmp_path / "release.py").write_text(code)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "release.py"], cwd=tmp_path, capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert (tmp_path / "release" / "report.html").is_file()
    assert "release ok" in proc.stdout


def test_plan_for_another_model_is_lowered_with_a_warning(tmp_path: Path) -> None:
    """``--plan`` from a model with the same graph but other weights: accepted (nodes match), and the
    report says the plan's sha256 does not match this model."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    from tests.test_int4 import _mlp, _samples

    a = tmp_path / "a.onnx"
    onnx.save(_mlp(), a)
    first = deployer.deploy(str(a), _samples(), targets="onnxruntime", out_dir=tmp_path / "o1", no_cache=True)
    assert "warnings" not in first.report
    other = _mlp()
    w = other.graph.initializer[0]
    w.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w) * np.float32(1.5), w.name))
    b = tmp_path / "b.onnx"
    onnx.save(other, b)
    second = deployer.deploy(str(b), _samples(), targets="onnxruntime", out_dir=tmp_path / "o2", no_cache=True,
                             plan=first.plan_path)
    assert any("another model" in w for w in second.report["warnings"])
