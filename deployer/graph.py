"""Small read-only views of an ONNX graph: producers, consumers, constants, weight inputs."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

WEIGHTED_OPS = {"Conv": 1, "ConvTranspose": 1, "Gemm": 1, "MatMul": 1}
"""Op type -> index of the weight input."""


@dataclass
class GraphView:
    """Index of a model's graph (built once, not updated on edits)."""

    model: onnx.ModelProto

    def __post_init__(self) -> None:
        g = self.model.graph
        self.initializers = {i.name: i for i in g.initializer}
        self.constants: dict[str, np.ndarray] = {n: numpy_helper.to_array(t) for n, t in self.initializers.items()}
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in g.node:
            if node.op_type == "Constant":
                for a in node.attribute:
                    if a.name == "value":
                        self.constants[node.output[0]] = numpy_helper.to_array(a.t)
            for o in node.output:
                self.producer[o] = node
            for i in node.input:
                if i:
                    self.consumers.setdefault(i, []).append(node)
        self.graph_inputs = [i.name for i in g.input if i.name not in self.initializers]
        self.graph_outputs = [o.name for o in g.output]
        self.nodes = {n.name: n for n in g.node}

    def is_constant(self, name: str) -> bool:
        return name in self.constants

    def weight_of(self, node: onnx.NodeProto) -> np.ndarray | None:
        """The constant weight of a Conv/ConvTranspose/Gemm/MatMul node, else None."""
        idx = WEIGHTED_OPS.get(node.op_type)
        if idx is None or len(node.input) <= idx:
            return None
        return self.constants.get(node.input[idx])

    def tensor_names(self) -> set[str]:
        names = set(self.graph_inputs) | set(self.graph_outputs)
        for n in self.model.graph.node:
            names.update(x for x in n.input if x)
            names.update(n.output)
        return names


def weight_channel_axis(node: onnx.NodeProto) -> int:
    """Output-channel axis of a node's weight: Conv 0, ConvTranspose 1, Gemm 0 if transB else 1, MatMul 1."""
    if node.op_type == "Conv":
        return 0
    if node.op_type == "ConvTranspose":
        return 1
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1
    return 1  # MatMul (K, N): one scale per output column


def tensor_types(model: onnx.ModelProto) -> dict[str, int]:
    """ONNX element type of every tensor shape inference can type, plus every initializer
    (the model is returned untyped where shape inference fails)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:
        inferred = model
    types = {vi.name: vi.type.tensor_type.elem_type for vi in
             list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)}
    for init in model.graph.initializer:
        types[init.name] = init.data_type
    return types
