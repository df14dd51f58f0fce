"""What ``deploy`` prints fits COLUMNS and carries no third-party banners (they go to ``<out>/log.txt``)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx

from deployer.terminal import fit
from tests.test_int4 import _mlp, _samples

NOISE = re.compile(r"absl|oneDNN|TensorFlow|tensorflow|XNNPACK|AutoGraph|fully_quantize|I0000|RuntimeWarning")


def test_fit_wraps_every_line() -> None:
    msg = "warning: " + " ".join(["word"] * 40) + "\nshort\n" + "x" * 100
    out = fit(msg, 80).splitlines()
    assert all(len(line) <= 80 for line in out)
    assert out[0].startswith("warning: word") and out[1].startswith("  word") and "short" in out
    assert fit("a b", 80) == "a b"


def test_deploy_output_fits_80_columns_without_banners(tmp_path: Path) -> None:
    onnx.save(_mlp(), tmp_path / "m.onnx")
    (tmp_path / "calib").mkdir()
    for i, s in enumerate(_samples(24)):
        np.savez(tmp_path / "calib" / f"{i}.npz", **s)
    env = {**os.environ, "COLUMNS": "80", "OMP_NUM_THREADS": "1"}
    for k in ("TF_CPP_MIN_LOG_LEVEL", "GLOG_minloglevel", "AUTOGRAPH_VERBOSITY"):
        env.pop(k, None)  # deploy must set them itself
    for extra in (["--verbose"], ["--gate", "cosine_man=0.9"]):
        out = tmp_path / f"out{len(extra)}"
        p = subprocess.run([sys.executable, "-m", "deployer.cli", "--model", "m.onnx", "--calib", "calib",
                            "--target", "tflite,onnxruntime", "--no-cache", "--out", str(out), *extra],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
        lines = (p.stdout + p.stderr).splitlines()
        assert p.returncode == (2 if "--gate" in extra else 0), p.stderr
        assert lines
        too_long = [line for line in lines if len(line) > 80]
        assert not too_long, too_long
        noisy = [line for line in lines if NOISE.search(line)]
        assert not noisy, noisy
        if "--gate" in extra:
            assert len(p.stderr.strip().splitlines()) == 1 and "did you mean cosine_mean" in p.stderr
            assert not out.exists()
        else:
            assert "tflite" in p.stdout and "ships" in p.stdout
            assert (out / "log.txt").is_file()  # the converter's and LiteRT's lines are kept there
