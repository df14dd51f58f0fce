"""TensorRT backend: a strongly typed ONNX (INT8 as symmetric Q/DQ, FP16 as fp16 tensors) and, where
TensorRT is importable, a serialized engine.

TensorRT 10.1 deprecated and TensorRT 11 removed implicit INT8 calibration and the INT8/FP16 builder
flags: precision must be written into the graph (TensorRT developer guide, "Explicit quantization" and
"Strongly typed networks"). Parser rules (onnx-tensorrt): QDQ only, zero point 0, positive finite
constant scales, per-channel only for weights (Conv axis 0, ConvTranspose axis 1, Gemm transB=1 axis 0),
opset >= 13, per-tensor activations. Placement: quantize the inputs of Conv/ConvTranspose/Gemm/MatMul,
not their outputs; on a residual Add quantize the skip branch so the Conv+Add fuse.

Without TensorRT (these machines) the graph is verified in ONNX Runtime and the report gives the
``trtexec`` command to build the engine.
"""

from __future__ import annotations

import dataclasses
import shlex
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from backends.base import Artifact, LoweringContext, onnx_runner, refuse_int4
from backends.tensorrt.checker import check_model
from backends.tensorrt.engine import (EngineOptions, polygraphy_compare_argv, polygraphy_convert_argv,
                                      tensorrt_version, trtexec_argv)
from deployer.errors import ExternalToolError
from deployer.findings import Finding
from deployer.float_nodes import float_nodes, float_nodes_note
from deployer.graph import GraphView, weight_channel_axis
from deployer.plan import QuantPlan
from deployer.qdq import LoweringRecord, QdqPolicy, lower_qdq
from deployer.recipe import PRESETS, decide
from deployer.shapes import describe_shapes, resolve_input_shapes

TRT_OPSET = 17


def _per_channel(node: onnx.NodeProto, w: np.ndarray) -> int | None:
    """TensorRT's legal per-channel weight axes: Conv 0, ConvTranspose 1, Gemm only with transB=1 (axis 0),
    MatMul with a 2-D weight (its output columns); anything else per-tensor."""
    if node.op_type == "Gemm" and weight_channel_axis(node) != 0:
        return None
    if node.op_type == "MatMul" and w.ndim != 2:
        return None
    return weight_channel_axis(node) if node.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul") else None


def _gemv(node: onnx.NodeProto, view: GraphView) -> bool:
    """TensorRT leaves GEMV-shaped MatMuls (a vector operand) in higher precision."""
    if node.op_type != "MatMul":
        return False
    w = view.constants.get(node.input[1])
    return w is not None and (w.ndim == 1 or (w.ndim == 2 and 1 in w.shape))


POLICY = QdqPolicy(
    weighted_ops=frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"}),
    per_channel=_per_channel,
    activation_ops=frozenset({"Add"}),
    activation_matmul=True,
    residual_skip_only=True,
    symmetric_activations=True,
    weight_as_qdq=False,
    fp16=True,
    skip_node=_gemv,
    opset=TRT_OPSET,
)


MASK_RANGE_LIMIT = 1e4
"""Activation ranges beyond this magnitude come from attention-mask paths (-inf / float-min fills,
DESIGN.md section 3): an INT8 scale from them would zero every real value, so they are not quantized."""


def without_mask_ranges(plan: QuantPlan) -> tuple[QuantPlan, list[str]]:
    """The plan without ranges of attention-mask tensors, and the names dropped.

    A tensor without a range is left in float by :func:`deployer.qdq.lower_qdq` (and recorded as skipped).
    """
    drop = sorted(t for t, r in plan.ranges.items() if max(abs(r.min), abs(r.max)) > MASK_RANGE_LIMIT)
    if not drop:
        return plan, []
    keep = {t: r for t, r in plan.ranges.items() if t not in drop}
    return plan.with_ranges(keep), drop


