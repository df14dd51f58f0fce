"""TFLite lowering of a tiny transformer encoder block built in ONNX: token-id embedding (Gather),
additive attention mask ((1 - mask) * float32 min), multi-head attention (batched MatMul, Transpose, Softmax),
LayerNormalization and a decomposed LayerNorm (ReduceMean/Sub/Pow/Sqrt/Div), exact GELU (Erf chain),
masked mean pooling (Unsqueeze/Cast/ReduceSum/Clip). Checks the FP32 ``.tflite`` against ONNX Runtime,
the integer input dtype, and the full-integer model's closeness to FP32.

The public API lowers once per module (a few seconds); op-level checks convert FP32 only.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

pytest.importorskip("ai_edge_litert")
ort = pytest.importorskip("onnxruntime")

from ai_edge_litert.interpreter import Interpreter  # noqa: E402

import deployer  # noqa: E402

S, D, H, V, F = 16, 32, 2, 60, 64  # sequence, width, heads, vocabulary, FFN width


def _encoder(seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    inits: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []

    def const(name: str, a: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.asarray(a), name))
        return name

    def w(name: str, *shape: int, scale: float = 1.0) -> str:
        return const(name, (rng.standard_normal(shape) * scale / math.sqrt(shape[0])).astype(np.float32))

    def n(op: str, ins: list[str], out: str, **attrs) -> str:
        nodes.append(helper.make_node(op, ins, [out], name=out, **attrs))
        return out

    def linear(x: str, name: str, din: int, dout: int) -> str:
        y = n("MatMul", [x, w(f"{name}.w", din, dout)], f"{name}.mm")
        return n("Add", [y, const(f"{name}.b", (0.1 * rng.standard_normal(dout)).astype(np.float32))], f"{name}.out")

    # embeddings + LayerNormalization
    emb = n("Gather", [w("word", V, D, scale=math.sqrt(V)), "input_ids"], "emb")
    x = n("Add", [emb, w("pos", 1, S, D, scale=0.3)], "emb_pos")
    x = n("LayerNormalization", [x, const("ln0.g", np.ones(D, np.float32)), const("ln0.b", np.zeros(D, np.float32))],
          "ln0", axis=-1, epsilon=1e-12)
    # additive mask [1, 1, 1, S] as transformers exports write it: (1 - mask) * float32 min
    m4 = n("Cast", [n("Unsqueeze", ["attention_mask", const("ax12", np.array([1, 2], np.int64))], "mask4")],
           "mask4f", to=TensorProto.FLOAT)
    inv = n("Sub", [const("one_f", np.array(1.0, np.float32)), m4], "inv_mask")
    add_mask = n("Mul", [inv, const("fmin", np.array(np.finfo(np.float32).min, np.float32))], "add_mask")
    # attention
    dh = D // H
    heads = const("heads_shape", np.array([1, S, H, dh], np.int64))
    q = n("Transpose", [n("Reshape", [linear(x, "q", D, D), heads], "q4")], "qt", perm=[0, 2, 1, 3])
    k = n("Transpose", [n("Reshape", [linear(x, "k", D, D), heads], "k4")], "kt", perm=[0, 2, 3, 1])
    v = n("Transpose", [n("Reshape", [linear(x, "v", D, D), heads], "v4")], "vt", perm=[0, 2, 1, 3])
    s = n("Mul", [n("MatMul", [q, k], "qk"), const("inv_sqrt_dh", np.array(1 / math.sqrt(dh), np.float32))], "qk_s")
    p = n("Softmax", [n("Add", [s, add_mask], "qk_masked")], "probs", axis=-1)
    ctx = n("Transpose", [n("MatMul", [p, v], "pv")], "pv_t", perm=[0, 2, 1, 3])
    ctx = n("Reshape", [ctx, const("seq_shape", np.array([1, S, D], np.int64))], "ctx")
    x = n("Add", [linear(ctx, "o", D, D), x], "res1")
    x = n("LayerNormalization", [x, const("ln1.g", (1 + 0.1 * rng.standard_normal(D)).astype(np.float32)),
                                 const("ln1.b", (0.1 * rng.standard_normal(D)).astype(np.float32))], "ln1", axis=-1)
    # FFN with exact GELU: x/sqrt(2) -> Erf -> +1 -> *x -> *0.5
    h = linear(x, "ff1", D, F)
    e = n("Erf", [n("Div", [h, const("sqrt2", np.array(math.sqrt(2), np.float32))], "gelu_div")], "gelu_erf")
    gm = n("Mul", [h, n("Add", [e, const("one", np.array(1.0, np.float32))], "gelu_add")], "gelu_mul")
    g = n("Mul", [gm, const("half", np.array(0.5, np.float32))], "gelu")
    x = n("Add", [linear(g, "ff2", F, D), x], "res2")
    # decomposed LayerNorm: (x - mean) / sqrt(mean((x - mean)^2) + eps) * g + b
    axis = const("ax_last", np.array([-1], np.int64))
    d = n("Sub", [x, n("ReduceMean", [x], "ln2_mean", axes=[-1])], "ln2_d")  # opset 17: axes attribute
    var = n("ReduceMean", [n("Pow", [d, const("two", np.array(2.0, np.float32))], "ln2_sq")], "ln2_var", axes=[-1])
    std = n("Sqrt", [n("Add", [var, const("eps", np.array(1e-5, np.float32))], "ln2_ve")], "ln2_std")
    x = n("Add", [n("Mul", [n("Div", [d, std], "ln2_n"), const("ln2.g", np.ones(D, np.float32))], "ln2_s"),
                  const("ln2.b", np.zeros(D, np.float32))], "ln2")
    # masked mean pooling
    mf = n("Cast", [n("Unsqueeze", ["attention_mask", axis], "mask3")], "mask3f", to=TensorProto.FLOAT)
    one_ax = const("ax1", np.array([1], np.int64))
    summed = n("ReduceSum", [n("Mul", [x, mf], "masked"), one_ax], "summed", keepdims=0)
    count = n("Clip", [n("ReduceSum", [mf, one_ax], "count", keepdims=0), const("tiny", np.array(1e-9, np.float32))],
              "count_c")
    n("Div", [summed, count], "embedding")
    graph = helper.make_graph(
        nodes, "tiny_encoder",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, S]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, [1, S])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, [1, D])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def _samples(n: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        length = int(rng.integers(4, S + 1))
        ids = np.zeros((1, S), np.int64)
        ids[0, :length] = rng.integers(1, V, length)
        mask = (np.arange(S) < length).astype(np.int64)[None]
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _run_tflite(path: Path, samples: list[dict[str, np.ndarray]]) -> tuple[list[np.ndarray], list[dict]]:
    it = Interpreter(model_path=str(path))
    it.allocate_tensors()
    ins = it.get_input_details()
    out = it.get_output_details()[0]
    ys = []
    for s in samples:
        for d in ins:
            it.set_tensor(d["index"], s[d["name"]].astype(d["dtype"]))
        it.invoke()
        y = it.get_tensor(out["index"])
        if np.dtype(out["dtype"]).kind in "iu":
            scale, zp = out["quantization"]
            y = (y.astype(np.float32) - zp) * scale
        ys.append(np.asarray(y, np.float32))
    return ys, ins


@pytest.fixture(scope="module")
def lowered(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tflite-encoder")
    model = _encoder()
    path = tmp / "encoder.onnx"
    onnx.save(model, path)
    res = deployer.deploy(str(path), _samples(60, 0), targets="tflite", out_dir=tmp / "out", no_cache=True)
    sess = ort.InferenceSession(str(path))
    return res, sess


def test_mask_block_leaves_no_temporary_folders(lowered) -> None:
    res, _ = lowered
    out = Path(res.out_dir)
    assert sorted(p.name for p in out.parent.iterdir()) == ["encoder.onnx", "out"]
    assert not [p for p in out.rglob("*") if p.name.startswith((".tmp", ".tflite-work"))]


def test_padded_tokens_do_not_move_the_tflite_outputs(lowered) -> None:
    """Changing only the ids at padded positions (mask 0) must not change the embedding: the mask's
    float32 minimum reaches the Softmax exactly (float island), not through a ~1e36 int8 scale."""
    res, sess = lowered
    path = Path(res.out_dir) / res.targets["tflite"].artifact
    rng = np.random.default_rng(5)
    base = [s for s in _samples(16, 9) if s["attention_mask"].sum() < S]
    changed = []
    for s in base:
        ids = s["input_ids"].copy()
        padded = s["attention_mask"][0] == 0
        ids[0, padded] = rng.integers(1, V, int(padded.sum()))
        changed.append({"input_ids": ids, "attention_mask": s["attention_mask"]})
    a, _ = _run_tflite(path, base)
    b, _ = _run_tflite(path, changed)
    ref_a = [sess.run(None, s)[0] for s in base]
    ref_b = [sess.run(None, s)[0] for s in changed]
    assert max(float(np.max(np.abs(x - y))) for x, y in zip(ref_a, ref_b)) < 1e-4  # the FP32 model ignores them
    scale = max(float(np.max(np.abs(x))) for x in a)
    moved = max(float(np.max(np.abs(x - y))) for x, y in zip(a, b))
    assert moved <= 0.01 * scale, (moved, scale)


def test_fp32_tflite_matches_onnxruntime_and_keeps_integer_inputs(lowered) -> None:
    res, sess = lowered
    tfl = res.targets["tflite"]
    fp32 = Path(res.out_dir) / Path(tfl.artifact).parent / "model_fp32.tflite"
    samples = _samples(8, 7)
    ys, ins = _run_tflite(fp32, samples)
    for s, y in zip(samples, ys):
        ref = sess.run(None, s)[0]
        assert _cos(ref, y) > 0.99999
        np.testing.assert_allclose(y, ref, atol=1e-4, rtol=1e-3)
    assert sorted((d["name"], np.dtype(d["dtype"]).name) for d in ins) == [("attention_mask", "int64"),
                                                                             ("input_ids", "int64")]


def test_int8_tflite_is_integer_and_close_to_fp32(lowered) -> None:
    res, sess = lowered
    tfl = res.targets["tflite"]
    path = Path(res.out_dir) / tfl.artifact
    assert path.name == "model_int8.tflite"
    samples = _samples(24, 11)
    ys, ins = _run_tflite(path, samples)
    assert {np.dtype(d["dtype"]).name for d in ins} == {"int64"}  # token ids and mask keep their dtype
    cos = [_cos(sess.run(None, s)[0], y) for s, y in zip(samples, ys)]
    assert float(np.mean(cos)) > 0.99, cos
    assert min(cos) > 0.97, cos
    # the matrix products and the GELU compute in integer; whatever stays float is reported: the
    # additive mask (float32 minimum), the score Add and the Softmax it feeds are a float island
    floats = {f["op"] for f in tfl.extra["float_ops"]}
    assert not floats & {"FULLY_CONNECTED", "BATCH_MATMUL", "GELU"}, floats
    assert all("mask" in f["reason"] for f in tfl.extra["float_nodes"] if f["op"] == "SOFTMAX")
    assert tfl.fidelity["sqnr_db"] > 20.0, tfl.fidelity
    # the padding mask path (float32 minimum) stays float: no int8 tensor carries its ~1e36 scale
    assert any("mask" in f["reason"] for f in tfl.extra["float_nodes"]), tfl.extra["float_nodes"]
    it = Interpreter(model_path=str(path))
    scales = [d["quantization"][0] for d in it.get_tensor_details() if d["dtype"] in (np.int8, np.int16)]
    assert max(scales) < 1.0, max(scales)


def _fp32_outputs(model: onnx.ModelProto, tmp: Path, sample: dict[str, np.ndarray], ref: list[np.ndarray]
                  ) -> list[np.ndarray]:
    """Convert to a float ``.tflite`` and run ``sample`` in the layout the file declares (onnx2tf may
    transpose rank-3 inputs; the backend reads the layout from the file, as here)."""
    from backends.tflite.convert import convert
    from backends.tflite.mapping import find_layout
    from backends.tflite.session import Session

    data = convert(model, tmp).data
    layout = find_layout(data, model, sample, False, ref)
    return Session(data, layout).run([sample])[0]


def test_lone_erf_slice_squeeze_expand_match_onnxruntime(tmp_path) -> None:
    """Ops outside the fused patterns: a lone Erf (polynomial), Slice with steps, Squeeze, Expand, Neg."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 6])
    # positive steps: onnx2tf 2.6.9 lowers a negative-step Slice to a custom op LiteRT cannot run
    # (test_negative_step_slice_is_refused_up_front)
    c = {"starts": np.array([1, 0], np.int64), "ends": np.array([4, 10], np.int64),
         "axes": np.array([1, 2], np.int64), "steps": np.array([1, 2], np.int64),
         "sq": np.array([0], np.int64), "shape": np.array([2, 3, 3], np.int64)}
    nodes = [helper.make_node("Erf", ["x"], ["e"]),
             helper.make_node("Slice", ["e", "starts", "ends", "axes", "steps"], ["s"]),
             helper.make_node("Squeeze", ["s", "sq"], ["q"]),
             helper.make_node("Expand", ["q", "shape"], ["y0"]),
             helper.make_node("Neg", ["y0"], ["y"])]
    graph = helper.make_graph(nodes, "ops", [x], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, 3])],
                              initializer=[numpy_helper.from_array(v, k) for k, v in c.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    xv = (np.random.default_rng(0).standard_normal((1, 4, 6)) * 1.5).astype(np.float32)
    ref = ort.InferenceSession(model.SerializeToString()).run(None, {"x": xv})[0]
    (y,) = _fp32_outputs(model, tmp_path, {"x": xv}, [ref])
    assert y.shape == ref.shape
    np.testing.assert_allclose(y, ref, atol=1e-6)


def test_negative_step_slice_is_refused_up_front() -> None:
    """A graph onnx2tf lowers to a custom op (``ONNX_SLICE``) that LiteRT cannot run: ``check`` says so
    in one error finding before any calibration, instead of a traceback later."""
    from backends.tflite.backend import TFLiteBackend

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 6])
    c = {"starts": np.array([5], np.int64), "ends": np.array([-10], np.int64), "axes": np.array([2], np.int64),
         "steps": np.array([-2], np.int64)}
    nodes = [helper.make_node("Slice", ["x", "starts", "ends", "axes", "steps"], ["y"])]
    graph = helper.make_graph(nodes, "neg", [x], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 3])],
                              initializer=[numpy_helper.from_array(v, k) for k, v in c.items()])
    findings = TFLiteBackend().check(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    assert [f.rule for f in findings] == ["tflite-convert"], findings
    assert "ONNX_SLICE" in findings[0].message and "\n" not in findings[0].message
