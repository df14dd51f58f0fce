"""End to end on the real default example (EfficientNet-Lite0, real weights, real photo crops).

One deployment for all three targets per test session (module fixture); assertions read its report.
"""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest

import deployer
from deployer.plan import QuantPlan

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> deployer.pipeline.DeployResult:  # type: ignore[name-defined]
    out = tmp_path_factory.mktemp("e2e") / "out"
    return deployer.deploy(targets="all", out_dir=out, no_cache=True)


def test_report_shape(result) -> None:  # type: ignore[no-untyped-def]
    report = json.loads(result.report_path.read_text())
    assert set(report["targets"]) == {"tflite", "tensorrt", "ascend"}
    for name, t in report["targets"].items():
        assert t["target"] == name
        assert (result.out_dir / t["artifact"]).is_file()
        assert t["size_bytes"]["artifact"] > 0 and t["size_bytes"]["fp32"] > 0
        assert "top1_agreement" in t["fidelity"] and "sqnr_db" in t["fidelity"]
        assert t["verified_by"]
        assert isinstance(t["notes"], list)
    assert report["plan"] == "plan.json"
    assert report["provenance"]["libraries"]["onnxruntime"]
    assert len(report["model"]["sha256"]) == 64 and len(report["calibration"]["sha256"]) == 64
    for rel, digest in report["sha256"].items():
        assert (result.out_dir / rel).is_file() and len(digest) == 64


def test_tflite_meets_goal(result) -> None:  # type: ignore[no-untyped-def]
    t = result.report["targets"]["tflite"]
    assert t["fidelity"]["top1_agreement"] >= 0.90, t["fidelity"]  # issue 2's goal
    assert t["size_bytes"]["artifact"] <= 0.30 * t["size_bytes"]["fp32"], t["size_bytes"]
    # the TFLite issue's stricter goals on the same run
    assert t["fidelity"]["top1_agreement"] >= 0.95, t["fidelity"]
    # int8 full integer: <= 27% (the TFLite issue's goal); what the floor's escalation chose (16x8 with its
    # int64 biases, or float islands) weighs a little more: the 30% bound applies then
    escalated = t["fidelity_floor"]["escalated"]
    assert t["size_bytes"]["ratio"] <= (0.30 if escalated else 0.27), (t["size_bytes"], t["fidelity_floor"])
    assert t["tensors_without_plan_range"] == []
    # full integer, except the float islands the fidelity floor's escalation asked for (issue 18), each
    # listed with that reason; the target ships
    assert all("float island" in f["reason"] for f in t["float_ops"]), t["float_ops"]
    assert t["float_ops"] == [] or t["fidelity_floor"]["escalated"], t["fidelity_floor"]
    assert t["verdict"]["ships"] is True, t["verdict"]
    assert t["latency_ms"]["artifact"] > 0 and t["latency_ms"]["fp32"] > 0
    io = t["io"]
    wide = t["artifact"].endswith("int16x8.tflite")  # the floor escalated to 16x8: int16 model I/O
    io_type = "int16" if wide else "int8"
    assert io["inputs"][0]["dtype"] == io_type and io["outputs"][0]["dtype"] == io_type, io
    assert io["inputs"][0]["shape"] == [1, 224, 224, 3]


def test_held_out_split_is_large_and_disjoint(result) -> None:  # type: ignore[no-untyped-def]
    data = result.report["data"]
    assert data["heldout_samples"] >= 300
    from deployer.examples.photos import CALIBRATION_PHOTOS, HELDOUT_PHOTOS

    assert not set(CALIBRATION_PHOTOS) & set(HELDOUT_PHOTOS)


def test_tensorrt_graph_is_strongly_typed_qdq(result) -> None:  # type: ignore[no-untyped-def]
    t = result.report["targets"]["tensorrt"]
    assert any("engine: not built (TensorRT not installed)" in n for n in t["notes"])
    assert (result.out_dir / "tensorrt" / "build_engine.sh").is_file()
    m = onnx.load(str(result.out_dir / t["artifact"]))
    q = [n for n in m.graph.node if n.op_type == "QuantizeLinear"]
    assert q, "no Q/DQ in the TensorRT graph"
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in m.graph.initializer}
    for n in m.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            assert not inits[n.input[2]].any(), f"{n.name}: zero point must be 0"
            assert (inits[n.input[1]] > 0).all()
    assert t["fidelity"]["top1_agreement"] >= 0.85


def test_ascend_graph_and_atc_command(result) -> None:  # type: ignore[no-untyped-def]
    t = result.report["targets"]["ascend"]
    argv = t["atc_command"]
    assert argv[0] == "atc" and "--framework=5" in argv and "--soc_version=Ascend310P3" in argv
    assert (result.out_dir / "ascend" / "atc.sh").is_file()
    m = onnx.load(str(result.out_dir / t["artifact"]))
    assert [i.domain for i in m.opset_import] in ([""], ["ai.onnx"])
    assert 11 <= m.opset_import[0].version <= 18
    assert t["fidelity"]["top1_agreement"] >= 0.85


def test_plan_round_trips(result) -> None:  # type: ignore[no-untyped-def]
    plan = QuantPlan.load(result.plan_path)
    assert plan.to_json() == Path(result.plan_path).read_text()
    assert plan.calibration["observer"] == "minmax"
    assert plan.bias_correction, "bias correction is on by default"
