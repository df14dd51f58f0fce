"""AdaRound (Nagel et al. 2020) on tiny models built in code: learned rounding lowers the layer's output
error, stays on the per-channel INT8 grid every backend recomputes, and travels in the plan."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from backends.base import onnx_runner
from backends.ascend.backend import POLICY as ASCEND_POLICY
from backends.tensorrt.backend import POLICY as TRT_POLICY
from calibration.dataset import CalibrationSet
from deployer.adaround import (AdaRoundConfig, apply_rounding, compute_rounding, decode_bits, encode_bits,
                               nearest_bits, rounded_weight, rounding_targets)
from deployer.errors import PlanError
from deployer.graph import weight_channel_axis
from deployer.pipeline import DeployOptions, Inputs, compute_statistics, make_plan
from deployer.plan import QuantPlan
from deployer.qdq import for_policy, lower_qdq
from deployer.quant import per_channel_scales, quantize
from deployer.recovery import prepare_for_lowering

RNG = np.random.default_rng(3)
FAST = AdaRoundConfig(samples=16, iterations=300, batch=4, time_budget_s=120)


def _cnn() -> onnx.ModelProto:
    """Conv 3x3 -> Relu -> depthwise 3x3 -> global pool -> Gemm (transB): every op AdaRound rounds."""
    c = 8
    w1 = RNG.normal(0, 0.3, (c, 3, 3, 3)).astype(np.float32)
    w2 = RNG.normal(0, 0.5, (c, 1, 3, 3)).astype(np.float32)
    w2[:, :, 0, 0] = 3.0  # coarse per-channel grid: rounding choices matter
    w3 = RNG.normal(0, 0.3, (5, c)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="dw", group=c, pads=[1, 1, 1, 1]),
        helper.make_node("GlobalAveragePool", ["c2"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "w3", "b3"], ["y"], name="fc", transB=1),
    ]
    inits = [numpy_helper.from_array(a, n) for a, n in [
        (w1, "w1"), (np.zeros(c, np.float32), "b1"), (w2, "w2"), (np.zeros(c, np.float32), "b2"), (w3, "w3"),
        (np.zeros(5, np.float32), "b3")]]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 10, 10])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture(scope="module")
def setup() -> tuple[onnx.ModelProto, CalibrationSet, QuantPlan]:
    m = _cnn()
    cal = CalibrationSet([{"x": RNG.normal(0.5, 1.0, (1, 3, 10, 10)).astype(np.float32)} for _ in range(24)])
    inputs = Inputs(m, cal, cal, "generic", "test", "same")
    plan = make_plan(inputs, compute_statistics(inputs, DeployOptions(no_cache=True)), DeployOptions())
    return m, cal, plan


def _layer_mse(m: onnx.ModelProto, cal: CalibrationSet, node: str, weight: np.ndarray) -> float:
    """Output MSE of one node's weight replaced by ``weight`` (rest FP32), over the calibration set."""
    ref = onnx_runner(m)(list(cal))
    alt = onnx.ModelProto()
    alt.CopyFrom(m)
    name = next(n for n in alt.graph.node if n.name == node).input[1]
    for i in alt.graph.initializer:
        if i.name == name:
            i.CopyFrom(numpy_helper.from_array(weight, name))
    got = onnx_runner(alt)(list(cal))
    return float(np.mean([np.mean((r[0] - g[0]) ** 2) for r, g in zip(ref, got)]))


def test_bits_roundtrip_and_size_check() -> None:
    bits = RNG.random((7, 3, 3, 3)) > 0.5
    assert np.array_equal(decode_bits(encode_bits(bits), bits.shape), bits)
    with pytest.raises(PlanError, match="another model"):
        decode_bits(encode_bits(bits), (8, 3, 3, 3), "n")
    with pytest.raises(PlanError, match="base64"):
        decode_bits("not base64!", bits.shape, "n")


def test_rounded_weight_stays_on_the_grid_backends_recompute() -> None:
    w = RNG.normal(0, 1, (6, 4, 3, 3)).astype(np.float32)
    bits = RNG.random(w.shape) > 0.5  # any choice, even one that rounds every channel's max down
    wr = rounded_weight(w, 0, bits)
    s = per_channel_scales(w, 0)
    np.testing.assert_allclose(per_channel_scales(wr, 0), s, rtol=1e-6)  # same scale from the rounded weight
    q = quantize(wr, per_channel_scales(wr, 0), 0, -127, 127, axis=0)
    np.testing.assert_allclose(q * s[:, None, None, None], wr, rtol=1e-5, atol=1e-7)  # exactly on the grid
    assert np.all(np.abs(wr - w) <= s[:, None, None, None] * 1.0001)  # within one step of the weight
    near = rounded_weight(w, 0, nearest_bits(w, 0))
    np.testing.assert_array_equal(quantize(near, s, 0, -127, 127, axis=0), quantize(w, s, 0, -127, 127, axis=0))


