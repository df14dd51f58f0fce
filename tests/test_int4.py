"""Weight-only block-wise INT4 (recipe ``int4``): ONNX Runtime MatMulNBits lowering; other targets refuse."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from backends.base import onnx_runner
from backends.onnxruntime.backend import gemm_to_matmul
from deployer.errors import BadInputError
from deployer.plan import Precision
from deployer.recipe import decide, load_rules


def _mlp() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array((rng.normal(size=(64, 128)) * 0.1).astype(np.float32), "w1"),
             numpy_helper.from_array((rng.normal(size=(32, 128)) * 0.1).astype(np.float32), "w2"),
             numpy_helper.from_array(rng.normal(size=32).astype(np.float32), "b2")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Gemm", ["r", "w2", "b2"], ["y"], name="fc2", transB=1)]
    g = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _samples(n: int = 16) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    return [{"x": rng.normal(size=(1, 64)).astype(np.float32)} for _ in range(n)]


def test_int4_recipe_decisions() -> None:
    nodes = decide(_mlp(), load_rules("int4")[1])
    for n in ("fc1", "fc2"):
        assert nodes[n].precision == Precision.FP32 and nodes[n].weight is not None
        assert nodes[n].weight.bits == 4 and nodes[n].weight.block_size == 32
    assert "relu" not in nodes or nodes["relu"].weight is None


def test_gemm_to_matmul_is_exact() -> None:
    m = _mlp()
    mm = gemm_to_matmul(m, ["fc2"])
    assert [n.op_type for n in mm.graph.node] == ["MatMul", "Relu", "MatMul", "Add"]
    ref, out = onnx_runner(m, optimize=False)(_samples(4)), onnx_runner(mm, optimize=False)(_samples(4))
    for r, o in zip(ref, out):
        np.testing.assert_allclose(o[0], r[0], rtol=1e-5, atol=1e-5)


def test_onnxruntime_lowers_int4_to_matmulnbits(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from deployer import deploy

    path = tmp_path / "mlp.onnx"
    onnx.save(_mlp(), path)
    res = deploy(str(path), _samples(), targets="onnxruntime", recipe="int4", out_dir=tmp_path / "out", no_cache=True)
    r = res.targets["onnxruntime"]
    assert r.extra["weight_only_int4"]["nodes_int4"] == 2
    art = onnx.load(str(res.out_dir / r.artifact))
    ops = [n.op_type for n in art.graph.node]
    assert ops.count("MatMulNBits") == 2 and "Gemm" not in ops and "QuantizeLinear" not in ops
    assert r.fidelity["sqnr_db"] > 15  # 4-bit weights: close to FP32, not equal
    assert r.size_bytes["artifact"] < 0.35 * r.size_bytes["fp32"]


@pytest.mark.parametrize("target", ["tensorrt", "ascend"])
def test_targets_without_int4_refuse_it(tmp_path, target, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import deployer.pipeline
    from deployer import deploy

    def no_calibration(*a, **k):  # type: ignore[no-untyped-def]
        raise AssertionError("the refusal must come before calibration")

    monkeypatch.setattr(deployer.pipeline, "compute_statistics", no_calibration)
    path = tmp_path / "mlp.onnx"
    onnx.save(_mlp(), path)
    with pytest.raises(BadInputError, match="INT4"):
        deploy(str(path), _samples(), targets=target, recipe="int4", out_dir=tmp_path / "out", no_cache=True)
    assert not (tmp_path / "out").exists()


def test_bad_targets_and_input_shape_names_are_refused(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from deployer import deploy

    path = tmp_path / "mlp.onnx"
    onnx.save(_mlp(), path)
    with pytest.raises(BadInputError, match="targets 5"):
        deploy(str(path), _samples(), targets=5, out_dir=tmp_path / "o1")
    with pytest.raises(BadInputError, match="not inputs of the model"):
        deploy(str(path), _samples(), targets="tensorrt", out_dir=tmp_path / "o2", no_cache=True,
               input_shapes={"nope": "1x64"})
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


@pytest.mark.parametrize("target", ["tensorrt", "ascend", "tflite"])
def test_backends_refuse_an_int4_plan(tmp_path, target) -> None:  # type: ignore[no-untyped-def]
    """A hand-made or --plan plan with 4-bit weights reaches the backend itself: it refuses too."""
    from backends.base import LoweringContext, discover
    from calibration.dataset import CalibrationSet
    from deployer.pipeline import DeployOptions, Inputs, compute_statistics, make_plan

    m = _mlp()
    cal = CalibrationSet(_samples())
    inputs = Inputs(m, cal, cal, "generic", "test", "same")
    plan = make_plan(inputs, compute_statistics(inputs, DeployOptions(no_cache=True)), DeployOptions(recipe="int4"))
    with pytest.raises(BadInputError, match="INT4"):
        discover()[target].lower(LoweringContext(m, plan, tmp_path, cal, {}))
