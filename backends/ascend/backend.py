"""Ascend backend: an Ascend-legal ONNX QDQ graph and the exact ``atc`` command.

Constraints (DESIGN.md section 3, from Huawei's AMCT/ATC documentation): fp32 graph inputs; weights
int8 symmetric (offset 0), per-channel only on Conv/ConvTranspose, per-tensor on Gemm/MatMul with a
constant 2-D weight; activations per-tensor (offset allowed); each Q/DQ pair shares one scale/zero
point; quantizable ops Conv, ConvTranspose, Gemm, MatMul, AveragePool, Add; one ``ai.onnx`` opset
import, 11-18, default 13. FP16/FP32 nodes of the plan stay FP32 in the graph and are listed for
ATC's ``--keep_dtype``.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnx

from backends.base import Artifact, LoweringContext, onnx_runner
from deployer.errors import ExternalToolError
from deployer.graph import GraphView
from deployer.plan import Precision
from deployer.qdq import QdqPolicy, lower_qdq

ASCEND_OPSET = 13
DEFAULT_SOC_VERSION = "Ascend310P3"
SOC_VERSIONS = ("Ascend310", "Ascend310B1", "Ascend310P1", "Ascend310P3", "Ascend910", "Ascend910A", "Ascend910B",
                "Ascend910B1", "Ascend910B2", "Ascend910B3", "Ascend910B4")


def _per_channel(node: onnx.NodeProto, w: np.ndarray) -> int | None:
    return {"Conv": 0, "ConvTranspose": 1}.get(node.op_type)


def _not_ascend_legal(node: onnx.NodeProto, view: GraphView) -> bool:
    """Ascend quantizes Gemm only with transA=0 and MatMul only with a constant 2-D weight."""
    if node.op_type == "Gemm":
        return any(a.name == "transA" and a.i for a in node.attribute)
    if node.op_type == "MatMul":
        w = view.constants.get(node.input[1])
        return w is None or w.ndim != 2
    return False


POLICY = QdqPolicy(
    weighted_ops=frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"}),
    per_channel=_per_channel,
    skip_node=_not_ascend_legal,
    activation_ops=frozenset({"AveragePool", "Add"}),
    activation_matmul=False,
    residual_skip_only=False,
    symmetric_activations=False,
    weight_as_qdq=True,
    fp16=False,
    opset=ASCEND_OPSET,
)


def atc_argv(model_file: str, output_prefix: str, soc_version: str, input_shapes: dict[str, list[int]],
             keep_dtype_file: str | None = None, input_format: str = "NCHW") -> list[str]:
    """The ``atc`` command line for an ONNX model (``--framework=5``).

    Raises:
        BadInputError: unknown ``soc_version``.
    """
    from deployer.errors import BadInputError

    if soc_version not in SOC_VERSIONS:
        raise BadInputError(f"--soc-version {soc_version!r} is not known; use one of {', '.join(SOC_VERSIONS)}")
    shape = ";".join(f"{k}:{','.join(str(d) for d in v)}" for k, v in input_shapes.items())
    argv = ["atc", f"--model={model_file}", "--framework=5", f"--output={output_prefix}",
            f"--soc_version={soc_version}", f"--input_shape={shape}", f"--input_format={input_format}"]
    if keep_dtype_file:
        argv.append(f"--keep_dtype={keep_dtype_file}")
    return argv


def to_opset(model: onnx.ModelProto, opset: int) -> tuple[onnx.ModelProto, str]:
    """Declare ``opset`` (ATC reads 11-18; 13 is the lowest with per-channel Q/DQ).

    ONNX's version converter has no down-adapters for several ops (Relu 14 -> 13); every op we emit
    has the same semantics at 13 and 17 for float/int8 tensors, so the import is rewritten and the
    result must pass the full ONNX checker at the new opset. Returns (model, note; empty if done).
    """
    current = max(i.version for i in model.opset_import if i.domain in ("", "ai.onnx"))
    if current == opset:
        return model, ""
    try:
        return onnx.version_converter.convert_version(model, opset), ""
    except Exception:
        pass
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for imp in out.opset_import:
        if imp.domain in ("", "ai.onnx"):
            imp.version = opset
    try:
        onnx.checker.check_model(out, full_check=True)
        return out, ""
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return model, f"kept opset {current} (within ATC's 11-18): not expressible at opset {opset}: {first}"


class AscendBackend:
    """Ascend-legal ONNX QDQ graph plus the ATC command; ``.om`` where ``atc`` is installed."""

    name = "ascend"
    description = "Ascend-legal ONNX QDQ graph + atc command (.om where atc is installed)"

    def available(self) -> tuple[bool, str]:
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            return False, "onnxruntime is not installed; pip install -e '.[ascend]'"
        return True, ""

    def lower(self, ctx: LoweringContext) -> Artifact:
        model, record = lower_qdq(ctx.reference, ctx.plan, POLICY)
        model, opset_note = to_opset(model, ASCEND_OPSET)
        d = ctx.out_dir / "ascend"
        d.mkdir(parents=True, exist_ok=True)
        path = d / "model_qdq.onnx"
        onnx.save(model, str(path))
        fp32_path = d / "model_fp32.onnx"
        onnx.save(ctx.fp32, str(fp32_path))
        keep = sorted(n for n, dec in ctx.plan.nodes.items() if dec.precision != Precision.INT8)
        keep_file = None
        if keep:
            keep_file = "keep_dtype.cfg"
            (d / keep_file).write_text("".join(f"OpName::{n}\n" for n in keep), encoding="utf-8")
        shapes = {i.name: [dim.dim_value for dim in i.type.tensor_type.shape.dim] for i in ctx.reference.graph.input
                  if i.name not in {x.name for x in ctx.reference.graph.initializer}}
        soc = ctx.options.get("soc_version") or DEFAULT_SOC_VERSION
        argv = atc_argv(path.name, "model", soc, shapes, keep_file)
        script = d / "atc.sh"
        script.write_text("#!/bin/sh\n# Compile for Ascend with CANN's ATC\nset -e\n"
                          'cd "$(dirname "$0")"\n' + shlex.join(argv) + "\n", encoding="utf-8")
        script.chmod(0o755)
        notes = [opset_note] if opset_note else []
        om = None
        if shutil.which("atc"):
            om = self._run_atc(argv, d)
        else:
            notes.append("atc: not run (atc not on PATH); compile with atc.sh: " + shlex.join(argv))
        return Artifact(
            path=path, fp32_path=fp32_path, run=onnx_runner(model, optimize=False), fp32_run=None,
            verified_by=f"ONNX Runtime {_ort_version()} (CPU, graph optimizations off: exact Q/DQ arithmetic) running the QDQ graph",
            notes=notes, files=[script],
            extra={"atc_command": argv, "soc_version": soc, "om": om, "keep_dtype": keep,
                   "quantized_activations": len(record.activations), "quantized_weights": len(record.weights),
                   "skipped": record.skipped},
        )

    def _run_atc(self, argv: list[str], cwd: Path) -> str:
        try:
            proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=3600, check=False)
        except subprocess.TimeoutExpired:
            raise ExternalToolError("atc did not finish within 3600 s") from None
        (cwd / "atc.log").write_text(proc.stdout + proc.stderr, encoding="utf-8")
        if proc.returncode != 0:
            tail = (proc.stdout + proc.stderr).strip().splitlines()[-5:]
            raise ExternalToolError(f"atc failed (exit {proc.returncode}): {' | '.join(tail)}")
        return "model.om"


def _ort_version() -> str:
    import onnxruntime

    return str(onnxruntime.__version__)
