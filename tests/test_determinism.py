"""Determinism (issue 10): the same model, data and options give a byte-identical ``plan.json`` and the
same artifact hashes; the report's ``sha256`` covers every artifact and matches the files.

Runs the real CLI twice on the tiny model (TensorRT and Ascend targets, both ONNX-only here): the
first run calibrates and fills the statistics cache, the second reads the cache, so the comparison
also proves the cache round trip is exact. A third, ``deploy plan --no-cache``, recalibrates from
scratch and must give the same plan bytes.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import onnx

from deployer.cli import main
from test_cli_bad_input import tiny_model, write_calib

REPORT_FILES = {"report.json", "report.html", ".deployer-manifest.json", "log.txt"}  # written after report.json: the manifest (lists the files) and the CLI's log of third-party output
TIME_KEYS = {"time", "date", "datetime", "timestamp", "created", "created_at", "wall_seconds", "seconds"}


def sha256(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _keys(obj: object, prefix: str = "") -> list[str]:
    if isinstance(obj, dict):
        return [k for key, v in obj.items() for k in [f"{prefix}{key}", *_keys(v, f"{prefix}{key}.")]]
    if isinstance(obj, list):
        return [k for v in obj for k in _keys(v, prefix)]
    return []


def test_same_inputs_same_bytes(tmp_path: Path, capsys) -> None:
    model = tmp_path / "tiny.onnx"
    onnx.save(tiny_model(), str(model))
    calib = write_calib(tmp_path / "calib", n=10)
    runs = []
    for name in ("a", "b"):
        out = tmp_path / name
        rc = main(["--model", str(model), "--calib", str(calib), "--out", str(out), "--target", "tensorrt,ascend",
                   "--quiet"])
        assert rc == 0, capsys.readouterr().err
        runs.append(out)
    a, b = runs
    assert (a / "plan.json").read_bytes() == (b / "plan.json").read_bytes(), "plan.json differs between runs"

    plan = json.loads((a / "plan.json").read_text())
    stamped = [k for k in _keys(plan) if k.rsplit(".", 1)[-1].lower() in TIME_KEYS]
    assert not stamped, f"time-like keys in the plan: {stamped}"

    ra, rb = (json.loads((d / "report.json").read_text()) for d in runs)
    # the report hashes every artifact (everything but the report itself: report.json, report.html),
    # and the hashes are the files'
    files = sorted(str(p.relative_to(a)) for p in a.rglob("*") if p.is_file() and p.name not in REPORT_FILES)
    assert sorted(ra["sha256"]) == files
    for rel, digest in ra["sha256"].items():
        assert sha256(a / rel) == digest, rel
    # the ONNX backends are deterministic: every artifact hash is equal across runs
    assert ra["sha256"] == rb["sha256"], {k: (v, rb["sha256"].get(k)) for k, v in ra["sha256"].items()
                                          if rb["sha256"].get(k) != v}

    plan_path = tmp_path / "plan.json"
    assert main(["plan", "--model", str(model), "--calib", str(calib), "--out", str(plan_path), "--quiet",
                 "--no-cache"]) == 0, capsys.readouterr().err
    assert plan_path.read_bytes() == (a / "plan.json").read_bytes(), "a fresh calibration gave another plan"
