"""Tiny models built in code, shared by the tests (each returns the path of the written ``.onnx``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def write_samples(folder: Path, shapes: dict[str, tuple[int, ...]], n: int, seed: int = 0,
                  low: float = -1.0, high: float = 1.0) -> Path:
    """``n`` random ``.npz`` samples keyed by input name (uniform in [low, high)), as ``--calib`` takes them."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        np.savez(folder / f"{i:04d}.npz", **{k: rng.uniform(low, high, s).astype(np.float32) for k, s in shapes.items()})
    return folder


def _save(graph: onnx.GraphProto, path: Path, opset: int = 17) -> Path:
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    onnx.save(m, str(path))
    return path


def decomposed_layernorm(path: Path, d: int = 16, seed: int = 0) -> Path:
    """MatMul -> LayerNorm written out op by op (ReduceMean, Sub, Pow, Sqrt, Div, Mul, Add) -> MatMul.

    Input ``x`` [1, 8, d]; output ``y`` [1, 8, d]. The variance path squares small differences, so one
    shared INT8 scale on it loses most of the signal: a reduced public bug case (issue 18)."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array((rng.standard_normal((d, d)) * 0.3).astype(np.float32), "w1"),
             numpy_helper.from_array((rng.standard_normal((d, d)) * 0.3).astype(np.float32), "w2"),
             numpy_helper.from_array(np.array(2.0, np.float32), "two"),
             numpy_helper.from_array(np.array(1e-5, np.float32), "eps"),
             numpy_helper.from_array(rng.uniform(0.5, 1.5, d).astype(np.float32), "gamma"),
             numpy_helper.from_array((rng.standard_normal(d) * 0.1).astype(np.float32), "beta")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
             helper.make_node("ReduceMean", ["h"], ["mu"], name="mean", axes=[-1]),
             helper.make_node("Sub", ["h", "mu"], ["dev"], name="sub"),
             helper.make_node("Pow", ["dev", "two"], ["sq"], name="pow"),
             helper.make_node("ReduceMean", ["sq"], ["var"], name="var", axes=[-1]),
             helper.make_node("Add", ["var", "eps"], ["vare"], name="add_eps"),
             helper.make_node("Sqrt", ["vare"], ["std"], name="sqrt"),
             helper.make_node("Div", ["dev", "std"], ["norm"], name="div"),
             helper.make_node("Mul", ["norm", "gamma"], ["scaled"], name="gamma_mul"),
             helper.make_node("Add", ["scaled", "beta"], ["ln"], name="beta_add"),
             helper.make_node("MatMul", ["ln", "w2"], ["y"], name="mm2")]
    g = helper.make_graph(nodes, "decomposed_ln", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, d])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, d])], inits)
    return _save(g, path)


def scores_and_boxes(path: Path, seed: int = 0) -> Path:
    """A detector-like head: Conv -> Relu -> GlobalAveragePool -> Flatten, then two Gemm heads:
    ``scores`` [1, 3] (Softmax: a class distribution) and ``boxes`` [1, 4] (regression). Input ``x`` [1, 3, 8, 8]."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array((rng.standard_normal((8, 3, 3, 3)) * 0.3).astype(np.float32), "cw"),
             numpy_helper.from_array(np.zeros(8, np.float32), "cb"),
             numpy_helper.from_array((rng.standard_normal((3, 8)) * 0.5).astype(np.float32), "sw"),
             numpy_helper.from_array(np.zeros(3, np.float32), "sb"),
             numpy_helper.from_array((rng.standard_normal((4, 8)) * 0.5).astype(np.float32), "bw"),
             numpy_helper.from_array(np.array([0.5, 0.5, 2.0, 2.0], np.float32), "bb")]
    nodes = [helper.make_node("Conv", ["x", "cw", "cb"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("GlobalAveragePool", ["r"], ["p"], name="gap"),
             helper.make_node("Flatten", ["p"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "sw", "sb"], ["logits"], name="score_fc", transB=1),
             helper.make_node("Softmax", ["logits"], ["scores"], name="softmax", axis=-1),
             helper.make_node("Gemm", ["f", "bw", "bb"], ["boxes"], name="box_fc", transB=1)]
    g = helper.make_graph(nodes, "head", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                          [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, 3]),
                           helper.make_tensor_value_info("boxes", TensorProto.FLOAT, [1, 4])], inits)
    return _save(g, path)


def conv_lstm_with_state(path: Path, seed: int = 0) -> Path:
    """A voice-activity-style model: Conv1d over features, an LSTM with state input and output, a
    sigmoid probability. Inputs ``x`` [1, 4, 16] and ``h0``/``c0`` [1, 1, 8]; outputs ``prob`` [1, 16, 1],
    ``hn``/``cn`` [1, 1, 8] (exported from PyTorch)."""
    import torch

    torch.manual_seed(seed)

    class Vad(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv1d(4, 8, 3, padding=1)
            self.lstm = torch.nn.LSTM(8, 8, batch_first=True)
            self.head = torch.nn.Linear(8, 1)

        def forward(self, x: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor) -> tuple[torch.Tensor, ...]:
            f = torch.relu(self.conv(x)).transpose(1, 2)
            y, (hn, cn) = self.lstm(f, (h0, c0))
            return torch.sigmoid(self.head(y)), hn, cn

    args = (torch.randn(1, 4, 16), torch.zeros(1, 1, 8), torch.zeros(1, 1, 8))
    torch.onnx.export(Vad().eval(), args, str(path), input_names=["x", "h0", "c0"],
                      output_names=["prob", "hn", "cn"], opset_version=17, dynamo=False)
    return path


def outlier_matmul(path: Path, d: int = 16, seed: int = 0) -> Path:
    """``y = Relu(x @ w1) @ w2`` where calibration puts channel 0 of ``x`` at +-1000 and the others at +-1,
    while ``w1``'s row 0 is 1e-4: one per-tensor INT8 scale for ``x`` rounds the informative channels to
    zero (SQNR near 0 dB), and only keeping ``mm1`` in higher precision recovers it. Input ``x`` [1, 8, d]."""
    rng = np.random.default_rng(seed)
    w1 = (rng.standard_normal((d, d)) * 0.3).astype(np.float32)
    w1[0] = 1e-4
    inits = [numpy_helper.from_array(w1, "w1"),
             numpy_helper.from_array((rng.standard_normal((d, d)) * 0.3).astype(np.float32), "w2")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="mm2")]
    g = helper.make_graph(nodes, "outlier", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, d])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, d])], inits)
    return _save(g, path)


def write_outlier_samples(folder: Path, n: int, d: int = 16, seed: int = 0) -> Path:
    """Samples for :func:`outlier_matmul`: channel 0 uniform in +-1000, the others in +-1."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        x = rng.uniform(-1, 1, (1, 8, d)).astype(np.float32)
        x[..., 0] *= 1000.0
        np.savez(folder / f"{i:04d}.npz", x=x)
    return folder
