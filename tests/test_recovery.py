"""Accuracy recovery on tiny models: bias correction (Nagel et al. 2019) and SmoothQuant (Xiao et al. 2023)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from backends.base import onnx_runner
from backends.tensorrt.backend import POLICY
from calibration.dataset import CalibrationSet
from deployer.pipeline import DeployOptions, Inputs, compute_statistics, make_plan
from deployer.qdq import lower_qdq
from deployer.recovery import apply_bias_correction, apply_smoothing, prepare_for_lowering
from deployer.verify import sqnr_db

RNG = np.random.default_rng(0)


def _depthwise() -> onnx.ModelProto:
    """Depthwise 3x3 conv with few, coarse weights per channel: weight rounding biases the output."""
    c = 16
    w = RNG.normal(0, 1, (c, 1, 3, 3)).astype(np.float32)
    w[:, :, 0, 0] = 8.0  # one large tap per channel makes the per-channel scale coarse
    g = helper.make_graph(
        [helper.make_node("Conv", ["x", "w", "b"], ["y"], name="dw", group=c, pads=[1, 1, 1, 1])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, c, 8, 8])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.zeros(c, np.float32), "b")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _samples(shape: list[int], n: int, mean: float = 2.0) -> CalibrationSet:
    return CalibrationSet([{"x": (RNG.normal(mean, 1.0, shape)).astype(np.float32)} for _ in range(n)])


def test_bias_correction_removes_the_mean_shift() -> None:
    m = _depthwise()
    cal = _samples([1, 16, 8, 8], 32)
    inputs = Inputs(m, cal, cal, "generic", "test", "same")
    stats = compute_statistics(inputs, DeployOptions(no_cache=True))
    plan = make_plan(inputs, stats, DeployOptions())
    assert set(plan.bias_correction) == {"dw"} and len(plan.bias_correction["dw"]) == 16
    weights_only = plan.with_ranges({})
    ref = np.concatenate([o[0] for o in onnx_runner(m)(list(cal))])

    def mean_error(model: onnx.ModelProto) -> float:
        low, _ = lower_qdq(model, weights_only, POLICY)
        out = np.concatenate([o[0] for o in onnx_runner(low, optimize=False)(list(cal))])
        return float(np.abs((out - ref)[:, :, 1:-1, 1:-1].mean(axis=(0, 2, 3))).mean())  # interior: no padding

    before = mean_error(m)
    after = mean_error(apply_bias_correction(m, plan.bias_correction))
    assert after < 0.3 * before, (before, after)


def _matmul_with_outlier() -> tuple[onnx.ModelProto, CalibrationSet]:
    k, n = 32, 16
    w = RNG.normal(0, 0.2, (k, n)).astype(np.float32)
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, k])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, n])],
                          [numpy_helper.from_array(w, "w")])
    samples = []
    for _ in range(16):
        x = RNG.normal(0, 1, (1, 8, k)).astype(np.float32)
        x[..., 3] *= 60.0  # an outlier channel, as in transformer activations
        samples.append({"x": x})
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), CalibrationSet(samples)


def test_smoothquant_is_exact_in_fp32_and_helps_int8() -> None:
    m, cal = _matmul_with_outlier()
    inputs = Inputs(m, cal, cal, "generic", "test", "same")
    stats = compute_statistics(inputs, DeployOptions(no_cache=True))
    plain = make_plan(inputs, stats, DeployOptions())
    smooth = make_plan(inputs, stats, DeployOptions(smoothquant=0.5))
    assert list(smooth.smoothing) == ["x"] and "x__smoothed" in smooth.ranges
    ref = np.concatenate([o[0] for o in onnx_runner(m)(list(cal))])
    smoothed_fp32 = apply_smoothing(m, smooth.smoothing)
    got = np.concatenate([o[0] for o in onnx_runner(smoothed_fp32)(list(cal))])
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)

    def sqnr(plan):  # type: ignore[no-untyped-def]
        low, _ = lower_qdq(prepare_for_lowering(m, plan), plan, POLICY)
        out = np.concatenate([o[0] for o in onnx_runner(low, optimize=False)(list(cal))])
        return sqnr_db(ref, out)

    assert sqnr(smooth) > sqnr(plain) + 3.0, (sqnr(plain), sqnr(smooth))


def test_smoothquant_on_gemm_trans_b_is_exact() -> None:
    """Transformer exports at batch 1 become Reshape + Gemm(transB=1): smoothing scales the weight's columns."""
    w = RNG.normal(size=(16, 32)).astype(np.float32)
    g = helper.make_graph([helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="fc", transB=1)], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [8, 32])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [8, 16])],
                          [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.zeros(16, np.float32), "b")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    samples = []
    for _ in range(8):
        x = RNG.normal(size=(8, 32)).astype(np.float32)
        x[:, 3] *= 50.0
        samples.append({"x": x})
    cal = CalibrationSet(samples)
    inputs = Inputs(m, cal, cal, "generic", "test", "same")
    plan = make_plan(inputs, compute_statistics(inputs, DeployOptions(no_cache=True)), DeployOptions(smoothquant=0.5))
    assert list(plan.smoothing) == ["x"] and plan.smoothing["x"][3] > plan.smoothing["x"][0]
    ref = onnx_runner(m)(samples)
    got = onnx_runner(apply_smoothing(m, plan.smoothing))(samples)
    for a, b in zip(ref, got):
        np.testing.assert_allclose(b[0], a[0], rtol=1e-4, atol=1e-4)


def test_mixed_recipe_turns_smoothquant_on_and_per_tensor_targets_drop_it(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """``mixed`` carries SmoothQuant 0.8 (recipe recovery); ``no_smoothquant`` and a recipe file's
    ``recovery`` override it; the Ascend policy (per-tensor MatMul weights) lowers the plan without it."""
    import json

    import pytest

    from backends.ascend.backend import POLICY as ASCEND
    from deployer.errors import BadInputError
    from deployer.qdq import for_policy

    m, cal = _matmul_with_outlier()
    inputs = Inputs(m, cal, cal, "generic", "test", "same")
    stats = compute_statistics(inputs, DeployOptions(no_cache=True))
    mixed = make_plan(inputs, stats, DeployOptions(recipe="mixed"))
    assert list(mixed.smoothing) == ["x"] and "smoothquant(alpha=0.8)" in mixed.recipe["recovery"]
    assert not make_plan(inputs, stats, DeployOptions(recipe="mixed", no_smoothquant=True)).smoothing
    assert not make_plan(inputs, stats, DeployOptions(recipe="int8")).smoothing
    f = tmp_path / "r.json"
    f.write_text(json.dumps({"base": "mixed", "rules": [], "recovery": {"smoothquant": None, "bias_correction": False}}))
    plan = make_plan(inputs, stats, DeployOptions(recipe=str(f)))
    assert not plan.smoothing and not plan.bias_correction
    f.write_text(json.dumps({"base": "int8", "rules": [], "recovery": {"smoothquant": 0.6}}))
    assert make_plan(inputs, stats, DeployOptions(recipe=str(f))).smoothing
    f.write_text(json.dumps({"rules": [], "recovery": {"smoothquant": 3}}))
    with pytest.raises(BadInputError, match="smoothquant"):
        make_plan(inputs, stats, DeployOptions(recipe=str(f)))
    asc = for_policy(mixed, ASCEND)
    assert not asc.smoothing and "x__smoothed" not in asc.ranges and "x" in asc.ranges
    assert for_policy(mixed, POLICY) is mixed
