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

import shlex
from pathlib import Path

import numpy as np
import onnx

from backends.base import Artifact, LoweringContext, onnx_runner
from deployer.errors import ExternalToolError
from deployer.graph import GraphView
from deployer.qdq import QdqPolicy, lower_qdq

TRT_OPSET = 17


def _per_channel(node: onnx.NodeProto, w: np.ndarray) -> int | None:
    if node.op_type == "Conv":
        return 0
    if node.op_type == "ConvTranspose":
        return 1
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return 0 if trans_b else None
    if node.op_type == "MatMul" and w.ndim == 2:
        return 1
    return None


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


def trtexec_argv(onnx_path: str, engine_path: str, timing_cache: str = "timing.cache") -> list[str]:
    """The ``trtexec`` command that builds the strongly typed engine (TensorRT 10.x/11.x)."""
    return ["trtexec", f"--onnx={onnx_path}", "--stronglyTyped", f"--saveEngine={engine_path}",
            f"--timingCacheFile={timing_cache}"]


class TensorRTBackend:
    """Strongly typed FP16+INT8 ONNX for TensorRT, plus the engine where TensorRT is installed."""

    name = "tensorrt"
    description = "strongly typed ONNX (INT8 Q/DQ + FP16) for TensorRT 10/11; engine where TensorRT is installed"

    def available(self) -> tuple[bool, str]:
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            return False, "onnxruntime is not installed; pip install -e '.[tensorrt]'"
        return True, ""

    def lower(self, ctx: LoweringContext) -> Artifact:
        model, record = lower_qdq(ctx.reference, ctx.plan, POLICY)
        d = ctx.out_dir / "tensorrt"
        d.mkdir(parents=True, exist_ok=True)
        path = d / "model_strongly_typed.onnx"
        onnx.save(model, str(path))
        fp32_path = d / "model_fp32.onnx"
        onnx.save(ctx.fp32, str(fp32_path))
        argv = trtexec_argv(path.name, "model.engine")
        script = d / "build_engine.sh"
        script.write_text("#!/bin/sh\n# Build the strongly typed TensorRT engine (TensorRT 10.x / 11.x)\nset -e\n"
                          'cd "$(dirname "$0")"\n' + shlex.join(argv) + "\n", encoding="utf-8")
        script.chmod(0o755)
        notes = []
        engine = self._build_engine(path)
        if engine is None:
            notes.append("engine: not built (TensorRT not installed); build it with build_engine.sh: " + shlex.join(argv))
        return Artifact(
            path=path, fp32_path=fp32_path, run=onnx_runner(model, optimize=False), fp32_run=None,
            verified_by=f"ONNX Runtime {_ort_version()} (CPU, graph optimizations off: exact Q/DQ arithmetic) running the strongly typed graph",
            notes=notes, files=[script],
            extra={"engine": str(engine.name) if engine else None, "build_command": argv,
                   "quantized_activations": len(record.activations), "quantized_weights": len(record.weights),
                   "fp16_nodes": record.fp16_nodes, "skipped": record.skipped},
        )

    def _build_engine(self, onnx_path: Path) -> Path | None:
        try:
            import tensorrt  # noqa: F401
        except ImportError:
            return None
        from backends.tensorrt.engine import build_engine

        try:
            return build_engine(onnx_path, onnx_path.with_name("model.engine"))
        except ExternalToolError:
            raise
        except Exception as e:  # e.g. no CUDA device: TensorRT raises plain exceptions
            raise ExternalToolError(f"TensorRT engine build failed: {type(e).__name__}: {e}; run build_engine.sh "
                                    f"on a machine with an NVIDIA GPU") from None


def _ort_version() -> str:
    import onnxruntime

    return str(onnxruntime.__version__)