def lower_strongly_typed(model: onnx.ModelProto, plan: QuantPlan) -> tuple[onnx.ModelProto, LoweringRecord]:
    """The plan as a strongly typed ONNX under TensorRT's rules (:data:`POLICY`), mask paths left in float.

    Returns:
        (lowered model, record); mask-path tensors appear in ``record.skipped`` with their reason.
    """
    trimmed, mask_path = without_mask_ranges(plan)
    out, record = lower_qdq(model, trimmed, POLICY)
    reason = f"attention-mask path (calibrated |range| > {MASK_RANGE_LIMIT:g}): left in float"
    for s in record.skipped:
        if s["tensor"] in mask_path:
            s["reason"] = reason
    return out, record


class TensorRTBackend:
    """Strongly typed FP16+INT8 ONNX for TensorRT, plus the engine where TensorRT is installed."""

    qdq_policy = POLICY

    name = "tensorrt"
    description = "strongly typed ONNX (INT8 Q/DQ + FP16) for TensorRT 10/11; engine where TensorRT is installed"

    def available(self) -> tuple[bool, str]:
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            return False, "onnxruntime is not installed; pip install -e '.[tensorrt]'"
        return True, ""

    def check(self, model: onnx.ModelProto) -> list[Finding]:
        """TensorRT parser and placement rules (:mod:`backends.tensorrt.checker`) on any ONNX model."""
        return check_model(model)

    def check_options(self, options: dict[str, Any]) -> None:
        """Option values checked before any model work (the engine options).

        Raises:
            BadInputError: an unknown ``trt_hardware_compatibility``.
        """
        EngineOptions.from_backend_options(options, None)

    def lower(self, ctx: LoweringContext) -> Artifact:
        refuse_int4(ctx.plan, "tensorrt", "this TensorRT lowering does not emit (INT4 Q/DQ needs opset 21 block quantization)")
        model, record = lower_strongly_typed(ctx.reference, ctx.plan)
        d = ctx.out_dir / "tensorrt"
        d.mkdir(parents=True, exist_ok=True)
        path = d / "model_strongly_typed.onnx"
        onnx.save(model, str(path))
        fp32_path = d / "model_fp32.onnx"
        onnx.save(ctx.fp32, str(fp32_path))
        options = EngineOptions.from_backend_options(ctx.options, d / "timing.cache")
        shapes, shape_source = resolve_input_shapes(ctx.reference, options.input_shapes,
                                                    ctx.plan.calibration.get("input_shapes"))
        profile = {n: r for n, r in shapes.items() if shape_source[n] != "static"}
        if profile:  # the optimization profile: what --input-shapes gave, or the calibration shapes seen
            options = dataclasses.replace(options, input_shapes=profile)
        engine_name = "model.engine"
        argv = trtexec_argv(path.name, engine_name, options)
        poly = polygraphy_convert_argv(path.name, engine_name, options)
        script = d / "build_engine.sh"
        script.write_text("#!/bin/sh\n# Build the strongly typed TensorRT engine (TensorRT 10.x / 11.x).\n"
                          "# Equivalent: " + shlex.join(poly) + "\n"
                          "# Compare with ONNX Runtime: " + shlex.join(polygraphy_compare_argv(path.name, options)) +
                          "\nset -e\ncd \"$(dirname \"$0\")\"\n" + shlex.join(argv) + "\n", encoding="utf-8")
        script.chmod(0o755)
        findings = check_model(model)
        notes = []
        sparsity = sparsity_check(ctx.reference, model) if options.sparse_weights else None
        if sparsity is not None:
            notes.append(f"2:4 sparsity: {len(sparsity['sparse_nodes'])} weight(s) hold the pattern in the strongly "
                         f"typed graph; build_engine.sh passes --sparsity=enable" +
                         ("" if sparsity["ok"] else f"; LOST in {sparsity['missing']}"))
        if profile:
            notes.append("optimization profile: " + describe_shapes(profile, shape_source))
        errors = [f for f in findings if f.severity == "error"]
        if errors:
            notes.append(f"checker: {len(errors)} TensorRT rule violation(s) in the lowered graph: {errors[0]}")
        if record.skipped:
            notes.append(f"{len(record.skipped)} plan decision(s) left in float by TensorRT placement rules "
                         "(see 'skipped')")
        extra: dict[str, Any] = {
            "build_command": argv, "polygraphy_command": poly, "tensorrt": tensorrt_version(),
            "checker": {"errors": len(errors), "warnings": len(findings) - len(errors),
                        "findings": [f.to_dict() for f in findings]},
            "quantized_activations": len(record.activations), "quantized_weights": len(record.weights),
            "fp16_nodes": record.fp16_nodes, "skipped": record.skipped, "engine": None,
            "float_nodes": float_nodes(model, ctx.plan, ctx.reference, "tensorrt", record.skipped,
                                       POLICY.weighted_ops, runs_fp16=True),
        }
        note = float_nodes_note(extra["float_nodes"])
        if note:
            notes.append(note)
        if sparsity is not None:
            extra["sparsity"] = sparsity
        if extra["tensorrt"] is None:
            notes.append("engine: not built (TensorRT not installed); build it on a GPU host with "
                         "build_engine.sh: " + shlex.join(argv) + " (or: " + shlex.join(poly) + ")")
        else:
            extra["engine"] = self._engines(ctx, path, fp32_path, options)
        return Artifact(
            path=path, fp32_path=fp32_path, run=onnx_runner(model, optimize=False), fp32_run=None,
            verified_by=f"ONNX Runtime {_ort_version()} (CPU, graph optimizations off: exact Q/DQ arithmetic) "
                        "running the strongly typed graph",
            notes=notes, files=[script], extra=extra,
        )

    def _engines(self, ctx: LoweringContext, path: Path, fp32_path: Path, options: EngineOptions) -> dict[str, Any]:
        """Build FP32, FP16 and the plan's INT8+FP16 engines; compare each with ONNX Runtime (Polygraphy)."""
        from backends.tensorrt.engine import build_engine, compare_engine

        fp16_model, _ = lower_qdq(ctx.fp32, ctx.plan.with_nodes(decide(ctx.fp32, PRESETS["fp16"])), POLICY)
        fp16_path = path.with_name("model_fp16.onnx")
        onnx.save(fp16_model, str(fp16_path))
        samples = list(ctx.calibration[:64])  # loads only those (the set may be lazy)
        out: dict[str, Any] = {}
        for label, src, engine in (("int8_fp16", path, "model.engine"), ("fp16", fp16_path, "model_fp16.engine"),
                                   ("fp32", fp32_path, "model_fp32.engine")):
            try:
                built = build_engine(src, path.with_name(engine), options)
            except ExternalToolError:
                raise
            except Exception as e:  # e.g. no CUDA device: TensorRT raises plain exceptions
                raise ExternalToolError(f"TensorRT engine build failed for {src.name}: {type(e).__name__}: {e}; "
                                        "run build_engine.sh on a machine with an NVIDIA GPU") from None
            out[label] = {"engine": built.name, "build_log": built.with_suffix(".build.log").name,
                          "vs_onnxruntime": compare_engine(built, src, samples)}
        return out


def sparsity_check(reference: onnx.ModelProto, lowered: onnx.ModelProto) -> dict[str, Any]:
    """2:4 pattern of the strongly typed graph: every weight that is 2:4 in the FP32 reference must still be
    2:4 in the lowered graph (its INT8 values: symmetric scales with zero point 0 map 0.0 to 0; FP16 casts
    keep 0). Returns :func:`deployer.prune.pattern.check_2to4`'s dict without the per-weight list, plus
    ``pattern`` and ``checked_in``."""
    from deployer.prune.pattern import check_2to4, sparse_nodes

    res = check_2to4(lowered, sparse_nodes(reference))
    dtypes = {w["node"]: w["dtype"] for w in res.pop("weights")}  # type: ignore[attr-defined]
    return {"pattern": "2:4", "checked_in": "model_strongly_typed.onnx", **res,
            "sparse_weight_dtypes": {n: dtypes[n] for n in res["sparse_nodes"]}}  # type: ignore[attr-defined]


def _ort_version() -> str:
    import onnxruntime

    return str(onnxruntime.__version__)
