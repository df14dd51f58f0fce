"""ONNX Runtime CPU target on tiny models built here: static QDQ and dynamic lowering (op counts,
dtypes, numerics vs FP32 with graph optimizations on), throughput fields, CLI and recommend."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from backends.base import LoweringContext, discover, onnx_runner
from backends.onnxruntime.backend import (POLICY, REDUCED_WEIGHT_QMAX, OnnxRuntimeBackend, artifact_name,
                                          dynamic_exclusions, lower_dynamic, lower_int4, op_counts, static_policy)
from backends.onnxruntime.speed import measure_speed
from backends.onnxruntime.throughput import batchable, with_dynamic_batch
from deployer.cpu import choose_flavour, detect
from deployer.speed import Point
from calibration.collect import collect_statistics
from calibration.dataset import CalibrationSet
from deployer.errors import BadInputError
from deployer.plan import NodeDecision, Precision, QuantPlan
from deployer.pipeline import DeployOptions, Inputs, make_plan
from deployer.qdq import lower_qdq
from deployer.recommend import recommend
from deployer.verify import sqnr_db

F = TensorProto.FLOAT


def _w(seed: int, shape: tuple[int, ...], fan_in: int) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)


def _model(name: str, nodes: list, inputs: list, outputs: list, inits: dict) -> onnx.ModelProto:
    g = helper.make_graph(nodes, name, [helper.make_tensor_value_info(n, F, s) for n, s in inputs],
                          [helper.make_tensor_value_info(n, F, s) for n, s in outputs],
                          [numpy_helper.from_array(a, n) for n, a in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m, full_check=True)
    return m


def cnn() -> onnx.ModelProto:
    """Conv-ReLU, Conv, residual Add, global pooling, Gemm: the EfficientNet pattern in small."""
    nodes = [
        helper.make_node("Conv", ["x", "w0", "b0"], ["c0"], name="conv0", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c0"], ["h"], name="relu0"),
        helper.make_node("Conv", ["h", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c1", "h"], ["s"], name="add"),
        helper.make_node("GlobalAveragePool", ["s"], ["p"], name="gap"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "wg", "bg"], ["y"], name="fc", transB=1),
    ]
    inits = {"w0": _w(1, (16, 3, 3, 3), 27), "b0": _w(2, (16,), 10), "w1": _w(3, (16, 16, 3, 3), 144),
             "b1": _w(4, (16,), 10), "wg": _w(5, (10, 16), 16), "bg": _w(6, (10,), 10)}
    return _model("cnn", nodes, [("x", [1, 3, 16, 16])], [("y", [1, 10])], inits)


def mlp() -> onnx.ModelProto:
    """Two MatMul+Add layers with a ReLU (the transformer feed-forward pattern)."""
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["m1"], name="fc1"),
        helper.make_node("Add", ["m1", "b1"], ["a1"], name="fc1_bias"),
        helper.make_node("Relu", ["a1"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "w2"], ["m2"], name="fc2"),
        helper.make_node("Add", ["m2", "b2"], ["y"], name="fc2_bias"),
    ]
    inits = {"w1": _w(7, (32, 64), 32), "b1": _w(8, (64,), 10), "w2": _w(9, (64, 16), 64), "b2": _w(10, (16,), 10)}
    return _model("mlp", nodes, [("x", [1, 8, 32])], [("y", [1, 8, 16])], inits)


def _samples(model: onnx.ModelProto, n: int, seed: int) -> CalibrationSet:
    rng = np.random.default_rng(seed)
    specs = [(i.name, [d.dim_value for d in i.type.tensor_type.shape.dim]) for i in model.graph.input]
    return CalibrationSet([{k: rng.standard_normal(s).astype(np.float32) for k, s in specs} for _ in range(n)])


MODELS = {"cnn": cnn, "mlp": mlp}


@lru_cache(maxsize=None)
def setup(name: str, recipe: str = "int8") -> tuple[onnx.ModelProto, CalibrationSet, CalibrationSet, QuantPlan]:
    m = MODELS[name]()
    cal, held = _samples(m, 48, 0), _samples(m, 16, 1)
    inputs = Inputs(m, cal, held, "generic", "test", "test")
    plan = make_plan(inputs, collect_statistics(m, cal), DeployOptions(recipe=recipe, bias_correction=False))
    return m, cal, held, plan


def _outputs(model: onnx.ModelProto, held: CalibrationSet, optimize: bool = True) -> np.ndarray:
    return np.concatenate([o[0] for o in onnx_runner(model, optimize=optimize)(list(held))])


def _ops(model: onnx.ModelProto, op: str) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.op_type == op]


def _init(model: onnx.ModelProto, name: str) -> np.ndarray:
    return numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == name))


def _ort_optimized(model: onnx.ModelProto, tmp_path: Path) -> onnx.ModelProto:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return onnx.load(str(tmp_path / "opt.onnx"))


# -- static ----------------------------------------------------------------------------------------


def test_static_cnn_op_counts_and_dtypes() -> None:
    m, _, _, plan = setup("cnn")
    q, rec = lower_qdq(m, plan, POLICY)
    onnx.checker.check_model(q, full_check=True)
    # activations: x (conv0), h (conv1 and the Add: one shared pair), c1 (Add), s (pool), f (Gemm)
    assert len(_ops(q, "QuantizeLinear")) == 5
    assert len(_ops(q, "DequantizeLinear")) == 5 + 3  # + three int8 weights
    assert set(rec.weights) == {"conv0", "conv1", "fc"}
    for n in _ops(q, "QuantizeLinear"):
        assert _init(q, n.input[2]).dtype == np.uint8  # U8S8: uint8 activations
    for node in ("conv0", "conv1", "fc"):
        w = _init(q, f"{node}.weight_int8")
        assert w.dtype == np.uint8 and w.min() >= 1  # U8U8: symmetric values + 128, zero point 128
        assert np.all(_init(q, f"{node}.weight_zero_point") == 128)
        assert _init(q, f"{node}.weight_scale").shape == (w.shape[0],)  # per output channel


def test_static_u8s8_reduce_range_weights() -> None:
    m, _, held, plan = setup("cnn")
    q, _ = lower_qdq(m, plan, static_policy("u8s8", reduce_range=True))
    w = _init(q, "conv1.weight_int8")
    assert w.dtype == np.int8 and np.abs(w).max() == REDUCED_WEIGHT_QMAX  # 7-bit weights
    assert sqnr_db(_outputs(m, held), _outputs(q, held)) > 20.0


def test_static_cnn_fuses_to_int8_kernels_and_stays_close(tmp_path: Path) -> None:
    m, _, held, plan = setup("cnn")
    q, _ = lower_qdq(m, plan, POLICY)
    fused = op_counts(_ort_optimized(q, tmp_path))
    assert fused.get("QLinearConv", 0) == 2, fused
    assert "Conv" not in fused
    ref = _outputs(m, held)
    assert sqnr_db(ref, _outputs(q, held, optimize=True)) > 25.0
    # the fused kernels agree with exact Q/DQ arithmetic (no int16 saturation with 7-bit weights)
    assert sqnr_db(_outputs(q, held, optimize=False), _outputs(q, held, optimize=True)) > 35.0


def test_static_mlp_matmul_numerics() -> None:
    m, _, held, plan = setup("mlp")
    q, rec = lower_qdq(m, plan, POLICY)
    assert len(_ops(q, "MatMul")) == 2 and set(rec.weights) == {"fc1", "fc2"}
    assert sqnr_db(_outputs(m, held), _outputs(q, held)) > 20.0  # 7-bit weights, Gaussian inputs


def test_plan_fp32_nodes_stay_fp32_islands() -> None:
    m, _, held, plan = setup("cnn")
    nodes = dict(plan.nodes)
    nodes["conv1"] = NodeDecision("Conv", Precision.FP16, None, "test: keep high precision")
    p2 = plan.with_nodes(nodes, plan.recipe)
    q, rec = lower_qdq(m, p2, POLICY)
    assert "conv1" not in rec.weights
    conv1 = next(n for n in q.graph.node if n.name == "conv1")
    assert conv1.input[1] == "w1"  # float weight, no Cast (no FP16 on the CPU provider)
    assert not _ops(q, "Cast")


# -- dynamic ---------------------------------------------------------------------------------------


def test_dynamic_mlp_op_counts_and_numerics(tmp_path: Path) -> None:
    m, _, held, plan = setup("mlp")
    q = lower_dynamic(m, plan, tmp_path)
    ops = op_counts(q)
    assert ops.get("MatMulInteger", 0) == 2 and ops.get("DynamicQuantizeLinear", 0) == 2, ops
    assert "QuantizeLinear" not in ops  # no activation ranges: quantized at run time
    assert sqnr_db(_outputs(m, held), _outputs(q, held)) > 30.0
    q8 = lower_dynamic(m, plan, tmp_path, kernels="u8u8")
    assert sqnr_db(_outputs(m, held), _outputs(q8, held)) > 30.0
    # default: int8 weights, reduce_range (ONNX Runtime's symmetric 7-bit grid is [-64, 64]: 2 * 255 * 64 < 32767)
    quantized = [a for i in q.graph.initializer if (a := numpy_helper.to_array(i)).dtype == np.int8 and a.ndim == 2]
    assert len(quantized) == 2 and all(int(np.abs(w.astype(np.int32)).max()) <= 64 for w in quantized)


def test_dynamic_honours_plan_fp32_nodes(tmp_path: Path) -> None:
    m, _, held, plan = setup("mlp")
    nodes = dict(plan.nodes)
    nodes["fc2"] = NodeDecision("MatMul", Precision.FP32, None, "test")
    p2 = plan.with_nodes(nodes, plan.recipe)
    assert "fc2" in dynamic_exclusions(m, p2)
    q = lower_dynamic(m, p2, tmp_path)
    assert op_counts(q).get("MatMulInteger", 0) == 1
    assert any(n.op_type == "MatMul" and n.name == "fc2" for n in q.graph.node)


def test_quantizer_logs_stay_off_the_console(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """ONNX Runtime's quantizer logs INFO lines (and MatMulNBits' module calls logging.basicConfig(INFO)
    on import): none reach stderr, and the root logger is left as it was."""
    import logging

    m, _, _, plan = setup("mlp")
    _, _, _, plan4 = setup("mlp", recipe="int4")
    root = logging.getLogger()
    before = (root.level, list(root.handlers))
    lower_dynamic(m, plan, tmp_path)
    _, entry = lower_int4(m, plan4)
    assert entry["nodes_int4"] == 2
    err = capfd.readouterr().err
    assert "INFO" not in err and "pre-process" not in err, err
    assert (root.level, list(root.handlers)) == before


# -- backend, throughput, CLI ----------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_backend_lower_and_throughput(tmp_path: Path, mode: str) -> None:
    m, cal, held, plan = setup("mlp")
    ctx = LoweringContext(m, plan, tmp_path, cal, {"ort_mode": mode, "ort_repeats": 1})
    art = OnnxRuntimeBackend().lower(ctx)
    assert art.path.name == f"model_int8_{mode}.onnx" and art.path.exists()
    assert (tmp_path / "onnxruntime" / "model_int8_optimized.onnx").exists()
    assert artifact_name(plan, mode) == (f"model_int8_{mode}.onnx", "model_int8_optimized.onnx")
    assert art.extra["mode"] == mode and art.extra["build_cpu"]["isa"] == detect().isa
    flavour = choose_flavour(detect().isa, mode)  # --cpu auto: the build machine's flavour
    assert art.extra["kernels"] == flavour.kernels and art.extra["kernel_flavour"]["name"] == flavour.name
    assert art.run is not None and art.throughput is not None
    out = np.concatenate([o[0] for o in art.run(list(held))])
    assert sqnr_db(_outputs(m, held), out) > 20.0
    sp = art.throughput(list(held))
    assert sp["fp32_qps"] > 0 and sp["artifact_qps"] > 0 and (sp["batch"], sp["threads"]) == (1, 1)
    assert sp["ratio"] == pytest.approx(sp["artifact_qps"] / sp["fp32_qps"], rel=0.01)
    assert sp["same_cpu"] is True and sp["int8"] is True and sp["cpu_flags"]["isa"] == detect().isa
    assert [(r["batch"], r["threads"]) for r in sp["grid"]] == [(1, 1), (8, 1)]


def test_int4_artifact_is_named_for_what_it_holds(tmp_path: Path) -> None:
    m, cal, _, plan = setup("mlp")
    _, _, _, plan4 = setup("mlp", recipe="int4")
    art = OnnxRuntimeBackend().lower(LoweringContext(m, plan4, tmp_path, cal, {"ort_throughput": False}))
    assert art.path.name == "model_int4_weight_only.onnx" and art.path.exists()
    assert (tmp_path / "onnxruntime" / "model_int4_weight_only_optimized.onnx").exists()
    assert not list((tmp_path / "onnxruntime").glob("model_int8*"))
    _, _, _, fp16 = setup("mlp", recipe="fp16")
    assert artifact_name(fp16, "static")[0] == "model_float.onnx"
    both = plan4.with_nodes({**plan4.nodes, "fc1": plan.nodes["fc1"]}, plan4.recipe)
    assert artifact_name(both, "dynamic")[0] == "model_int8_int4w_dynamic.onnx"


def test_bad_mode(tmp_path: Path) -> None:
    m, cal, _, plan = setup("mlp")
    with pytest.raises(BadInputError, match="ort-mode"):
        OnnxRuntimeBackend().lower(LoweringContext(m, plan, tmp_path, cal, {"ort_mode": "fp16"}))


def test_static_batch_folded_into_reshape_is_detected(capfd: pytest.CaptureFixture[str]) -> None:
    x = helper.make_tensor_value_info("x", F, [1, 4, 2])
    y = helper.make_tensor_value_info("y", F, [1, 8])
    shape = numpy_helper.from_array(np.array([1, 8], np.int64), "shape")
    g = helper.make_graph([helper.make_node("Reshape", ["x", "shape"], ["y"], name="r")], "r", [x], [y], [shape])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    s = _samples(m, 4, 0)
    assert not batchable(with_dynamic_batch(m), list(s))
    assert "onnxruntime" not in capfd.readouterr().err  # the failed probe logs no error line
    assert batchable(with_dynamic_batch(mlp()), list(_samples(mlp(), 4, 0)))
    sp = measure_speed(m, m, list(s), grid=(Point(2, 1),), seconds=0.01)
    assert [r["batch"] for r in sp["grid"]] == [1] and "static" in sp["notes"][0]


def test_entry_point_registered() -> None:
    assert "onnxruntime" in discover()


def test_cli_and_api_end_to_end(tmp_path: Path) -> None:
    from deployer.cli import main

    m = mlp()
    onnx.save(m, str(tmp_path / "mlp.onnx"))
    cal = tmp_path / "calib"
    cal.mkdir()
    for i, s in enumerate(_samples(m, 20, 3)):
        np.savez(cal / f"s{i:03d}.npz", **s)
    rc = main([str(tmp_path / "mlp.onnx"), "--model", str(tmp_path / "mlp.onnx"), "--calib", str(cal),
               "--target", "onnxruntime", "--ort-mode", "dynamic", "--out", str(tmp_path / "out"), "--quiet"][1:])
    assert rc == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    t = report["targets"]["onnxruntime"]
    assert t["mode"] == "dynamic" and t["throughput_qps"]["fp32"] > 0 and t["fidelity"]["sqnr_db"]
    assert t["speed"]["ratio"] > 0 and t["latency_ms"]["fp32"] > 0 and t["kernel_flavour"]["isa"] == detect().isa


def test_recommend_cpu_is_onnxruntime_dynamic() -> None:
    r = recommend("latency", "cpu", "minilm")
    assert r.argv == ["deploy", "--model", "minilm", "--target", "onnxruntime", "--ort-mode", "dynamic"]
    assert recommend("latency", "gpu").recipe == "mixed" and recommend("cost", "edge").target == "tflite"
    assert recommend("latency", "gpu", "model.onnx").argv[:5] == ["deploy", "--model", "model.onnx", "--calib",
                                                                  "CALIB_DIR"]  # a user model needs --calib
    with pytest.raises(BadInputError):
        recommend("speed", "cpu")
