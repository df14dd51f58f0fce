"""Reduced cases of the op classes real mobile models carry (issue 17), each through the real route:
onnx2tf 2.6.9 (float ``.tflite``) -> value-verified mapping -> ai-edge-quantizer 0.10 with the plan's
ranges -> LiteRT. One multi-branch graph holds Pad (constant/reflect/edge), ReLU -> un-fused
BatchNormalization, PRelu, Split, Resize (nearest and linear), ConvTranspose, Slice, a Shape-driven
Reshape, Erf-GELU, LayerNormalization and a Conv1d, lowered once for the module; a torch Conv1d + LSTM
model, a float16 model and a conv net with symbolic H/W are lowered once each.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

pytest.importorskip("ai_edge_litert")
pytest.importorskip("ai_edge_quantizer")
pytest.importorskip("onnx2tf")

from backends.base import Artifact, LoweringContext, onnx_runner  # noqa: E402
from backends.tflite import flatbuf  # noqa: E402
from backends.tflite.backend import TFLiteBackend  # noqa: E402
from calibration.collect import collect_statistics  # noqa: E402
from calibration.dataset import CalibrationSet  # noqa: E402
from deployer.pipeline import DeployOptions, Inputs, make_plan  # noqa: E402


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))


def _lower(model: onnx.ModelProto, cal: CalibrationSet, out: Path, **options) -> Artifact:
    plan = make_plan(Inputs(model, cal, cal, "generic", "t", "t"), collect_statistics(model, cal), DeployOptions())
    return TFLiteBackend().lower(LoweringContext(model, plan, out, cal, {"tflite_latency_runs": 0, **options}))


def _per_output_cosines(model: onnx.ModelProto, art: Artifact, samples: CalibrationSet) -> list[float]:
    ref = onnx_runner(model)(samples)
    got = art.run(samples)
    return [_cos(np.stack([r[j] for r in ref]), np.stack([g[j] for g in got])) for j in range(len(ref[0]))]


def _ops(art_path: Path) -> set[str]:
    return {code for code, _ in flatbuf.ops(flatbuf.load(art_path.read_bytes()))}


# -- one graph, many op classes -------------------------------------------------------------------


def _multi_op_model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []

    def c(name: str, a) -> str:
        inits.append(numpy_helper.from_array(np.asarray(a), name))
        return name

    def w(name: str, *shape: int) -> str:
        return c(name, (rng.standard_normal(shape) / math.sqrt(np.prod(shape[1:]))).astype(np.float32))

    def n(op: str, ins: list[str], out: str | list[str], **attrs) -> str:
        outs = [out] if isinstance(out, str) else out
        nodes.append(helper.make_node(op, ins, outs, name=outs[0], **attrs))
        return outs[0]

    pads = c("pads", np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64))
    p1 = n("Pad", ["x", pads, c("pad_value", np.array(0.5, np.float32))], "pad_const", mode="constant")
    p2 = n("Pad", ["x", pads], "pad_reflect", mode="reflect")
    p3 = n("Pad", ["x", pads], "pad_edge", mode="edge")
    a = n("Add", [n("Conv", [p1, w("w1", 8, 3, 3, 3)], "conv_a"), n("Conv", [p2, w("w2", 8, 3, 3, 3)], "conv_b")],
          "sum_ab")
    a = n("Add", [a, n("Conv", [p3, w("w3", 8, 3, 3, 3), c("b3", np.full(8, 0.1, np.float32))], "conv_c")], "sum_abc")
    r = n("Relu", [a], "relu")
    bn = n("BatchNormalization", [r, c("bn_s", (1 + 0.2 * rng.standard_normal(8)).astype(np.float32)),
                                  c("bn_b", (0.1 * rng.standard_normal(8)).astype(np.float32)),
                                  c("bn_m", np.abs(rng.standard_normal(8)).astype(np.float32)),
                                  c("bn_v", (0.5 + np.abs(rng.standard_normal(8))).astype(np.float32))], "bn")
    pr = n("PRelu", [bn, c("slope", np.linspace(0.05, 0.4, 8, dtype=np.float32).reshape(8, 1, 1))], "prelu")
    s1, s2 = "split_a", "split_b"
    n("Split", [pr, c("split_sizes", np.array([4, 4], np.int64))], [s1, s2], axis=1)
    up = n("Resize", [s1, "", c("scales2", np.array([1, 1, 2, 2], np.float32))], "resize_nearest", mode="nearest")
    ct = n("ConvTranspose", [s2, w("wt", 4, 4, 2, 2), c("bt", np.zeros(4, np.float32))], "convtranspose",
           strides=[2, 2])
    m = n("Add", [up, ct], "merge")
    down = n("Resize", [m, "", c("scales_half", np.array([1, 1, 0.5, 0.5], np.float32))], "resize_linear",
             mode="linear", coordinate_transformation_mode="half_pixel")
    sl = n("Slice", [down, c("st", np.array([1], np.int64)), c("en", np.array([15], np.int64)),
                     c("ax", np.array([2], np.int64))], "slice")
    head = n("Gather", [n("Shape", [sl], "shape"), c("first2", np.array([0, 1], np.int64))], "shape_head")
    target = n("Concat", [head, c("minus1", np.array([-1], np.int64))], "target_shape", axis=0)
    t = n("Reshape", [sl, target], "reshape")  # [1, 4, 224]
    e = n("Erf", [n("Div", [t, c("sqrt2", np.array(math.sqrt(2), np.float32))], "gelu_div")], "gelu_erf")
    g = n("Mul", [n("Mul", [t, n("Add", [e, c("one", np.array(1.0, np.float32))], "gelu_add")], "gelu_mul"),
                  c("half", np.array(0.5, np.float32))], "gelu")
    ln = n("LayerNormalization", [g, c("ln_g", (1 + 0.1 * rng.standard_normal(224)).astype(np.float32)),
                                  c("ln_b", (0.1 * rng.standard_normal(224)).astype(np.float32))], "y1", axis=-1)
    n("Conv", [ln, w("w1d", 6, 4, 3), c("b1d", np.zeros(6, np.float32))], "y2", pads=[1, 1])
    graph = helper.make_graph(nodes, "multi", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
                              [helper.make_tensor_value_info("y1", TensorProto.FLOAT, [1, 4, 224]),
                               helper.make_tensor_value_info("y2", TensorProto.FLOAT, [1, 6, 224])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def _images(n: int, seed: int, shape=(1, 3, 16, 16)) -> CalibrationSet:
    rng = np.random.default_rng(seed)
    return CalibrationSet([{"x": rng.uniform(-1, 1, shape).astype(np.float32)} for _ in range(n)])


@pytest.fixture(scope="module")
def multi(tmp_path_factory) -> tuple[onnx.ModelProto, Artifact]:
    model = _multi_op_model()
    return model, _lower(model, _images(24, 0), tmp_path_factory.mktemp("multi"))


def test_multi_op_graph_converts_with_each_op_class(multi) -> None:
    model, art = multi
    ops = _ops(art.fp32_path)
    assert {"PADV2", "MIRROR_PAD", "RESIZE_NEAREST_NEIGHBOR", "RESIZE_BILINEAR", "TRANSPOSE_CONV"} <= ops, ops
    held = _images(6, 5)
    ref = onnx_runner(model)(held)
    for r, g in zip(ref, art.fp32_run(held)):  # the float conversion is exact
        for a, b in zip(r, g):
            np.testing.assert_allclose(b, a, atol=2e-4, rtol=1e-3)


def test_multi_op_graph_int8_is_close_and_says_what_stays_float(multi) -> None:
    model, art = multi
    cos = _per_output_cosines(model, art, _images(12, 7))
    assert min(cos) > 0.99, cos
    ops = _ops(art.path)
    assert {"CONV_2D", "TRANSPOSE_CONV"} <= ops
    floats = {f["op"] for f in art.extra["float_nodes"]}
    assert not floats & {"CONV_2D", "TRANSPOSE_CONV", "RESIZE_NEAREST_NEIGHBOR", "RESIZE_BILINEAR", "MIRROR_PAD"}
    assert all(f["reason"] and f["node"] for f in art.extra["float_nodes"])
    assert art.extra["float_ops"] and len(art.extra["float_ops"]) == len(art.extra["float_nodes"])
    # the report's mapping was verified by value: the Conv output before ReLU is not given the fused
    # Conv+ReLU tensor's range (onnx2tf's correspondence report maps them to one tensor)
    assert art.extra["tensors_from_plan"] >= 15


# -- Conv1d + LSTM (torch export): numerics right, LSTM a reported float island -------------------


@pytest.fixture(scope="module")
def lstm(tmp_path_factory):
    torch = pytest.importorskip("torch")
    from deployer.model_io import canonicalize, export_torch

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv1d(8, 16, 3, padding=1)
            self.lstm = torch.nn.LSTM(16, 24, batch_first=True)
            self.fc = torch.nn.Linear(24, 5)

        def forward(self, x):
            h = torch.relu(self.conv(x)).transpose(1, 2)
            y, _ = self.lstm(h)
            return self.fc(y[:, -1])

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    cal = CalibrationSet([{"x": rng.standard_normal((1, 8, 12)).astype(np.float32)} for _ in range(24)])
    model = canonicalize(export_torch(Net().eval(), {"x": cal[0]["x"]}))
    return model, _lower(model, cal, tmp_path_factory.mktemp("lstm"))


def test_lstm_numerics_right_and_float_island_reported(lstm) -> None:
    model, art = lstm
    assert "LSTM" in {n.op_type for n in model.graph.node}
    rng = np.random.default_rng(3)
    held = CalibrationSet([{"x": rng.standard_normal((1, 8, 12)).astype(np.float32)} for _ in range(12)])
    # per sample: a stale LSTM state (XNNPACK's variable tensor read from the previous invoke) would
    # make every sample after the first wrong
    ref, got = onnx_runner(model)(held), art.run(held)
    cos = [_cos(r[0], g[0]) for r, g in zip(ref, got)]
    assert min(cos) > 0.98, cos
    fp32 = art.fp32_run(held)
    for r, g in zip(ref, fp32):
        np.testing.assert_allclose(g[0], r[0], atol=1e-4, rtol=1e-3)
    lstm_ops = [f for f in art.extra["float_nodes"] if "LSTM" in f["op"]]
    integer = "UNIDIRECTIONAL_SEQUENCE_LSTM" in _ops(art.path) and not lstm_ops
    assert lstm_ops or integer, art.extra["float_nodes"]
    assert "CONV_2D" in _ops(art.path) or "CONV_1D" in _ops(art.path)


# -- float16 model -----------------------------------------------------------------------------------


def test_float16_model_is_up_cast_and_converts(tmp_path) -> None:
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float16), "w"),
             numpy_helper.from_array(np.full(8, 0.1, np.float16), "b"),
             numpy_helper.from_array(rng.normal(0, 0.3, (8, 4)).astype(np.float16), "fc")]
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("GlobalAveragePool", ["r"], ["p"], name="gap"),
             helper.make_node("Flatten", ["p"], ["f"], name="flat"),
             helper.make_node("MatMul", ["f", "fc"], ["y"], name="fc")]
    g = helper.make_graph(nodes, "fp16", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [1, 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [1, 4])], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    cal = CalibrationSet([{"x": rng.uniform(-1, 1, (1, 3, 8, 8)).astype(np.float16)} for _ in range(16)])
    art = _lower(model, cal, tmp_path)
    assert any("up-cast" in n for n in art.notes)
    assert art.extra["io"]["inputs"][0]["dtype"] == "int8"
    ref = onnx_runner(model)(cal)
    assert _cos(np.stack([r[0] for r in ref]), np.stack([g[0] for g in art.run(cal)])) > 0.99


# -- symbolic H/W ---------------------------------------------------------------------------------


def test_symbolic_height_width_runs_every_calibration_size(tmp_path) -> None:
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.normal(0, 0.3, (4, 8)).astype(np.float32), "fc"),
             numpy_helper.from_array(np.zeros(4, np.float32), "fcb")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], strides=[2, 2], name="conv"),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("GlobalAveragePool", ["r"], ["p"], name="gap"),
             helper.make_node("Flatten", ["p"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "fc", "fcb"], ["y"], name="fc", transB=1)]
    g = helper.make_graph(nodes, "dyn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, "H", "W"])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    cal = CalibrationSet([{"x": rng.uniform(-1, 1, (1, 3, s, s)).astype(np.float32)} for s in (12, 16, 20) * 6])
    art = _lower(model, cal, tmp_path)
    assert art.extra["input_shapes"]["mode"] in ("dynamic", "fixed")
    if art.extra["input_shapes"]["mode"] == "fixed":  # the report says where the shapes came from
        assert art.extra["input_shapes"]["source"]
        held = [s for s in cal if s["x"].shape == tuple(art.extra["input_shapes"]["shapes"]["x"])]
    else:
        held = list(cal)
    ref = onnx_runner(model)(held)
    got = art.run(held)
    assert _cos(np.stack([r[0] for r in ref]), np.stack([g[0] for g in got])) > 0.99
