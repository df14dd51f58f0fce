"""QuantPlan: JSON round trip, validation errors, model cross-checks; quant.py round-trip properties."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deployer.errors import DeployerError, PlanError
from deployer.plan import (
    SCHEMA_VERSION,
    Granularity,
    NodeDecision,
    Precision,
    QuantPlan,
    TensorRange,
    WeightScheme,
    validate_against_model,
)
from deployer.quant import (
    MIN_SCALE,
    asymmetric_params,
    dequantize,
    per_channel_scales,
    quantize,
    symmetric_scale,
)


def make_plan() -> QuantPlan:
    return QuantPlan(
        model={"sha256": "ab" * 32, "inputs": [{"name": "x", "shape": [1, 3, 8, 8], "dtype": "float32"}],
               "outputs": ["y"], "opset": 17},
        calibration={"sha256": "cd" * 32, "num_samples": 4, "observer": "minmax", "observer_params": {}},
        recipe={"name": "int8", "rules": [{"match": {}, "precision": "int8", "label": "int8: every node"}]},
        nodes={
            "conv": NodeDecision("Conv", Precision.INT8, WeightScheme(), "int8: every node"),
            "relu": NodeDecision("Relu", Precision.INT8),
            "fc": NodeDecision("Gemm", Precision.FP16, WeightScheme(granularity=Granularity.PER_TENSOR)),
            "sm": NodeDecision("Softmax", Precision.FP32, reason="kept"),
            "blk": NodeDecision("MatMul", Precision.INT8, WeightScheme(bits=4, block_size=32)),
        },
        ranges={"x": TensorRange(-1.0, 1.0), "conv_out": TensorRange(-2.5, 3.25), "relu_out": TensorRange(0.0, 3.25),
                "y": TensorRange(-0.1, 0.1 + 1e-12)},
        shared_scales=[["relu_out", "y"]],
        provenance={"deployer": "0.1.0", "libraries": {"onnx": "1.23.2"}},
    )


def plan_dict() -> dict:
    return json.loads(make_plan().to_json())


# -- round trip ------------------------------------------------------------------------------------


def test_round_trip_equal_and_byte_identical(tmp_path):
    plan = make_plan()
    text = plan.to_json()
    assert text == plan.to_json()
    back = QuantPlan.from_dict(json.loads(text))
    assert back == plan
    assert back.to_json() == text
    p = tmp_path / "plan.json"
    plan.save(p)
    assert p.read_text(encoding="utf-8") == text
    assert QuantPlan.load(p) == plan


def test_round_trip_preserves_enums_and_floats():
    back = QuantPlan.from_dict(plan_dict())
    assert back.nodes["fc"].precision is Precision.FP16
    assert back.nodes["fc"].weight.granularity is Granularity.PER_TENSOR
    assert back.nodes["blk"].weight == WeightScheme(bits=4, block_size=32)
    assert back.ranges["y"].max == 0.1 + 1e-12  # exact float repr survives
    assert back.precision_of("not-in-plan") is Precision.FP32
    assert back.range_of("missing") is None


def test_to_json_is_independent_of_insertion_order():
    a = make_plan()
    b = QuantPlan(a.model, a.calibration, a.recipe, dict(reversed(list(a.nodes.items()))),
                  dict(reversed(list(a.ranges.items()))), a.shared_scales, a.provenance)
    assert a.to_json() == b.to_json()


def test_with_ranges_and_with_nodes_copy():
    plan = make_plan()
    p2 = plan.with_ranges({"x": TensorRange(-2.0, 2.0)})
    assert p2.ranges == {"x": TensorRange(-2.0, 2.0)} and p2.nodes == plan.nodes
    assert plan.ranges["x"] == TensorRange(-1.0, 1.0)
    p3 = plan.with_nodes({})
    assert p3.nodes == {} and p3.ranges == plan.ranges and p3.recipe == plan.recipe


# -- validation ------------------------------------------------------------------------------------


def _mutated(fn) -> dict:
    d = plan_dict()
    fn(d)
    return d


@pytest.mark.parametrize(
    "mutate",
    [
        pytest.param(lambda d: d.__setitem__("schema_version", "2.0"), id="unknown-schema-version"),
        pytest.param(lambda d: d.__setitem__("schema_version", 1.0), id="schema-version-not-string"),
        pytest.param(lambda d: d.pop("schema_version"), id="missing-schema-version"),
        pytest.param(lambda d: d.__setitem__("extra", 1), id="unknown-top-level-key"),
        pytest.param(lambda d: d["nodes"]["conv"].__setitem__("bogus", 1), id="unknown-node-key"),
        pytest.param(lambda d: d["ranges"]["x"].__setitem__("mean", 0.0), id="unknown-range-key"),
        pytest.param(lambda d: d["nodes"]["conv"]["weight"].__setitem__("zp", 0), id="unknown-weight-key"),
        pytest.param(lambda d: d["ranges"].__setitem__("x", {"min": 1.0, "max": -1.0}), id="min-gt-max"),
        pytest.param(lambda d: d["ranges"].__setitem__("x", {"min": float("nan"), "max": 1.0}), id="nan-range"),
        pytest.param(lambda d: d["ranges"].__setitem__("x", {"min": 0.0, "max": float("inf")}), id="inf-range"),
        pytest.param(lambda d: d["ranges"].__setitem__("x", {"min": "0", "max": 1.0}), id="string-range"),
        pytest.param(lambda d: d["ranges"].__setitem__("x", [0.0, 1.0]), id="range-not-object"),
        pytest.param(lambda d: d["nodes"]["conv"].__setitem__("precision", "int4"), id="unknown-precision"),
        pytest.param(lambda d: d["nodes"]["conv"]["weight"].__setitem__("granularity", "per_row"),
                     id="unknown-granularity"),
        pytest.param(lambda d: d["nodes"]["conv"]["weight"].__setitem__("bits", 3), id="unsupported-bits"),
        pytest.param(lambda d: d.pop("model"), id="missing-model"),
        pytest.param(lambda d: d.pop("calibration"), id="missing-calibration"),
        pytest.param(lambda d: d.pop("recipe"), id="missing-recipe"),
        pytest.param(lambda d: d.pop("nodes"), id="missing-nodes"),
        pytest.param(lambda d: d.pop("ranges"), id="missing-ranges"),
        pytest.param(lambda d: d["nodes"]["conv"].pop("precision"), id="node-missing-precision"),
        pytest.param(lambda d: d["nodes"]["conv"].pop("op_type"), id="node-missing-op-type"),
        pytest.param(lambda d: d["ranges"]["x"].pop("max"), id="range-missing-max"),
        pytest.param(lambda d: d.__setitem__("nodes", []), id="nodes-not-object"),
        pytest.param(lambda d: d.__setitem__("shared_scales", ["x"]), id="shared-scales-not-list-of-lists"),
    ],
)
def test_invalid_plan_raises_plan_error(mutate):
    with pytest.raises(PlanError) as ei:
        QuantPlan.from_dict(_mutated(mutate))
    assert isinstance(ei.value, DeployerError)
    assert str(ei.value).startswith("plan:")


def test_top_level_not_object():
    with pytest.raises(PlanError):
        QuantPlan.from_dict([1, 2])


def test_direct_construction_is_validated():
    with pytest.raises(PlanError):
        TensorRange(2.0, 1.0)
    with pytest.raises(PlanError):
        TensorRange(math.nan, 1.0)
    with pytest.raises(PlanError):
        NodeDecision("Conv", "bf16")  # type: ignore[arg-type]
    with pytest.raises(PlanError):
        dataclass_replace_version(make_plan(), "0.9")
    # enum values given as strings are accepted and normalised
    assert NodeDecision("Conv", "int8").precision is Precision.INT8  # type: ignore[arg-type]


def dataclass_replace_version(plan: QuantPlan, version: str) -> QuantPlan:
    import dataclasses

    return dataclasses.replace(plan, schema_version=version)


def test_load_errors(tmp_path):
    with pytest.raises(PlanError, match="cannot read"):
        QuantPlan.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json", encoding="utf-8")
    with pytest.raises(PlanError, match="not valid JSON"):
        QuantPlan.load(bad)
    nan = tmp_path / "nan.json"
    d = plan_dict()
    d["ranges"]["x"] = {"min": float("nan"), "max": 1.0}
    nan.write_text(json.dumps(d), encoding="utf-8")  # json writes NaN; the loader must refuse it
    with pytest.raises(PlanError, match="finite"):
        QuantPlan.load(nan)


def test_schema_version_constant():
    assert plan_dict()["schema_version"] == SCHEMA_VERSION


# -- validate_against_model -------------------------------------------------------------------------

NODE_TYPES = {"conv": "Conv", "relu": "Relu", "fc": "Gemm", "sm": "Softmax", "blk": "MatMul"}
TENSORS = {"x", "conv_out", "relu_out", "y", "w", "b"}


def test_validate_against_model_ok():
    validate_against_model(make_plan(), NODE_TYPES, TENSORS)


def test_validate_node_not_in_model():
    types = dict(NODE_TYPES)
    del types["relu"]
    with pytest.raises(PlanError, match="'relu' is not in the model"):
        validate_against_model(make_plan(), types, TENSORS)


def test_validate_op_type_mismatch():
    types = dict(NODE_TYPES, fc="MatMul")
    with pytest.raises(PlanError, match="'fc' is MatMul in the model, not Gemm"):
        validate_against_model(make_plan(), types, TENSORS)


def test_validate_tensor_not_in_model():
    with pytest.raises(PlanError, match="'conv_out' is not in the model"):
        validate_against_model(make_plan(), NODE_TYPES, TENSORS - {"conv_out"})


def test_validate_shared_scale_tensor_not_in_model():
    plan = make_plan()
    plan2 = QuantPlan(plan.model, plan.calibration, plan.recipe, plan.nodes, plan.ranges, [["relu_out", "ghost"]])
    with pytest.raises(PlanError, match="'ghost'"):
        validate_against_model(plan2, NODE_TYPES, TENSORS)


# -- quant.py properties ---------------------------------------------------------------------------

finite = st.floats(min_value=-1e4, max_value=1e4, allow_nan=False, allow_infinity=False)


@settings(max_examples=300, deadline=None)
@given(finite, finite, st.lists(st.floats(0.0, 1.0), min_size=1, max_size=64))
def test_asymmetric_round_trip(a, b, fractions):
    lo, hi = min(a, b), max(a, b)
    scale, zp = asymmetric_params(lo, hi)
    assert scale > 0 and math.isfinite(scale)
    assert -128 <= zp <= 127
    rlo, rhi = min(lo, 0.0), max(hi, 0.0)  # the range is extended to include 0
    x = np.array([rlo + f * (rhi - rlo) for f in fractions] + [rlo, rhi, 0.0], dtype=np.float64)
    x = np.clip(x, rlo, rhi)
    q = quantize(x, scale, zp)
    assert q.min() >= -128 and q.max() <= 127
    err = np.abs(dequantize(q, scale, zp).astype(np.float64) - x)
    # float32 output of dequantize adds a relative rounding error on top of scale/2
    tol = scale / 2 * (1 + 1e-6) + 1e-7 * np.abs(x) + 1e-12
    assert np.all(err <= tol), (lo, hi, scale, zp, float(err.max()))
    # zero is exactly representable (zero padding stays exact)
    assert dequantize(quantize(np.zeros(1), scale, zp), scale, zp)[0] == 0.0


@settings(max_examples=300, deadline=None)
@given(finite, finite, st.lists(st.floats(-1.0, 1.0), min_size=1, max_size=64))
def test_symmetric_round_trip(a, b, fractions):
    lo, hi = min(a, b), max(a, b)
    scale = symmetric_scale(lo, hi)
    assert scale >= MIN_SCALE and math.isfinite(scale)
    amax = max(abs(lo), abs(hi))
    x = np.array([f * amax for f in fractions] + [amax, -amax], dtype=np.float64)
    q = quantize(x, scale, 0, -127, 127)
    assert q.min() >= -127 and q.max() <= 127
    err = np.abs(dequantize(q, scale).astype(np.float64) - x)
    assert np.all(err <= scale / 2 * (1 + 1e-6) + 1e-7 * np.abs(x) + 1e-12)


@settings(max_examples=100, deadline=None)
@given(
    st.integers(1, 6),
    st.integers(1, 5),
    st.integers(0, 1),
    st.integers(0, 2**31 - 1),
    st.booleans(),
)
def test_per_channel_round_trip(channels, k, axis, seed, dead_channel):
    rng = np.random.default_rng(seed)
    shape = (channels, k) if axis == 0 else (k, channels)
    w = (rng.standard_normal(shape) * rng.uniform(1e-3, 10.0)).astype(np.float32)
    if dead_channel:
        if axis == 0:
            w[0, :] = 0.0
        else:
            w[:, 0] = 0.0
    s = per_channel_scales(w, axis)
    assert s.shape == (channels,) and s.dtype == np.float32
    assert np.all(s > 0) and np.all(np.isfinite(s))
    q = quantize(w, s, 0, -127, 127, axis=axis)
    assert q.min() >= -127 and q.max() <= 127
    back = dequantize(q, s, 0, axis=axis)
    bshape = [1, 1]
    bshape[axis] = -1
    err = np.abs(back.astype(np.float64) - w.astype(np.float64))
    assert np.all(err <= s.reshape(bshape).astype(np.float64) / 2 * (1 + 1e-6) + 1e-7 * np.abs(w))
    # the largest magnitude of each channel maps to +-127 (full use of the integer range)
    amax_q = np.max(np.abs(q), axis=1 - axis)
    live = np.max(np.abs(w), axis=1 - axis) > 0
    assert np.all(amax_q[live] == 127)


def test_dead_range_scale_is_never_zero():
    assert symmetric_scale(0.0, 0.0) == MIN_SCALE
    s, zp = asymmetric_params(0.0, 0.0)
    assert s == MIN_SCALE and -128 <= zp <= 127
    assert np.all(per_channel_scales(np.zeros((3, 4), np.float32), 0) == np.float32(MIN_SCALE))


def test_asymmetric_known_values():
    # TFLite int8 spec: scale = (max - min) / 255, zero_point = round(-128 - min / scale)
    s, zp = asymmetric_params(-1.0, 3.0)
    assert s == pytest.approx(4.0 / 255)
    assert zp == round(-128 + 1.0 / s)
    s, zp = asymmetric_params(0.0, 6.0)  # relu6
    assert s == pytest.approx(6.0 / 255) and zp == -128
    s, zp = asymmetric_params(1.0, 2.0)  # extended to include 0
    assert s == pytest.approx(2.0 / 255) and zp == -128


def test_quantize_rounds_half_to_even_like_onnx():
    q = quantize(np.array([0.5, 1.5, 2.5, -0.5, -1.5]), 1.0)
    assert q.tolist() == [0, 2, 2, 0, -2]


def test_plan_dict_is_deep_copied_by_from_dict():
    d = plan_dict()
    snapshot = copy.deepcopy(d)
    QuantPlan.from_dict(d)
    assert d == snapshot  # from_dict does not mutate its input


def test_numpy_scalar_ranges_are_accepted():
    r = TensorRange(np.float32(-0.5), np.float32(1.5))
    assert r.to_dict() == {"min": -0.5, "max": 1.5}
