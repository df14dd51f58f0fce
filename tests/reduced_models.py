"""Tiny models built in code for the reduced public bug cases of issue 22, with matching calibration folders.

- :func:`half_mlp`: MatMul-Relu-MatMul stored in float16 or bfloat16 throughout (inputs, weights, output).
- :func:`mixed_dtype`: a float16 input and a float32 input (Cast inside), a float16 output.
- :func:`conv_model`: Conv or ConvTranspose with ``group`` 1 or 2 (4 -> 6 channels).
- :func:`gemm_bias`: Gemm (transB=1) with a bias of shape ``[N]``, ``[1, N]`` or a scalar.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

QDQ_TARGETS = ("tensorrt", "ascend", "onnxruntime")


def _model(nodes: list[onnx.NodeProto], inputs: list[onnx.ValueInfoProto], outputs: list[onnx.ValueInfoProto],
           inits: list[onnx.TensorProto]) -> onnx.ModelProto:
    g = helper.make_graph(nodes, "reduced", inputs, outputs, initializer=inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], producer_name="test")
    m.ir_version = 8
    onnx.checker.check_model(m, full_check=True)
    return m


def half_mlp(dtype: str = "float16") -> onnx.ModelProto:
    """1x8 -> MatMul(8x16) -> Relu -> MatMul(16x4) -> 1x4, every tensor in ``dtype`` (float16 | bfloat16)."""
    rng = np.random.default_rng(0)
    w1 = rng.normal(0, 0.5, (8, 16)).astype(np.float32)
    w2 = rng.normal(0, 0.5, (16, 4)).astype(np.float32)
    et = TensorProto.FLOAT16 if dtype == "float16" else TensorProto.BFLOAT16
    if dtype == "float16":
        inits = [numpy_helper.from_array(w1.astype(np.float16), "w1"), numpy_helper.from_array(w2.astype(np.float16), "w2")]
    else:
        inits = [helper.make_tensor(n, et, list(w.shape), w.reshape(-1).tolist()) for n, w in (("w1", w1), ("w2", w2))]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="mm2")]
    return _model(nodes, [helper.make_tensor_value_info("x", et, [1, 8])],
                  [helper.make_tensor_value_info("y", et, [1, 4])], inits)


def mixed_dtype() -> onnx.ModelProto:
    """Inputs ``a`` float16 [1, 8] and ``b`` float32 [1, 8]: Cast(a) + b -> MatMul(8x4) -> Cast to float16 -> y."""
    rng = np.random.default_rng(1)
    w = numpy_helper.from_array(rng.normal(0, 0.5, (8, 4)).astype(np.float32), "w")
    nodes = [helper.make_node("Cast", ["a"], ["a32"], name="cast_in", to=TensorProto.FLOAT),
             helper.make_node("Add", ["a32", "b"], ["s"], name="add"),
             helper.make_node("MatMul", ["s", "w"], ["m"], name="mm"),
             helper.make_node("Cast", ["m"], ["y"], name="cast_out", to=TensorProto.FLOAT16)]
    return _model(nodes, [helper.make_tensor_value_info("a", TensorProto.FLOAT16, [1, 8]),
                          helper.make_tensor_value_info("b", TensorProto.FLOAT, [1, 8])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [1, 4])], [w])


def conv_model(op: str = "ConvTranspose", group: int = 2) -> onnx.ModelProto:
    """1x4x5x5 -> ``op`` (3x3, ``group``, 4 -> 6 channels; ConvTranspose stride 2) -> Relu."""
    rng = np.random.default_rng(2)
    if op == "ConvTranspose":
        wshape, attrs, out = (4, 6 // group, 3, 3), {"strides": [2, 2]}, [1, 6, 11, 11]
    else:
        wshape, attrs, out = (6, 4 // group, 3, 3), {"pads": [1, 1, 1, 1]}, [1, 6, 5, 5]
    w = numpy_helper.from_array(rng.normal(0, 0.5, wshape).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.normal(0, 0.1, (6,)).astype(np.float32), "b")
    nodes = [helper.make_node(op, ["x", "w", "b"], ["c"], name="conv", group=group, **attrs),
             helper.make_node("Relu", ["c"], ["y"], name="relu")]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 5, 5])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, out)], [w, b])


def gemm_bias(shape: tuple[int, ...]) -> onnx.ModelProto:
    """1x8 -> Gemm(transB=1, W 5x8, bias of ``shape``: (5,), (1, 5) or ()) -> 1x5."""
    rng = np.random.default_rng(3)
    w = numpy_helper.from_array(rng.normal(0, 0.5, (5, 8)).astype(np.float32), "w")
    b = numpy_helper.from_array(np.asarray(rng.normal(0, 0.3, shape), dtype=np.float32), "b")
    nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="fc", transB=1)]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5])], [w, b])


def write_samples(folder: Path, shapes: dict[str, tuple[tuple[int, ...], str]], n: int = 8, seed: int = 0) -> Path:
    """``n`` samples in ``folder``: one ``.npy`` per sample for a single input, else ``.npz`` keyed by input."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        arrays = {k: rng.uniform(-1, 1, s).astype(d) for k, (s, d) in shapes.items()}
        if len(arrays) == 1:
            np.save(folder / f"{i:03d}.npy", next(iter(arrays.values())))
        else:
            np.savez(folder / f"{i:03d}.npz", **arrays)
    return folder


