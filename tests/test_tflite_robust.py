"""TFLite failure modes from issue 17, each reduced to a tiny graph: inputs of very different ranges
meeting in a Concat (the small one must not be erased, and any coarser scale is reported), and native
crashes of the LiteRT interpreter or the converter (one error line, exit 2, nothing left behind).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

pytest.importorskip("ai_edge_litert")
pytest.importorskip("ai_edge_quantizer")
pytest.importorskip("onnx2tf")

from backends.base import LoweringContext, onnx_runner  # noqa: E402
from backends.tflite import flatbuf  # noqa: E402
from backends.tflite.backend import TFLiteBackend, tflite_runner  # noqa: E402
from backends.tflite.child import run_child  # noqa: E402
from calibration.collect import collect_statistics  # noqa: E402
from calibration.dataset import CalibrationSet  # noqa: E402
from deployer.errors import DeployerError, ExternalToolError  # noqa: E402
from deployer.pipeline import DeployOptions, Inputs, make_plan  # noqa: E402


def _two_input_model() -> onnx.ModelProto:
    """a in [0, 1] and b in [-100, 100] concatenated on channels, then a 1x1 conv that weighs a's
    channels 50x (so a carries as much of the output as b)."""
    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.3, (4, 8, 1, 1)).astype(np.float32)
    w[:, :4] *= 50
    nodes = [helper.make_node("Concat", ["a", "b"], ["cat"], axis=1, name="cat"),
             helper.make_node("Conv", ["cat", "w"], ["y"], name="conv")]
    g = helper.make_graph(nodes, "two", [helper.make_tensor_value_info("a", TensorProto.FLOAT, [1, 4, 8, 8]),
                                         helper.make_tensor_value_info("b", TensorProto.FLOAT, [1, 4, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])],
                          [numpy_helper.from_array(w, "w")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _two_inputs(n: int, seed: int) -> CalibrationSet:
    r = np.random.default_rng(seed)
    return CalibrationSet([{"a": r.uniform(0, 1, (1, 4, 8, 8)).astype(np.float32),
                            "b": r.uniform(-100, 100, (1, 4, 8, 8)).astype(np.float32)} for _ in range(n)])


def test_small_input_meeting_a_large_one_is_not_erased(tmp_path) -> None:
    model = _two_input_model()
    cal = _two_inputs(16, 1)
    plan = make_plan(Inputs(model, cal, cal, "generic", "t", "t"), collect_statistics(model, cal), DeployOptions())
    art = TFLiteBackend().lower(LoweringContext(model, plan, tmp_path, cal, {"tflite_latency_runs": 0}))
    # the model input keeps its own plan range (scale 1/255 for [0, 1]), not the Concat's
    a_in = next(d for d in art.extra["io"]["inputs"] if d["name"] == "a")
    assert a_in["scale"] == pytest.approx(plan.ranges["a"].max / 255, rel=1e-3)
    held = _two_inputs(4, 2)
    zeroed = CalibrationSet([{"a": np.zeros_like(s["a"]), "b": s["b"]} for s in held])
    ref, got = onnx_runner(model), art.run
    d_ref = np.stack([r[0] for r in ref(held)]) - np.stack([r[0] for r in ref(zeroed)])
    d_got = np.stack([r[0] for r in got(held)]) - np.stack([r[0] for r in got(zeroed)])
    assert np.linalg.norm(d_got) > 0.5 * np.linalg.norm(d_ref)  # zeroing a moves the TFLite output
    cos = float(d_ref.ravel() @ d_got.ravel() / (np.linalg.norm(d_ref) * np.linalg.norm(d_got)))
    assert cos > 0.99, cos  # ... as the FP32 model moves: a keeps its own scale up to its convolution
    # the Concat was distributed over the Conv (TFLite's CONCATENATION would force one shared scale)
    assert any("distributed over their convolutions" in n for n in art.notes), art.notes
    assert "CONCATENATION" not in {c for c, _ in flatbuf.ops(flatbuf.load(art.path.read_bytes()))}
    assert not [d for d in art.extra["plan_deviations"] if d["onnx_tensor"] == "a"]


def test_a_concat_that_cannot_be_distributed_reports_the_coarse_scale(tmp_path) -> None:
    """Concat of [0, 1] and [-100, 100] feeding a Relu (not a Conv): the TFLite spec's shared scale
    leaves a fewer than 16 levels; the report names the tensor instead of claiming the plan's range."""
    nodes = [helper.make_node("Concat", ["a", "b"], ["cat"], axis=1, name="cat"),
             helper.make_node("Relu", ["cat"], ["y"], name="relu")]
    g = helper.make_graph(nodes, "two", [helper.make_tensor_value_info("a", TensorProto.FLOAT, [1, 4, 8, 8]),
                                         helper.make_tensor_value_info("b", TensorProto.FLOAT, [1, 4, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 8, 8])])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    cal = _two_inputs(8, 1)
    plan = make_plan(Inputs(model, cal, cal, "generic", "t", "t"), collect_statistics(model, cal), DeployOptions())
    art = TFLiteBackend().lower(LoweringContext(model, plan, tmp_path, cal, {"tflite_latency_runs": 0}))
    coarse = [d for d in art.extra["plan_deviations"] if d["onnx_tensor"] == "a"]
    assert coarse and all(d["levels"] < 16 for d in coarse), art.extra["plan_deviations"]
    assert any(n.startswith("coarse: a ") for n in art.notes), art.notes


