"""Pattern recognition: additive attention masks (kept out of quantization), LayerNorm, GELU, attention."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from calibration.dataset import CalibrationSet
from deployer.patterns import find_patterns, mask_paths
from deployer.pipeline import DeployOptions, Inputs, compute_statistics, make_plan
from deployer.qdq import lower_qdq
from backends.tensorrt.backend import POLICY


def _attention_with_mask() -> onnx.ModelProto:
    """x[1,4,8], mask[1,4] int64 -> scores = x x^T / sqrt(8) + (1 - mask) * float_min -> softmax -> @ x."""
    nodes = [
        helper.make_node("Cast", ["mask"], ["maskf"], name="cast", to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["maskf", "ax1"], ["mask3"], name="unsq"),
        helper.make_node("Sub", ["one", "mask3"], ["inv"], name="sub"),
        helper.make_node("Mul", ["inv", "fmin"], ["addmask"], name="mulmin"),
        helper.make_node("Transpose", ["x"], ["xt"], name="tr", perm=[0, 2, 1]),
        helper.make_node("MatMul", ["x", "xt"], ["s"], name="qk"),
        helper.make_node("Div", ["s", "sq"], ["s2"], name="scale"),
        helper.make_node("Add", ["s2", "addmask"], ["s3"], name="addm"),
        helper.make_node("Softmax", ["s3"], ["p"], name="sm", axis=-1),
        helper.make_node("MatMul", ["p", "x"], ["y"], name="pv"),
    ]
    inits = [numpy_helper.from_array(np.array([1], np.int64), "ax1"),
             numpy_helper.from_array(np.array(1.0, np.float32), "one"),
             numpy_helper.from_array(np.array(np.finfo(np.float32).min, np.float32), "fmin"),
             numpy_helper.from_array(np.array(np.sqrt(8.0), np.float32), "sq")]
    g = helper.make_graph(nodes, "att", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8]),
                                         helper.make_tensor_value_info("mask", TensorProto.INT64, [1, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(m)
    return m


def test_mask_path_found() -> None:
    m = _attention_with_mask()
    assert {"maskf", "mask3", "inv", "addmask"} <= mask_paths(m)
    assert not {"s", "s2", "s3", "p", "y", "x", "xt"} & mask_paths(m)


def test_mask_path_gets_no_qdq_and_plan_is_finite() -> None:
    m = _attention_with_mask()
    rng = np.random.default_rng(0)
    samples = []
    for _ in range(8):
        mask = np.ones((1, 4), np.int64)
        mask[0, rng.integers(1, 4):] = 0
        samples.append({"x": rng.normal(size=(1, 4, 8)).astype(np.float32), "mask": mask})
    cal = CalibrationSet(samples)
    inputs = Inputs(m, cal, cal, "generic", "test", "same")
    plan = make_plan(inputs, compute_statistics(inputs, DeployOptions(no_cache=True)), DeployOptions())
    assert not {"maskf", "mask3", "inv", "addmask"} & set(plan.ranges)
    assert all(np.isfinite([r.min, r.max]).all() for r in plan.ranges.values())
    lowered, _ = lower_qdq(m, plan, POLICY)
    quantized = {n.input[0] for n in lowered.graph.node if n.op_type == "QuantizeLinear"}
    assert "addmask" not in quantized and quantized, quantized


def test_find_patterns() -> None:
    p = find_patterns(_attention_with_mask())
    assert p.attention and p.attention[0][0] == "qk" and "sm" in p.attention[0] and p.attention[0][-1] == "pv"
    assert "addmask" in p.mask_tensors
    # GELU (erf form) and LayerNorm (decomposed)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])
    c = {n: numpy_helper.from_array(np.array(v, np.float32), n) for n, v in
         [("s2", 1.4142135), ("one", 1.0), ("half", 0.5), ("two", 2.0), ("eps", 1e-5)]}
    nodes = [helper.make_node("Div", ["x", "s2"], ["d"], name="g_div"),
             helper.make_node("Erf", ["d"], ["e"], name="g_erf"),
             helper.make_node("Add", ["e", "one"], ["a"], name="g_add"),
             helper.make_node("Mul", ["a", "x"], ["m"], name="g_mul"),
             helper.make_node("Mul", ["m", "half"], ["gl"], name="g_half"),
             helper.make_node("ReduceMean", ["gl"], ["mu"], name="ln_mean", axes=[-1]),
             helper.make_node("Sub", ["gl", "mu"], ["dev"], name="ln_sub"),
             helper.make_node("Pow", ["dev", "two"], ["sq"], name="ln_pow"),
             helper.make_node("ReduceMean", ["sq"], ["var"], name="ln_var", axes=[-1]),
             helper.make_node("Add", ["var", "eps"], ["ve"], name="ln_add"),
             helper.make_node("Sqrt", ["ve"], ["sd"], name="ln_sqrt"),
             helper.make_node("Div", ["dev", "sd"], ["y"], name="ln_div")]
    m = helper.make_model(helper.make_graph(nodes, "g", [x], [y], list(c.values())),
                          opset_imports=[helper.make_opsetid("", 17)])
    p = find_patterns(m)
    assert p.gelu == [["g_div", "g_erf", "g_add", "g_mul"]]
    assert p.layernorm and p.layernorm[0][0] == "ln_mean" and p.layernorm[0][-1] == "ln_div"


def _residual_block() -> onnx.ModelProto:
    """x -> MatMul(W) -> Add(x) (residual) -> LayerNormalization -> y; a second Add adds a constant."""
    rng = np.random.default_rng(0)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8])
    inits = [numpy_helper.from_array(rng.normal(size=(8, 8)).astype(np.float32), "w"),
             numpy_helper.from_array(np.ones(8, np.float32), "g"), numpy_helper.from_array(np.zeros(8, np.float32), "b"),
             numpy_helper.from_array(np.full(8, 0.1, np.float32), "bias")]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="proj"),
             helper.make_node("Add", ["h", "bias"], ["hb"], name="bias_add"),
             helper.make_node("Add", ["hb", "x"], ["r"], name="residual"),
             helper.make_node("LayerNormalization", ["r", "g", "b"], ["y"], name="ln", axis=-1)]
    return helper.make_model(helper.make_graph(nodes, "blk", [x], [y], inits),
                             opset_imports=[helper.make_opsetid("", 17)])


def test_residual_add_before_layernorm_is_found_and_mixed_keeps_it_fp16() -> None:
    from deployer.plan import Precision
    from deployer.recipe import decide, load_rules

    m = _residual_block()
    assert find_patterns(m).residual_add == ["residual"]  # the bias Add has a constant input
    nodes = decide(m, load_rules("mixed")[1])
    assert nodes["residual"].precision == Precision.FP16 and "Bondarenko" in nodes["residual"].reason
    assert nodes["bias_add"].precision == Precision.INT8 and nodes["proj"].precision == Precision.INT8
    assert decide(m, load_rules("int8")[1])["residual"].precision == Precision.INT8


def test_recipe_pattern_key(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import json

    import pytest

    from deployer.errors import BadInputError
    from deployer.plan import Precision
    from deployer.recipe import decide, load_rules

    f = tmp_path / "r.json"
    f.write_text(json.dumps({"base": "int8", "rules": [{"match": {"pattern": "layernorm"}, "precision": "fp32"}]}))
    nodes = decide(_residual_block(), load_rules(str(f))[1])
    assert nodes["ln"].precision == Precision.FP32 and nodes["residual"].precision == Precision.INT8
    f.write_text(json.dumps({"rules": [{"match": {"pattern": "swiglu"}, "precision": "fp16"}]}))
    with pytest.raises(BadInputError, match="pattern"):
        load_rules(str(f))
