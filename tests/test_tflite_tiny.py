"""TFLite full-integer lowering of a tiny CNN: runs in LiteRT, I/O types, layout, closeness to FP32,
and the plan's activation ranges landing in the flatbuffer (ai-edge-quantizer fed the plan's ranges).

Conversions take seconds each, so every lowering is made once per module and shared.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
import pytest

pytest.importorskip("ai_edge_litert")
torch = pytest.importorskip("torch")

from ai_edge_litert.interpreter import Interpreter  # noqa: E402

from backends.base import Artifact, LoweringContext, onnx_runner  # noqa: E402
from backends.tflite.quantize import FIXED_OUTPUT  # noqa: E402
from backends.tflite.backend import TFLiteBackend  # noqa: E402
from calibration.collect import collect_statistics  # noqa: E402
from calibration.dataset import CalibrationSet  # noqa: E402
from deployer.errors import BadInputError  # noqa: E402
from deployer.model_io import canonicalize, export_torch  # noqa: E402
from deployer.pipeline import DeployOptions, Inputs, make_plan  # noqa: E402
from deployer.plan import QuantPlan, TensorRange  # noqa: E402
from deployer.quant import asymmetric_params  # noqa: E402

H = W = 16


class TinyCNN(torch.nn.Module):
    """conv+relu6 -> depthwise+relu6 -> pointwise conv + residual add -> global avg pool -> flatten -> fc."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.dw = torch.nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.pw = torch.nn.Conv2d(8, 8, 1)
        self.fc = torch.nn.Linear(8, 10)
        self.act = torch.nn.ReLU6()

    def forward(self, x):
        h = self.act(self.c1(x))
        y = self.pw(self.act(self.dw(h))) + h
        y = torch.nn.functional.adaptive_avg_pool2d(y, 1)
        return self.fc(torch.flatten(y, 1))


def _samples(n: int, seed: int) -> CalibrationSet:
    rng = np.random.default_rng(seed)
    # images in [-1, 1] with some spatial structure, like normalized photos
    base = rng.uniform(-1, 1, (n, 1, 3, 4, 4)).repeat(4, axis=3).repeat(4, axis=4)
    x = np.clip(base + 0.2 * rng.standard_normal(base.shape), -1, 1).astype(np.float32)
    return CalibrationSet([{"input": x[i]} for i in range(n)])


class Setup:
    def __init__(self) -> None:
        torch.manual_seed(0)
        net = TinyCNN().eval()
        with torch.no_grad():  # spread the logits so top-1 is meaningful
            net.fc.weight.mul_(8.0)
        self.calib = _samples(48, 0)
        self.heldout = _samples(24, 1)
        self.model = canonicalize(export_torch(net, {"input": self.calib[0]["input"]}))
        inputs = Inputs(self.model, self.calib, self.heldout, "classification", "test", "test")
        self.plan = make_plan(inputs, collect_statistics(self.model, self.calib), DeployOptions())
        self.ref = onnx_runner(self.model)(self.heldout)
        self.node_outputs = [o for n in self.model.graph.node for o in n.output]


@pytest.fixture(scope="module")
def setup() -> Setup:
    return Setup()


@pytest.fixture(scope="module")
def lower(setup, tmp_path_factory):
    cache: dict[tuple, Artifact] = {}

    def get(plan: QuantPlan | None = None, tag: str = "default", **options) -> Artifact:
        key = (tag, tuple(sorted(options.items())))
        if key not in cache:
            out = tmp_path_factory.mktemp(f"tflite-{tag}")
            ctx = LoweringContext(setup.model, plan or setup.plan, out, setup.calib, dict(options))
            cache[key] = TFLiteBackend().lower(ctx)
        return cache[key]

    return get


def _interp(path: Path) -> Interpreter:
    it = Interpreter(model_path=str(path))
    it.allocate_tensors()
    return it


def _cosine(a, b) -> float:
    x = np.concatenate([np.ravel(o) for r in a for o in r]).astype(np.float64)
    y = np.concatenate([np.ravel(o) for r in b for o in r]).astype(np.float64)
    return float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y)))


def _top1(a, b) -> float:
    return float(np.mean([np.argmax(r[0]) == np.argmax(s[0]) for r, s in zip(a, b)]))


def _activation(it: Interpreter, art: Artifact, tensor: str, dtype=np.int8) -> dict:
    """The integer activation tensor of the ``.tflite`` that carries ONNX ``tensor``'s plan range
    (``plan_tensors`` in the report; the backend verified the correspondence by value)."""
    names = {t for t, o in art.extra["plan_tensors"].items() if o == tensor}
    found = [d for d in it.get_tensor_details() if d["name"] in names and d["dtype"] == dtype]
    assert found, (tensor, art.extra["plan_tensors"])
    return found[0]


