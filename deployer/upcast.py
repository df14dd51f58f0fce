"""Float16 / bfloat16 models: up-cast to a float32 reference for calibration and lowering.

Observers, the ONNX Runtime CPU kernels used for calibration and verification, and QuantizeLinear
(opset 13-18: float32 or int32 input only, ONNX operator spec) work in float32, so a model stored in
float16 or bfloat16 (issue 22: a MatMul-Relu-MatMul in float16 gave an ``InvalidGraph`` traceback on
tensorrt and onnxruntime) is turned into its float32 up-cast: every float16/bfloat16 initializer,
``Constant`` / ``ConstantOfShape`` value, graph input/output/value_info type and ``Cast(to=...)`` becomes
float32. Up-casting is exact (every float16 and bfloat16 value is a float32 value), so the float32 graph
computes what the source graph computes, without its intermediate roundings.

Calibration samples keep the source model's input dtype (a float16 input takes float16 ``.npy``
files) and are up-cast as they are read (:func:`upcast_samples`). The plan records the source precision
(``plan.model["source_precision"]``); nodes the recipe leaves in float are kept in FP16 where the
target runs FP16 (the plan marks them ``fp16``), else in FP32, and the report says which.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

LOW_PRECISION: dict[int, str] = {int(TensorProto.FLOAT16): "float16", int(TensorProto.BFLOAT16): "bfloat16"}

__all__ = ["Upcast", "upcast_to_float32", "upcast_samples", "LOW_PRECISION"]


@dataclass(frozen=True)
class Upcast:
    """What :func:`upcast_to_float32` changed.

    Attributes:
        source_precision: ``float16``, ``bfloat16`` (the most common low float type of the model) or
            ``float32`` when nothing was up-cast.
        inputs: graph inputs that were float16/bfloat16 -> their source dtype name.
        outputs: graph outputs that were float16/bfloat16 -> their source dtype name.
        tensors: number of initializers and constants up-cast.
    """

    source_precision: str = "float32"
    inputs: dict[str, str] = field(default_factory=dict)
    outputs: dict[str, str] = field(default_factory=dict)
    tensors: int = 0

    @property
    def changed(self) -> bool:
        return self.source_precision != "float32"

    def to_dict(self) -> dict[str, Any]:
        return {"source_precision": self.source_precision, "inputs": dict(self.inputs), "outputs": dict(self.outputs),
                "upcast_tensors": self.tensors}

    def note(self) -> str:
        """One line for the report."""
        io = ", ".join(f"{n}: {d}" for n, d in {**self.inputs, **self.outputs}.items()) or "none"
        return (f"the model is stored in {self.source_precision}: calibrated and lowered from its exact float32 "
                f"up-cast ({self.tensors} weight tensor(s)); the artifact's inputs and outputs are float32 (source "
                f"{self.source_precision} inputs/outputs: {io}); cast at the boundary")


def _tensor_to_float32(t: onnx.TensorProto) -> onnx.TensorProto:
    a = numpy_helper.to_array(t).astype(np.float32)  # bfloat16 arrays come back as float32 already
    out = numpy_helper.from_array(a, t.name)
    return out


def _retype(vi: onnx.ValueInfoProto) -> str | None:
    tt = vi.type.tensor_type
    if vi.type.HasField("tensor_type") and tt.elem_type in LOW_PRECISION:
        name = LOW_PRECISION[tt.elem_type]
        tt.elem_type = TensorProto.FLOAT
        return name
    return None


def upcast_to_float32(model: onnx.ModelProto) -> tuple[onnx.ModelProto, Upcast]:
    """The float32 up-cast of a model holding float16/bfloat16 tensors (the model itself if none).

    Returns:
        (model, what changed). Subgraphs (If/Loop bodies) are up-cast too.
    """
    counts: dict[str, int] = {}
    out = onnx.ModelProto()
    out.CopyFrom(model)
    n_tensors = _upcast_graph(out.graph, counts, top=True)
    inputs = {}
    for vi in out.graph.input:
        d = _retype(vi)
        if d:
            inputs[vi.name] = d
            counts[d] = counts.get(d, 0) + 1
    outputs = {}
    for vi in out.graph.output:
        d = _retype(vi)
        if d:
            outputs[vi.name] = d
            counts[d] = counts.get(d, 0) + 1
    if not counts:
        return model, Upcast()
    source = max(counts, key=lambda k: counts[k])
    return out, Upcast(source, inputs, outputs, n_tensors)


def _upcast_graph(g: onnx.GraphProto, counts: dict[str, int], top: bool = False) -> int:
    n = 0
    for i, t in enumerate(g.initializer):
        if t.data_type in LOW_PRECISION:
            counts[LOW_PRECISION[t.data_type]] = counts.get(LOW_PRECISION[t.data_type], 0) + 1
            g.initializer[i].CopyFrom(_tensor_to_float32(t))
            n += 1
    for vi in g.value_info:
        d = _retype(vi)
        if d:
            counts[d] = counts.get(d, 0) + 1
    for node in g.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.TENSOR and a.t.data_type in LOW_PRECISION:
                counts[LOW_PRECISION[a.t.data_type]] = counts.get(LOW_PRECISION[a.t.data_type], 0) + 1
                a.t.CopyFrom(_tensor_to_float32(a.t))
                n += 1
            elif a.type == onnx.AttributeProto.INT and a.name in ("to", "dtype") and a.i in LOW_PRECISION:
                counts[LOW_PRECISION[a.i]] = counts.get(LOW_PRECISION[a.i], 0) + 1
                a.i = TensorProto.FLOAT
            elif a.type == onnx.AttributeProto.GRAPH:
                n += _upcast_graph(a.g, counts)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for sub in a.graphs:
                    n += _upcast_graph(sub, counts)
    if not top:  # subgraph inputs/outputs; the main graph's are retyped (and recorded) by the caller
        for vi in list(g.input) + list(g.output):
            _retype(vi)
    return n


def upcast_samples(sample: dict[str, np.ndarray], inputs: dict[str, str]) -> dict[str, np.ndarray]:
    """One calibration sample of the source model -> the float32 reference's (``inputs``: the up-cast names)."""
    return {k: (np.asarray(v, dtype=np.float32) if k in inputs else v) for k, v in sample.items()}