def test_native_crash_in_a_child_is_one_line(tmp_path) -> None:
    with pytest.raises(ExternalToolError) as e:
        run_child([sys.executable, "-c", "import os; print('Fatal error: kernel failed'); os.abort()"],
                  "LiteRT run", tmp_path, "try --tflite-mode 16x8")
    msg = str(e.value)
    assert "\n" not in msg and "SIGABRT" in msg and "try --tflite-mode 16x8" in msg
    assert e.value.exit_code == 2


def test_interpreter_failure_in_the_runner_is_one_line_and_leaves_nothing(tmp_path) -> None:
    import tempfile

    bad = tmp_path / "broken.tflite"
    bad.write_bytes(b"TFL3" + bytes(64))
    layout = {"in_names": ["x"], "in_perms": [[0, 1]], "out_order": [0], "out_perms": [[0, 1]]}
    before = set(Path(tempfile.gettempdir()).glob("deployer-tflite-run-*"))
    with pytest.raises(DeployerError) as e:
        tflite_runner(bad, layout)([{"x": np.zeros((1, 4), np.float32)}])
    assert "\n" not in str(e.value) and "broken.tflite" in str(e.value)
    assert set(Path(tempfile.gettempdir()).glob("deployer-tflite-run-*")) == before


def test_dead_channel_bias_fits_int32_and_stays_integer(tmp_path) -> None:
    """A conv channel with ~1e-9 weights and a bias of 5 (a BatchNorm-folded dead channel): its
    weight scale would put bias / (input_scale x weight_scale) far beyond int32. The backend raises
    that channel's weight scale, reports it, and the conv stays integer and exact."""
    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.3, (6, 3, 3, 3)).astype(np.float32)
    w[2] = rng.normal(0, 1e-9, (3, 3, 3))
    b = np.linspace(-1, 1, 6).astype(np.float32)
    b[2] = 5.0
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("Relu", ["c"], ["y"], name="relu")]
    g = helper.make_graph(nodes, "dead", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6, 8, 8])],
                          [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    cal = CalibrationSet([{"x": rng.uniform(-1, 1, (1, 3, 8, 8)).astype(np.float32)} for _ in range(8)])
    plan = make_plan(Inputs(model, cal, cal, "generic", "t", "t"), collect_statistics(model, cal), DeployOptions())
    art = TFLiteBackend().lower(LoweringContext(model, plan, tmp_path, cal, {"tflite_latency_runs": 0}))
    assert art.extra["float_nodes"] == []
    assert [f["channels"] for f in art.extra["bias_fitted_channels"]] == [[2]]
    ref = np.stack([r[0] for r in onnx_runner(model)(cal)])
    got = np.stack([r[0] for r in art.run(cal)])
    np.testing.assert_allclose(got[:, :, 2], ref[:, :, 2], atol=0.05)  # NCHW: the dead channel outputs ~5
    assert float(np.max(np.abs(got - ref))) < 0.1


def test_check_lists_ops_that_will_stay_float_before_calibration(tmp_path, capsys) -> None:
    """``deploy check --target tflite`` converts and dry-quantizes: a Div by an activation (int8 DIV
    does not run in LiteRT) is a warning naming the node; the graph converts (exit 0)."""
    from deployer.cli import main

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8])
    nodes = [helper.make_node("Sigmoid", ["x"], ["s"], name="sig"),
             helper.make_node("Add", ["s", "one"], ["den"], name="den"),
             helper.make_node("Div", ["x", "den"], ["y"], name="div")]
    g = helper.make_graph(nodes, "div", [x], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8])],
                          [numpy_helper.from_array(np.array(1.0, np.float32), "one")])
    path = tmp_path / "div.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)
    findings = TFLiteBackend().check(onnx.load(path))
    # the DIV, and the Add computing its divisor (a float DIV's divisor path stays float too)
    assert {(f.rule, f.severity) for f in findings} == {("tflite-float-op", "warning")} and len(findings) == 2
    assert {f.node for f in findings} == {"y", "den"} and all("DIV" in f.message for f in findings)
    assert main(["check", "--target", "tflite", str(path)]) == 0
    assert "2 warning" in capsys.readouterr().out