def test_learned_rounding_lowers_each_layers_output_error(setup) -> None:
    m, cal, plan = setup
    targets, skipped = rounding_targets(m, plan)
    assert [n.name for n in targets] == ["conv", "dw", "fc"] and not skipped
    res = compute_rounding(m, plan, cal, FAST)
    assert set(res.bits) == {"conv", "dw", "fc"}
    assert res.summary["layers"] == 3 and res.summary["not_reached"] == []
    assert 0 < res.summary["flipped_fraction"] < 0.5  # it changes some roundings, not most
    from deployer.graph import GraphView

    view = GraphView(m)
    better = 0
    for node in targets:
        w = view.weight_of(node)
        assert w is not None
        axis = weight_channel_axis(node)
        nearest = _layer_mse(m, cal, node.name, rounded_weight(w, axis, nearest_bits(w, axis)))
        learned = _layer_mse(m, cal, node.name, rounded_weight(w, axis, res.bits[node.name]))
        assert learned <= nearest * 1.0001, node.name
        better += learned < 0.95 * nearest
    assert better >= 2  # the 3x3 convs gain clearly (the paper's point); the 8-input Gemm may not


def test_plan_carries_rounding_to_every_per_channel_backend(setup, tmp_path) -> None:
    m, cal, _ = setup
    inputs = Inputs(m, cal, cal, "generic", "test", "same")
    stats = compute_statistics(inputs, DeployOptions(no_cache=True))
    plan = make_plan(inputs, stats, DeployOptions(adaround=60.0))
    assert set(plan.rounding) == {"conv", "dw", "fc"} and "adaround" in plan.recipe["recovery"]
    assert plan.recipe["adaround"]["layers"] == 3
    # the plan file round-trips the bits
    plan.save(tmp_path / "plan.json")
    again = QuantPlan.load(tmp_path / "plan.json")
    assert again.rounding == plan.rounding
    # the lowered TensorRT graph's int8 weights are the learned integers
    low, rec = lower_qdq(prepare_for_lowering(m, plan), plan, TRT_POLICY)
    w = numpy_helper.to_array(next(i for i in m.graph.initializer if i.name == "w2"))
    bits = decode_bits(plan.rounding["dw"], w.shape)
    s = per_channel_scales(w, 0)
    want = quantize(rounded_weight(w, 0, bits), s, 0, -127, 127, axis=0)
    int8 = [numpy_helper.to_array(i) for i in low.graph.initializer if i.data_type == TensorProto.INT8
            and tuple(i.dims) == w.shape]
    assert len(int8) == 1 and np.array_equal(int8[0].astype(np.int32), want)
    assert not np.array_equal(want, quantize(w, s, 0, -127, 127, axis=0))  # differs from round-to-nearest
    # bias correction now corrects the learned rounding, not nearest rounding
    plain = make_plan(inputs, stats, DeployOptions())
    assert plan.bias_correction["dw"] != plain.bias_correction["dw"]


def test_per_tensor_policy_drops_the_bits(setup) -> None:
    m, cal, plan = setup
    res = compute_rounding(m, plan, cal, AdaRoundConfig(samples=4, iterations=5, time_budget_s=30))
    rounded = QuantPlan.from_dict({**plan.to_dict(), "rounding": {n: encode_bits(b) for n, b in res.bits.items()}})
    assert set(for_policy(rounded, TRT_POLICY, m).rounding) == {"conv", "dw", "fc"}
    ascend = for_policy(rounded, ASCEND_POLICY, m).rounding
    assert "fc" not in ascend  # Ascend's Gemm weights are per-tensor: the per-channel bits do not apply
    assert for_policy(rounded, None, m) is rounded


def test_time_budget_bounds_the_work(setup) -> None:
    m, cal, plan = setup
    res = compute_rounding(m, plan, cal, AdaRoundConfig(samples=4, iterations=10_000, time_budget_s=0.5))
    assert res.summary["seconds"] < 30
    done = res.summary["layers"] + len(res.summary["not_reached"])
    assert done == 3  # every target is either rounded (maybe partly trained) or listed as not reached


