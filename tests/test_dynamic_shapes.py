"""Dynamic shapes end to end (issue #12) on a tiny CNN with symbolic batch, height and width: the
calibration samples have three sizes, the plan records the shapes seen, and every target says which
shapes it chose (TensorRT profile, ATC gears, dynamic TFLite / ONNX Runtime) and verifies on samples of
every size."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from deployer.errors import BadInputError
from deployer.shapes import ShapeRange, parse_input_shapes, resolve_input_shapes

SIZES = (12, 16, 20)


def _model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("GlobalAveragePool", ["r"], ["p"], name="gap"),
             helper.make_node("Flatten", ["p"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "w2", "b2"], ["y"], name="fc", transB=1)]
    inits = [numpy_helper.from_array(rng.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(np.zeros(8, np.float32), "b"),
             numpy_helper.from_array(rng.normal(0, 0.3, (4, 8)).astype(np.float32), "w2"),
             numpy_helper.from_array(np.zeros(4, np.float32), "b2")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture(scope="module")
def deployed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from deployer.cli import main

    root = tmp_path_factory.mktemp("dyn")
    onnx.save(_model(), str(root / "dyn.onnx"))
    calib = root / "calib"
    calib.mkdir()
    rng = np.random.default_rng(1)
    for i in range(30):
        s = SIZES[i % 3]
        np.save(calib / f"{i:03d}.npy", rng.normal(0, 1, (1, 3, s, s)).astype(np.float32))
    assert main(["--model", str(root / "dyn.onnx"), "--calib", str(calib), "--target", "tflite,tensorrt,ascend,onnxruntime", "--out",
                 str(root / "out"), "--quiet", "--no-cache"]) == 0
    return root / "out"


def test_plan_records_the_shapes_seen(deployed: Path) -> None:
    plan = json.loads((deployed / "plan.json").read_text())
    assert plan["calibration"]["input_shapes"] == {"x": {"min": [1, 3, 12, 12], "max": [1, 3, 20, 20]}}


def test_every_target_says_what_it_chose_and_verifies_every_size(deployed: Path) -> None:
    report = json.loads((deployed / "report.json").read_text())
    t = report["targets"]
    assert set(t) == {"tflite", "tensorrt", "ascend", "onnxruntime"}
    for name, r in t.items():
        assert r["fidelity"]["samples"] == 6 and r["fidelity"]["outputs"]["y"]["sqnr_db"] > 25, (name, r["fidelity"])  # 3 sizes
    assert any("optimization profile: x: 1x3x12x12/1x3x20x20/1x3x20x20 (calibration shapes seen)" in n
               for n in t["tensorrt"]["notes"])
    assert "--minShapes=x:1x3x12x12" in (deployed / "tensorrt" / "build_engine.sh").read_text()
    assert any("input shapes for atc" in n and "calibration shapes seen" in n for n in t["ascend"]["notes"])
    for name in ("tflite", "onnxruntime"):
        assert any("symbolic input dims stay dynamic" in n for n in t[name]["notes"]), name
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(deployed / "tflite" / "model_int8.tflite"))
    assert list(it.get_input_details()[0]["shape_signature"]) == [-1, -1, -1, 3]  # NHWC, dynamic


def test_resolve_prefers_given_then_static_then_seen() -> None:
    m = _model()
    seen = {"x": {"min": [1, 3, 12, 12], "max": [2, 3, 20, 20]}}
    shapes, src = resolve_input_shapes(m, None, seen)
    assert shapes["x"] == ShapeRange((1, 3, 12, 12), (2, 3, 20, 20), (2, 3, 20, 20))
    assert src == {"x": "calibration shapes seen"}
    shapes, src = resolve_input_shapes(m, parse_input_shapes("x:1x3x16x16"), seen)
    assert shapes["x"].static and src == {"x": "--input-shapes"}
    with pytest.raises(BadInputError, match="--input-shapes x:SHAPE"):
        resolve_input_shapes(m, None, None)  # a plan from before shapes were recorded


def test_metrics_on_outputs_of_different_lengths() -> None:
    """Per-token outputs of a dynamic-sequence model cannot be stacked; SQNR runs over all values."""
    from deployer.verify import fidelity

    rng = np.random.default_rng(2)
    ref = [[rng.normal(size=(1, n, 4)).astype(np.float32)] for n in (3, 5, 7)]
    got = [[r[0] + 0.01] for r in ref]
    res = fidelity(ref, got, ["h"], "generic")
    assert res["samples"] == 3 and 30 < res["outputs"]["h"]["sqnr_db"] < 45


def test_given_shapes_must_fit_the_model_and_seen_shapes_must_be_well_formed() -> None:
    m = _model()
    with pytest.raises(BadInputError, match="rank 3, but the model's input has rank 4"):
        resolve_input_shapes(m, parse_input_shapes("x:1x3x8"), None)
    with pytest.raises(BadInputError, match="axis 1 is fixed at 3"):
        resolve_input_shapes(m, parse_input_shapes("x:1x4x8x8"), None)
    shapes, _ = resolve_input_shapes(m, parse_input_shapes("x:1x3x8x8/2x3x16x16/4x3x32x32"), None)
    assert shapes["x"].dynamic_axes() == [0, 2, 3]  # the batch axis may vary even where the model fixes it
    for bad in ("1x3x8x8", {"min": [4, 3, 8, 8], "max": [1, 3, 16, 16]}, {"min": [1, 3, 8], "max": [1, 3, 8]}):
        with pytest.raises(BadInputError, match="calibration.input_shapes"):
            resolve_input_shapes(m, None, {"x": bad})
    with pytest.raises(BadInputError, match="x-separated"):
        parse_input_shapes("x:1,3,8,8")  # atc's own comma syntax


def test_api_input_shapes_types(tmp_path: Path) -> None:
    from deployer import deploy

    onnx.save(_model(), str(tmp_path / "m.onnx"))
    samples = [{"x": np.ones((1, 3, 8, 8), np.float32)}] * 6
    for bad in (5, {"x": 5}):
        with pytest.raises(BadInputError, match="input_shapes"):
            deploy(str(tmp_path / "m.onnx"), samples, targets="tensorrt", out_dir=tmp_path / "o", input_shapes=bad)
    with pytest.raises(BadInputError, match="not inputs of the model"):  # refused before calibration
        deploy(str(tmp_path / "m.onnx"), samples, targets="onnxruntime", out_dir=tmp_path / "o",
               input_shapes={"y": (1, 3, 8, 8)})
    assert not (tmp_path / "o").exists()
