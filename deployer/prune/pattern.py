"""2:4 semi-structured sparsity: the pattern, where it lies in an ONNX weight, and a checker.

The pattern (NVIDIA Ampere sparse tensor cores; TensorRT Developer Guide, "Structured Sparsity";
cuSPARSELt): in every group of 4 consecutive weights along the *input-channel* (reduction, K) dimension at
least 2 are zero. For a convolution this holds for each output channel and each kernel position; for a
fully connected layer along K. The weight's input-channel axis in ONNX:

- ``Conv`` weight ``[O, I/groups, kh, kw]``: axis 1;
- ``Gemm`` weight ``B``: axis 1 with ``transB=1`` (``[N, K]``, torch ``nn.Linear``), axis 0 with ``transB=0``;
- ``MatMul`` with a constant second input ``[K, N]``: axis 0 (torch exports ``nn.Linear`` on 3-D inputs so).

A weight is read as a float initializer, or as the integer initializer of a ``DequantizeLinear`` (the
strongly typed INT8 form: ``int8`` values, symmetric, zero point 0, so a float 0 is the integer 0), through
a ``Cast`` (fp16 weights) if any. This module imports numpy and onnx only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

SPARSE_OPS = ("Conv", "Gemm", "MatMul")
GROUP = 4
"""Weights per group along the input-channel axis (2:4: at most 2 of them non-zero)."""


def input_channel_axis(node: onnx.NodeProto, ndim: int) -> int | None:
    """The axis of the weight (``node.input[1]``) that runs over the input channels, None when not a 2:4
    candidate (an op outside :data:`SPARSE_OPS`, a weight of unexpected rank)."""
    if node.op_type == "Conv":
        return 1 if ndim >= 3 else None
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return (1 if trans_b else 0) if ndim == 2 else None
    if node.op_type == "MatMul":
        return 0 if ndim == 2 else None
    return None


def is_2to4(w: np.ndarray, axis: int) -> bool:
    """True when every group of 4 consecutive weights along ``axis`` holds at most 2 non-zeros.

    ``w.shape[axis]`` must be a multiple of 4 (else False: TensorRT's sparse kernels need whole groups).
    """
    if w.shape[axis] % GROUP:
        return False
    g = np.moveaxis(w, axis, -1).reshape(-1, GROUP)
    return bool(np.all(np.count_nonzero(g, axis=1) <= 2))


def mask_2to4(w: np.ndarray, axis: int) -> np.ndarray:
    """Boolean keep-mask shaped like ``w``: in each group of 4 along ``axis`` the 2 largest ``|w|`` (magnitude
    pruning, as NVIDIA's ASP ``m4n2_1d``); ties keep the lower index.

    Raises:
        ValueError: ``w.shape[axis]`` is not a multiple of 4.
    """
    if w.shape[axis] % GROUP:
        raise ValueError(f"input-channel axis {axis} of a weight {w.shape} is not a multiple of {GROUP}")
    moved = np.moveaxis(np.abs(w), axis, -1)
    g = moved.reshape(-1, GROUP)
    order = np.argsort(-g, axis=1, kind="stable")[:, :2]
    keep = np.zeros_like(g, dtype=bool)
    np.put_along_axis(keep, order, True, axis=1)
    return np.moveaxis(keep.reshape(moved.shape), -1, axis)


@dataclass(frozen=True)
class WeightPattern:
    """One weighted node of an ONNX graph as the checker saw it.

    Attributes:
        node: node name. op_type: ``Conv`` / ``Gemm`` / ``MatMul``.
        weight: the initializer holding the values (int8 for a Q/DQ weight).
        dtype: that initializer's numpy dtype name.
        shape: its shape; axis: its input-channel axis.
        sparse: the 2:4 pattern holds. zero_fraction: fraction of exact zeros.
    """

    node: str
    op_type: str
    weight: str
    dtype: str
    shape: tuple[int, ...]
    axis: int
    sparse: bool
    zero_fraction: float

    def to_dict(self) -> dict[str, object]:
        return {"node": self.node, "op_type": self.op_type, "weight": self.weight, "dtype": self.dtype,
                "shape": list(self.shape), "axis": self.axis, "sparse_2to4": self.sparse,
                "zero_fraction": round(self.zero_fraction, 4)}


def _weight(model: onnx.ModelProto, name: str) -> tuple[str, np.ndarray] | None:
    """The constant behind tensor ``name``: an initializer, or one reached through DequantizeLinear/Cast."""
    inits = {i.name: i for i in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    for _ in range(4):
        if name in inits:
            return name, numpy_helper.to_array(inits[name])
        node = producers.get(name)
        if node is None:
            return None
        if node.op_type == "Constant":
            attr = next((a for a in node.attribute if a.name == "value"), None)
            return (name, numpy_helper.to_array(attr.t)) if attr is not None else None
        if node.op_type not in ("DequantizeLinear", "Cast", "Identity"):
            return None
        name = node.input[0]
    return None


def weight_patterns(model: onnx.ModelProto) -> list[WeightPattern]:
    """Every Conv/Gemm/MatMul with a constant weight, with its 2:4 status (graph order)."""
    out = []
    for node in model.graph.node:
        if node.op_type not in SPARSE_OPS or len(node.input) < 2:
            continue
        found = _weight(model, node.input[1])
        if found is None:
            continue
        name, w = found
        axis = input_channel_axis(node, w.ndim)
        if axis is None:
            continue
        out.append(WeightPattern(node.name, node.op_type, name, str(w.dtype), tuple(int(d) for d in w.shape), axis,
                                 is_2to4(w, axis), float(np.mean(w == 0)) if w.size else 0.0))
    return out


def sparse_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the nodes whose weight holds the 2:4 pattern."""
    return [p.node for p in weight_patterns(model) if p.sparse]


def check_2to4(model: onnx.ModelProto, expected: list[str] | None = None) -> dict[str, object]:
    """The 2:4 report of a graph: which weighted nodes hold the pattern, and whether ``expected`` all do.

    Args:
        expected: node names that must be 2:4 (e.g. the sparse nodes of the FP32 export before lowering);
            None: only report.

    Returns:
        ``{"sparse_nodes": [...], "dense_nodes": [...], "expected": n, "missing": [...], "ok": bool,
        "weights": [WeightPattern.to_dict()...]}``; ``ok`` is False when an expected node is not 2:4 (or absent).
    """
    pats = weight_patterns(model)
    sparse = [p.node for p in pats if p.sparse]
    missing = sorted(set(expected or []) - set(sparse))
    return {"sparse_nodes": sparse, "dense_nodes": [p.node for p in pats if not p.sparse],
            "expected": len(expected or []), "missing": missing, "ok": not missing,
            "weights": [p.to_dict() for p in pats]}
