"""The ``onnxruntime`` target's kernel flavours as Q/DQ policies (:mod:`deployer.cpu` chooses the flavour
for an instruction set; this module turns it into graph properties), and the one graph rewrite ONNX
Runtime needs to fuse every quantized Gemm (:func:`int32_bias`)."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from deployer.cpu import CpuInfo, KernelFlavour, choose_flavour, resolve_isa
from deployer.errors import BadInputError
from deployer.graph import GraphView
from deployer.qdq import QdqPolicy

ORT_OPSET = 17
REDUCED_WEIGHT_QMAX = 63  # 7-bit weights: ONNX Runtime's reduce_range


def _per_channel(node: onnx.NodeProto, w: np.ndarray) -> int | None:
    """Output-channel axis: Conv 0, Gemm 0 (transB=1) / 1 (transB=0), MatMul with a 2-D weight 1."""
    if node.op_type == "Conv":
        return 0
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1
    if node.op_type == "MatMul" and w.ndim == 2:
        return 1
    return None


KERNELS = ("u8u8", "u8s8", "s8s8")
INT8_CONSUMERS = frozenset({"Conv", "Gemm", "MatMul", "Add", "AveragePool", "GlobalAveragePool", "MaxPool"})
"""Ops that take a quantized input in ONNX Runtime's int8 kernels (QLinearConv, QGemm, QLinearMatMul,
QLinearAdd, QLinearAveragePool, QLinearGlobalAveragePool; MaxPool commutes with Q/DQ)."""


def float_add(node: onnx.NodeProto, view: GraphView) -> bool:
    """Placement rule: leave an ``Add`` in float unless every consumer of its output takes int8 input
    (:data:`INT8_CONSUMERS`) and neither input is a constant.

    A CNN's residual Add feeds the next block's Conv: quantized, it runs as QLinearAdd between two
    QLinearConvs (left float, the projection Conv before it loses its output Q and runs in FP32). A
    transformer's residual Add feeds LayerNormalization and its bias Add follows a MatMul: quantized, they
    only add Q/DQ pairs, and the residual sum carries the outliers (all-MiniLM-L6-v2, same plan, 150
    held-out texts: cosine 0.8935 with every Add quantized, 0.9914 with this rule, and 1.85x -> 2.10x FP32
    at batch 1, 1 thread, alternating calls on a loaded machine).
    """
    if node.op_type != "Add":
        return False
    if any(view.is_constant(t) for t in node.input):
        return True
    consumers = [c for o in node.output for c in view.consumers.get(o, [])]
    return not consumers or any(c.op_type not in INT8_CONSUMERS for c in consumers)


def static_policy(kernels: str = "u8u8", reduce_range: bool = True) -> QdqPolicy:
    """ONNX Runtime placement: inputs of Conv/Gemm/MatMul and of the ops it has QLinear kernels for
    (Add where it feeds int8 ops only, :func:`float_add`; pooling), so each quantized op's output meets the
    next Q and fuses; asymmetric activations.

    ``kernels="u8u8"``: uint8 activations, symmetric 8-bit weights stored as uint8 with zero point 128
    (exact on any x86); ``"u8s8"``: uint8 activations, int8 weights, 7-bit when ``reduce_range``;
    ``"s8s8"``: int8 activations and weights (ARM). :func:`policy_for` maps a
    :class:`deployer.cpu.KernelFlavour` here.
    """
    if kernels not in KERNELS:
        raise BadInputError(f"ort_kernels {kernels!r}: use {', '.join(KERNELS)}")
    return QdqPolicy(
        weighted_ops=frozenset({"Conv", "Gemm", "MatMul"}),
        per_channel=_per_channel,
        activation_ops=frozenset({"Add", "AveragePool", "GlobalAveragePool"}),
        activation_matmul=True,
        residual_skip_only=False,
        symmetric_activations=False,
        weight_as_qdq=False,
        fp16=False,
        opset=ORT_OPSET,
        skip_node=float_add,
        activation_dtype="int8" if kernels == "s8s8" else "uint8",
        weight_dtype="uint8" if kernels == "u8u8" else "int8",
        weight_qmax=REDUCED_WEIGHT_QMAX if (reduce_range and kernels != "u8u8") else 127,
    )


def policy_for(flavour: KernelFlavour) -> QdqPolicy:
    """The Q/DQ policy of a kernel flavour (per-channel weights where the plan asks, unless the flavour
    says per-tensor)."""
    p = static_policy(flavour.kernels, flavour.reduce_range)
    return p if flavour.per_channel else dataclasses.replace(p, per_channel=lambda node, w: None)


def _bias_site(n: onnx.NodeProto, view: GraphView, inits: dict[str, onnx.TensorProto]) -> tuple[int, onnx.NodeProto] | None:
    """(index of the float bias input, the Gemm/MatMul it adds to) for a quantized Gemm's bias or the
    constant Add right after a quantized MatMul (its only consumer); None otherwise."""
    if n.op_type == "Gemm" and len(n.input) > 2 and n.input[2] in inits:
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        return (2, n) if attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0 else None
    if n.op_type == "Add" and len(n.input) == 2:
        for i in (0, 1):
            mm = view.producer.get(n.input[1 - i])
            if (n.input[i] in inits and mm is not None and mm.op_type == "MatMul"
                    and len(view.consumers.get(mm.output[0], [])) == 1):
                return i, mm
    return None


def int32_bias(model: onnx.ModelProto) -> list[str]:
    """Store the float bias of each quantized Gemm, and the constant bias Add after each quantized MatMul,
    as int32 behind its own DequantizeLinear (scale = input scale x weight scale, zero point 0, per output
    channel), in place; returns the names of the nodes changed. "Quantized": both inputs of the Gemm/MatMul
    come from DequantizeLinear with constant per-tensor input scale.

    Why: ONNX Runtime fuses DQ -> Gemm into QGemm only when every input is dequantized; with a float bias
    the Gemm stays FP32 and its int8 weight is dequantized on every call (measured here on
    EfficientNet-Lite0's classifier: 0.8 ms of 9 ms per image; the model went from 1.55x to 1.72x FP32).
    With static shapes ONNX Runtime first folds MatMul + bias Add into such a Gemm (all-MiniLM-L6-v2 at
    [1, 128]: 18 of 36 weight MatMuls then ran as FP32 Gemm). The rounding is at most half a unit of the
    accumulator (input scale x weight scale), what the fused kernel does to a float bias anyway.
    """
    view = GraphView(model)
    inits = {i.name: i for i in model.graph.initializer}
    changed: list[str] = []
    nodes: list[onnx.NodeProto] = []
    for n in model.graph.node:
        site = _bias_site(n, view, inits)
        if site is not None:
            idx, op = site
            x_dq, w_dq = view.producer.get(op.input[0]), view.producer.get(op.input[1])
            if (x_dq is not None and w_dq is not None and x_dq.op_type == w_dq.op_type == "DequantizeLinear"
                    and x_dq.input[1] in inits and w_dq.input[1] in inits):
                b = numpy_helper.to_array(inits[n.input[idx]]).astype(np.float64)
                xs = numpy_helper.to_array(inits[x_dq.input[1]]).astype(np.float64)
                ws = numpy_helper.to_array(inits[w_dq.input[1]]).astype(np.float64)
                if b.ndim == 1 and xs.size == 1 and ws.size in (1, b.size):
                    scale = np.broadcast_to(xs.reshape(()) * ws.reshape(-1), b.shape).astype(np.float32)
                    q = np.clip(np.round(b / scale.astype(np.float64)), -2**31, 2**31 - 1).astype(np.int32)
                    base = f"{n.name}.bias"
                    model.graph.initializer.extend([numpy_helper.from_array(q, f"{base}_int32"),
                                                    numpy_helper.from_array(scale, f"{base}_scale"),
                                                    numpy_helper.from_array(np.zeros(b.shape, np.int32),
                                                                            f"{base}_zero_point")])
                    nodes.append(helper.make_node("DequantizeLinear", [f"{base}_int32", f"{base}_scale",
                                                                       f"{base}_zero_point"], [f"{base}_dq"],
                                                  name=f"{base}_DequantizeLinear", axis=0))
                    n.input[idx] = f"{base}_dq"
                    changed.append(n.name)
        nodes.append(n)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    used = {i for n in model.graph.node for i in n.input}
    keep = [i for i in model.graph.initializer if i.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    return changed


def flavour_for(options: dict[str, Any], mode: str, build_isa: str) -> KernelFlavour:
    """The kernel flavour for ``options["cpu"]`` (``--cpu``; ``auto``/absent: the build machine,
    ``build_isa``) and ``mode`` (:func:`deployer.cpu.choose_flavour`). The internal options ``ort_kernels``
    / ``ort_reduce_range`` (benchmarks) override it.

    Raises:
        BadInputError: a bad ``--cpu`` or ``ort_kernels`` value.
    """
    isa = resolve_isa(options.get("cpu"), CpuInfo("", "", (), build_isa))
    flavour = choose_flavour(isa, mode)
    kernels = options.get("ort_kernels") or flavour.kernels
    if kernels not in KERNELS:
        raise BadInputError(f"ort_kernels {kernels!r}: use {', '.join(KERNELS)}")
    if kernels == flavour.kernels and "ort_reduce_range" not in options:
        return flavour
    rr = bool(options.get("ort_reduce_range", kernels != "u8u8" and flavour.reduce_range)) and kernels != "u8u8"
    return dataclasses.replace(flavour, name=kernels + ("-reduce-range" if rr else ""), reduce_range=rr,
                               activation_dtype="int8" if kernels == "s8s8" else "uint8",
                               weight_dtype="uint8" if kernels == "u8u8" else "int8",
                               why=f"set by options (ort_kernels={kernels}, reduce_range={rr}); "
                                   f"{isa}'s own choice: {flavour.name}")


__all__ = ["KERNELS", "ORT_OPSET", "REDUCED_WEIGHT_QMAX", "flavour_for", "int32_bias", "policy_for", "static_policy"]
