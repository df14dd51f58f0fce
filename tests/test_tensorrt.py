"""TensorRT target: placement, checker and numerics on tiny models built here (DESIGN.md section 3).

Each lowered graph is asserted by op counts and positions, must pass the TensorRT checker with no
finding, and is run in ONNX Runtime (graph optimizations off: exact Q/DQ arithmetic) against FP32.
The checker is also run on hand-built graphs that break one rule each.
"""

from __future__ import annotations

import json
from functools import lru_cache

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from backends.base import LoweringContext, onnx_runner
from backends.tensorrt.backend import TensorRTBackend, lower_strongly_typed
from backends.tensorrt.checker import RULES, check_model
from calibration.collect import collect_statistics
from calibration.dataset import CalibrationSet
from deployer.pipeline import DeployOptions, Inputs, make_plan
from deployer.plan import QuantPlan, TensorRange
from deployer.quant import symmetric_scale

F = TensorProto.FLOAT


def _w(seed: int, shape: tuple[int, ...], fan_in: int) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)


def _b(seed: int, n: int) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(n) * 0.1).astype(np.float32)


def _model(nodes, inputs, outputs, inits, opset: int = 17, check: bool = True) -> onnx.ModelProto:
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs],
                          [helper.make_tensor_value_info(n, t, s) for n, t, s in outputs],
                          [numpy_helper.from_array(a, n) for n, a in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    if check:
        onnx.checker.check_model(m, full_check=True)
    return m


def residual() -> onnx.ModelProto:
    n = [helper.make_node("Conv", ["x", "w0", "b0"], ["c0"], name="conv0", pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["c0"], ["h"], name="relu0"),
         helper.make_node("Conv", ["h", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
         helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
         helper.make_node("Add", ["c2", "h"], ["s"], name="add"),
         helper.make_node("MaxPool", ["s"], ["p"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
         helper.make_node("Conv", ["p", "w3", "b3"], ["y"], name="conv3")]
    inits = {"w0": _w(1, (8, 3, 3, 3), 27), "b0": _b(2, 8), "w1": _w(3, (8, 8, 3, 3), 72), "b1": _b(4, 8),
             "w2": _w(5, (8, 8, 3, 3), 72), "b2": _b(6, 8), "w3": _w(7, (4, 8, 1, 1), 8), "b3": _b(8, 4)}
    return _model(n, [("x", F, [1, 3, 8, 8])], [("y", F, [1, 4, 4, 4])], inits)


def concat() -> onnx.ModelProto:
    n = [helper.make_node("Conv", ["x", "wa", "ba"], ["a"], name="conv_a", pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["a"], ["ra"], name="relu_a"),
         helper.make_node("Conv", ["x", "wb", "bb"], ["b"], name="conv_b"),
         helper.make_node("Concat", ["ra", "b"], ["cat"], name="concat", axis=1),
         helper.make_node("Conv", ["cat", "wc", "bc"], ["y"], name="conv_c")]
    inits = {"wa": _w(11, (4, 3, 3, 3), 27), "ba": _b(12, 4), "wb": (3 * _w(13, (4, 3, 1, 1), 3)), "bb": _b(14, 4),
             "wc": _w(15, (6, 8, 1, 1), 8), "bc": _b(16, 6)}
    return _model(n, [("x", F, [1, 3, 8, 8])], [("y", F, [1, 6, 8, 8])], inits)


def attention() -> onnx.ModelProto:
    """Single-head attention with an additive mask path (float min), as transformer exports carry."""
    n = [helper.make_node("MatMul", ["x", "wq"], ["q"], name="q_proj"),
         helper.make_node("MatMul", ["x", "wk"], ["k"], name="k_proj"),
         helper.make_node("MatMul", ["x", "wv"], ["v"], name="v_proj"),
         helper.make_node("Transpose", ["k"], ["kt"], name="k_t", perm=[0, 2, 1]),
         helper.make_node("MatMul", ["q", "kt"], ["scores"], name="qk"),
         helper.make_node("Sub", ["one", "m"], ["inv"], name="mask_inv"),
         helper.make_node("Mul", ["inv", "fmin"], ["bias"], name="mask_bias"),
         helper.make_node("Add", ["scores", "bias"], ["masked"], name="mask_add"),
         helper.make_node("Softmax", ["masked"], ["p"], name="softmax", axis=-1),
         helper.make_node("MatMul", ["p", "v"], ["o"], name="pv"),
         helper.make_node("MatMul", ["o", "wo"], ["y"], name="o_proj")]
    inits = {"wq": _w(19, (8, 8), 8), "wk": _w(20, (8, 8), 8), "wv": _w(21, (8, 8), 8), "wo": _w(22, (8, 8), 8),
             "one": np.array(1.0, np.float32), "fmin": np.array(np.finfo(np.float32).min, np.float32)}
    return _model(n, [("x", F, [1, 6, 8]), ("m", F, [1, 1, 6])], [("y", F, [1, 6, 8])], inits)


def depthwise() -> onnx.ModelProto:
    n = [helper.make_node("Conv", ["x", "wd", "bd"], ["d"], name="dw", pads=[1, 1, 1, 1], group=4),
         helper.make_node("Clip", ["d", "lo", "hi"], ["r"], name="relu6"),
         helper.make_node("Conv", ["r", "wp", "bp"], ["y"], name="pw")]
    inits = {"wd": _w(31, (4, 1, 3, 3), 9), "bd": _b(32, 4), "lo": np.array(0, np.float32),
             "hi": np.array(6, np.float32), "wp": _w(33, (8, 4, 1, 1), 4), "bp": _b(34, 8)}
    return _model(n, [("x", F, [1, 4, 8, 8])], [("y", F, [1, 8, 8, 8])], inits)


def conv_transpose() -> onnx.ModelProto:
    n = [helper.make_node("ConvTranspose", ["x", "wt", "bt"], ["ct"], name="deconv", strides=[2, 2],
                          pads=[1, 1, 1, 1], output_padding=[1, 1]),
         helper.make_node("Relu", ["ct"], ["y"], name="relu")]
    return _model(n, [("x", F, [1, 4, 4, 4])], [("y", F, [1, 6, 8, 8])], {"wt": _w(41, (4, 6, 3, 3), 36), "bt": _b(42, 6)})


MODELS = {"residual": residual, "concat": concat, "attention": attention, "depthwise": depthwise,
          "convtranspose": conv_transpose}


def _samples(model: onnx.ModelProto, n: int, seed: int) -> CalibrationSet:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        s = {}
        for i in model.graph.input:
            shape = [d.dim_value for d in i.type.tensor_type.shape.dim]
            s[i.name] = (rng.random(shape) > 0.3).astype(np.float32) if i.name == "m" else \
                rng.standard_normal(shape).astype(np.float32)
        out.append(s)
    return CalibrationSet(out)


@lru_cache(maxsize=None)
def lowered(name: str, recipe: str = "int8") -> tuple[onnx.ModelProto, QuantPlan, object]:
    m = MODELS[name]()
    calib = _samples(m, 32, 0)
    plan = make_plan(Inputs(m, calib, calib, "generic", "test", "test"), collect_statistics(m, calib),
                     DeployOptions(recipe=recipe, bias_correction=False))
    out, rec = lower_strongly_typed(m, plan)
    return out, plan, rec


def ops(m: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in m.graph.node]


def producer(m: onnx.ModelProto, t: str) -> onnx.NodeProto | None:
    return next((n for n in m.graph.node if t in n.output), None)


def node(m: onnx.ModelProto, name: str) -> onnx.NodeProto:
    return next(n for n in m.graph.node if n.name == name)


def from_dq(m: onnx.ModelProto, t: str) -> bool:
    p = producer(m, t)
    return p is not None and p.op_type == "DequantizeLinear"


def q_inputs(m: onnx.ModelProto) -> set[str]:
    return {n.input[0] for n in m.graph.node if n.op_type == "QuantizeLinear"}


def init(m: onnx.ModelProto, name: str) -> np.ndarray:
    return next(numpy_helper.to_array(i) for i in m.graph.initializer if i.name == name)


def axis_of(n: onnx.NodeProto) -> int:
    return next((a.i for a in n.attribute if a.name == "axis"), 1)


def cosine_vs_fp32(name: str, m: onnx.ModelProto) -> float:
    ref_model = MODELS[name]()
    held = _samples(ref_model, 8, 1)
    ref = onnx_runner(ref_model, optimize=False)(held)
    got = onnx_runner(m, optimize=False)(held)
    x = np.concatenate([o.ravel() for r in ref for o in r]).astype(np.float64)
    y = np.concatenate([o.ravel() for r in got for o in r]).astype(np.float64)
    return float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y)))


# -- our lowered graphs: clean, placed per DESIGN.md, close to FP32 --------------------------------------

@pytest.mark.parametrize("recipe", ["int8", "mixed", "fp16"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_lowered_graph_passes_checker_and_matches_fp32(name, recipe):
    m, _, _ = lowered(name, recipe)
    onnx.checker.check_model(m, full_check=True)
    assert check_model(m) == [], [str(f) for f in check_model(m)]
    assert cosine_vs_fp32(name, m) > 0.99
    # graph inputs and outputs stay fp32
    assert all(v.type.tensor_type.elem_type == F for v in list(m.graph.input) + list(m.graph.output))


def test_residual_placement():
    m, _, _ = lowered("residual")
    # conv inputs quantized (x, h, r1, p); conv outputs never; the skip branch shares conv1's Q/DQ on h
    assert q_inputs(m) == {"x", "h", "r1", "p"}
    assert ops(m).count("QuantizeLinear") == 4 and ops(m).count("DequantizeLinear") == 4 + 4
    add = node(m, "add")
    assert producer(m, add.input[0]).op_type == "Conv" and from_dq(m, add.input[1])
    assert node(m, "conv1").input[0] == add.input[1]  # one Q/DQ pair for both consumers of h
    # no Q/DQ around the commuting MaxPool: its input is the Add output, its output quantized for conv3
    assert not from_dq(m, node(m, "pool").input[0]) and from_dq(m, node(m, "conv3").input[0])


def test_concat_shares_one_scale():
    m, plan, rec = lowered("concat")
    assert ["ra", "b", "cat"] in [sorted(g, key=["ra", "b", "cat"].index) for g in plan.shared_scales]
    # concat inputs are not requantized separately; the output Q/DQ uses the union range of the group
    assert q_inputs(m) == {"x", "cat"}
    lo = min(plan.ranges[t].min for t in ("ra", "b", "cat"))
    hi = max(plan.ranges[t].max for t in ("ra", "b", "cat"))
    assert rec.activations["cat"]["scale"] == pytest.approx(symmetric_scale(lo, hi))
    assert plan.ranges["b"].max > plan.ranges["ra"].max * 0 and hi >= plan.ranges["cat"].max


def test_attention_placement_and_mask_path():
    m, plan, rec = lowered("attention")
    # both inputs of the activation MatMuls quantized; softmax and mask path not
    assert q_inputs(m) == {"x", "q", "kt", "p", "v", "o"}
    assert not from_dq(m, node(m, "softmax").input[0])
    assert not any(from_dq(m, t) for t in node(m, "mask_add").input)
    for t, a in rec.activations.items():
        assert abs(a["min"]) < 1e4 and abs(a["max"]) < 1e4, t
    # the mask bias (float min) is never quantized: the pipeline keeps it out of the plan, and the backend
    # also drops mask-like ranges from plans made elsewhere (hand-edited, imported)
    assert "bias" not in rec.activations
    m2, rec2 = lower_strongly_typed(MODELS["attention"](), plan.with_ranges(
        {**plan.ranges, "bias": TensorRange(float(np.finfo(np.float32).min), 0.0)}))
    assert "bias" not in rec2.activations and not from_dq(m2, node(m2, "mask_add").input[1])
    assert any(s["tensor"] == "bias" and "mask" in s["reason"] for s in rec2.skipped)


def test_attention_mixed_keeps_attention_fp16_with_boundary_casts():
    m, _, _ = lowered("attention", "mixed")
    types = {v.name: v.type.tensor_type.elem_type for v in onnx.shape_inference.infer_shapes(m).graph.value_info}
    assert types[node(m, "softmax").output[0]] == TensorProto.FLOAT16
    assert types[node(m, "qk").output[0]] == TensorProto.FLOAT16
    # the projections stay INT8 (o_proj reads the fp16 attention output through a Cast); qk/pv are FP16
    assert q_inputs(m) == {"x", "o__to_fp32"}
    casts = [n for n in m.graph.node if n.op_type == "Cast"]
    assert casts and all(producer(m, c.input[0]) is None or producer(m, c.input[0]).op_type != "Cast" for c in casts)


def test_depthwise_weight_per_channel_axis0():
    m, _, _ = lowered("depthwise")
    dq = producer(m, node(m, "dw").input[1])
    assert dq.op_type == "DequantizeLinear" and axis_of(dq) == 0 and init(m, dq.input[1]).shape == (4,)
    assert init(m, dq.input[0]).dtype == np.int8
    assert q_inputs(m) == {"x", "r"}


def test_conv_transpose_weight_per_channel_axis1():
    m, _, _ = lowered("convtranspose")
    dq = producer(m, node(m, "deconv").input[1])
    assert axis_of(dq) == 1 and init(m, dq.input[1]).shape == (6,)
    assert q_inputs(m) == {"x"}
    assert all(c.op_type != "QuantizeLinear" for c in m.graph.node if "ct" in c.input)


def test_backend_lower_writes_commands_and_runs(tmp_path):
    m = MODELS["residual"]()
    _, plan, _ = lowered("residual")
    from deployer.shapes import parse_input_shapes

    opts = {"input_shapes": parse_input_shapes("x:1x3x8x8"), "trt_version_compatible": True}
    art = TensorRTBackend().lower(LoweringContext(m, plan, tmp_path, _samples(m, 4, 0), opts))
    script = (tmp_path / "tensorrt" / "build_engine.sh").read_text()
    assert "--stronglyTyped" in script and "--minShapes=x:1x3x8x8" in script and "--versionCompatible" in script
    assert "polygraphy convert" in script and "--timingCacheFile=timing.cache" in script
    assert art.extra["checker"]["errors"] == 0 and art.extra["checker"]["warnings"] == 0
    if art.extra["tensorrt"] is None:
        assert any("engine: not built (TensorRT not installed)" in n and "trtexec" in n for n in art.notes)
    assert art.run is not None and len(art.run(_samples(m, 2, 3))) == 2


# -- the checker on graphs that break one rule each ---------------------------------------------------------

def _qdq_conv(zp=np.int8(0), scale=0.05, w_axis=0, w_scales=None, x_per_channel=False, opset=17,
              q_then_relu=False, include_zp=True) -> onnx.ModelProto:
    w = _w(51, (4, 3, 3, 3), 27)
    ws = w_scales if w_scales is not None else np.abs(w).reshape(4, -1).max(1).astype(np.float32) / 127
    wq = np.clip(np.round(w / ws.reshape(-1, 1, 1, 1)), -127, 127).astype(np.int8) if w_axis == 0 else \
        np.zeros_like(w, np.int8)
    xs = np.full(3, scale, np.float32) if x_per_channel else np.array(scale, np.float32)
    xzp = np.zeros(3, np.asarray(zp).dtype) + zp if x_per_channel else np.array(zp)
    zp_in = ["xs", "xzp"] if include_zp else ["xs"]
    n = [helper.make_node("QuantizeLinear", ["x", *zp_in], ["xq"], name="x_q", axis=1),
         helper.make_node("DequantizeLinear", ["xq", *zp_in], ["xdq"], name="x_dq", axis=1),
         helper.make_node("DequantizeLinear", ["wq", "ws", "wzp"], ["wdq"], name="w_dq", axis=w_axis),
         helper.make_node("Conv", ["xdq", "wdq"], ["y"], name="conv")]
    if q_then_relu:
        n.insert(2, helper.make_node("Relu", ["xq"], ["bad"], name="relu_on_int8"))
    inits = {"xs": xs, "xzp": xzp, "wq": wq, "ws": ws, "wzp": np.zeros(ws.shape, np.int8)}
    return _model(n, [("x", F, [1, 3, 8, 8])], [("y", F, [1, 4, 6, 6])], inits, opset, check=False)


def rules_of(m: onnx.ModelProto) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for f in check_model(m):
        out.setdefault(f.rule, []).append(f.node)
        assert f.fix and f.source and f.message
    return out


def test_checker_clean_user_qdq_model():
    assert rules_of(_qdq_conv()) == {}


@pytest.mark.parametrize("kwargs, rule, where", [
    ({"zp": np.int8(3)}, "zero-point-nonzero", "x_q"),
    ({"zp": np.uint8(128)}, "zero-point-dtype", "x_q"),
    ({"include_zp": False}, "zero-point-missing", "x_q"),
    ({"scale": 0.0}, "scale-nonpositive", "x_q"),
    ({"scale": float("inf")}, "scale-nonfinite", "x_q"),
    ({"x_per_channel": True}, "activation-per-channel", "x_q"),
    ({"w_axis": 1, "w_scales": np.full(3, 0.01, np.float32)}, "per-channel-axis", "w_dq"),
    ({"opset": 11}, "opset-too-low", "<model>"),
    ({"q_then_relu": True}, "quantize-not-dequantized", "x_q"),
])
def test_checker_finds_broken_rule(kwargs, rule, where):
    found = rules_of(_qdq_conv(**kwargs))
    assert rule in found and where in found[rule], found
    assert RULES[rule].severity == "error"


def test_checker_qlinear_and_runtime_scale_and_mixed_types():
    n = [helper.make_node("QLinearConv", ["x", "s", "z", "w", "s", "z", "s", "z"], ["y"], name="qconv")]
    m = _model(n, [("x", TensorProto.INT8, [1, 1, 4, 4])], [("y", TensorProto.INT8, [1, 1, 4, 4])],
               {"s": np.array(0.1, np.float32), "z": np.array(0, np.int8), "w": np.ones((1, 1, 1, 1), np.int8)},
               check=False)
    assert "qconv" in rules_of(m)["integer-op"]
    n = [helper.make_node("ReduceMax", ["x"], ["amax"], name="amax", keepdims=0),
         helper.make_node("QuantizeLinear", ["x", "amax", "z"], ["q"], name="dyn_q"),
         helper.make_node("DequantizeLinear", ["q", "amax", "z"], ["y"], name="dyn_dq")]
    m = _model(n, [("x", F, [4])], [("y", F, [4])], {"z": np.array(0, np.int8)}, check=False)
    assert {"dyn_q", "dyn_dq"} <= set(rules_of(m)["scale-not-constant"])
    n = [helper.make_node("Add", ["a", "b"], ["y"], name="mixed_add")]
    m = _model(n, [("a", F, [4]), ("b", TensorProto.FLOAT16, [4])], [("y", F, [4])], {}, check=False)
    assert rules_of(m)["mixed-float-inputs"] == ["mixed_add"]


def test_checker_placement_warnings():
    # weight-only conv, then a residual Add with a float skip branch, then a conv output quantized into Relu
    base = _qdq_conv()
    g = base.graph
    conv = next(n for n in g.node if n.name == "conv")
    conv.input[0] = "x"  # activation no longer quantized -> weight-only
    found = rules_of(base)
    assert found.get("weight-only") == ["conv"]
    m = residual()
    out, _, _ = lowered("residual")
    add = node(out, "add")
    add.input[1] = "h"  # drop the skip-branch Q/DQ
    assert rules_of(out).get("residual-skip-unquantized") == ["add"]
    # concat inputs with different scales
    n = [helper.make_node("QuantizeLinear", ["a", "sa", "z"], ["aq"], name="qa"),
         helper.make_node("DequantizeLinear", ["aq", "sa", "z"], ["ad"], name="dqa"),
         helper.make_node("QuantizeLinear", ["b", "sb", "z"], ["bq"], name="qb"),
         helper.make_node("DequantizeLinear", ["bq", "sb", "z"], ["bd"], name="dqb"),
         helper.make_node("Concat", ["ad", "bd"], ["y"], name="cat", axis=0)]
    m = _model(n, [("a", F, [4]), ("b", F, [4])], [("y", F, [8])],
               {"sa": np.array(0.1, np.float32), "sb": np.array(0.2, np.float32), "z": np.array(0, np.int8)})
    assert rules_of(m) == {"concat-scales-differ": ["cat"]}
    assert all(RULES[r].severity == "warning" for r in ("weight-only", "residual-skip-unquantized",
                                                         "concat-scales-differ", "output-quantized"))


def test_checker_on_onnxruntime_quantizer_output(tmp_path):
    """A user's QDQ model from ONNX Runtime's quantizer: uint8 activations and int32 biases are refused."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    m = residual()
    onnx.save(m, str(tmp_path / "m.onnx"))

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(list(_samples(m, 4, 0)))

        def get_next(self):
            return next(self.it, None)

    quantize_static(str(tmp_path / "m.onnx"), str(tmp_path / "q.onnx"), Reader(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True)
    found = rules_of(onnx.load(str(tmp_path / "q.onnx")))
    assert found["zero-point-dtype"] and set(found["int32-dequantize"]) == {f"b{i}_DequantizeLinear" for i in range(4)}
    assert found["redundant-requantize"]  # Q/DQ re-inserted after the MaxPool


def test_rules_are_data_with_sources():
    assert len(RULES) >= 15
    for r in RULES.values():
        assert r.severity in ("error", "warning") and r.source and r.fix and r.summary


def test_deploy_check_cli(tmp_path, capsys):
    from deployer.cli import main

    good, bad = tmp_path / "good.onnx", tmp_path / "bad.onnx"
    onnx.save(lowered("residual")[0], str(good))
    onnx.save(_qdq_conv(zp=np.int8(5)), str(bad))
    assert main(["check", "--target", "tensorrt", str(good)]) == 0
    capsys.readouterr()
    assert main(["check", "--target", "tensorrt", "--json", str(bad)]) == 1
    report = json.loads(capsys.readouterr().out)
    assert not report["ok"] and {f["rule"] for f in report["findings"]} == {"zero-point-nonzero"}
    assert {f["node"] for f in report["findings"]} == {"x_q", "x_dq"}
