"""Q/DQ lowering for TensorRT (strongly typed) and Ascend, on tiny ONNX models built here.

Each test asserts on op counts and positions (DESIGN.md section 3 rules) and on numerical closeness to
the FP32 reference run in ONNX Runtime with graph optimizations off (exact Q/DQ arithmetic).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from backends.ascend.backend import ASCEND_OPSET, AscendBackend, atc_argv
from backends.ascend.backend import POLICY as ASCEND
from backends.base import LoweringContext, onnx_runner
from backends.tensorrt.backend import POLICY as TRT
from backends.tensorrt.backend import TensorRTBackend
from calibration.collect import collect_statistics
from calibration.dataset import CalibrationSet
from deployer.errors import BadInputError
from deployer.plan import NodeDecision, Precision, QuantPlan, TensorRange
from deployer.pipeline import DeployOptions, Inputs, make_plan
from deployer.qdq import lower_qdq

# -- tiny models -----------------------------------------------------------------------------------

F = TensorProto.FLOAT


def _w(seed: int, shape: tuple[int, ...], fan_in: int) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)


def _b(seed: int, n: int) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(n) * 0.1).astype(np.float32)


def _model(name, nodes, inputs, outputs, inits, opset=13) -> onnx.ModelProto:
    g = helper.make_graph(
        nodes, name,
        [helper.make_tensor_value_info(n, F, s) for n, s in inputs],
        [helper.make_tensor_value_info(n, F, s) for n, s in outputs],
        [numpy_helper.from_array(a, n) for n, a in inits.items()],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    onnx.checker.check_model(m, full_check=True)
    return m


def conv_relu(opset: int = 13) -> onnx.ModelProto:
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["y"], name="relu2"),
    ]
    inits = {"w1": _w(1, (8, 3, 3, 3), 27), "b1": _b(2, 8), "w2": _w(3, (8, 8, 3, 3), 72), "b2": _b(4, 8)}
    return _model("conv_relu", nodes, [("x", [1, 3, 8, 8])], [("y", [1, 8, 8, 8])], inits, opset)


def residual(skip_first: bool = False) -> onnx.ModelProto:
    add_in = ["h", "c2"] if skip_first else ["c2", "h"]
    nodes = [
        helper.make_node("Conv", ["x", "w0", "b0"], ["c0"], name="conv0", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c0"], ["h"], name="relu0"),
        helper.make_node("Conv", ["h", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Add", add_in, ["s"], name="add"),
        helper.make_node("Relu", ["s"], ["y"], name="relu_out"),
    ]
    inits = {"w0": _w(5, (8, 3, 3, 3), 27), "b0": _b(6, 8), "w1": _w(7, (8, 8, 3, 3), 72), "b1": _b(8, 8),
             "w2": _w(9, (8, 8, 3, 3), 72), "b2": _b(10, 8)}
    return _model("residual", nodes, [("x", [1, 3, 8, 8])], [("y", [1, 8, 8, 8])], inits)


def depthwise() -> onnx.ModelProto:
    nodes = [
        helper.make_node("Conv", ["x", "wd", "bd"], ["d"], name="dw", pads=[1, 1, 1, 1], group=4),
        helper.make_node("Relu", ["d"], ["y"], name="relu"),
    ]
    return _model("depthwise", nodes, [("x", [1, 4, 8, 8])], [("y", [1, 4, 8, 8])],
                  {"wd": _w(11, (4, 1, 3, 3), 9), "bd": _b(12, 4)})


def gemm(trans_a: bool = False) -> onnx.ModelProto:
    x_shape = [16, 2] if trans_a else [2, 16]
    nodes = [
        helper.make_node("Gemm", ["x", "wg1", "bg1"], ["g1"], name="gemm_tb", transB=1, transA=int(trans_a)),
        helper.make_node("Relu", ["g1"], ["r"], name="relu"),
        helper.make_node("Gemm", ["r", "wg2", "bg2"], ["y"], name="gemm_nt"),
    ]
    inits = {"wg1": _w(13, (8, 16), 16), "bg1": _b(14, 8), "wg2": _w(15, (8, 4), 8), "bg2": _b(16, 4)}
    return _model("gemm", nodes, [("x", x_shape)], [("y", [2, 4])], inits)


def matmul() -> onnx.ModelProto:
    nodes = [
        helper.make_node("MatMul", ["x", "wm"], ["m"], name="mm"),
        helper.make_node("Relu", ["m"], ["y"], name="relu"),
    ]
    return _model("matmul", nodes, [("x", [2, 4, 16])], [("y", [2, 4, 8])], {"wm": _w(17, (16, 8), 16)})


def matmul_3d_weight() -> onnx.ModelProto:
    nodes = [helper.make_node("MatMul", ["x", "wm3"], ["y"], name="bmm")]
    return _model("matmul3d", nodes, [("x", [2, 4, 16])], [("y", [2, 4, 8])], {"wm3": _w(18, (2, 16, 8), 16)})


def attention() -> onnx.ModelProto:
    nodes = [
        helper.make_node("MatMul", ["x", "wq"], ["q"], name="q_proj"),
        helper.make_node("MatMul", ["x", "wk"], ["k"], name="k_proj"),
        helper.make_node("MatMul", ["x", "wv"], ["v"], name="v_proj"),
        helper.make_node("Transpose", ["k"], ["kt"], name="k_t", perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q", "kt"], ["scores"], name="qk"),
        helper.make_node("Softmax", ["scores"], ["p"], name="softmax", axis=-1),
        helper.make_node("MatMul", ["p", "v"], ["o"], name="pv"),
        helper.make_node("MatMul", ["o", "wo"], ["y"], name="o_proj"),
    ]
    inits = {"wq": _w(19, (8, 8), 8), "wk": _w(20, (8, 8), 8), "wv": _w(21, (8, 8), 8), "wo": _w(22, (8, 8), 8)}
    return _model("attention", nodes, [("x", [1, 6, 8])], [("y", [1, 6, 8])], inits)


def avgpool() -> onnx.ModelProto:
    nodes = [
        helper.make_node("Conv", ["x", "wa", "ba"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("AveragePool", ["c"], ["a"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Sigmoid", ["a"], ["sg"], name="sigmoid"),
        helper.make_node("Conv", ["sg", "wb", "bb"], ["y"], name="conv_1x1"),
    ]
    inits = {"wa": _w(23, (6, 3, 3, 3), 27), "ba": _b(24, 6), "wb": _w(25, (4, 6, 1, 1), 6), "bb": _b(26, 4)}
    return _model("avgpool", nodes, [("x", [1, 3, 8, 8])], [("y", [1, 4, 4, 4])], inits)


def conv_transpose() -> onnx.ModelProto:
    nodes = [
        helper.make_node("ConvTranspose", ["x", "wt", "bt"], ["ct"], name="deconv", strides=[2, 2],
                         pads=[1, 1, 1, 1], output_padding=[1, 1]),
        helper.make_node("Relu", ["ct"], ["y"], name="relu"),
    ]
    return _model("convtranspose", nodes, [("x", [1, 4, 4, 4])], [("y", [1, 6, 8, 8])],
                  {"wt": _w(27, (4, 6, 3, 3), 36), "bt": _b(28, 6)})


MODELS = {
    "conv_relu": conv_relu,
    "residual": residual,
    "depthwise": depthwise,
    "gemm": gemm,
    "matmul": matmul,
    "attention": attention,
    "avgpool": avgpool,
    "convtranspose": conv_transpose,
}


# -- plans -----------------------------------------------------------------------------------------


def samples(model: onnx.ModelProto, n: int, seed: int) -> CalibrationSet:
    rng = np.random.default_rng(seed)
    specs = [(i.name, [d.dim_value for d in i.type.tensor_type.shape.dim]) for i in model.graph.input]
    return CalibrationSet([{k: rng.standard_normal(s).astype(np.float32) for k, s in specs} for _ in range(n)])


@dataclass
class Case:
    model: onnx.ModelProto
    calib: CalibrationSet
    heldout: CalibrationSet

    def plan(self, recipe: str = "int8", observer: str = "minmax") -> QuantPlan:
        inputs = Inputs(self.model, self.calib, self.heldout, "generic", "test", "test")
        stats = collect_statistics(self.model, self.calib)
        return make_plan(inputs, stats, DeployOptions(recipe=recipe, observer=observer))


@lru_cache(maxsize=None)
def case(name: str) -> Case:
    m = MODELS[name]()
    return Case(m, samples(m, 32, 0), samples(m, 8, 1))


@lru_cache(maxsize=None)
def plan_of(name: str, recipe: str = "int8") -> QuantPlan:
    return case(name).plan(recipe)


def trt_lower(name: str, recipe: str = "int8"):
    return lower_qdq(case(name).model, plan_of(name, recipe), TRT)


# -- graph helpers ---------------------------------------------------------------------------------


def ops(m: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in m.graph.node]


def count(m: onnx.ModelProto, op: str) -> int:
    return ops(m).count(op)


def inits(m: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}


def producer(m: onnx.ModelProto, tensor: str) -> onnx.NodeProto | None:
    return next((n for n in m.graph.node if tensor in n.output), None)


def consumers(m: onnx.ModelProto, tensor: str) -> list[onnx.NodeProto]:
    return [n for n in m.graph.node if tensor in n.input]


def node(m: onnx.ModelProto, name: str) -> onnx.NodeProto:
    return next(n for n in m.graph.node if n.name == name)


def attr(n: onnx.NodeProto, name: str, default=None):
    a = next((a for a in n.attribute if a.name == name), None)
    return default if a is None else helper.get_attribute_value(a)


def from_dq(m: onnx.ModelProto, tensor: str) -> bool:
    p = producer(m, tensor)
    return p is not None and p.op_type == "DequantizeLinear"


def weight_dq(m: onnx.ModelProto, n: onnx.NodeProto) -> onnx.NodeProto:
    """The DequantizeLinear feeding a node's weight input (input 1)."""
    p = producer(m, n.input[1])
    assert p is not None and p.op_type == "DequantizeLinear", f"{n.name}: weight is not dequantized"
    return p


