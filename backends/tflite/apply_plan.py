"""Write the plan's activation ranges into a full-integer ``.tflite`` flatbuffer.

The TFLite converter produces the integer kernels and weights (symmetric per-channel int8, the same
scheme as the plan); this pass then sets every activation tensor that corresponds to an ONNX tensor of
the plan to the plan's range, under the TFLite int8 spec
(https://ai.google.dev/edge/litert/models/quantization_spec):

- activations: asymmetric int8, ``scale = (max - min) / 255``, zero point in [-128, 127];
- ops whose output must equal their input parameters (RESHAPE, pooling, CONCATENATION inputs and
  output, PAD, TRANSPOSE, SQUEEZE ...) and ops with fixed output parameters (SOFTMAX/LOGISTIC
  1/256, -128; TANH 1/128, 0) keep the spec's values: listed as deviations;
- int32 biases are re-expressed with ``bias_scale = input_scale * weight_scale`` per channel.

Tensors are matched by name: the TF translation names the last TF op of each ONNX node
``onnxt<k>x`` (k = index of the ONNX output), and LiteRT keeps that name first in fused tensor names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from deployer.plan import QuantPlan
from deployer.quant import asymmetric_params

TIED_OPS = {"RESHAPE", "MAX_POOL_2D", "AVERAGE_POOL_2D", "CONCATENATION", "PAD", "PADV2", "TRANSPOSE", "SQUEEZE",
            "EXPAND_DIMS", "GATHER", "SLICE", "STRIDED_SLICE", "SPLIT", "DEPTH_TO_SPACE", "SPACE_TO_DEPTH"}
FIXED_OUTPUT = {"SOFTMAX": (1 / 256, -128), "LOGISTIC": (1 / 256, -128), "TANH": (1 / 128, 0)}
BIAS_OPS = {"CONV_2D": (1, 2), "DEPTHWISE_CONV_2D": (1, 2), "FULLY_CONNECTED": (1, 2), "TRANSPOSE_CONV": (1, 3)}
_NAME = re.compile(r"^onnxt(\d+)x")


@dataclass
class PlanApplication:
    """What was applied: tensor counts and the deviations from the plan (op, tensor, reason)."""

    from_plan: int = 0
    deviations: list[dict[str, Any]] = field(default_factory=list)
    unmapped: list[str] = field(default_factory=list)


def _opnames() -> dict[int, str]:
    from tensorflow.lite.python import schema_py_generated as schema

    return {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}


def apply_plan_ranges(tflite_bytes: bytes, plan: QuantPlan, onnx_tensor_by_id: list[str],
                      output_names: list[str], input_names: list[str]) -> tuple[bytes, PlanApplication]:
    """Rewrite activation quantization parameters from ``plan``.

    Args:
        tflite_bytes: a full-integer model from the TFLite converter.
        plan: the plan whose ``ranges`` to apply.
        onnx_tensor_by_id: ONNX node-output names indexed by the ``k`` of ``onnxt<k>x``.
        output_names / input_names: ONNX graph outputs/inputs in order (matched by position).

    Returns:
        (new flatbuffer bytes, :class:`PlanApplication`).
    """
    from tensorflow.lite.python import schema_py_generated as schema
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(tflite_bytes))
    opname = _opnames()
    sg = model.subgraphs[0]
    res = PlanApplication()

    def onnx_name(ti: int) -> str | None:
        if ti in list(sg.outputs):
            return output_names[list(sg.outputs).index(ti)]
        if ti in list(sg.inputs):
            return input_names[list(sg.inputs).index(ti)]
        raw = sg.tensors[ti].name
        name = raw.decode() if isinstance(raw, bytes) else str(raw)
        m = _NAME.match(name)
        if m and int(m.group(1)) < len(onnx_tensor_by_id):
            return onnx_tensor_by_id[int(m.group(1))]
        return None

    def params(ti: int) -> tuple[list[float], list[int]]:
        q = sg.tensors[ti].quantization
        if q is None or q.scale is None:
            return [], []
        return list(q.scale), list(q.zeroPoint if q.zeroPoint is not None else [])

    def set_params(ti: int, scale: float, zp: int) -> None:
        q = sg.tensors[ti].quantization
        q.scale = np.array([scale], dtype=np.float32)
        q.zeroPoint = np.array([zp], dtype=np.int64)
        q.min = None
        q.max = None

    producers: dict[int, str] = {}
    for op in sg.operators:
        code = opname.get(model.operatorCodes[op.opcodeIndex].builtinCode, "?")
        for o in op.outputs:
            producers[int(o)] = code

    # 1. activations with a plan range
    int8 = schema.TensorType.INT8
    for ti, t in enumerate(sg.tensors):
        if t.type != int8 or t.quantization is None or t.quantization.scale is None or len(t.quantization.scale) != 1:
            continue
        if t.buffer and model.buffers[t.buffer].data is not None and len(model.buffers[t.buffer].data):
            continue  # a constant
        name = onnx_name(ti)
        prod = producers.get(ti)
        if name is None:
            res.unmapped.append(t.name.decode() if isinstance(t.name, bytes) else str(t.name))
            continue
        r = plan.range_of(name)
        if r is None:
            continue
        if prod in FIXED_OUTPUT or prod in TIED_OPS:
            res.deviations.append({"tensor": name, "op": prod,
                                   "reason": "TFLite spec fixes this tensor's parameters (kept the spec's)"})
            continue
        scale, zp = asymmetric_params(r.min, r.max)
        set_params(ti, scale, zp)
        res.from_plan += 1

    # 2. tied ops: output (and for CONCATENATION all inputs) share the first input's parameters
    for op in sg.operators:
        code = opname.get(model.operatorCodes[op.opcodeIndex].builtinCode, "?")
        if code == "CONCATENATION":
            # one scale for all inputs and the output: the union of the inputs' ranges
            lo, hi = 0.0, 0.0
            for i in list(op.inputs) + list(op.outputs):
                name = onnx_name(int(i))
                r = plan.range_of(name) if name else None
                if r is not None:  # the plan's range, exactly
                    lo, hi = min(lo, r.min), max(hi, r.max)
                    continue
                s, z = params(int(i))
                if len(s) == 1:
                    lo, hi = min(lo, (-128 - z[0]) * s[0]), max(hi, (127 - z[0]) * s[0])
            scale, zp = asymmetric_params(lo, hi)
            for t in list(op.inputs) + list(op.outputs):
                set_params(int(t), scale, zp)
            continue
        if code in TIED_OPS and len(op.inputs) and op.inputs[0] >= 0:
            s, z = params(int(op.inputs[0]))
            if len(s) == 1:
                for o in op.outputs:
                    set_params(int(o), s[0], z[0])
        if code in FIXED_OUTPUT:
            s_fixed, z_fixed = FIXED_OUTPUT[code]
            for o in op.outputs:
                set_params(int(o), s_fixed, z_fixed)

    # 3. int32 biases follow input_scale * weight_scale
    for op in sg.operators:
        code = opname.get(model.operatorCodes[op.opcodeIndex].builtinCode, "?")
        if code not in BIAS_OPS:
            continue
        w_idx, b_idx = BIAS_OPS[code]
        in_idx = 2 if code == "TRANSPOSE_CONV" else 0
        if len(op.inputs) <= b_idx or op.inputs[b_idx] < 0:
            continue
        x_t, w_t, b_t = int(op.inputs[in_idx]), int(op.inputs[w_idx]), int(op.inputs[b_idx])
        bias = sg.tensors[b_t]
        if bias.type != schema.TensorType.INT32:
            continue
        buf = model.buffers[bias.buffer]
        old_b_scale = np.asarray(bias.quantization.scale, np.float64)
        b_int = np.frombuffer(bytes(bytearray(buf.data)), dtype=np.int32).astype(np.float64)
        real = b_int * old_b_scale
        new_scale = params(x_t)[0][0] * np.asarray(sg.tensors[w_t].quantization.scale, np.float64)
        new_int = np.clip(np.rint(real / new_scale), -(2**31), 2**31 - 1).astype(np.int32)
        buf.data = np.frombuffer(new_int.tobytes(), dtype=np.uint8)
        bias.quantization.scale = new_scale.astype(np.float32)
        bias.quantization.zeroPoint = np.zeros(len(new_scale), dtype=np.int64)

    out = flatbuffer_utils.convert_object_to_bytearray(model)
    return bytes(out), res


def io_quantization(tflite_bytes: bytes) -> dict[str, list[dict[str, Any]]]:
    """Inputs/outputs with dtype, shape, scale and zero point, for the report (what an app feeds)."""
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_content=tflite_bytes)

    def describe(d: dict[str, Any]) -> dict[str, Any]:
        s, z = d["quantization"]
        return {"name": d["name"], "dtype": np.dtype(d["dtype"]).name, "shape": [int(x) for x in d["shape"]],
                "scale": float(s), "zero_point": int(z)}

    return {"inputs": [describe(d) for d in it.get_input_details()],
            "outputs": [describe(d) for d in it.get_output_details()]}
