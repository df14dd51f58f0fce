"""Import of an already quantized QDQ model (ONNX Runtime quantize_static): the scales survive."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from backends.ascend.backend import POLICY as ASCEND
from backends.tensorrt.backend import POLICY as TRT
from deployer.import_qdq import import_qdq, is_qdq_model
from deployer.plan import Precision, QuantPlan
from deployer.qdq import lower_qdq

RNG = np.random.default_rng(0)


def _fp32(path: Path) -> Path:
    w = RNG.normal(size=(8, 3, 3, 3)).astype(np.float32)
    w2 = RNG.normal(size=(4, 8)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("GlobalAveragePool", ["r"], ["p"], name="gap"),
             helper.make_node("Flatten", ["p"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "w2", "b2"], ["y"], name="fc", transB=1)]
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.zeros(8, np.float32), "b"),
             numpy_helper.from_array(w2, "w2"), numpy_helper.from_array(np.zeros(4, np.float32), "b2")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], inits)
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


@pytest.fixture(scope="module")
def ort_qdq(tmp_path_factory: pytest.TempPathFactory) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    d = tmp_path_factory.mktemp("qdq")
    src = _fp32(d / "fp32.onnx")

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter([{"x": RNG.normal(size=(1, 3, 8, 8)).astype(np.float32)} for _ in range(8)])

        def get_next(self):  # type: ignore[no-untyped-def]
            return next(self.it, None)

    quantize_static(str(src), str(d / "qdq.onnx"), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return onnx.load(str(src)), onnx.load(str(d / "qdq.onnx"))


def _act_params(m: onnx.ModelProto) -> dict[str, tuple[float, int]]:
    inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    out = {}
    for n in m.graph.node:
        if n.op_type == "QuantizeLinear" and n.input[0] not in inits:
            out[n.input[0]] = (float(inits[n.input[1]]), int(inits[n.input[2]]) if len(n.input) > 2 else 0)
    return out


def test_import_strips_qdq_and_keeps_numerics(ort_qdq) -> None:  # type: ignore[no-untyped-def]
    fp32, qdq = ort_qdq
    assert is_qdq_model(qdq) and not is_qdq_model(fp32)
    model, nodes, ranges, summary = import_qdq(qdq)
    assert not is_qdq_model(model)
    assert nodes["conv"].precision == Precision.INT8 and nodes["conv"].weight is not None
    assert summary["imported_activation_ranges"] == len(ranges) > 0
    onnx.checker.check_model(model)


def test_import_round_trips_scales(ort_qdq) -> None:  # type: ignore[no-untyped-def]
    """Lowering the imported plan with an asymmetric policy reproduces ORT's activation scales."""
    _, qdq = ort_qdq
    model, nodes, ranges, _ = import_qdq(qdq)
    plan = QuantPlan(model={}, calibration={}, recipe={}, nodes=nodes, ranges=ranges)
    lowered, _ = lower_qdq(model, plan, ASCEND)
    original, ours = _act_params(qdq), _act_params(lowered)
    common = set(original) & set(ours)
    assert common
    for t in common:
        s0, z0 = original[t]
        s1, z1 = ours[t]
        assert s1 == pytest.approx(s0, rel=1e-6), t
        assert z1 == z0 - 128, "uint8 zero point z maps to int8 z - 128"
    # symmetric lowering keeps the scale when the import was symmetric: check the range is finite
    lowered_trt, _ = lower_qdq(model, plan, TRT)
    assert is_qdq_model(lowered_trt)