CASES: dict[str, tuple[onnx.ModelProto, dict[str, tuple[tuple[int, ...], str]]]] = {}


def case(name: str) -> tuple[onnx.ModelProto, dict[str, tuple[tuple[int, ...], str]]]:
    """A named reduced case: (model, calibration input shapes and dtypes)."""
    if not CASES:
        CASES.update({
            "float16_mlp": (half_mlp("float16"), {"x": ((1, 8), "float16")}),
            "bfloat16_mlp": (half_mlp("bfloat16"), {"x": ((1, 8), "float32")}),  # numpy has no bfloat16
            "mixed_dtype": (mixed_dtype(), {"a": ((1, 8), "float16"), "b": ((1, 8), "float32")}),
            "conv_group2": (conv_model("Conv", 2), {"x": ((1, 4, 5, 5), "float32")}),
            "convtranspose_group1": (conv_model("ConvTranspose", 1), {"x": ((1, 4, 5, 5), "float32")}),
            "convtranspose_group2": (conv_model("ConvTranspose", 2), {"x": ((1, 4, 5, 5), "float32")}),
            "gemm_bias_n": (gemm_bias((5,)), {"x": ((1, 8), "float32")}),
            "gemm_bias_1n": (gemm_bias((1, 5)), {"x": ((1, 8), "float32")}),
            "gemm_bias_scalar": (gemm_bias(()), {"x": ((1, 8), "float32")}),
        })
    return CASES[name]


CASE_NAMES = ("float16_mlp", "bfloat16_mlp", "mixed_dtype", "conv_group2", "convtranspose_group1",
              "convtranspose_group2", "gemm_bias_n", "gemm_bias_1n", "gemm_bias_scalar")


def to_dtype(model: onnx.ModelProto, dtype: str) -> onnx.ModelProto:
    """``model`` stored in ``dtype`` (``float16`` | ``bfloat16``): every float32 initializer and graph
    input/output becomes that type (values rounded to it), as a half-precision export writes it."""
    et = TensorProto.FLOAT16 if dtype == "float16" else TensorProto.BFLOAT16
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for i, t in enumerate(out.graph.initializer):
        if t.data_type == TensorProto.FLOAT:
            a = numpy_helper.to_array(t)
            new = (numpy_helper.from_array(a.astype(np.float16), t.name) if dtype == "float16"
                   else helper.make_tensor(t.name, et, list(a.shape), a.reshape(-1).tolist()))
            out.graph.initializer[i].CopyFrom(new)
    for vi in list(out.graph.input) + list(out.graph.output):
        if vi.type.tensor_type.elem_type == TensorProto.FLOAT:
            vi.type.tensor_type.elem_type = et
    del out.graph.value_info[:]
    onnx.checker.check_model(out, full_check=True)
    return out


def variant(seed: int, index: int) -> tuple[str, onnx.ModelProto, dict[str, tuple[tuple[int, ...], str]]]:
    """A seeded random layer variant: Conv / ConvTranspose (group 1 or 2), Gemm (bias [N], [1, N], scalar
    or none) or the MLP, stored in float32, float16 or bfloat16. Returns (description, model, calibration spec)."""
    rng = np.random.default_rng([seed, index])
    kind = str(rng.choice(["Conv", "ConvTranspose", "Gemm", "MLP"]))
    dtype = str(rng.choice(["float32", "float16", "bfloat16"]))
    if kind in ("Conv", "ConvTranspose"):
        if dtype == "bfloat16":  # Conv/ConvTranspose take no bfloat16 before opset 22 (ONNX operator spec)
            dtype = "float16"
        group = int(rng.choice([1, 2]))
        model, shape, desc = conv_model(kind, group), (1, 4, 5, 5), f"{kind} group {group}"
    elif kind == "Gemm":
        bias = [(5,), (1, 5), ()][int(rng.integers(3))]
        model, shape, desc = gemm_bias(bias), (1, 8), f"Gemm bias {list(bias)}"
    else:
        model, shape, desc = half_mlp("float16"), (1, 8), "MatMul-Relu-MatMul"
        if dtype == "float32":
            from deployer.upcast import upcast_to_float32

            model = upcast_to_float32(model)[0]
    if dtype != "float32" and kind != "MLP":
        model = to_dtype(model, dtype)
    elif kind == "MLP" and dtype == "bfloat16":
        model = half_mlp("bfloat16")
    data = "float16" if dtype == "float16" else "float32"
    return f"{desc} in {dtype}", model, {model.graph.input[0].name: (shape, data)}
