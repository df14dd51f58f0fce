"""Graph preparation passes on tiny models: BatchNorm folding (Conv, ConvTranspose, Gemm) and
Constant-node weights."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from backends.base import onnx_runner
from backends.tensorrt.backend import POLICY
from deployer.plan import NodeDecision, Precision, QuantPlan, TensorRange, WeightScheme
from deployer.prepare import constants_to_initializers, fold_batchnorm
from deployer.qdq import lower_qdq

RNG = np.random.default_rng(0)


def _bn_inits(c: int, prefix: str = "bn") -> list[onnx.TensorProto]:
    return [numpy_helper.from_array(RNG.uniform(0.5, 2, c).astype(np.float32), f"{prefix}_g"),
            numpy_helper.from_array(RNG.normal(size=c).astype(np.float32), f"{prefix}_b"),
            numpy_helper.from_array(RNG.normal(size=c).astype(np.float32), f"{prefix}_m"),
            numpy_helper.from_array(RNG.uniform(0.1, 3, c).astype(np.float32), f"{prefix}_v")]


def _model(op: str, group: int = 1, bias: bool = True) -> tuple[onnx.ModelProto, list[int]]:
    if op == "ConvTranspose":
        cin, cout = 4, 6
        w = RNG.normal(size=(cin, cout // group, 3, 3)).astype(np.float32)
        x_shape, y_shape, attrs = [1, cin, 5, 5], [1, cout, 11, 11], {"strides": [2, 2], "group": group}
    elif op == "Conv":
        cin, cout = 4, 6
        w = RNG.normal(size=(cout, cin // group, 3, 3)).astype(np.float32)
        x_shape, y_shape, attrs = [1, cin, 5, 5], [1, cout, 3, 3], {"group": group}
    else:
        cin, cout = 8, 6
        w = RNG.normal(size=(cout, cin)).astype(np.float32)
        x_shape, y_shape, attrs = [1, cin], [1, cout], {"transB": 1}
    inits = [numpy_helper.from_array(w, "w")] + _bn_inits(cout)
    ins = ["x", "w"]
    if bias:
        inits.append(numpy_helper.from_array(RNG.normal(size=cout).astype(np.float32), "b"))
        ins.append("b")
    nodes = [helper.make_node(op, ins, ["h"], name="layer", **attrs),
             helper.make_node("BatchNormalization", ["h", "bn_g", "bn_b", "bn_m", "bn_v"], ["y"], name="bn",
                              epsilon=1e-3)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(m)
    return m, x_shape


@pytest.mark.parametrize("op,group,bias", [("ConvTranspose", 1, True), ("ConvTranspose", 2, False),
                                           ("Conv", 1, False), ("Conv", 2, True), ("Gemm", 1, True)])
def test_batchnorm_folds_exactly(op: str, group: int, bias: bool) -> None:
    m, x_shape = _model(op, group, bias)
    folded = fold_batchnorm(m)
    assert [n.op_type for n in folded.graph.node] == [op]
    assert len(folded.graph.node[0].input) == 3, "a bias is created when there was none"
    x = {"x": RNG.normal(size=x_shape).astype(np.float32)}
    ref = onnx_runner(m, optimize=False)([x])[0][0]
    got = onnx_runner(folded, optimize=False)([x])[0][0]
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=1e-5)


def test_constant_node_weights_are_quantized() -> None:
    w = RNG.normal(size=(6, 8)).astype(np.float32)
    nodes = [helper.make_node("Constant", [], ["w"], name="cw", value=numpy_helper.from_array(w, "w")),
             helper.make_node("Gemm", ["x", "w"], ["y"], name="fc", transB=1)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6])])
    m = constants_to_initializers(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))
    assert [n.op_type for n in m.graph.node] == ["Gemm"] and m.graph.initializer[0].name == "w"
    plan = QuantPlan(model={}, calibration={}, recipe={},
                     nodes={"fc": NodeDecision("Gemm", Precision.INT8, WeightScheme())},
                     ranges={"x": TensorRange(-3.0, 3.0)})
    lowered, rec = lower_qdq(m, plan, POLICY)
    assert "fc" in rec.weights and rec.weights["fc"]["axis"] == 0
    dq = [n for n in lowered.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dq) == 2  # the weight and the activation
    assert not any(i.name == "w" for i in lowered.graph.initializer), "the float weight is dropped"