def elem_types(m: onnx.ModelProto) -> dict[str, int]:
    inf = onnx.shape_inference.infer_shapes(m)
    vis = list(inf.graph.value_info) + list(inf.graph.input) + list(inf.graph.output)
    return {v.name: v.type.tensor_type.elem_type for v in vis}


def cosine(a: list[list[np.ndarray]], b: list[list[np.ndarray]]) -> float:
    x = np.concatenate([np.ravel(o) for row in a for o in row]).astype(np.float64)
    y = np.concatenate([np.ravel(o) for row in b for o in row]).astype(np.float64)
    return float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y)))


def sqnr_db(ref: list[list[np.ndarray]], got: list[list[np.ndarray]]) -> float:
    x = np.concatenate([np.ravel(o) for row in ref for o in row]).astype(np.float64)
    y = np.concatenate([np.ravel(o) for row in got for o in row]).astype(np.float64)
    return float(10 * np.log10(np.sum(x**2) / max(np.sum((x - y) ** 2), 1e-30)))


def assert_close_to_fp32(name: str, lowered: onnx.ModelProto, min_cos: float = 0.99) -> None:
    c = case(name)
    ref = onnx_runner(c.model, optimize=False)(c.heldout)
    got = onnx_runner(lowered, optimize=False)(c.heldout)
    cos, sqnr = cosine(ref, got), sqnr_db(ref, got)
    assert cos > min_cos or sqnr > 20, f"{name}: cosine {cos:.4f}, SQNR {sqnr:.1f} dB"


