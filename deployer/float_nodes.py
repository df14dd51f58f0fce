"""Which nodes a lowered artifact left in float, and why: the report's ``float_nodes`` for every target.

A backend lowers a plan into a QDQ graph (``QuantizeLinear``/``DequantizeLinear`` around float ops, ONNX
operator spec); an op runs in INT8 only when its inputs (and, for Conv/ConvTranspose/Gemm/MatMul, its
weight) come from ``DequantizeLinear``. :func:`float_nodes` diffs the lowered graph against the plan and
lists every compute node (Conv, ConvTranspose, Gemm, MatMul) that stayed float and every node the plan
keeps in FP16/FP32, with the reason (issue 22: onnxruntime left a ConvTranspose float in
``model_int8_static.onnx`` with no note). Backends call it on their artifact.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import onnx

from deployer.graph import WEIGHTED_OPS
from deployer.plan import Precision, QuantPlan

__all__ = ["float_nodes", "float_nodes_note"]

INTEGER_OPS = ("QLinear", "Integer", "MatMulNBits", "DynamicQuantize")


def _dequantized(lowered: onnx.ModelProto) -> tuple[dict[str, onnx.NodeProto], set[str]]:
    """Nodes of the lowered graph by name, and the tensors produced by DequantizeLinear (through Casts
    and Transposes of a dequantized weight)."""
    by_name = {n.name: n for n in lowered.graph.node if n.name}
    dq = {o for n in lowered.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    changed = True
    while changed:
        changed = False
        for n in lowered.graph.node:
            if n.op_type in ("Cast", "Transpose", "Reshape") and n.input and n.input[0] in dq:
                new = set(n.output) - dq
                if new:
                    dq |= new
                    changed = True
    return by_name, dq


def float_nodes(lowered: onnx.ModelProto, plan: QuantPlan, reference: onnx.ModelProto, target: str,
                skipped: Iterable[Mapping[str, str]] = (), weighted_ops: Iterable[str] | None = None,
                runs_fp16: bool = True) -> list[dict[str, Any]]:
    """Every node of ``reference`` left in float by the artifact ``lowered``, with the reason.

    Args:
        lowered: the artifact's QDQ graph (node names kept from the reference).
        plan: the plan it was lowered from.
        reference: the FP32 reference the plan was computed on.
        target: the backend name, for the reasons.
        skipped: the lowering record's skipped decisions (``{"node", "tensor", "reason"}``).
        weighted_ops: op types whose weights the target quantizes (None: all of Conv/ConvTranspose/Gemm/MatMul).
        runs_fp16: the target runs plan FP16 nodes in FP16 (else they are FP32 islands).

    Returns:
        ``[{"node", "op", "precision": "fp16" | "fp32", "reason"}]`` in graph order.
    """
    by_name, dq = _dequantized(lowered)
    why_skipped: dict[str, str] = {}
    for s in skipped:
        why_skipped.setdefault(s["node"], f"{s['reason']}" + (f" ({s['tensor']})" if s.get("tensor") else ""))
    allowed = set(WEIGHTED_OPS if weighted_ops is None else weighted_ops)
    out = []
    for node in reference.graph.node:
        dec = plan.nodes.get(node.name)
        precision = dec.precision if dec is not None else None
        planned_float = precision in (Precision.FP16, Precision.FP32)
        if node.op_type not in WEIGHTED_OPS and not planned_float and node.name not in why_skipped:
            continue
        low = by_name.get(node.name)
        if low is None or low.op_type != node.op_type or any(k in low.op_type for k in INTEGER_OPS):
            continue  # replaced by an integer op (QLinear*, *Integer, MatMulNBits) or fused away
        if not planned_float and any(i in dq for i in low.input if i):
            continue  # INT8: its inputs are dequantized
        if dec is None:
            reason = "not in the plan (no recipe rule gives it a precision)"
        elif planned_float:
            reason = f"the plan keeps it in {precision.value if precision else 'float'} ({dec.reason or 'recipe'})"
        elif node.name in why_skipped:
            reason = f"{target}: {why_skipped[node.name]}"
        elif node.op_type not in allowed:
            reason = (f"{target} has no INT8 {node.op_type} in this lowering (it quantizes the weights of "
                      f"{', '.join(sorted(allowed))} only)")
        else:
            reason = f"{target}: no Q/DQ on its inputs in the artifact (weight not a constant, or no calibrated range)"
        shown = "fp16" if precision == Precision.FP16 and runs_fp16 else "fp32"
        out.append({"node": node.name, "op": node.op_type, "precision": shown, "reason": reason})
    return out


def float_nodes_note(nodes: list[dict[str, Any]]) -> str | None:
    """One report note summarising :func:`float_nodes` (None when every node is quantized)."""
    if not nodes:
        return None
    ops: dict[str, int] = {}
    for n in nodes:
        ops[n["op"]] = ops.get(n["op"], 0) + 1
    shown = ", ".join(f"{k} x{v}" for k, v in sorted(ops.items()))
    return f"{len(nodes)} node(s) left in float ({shown}); float_nodes lists each with the reason"
