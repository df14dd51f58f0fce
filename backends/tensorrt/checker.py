"""Check any ONNX model (ours or a user's QDQ model) against TensorRT's explicit-quantization rules.

The rules are data (:data:`RULES`): an id, a severity, what the rule says, the fix, and the document it
comes from. ``error`` = the onnx-tensorrt parser or a strongly typed build refuses the graph (or builds
something other than what the graph says); ``warning`` = it builds, but slower or less accurate than it
could (bad Q/DQ placement is the main reason users see INT8 slower than FP16).

Sources (abbreviations used in :data:`RULES`):

- ``TRT-EQ``: TensorRT Developer Guide, "Working with Quantized Types" / "Explicit Quantization"
  (Q/DQ layers, quantization schemes, Q/DQ placement recommendations), TensorRT 10.x.
- ``TRT-ST``: TensorRT Developer Guide, "Strongly Typed Networks" (TensorRT 10.x; the only mode in 11.x).
- ``OTRT``: onnx-tensorrt ``docs/operators.md`` (supported ops and their restrictions).
- ``ONNX``: ONNX operator specification (QuantizeLinear-13 adds ``axis``).

The checker reads the graph only; it never runs it. It works on graphs without shape information
(user models) and uses ONNX shape inference where it succeeds.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto

from deployer.findings import Finding
from deployer.graph import GraphView, tensor_types


@dataclass(frozen=True)
class Rule:
    """One TensorRT rule: ``id``, ``severity``, the fix, and its ``source`` document."""

    id: str
    severity: str
    summary: str
    fix: str
    source: str


RULES: dict[str, Rule] = {r.id: r for r in (
    Rule("integer-op", "error", "QLinear*/ConvInteger/MatMulInteger (operator-oriented quantization) is not "
         "supported; TensorRT reads the QDQ format only",
         "re-export in QDQ format (QuantizeLinear/DequantizeLinear around float ops)", "OTRT; TRT-EQ"),
    Rule("opset-too-low", "error", "per-channel Q/DQ (the axis attribute) needs ai.onnx opset >= 13",
         "convert the model to opset 13 or newer", "ONNX QuantizeLinear-13; TRT-EQ"),
    Rule("qdq-domain", "error", "Q/DQ in a non-standard domain (e.g. com.microsoft) is not parsed",
         "use ai.onnx QuantizeLinear/DequantizeLinear", "OTRT"),
    Rule("zero-point-missing", "error", "Q/DQ without a zero point defaults to uint8, which TensorRT does not "
         "quantize to", "add an int8 zero point of 0", "TRT-EQ (INT8 is signed, symmetric)"),
    Rule("zero-point-dtype", "error", "zero point is not int8 (uint8 asymmetric quantization is unsupported)",
         "requantize symmetrically to int8 with zero point 0", "TRT-EQ"),
    Rule("int32-dequantize", "error", "DequantizeLinear of an int32 tensor (a pre-quantized bias); TensorRT "
         "dequantizes int8/fp8/int4 only", "keep the bias in float (ONNX Runtime's quantizer: "
         "extra_options={'QuantizeBias': False})", "TRT-EQ (DequantizeLinear input types)"),
    Rule("zero-point-nonzero", "error", "zero point is not 0; TensorRT supports symmetric quantization only",
         "requantize symmetrically (scale = amax / 127, zero point 0)", "TRT-EQ; OTRT QuantizeLinear"),
    Rule("scale-not-constant", "error", "scale (or zero point) is computed at run time; it must be a "
         "build-time constant", "store the scale as an initializer or Constant", "TRT-EQ"),
    Rule("scale-nonpositive", "error", "scale has a zero or negative value",
         "clamp dead channels to a tiny positive scale (e.g. 1e-8 / 127), never 0", "TRT-EQ"),
    Rule("scale-nonfinite", "error", "scale is inf or NaN (typically a range calibrated on an attention-mask "
         "path holding -inf / float min)", "keep that tensor out of quantization or recalibrate it", "TRT-EQ"),
    Rule("activation-per-channel", "error", "per-channel quantization of an activation; TensorRT supports "
         "per-channel scales only for weights (constants)", "use one scale for the activation tensor", "TRT-EQ"),
    Rule("per-channel-axis", "error", "a weight's per-channel axis is not its consumer's output-channel axis "
         "(Conv 0, ConvTranspose 1, Gemm transB=1 0 / transB=0 1, MatMul last)",
         "quantize the weight along the output-channel axis", "TRT-EQ; OTRT"),
    Rule("scale-shape", "error", "per-channel scale length differs from the size of the quantized axis",
         "give one scale per channel of the axis", "ONNX QuantizeLinear; TRT-EQ"),
    Rule("quantize-not-dequantized", "error", "a QuantizeLinear output feeds something other than "
         "DequantizeLinear; TensorRT needs every Q followed by DQ", "insert a DequantizeLinear after it",
         "TRT-EQ"),
    Rule("mixed-float-inputs", "error", "inputs of one op that must share a type have different float types "
         "(fp16 vs fp32); a strongly typed network does not insert casts",
         "insert a Cast at the precision boundary", "TRT-ST"),
    Rule("double-tensor", "warning", "float64 tensor: TensorRT has no FP64 compute",
         "cast the model to float32", "OTRT"),
    Rule("weight-only", "warning", "the weight is quantized but the activation input is not: the layer "
         "runs in floating point (no INT8 kernel)", "quantize the activation input too", "TRT-EQ placement"),
    Rule("output-quantized", "warning", "the output of Conv/ConvTranspose/Gemm/MatMul is quantized while the "
         "consumer is not a quantized compute op; place Q/DQ on inputs of compute ops, not outputs",
         "move the Q/DQ to the inputs of the next Conv/Gemm/MatMul", "TRT-EQ placement"),
    Rule("residual-skip-unquantized", "warning", "residual Add after an INT8 Conv with a float skip branch: "
         "TensorRT cannot fuse the Add into the INT8 Conv", "quantize the skip-branch input of the Add",
         "TRT-EQ placement (residual add)"),
    Rule("concat-scales-differ", "warning", "quantized inputs of a Concat use different scales; TensorRT "
         "requantizes instead of concatenating INT8 in place", "give the Concat inputs and output one shared "
         "scale", "TRT-EQ placement (concat)"),
    Rule("redundant-requantize", "warning", "DQ -> (op that commutes with Q/DQ) -> Q re-quantizes a tensor "
         "that was already INT8", "remove the Q/DQ around the commuting op (pooling, reshape, transpose ...)",
         "TRT-EQ placement (Q/DQ propagation)"),
)}

INTEGER_OPS = frozenset({"QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger", "QLinearAdd",
                         "QLinearMul", "QLinearConcat", "QLinearAveragePool", "QLinearGlobalAveragePool",
                         "QLinearSigmoid", "QLinearLeakyRelu", "DynamicQuantizeLinear", "QGemm"})
COMPUTE_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
COMMUTING_OPS = frozenset({"MaxPool", "GlobalMaxPool", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze",
                           "Slice", "Gather", "Split", "Identity", "Pad", "Resize", "DepthToSpace", "SpaceToDepth"})
QDQ = frozenset({"QuantizeLinear", "DequantizeLinear"})
ALLOWED_ZP = {TensorProto.INT8} | {getattr(TensorProto, n) for n in ("FLOAT8E4M3FN", "INT4") if hasattr(TensorProto, n)}
# ops whose float inputs all share one type parameter (inputs at these indices)
SAME_TYPE_INPUTS: dict[str, tuple[int, ...]] = {
    **{op: (0, 1) for op in ("Add", "Sub", "Mul", "Div", "Pow", "MatMul", "Max", "Min", "Where")},
    **{op: (0, 1, 2) for op in ("Conv", "ConvTranspose", "Gemm")},
    "Concat": (), "Sum": (), "Mean": (),  # empty = every input
}
SAME_TYPE_INPUTS["Where"] = (1, 2)


def _finding(rule_id: str, node: str, detail: str = "") -> Finding:
    r = RULES[rule_id]
    msg = f"{r.summary}{': ' + detail if detail else ''}"
    return Finding(rule=r.id, node=node, message=msg, fix=r.fix, severity=r.severity, source=r.source)


def _attr(node: onnx.NodeProto, name: str, default: int | None = None) -> int | None:
    a = next((a for a in node.attribute if a.name == name), None)
    return default if a is None else int(onnx.helper.get_attribute_value(a))


def _types(model: onnx.ModelProto) -> dict[str, int]:
    types = tensor_types(model)
    for n in model.graph.node:
        if n.op_type == "Cast":
            types.setdefault(n.output[0], _attr(n, "to") or 0)
    return {k: v for k, v in types.items() if v}


def _expected_axis(consumer: onnx.NodeProto, ndim: int) -> int | None:
    if consumer.op_type == "Conv":
        return 0
    if consumer.op_type == "ConvTranspose":
        return 1
    if consumer.op_type == "Gemm":
        return 0 if _attr(consumer, "transB", 0) else 1
    if consumer.op_type == "MatMul":
        return ndim - 1
    return None


def check_model(model: onnx.ModelProto) -> list[Finding]:
    """Every TensorRT rule the model breaks, errors first.

    Args:
        model: any ONNX model (float, QDQ, strongly typed fp16/int8).

    Returns:
        findings naming the node and the fix; empty when the model is clean.
    """
    findings = list(_check(model))
    return sorted(findings, key=lambda f: (f.severity != "error", f.rule, f.node))


def _check(model: onnx.ModelProto) -> Iterator[Finding]:
    view = GraphView(model)
    types = _types(model)
    opset = max((i.version for i in model.opset_import if i.domain in ("", "ai.onnx")), default=0)
    nodes = list(model.graph.node)
    has_qdq = any(n.op_type in QDQ for n in nodes)
    if has_qdq and opset < 13:
        yield _finding("opset-too-low", "<model>", f"ai.onnx opset {opset}")

    def from_dq(t: str) -> onnx.NodeProto | None:
        p = view.producer.get(t)
        return p if p is not None and p.op_type == "DequantizeLinear" else None

    for n in nodes:
        name = n.name or f"{n.op_type}({n.output[0] if n.output else ''})"
        if n.op_type in INTEGER_OPS:
            yield _finding("integer-op", name, n.op_type)
            continue
        if n.op_type in QDQ:
            if n.domain not in ("", "ai.onnx"):
                yield _finding("qdq-domain", name, n.domain)
            yield from _check_qdq(n, name, view, types)
        t_idx = SAME_TYPE_INPUTS.get(n.op_type)
        if t_idx is not None:
            idx = t_idx or tuple(range(len(n.input)))
            fl = {types[n.input[i]] for i in idx if i < len(n.input) and n.input[i] in types
                  and types[n.input[i]] in (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16)}
            if len(fl) > 1:
                names = ", ".join(f"{n.input[i]}:{TensorProto.DataType.Name(types[n.input[i]]).lower()}"
                                  for i in idx if i < len(n.input) and n.input[i] in types)
                yield _finding("mixed-float-inputs", name, names)
        if n.op_type in COMPUTE_OPS:
            w_dq = from_dq(n.input[1]) if len(n.input) > 1 else None
            w_const = w_dq is not None and view.is_constant(w_dq.input[0]) or \
                (w_dq is not None and view.producer.get(w_dq.input[0]) is not None
                 and view.producer[w_dq.input[0]].op_type == "QuantizeLinear"
                 and view.is_constant(view.producer[w_dq.input[0]].input[0]))
            if w_dq is not None and w_const and not from_dq(n.input[0]) and not view.is_constant(n.input[0]):
                yield _finding("weight-only", name, f"input {n.input[0]!r} is float")
            for o in n.output:
                for c in view.consumers.get(o, []):
                    if c.op_type != "QuantizeLinear":
                        continue
                    dq_users = [u for q_out in c.output for d in view.consumers.get(q_out, [])
                                if d.op_type == "DequantizeLinear" for u in view.consumers.get(d.output[0], [])]
                    if dq_users and not any(u.op_type in COMPUTE_OPS | {"Add", "Concat"} for u in dq_users):
                        yield _finding("output-quantized", name, f"output {o!r} -> {c.name or 'QuantizeLinear'}")
        if n.op_type == "Add" and len(n.input) == 2:
            yield from _check_residual(n, name, view, from_dq, types)
        if n.op_type == "Concat":
            scales = []
            for t in n.input:
                d = from_dq(t)
                if d is not None and len(d.input) > 1 and d.input[1] in view.constants:
                    scales.append(float(np.ravel(view.constants[d.input[1]])[0]))
            if len(scales) > 1 and not np.allclose(scales, scales[0], rtol=1e-6):
                yield _finding("concat-scales-differ", name, f"scales {sorted(set(scales))}")
        if n.op_type == "QuantizeLinear":
            p = view.producer.get(n.input[0])
            if p is not None and p.op_type in COMMUTING_OPS and p.input and from_dq(p.input[0]) is not None:
                yield _finding("redundant-requantize", name, f"{p.op_type} {p.name!r} between DQ and Q")
    for t, ty in types.items():
        if ty == TensorProto.DOUBLE:
            yield _finding("double-tensor", t)


def _check_qdq(n: onnx.NodeProto, name: str, view: GraphView, types: dict[str, int]) -> Iterator[Finding]:
    scale_name = n.input[1] if len(n.input) > 1 else ""
    zp_name = n.input[2] if len(n.input) > 2 else ""
    scale = view.constants.get(scale_name)
    if scale is None:
        yield _finding("scale-not-constant", name, f"scale {scale_name!r}")
    else:
        s = np.asarray(scale, dtype=np.float64)
        if not np.all(np.isfinite(s)):
            yield _finding("scale-nonfinite", name, f"scale {scale_name!r}")
        elif np.any(s <= 0):
            yield _finding("scale-nonpositive", name, f"scale {scale_name!r} min {float(s.min()):g}")
    if not zp_name:
        if n.op_type == "QuantizeLinear" or not _is_int8_const(view, n.input[0], types):
            yield _finding("zero-point-missing", name)
    else:
        zp = view.constants.get(zp_name)
        if zp is None:
            yield _finding("scale-not-constant", name, f"zero point {zp_name!r}")
        else:
            zt = view.initializers[zp_name].data_type if zp_name in view.initializers else \
                onnx.helper.np_dtype_to_tensor_dtype(zp.dtype)
            if zt == TensorProto.INT32 and n.op_type == "DequantizeLinear":
                yield _finding("int32-dequantize", name, f"input {n.input[0]!r}")
            elif zt not in ALLOWED_ZP:
                yield _finding("zero-point-dtype", name, TensorProto.DataType.Name(zt).lower())
            elif np.any(np.asarray(zp).astype(np.float64) != 0):
                yield _finding("zero-point-nonzero", name, f"zero point {zp_name!r}")
    per_channel = scale is not None and np.asarray(scale).size > 1
    data = n.input[0]
    if n.op_type == "QuantizeLinear":
        users = view.consumers.get(n.output[0], [])
        bad = [u for u in users if u.op_type != "DequantizeLinear"]
        if bad:
            yield _finding("quantize-not-dequantized", name, f"feeds {bad[0].op_type} {bad[0].name!r}")
    if not per_channel:
        return
    # per-channel: only for constant weights, on the consumer's output-channel axis
    is_weight = view.is_constant(data) or (
        n.op_type == "DequantizeLinear" and (p := view.producer.get(data)) is not None
        and p.op_type == "QuantizeLinear" and view.is_constant(p.input[0]))
    if not is_weight:
        yield _finding("activation-per-channel", name, f"tensor {data!r}")
        return
    if n.op_type != "DequantizeLinear":
        return
    w = view.constants.get(data)
    if w is None:
        p = view.producer.get(data)
        w = view.constants.get(p.input[0]) if p is not None else None
    if w is None:
        return
    axis = _attr(n, "axis", 1) or 0
    axis = axis + w.ndim if axis < 0 else axis
    if 0 <= axis < w.ndim and np.asarray(scale).size != w.shape[axis]:
        yield _finding("scale-shape", name, f"{np.asarray(scale).size} scales for axis {axis} of size {w.shape[axis]}")
    for c in view.consumers.get(n.output[0], []):
        widx = 1
        if c.op_type in COMPUTE_OPS and len(c.input) > widx and c.input[widx] == n.output[0]:
            want = _expected_axis(c, w.ndim)
            if want is not None and axis != want:
                yield _finding("per-channel-axis", name, f"axis {axis} for {c.op_type} {c.name!r}, expected {want}")


def _is_int8_const(view: GraphView, t: str, types: dict[str, int]) -> bool:
    return view.is_constant(t) and types.get(t) == TensorProto.INT8


def _check_residual(n: onnx.NodeProto, name: str, view: GraphView, from_dq, types) -> Iterator[Finding]:
    branches = []
    for t in n.input:
        p = view.producer.get(t)
        int8_conv = (p is not None and p.op_type in ("Conv", "ConvTranspose", "Gemm") and len(p.input) > 1
                     and from_dq(p.input[1]) is not None and from_dq(p.input[0]) is not None
                     and len(view.consumers.get(t, [])) == 1)
        branches.append(int8_conv)
    if branches.count(True) == 1:
        skip = n.input[branches.index(False)]
        if from_dq(skip) is None and not view.is_constant(skip) and \
                types.get(skip, TensorProto.FLOAT) in (TensorProto.FLOAT, TensorProto.FLOAT16):
            # a skip branch of another shape (broadcast bias, mask) is no residual
            yield _finding("residual-skip-unquantized", name, f"skip input {skip!r}")