def test_recipe_file_turns_adaround_on(tmp_path) -> None:
    from deployer.errors import BadInputError
    from deployer.recipe import load_recovery

    p = tmp_path / "r.json"
    p.write_text('{"base": "int8", "recovery": {"adaround": 30}}')
    assert load_recovery(str(p)).adaround == 30.0
    p.write_text('{"base": "int8", "recovery": {"adaround": true}}')
    assert load_recovery(str(p)).adaround == AdaRoundConfig().time_budget_s
    p.write_text('{"base": "int8", "recovery": {"adaround": -1}}')
    with pytest.raises(BadInputError, match="adaround"):
        load_recovery(str(p))


def test_inspect_counts_rounded_nodes(setup, tmp_path) -> None:
    from deployer.inspect_plan import plan_summary, render_table

    m, cal, plan = setup
    res = compute_rounding(m, plan, cal, AdaRoundConfig(samples=4, iterations=5, time_budget_s=30))
    rounded = QuantPlan.from_dict({**plan.to_dict(), "rounding": {n: encode_bits(b) for n, b in res.bits.items()}})
    assert plan_summary(rounded)["adarounded_nodes"] == 3 and plan_summary(plan)["adarounded_nodes"] == 0
    assert "3 AdaRound-rounded nodes" in render_table(rounded)


def test_budget_values_are_checked_before_any_model_work(setup, tmp_path) -> None:
    import math

    from deployer.adaround import check_budget
    from deployer.errors import BadInputError as Bad

    assert check_budget(None) is None and check_budget(False) is None
    assert check_budget(True) == AdaRoundConfig().time_budget_s and check_budget(30) == 30.0
    for bad in (0, -1, math.inf, math.nan, "10", [1]):
        with pytest.raises(Bad, match="time budget"):
            check_budget(bad)
    from deployer import deploy

    m, cal, _ = setup
    onnx.save(m, str(tmp_path / "m.onnx"))
    with pytest.raises(Bad, match="time budget"):
        deploy(str(tmp_path / "m.onnx"), list(cal), targets="onnxruntime", out_dir=tmp_path / "o", adaround=math.inf)
    assert not (tmp_path / "o").exists()


def test_plan_rounding_must_name_model_nodes(setup) -> None:
    from deployer.graph import GraphView
    from deployer.plan import validate_against_model

    m, _, plan = setup
    bad = QuantPlan.from_dict({**plan.to_dict(), "rounding": {"nonexist": "AAAA"}})
    with pytest.raises(PlanError, match="rounding names node 'nonexist'"):
        validate_against_model(bad, {n.name: n.op_type for n in m.graph.node}, GraphView(m).tensor_names())


def test_options_a_given_plan_ignores_are_reported(setup, tmp_path) -> None:
    from deployer import deploy

    m, cal, plan = setup
    onnx.save(m, str(tmp_path / "m.onnx"))
    plan.save(tmp_path / "p.json")
    res = deploy(str(tmp_path / "m.onnx"), list(cal), targets="onnxruntime", out_dir=tmp_path / "o",
                 plan=str(tmp_path / "p.json"), adaround=30, observer="auto", no_cache=True)
    assert any("--adaround, --observer auto ignored" in w for w in res.report["warnings"])
    assert not QuantPlan.load(res.plan_path).rounding


def test_targets_whose_options_change_the_weight_grid_drop_the_bits(setup, tmp_path) -> None:
    from backends.onnxruntime.backend import OnnxRuntimeBackend
    from backends.tflite.backend import TFLiteBackend
    from deployer.pipeline import run_deploy

    assert TFLiteBackend().honours_rounding({}) and not TFLiteBackend().honours_rounding({"tflite_per_tensor": True})
    assert OnnxRuntimeBackend().honours_rounding({}) and not OnnxRuntimeBackend().honours_rounding({"ort_mode": "dynamic"})
    m, cal, _ = setup
    onnx.save(m, str(tmp_path / "m.onnx"))
    res = run_deploy(str(tmp_path / "m.onnx"), list(cal), tmp_path / "o",
                     DeployOptions(targets="onnxruntime", adaround=60.0, no_cache=True,
                                   backend_options={"ort_mode": "dynamic"}))
    assert QuantPlan.load(res.plan_path).rounding  # the plan keeps them
    assert any("AdaRound bits of 3 node(s) not applied on onnxruntime" in n for n in res.targets["onnxruntime"].notes)
