"""``deploy check --target ascend``: every rule an ONNX QDQ graph must meet to become an Ascend deploy
model (AMCT/msModelSlim conversion, then ATC), reported by node with the fix.

Rules (DESIGN.md section 3, from Huawei's AMCT and ATC documentation) and the operator list
``data/ops.json`` (its ``cann_version`` and ``source`` name the CANN release and document).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from backends.ascend.atc import load_data
from deployer.findings import Finding
from deployer.graph import GraphView

_OPS = load_data("ops.json")
SUPPORTED_OPS = frozenset(_OPS["onnx_ops"])
QUANTIZABLE_OPS = frozenset(_OPS["quantizable_ops"])
OPSET_MIN, OPSET_MAX = int(_OPS["opset_min"]), int(_OPS["opset_max"])
OPS_SOURCE = f"CANN {_OPS['cann_version']}: {_OPS['source']}"
RULES_SOURCE = "DESIGN.md section 3 (Huawei AMCT ONNX quantization constraints; ATC ONNX parser)"
INT8_TYPES = (TensorProto.INT8,)
FLOAT_INPUT_BAD = {TensorProto.FLOAT16: "float16", TensorProto.BFLOAT16: "bfloat16", TensorProto.DOUBLE: "double"}
MASK_SCALE = 1e30  # a scale this large only comes from a -inf / float-min attention-mask range


def _attr(node: onnx.NodeProto, name: str, default: object = None) -> object:
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def check(model: onnx.ModelProto) -> list[Finding]:
    """Every broken Ascend rule of ``model``, by node, with the fix (errors first, graph order)."""
    f: list[Finding] = []

    def add(rule: str, node: str, message: str, fix: str, severity: str = "error", source: str = RULES_SOURCE) -> None:
        f.append(Finding(rule, node, message, fix, severity, source))

    # -- opset and domains --------------------------------------------------------------------------
    imports = [(i.domain, i.version) for i in model.opset_import]
    onnx_imports = [v for d, v in imports if d in ("", "ai.onnx")]
    foreign = [d for d, _ in imports if d not in ("", "ai.onnx")]
    if len(onnx_imports) != 1:
        add("opset-import", "<model>", f"{len(onnx_imports)} ai.onnx opset imports; ATC's parser reads exactly one",
            "re-export with a single ai.onnx opset import")
    opset = onnx_imports[0] if onnx_imports else 0
    if onnx_imports and not OPSET_MIN <= opset <= OPSET_MAX:
        add("opset-range", "<model>", f"opset {opset} is outside ATC's {OPSET_MIN}-{OPSET_MAX}",
            "convert with onnx.version_converter or re-export at opset 13", source=OPS_SOURCE)
    for d in foreign:
        add("foreign-domain", "<model>", f"opset import of domain {d!r}; ATC's parser accepts only ai.onnx",
            "remove the import and the nodes of that domain (e.g. run onnxslim / re-export without contrib ops)")

    view = GraphView(model)
    inits = view.constants
    g = model.graph

    for i in g.input:
        if i.name in view.initializers:
            continue
        et = i.type.tensor_type.elem_type
        if et in FLOAT_INPUT_BAD:
            add("input-not-fp32", i.name, f"graph input is {FLOAT_INPUT_BAD[et]}; Ascend quantization needs fp32 inputs",
                "export the model with float32 inputs (cast inside the graph if needed)")
        dims = i.type.tensor_type.shape.dim
        if any(not d.HasField("dim_value") for d in dims):
            add("input-dynamic", i.name, "graph input has symbolic dimensions; atc needs --input_shape for them",
                "pass --input-shapes name:SHAPE or name:MIN/OPT/MAX", severity="warning",
                source="ATC --input_shape / --dynamic_dims")

    q_nodes = {n.output[0]: n for n in g.node if n.op_type == "QuantizeLinear"}
    for n in g.node:
        label = n.name or f"{n.op_type}({n.output[0]})"
        if n.domain not in ("", "ai.onnx"):
            add("foreign-domain", label, f"{n.op_type} is in domain {n.domain!r}, which ATC's parser does not know",
                "replace it with ai.onnx ops")
            continue
        if n.op_type not in SUPPORTED_OPS and n.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            add("op-unsupported", label, f"{n.op_type} is not in CANN's supported ONNX operator list",
                "rewrite it with supported ops or keep it out of the model", source=OPS_SOURCE)
        if n.op_type == "QuantizeLinear":
            cons = view.consumers.get(n.output[0], [])
            if len(cons) != 1 or cons[0].op_type != "DequantizeLinear":
                add("qdq-untied", label, "QuantizeLinear output is not consumed by exactly one DequantizeLinear",
                    "give every QuantizeLinear its own DequantizeLinear (one Q/DQ pair per quantized tensor)")
            _check_qparams(n, inits, add, label)
        if n.op_type == "DequantizeLinear":
            q = q_nodes.get(n.input[0])
            if q is None:
                src = "an int8 initializer" if n.input[0] in inits else "a non-QuantizeLinear tensor"
                add("qdq-untied", label, f"DequantizeLinear reads {src}; Ascend's converter needs a tied Q/DQ pair",
                    "quantize the float tensor (weight) with a QuantizeLinear feeding this DequantizeLinear")
            elif list(q.input[1:]) != list(n.input[1:]) and not _same_params(q, n, inits):
                add("qdq-params-differ", label, "Q and DQ of a pair use different scale/zero point",
                    "use one scale and zero point for both nodes of the pair")
            if q is None:
                _check_qparams(n, inits, add, label)
            for c in view.consumers.get(n.output[0], []):
                _check_consumer(c, n, q, view, add)
    return sorted(f, key=lambda x: x.severity != "error")


def _same_params(a: onnx.NodeProto, b: onnx.NodeProto, inits: dict[str, np.ndarray]) -> bool:
    try:
        return all(np.array_equal(inits[x], inits[y]) for x, y in zip(a.input[1:], b.input[1:]))
    except KeyError:
        return False


def _check_qparams(n: onnx.NodeProto, inits: dict[str, np.ndarray], add: object, label: str) -> None:
    assert callable(add)
    scale = inits.get(n.input[1])
    if scale is None:
        add("scale-not-constant", label, "scale is not a constant", "make scale and zero point initializers")
        return
    s = np.asarray(scale, dtype=np.float64)
    if not np.all(np.isfinite(s)) or np.any(s > MASK_SCALE):
        add("scale-nonfinite", label, "scale is inf/NaN or astronomically large (a range calibrated on an "
            "attention mask filled with -inf / float-min)", "keep mask paths out of quantization")
    elif np.any(s <= 0):
        add("scale-nonpositive", label, "scale <= 0", "clamp dead channels to a tiny positive scale")
    if len(n.input) > 2 and n.input[2]:
        z = inits.get(n.input[2])
        if z is None:
            add("scale-not-constant", label, "zero point is not a constant", "make the zero point an initializer")
        elif z.dtype != np.int8:
            add("zero-point-type", label, f"zero point is {z.dtype}; AscendQuant produces int8",
                "use int8 zero points (asymmetric int8 activations)")


def _check_consumer(c: onnx.NodeProto, dq: onnx.NodeProto, q: onnx.NodeProto | None, view: GraphView,
                    add: object) -> None:
    assert callable(add)
    label = c.name or f"{c.op_type}({c.output[0]})"
    idx = list(c.input).index(dq.output[0])
    src = q.input[0] if q is not None else dq.input[0]
    is_weight = src in view.constants
    scale = view.constants.get(dq.input[1])
    per_channel = scale is not None and np.asarray(scale).size > 1
    axis = _attr(dq, "axis", 1)
    zp = view.constants.get(dq.input[2]) if len(dq.input) > 2 and dq.input[2] else None
    if c.op_type not in QUANTIZABLE_OPS:
        add("op-not-quantizable", label, f"{c.op_type} input {idx} is quantized; Ascend quantizes only "
            f"{', '.join(sorted(QUANTIZABLE_OPS))}", f"remove the Q/DQ pair on {src!r} (let {c.op_type} run in float)")
        return
    if c.op_type == "Gemm" and _attr(c, "transA", 0):
        add("gemm-transa", label, "quantized Gemm has transA=1", "transpose the input instead, or drop its Q/DQ")
    weighted = c.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul")
    if weighted and idx == 1:
        if not is_weight:
            add("weight-not-constant", label, f"{c.op_type} input 1 is a quantized activation; Ascend quantizes "
                "only a constant weight here", "remove the Q/DQ pairs of this op (leave it in float)")
            return
        w = view.constants[src]
        if c.op_type == "MatMul" and w.ndim != 2:
            add("matmul-weight-rank", label, f"MatMul weight is {w.ndim}-D; Ascend quantizes a 2-D constant weight",
                "reshape the weight to 2-D or drop its Q/DQ")
        if zp is not None and np.any(zp != 0):
            add("weight-asymmetric", label, "weight zero point is not 0; Ascend weights are int8 symmetric",
                "quantize the weight symmetrically (scale = max|w| / 127, zero point 0)")
        if c.op_type in ("Gemm", "MatMul") and per_channel:
            add("weight-per-channel", label, f"{c.op_type} weight is per-channel; Ascend takes per-tensor weights "
                "on Gemm/MatMul", "use one scale for the whole weight")
        if c.op_type in ("Conv", "ConvTranspose") and per_channel and axis != (0 if c.op_type == "Conv" else 1):
            add("weight-axis", label, f"per-channel axis {axis} on {c.op_type}; the output-channel axis is "
                f"{0 if c.op_type == 'Conv' else 1}", "quantize along the output-channel axis")
        x = c.input[0]
        xp = view.producer.get(x)
        if xp is None or xp.op_type != "DequantizeLinear":
            add("weight-only", label, f"{c.op_type} has a quantized weight but a float input",
                "quantize its input activation too (per-tensor Q/DQ) or drop the weight Q/DQ")
        return
    if is_weight and not weighted:
        add("constant-quantized", label, f"a constant input of {c.op_type} is quantized",
            "drop the Q/DQ on constants outside Conv/ConvTranspose/Gemm/MatMul weights")
    if per_channel:
        add("activation-per-channel", label, "activation quantized per channel; Ascend quantizes activations "
            "per tensor", "use one scale and zero point for the tensor")
    if weighted and idx == 0 and len(c.input) > 1:
        wp = view.producer.get(c.input[1])
        if wp is None or wp.op_type != "DequantizeLinear":
            add("activation-only", label, f"{c.op_type} input is quantized but its weight is float",
                "quantize the weight (int8 symmetric) or drop the input's Q/DQ")
