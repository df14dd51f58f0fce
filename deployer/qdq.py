"""Lower a plan onto an ONNX graph as QuantizeLinear/DequantizeLinear pairs and FP16 islands.

This is the shared mechanism of every ONNX-based backend (TensorRT, Ascend, ONNX Runtime); each backend
passes a :class:`QdqPolicy` that encodes its vendor's rules, so the placement decision lives in data:

- which ops get their weight quantized (and whether per-channel is legal, on which axis),
- which ops get their float activation inputs quantized (TensorRT: inputs of Conv/Gemm/MatMul and the
  skip branch of a residual Add; Ascend: also AveragePool and Add),
- symmetric (zero point 0, TensorRT) or asymmetric activations,
- weights as an int8 initializer + DequantizeLinear, or a tied Q/DQ pair on the float weight,
- FP16 nodes lowered as real fp16 tensors with Casts at precision boundaries (TensorRT strongly typed),
  or left in FP32 (the backend reports it, e.g. Ascend ``--keep_dtype``).

Scales come from :mod:`deployer.quant`; a tensor in a ``shared_scales`` group uses the union range of its
group. One Q/DQ pair per quantized tensor, shared by all consumers that asked for it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from deployer.errors import UnsupportedModelError
from deployer.graph import WEIGHTED_OPS, GraphView, tensor_types, weight_channel_axis
from deployer.plan import Granularity, Precision, QuantPlan
from deployer.quant import asymmetric_params, mse_weight_scale, per_channel_scales, quantize, symmetric_scale

FLOAT_ELEM = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE)


@dataclass(frozen=True)
class QdqPolicy:
    """A backend's Q/DQ placement rules.

    Attributes:
        weighted_ops: op types whose constant weight is quantized (activation input 0 too).
        per_channel: function (node, weight) -> per-channel axis or None (per-tensor).
        activation_ops: further op types whose float activation inputs are quantized.
        activation_matmul: quantize both inputs of a MatMul whose inputs are both activations.
        residual_skip_only: on Add, quantize only the skip branch (TensorRT Conv+Add fusion).
        symmetric_activations: zero point 0 and ``scale = amax / 127`` for activations.
        weight_as_qdq: weight as float initializer + tied Q/DQ pair (else int8 initializer + DQ).
        fp16: lower FP16 nodes as fp16 tensors with Casts (else leave them FP32).
        skip_node: predicate for INT8 nodes to leave unquantized (e.g. GEMV-shaped MatMul).
        opset: ai.onnx opset the output declares (>= 13 for per-channel Q/DQ).
        activation_dtype: ``"int8"`` (default) or ``"uint8"`` activations (ONNX Runtime's U8S8 kernels on
            x86; asymmetric uint8 uses [0, 255], symmetric uint8 zero point 128).
        weight_qmax: largest weight magnitude, 127 (default) or 63 for ONNX Runtime's ``reduce_range``
            (7-bit weights keep u8s8 pair sums inside int16 on x86 CPUs without VNNI).
        weight_dtype: ``"int8"`` (default) or ``"uint8"``: the same symmetric values stored with zero point
            128 (ONNX Runtime's U8U8 kernels, exact on every x86 CPU).
        smoothing: apply the plan's SmoothQuant factors. A target whose MatMul/Gemm weights are
            per-tensor sets False: one weight scale cannot absorb the migrated activation outliers
            (all-MiniLM-L6-v2, Ascend rules: cosine 0.980 without, 0.919 with alpha 0.8).
    """

    weighted_ops: frozenset[str]
    per_channel: Callable[[onnx.NodeProto, np.ndarray], int | None]
    activation_ops: frozenset[str] = frozenset()
    activation_matmul: bool = True
    residual_skip_only: bool = False
    symmetric_activations: bool = True
    weight_as_qdq: bool = False
    fp16: bool = False
    skip_node: Callable[[onnx.NodeProto, GraphView], bool] | None = None
    opset: int = 17
    activation_dtype: str = "int8"
    weight_qmax: int = 127
    weight_dtype: str = "int8"
    smoothing: bool = True


@dataclass
class LoweringRecord:
    """What the lowering did, for the report: quantized tensors and weights with their parameters."""

    activations: dict[str, dict[str, object]] = field(default_factory=dict)
    weights: dict[str, dict[str, object]] = field(default_factory=dict)
    fp16_nodes: list[str] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)


PER_TENSOR_WEIGHT_SCALE = "mse"
"""How a per-tensor weight scale is chosen: ``"mse"`` (:func:`deployer.quant.mse_weight_scale`, the
default) or ``"max"`` (``max|w| / 127``). Per-channel scales are always max-based."""


def for_policy(plan: QuantPlan, policy: QdqPolicy | None, model: onnx.ModelProto | None = None) -> QuantPlan:
    """``plan`` as ``policy``'s target lowers it: without SmoothQuant factors (and their ranges) where the
    policy does not apply them, and without AdaRound bits (:mod:`deployer.adaround`, learned on the
    per-channel 127-level grid) for weights the policy quantizes per-tensor or on another grid
    (``model``, the reference, tells which; without it every rounding entry is kept)."""
    import dataclasses

    if policy is None:
        return plan
    out = plan
    if not policy.smoothing and plan.smoothing:
        smoothed = {f"{t}__smoothed" for t in plan.smoothing}
        ranges = {k: v for k, v in plan.ranges.items() if k not in smoothed}
        out = dataclasses.replace(out, smoothing={}, ranges=ranges)
    if plan.rounding and model is not None:
        view = GraphView(model)
        keep = {}
        for node in model.graph.node:
            w = view.weight_of(node) if node.name in plan.rounding else None
            if w is not None and policy.weight_qmax == 127 and policy.per_channel(node, w) is not None:
                keep[node.name] = plan.rounding[node.name]
        if len(keep) != len(plan.rounding):
            out = dataclasses.replace(out, rounding=keep)
    return out


def _set_opset(model: onnx.ModelProto, opset: int) -> None:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            imp.version = max(imp.version, opset)


def lower_qdq(model: onnx.ModelProto, plan: QuantPlan, policy: QdqPolicy) -> tuple[onnx.ModelProto, LoweringRecord]:
    """Return a new model with the plan's INT8 decisions as Q/DQ and FP16 decisions per policy.

    Args:
        model: the FP32 reference the plan was made for (not modified).
        plan: the quantization plan.
        policy: the backend's placement rules.

    Returns:
        (lowered model, record of every quantized tensor/weight and skipped decision).
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    current = max((i.version for i in out.opset_import if i.domain in ("", "ai.onnx")), default=policy.opset)
    if current < policy.opset:
        try:
            out = onnx.version_converter.convert_version(out, policy.opset)
        except Exception as e:
            raise UnsupportedModelError(
                f"model opset {current} cannot be converted to opset {policy.opset} ({type(e).__name__}); "
                f"re-export the model at opset >= {policy.opset}"
            ) from None
    view = GraphView(out)
    types = tensor_types(out)
    rec = LoweringRecord()
    g = out.graph

    shared: dict[str, tuple[float, float]] = {}
    for group in plan.shared_scales:
        rs = [plan.ranges[t] for t in group if t in plan.ranges]
        if rs:
            lo, hi = min(r.min for r in rs), max(r.max for r in rs)
            for t in group:
                shared[t] = (lo, hi)

    def is_float_activation(t: str) -> bool:
        return bool(t) and not view.is_constant(t) and types.get(t, TensorProto.FLOAT) in FLOAT_ELEM

    # 1. decide which (node, input index) get activation Q/DQ, and quantize weights
    act_requests: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    new_inits: list[onnx.TensorProto] = []
    new_nodes_before: dict[int, list[onnx.NodeProto]] = {}

    def request(node: onnx.NodeProto, idx: int) -> None:
        t = node.input[idx]
        if not is_float_activation(t):
            return
        if t not in plan.ranges and t not in shared:
            rec.skipped.append({"node": node.name, "tensor": t, "reason": "no calibrated range in the plan"})
            return
        act_requests.setdefault(t, []).append((node, idx))

    for pos, node in enumerate(list(g.node)):
        if plan.precision_of(node.name) != Precision.INT8:
            continue
        if policy.skip_node is not None and policy.skip_node(node, view):
            rec.skipped.append({"node": node.name, "tensor": "", "reason": "left in float by backend placement rules"})
            continue
        dec = plan.nodes[node.name]
        w = view.weight_of(node) if node.op_type in policy.weighted_ops else None
        if w is not None and dec.weight is not None and node.op_type in WEIGHTED_OPS:
            widx = WEIGHTED_OPS[node.op_type]
            request(node, 0)
            axis = policy.per_channel(node, w) if dec.weight.granularity == Granularity.PER_CHANNEL else None
            wname = node.input[widx]
            if axis is None:
                scale = np.array(mse_weight_scale(w, policy.weight_qmax) if PER_TENSOR_WEIGHT_SCALE == "mse"
                                 else symmetric_scale(float(w.min()), float(w.max()), policy.weight_qmax),
                                 dtype=np.float32)
            else:
                scale = per_channel_scales(w, axis, policy.weight_qmax)
            q = quantize(w, scale, 0, -policy.weight_qmax, policy.weight_qmax, axis=axis).astype(np.int8)
            base = f"{node.name}.weight"
            s_init = numpy_helper.from_array(scale, f"{base}_scale")
            z_init = numpy_helper.from_array(np.zeros(scale.shape, np.int8), f"{base}_zero_point")
            if policy.weight_dtype == "uint8":
                q = (q.astype(np.int16) + 128).astype(np.uint8)  # type: ignore[assignment]
                z_init = numpy_helper.from_array(np.full(scale.shape, 128, np.uint8), f"{base}_zero_point")
            new_inits += [s_init, z_init]
            dq_attrs: dict[str, Any] = {"axis": axis} if axis is not None else {}
            if policy.weight_as_qdq:
                q_node = helper.make_node("QuantizeLinear", [wname, s_init.name, z_init.name], [f"{base}_q"],
                                          name=f"{base}_QuantizeLinear", **dq_attrs)
                dq_node = helper.make_node("DequantizeLinear", [f"{base}_q", s_init.name, z_init.name],
                                           [f"{base}_dq"], name=f"{base}_DequantizeLinear", **dq_attrs)
                new_nodes_before.setdefault(pos, []).extend([q_node, dq_node])
            else:
                qi = numpy_helper.from_array(q, f"{base}_int8")
                new_inits.append(qi)
                dq_node = helper.make_node("DequantizeLinear", [qi.name, s_init.name, z_init.name], [f"{base}_dq"],
                                           name=f"{base}_DequantizeLinear", **dq_attrs)
                new_nodes_before.setdefault(pos, []).append(dq_node)
            node.input[widx] = f"{base}_dq"
            rec.weights[node.name] = {"tensor": wname, "axis": axis, "granularity": "per_channel" if axis is not None
                                      else "per_tensor", "scale_min": float(np.min(scale)),
                                      "scale_max": float(np.max(scale))}
        elif node.op_type == "MatMul" and policy.activation_matmul and w is None:
            request(node, 0)
            request(node, 1)
        elif node.op_type in policy.activation_ops:
            if node.op_type == "Add" and policy.residual_skip_only:
                idx = _skip_branch(node, view)
                if idx is not None:
                    request(node, idx)
            else:
                for i in range(len(node.input)):
                    request(node, i)

    # 2. one tied Q/DQ pair per requested tensor
    for t, consumers in act_requests.items():
        lo, hi = shared.get(t) or (plan.ranges[t].min, plan.ranges[t].max)
        unsigned = policy.activation_dtype == "uint8"
        if policy.symmetric_activations:
            scale, zp = symmetric_scale(lo, hi), (128 if unsigned else 0)  # type: ignore[assignment]
        else:
            scale, zp = asymmetric_params(lo, hi, 0, 255) if unsigned else asymmetric_params(lo, hi)  # type: ignore[assignment]
        key = _safe(t)
        s_init = numpy_helper.from_array(np.array(scale, np.float32), f"{key}_scale")
        z_init = numpy_helper.from_array(np.array(zp, np.uint8 if unsigned else np.int8), f"{key}_zero_point")
        new_inits += [s_init, z_init]
        qn = helper.make_node("QuantizeLinear", [t, s_init.name, z_init.name], [f"{key}_quantized"],
                              name=f"{key}_QuantizeLinear")
        dqn = helper.make_node("DequantizeLinear", [f"{key}_quantized", s_init.name, z_init.name],
                               [f"{key}_dequantized"], name=f"{key}_DequantizeLinear")
        first = min(list(g.node).index(n) for n, _ in consumers)
        new_nodes_before.setdefault(first, []).extend([qn, dqn])
        for n, idx in consumers:
            n.input[idx] = f"{key}_dequantized"
        rec.activations[t] = {"scale": float(scale), "zero_point": int(zp), "min": lo, "max": hi,
                              "consumers": sorted({n.name for n, _ in consumers})}

    nodes = list(g.node)
    rebuilt: list[onnx.NodeProto] = []
    for i, n in enumerate(nodes):
        rebuilt.extend(new_nodes_before.get(i, []))
        rebuilt.append(n)
    del g.node[:]
    g.node.extend(rebuilt)
    g.initializer.extend(new_inits)

    # 3. FP16 islands
    fp16_nodes = [n for n in g.node if plan.precision_of(n.name) == Precision.FP16]
    if fp16_nodes and policy.fp16:
        _lower_fp16(out, {n.name for n in fp16_nodes}, types)
        rec.fp16_nodes = sorted(n.name for n in fp16_nodes)
    _drop_unused_initializers(out)
    _set_opset(out, policy.opset)
    return out, rec


def _drop_unused_initializers(model: onnx.ModelProto) -> None:
    """Remove initializers no node reads (the FP32 weights replaced by their int8 form)."""
    used = {i for n in model.graph.node for i in n.input}
    used |= {o.name for o in model.graph.output}
    keep = [i for i in model.graph.initializer if i.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)


def _skip_branch(node: onnx.NodeProto, view: GraphView) -> int | None:
    """Index of the skip (identity) input of a residual Add: the input not produced by a Conv/Gemm
    whose only consumer is this Add. None when neither or both qualify as skip branch."""
    branch = []
    for i, t in enumerate(node.input[:2]):
        p = view.producer.get(t)
        is_conv_branch = p is not None and p.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul") and \
            len(view.consumers.get(t, [])) == 1
        branch.append(is_conv_branch)
    if branch == [True, False]:
        return 1
    if branch == [False, True]:
        return 0
    return None


def _safe(name: str) -> str:
    return name.replace(":", "_")


def _lower_fp16(model: onnx.ModelProto, fp16_names: set[str], types: dict[str, int]) -> None:
    """Make the named nodes compute in fp16: cast fp32 inputs in, fp16 outputs back out.

    Constants feeding only fp16 nodes are converted in place; shared constants get an fp16 copy.
    Graph inputs and outputs stay fp32.
    """
    g = model.graph
    view = GraphView(model)
    inits = {i.name: i for i in g.initializer}
    fp16_out: set[str] = set()
    for n in g.node:
        if n.name in fp16_names:
            fp16_out.update(o for o in n.output if types.get(o, TensorProto.FLOAT) == TensorProto.FLOAT)
    cast_in: dict[str, str] = {}
    cast_out: dict[str, str] = {}
    const16: dict[str, str] = {}
    new_nodes: list[onnx.NodeProto] = []
    graph_outputs = {o.name for o in g.output}
    renamed: dict[str, str] = {}
    for o in graph_outputs & fp16_out:
        renamed[o] = f"{o}__fp16"

    opset = max((i.version for i in model.opset_import if i.domain in ("", "ai.onnx")), default=17)
    for n in g.node:
        prefix: list[onnx.NodeProto] = []
        if n.name in fp16_names:
            follows_t = _inputs_typed_like_outputs(n, opset)
            for i, t in enumerate(n.input):
                if not t or not follows_t[i]:
                    continue
                if t in fp16_out:
                    n.input[i] = renamed.get(t, t)
                    continue
                if t in inits and inits[t].data_type == TensorProto.FLOAT:
                    if t not in const16:
                        arr = _to_fp16(numpy_helper.to_array(inits[t]))
                        c = numpy_helper.from_array(arr, f"{t}__fp16")
                        g.initializer.append(c)
                        const16[t] = c.name
                    n.input[i] = const16[t]
                elif t in view.constants and view.producer.get(t) is not None and view.constants[t].dtype == np.float32:
                    if t not in const16:
                        c = numpy_helper.from_array(_to_fp16(view.constants[t]), f"{t}__fp16")
                        g.initializer.append(c)
                        const16[t] = c.name
                    n.input[i] = const16[t]
                elif types.get(t, TensorProto.FLOAT) == TensorProto.FLOAT and t not in view.constants:
                    if t not in cast_in:
                        cast_in[t] = f"{t}__to_fp16"
                        prefix.append(helper.make_node("Cast", [t], [cast_in[t]], name=f"{t}__Cast_fp16",
                                                       to=TensorProto.FLOAT16))
                    n.input[i] = cast_in[t]
            for i, o in enumerate(n.output):
                if o in renamed:
                    n.output[i] = renamed[o]
        else:
            for i, t in enumerate(n.input):
                if t in fp16_out:
                    if t not in cast_out:
                        cast_out[t] = f"{t}__to_fp32"
                        prefix.append(helper.make_node("Cast", [renamed.get(t, t)], [cast_out[t]],
                                                       name=f"{t}__Cast_fp32", to=TensorProto.FLOAT))
                    n.input[i] = cast_out[t]
        new_nodes.extend(prefix)
        new_nodes.append(n)
    for o, r in renamed.items():
        new_nodes.append(helper.make_node("Cast", [r], [o], name=f"{o}__Cast_output_fp32", to=TensorProto.FLOAT))
    # Casts inserted before their consumer may precede a producer in a multi-consumer order: sort.
    del g.node[:]
    g.node.extend(_toposort(new_nodes, {i.name for i in g.input} | {i.name for i in g.initializer}))
    del g.value_info[:]


def _to_fp16(arr: np.ndarray) -> np.ndarray:
    """fp32 constant -> fp16, saturating at the fp16 limits (+-65504) instead of overflowing to inf.

    Attention-mask constants hold the float32 minimum; cast plainly they become -inf and
    ``0 * -inf`` yields NaN. Saturating is what onnxconverter-common's float16 converter does.
    """
    info = np.finfo(np.float16)
    return np.clip(arr, info.min, info.max).astype(np.float16)


def _inputs_typed_like_outputs(node: onnx.NodeProto, opset: int) -> list[bool]:
    """For each input: does its schema type parameter match an output's (e.g. ``T``)? Inputs with a
    fixed type (Resize ``scales`` is always float32) must not be converted to fp16."""
    try:
        schema = onnx.defs.get_schema(node.op_type, opset, node.domain or "")
    except Exception:
        return [True] * len(node.input)
    out_types = {o.type_str for o in schema.outputs}
    flags = []
    for i in range(len(node.input)):
        formal = schema.inputs[min(i, len(schema.inputs) - 1)] if schema.inputs else None
        flags.append(formal is not None and formal.type_str in out_types)
    return flags


def _toposort(nodes: list[onnx.NodeProto], available: set[str]) -> list[onnx.NodeProto]:
    avail = set(available) | {""}
    pending = list(nodes)
    out: list[onnx.NodeProto] = []
    while pending:
        progressed = False
        rest = []
        for n in pending:
            if all(i in avail for i in n.input):
                out.append(n)
                avail.update(n.output)
                progressed = True
            else:
                rest.append(n)
        if not progressed:
            out.extend(rest)  # leave the checker to report it
            break
        pending = rest
    return out