# -- TensorRT ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(MODELS))
def test_trt_parser_rules(name):
    m, rec = trt_lower(name)
    onnx.checker.check_model(m, full_check=True)
    opset = next(i.version for i in m.opset_import if i.domain in ("", "ai.onnx"))
    assert opset >= 13
    assert not any(n.op_type.startswith("QLinear") or n.op_type.endswith("Integer") for n in m.graph.node)
    iv = inits(m)
    qdq = [n for n in m.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert qdq, "nothing was quantized"
    for n in qdq:
        scale, zp = iv[n.input[1]], iv[n.input[2]]
        assert zp.dtype == np.int8 and np.all(zp == 0), f"{n.name}: zero point must be 0"
        assert np.all(scale > 0) and np.all(np.isfinite(scale)), f"{n.name}: bad scale {scale}"
        assert scale.dtype == np.float32
    # activations are per-tensor: every QuantizeLinear quantizes an activation with a scalar scale
    for n in m.graph.node:
        if n.op_type == "QuantizeLinear":
            assert n.input[0] not in iv
            assert iv[n.input[1]].ndim == 0 and attr(n, "axis") is None
    # weights: int8 initializer + DequantizeLinear (no float weight left behind)
    for n in m.graph.node:
        if n.op_type == "DequantizeLinear" and n.input[0] in iv:
            assert iv[n.input[0]].dtype == np.int8
            assert np.abs(iv[n.input[0]].astype(np.int32)).max() <= 127
    # one Q/DQ pair per quantized tensor
    q_inputs = [n.input[0] for n in m.graph.node if n.op_type == "QuantizeLinear"]
    assert len(q_inputs) == len(set(q_inputs)) == len(rec.activations)
    # graph I/O untouched
    assert [i.name for i in m.graph.input] == [i.name for i in case(name).model.graph.input]
    assert [o.name for o in m.graph.output] == [o.name for o in case(name).model.graph.output]


@pytest.mark.parametrize("name", sorted(set(MODELS) - {"attention", "matmul"}))
def test_trt_no_qdq_on_conv_gemm_outputs(name):
    m, _ = trt_lower(name)
    for n in m.graph.node:
        if n.op_type in ("Conv", "ConvTranspose", "Gemm"):
            for o in n.output:
                assert all(c.op_type != "QuantizeLinear" for c in consumers(m, o)), f"{n.name} output quantized"


@pytest.mark.parametrize("name", sorted(MODELS))
def test_trt_numerics_close_to_fp32(name):
    m, _ = trt_lower(name)
    assert_close_to_fp32(name, m)


def test_trt_backend_artifact_runs(tmp_path):
    c = case("residual")
    art = TensorRTBackend().lower(LoweringContext(c.model, plan_of("residual"), tmp_path, c.calib))
    assert art.path.exists() and art.path.parent == tmp_path / "tensorrt"
    assert (tmp_path / "tensorrt" / "build_engine.sh").read_text().count("--stronglyTyped") == 1
    ref = onnx_runner(c.model, optimize=False)(c.heldout)
    assert cosine(ref, art.run(c.heldout)) > 0.99
    assert art.extra["quantized_weights"] == 3


def test_trt_conv_weights_per_channel_axis0():
    m, rec = trt_lower("conv_relu")
    iv = inits(m)
    for name, cout in (("conv1", 8), ("conv2", 8)):
        n = node(m, name)
        dq = weight_dq(m, n)
        assert attr(dq, "axis") == 0
        assert iv[dq.input[1]].shape == (cout,)
        assert iv[dq.input[0]].dtype == np.int8
        assert from_dq(m, n.input[0]), f"{name}: activation input not quantized"
        assert rec.weights[name]["axis"] == 0
    # Q/DQ on the Relu output feeding conv2, not on either Conv output
    assert from_dq(m, node(m, "conv2").input[0])
    assert producer(m, producer(m, node(m, "conv2").input[0]).input[0]).op_type == "QuantizeLinear"
    assert [c.op_type for c in consumers(m, "c1")] == ["Relu"]
    assert [c.op_type for c in consumers(m, "c2")] == ["Relu"]
    # counts: 2 activations (x, r1) x (Q + DQ), 2 weight DQs
    assert count(m, "QuantizeLinear") == 2 and count(m, "DequantizeLinear") == 4
    assert count(m, "Conv") == 2 and count(m, "Relu") == 2
    # the fp32 weights were replaced, not kept beside the int8 copy
    assert "w1" not in iv and "w2" not in iv


def test_trt_depthwise_per_channel():
    m, _ = trt_lower("depthwise")
    dq = weight_dq(m, node(m, "dw"))
    assert attr(dq, "axis") == 0 and inits(m)[dq.input[1]].shape == (4,)
    assert attr(node(m, "dw"), "group") == 4


def test_trt_conv_transpose_axis1():
    m, rec = trt_lower("convtranspose")
    dq = weight_dq(m, node(m, "deconv"))
    assert attr(dq, "axis") == 1
    assert inits(m)[dq.input[1]].shape == (6,)  # one scale per output channel (weight dim 1)
    assert rec.weights["deconv"]["axis"] == 1


def test_trt_gemm_transb1_axis0_and_transb0_per_tensor():
    m, _ = trt_lower("gemm")
    iv = inits(m)
    dq = weight_dq(m, node(m, "gemm_tb"))
    assert attr(dq, "axis") == 0 and iv[dq.input[1]].shape == (8,)
    dq2 = weight_dq(m, node(m, "gemm_nt"))
    assert attr(dq2, "axis") is None and iv[dq2.input[1]].ndim == 0
    assert from_dq(m, node(m, "gemm_tb").input[0]) and from_dq(m, node(m, "gemm_nt").input[0])
    # bias stays float
    assert iv[node(m, "gemm_tb").input[2]].dtype == np.float32


def test_trt_matmul_constant_weight():
    m, _ = trt_lower("matmul")
    dq = weight_dq(m, node(m, "mm"))
    assert attr(dq, "axis") == 1 and inits(m)[dq.input[1]].shape == (8,)
    assert from_dq(m, "x") is False and from_dq(m, node(m, "mm").input[0])


def test_trt_attention_matmul_both_inputs_quantized():
    m, _ = trt_lower("attention")
    for name in ("qk", "pv"):
        n = node(m, name)
        assert from_dq(m, n.input[0]) and from_dq(m, n.input[1]), f"{name}: both activations need Q/DQ"
    assert not from_dq(m, node(m, "softmax").input[0])
    assert not from_dq(m, node(m, "k_t").input[0])  # transpose commutes with Q/DQ: quantize after it


@pytest.mark.parametrize("skip_first", [False, True])
def test_trt_residual_add_skip_branch_only(skip_first):
    model = residual(skip_first)
    c = Case(model, samples(model, 16, 0), samples(model, 4, 1))
    m, rec = lower_qdq(model, c.plan(), TRT)
    add = node(m, "add")
    conv_in, skip_in = (1, 0) if skip_first else (0, 1)
    assert not from_dq(m, add.input[conv_in]), "the Conv branch of the Add must stay unquantized (Conv+Add fusion)"
    assert add.input[conv_in] == "c2"
    assert from_dq(m, add.input[skip_in])
    # the skip tensor h shares the Q/DQ pair that also feeds conv1
    assert add.input[skip_in] == node(m, "conv1").input[0]
    assert sorted(rec.activations["h"]["consumers"]) == ["add", "conv1"]
    assert count(m, "QuantizeLinear") == 3  # x, h, r1
    assert count(m, "DequantizeLinear") == 6  # 3 activations + 3 weights
    assert not any(c.op_type == "QuantizeLinear" for c in consumers(m, "s"))


def test_trt_fp16_recipe():
    m, rec = trt_lower("conv_relu", "fp16")
    onnx.checker.check_model(m, full_check=True)
    assert count(m, "QuantizeLinear") == count(m, "DequantizeLinear") == 0
    assert rec.fp16_nodes == ["conv1", "conv2", "relu1", "relu2"]
    assert m.graph.input[0].type.tensor_type.elem_type == F
    assert m.graph.output[0].type.tensor_type.elem_type == F
    casts = [n for n in m.graph.node if n.op_type == "Cast"]
    assert sorted(attr(n, "to") for n in casts) == [TensorProto.FLOAT, TensorProto.FLOAT16]
    assert casts[0].input[0] == "x" and casts[-1].output[0] == "y"
    types = elem_types(m)
    for n in m.graph.node:
        if n.op_type in ("Conv", "Relu"):
            assert types[n.output[0]] == TensorProto.FLOAT16, n.name
    for n in ("conv1", "conv2"):
        for i in node(m, n).input[1:]:
            assert inits(m)[i].dtype == np.float16
    assert_close_to_fp32("conv_relu", m, min_cos=0.999)


def test_trt_mixed_recipe_attention_in_fp16():
    plan = plan_of("attention", "mixed")
    assert {k for k, d in plan.nodes.items() if d.precision == Precision.FP16} == {"qk", "softmax", "pv"}
    m, rec = trt_lower("attention", "mixed")
    onnx.checker.check_model(m, full_check=True)
    assert rec.fp16_nodes == ["pv", "qk", "softmax"]
    types = elem_types(m)
    for n in ("qk", "softmax", "pv"):
        assert types[node(m, n).output[0]] == TensorProto.FLOAT16
        for i in node(m, n).input:
            assert types[i] == TensorProto.FLOAT16, f"{n} input {i} is not fp16"
    # int8 projections keep their Q/DQ; their fp32 outputs are cast into the fp16 island
    for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
        assert producer(m, node(m, n).input[1]).op_type == "DequantizeLinear"
        assert types[node(m, n).output[0]] == F
    assert count(m, "Cast") >= 3
    assert elem_types(m)["y"] == F and m.graph.input[0].type.tensor_type.elem_type == F
    # the int8 o_proj reads the fp16 island through a Cast back to fp32, then Q/DQ
    q = producer(m, producer(m, node(m, "o_proj").input[0]).input[0])
    assert q.op_type == "QuantizeLinear" and producer(m, q.input[0]).op_type == "Cast"
    assert_close_to_fp32("attention", m)


def test_opset_upgrade_keeps_semantics():
    nodes = [helper.make_node("Softmax", ["x"], ["y"], name="sm", axis=1)]
    model = _model("sm11", nodes, [("x", [2, 3, 4])], [("y", [2, 3, 4])], {}, opset=11)
    plan = QuantPlan({}, {}, {}, {"sm": NodeDecision("Softmax", Precision.INT8)},
                     {"x": TensorRange(-3.0, 3.0), "y": TensorRange(0.0, 1.0)})
    m, _ = lower_qdq(model, plan, TRT)
    x = [{"x": np.random.default_rng(0).standard_normal((2, 3, 4)).astype(np.float32)}]
    ref = onnx_runner(model, optimize=False)(x)[0][0]
    got = onnx_runner(m, optimize=False)(x)[0][0]
    np.testing.assert_allclose(got, ref, atol=1e-6)


def test_trt_fp16_keeps_float32_only_inputs():
    nodes = [
        helper.make_node("Conv", ["x", "wr"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Resize", ["c", "", "scales"], ["y"], name="upsample", mode="nearest"),
    ]
    model = _model("resize", nodes, [("x", [1, 3, 4, 4])], [("y", [1, 4, 8, 8])],
                   {"wr": _w(31, (4, 3, 3, 3), 27), "scales": np.array([1, 1, 2, 2], np.float32)})
    c = Case(model, samples(model, 4, 0), samples(model, 2, 1))
    m, _ = lower_qdq(model, c.plan("fp16"), TRT)
    onnx.checker.check_model(m, full_check=True)
    assert inits(m)[node(m, "upsample").input[2]].dtype == np.float32
    assert_close_to_fp32_case(c, m, min_cos=0.999)


def assert_close_to_fp32_case(c: Case, lowered: onnx.ModelProto, min_cos: float = 0.99) -> None:
    ref = onnx_runner(c.model, optimize=False)(c.heldout)
    got = onnx_runner(lowered, optimize=False)(c.heldout)
    assert cosine(ref, got) > min_cos


def test_trt_skips_gemv_matmul():
    nodes = [helper.make_node("MatMul", ["x", "wv"], ["y"], name="gemv")]
    model = _model("gemv", nodes, [("x", [2, 16])], [("y", [2, 1])], {"wv": _w(30, (16, 1), 16)})
    c = Case(model, samples(model, 8, 0), samples(model, 2, 1))
    m, rec = lower_qdq(model, c.plan(), TRT)
    assert count(m, "DequantizeLinear") == 0
    assert rec.skipped and rec.skipped[0]["node"] == "gemv"


def test_activation_without_range_is_skipped_and_recorded():
    plan = plan_of("conv_relu")
    ranges = {k: v for k, v in plan.ranges.items() if k != "r1"}
    m, rec = lower_qdq(case("conv_relu").model, plan.with_ranges(ranges), TRT)
    assert not from_dq(m, node(m, "conv2").input[0])
    assert {"node": "conv2", "tensor": "r1", "reason": "no calibrated range in the plan"} in rec.skipped


def test_shared_scales_use_union_range():
    plan = plan_of("conv_relu")
    shared = QuantPlan(plan.model, plan.calibration, plan.recipe, plan.nodes,
                       dict(plan.ranges, x=TensorRange(-1.0, 1.0), r1=TensorRange(0.0, 5.0)), [["x", "r1"]])
    m, rec = lower_qdq(case("conv_relu").model, shared, TRT)
    assert rec.activations["x"]["scale"] == rec.activations["r1"]["scale"] == pytest.approx(5.0 / 127)


def test_fp32_nodes_untouched():
    plan = plan_of("conv_relu")
    nodes = {k: NodeDecision(d.op_type, Precision.FP32) for k, d in plan.nodes.items()}
    m, rec = lower_qdq(case("conv_relu").model, plan.with_nodes(nodes), TRT)
    assert ops(m) == ops(case("conv_relu").model)
    assert not rec.activations and not rec.weights


# -- Ascend -----------------------------------------------------------------------------------------


@lru_cache(maxsize=None)
def _ascend_dir(name: str, recipe: str, tmp_root: str):
    c = case(name)
    out = Path(tmp_root) / f"{name}-{recipe}"
    art = AscendBackend().lower(LoweringContext(c.model, plan_of(name, recipe), out, c.calib))
    return art, onnx.load(str(art.path))


@pytest.fixture(scope="module")
def ascend_root(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("ascend"))


@pytest.fixture
def ascend(ascend_root):
    def lower(name: str, recipe: str = "int8"):
        return _ascend_dir(name, recipe, ascend_root)

    return lower


@pytest.mark.parametrize("name", sorted(MODELS))
def test_ascend_graph_legality(ascend, name):
    art, m = ascend(name)
    onnx.checker.check_model(m, full_check=True)
    assert len(m.opset_import) == 1
    assert m.opset_import[0].domain in ("", "ai.onnx") and m.opset_import[0].version == ASCEND_OPSET
    assert all(n.domain in ("", "ai.onnx") for n in m.graph.node)
    assert all(i.type.tensor_type.elem_type == F for i in m.graph.input)
    iv = inits(m)
    nodes = list(m.graph.node)
    for i, n in enumerate(nodes):
        if n.op_type == "QuantizeLinear":
            nxt = nodes[i + 1]
            assert nxt.op_type == "DequantizeLinear" and nxt.input[0] == n.output[0], f"{n.name} not followed by DQ"
            assert list(nxt.input[1:]) == list(n.input[1:]), f"{n.name}: Q and DQ must share scale/zero point"
            assert attr(nxt, "axis") == attr(n, "axis")
            assert len(consumers(m, n.output[0])) == 1
            scale = iv[n.input[1]]
            assert np.all(scale > 0) and np.all(np.isfinite(scale))
            assert iv[n.input[2]].dtype == np.int8
        if n.op_type == "DequantizeLinear":
            assert nodes[i - 1].op_type == "QuantizeLinear", f"{n.name}: a DQ without its Q (Ascend needs tied pairs)"
    # weights: symmetric (offset 0); per-channel only on Conv/ConvTranspose; activations per-tensor
    for n in nodes:
        if n.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
            continue
        p = producer(m, n.input[1])
        if p is None or p.op_type != "DequantizeLinear":
            continue
        q = producer(m, p.input[0])
        assert q.input[0] in iv, f"{n.name}: weight Q must quantize the float weight initializer"
        assert np.all(iv[q.input[2]] == 0)
        if n.op_type in ("Conv", "ConvTranspose"):
            assert attr(p, "axis") == (0 if n.op_type == "Conv" else 1)
            assert iv[p.input[1]].ndim == 1
        else:
            assert attr(p, "axis") is None and iv[p.input[1]].ndim == 0, f"{n.name}: Ascend needs per-tensor"
    weight_inputs = {producer(m, n.input[1]).output[0] for n in nodes
                     if n.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul") and from_dq(m, n.input[1])}
    for n in nodes:
        if n.op_type == "DequantizeLinear" and n.output[0] not in weight_inputs:
            assert iv[n.input[1]].ndim == 0 and attr(n, "axis") is None


@pytest.mark.parametrize("name", sorted(MODELS))
def test_ascend_numerics_close_to_fp32(ascend, name):
    _, m = ascend(name)
    assert_close_to_fp32(name, m)


def test_ascend_conv_and_convtranspose_per_channel(ascend):
    _, m = ascend("conv_relu")
    for n in ("conv1", "conv2"):
        dq = weight_dq(m, node(m, n))
        assert attr(dq, "axis") == 0 and inits(m)[dq.input[1]].shape == (8,)
        assert from_dq(m, node(m, n).input[0])
    _, m = ascend("convtranspose")
    dq = weight_dq(m, node(m, "deconv"))
    assert attr(dq, "axis") == 1 and inits(m)[dq.input[1]].shape == (6,)


def test_ascend_gemm_and_matmul_per_tensor(ascend):
    _, m = ascend("gemm")
    for n in ("gemm_tb", "gemm_nt"):
        dq = weight_dq(m, node(m, n))
        assert attr(dq, "axis") is None and inits(m)[dq.input[1]].ndim == 0
    _, m = ascend("matmul")
    dq = weight_dq(m, node(m, "mm"))
    assert attr(dq, "axis") is None and inits(m)[dq.input[1]].ndim == 0


def test_ascend_avgpool_quantized_sigmoid_not(ascend):
    _, m = ascend("avgpool")
    assert from_dq(m, node(m, "pool").input[0])
    assert not from_dq(m, node(m, "sigmoid").input[0])
    assert from_dq(m, node(m, "conv_1x1").input[0])
    # activations asymmetric: the Sigmoid output in [0, 1] gets a non-zero offset
    q = producer(m, producer(m, node(m, "conv_1x1").input[0]).input[0])
    assert int(inits(m)[q.input[2]]) != 0


def test_ascend_add_both_inputs_quantized(ascend):
    _, m = ascend("residual")
    add = node(m, "add")
    assert from_dq(m, add.input[0]) and from_dq(m, add.input[1])


def test_ascend_attention_activation_matmul_and_softmax_not_quantized(ascend):
    _, m = ascend("attention")
    for n in ("qk", "pv"):
        assert not from_dq(m, node(m, n).input[0]) and not from_dq(m, node(m, n).input[1])
    assert not from_dq(m, node(m, "softmax").input[0])
    for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
        assert from_dq(m, node(m, n).input[1])


def test_ascend_atc_script_and_artifacts(ascend):
    art, _ = ascend("conv_relu")
    d = art.path.parent
    script = (d / "atc.sh").read_text(encoding="utf-8")
    assert "--framework=5" in script
    assert "--soc_version=Ascend310P3" in script
    assert "--input_shape=x:1,3,8,8" in script
    assert "--model=model_deploy.onnx" in script  # ATC compiles the deploy form, never raw Q/DQ
    assert (d / "model_fp32.onnx").exists()
    assert art.extra["atc_command"][0] == "atc"
    assert not (d / "keep_dtype.cfg").exists()


def test_ascend_soc_version_option_and_keep_dtype(tmp_path):
    c = case("attention")
    art = AscendBackend().lower(LoweringContext(c.model, plan_of("attention", "mixed"), tmp_path, c.calib,
                                                {"soc_version": "Ascend910B"}))
    script = (art.path.parent / "atc.sh").read_text(encoding="utf-8")
    assert "--soc_version=Ascend910B" in script and "Ascend310P3" not in script
    # FP16 plan nodes run in fp16 under ATC's default --precision_mode_v2=fp16: nothing to keep
    assert "--precision_mode_v2=fp16" in script and "--keep_dtype" not in script
    # FP16 nodes stay FP32 in the Ascend graph
    m = onnx.load(str(art.path))
    assert count(m, "Cast") == 0


def test_atc_argv_unknown_soc():
    with pytest.raises(BadInputError, match="soc-version"):
        atc_argv("m.onnx", "model", "Ascend999", {"x": [1, 3, 8, 8]})
    argv = atc_argv("m.onnx", "model", "Ascend310", {"a": [1, 2], "b": [1, 3]})
    assert "--input_shape=a:1,2;b:1,3" in argv and "--framework=5" in argv


def test_ascend_opset13_from_opset17_model(tmp_path):
    model = conv_relu(opset=17)
    c = Case(model, samples(model, 8, 0), samples(model, 2, 1))
    art = AscendBackend().lower(LoweringContext(model, c.plan(), tmp_path, c.calib))
    m = onnx.load(str(art.path))
    assert [(i.domain, i.version) for i in m.opset_import] == [("", ASCEND_OPSET)]


def test_ascend_gemm_transa_not_quantized():
    model = gemm(trans_a=True)
    c = Case(model, samples(model, 8, 0), samples(model, 2, 1))
    m, rec = lower_qdq(model, c.plan(), ASCEND)
    assert not from_dq(m, node(m, "gemm_tb").input[1])


def test_ascend_matmul_3d_weight_not_quantized():
    model = matmul_3d_weight()
    c = Case(model, samples(model, 8, 0), samples(model, 2, 1))
    m, rec = lower_qdq(model, c.plan(), ASCEND)
    assert not from_dq(m, node(m, "bmm").input[1])