def _same_params(q: tuple, lo: float, hi: float) -> bool:
    """TFLite (scale, zero point) equal to the range's int8 asymmetric parameters; the zero point may
    differ by one where ``-128 - lo / scale`` is a tie (ai-edge-quantizer rounds ties away from zero)."""
    scale, zp = asymmetric_params(lo, hi)
    return q[0] == pytest.approx(scale, rel=1e-6) and abs(int(q[1]) - zp) <= 1


def _tensor(setup: Setup, op_type: str, nth: int = 0) -> str:
    return [n.output[0] for n in setup.model.graph.node if n.op_type == op_type][nth]


# -- the default lowering: int8 I/O, NHWC ------------------------------------------------------------


def test_model_ops_cover_the_brief(setup):
    assert {n.op_type for n in setup.model.graph.node} >= {"Conv", "Clip", "Add", "GlobalAveragePool", "Flatten",
                                                           "Gemm"}
    assert any(next((a.i for a in n.attribute if a.name == "group"), 1) == 8 for n in setup.model.graph.node)


def test_default_int8_io_nhwc(lower):
    art = lower()
    it = _interp(art.path)
    (inp,), (out,) = it.get_input_details(), it.get_output_details()
    assert inp["dtype"] == np.int8 and out["dtype"] == np.int8
    assert list(inp["shape"]) == [1, H, W, 3]
    assert list(out["shape"]) == [1, 10]
    assert art.extra["io"]["inputs"][0]["dtype"] == "int8"
    assert art.path.name == "model_int8.tflite" and art.fp32_path.exists()


def test_full_integer_kernels(lower):
    it = _interp(lower().path)
    for d in it.get_tensor_details():
        assert d["dtype"] in (np.int8, np.int32), f"{d['name']} is {d['dtype']}: not full integer"


def test_default_close_to_fp32(setup, lower):
    art = lower()
    got = art.run(setup.heldout)
    assert got[0][0].shape == (1, 10) and got[0][0].dtype == np.float32
    assert _cosine(setup.ref, got) > 0.99
    assert _top1(setup.ref, got) >= 0.9


def test_fp32_tflite_matches_onnx(setup, lower):
    # the onnx2tf conversion itself is exact (up to float rounding)
    got = lower().fp32_run(setup.heldout)
    for r, g in zip(setup.ref, got):
        np.testing.assert_allclose(g[0], r[0], rtol=1e-4, atol=1e-4)


def test_graph_input_scale_from_plan(setup, lower):
    it = _interp(lower().path)
    d = it.get_input_details()[0]
    r = setup.plan.ranges["input"]
    scale, zp = d["quantization"]
    assert scale == pytest.approx((r.max - r.min) / 255, rel=1e-6)
    assert _same_params((scale, zp), r.min, r.max)


def test_graph_output_scale_from_plan(setup, lower):
    it = _interp(lower().path)
    r = setup.plan.ranges[setup.model.graph.output[0].name]
    assert it.get_output_details()[0]["quantization"][0] == pytest.approx((r.max - r.min) / 255, rel=1e-6)


def test_activation_scales_follow_plan(setup, lower):
    art = lower()
    it = _interp(art.path)
    checked = 0
    for tensor in (_tensor(setup, "Clip", 0), _tensor(setup, "Clip", 1), _tensor(setup, "Conv", 2),
                   _tensor(setup, "Add")):
        r = setup.plan.ranges[tensor]
        d = _activation(it, art, tensor)
        assert _same_params(d["quantization"], r.min, r.max), (tensor, d["quantization"])
        checked += 1
    assert art.extra["tensors_from_plan"] >= checked


# -- the range propagation test ---------------------------------------------------------------------


def test_changed_plan_range_changes_tflite_scale(setup, lower):
    conv = _tensor(setup, "Conv", 2)  # the pointwise conv output feeding the residual Add
    r = setup.plan.ranges[conv]
    assert r.max > 0
    new = TensorRange(r.min, 2 * r.max)
    plan2 = setup.plan.with_ranges(dict(setup.plan.ranges, **{conv: new}))
    old_scale = _activation(_interp(lower().path), lower(), conv)["quantization"][0]
    art2 = lower(plan2, tag="range")
    d = _activation(_interp(art2.path), art2, conv)
    assert old_scale == pytest.approx((r.max - r.min) / 255, rel=1e-6)
    assert d["quantization"][0] == pytest.approx((new.max - new.min) / 255, rel=1e-6)
    assert _same_params(d["quantization"], new.min, new.max)
    # nothing else moved
    other = _tensor(setup, "Add")
    assert _activation(_interp(art2.path), art2, other)["quantization"] == \
        _activation(_interp(lower().path), lower(), other)["quantization"]
    # still a working model
    assert _cosine(setup.ref, art2.run(setup.heldout)) > 0.99


