"""Ascend backend: an Ascend-legal ONNX QDQ graph, its deploy form, and the exact ``atc`` command.

Constraints (DESIGN.md section 3, from Huawei's AMCT/ATC documentation): fp32 graph inputs; weights
int8 symmetric (offset 0), per-channel only on Conv/ConvTranspose, per-tensor on Gemm (transA=0) and
MatMul with a constant 2-D weight; activations per-tensor (offset allowed); each Q/DQ pair shares one
scale/zero point; quantizable ops Conv, ConvTranspose, Gemm, MatMul, AveragePool, Add; one ``ai.onnx``
opset import, 11-18, default 13. Attention-mask paths (-inf / float-min) never get Q/DQ.

Artifacts in ``ascend/``: ``model_qdq.onnx`` (the QDQ graph, also the fake-quant form ONNX Runtime
verifies), ``model_deploy.onnx`` (AscendQuant/AscendDequant, int8 weights, int32 bias: what ``atc``
compiles), ``quant_params.json`` (scale/offset per layer), ``atc.sh`` and its ``--keep_dtype`` /
``--modify_mixlist`` / AIPP files; ``model.om`` where ``atc`` is on PATH.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from backends.ascend.atc import (DEFAULT_PRECISION_MODE, DEFAULT_SOC_VERSION, SOC_VERSIONS, AippConfig, atc_argv,
                                 keep_dtype_text, mixlist_text, run_atc, script_text, validate_soc)
from backends.ascend.checker import MASK_SCALE
from backends.ascend.checker import check as check_model
from backends.ascend.deploy_form import to_deploy_form
from backends.base import Artifact, LoweringContext, onnx_runner, refuse_int4
from deployer.errors import BadInputError, ExternalToolError, UnsupportedModelError
from deployer.findings import Finding
from deployer.float_nodes import float_nodes, float_nodes_note
from deployer.graph import GraphView
from deployer.plan import Precision, QuantPlan
from deployer.qdq import QdqPolicy, lower_qdq
from deployer.shapes import ShapeRange, describe_shapes, resolve_input_shapes

__all__ = ["ASCEND_OPSET", "DEFAULT_SOC_VERSION", "SOC_VERSIONS", "POLICY", "AscendBackend", "atc_argv",
           "mask_tensors", "to_opset"]

ASCEND_OPSET = 13


def _per_channel(node: onnx.NodeProto, w: np.ndarray) -> int | None:
    return {"Conv": 0, "ConvTranspose": 1}.get(node.op_type)


def _not_ascend_legal(node: onnx.NodeProto, view: GraphView) -> bool:
    """Ascend quantizes Gemm only with transA=0, MatMul only with a constant 2-D weight, and never an op
    reading an attention-mask path."""
    if node.op_type == "Gemm":
        return any(a.name == "transA" and a.i for a in node.attribute)
    if node.op_type == "MatMul":
        w = view.constants.get(node.input[1])
        return w is None or w.ndim != 2
    if node.op_type in ("Add", "AveragePool"):
        masks = mask_tensors(view)
        return any(i in masks for i in node.input)
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
    smoothing=False,
)

_MASK_CACHE: dict[int, frozenset[str]] = {}


def mask_tensors(view: GraphView) -> frozenset[str]:
    """Tensors computed only from an attention-mask graph input (a non-float input whose name contains
    ``mask``) and constants: Cast/Unsqueeze/Sub/Mul chains that end in ``-inf`` or float-min fills."""
    key = id(view)
    if key in _MASK_CACHE:
        return _MASK_CACHE[key]
    float_types = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE)
    masks = {i.name for i in view.model.graph.input if "mask" in i.name.lower()
             and i.type.tensor_type.elem_type not in float_types}
    for n in view.model.graph.node:
        live = [i for i in n.input if i and not view.is_constant(i)]
        if live and all(i in masks for i in live):
            masks.update(n.output)
    result = frozenset(masks)
    _MASK_CACHE.clear()
    _MASK_CACHE[key] = result
    return result


def _policy_for(plan: QuantPlan) -> QdqPolicy:
    """POLICY plus: skip Add/AveragePool whose input range is a mask fill (|range| > 1e30 * 127)."""
    huge = {t for t, r in plan.ranges.items() if max(abs(r.min), abs(r.max)) > MASK_SCALE}

    def skip(node: onnx.NodeProto, view: GraphView) -> bool:
        if node.op_type in ("Add", "AveragePool") and any(i in huge for i in node.input):
            return True
        return _not_ascend_legal(node, view)

    return dataclasses.replace(POLICY, skip_node=skip)


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
    for n in out.graph.node:  # Reshape allowzero (opset 14) = 0 is the opset-13 behaviour
        for a in list(n.attribute):
            if n.op_type == "Reshape" and a.name == "allowzero" and a.i == 0:
                n.attribute.remove(a)
    try:
        onnx.checker.check_model(out, full_check=True)
        return out, ""
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return model, f"kept opset {current} (within ATC's 11-18): not expressible at opset {opset}: {first}"


def precision_files(plan: QuantPlan, node_types: dict[str, str], precision_mode: str
                    ) -> tuple[list[str], list[str], list[str]]:
    """How the plan's FP16/FP32 nodes reach ATC under ``precision_mode``.

    Returns:
        (keep_dtype node names, op types for the mixlist white list, notes). ``fp16`` /
        ``cube_fp16in_fp32out``: FP32 nodes -> ``--keep_dtype`` (everything else float runs fp16);
        ``mixed_*``: FP32 nodes -> ``--keep_dtype``, FP16 nodes' op types -> ``--modify_mixlist``
        white list (the list is per op type); ``origin``: float runs FP32, FP16 nodes cannot be
        forced per node and are reported.
    """
    fp32 = sorted(n for n, d in plan.nodes.items() if d.precision == Precision.FP32 and n in node_types)
    fp16 = sorted(n for n, d in plan.nodes.items() if d.precision == Precision.FP16 and n in node_types)
    notes: list[str] = []
    if precision_mode == "origin":
        if fp16:
            notes.append(f"precision_mode_v2=origin keeps float ops in FP32: {len(fp16)} FP16 node(s) of the plan "
                         f"run in FP32 (choose fp16 or mixed_float16 to honour them)")
        return [], [], notes
    white: list[str] = []
    if precision_mode.startswith("mixed_") and fp16:
        white = sorted({node_types[n] for n in fp16})
        notes.append(f"--modify_mixlist moves op types {white} to the white list (per op type, as ATC defines it)")
    return fp32, white, notes


class AscendBackend:
    """Ascend-legal QDQ graph, its deploy form and the ATC command; ``.om`` where ``atc`` is installed."""

    qdq_policy = POLICY

    name = "ascend"
    description = "Ascend-legal ONNX QDQ graph + deploy form + atc command (.om where atc is installed)"

    def available(self) -> tuple[bool, str]:
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            return False, "onnxruntime is not installed; pip install -e '.[ascend]'"
        return True, ""

    def check_options(self, options: dict[str, Any]) -> None:
        """Option values checked before any model work (the SoC name against CANN's list).

        Raises:
            BadInputError: an unknown ``soc_version``.
        """
        validate_soc(options.get("soc_version") or DEFAULT_SOC_VERSION)

    def check(self, model: onnx.ModelProto) -> list[Finding]:
        """Every Ascend rule ``model`` breaks (see :mod:`backends.ascend.checker`)."""
        return check_model(model)

    def lower(self, ctx: LoweringContext) -> Artifact:
        refuse_int4(ctx.plan, "ascend", "Ascend's ATC/AMCT quantization does not take (int8 weights only)")
        opts = ctx.options
        soc = validate_soc(opts.get("soc_version") or DEFAULT_SOC_VERSION)
        mode = opts.get("precision_mode") or DEFAULT_PRECISION_MODE
        shapes, shape_source = resolve_input_shapes(ctx.reference, opts.get("input_shapes"),
                                                    ctx.plan.calibration.get("input_shapes"))
        model, record = lower_qdq(ctx.reference, ctx.plan, _policy_for(ctx.plan))
        model, opset_note = to_opset(model, ASCEND_OPSET)
        findings = check_model(model)
        errors = [f for f in findings if f.severity == "error"]
        if errors:
            raise UnsupportedModelError("the plan cannot be lowered to a legal Ascend graph: "
                                        + "; ".join(str(f) for f in errors[:3])
                                        + " (a hand-edited plan may lack the range of a quantized input)")
        deploy, deploy_rec = to_deploy_form(model)
        d = ctx.out_dir / "ascend"
        d.mkdir(parents=True, exist_ok=True)
        path = d / "model_qdq.onnx"
        onnx.save(model, str(path))
        deploy_path = d / "model_deploy.onnx"
        onnx.save(deploy, str(deploy_path))
        params = d / "quant_params.json"
        params.write_text(json.dumps(deploy_rec.to_dict(), indent=1, sort_keys=True) + "\n", encoding="utf-8")
        fp32_path = d / "model_fp32.onnx"
        onnx.save(ctx.fp32, str(fp32_path))
        files = [deploy_path, params]

        node_types = {n.name: n.op_type for n in deploy.graph.node}
        keep, white, notes = precision_files(ctx.plan, node_types, mode)
        keep_file = mix_file = aipp_file = None
        if keep:
            keep_file = "keep_dtype.cfg"
            (d / keep_file).write_text(keep_dtype_text(keep), encoding="utf-8")
            files.append(d / keep_file)
        if white:
            mix_file = "modify_mixlist.json"
            (d / mix_file).write_text(mixlist_text(white, []), encoding="utf-8")
            files.append(d / mix_file)
        aipp = opts.get("aipp")
        if aipp is not None:
            aipp_file = "aipp.cfg"
            files.append(d / aipp_file)
            self._write_aipp(aipp, shapes, d / aipp_file)
        argv = atc_argv(deploy_path.name, "model", soc, shapes, keep_file, precision_mode=mode,
                        modify_mixlist_file=mix_file, insert_op_conf=aipp_file)
        script = d / "atc.sh"
        script.write_text(script_text(argv), encoding="utf-8")
        script.chmod(0o755)
        files.insert(0, script)
        if opset_note:
            notes.insert(0, opset_note)
        if any(v != "static" for v in shape_source.values()):
            notes.append("input shapes for atc: " + describe_shapes(shapes, shape_source))
        om = None
        vendor_step: dict[str, Any] = {"tool": "atc", "status": "not run", "command": shlex.join(argv)}
        if shutil.which("atc"):
            try:
                om = run_atc(argv, d).name
                vendor_step.update(status="ok", log="ascend/atc.log")
            except ExternalToolError as e:  # the graphs stay valid: report the failure with atc's output
                vendor_step.update(status="failed", error=str(e), log="ascend/atc.log")
                notes.append(f"atc: FAILED: {e}")
        else:
            notes.append("atc: not run (atc not on PATH); compile the deploy form with atc.sh: " + shlex.join(argv))
        mask_skips = [s for s in record.skipped if s["reason"].startswith("left in float")]
        left_float = float_nodes(model, ctx.plan, ctx.reference, "ascend", record.skipped,
                                 _policy_for(ctx.plan).weighted_ops, runs_fp16=True)
        note = float_nodes_note(left_float)
        if note:
            notes.append(note)
        return Artifact(
            path=path, fp32_path=fp32_path, run=onnx_runner(model, optimize=False), fp32_run=None,
            verified_by=f"ONNX Runtime {_ort_version()} (CPU, graph optimizations off: exact Q/DQ arithmetic) "
                        f"running the QDQ (fake-quant) graph",
            notes=notes, files=files,
            extra={"vendor_step": vendor_step, "atc_command": argv, "soc_version": soc, "precision_mode": mode, "om": om, "keep_dtype": keep,
                   "modify_mixlist": white, "deploy_form": deploy_path.name, "quant_params": params.name,
                   "int8_layers": len(deploy_rec.layers),
                   "quantized_activations": len(record.activations), "quantized_weights": len(record.weights),
                   "checker_findings": [f.to_dict() for f in findings], "skipped": record.skipped,
                   "left_in_float": len(mask_skips), "float_nodes": left_float},
        )

    @staticmethod
    def _write_aipp(aipp: Any, shapes: dict[str, ShapeRange], dest: Path) -> None:
        if isinstance(aipp, (str, Path)):
            src = Path(aipp)
            if not src.is_file():
                raise BadInputError(f"AIPP config {src} does not exist; give an aipp.cfg file")
            shutil.copyfile(src, dest)
            return
        if not isinstance(aipp, AippConfig):
            raise BadInputError("the aipp option takes an AippConfig or the path of an aipp.cfg")
        images = [(k, r) for k, r in shapes.items() if len(r.opt) == 4]
        if len(images) != 1:
            raise BadInputError("AIPP needs exactly one 4-D NCHW image input")
        rank = list(shapes).index(images[0][0])
        dest.write_text(aipp.render(images[0][1].opt[2], images[0][1].opt[3], rank), encoding="utf-8")


def _ort_version() -> str:
    import onnxruntime

    return str(onnxruntime.__version__)
