"""Per-layer error of a quantized graph against the FP32 reference (the report's ``layers``).

For every node the plan quantizes (``int8`` or ``fp16``), the node's output tensor is read from both the
FP32 reference and a QDQ graph of the same plan, on a few held-out samples, and compared with SQNR,
``10 log10(sum(ref^2) / sum((ref - q)^2))`` (see :func:`deployer.verify.sqnr_db`), and the relative
error ``||ref - q|| / ||ref||``. Both graphs run in ONNX Runtime on CPU with graph optimizations off,
so Q/DQ execute exactly as written and no intermediate tensor is fused away.

The error at a layer includes what earlier layers propagated into it: it is the error a user sees at
that point of the deployed graph, which is what ranks layers for a precision decision.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

from calibration.dataset import Sample
from deployer.graph import WEIGHTED_OPS, weight_channel_axis
from deployer.plan import Precision, QuantPlan
from deployer.qdq import QdqPolicy, lower_qdq
from deployer.verify import sqnr_db

DEFAULT_SAMPLES = 8
MEASURED_WITHOUT_PLAN = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul", "Add", "AveragePool"})

NEUTRAL_POLICY = QdqPolicy(
    weighted_ops=frozenset(WEIGHTED_OPS),
    per_channel=lambda node, w: weight_channel_axis(node) if node.op_type != "MatMul" or w.ndim == 2 else None,
    activation_ops=frozenset({"Add", "AveragePool"}),
    symmetric_activations=True,
    fp16=True,
    opset=17,
)
"""Backend-neutral placement: int8 symmetric per-channel weights, per-tensor symmetric activations on the
inputs of Conv/ConvTranspose/Gemm/MatMul/Add/AveragePool, FP16 nodes as fp16 tensors."""

DESCRIPTION = ("the plan lowered as a backend-neutral QDQ graph (symmetric int8, per-channel weights, FP16 "
               "islands) vs the FP32 reference; ONNX Runtime CPU, graph optimizations off")


def _with_outputs(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """A copy of ``model`` that also outputs ``names`` (typed from shape inference; float if unknown)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    try:
        inferred = onnx.shape_inference.infer_shapes(m)
        types = {vi.name: vi.type.tensor_type.elem_type for vi in inferred.graph.value_info}
    except Exception:
        types = {}
    present = {o.name for o in m.graph.output}
    for n in names:
        if n not in present:
            m.graph.output.append(helper.make_tensor_value_info(n, types.get(n, TensorProto.FLOAT), None))
    return m


def _run(model: onnx.ModelProto, names: list[str], samples: Sequence[Sample]) -> dict[str, list[np.ndarray]]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    got: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for s in samples:
        for n, v in zip(names, sess.run(names, dict(s))):
            got[n].append(np.asarray(v, dtype=np.float32))
    return got


def layer_errors(reference: onnx.ModelProto, plan: QuantPlan | None, samples: Sequence[Sample],
                 qdq_model: onnx.ModelProto | None = None, max_samples: int = DEFAULT_SAMPLES,
                 lower_from: onnx.ModelProto | None = None) -> dict[str, Any]:
    """SQNR and relative error per quantized layer, worst (lowest SQNR) first.

    Args:
        reference: the FP32 reference ONNX model.
        plan: the plan whose ``int8``/``fp16`` nodes are measured; None (re-verifying an artifact without
            its plan) measures the nodes in :data:`MEASURED_WITHOUT_PLAN`, and then ``qdq_model`` is required.
        samples: held-out samples (the first ``max_samples`` are used).
        qdq_model: the quantized graph to read; None lowers ``plan`` with :data:`NEUTRAL_POLICY`.
        max_samples: how many samples to run.
        lower_from: the model to lower when ``qdq_model`` is None (e.g. the bias-corrected reference);
            default ``reference``.

    Returns:
        ``{"method", "samples", "layers": [{"node", "op_type", "precision", "tensor" (output),
        "input" (activation input 0), "sqnr_db", "rel_error"}]}``; ``sqnr_db`` is None for an identical tensor (infinite SQNR).
    """
    if qdq_model is None:
        if plan is None:
            raise ValueError("layer_errors: give a plan or a qdq_model")
        qdq_model, _ = lower_qdq(lower_from if lower_from is not None else reference, plan, NEUTRAL_POLICY)
    qdq_tensors = {o for n in qdq_model.graph.node for o in n.output}
    picked: list[tuple[onnx.NodeProto, str]] = []
    position = {n.name: i for i, n in enumerate(reference.graph.node)}
    for node in reference.graph.node:
        if not node.output or (node.op_type not in MEASURED_WITHOUT_PLAN if plan is None
                               else plan.precision_of(node.name) == Precision.FP32):
            continue
        if node.output[0] in qdq_tensors:
            picked.append((node, node.output[0]))
    use = list(samples)[:max_samples]
    result: dict[str, Any] = {"method": DESCRIPTION, "samples": len(use), "layers": []}
    if not picked or not use:
        return result
    names = list(dict.fromkeys(t for _, t in picked))
    ref = _run(_with_outputs(reference, names), names, use)
    qdq = _run(_with_outputs(qdq_model, names), names, use)
    rows = []
    for node, t in picked:
        r = np.concatenate([a.ravel() for a in ref[t]]).astype(np.float64)
        q = np.concatenate([a.ravel() for a in qdq[t]]).astype(np.float64)
        s = sqnr_db(r, q)
        rel = float(np.linalg.norm(r - q) / max(float(np.linalg.norm(r)), 1e-30))
        prec = plan.precision_of(node.name).value if plan is not None else "unknown"
        rows.append({"node": node.name, "op_type": node.op_type, "precision": prec, "index": position[node.name],
                     "tensor": t, "input": node.input[0] if node.input else "", "sqnr_db": round(s, 3) if math.isfinite(s) else None,
                     "rel_error": round(rel, 6)})
    rows.sort(key=lambda row: (math.inf if row["sqnr_db"] is None else row["sqnr_db"]))
    result["layers"] = rows
    return result