def test_bias_scale_is_input_scale_times_weight_scale(setup, lower):
    """The int32 bias of each conv/fc follows input_scale x weight_scale after the plan is applied."""
    from backends.tflite import flatbuf

    m = flatbuf.load(lower().path.read_bytes())
    sg = m.subgraphs[0]
    seen = 0
    for code, op in flatbuf.ops(m):
        if code not in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED") or len(op.inputs) < 3:
            continue
        x, w, b = (sg.tensors[int(i)] for i in op.inputs[:3])
        expect = np.float64(x.quantization.scale[0]) * np.asarray(w.quantization.scale, np.float64)
        np.testing.assert_allclose(np.asarray(b.quantization.scale, np.float64), expect, rtol=1e-6)
        seen += 1
    assert seen == 4  # c1, dw, pw, fc


def test_tied_and_fixed_ops_listed_not_overwritten(setup, lower):
    art = lower()
    for dev in art.extra["plan_deviations"]:
        assert dev["op"] in FIXED_OUTPUT or "share" in dev["reason"], dev


# -- options --------------------------------------------------------------------------------------


def test_uint8_io(setup, lower):
    art = lower(tag="uint8", tflite_io="uint8")
    it = _interp(art.path)
    assert it.get_input_details()[0]["dtype"] == np.uint8
    assert it.get_output_details()[0]["dtype"] == np.uint8
    assert art.extra["io_type"] == "uint8"
    got = art.run(setup.heldout)
    assert _cosine(setup.ref, got) > 0.99


def test_float_io(setup, lower):
    art = lower(tag="float", tflite_io="float")
    it = _interp(art.path)
    assert it.get_input_details()[0]["dtype"] == np.float32
    assert it.get_output_details()[0]["dtype"] == np.float32
    got = art.run(setup.heldout)
    assert _cosine(setup.ref, got) > 0.99


def test_nchw_layout(setup, lower):
    art = lower(tag="nchw", tflite_layout="nchw")
    it = _interp(art.path)
    assert list(it.get_input_details()[0]["shape"]) == [1, 3, H, W]
    assert it.get_input_details()[0]["dtype"] == np.int8
    assert art.extra["layout"] == "nchw"
    got = art.run(setup.heldout)
    assert _cosine(setup.ref, got) > 0.99


@pytest.mark.parametrize("options", [{"tflite_io": "int16"}, {"tflite_layout": "chwn"}])
def test_bad_options(setup, tmp_path, options):
    ctx = LoweringContext(setup.model, setup.plan, tmp_path, setup.calib, options)
    with pytest.raises(BadInputError):
        TFLiteBackend().lower(ctx)


def test_onnx_reference_is_opset17_single_file(setup):
    assert max(i.version for i in setup.model.opset_import if i.domain in ("", "ai.onnx")) == 17
    onnx.checker.check_model(setup.model)


# -- Concat: inputs and output must share one scale (TFLite spec; plan.shared_scales) --------------


def _concat_model() -> onnx.ModelProto:
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)

    def w(*shape):
        return numpy_helper.from_array((rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))).astype(np.float32))

    inits = [w(4, 3, 3, 3), w(4, 3, 3, 3), w(4, 8, 1, 1)]
    inits[1] = numpy_helper.from_array(numpy_helper.to_array(inits[1]) * 5)  # a wider second branch
    for t, name in zip(inits, ("w1", "w2", "w3")):
        t.name = name
    biases = [numpy_helper.from_array(np.full(4, 0.1 * i, np.float32), f"b{i}") for i in (1, 2, 3)]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["x", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("Concat", ["c1", "r2"], ["cat"], name="cat", axis=1),
        helper.make_node("Conv", ["cat", "w3", "b3"], ["y"], name="conv3"),
    ]
    g = helper.make_graph(nodes, "concat", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], inits + biases)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    return m


def test_concat_shares_one_scale(tmp_path):
    model = _concat_model()
    rng = np.random.default_rng(1)
    cal = CalibrationSet([{"x": rng.standard_normal((1, 3, 8, 8)).astype(np.float32)} for _ in range(16)])
    plan = make_plan(Inputs(model, cal, cal, "generic", "test", "test"), collect_statistics(model, cal),
                     DeployOptions())
    assert plan.shared_scales == [["c1", "r2", "cat"]]
    art = TFLiteBackend().lower(LoweringContext(model, plan, tmp_path, cal))
    it = _interp(art.path)  # must load and prepare
    from backends.tflite import flatbuf

    fb = flatbuf.load(art.path.read_bytes())
    sg = fb.subgraphs[0]
    cat = [op for code, op in flatbuf.ops(fb) if code == "CONCATENATION"]
    assert len(cat) == 1
    params = {(float(sg.tensors[int(t)].quantization.scale[0]), int(sg.tensors[int(t)].quantization.zeroPoint[0]))
              for t in list(cat[0].inputs) + list(cat[0].outputs)}
    assert len(params) == 1, params
    lo = min(plan.ranges[t].min for t in ("c1", "r2", "cat"))
    hi = max(plan.ranges[t].max for t in ("c1", "r2", "cat"))
    assert params.pop()[0] == pytest.approx((hi - lo) / 255, rel=1e-6)
    assert it is not None
    assert _cosine(onnx_runner(model)(cal), art.run(cal)) > 0.99
