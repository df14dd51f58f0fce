"""Cross-layer equalization (deployer.equalize) on tiny convolution chains built in code."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from backends.base import onnx_runner
from deployer.equalize import equalize, find_pairs


def _chain(extra_consumer: bool = False) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    c = 8
    w1 = rng.normal(size=(c, 3, 3, 3)).astype(np.float32) * np.logspace(-2, 1, c, dtype=np.float32)[:, None, None, None]
    w2 = rng.normal(size=(c, 1, 3, 3)).astype(np.float32) * np.logspace(1, -2, c, dtype=np.float32)[:, None, None, None]
    w3 = rng.normal(size=(4, c, 1, 1)).astype(np.float32)
    inits = [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (rng.normal(size=c).astype(np.float32), "b1"),
                                                       (w2, "w2"), (w3, "w3"), (np.float32(0), "lo"),
                                                       (np.float32(6), "hi"))]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["a"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Clip", ["a", "lo", "hi"], ["a6"], name="relu6"),
        helper.make_node("Conv", ["a6", "w2"], ["d"], name="dw", group=c, pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["d"], ["dr"], name="relu"),
        helper.make_node("Conv", ["dr", "w3"], ["y"], name="pw"),
    ]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])]
    if extra_consumer:
        outputs.append(helper.make_tensor_value_info("a6", TensorProto.FLOAT, [1, 8, 8, 8]))
    g = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                          outputs, inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _spread(w: np.ndarray, depthwise: bool) -> float:
    r = np.abs(w).reshape(w.shape[0], -1).max(1) if depthwise else np.abs(w).max(axis=(0, 2, 3))
    return float(r.max() / r.min())


def test_equalization_is_exact_and_evens_channel_ranges() -> None:
    m = _chain()
    assert find_pairs(m) == [("conv1", "relu6", "dw"), ("dw", "relu", "pw")]
    eq, ratios = equalize(m)
    onnx.checker.check_model(eq)
    rng = np.random.default_rng(1)
    samples = [{"x": rng.uniform(-1, 1, (1, 3, 8, 8)).astype(np.float32)} for _ in range(4)]
    ref = onnx_runner(m, optimize=False)(samples)
    out = onnx_runner(eq, optimize=False)(samples)
    for r, o in zip(ref, out):
        np.testing.assert_allclose(o[0], r[0], rtol=1e-4, atol=1e-4 * float(np.abs(r[0]).max()))
    # ReLU6 became Relu + per-channel Min (exact); the depthwise weight ranges are much more even
    ops = [n.op_type for n in eq.graph.node]
    assert "Clip" not in ops and ops.count("Min") == 1
    consts = {i.name: numpy_helper.to_array(i) for i in eq.graph.initializer}
    dw = next(n for n in eq.graph.node if n.name == "dw")
    orig_w2 = numpy_helper.to_array(next(i for i in m.graph.initializer if i.name == "w2"))
    assert _spread(consts[dw.input[1]], True) < 0.1 * _spread(orig_w2, True)
    assert 0 < ratios["conv1->dw"] < 0.1, ratios
    assert {i.name for i in eq.graph.initializer}.isdisjoint({"w1", "w2", "lo", "hi"})  # replaced, not left behind
    # the input model is left untouched
    assert [n.op_type for n in m.graph.node].count("Clip") == 1


def test_a_tensor_read_elsewhere_is_not_equalized() -> None:
    m = _chain(extra_consumer=True)
    assert ("conv1", "relu6", "dw") not in find_pairs(m)
    eq, _ = equalize(m)
    assert "Clip" in [n.op_type for n in eq.graph.node]


def test_deploy_with_equalize_records_it_and_stays_faithful(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """``deploy(equalize=True)``: the plan names the step, the artifact still matches FP32."""
    from deployer import deploy

    path = tmp_path / "chain.onnx"
    onnx.save(_chain(), path)
    rng = np.random.default_rng(2)
    samples = [{"x": rng.uniform(-1, 1, (1, 3, 8, 8)).astype(np.float32)} for _ in range(16)]
    res = deploy(str(path), samples, targets="tensorrt", out_dir=tmp_path / "out", equalize=True, no_cache=True)
    from deployer.plan import QuantPlan

    assert "cross_layer_equalization" in QuantPlan.load(res.plan_path).recipe["recovery"]
    fid = res.targets["tensorrt"].fidelity
    assert fid["sqnr_db"] > 20, fid


def test_tflite_lowers_the_equalized_relu6_min_with_one_scale(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The per-channel ``Min`` that replaces ReLU6 becomes TFLite MINIMUM, whose int8 inputs and output
    must share one scale (TFLite spec), or a float op where the quantizer has no int8 kernel for it:
    either way it is reported and the result stays faithful."""
    from deployer import deploy

    path = tmp_path / "chain.onnx"
    onnx.save(_chain(), path)
    rng = np.random.default_rng(2)
    samples = [{"x": rng.uniform(-1, 1, (1, 3, 8, 8)).astype(np.float32)} for _ in range(16)]
    res = deploy(str(path), samples, targets="tflite", out_dir=tmp_path / "out", equalize=True, no_cache=True)
    t = res.targets["tflite"]
    # ai-edge-quantizer 0.10 has no int8 MINIMUM: the op stays float and is listed (an integer MINIMUM
    # would share one scale and be listed in plan_deviations instead)
    assert any(d["op"] == "MINIMUM" for d in t.extra["plan_deviations"] + t.extra["float_nodes"])
    assert t.fidelity["sqnr_db"] > 20, t.fidelity  # 2.3 dB before the MINIMUM rule
