"""The Python API takes what a pipeline script has at hand (issue 21)."""

from __future__ import annotations

from pathlib import Path

import pytest

from models import write_samples


@pytest.mark.parametrize("as_path", [False, True])
def test_api_takes_a_torch_module_with_a_calibration_folder(tmp_path: Path, as_path: bool) -> None:
    """Regression (issue 21): deploy(module, "calib/") iterated the letters of the path."""
    import torch

    import deployer

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)).eval()
    calib = write_samples(tmp_path / "calib", {"input": (1, 6)}, 12)
    res = deployer.deploy(net, calib if as_path else str(calib), targets="onnxruntime", out_dir=tmp_path / "out")
    assert res.targets["onnxruntime"].fidelity["samples"] >= 1
