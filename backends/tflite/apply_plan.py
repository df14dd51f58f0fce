"""Write the plan's activation ranges into a full-integer ``.tflite`` flatbuffer.

The TFLite converter produces the integer kernels and weights (symmetric per-channel int8, the same
scheme as the plan); this pass then sets every activation tensor that corresponds to an ONNX tensor of
the plan to the plan's range, under the TFLite int8 spec
(https://ai.google.dev/edge/litert/models/quantization_spec):

- activations: asymmetric int8, ``scale = (max - min) / 255``, zero point in [-128, 127];
- ops whose output must equal their input parameters (RESHAPE, pooling, CONCATENATION inputs and
  output, PAD, TRANSPOSE, SQUEEZE ...) and ops with fixed output parameters (SOFTMAX/LOGISTIC
  1/256, -128; TANH 1/128, 0) keep the spec's values: listed as deviations;
- int32 biases are re-expressed with ``bias_scale = input_scale * weight_scale`` per channel;
- additive attention masks (0 where attended, the float32 minimum where padded; never in the plan):
  the ``ADD`` of scores and mask takes the scores' plan range, so padded positions saturate to its
  minimum, and the mask tensor gets ``[min - max, 0]`` (0 exact, the padding value saturating); the
  converter's own calibration of these tensors spans ~1e38 and makes the kernels unusable.

Tensors are matched by name: the TF translation names the last TF op of each ONNX node
``onnxt<k>x`` (k = index of the ONNX output), and LiteRT keeps that name first in fused tensor names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from deployer.patterns import MASK_MAGNITUDE
from deployer.plan import QuantPlan
from deployer.quant import asymmetric_params

TIED_OPS = {"RESHAPE", "MAX_POOL_2D", "AVERAGE_POOL_2D", "CONCATENATION", "PAD", "PADV2", "TRANSPOSE", "SQUEEZE",
            "EXPAND_DIMS", "GATHER", "SLICE", "STRIDED_SLICE", "SPLIT", "DEPTH_TO_SPACE", "SPACE_TO_DEPTH"}
FIXED_OUTPUT = {"SOFTMAX": (1 / 256, -128), "LOGISTIC": (1 / 256, -128), "TANH": (1 / 128, 0)}
BIAS_OPS = {"CONV_2D": (1, 2), "DEPTHWISE_CONV_2D": (1, 2), "FULLY_CONNECTED": (1, 2), "TRANSPOSE_CONV": (1, 3)}
_NAME = re.compile(r"onnxt(\d+)x")


@dataclass
class PlanApplication:
    """What was applied: tensor counts and the deviations from the plan (op, tensor, reason)."""

    from_plan: int = 0
    deviations: list[dict[str, Any]] = field(default_factory=list)
    unmapped: list[str] = field(default_factory=list)
    requantized_weights: list[str] = field(default_factory=list)


def _opnames() -> dict[int, str]:
    from tensorflow.lite.python import schema_py_generated as schema

    return {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}


def _str(raw: Any) -> str:
    return raw.decode() if isinstance(raw, bytes) else str(raw)


def activation_params(lo: float, hi: float, int16: bool) -> tuple[float, int]:
    """(scale, zero point) of a range: int8 asymmetric, or int16 symmetric (zero point 0) in 16x8 mode."""
    if not int16:
        return asymmetric_params(lo, hi)
    m = max(abs(lo), abs(hi), 1e-8)
    return m / 32767.0, 0


def apply_plan_ranges(tflite_bytes: bytes, plan: QuantPlan, onnx_tensor_by_id: list[str],
                      output_names: list[str], input_names: list[str],
                      per_tensor: bool = False) -> tuple[bytes, PlanApplication]:
    """Rewrite activation quantization parameters from ``plan``.

    Works on int8 models (activations int8 asymmetric) and 16x8 models (activations int16 symmetric);
    model inputs/outputs may be int8, uint8 (the converter's QUANTIZE op shifts the zero point by 128)
    or float (QUANTIZE/DEQUANTIZE at the boundary).

    Args:
        tflite_bytes: a full-integer model from the TFLite converter.
        plan: the plan whose ``ranges`` to apply.
        onnx_tensor_by_id: ONNX node-output names indexed by the ``k`` of ``onnxt<k>x``.
        output_names / input_names: ONNX graph outputs/inputs in order (matched by position).
        per_tensor: give every int8 weight tensor exactly one scale (TFLite Micro's FULLY_CONNECTED and
            some delegates have no per-channel kernels): C equal scales are stored as one; per-channel
            scales that differ (a converter that kept a layer per-channel) are requantized to the
            tensor's absolute maximum / 127 and listed in ``requantized_weights``.

    Returns:
        (new flatbuffer bytes, :class:`PlanApplication`).
    """
    from tensorflow.lite.python import schema_py_generated as schema
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(tflite_bytes))
    opname = _opnames()
    sg = model.subgraphs[0]
    res = PlanApplication()
    act_types = {schema.TensorType.INT8, schema.TensorType.INT16}
    int16 = schema.TensorType.INT16

    def code_of(op: Any) -> str:
        oc = model.operatorCodes[op.opcodeIndex]
        return opname.get(max(oc.builtinCode, oc.deprecatedBuiltinCode), "?")

    # graph inputs/outputs by position; through the boundary QUANTIZE/DEQUANTIZE ops of uint8/float I/O
    boundary: dict[int, str] = {}
    io_pairs: list[tuple[int, int]] = []  # (uint8/float I/O tensor, internal int tensor)
    g_in, g_out = [int(i) for i in sg.inputs], [int(o) for o in sg.outputs]
    boundary.update(zip(g_in, input_names))
    boundary.update(zip(g_out, output_names))
    for op in sg.operators:
        code = code_of(op)
        if code not in ("QUANTIZE", "DEQUANTIZE"):
            continue
        i, o = int(op.inputs[0]), int(op.outputs[0])
        if i in g_in and i in boundary:
            boundary[o] = boundary[i]
            io_pairs.append((i, o))
        if o in g_out and o in boundary:
            boundary[i] = boundary[o]
            io_pairs.append((o, i))

    def onnx_name(ti: int) -> str | None:
        if ti in boundary:
            return boundary[ti]
        ks = [int(k) for k in _NAME.findall(_str(sg.tensors[ti].name))]
        ks = [k for k in ks if k < len(onnx_tensor_by_id)]
        # a fused tensor (conv + bias + relu6) carries several names: the last ONNX tensor is its value
        return onnx_tensor_by_id[max(ks)] if ks else None

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
        for o in op.outputs:
            producers[int(o)] = code_of(op)

    def is_activation(ti: int) -> bool:
        t = sg.tensors[ti]
        if t.type not in act_types or t.quantization is None or t.quantization.scale is None:
            return False
        if len(t.quantization.scale) != 1:
            return False
        return not (t.buffer and model.buffers[t.buffer].data is not None and len(model.buffers[t.buffer].data))

    # 1. activations with a plan range
    for ti, t in enumerate(sg.tensors):
        if not is_activation(ti):
            continue
        name = onnx_name(ti)
        prod = producers.get(ti)
        if name is None:
            if prod not in TIED_OPS:  # layout transposes of the translation share their input's parameters
                res.unmapped.append(_str(t.name))
            continue
        r = plan.range_of(name)
        if r is None:
            res.unmapped.append(_str(t.name))
            continue
        if prod in FIXED_OUTPUT or prod in TIED_OPS:
            res.deviations.append({"tensor": name, "op": prod,
                                   "reason": "TFLite spec fixes this tensor's parameters (kept the spec's)"})
            continue
        scale, zp = activation_params(r.min, r.max, t.type == int16)
        set_params(ti, scale, zp)
        res.from_plan += 1

    # 1b. additive attention masks: ADD(scores, mask) where only the scores have a plan range
    _apply_masks(model, sg, code_of, onnx_name, plan, params, set_params, is_activation, res, int16)

    # 2. tied ops: output (and for CONCATENATION all inputs) share the first input's parameters
    for op in sg.operators:
        code = code_of(op)
        outs = [int(o) for o in op.outputs if is_activation(int(o))]
        if not outs:
            continue
        wide = sg.tensors[outs[0]].type == int16
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
                    qmin, qmax = (-32767, 32767) if wide else (-128, 127)
                    lo, hi = min(lo, (qmin - z[0]) * s[0]), max(hi, (qmax - z[0]) * s[0])
            scale, zp = activation_params(lo, hi, wide)
            for t in list(op.inputs) + list(op.outputs):
                set_params(int(t), scale, zp)
            continue
        if code in ("MINIMUM", "MAXIMUM") and len(op.inputs) == 2:
            # TFLite int8 spec: inputs and output share one scale/zero point; the activation input keeps
            # its plan range, the output and a constant operand take it (the constant requantized)
            act = [int(i) for i in op.inputs if is_activation(int(i))]
            s, z = params(act[0]) if act else ([], [])
            if len(s) == 1:
                for o in outs:
                    set_params(o, s[0], z[0])
                for ci in [int(i) for i in op.inputs if int(i) not in act]:
                    _requantize_const(model, sg, ci, s[0], z[0], params, set_params)
                res.deviations.append({"tensor": onnx_name(outs[0]) or _str(sg.tensors[outs[0]].name), "op": code,
                                       "reason": "TFLite int8 spec: MINIMUM/MAXIMUM inputs and output share one "
                                                 "scale (the input's plan range)"})
            continue
        if code in TIED_OPS and len(op.inputs) and op.inputs[0] >= 0:
            s, z = params(int(op.inputs[0]))
            if len(s) == 1:
                for o in outs:
                    set_params(o, s[0], z[0])
        if code in FIXED_OUTPUT and not wide:  # int16: the converter already wrote the spec's values
            s_fixed, z_fixed = FIXED_OUTPUT[code]
            for o in outs:
                set_params(o, s_fixed, z_fixed)

    # 3. uint8 model inputs/outputs: the same real range as the int8 tensor beside them, zero point + 128
    for io_t, inner in io_pairs:
        if sg.tensors[io_t].type == schema.TensorType.UINT8 and is_activation(inner):
            s, z = params(inner)
            set_params(io_t, s[0], z[0] + 128)

    # 4. per-tensor weights: exactly one scale per weight tensor (conv, depthwise, fully-connected); the
    #    int32 biases then follow in step 5 with one scale, input_scale * weight_scale
    if per_tensor:
        for ti, t in enumerate(sg.tensors):
            q = t.quantization
            if q is None or q.scale is None or len(q.scale) < 2 or t.type != schema.TensorType.INT8:
                continue
            if _weights_to_per_tensor(model, t):
                res.requantized_weights.append(_str(t.name))

    # 5. integer biases follow input_scale * weight_scale
    for op in sg.operators:
        code = code_of(op)
        if code not in BIAS_OPS:
            continue
        w_idx, b_idx = BIAS_OPS[code]
        in_idx = 2 if code == "TRANSPOSE_CONV" else 0
        if len(op.inputs) <= b_idx or op.inputs[b_idx] < 0:
            continue
        x_t, w_t, b_t = int(op.inputs[in_idx]), int(op.inputs[w_idx]), int(op.inputs[b_idx])
        bias = sg.tensors[b_t]
        bias_dtype = {schema.TensorType.INT32: np.int32, schema.TensorType.INT64: np.int64}.get(bias.type)
        if bias_dtype is None or not params(x_t)[0]:
            continue
        buf = model.buffers[bias.buffer]
        old_b_scale = np.asarray(bias.quantization.scale, np.float64)
        b_int = np.frombuffer(bytes(bytearray(buf.data)), dtype=bias_dtype).astype(np.float64)
        real = b_int * old_b_scale
        new_scale = params(x_t)[0][0] * np.asarray(sg.tensors[w_t].quantization.scale, np.float64)
        info = np.iinfo(np.int32)  # int64 biases (16x8) still hold values the kernels accumulate in 32/64 bits
        new_int = np.clip(np.rint(real / new_scale), info.min, info.max).astype(bias_dtype)
        buf.data = np.frombuffer(new_int.tobytes(), dtype=np.uint8)
        bias.quantization.scale = new_scale.astype(np.float32)
        bias.quantization.zeroPoint = np.zeros(len(new_scale), dtype=np.int64)

    return serialize(model), res


def _apply_masks(model: Any, sg: Any, code_of: Any, onnx_name: Any, plan: QuantPlan, params: Any, set_params: Any,
                 is_activation: Any, res: PlanApplication, int16: int) -> None:
    """Quantization of additive masks (see the module docstring): for each ``ADD`` whose output has
    no plan range, one input a plan range (the scores) and the other a mask-sized range (beyond
    :data:`deployer.patterns.MASK_MAGNITUDE`), the output takes the scores' range; the mask tensor
    ``[min(scores.min - scores.max over its ADDs), 0]``, with the constant inputs of a ``SELECT``
    producing it requantized to the new parameters."""

    def span(ti: int) -> float:
        s, z = params(ti)
        if len(s) != 1:
            return 0.0
        q = (-32768, 32767) if sg.tensors[ti].type == int16 else (-128, 127)
        return max(abs((q[0] - z[0]) * s[0]), abs((q[1] - z[0]) * s[0]))

    def plan_range(ti: int) -> Any:
        name = onnx_name(ti)
        return plan.range_of(name) if name else None

    producer = {int(o): op for op in sg.operators for o in op.outputs}
    mask_lo: dict[int, float] = {}
    for op in sg.operators:
        if code_of(op) != "ADD" or len(op.inputs) != 2:
            continue
        out = int(op.outputs[0])
        ins = [int(i) for i in op.inputs]
        if not is_activation(out) or plan_range(out) is not None or not all(is_activation(i) for i in ins):
            continue
        ranged = [i for i in ins if plan_range(i) is not None]
        if len(ranged) != 1:
            continue
        mask = ins[1] if ranged[0] == ins[0] else ins[0]
        if plan_range(mask) is not None or span(mask) < MASK_MAGNITUDE:
            continue
        r = plan_range(ranged[0])
        wide = sg.tensors[out].type == int16
        set_params(out, *activation_params(r.min, r.max, wide))
        mask_lo[mask] = min(mask_lo.get(mask, 0.0), r.min - r.max)
        res.deviations.append({"tensor": onnx_name(out) or _str(sg.tensors[out].name), "op": "ADD",
                               "reason": "additive attention mask: the sum takes the scores' plan range (masked "
                                         "positions saturate to its minimum)"})
        _drop(res.unmapped, _str(sg.tensors[out].name))
    for ti, lo in mask_lo.items():
        wide = sg.tensors[ti].type == int16
        scale, zp = activation_params(lo, 0.0, wide)
        prod = producer.get(ti)
        if prod is not None and code_of(prod) in ("SELECT", "SELECT_V2"):
            for ci in [int(i) for i in prod.inputs[1:]]:
                if sg.tensors[ci].type == sg.tensors[ti].type:
                    _requantize_const(model, sg, ci, scale, zp, params, set_params)
        set_params(ti, scale, zp)
        _drop(res.unmapped, _str(sg.tensors[ti].name))


def _requantize_const(model: Any, sg: Any, ci: int, scale: float, zp: int, params: Any, set_params: Any) -> None:
    """Re-express the int8/int16 constant tensor ``ci`` (per-tensor) in new parameters ``(scale, zp)``."""
    from tensorflow.lite.python import schema_py_generated as schema

    t = sg.tensors[ci]
    buf = model.buffers[t.buffer] if t.buffer else None
    s, z = params(ci)
    if buf is None or buf.data is None or len(s) != 1:
        return
    dt = np.int16 if t.type == schema.TensorType.INT16 else np.int8
    real = (np.frombuffer(bytes(bytearray(buf.data)), dtype=dt).astype(np.float64) - z[0]) * s[0]
    info = np.iinfo(dt)
    q = np.clip(np.rint(real / scale + zp), info.min, info.max).astype(dt)
    buf.data = np.frombuffer(q.tobytes(), dtype=np.uint8)
    set_params(ci, scale, zp)


def _weights_to_per_tensor(model: Any, t: Any) -> bool:
    """Store the per-channel int8 weight tensor ``t`` with one scale and zero point 0.

    Equal scales (up to float rounding) keep the int8 values; otherwise the real weights are
    requantized symmetric per-tensor, ``scale = max|w| / 127`` (the spec's [-127, 127]).
    Returns True when the values were requantized.
    """
    q = t.quantization
    sc = np.asarray(q.scale, np.float64)
    requantized = False
    if sc.max() - sc.min() > 1e-6 * sc.max():
        buf = model.buffers[t.buffer]
        shape = [int(d) for d in t.shape]
        w = np.frombuffer(bytes(bytearray(buf.data)), dtype=np.int8).astype(np.float64).reshape(shape)
        bshape = [1] * len(shape)
        bshape[int(q.quantizedDimension)] = len(sc)
        real = w * sc.reshape(bshape)
        scale = max(float(np.abs(real).max()) / 127.0, 1e-12)
        new = np.clip(np.rint(real / scale), -127, 127).astype(np.int8)
        buf.data = np.frombuffer(new.tobytes(), dtype=np.uint8)
        sc = np.asarray([scale])
        requantized = True
    q.scale = np.asarray([sc.max()], np.float32)
    q.zeroPoint = np.zeros(1, np.int64)
    q.quantizedDimension = 0
    return requantized


def _drop(items: list[str], item: str) -> None:
    if item in items:
        items.remove(item)


def serialize(model: Any) -> bytes:
    """Serialize a flatbuffer object-API model, storing each distinct numeric vector once.

    TFLite requires one int64 zero point per scale (``interpreter_builder.cc`` ``ParseQuantization``),
    so a per-channel weight and its int32 bias each carry a vector of C zeros: about 0.35 MB in
    EfficientNet-Lite0. Flatbuffers let tables share a vector (as ``CreateSharedString`` shares
    strings); identical vectors are written once and referenced by offset. The content read by any
    flatbuffer reader is unchanged.
    """
    import flatbuffers
    from tensorflow.lite.tools import flatbuffer_utils

    class SharingBuilder(flatbuffers.Builder):  # type: ignore[misc]
        __slots__ = ("seen",)

        def CreateNumpyVector(self, x: np.ndarray) -> int:  # noqa: N802 (flatbuffers' name)
            arr = np.asarray(x)
            key = (arr.dtype.str, arr.size, arr.tobytes())
            if key not in self.seen:
                self.seen[key] = super().CreateNumpyVector(arr)
            return self.seen[key]

    builder = SharingBuilder(1024)
    builder.seen = {}
    offset = model.Pack(builder)
    builder.Finish(offset, file_identifier=flatbuffer_utils._TFLITE_FILE_IDENTIFIER)
    return bytes(builder.Output())


def float_ops(tflite_bytes: bytes) -> list[dict[str, str]]:
    """Operators that compute in float in a (nominally) integer model: (op, tensor, reason).

    QUANTIZE/DEQUANTIZE at float model inputs/outputs (``--tflite-io float``) are the intended boundary
    and are not listed.
    """
    from tensorflow.lite.python import schema_py_generated as schema
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(tflite_bytes))
    opname = _opnames()
    found = []
    for sg in model.subgraphs:
        for op in sg.operators:
            oc = model.operatorCodes[op.opcodeIndex]
            code = opname.get(max(oc.builtinCode, oc.deprecatedBuiltinCode), "?")
            if code in ("QUANTIZE", "DEQUANTIZE"):
                continue
            outs = [sg.tensors[int(o)] for o in op.outputs if o >= 0]
            if any(t.type in (schema.TensorType.FLOAT32, schema.TensorType.FLOAT16) for t in outs):
                found.append({"op": code, "tensor": _str(outs[0].name),
                              "reason": "the TFLite converter has no integer kernel for this op here; it runs in "
                                        "float between DEQUANTIZE/QUANTIZE"})
    return found


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
