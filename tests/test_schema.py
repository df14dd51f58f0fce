"""``--json`` outputs of every subcommand validate against the published JSON Schemas; plan schema
versions and the 0.9 -> 1.0 migration; exit codes (the worst of several targets)."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from deployer.cli import main
from deployer.commands import exit_code_for_report, gate_failed, worst
from deployer.errors import PlanError
from deployer.plan import SCHEMA_VERSION, QuantPlan

SCHEMAS = Path(__file__).resolve().parents[1] / "deployer" / "schemas"


def schema(name: str) -> dict:
    s = json.loads((SCHEMAS / f"{name}.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(s)
    return s


def run_json(capsys: pytest.CaptureFixture[str], argv: list[str], code: int = 0) -> object:
    assert main(argv) == code
    return json.loads(capsys.readouterr().out)


@pytest.fixture(scope="module")
def deployed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from test_report import write_inputs

    root = tmp_path_factory.mktemp("schema")
    write_inputs(root)
    return root


def test_every_schema_is_valid_and_versioned() -> None:
    for p in SCHEMAS.glob("*.schema.json"):
        s = json.loads(p.read_text())
        jsonschema.Draft202012Validator.check_schema(s)
        assert s["$id"].startswith("urn:deployer:schema:") and s["$id"].rsplit(":", 1)[1][0].isdigit(), p.name
    assert json.loads((SCHEMAS / "plan.schema.json").read_text()) == \
        json.loads((SCHEMAS / f"plan-{SCHEMA_VERSION}.schema.json").read_text())


def test_deploy_plan_inspect_verify_json(capsys: pytest.CaptureFixture[str], deployed: Path) -> None:
    root = deployed
    model, calib, out = str(root / "model.onnx"), str(root / "calib"), root / "out"
    report = run_json(capsys, ["--model", model, "--calib", calib, "--target", "tensorrt,ascend", "--out", str(out),
                               "--json", "--no-cache"])
    jsonschema.validate(report, schema("report"))
    jsonschema.validate(json.loads((out / "report.json").read_text()), schema("report"))
    jsonschema.validate(json.loads((out / "plan.json").read_text()), schema("plan"))
    res = run_json(capsys, ["plan", "--model", model, "--calib", calib, "--out", str(root / "p.json"), "--json"])
    jsonschema.validate(res, schema("plan-result"))
    jsonschema.validate(run_json(capsys, ["inspect", str(out / "plan.json"), "--json"]), schema("inspect"))
    v = run_json(capsys, ["verify", str(out / "tensorrt" / "model_strongly_typed.onnx"), "--data", calib,
                          "--out", str(root / "verify"), "--json"])
    jsonschema.validate(v, schema("report"))
    assert v["kind"] == "verify" and v["targets"]["tensorrt"]["fidelity"]["samples"] == 15
    assert v["layers"]["layers"] and (root / "verify" / "report.html").is_file()
    assert v["targets"]["tensorrt"]["fidelity"]["sqnr_db"] == pytest.approx(
        report["targets"]["tensorrt"]["fidelity"]["sqnr_db"], abs=10)
    jsonschema.validate(run_json(capsys, ["check", "--target", "tensorrt",
                                          str(out / "tensorrt" / "model_strongly_typed.onnx"), "--json"]),
                        schema("check"))


def test_inspect_table(capsys: pytest.CaptureFixture[str], deployed: Path) -> None:
    p = deployed / "p2.json"
    assert main(["plan", "--model", str(deployed / "model.onnx"), "--calib", str(deployed / "calib"),
                 "--out", str(p), "--quiet"]) == 0
    assert main(["inspect", str(p)]) == 0
    out = capsys.readouterr().out
    assert "conv2" in out and "int8 sym per_channel" in out and "\x1b[" not in out  # no colours off a TTY


def test_targets_and_examples_json(capsys: pytest.CaptureFixture[str]) -> None:
    rows = run_json(capsys, ["targets", "--json"])
    jsonschema.validate(rows, schema("targets"))
    assert {"tflite", "tensorrt", "ascend"} <= {r["target"] for r in rows}
    jsonschema.validate(run_json(capsys, ["examples", "--json"]), schema("examples"))


def test_plan_0_9_migrates(deployed: Path, tmp_path: Path) -> None:
    current = json.loads((deployed / "out" / "plan.json").read_text()) if (deployed / "out").exists() else None
    if current is None:
        assert main(["plan", "--model", str(deployed / "model.onnx"), "--calib", str(deployed / "calib"),
                     "--out", str(tmp_path / "p.json"), "--quiet"]) == 0
        current = json.loads((tmp_path / "p.json").read_text())
    old = dict(current, schema_version="0.9", ranges={k: [v["min"], v["max"]] for k, v in current["ranges"].items()})
    old.pop("shared_scales")
    old.pop("bias_correction")
    old.pop("smoothing")
    jsonschema.validate(old, schema("plan-0.9"))
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(old, schema("plan"))
    plan = QuantPlan.from_dict(old)
    assert plan.schema_version == SCHEMA_VERSION
    assert plan.ranges.keys() == current["ranges"].keys()
    assert all(plan.ranges[k].min == v["min"] for k, v in current["ranges"].items())
    jsonschema.validate(plan.to_dict(), schema("plan"))
    with pytest.raises(PlanError, match="schema_version"):
        QuantPlan.from_dict(dict(current, schema_version="0.1"))


def test_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert gate_failed([{"name": "a", "passed": True}, {"name": "b", "passed": False}])
    assert not gate_failed({"top1": {"passed": False, "enforced": False}})
    assert gate_failed({"enforced": True, "status": "failed"})
    assert not gate_failed(None)
    report = {"targets": {"a": {"gates": None}, "b": {"gates": {"passed": False}}}}
    assert exit_code_for_report(report) == 1
    assert exit_code_for_report({"targets": {"a": {}, "b": {"gates": {"passed": True}}}}) == 0
    assert worst([0, 1, 3, 2]) == 3 and worst([]) == 0
    assert main(["inspect", str(tmp_path / "missing.json")]) == 2
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"x")
    (tmp_path / "d").mkdir()
    assert main(["verify", str(engine), "--data", str(tmp_path / "d"), "--reference", str(engine)]) in (2, 3)
    from test_report import write_inputs

    model, calib = write_inputs(tmp_path / "m", n=3)
    assert main(["verify", str(engine), "--data", str(calib), "--reference", str(model), "--quiet"]) == 3
    capsys.readouterr()