def test_layernorm_as_mean_of_squares_minus_square_of_mean_stays_right(tmp_path) -> None:
    """LayerNorm written ``(x - E[x]) / sqrt(E[x^2] - E[x]^2 + eps)`` (jax2tf exports, magika) on data
    whose mean is large against its spread: int8 ``E[x^2]`` and ``E[x]^2`` cancel to 0 and 1/x blows up
    (cosine 0.04 on magika). The divisor path of the float DIV stays float."""
    ax = numpy_helper.from_array(np.array([-1], np.int64), "ax")
    nodes = [helper.make_node("ReduceMean", ["x", "ax"], ["m"], name="mean"),
             helper.make_node("Mul", ["x", "x"], ["sq"], name="sq"),
             helper.make_node("ReduceMean", ["sq", "ax"], ["msq"], name="msq"),
             helper.make_node("Mul", ["m", "m"], ["m2"], name="m2"),
             helper.make_node("Sub", ["msq", "m2"], ["var"], name="var"),
             helper.make_node("Add", ["var", "eps"], ["ve"], name="ve"),
             helper.make_node("Sqrt", ["ve"], ["std"], name="std"),
             helper.make_node("Sub", ["x", "m"], ["c"], name="center"),
             helper.make_node("Div", ["c", "std"], ["y"], name="norm")]
    g = helper.make_graph(nodes, "ln", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 6, 32])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6, 32])],
                          [ax, numpy_helper.from_array(np.array(1e-6, np.float32), "eps")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    rng = np.random.default_rng(0)
    cal = CalibrationSet([{"x": (rng.uniform(5, 30, (1, 6, 1)) + rng.normal(0, rng.uniform(0.05, 2, (1, 6, 1)),
                                                                            (1, 6, 32))).astype(np.float32)}
                          for _ in range(12)])
    plan = make_plan(Inputs(model, cal, cal, "generic", "t", "t"), collect_statistics(model, cal), DeployOptions())
    art = TFLiteBackend().lower(LoweringContext(model, plan, tmp_path, cal, {"tflite_latency_runs": 0}))
    assert any("divisor" in f["reason"] for f in art.extra["float_nodes"]), art.extra["float_nodes"]
    ref = np.stack([r[0] for r in onnx_runner(model)(cal)]).ravel()
    got = np.stack([r[0] for r in art.run(cal)]).ravel()
    assert float(ref @ got / (np.linalg.norm(ref) * np.linalg.norm(got))) > 0.98
