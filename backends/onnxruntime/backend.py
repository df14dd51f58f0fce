"""ONNX Runtime CPU backend: INT8 for CPU servers, static (QDQ from the plan's ranges) or dynamic.

Kernel flavour (``--cpu``, :mod:`deployer.cpu`): how the INT8 nodes are stored depends on the deployment
CPU's int8 instruction set (``--cpu auto``: the build machine's): **U8S8 with 8-bit weights** on VNNI/AMX
(exact there, the fastest path); on AVX2/AVX-512 without VNNI, whose ``vpmaddubsw`` sums two u8 x s8
products in int16 and saturates with 8-bit weights, **U8U8** in static mode (8-bit weights stored as
uint8 with zero point 128; widened before multiplying, exact) and **U8S8 with 7-bit weights**
(``reduce_range``) in dynamic mode; **S8S8** on ARM64. The plan is the same for every flavour; the report
records ``kernel_flavour = {name, isa, why, ...}`` and ``build_cpu``. Where the flavour is not exact on
the build machine (``--cpu amx`` built on an AVX2 host), fidelity is verified with exact Q/DQ arithmetic
(optimizations off), which is what the deployment CPU's kernels compute. The internal options
``ort_kernels`` / ``ort_reduce_range`` override the choice (benchmarks).

Modes (``--ort-mode``):

- ``static`` (default): the plan lowered as a QDQ ONNX (:mod:`deployer.qdq`) that ONNX Runtime fuses
  into its integer kernels (QLinearConv, QGemm, MatMulIntegerToFloat, QLinearAdd ...). Activation
  ranges come from the plan (asymmetric, per-tensor); weights symmetric per-channel. A Gemm's float bias
  becomes int32 (:func:`backends.onnxruntime.flavours.int32_bias`) so that ONNX Runtime fuses it into
  QGemm. Measured on an AVX2 EPYC (no VNNI), EfficientNet-Lite0, 300 held-out crops, same plan: U8U8
  fused 0.967 top-1 agreement (exact Q/DQ arithmetic 0.960); U8S8 with 7-bit weights 0.843; U8S8 with
  8-bit weights 0.767 (saturated); a symmetric S8S8 graph 0.36.
- ``dynamic``: weights INT8 offline, activations quantized at run time (DynamicQuantizeLinear +
  MatMulInteger / ConvInteger), by ONNX Runtime's own ``quantize_dynamic`` on the FP32 model; the plan's
  non-INT8 nodes are passed as ``nodes_to_exclude``. The seed's rule "CPU -> dynamic quantization".
  Measured on the AVX2 EPYC, all-MiniLM-L6-v2, 1000 held-out fortunes texts: U8S8 7-bit gave topic
  accuracy 0.450 (FP32 0.450), cosine 0.991, at 1.77x FP32 (batch 1, 1 thread) vs U8U8 0.441, 0.9925, 1.43x.

Speed (``targets.onnxruntime.speed``, :mod:`backends.onnxruntime.speed`): FP32 vs artifact in alternating
calls, medians, batch 1 and 1 thread as headline, batch 8 in the grid, sequence models in length buckets.

FP16: ONNX Runtime's CPU provider has FP16 kernels for few ops (most would run through inserted Casts
or fall back), so nodes the plan keeps in FP16 or FP32 stay **FP32 islands** here; the report lists them.

Graph optimizations (``SessionOptions.graph_optimization_level``; ONNX Runtime docs,
"Graph optimizations in ONNX Runtime"):

- ``disable``: the graph runs as written; Q/DQ compute exact quantize-dequantize arithmetic in float.
  Slow; used here only as the reference for the fused kernels.
- ``basic``: constant folding, redundant-node elimination, Conv+BN/Add/Mul folding; runs for every
  execution provider.
- ``extended``: provider-specific fusions on the CPU provider: QDQ groups into QLinear*/integer kernels,
  Conv+activation, MatMul+Add, GELU, LayerNorm, Attention. The result is written offline as
  ``model_<kind>_optimized.onnx`` beside the artifact (portable across x86 CPUs, tied to this ONNX
  Runtime version; it loads without re-running the fusions).
- ``all`` (the default at run time): plus layout optimizations (NCHWc blocked convolutions) chosen for
  the CPU it runs on; never saved offline, since ONNX Runtime documents such models as tied to the
  hardware they were optimized on.

Artifact names (:func:`artifact_name`) say what the file holds: ``model_int8_static.onnx`` /
``model_int8_dynamic.onnx``; ``model_int4_weight_only.onnx`` (``--recipe int4``: MatMulNBits, float
activations, nothing in INT8); ``model_int8_int4w_<mode>.onnx`` (a rules file mixing both);
``model_float.onnx`` (a plan without INT8 or INT4 nodes, e.g. ``--recipe fp16``: all FP32 here).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from backends.base import Artifact, LoweringContext, int4_nodes, onnx_runner
from backends.onnxruntime import speed as ort_speed
from backends.onnxruntime.flavours import (KERNELS, ORT_OPSET, REDUCED_WEIGHT_QMAX, flavour_for, int32_bias,  # noqa: F401
                                           policy_for, static_policy)
from calibration.dataset import Sample
from deployer.cpu import detect, exact_on
from deployer.errors import BadInputError, ExternalToolError
from deployer.float_nodes import float_nodes, float_nodes_note
from deployer.plan import Granularity, Precision, QuantPlan
from deployer.qdq import lower_qdq

MODES = ("static", "dynamic")


POLICY = static_policy()


class _QuantizerNoise(logging.Filter):
    """Drops ONNX Runtime quantizer records below WARNING and its generic advice to pre-process the model."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING and "pre-process" not in record.getMessage()


@contextlib.contextmanager
def quiet_quantizer_logs() -> Iterator[None]:
    """Keep ONNX Runtime's Python quantizer off the console while it runs.

    It logs through the root logger (``logging.info`` per tensor in ``quantize_dynamic``; ``logger.info``
    per node in ``MatMulNBitsQuantizer``, whose module even calls ``logging.basicConfig(level=INFO)``
    when first imported). Inside the block a filter on the root logger drops records below WARNING and
    the generic advice to pre-process the model, and the ``onnxruntime`` loggers are set to WARNING;
    afterwards the root logger's level and handlers are restored (undoing that ``basicConfig``).
    Warnings and errors still print.
    """
    root, ort_logger = logging.getLogger(), logging.getLogger("onnxruntime")
    root_level, ort_level, handlers = root.level, ort_logger.level, list(root.handlers)
    noise = _QuantizerNoise()
    root.addFilter(noise)
    ort_logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        root.removeFilter(noise)
        for h in list(root.handlers):
            if h not in handlers:
                root.removeHandler(h)
        root.setLevel(root_level)
        ort_logger.setLevel(ort_level)


def artifact_name(plan: QuantPlan, mode: str) -> tuple[str, str]:
    """File names of the artifact and of its offline-optimized graph, saying what the artifact holds.

    INT8 nodes (QDQ static or dynamic): ``model_int8_<mode>.onnx``; only weight-only INT4:
    ``model_int4_weight_only.onnx``; both: ``model_int8_int4w_<mode>.onnx``; neither:
    ``model_float.onnx``. The optimized graph: ``model_<kind>_optimized.onnx`` (without the mode).
    """
    int8 = any(d.precision == Precision.INT8 for d in plan.nodes.values())
    int4 = bool(int4_nodes(plan))
    kind = ("int8_int4w" if int4 else "int8") if int8 else ("int4_weight_only" if int4 else "float")
    return (f"model_{kind}_{mode}.onnx" if int8 else f"model_{kind}.onnx"), f"model_{kind}_optimized.onnx"


def dynamic_exclusions(model: onnx.ModelProto, plan: QuantPlan) -> list[str]:
    """Node names ``quantize_dynamic`` must leave in FP32: every node the plan does not make INT8."""
    return sorted(n.name for n in model.graph.node if plan.precision_of(n.name) != Precision.INT8)


def fp32_islands(model: onnx.ModelProto, plan: QuantPlan) -> dict[str, list[str]]:
    """Plan nodes kept in higher precision, by plan precision (all run in FP32 here)."""
    out: dict[str, list[str]] = {}
    for n in model.graph.node:
        dec = plan.nodes.get(n.name)
        if dec is not None and dec.precision != Precision.INT8:
            out.setdefault(dec.precision.value, []).append(n.name)
    return out


def lower_dynamic(model: onnx.ModelProto, plan: QuantPlan, work: Path, kernels: str = "u8s8",
                  reduce_range: bool = True) -> onnx.ModelProto:
    """ONNX Runtime's ``quantize_dynamic`` on ``model``, honouring the plan's FP32/FP16 nodes.

    Weights per-channel when the plan asks for per-channel weights; ``kernels="u8s8"`` (default): int8
    symmetric, 7-bit with ``reduce_range`` (faster than U8U8 in MatMulInteger here, see the module
    docstring); ``"u8u8"``: uint8 weights (ONNX Runtime's asymmetric default for QUInt8). U8S8 needs
    ``reduce_range`` without VNNI (measured here: a two-layer MLP gave SQNR 21.4 dB with 8-bit weights,
    35.8 dB with 7-bit, with or without graph optimizations: MatMulInteger itself saturates).
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    per_channel = any(d.weight is not None and d.weight.granularity == Granularity.PER_CHANNEL
                      for d in plan.nodes.values() if d.precision == Precision.INT8)
    src, dst = work / "_dynamic_input.onnx", work / "_dynamic_output.onnx"
    onnx.save(model, str(src))
    try:
        with quiet_quantizer_logs():
            quantize_dynamic(str(src), str(dst), per_channel=per_channel,
                             reduce_range=reduce_range and kernels == "u8s8",
                             weight_type=QuantType.QUInt8 if kernels == "u8u8" else QuantType.QInt8,
                             nodes_to_exclude=dynamic_exclusions(model, plan))
        out = onnx.load(str(dst))
    except Exception as e:
        raise ExternalToolError(f"onnxruntime quantize_dynamic failed: {type(e).__name__}: {e}") from None
    finally:
        src.unlink(missing_ok=True)
        dst.unlink(missing_ok=True)
    return out


def gemm_to_matmul(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """A copy of ``model`` with the named ``Gemm`` nodes (constant 2-D weight, transA 0, alpha = beta = 1)
    rewritten as ``MatMul`` (+ ``Add`` of the bias), keeping the node name; ONNX Runtime's weight-only
    quantizer handles MatMul only. Exact in FP32."""
    from onnx import helper, numpy_helper

    from deployer.graph import GraphView

    out = onnx.ModelProto()
    out.CopyFrom(model)
    view = GraphView(out)
    wanted = set(names)
    nodes: list[onnx.NodeProto] = []
    for n in out.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        w = view.constants.get(n.input[1]) if n.op_type == "Gemm" and len(n.input) > 1 else None
        if (n.name not in wanted or n.op_type != "Gemm" or w is None or w.ndim != 2 or attrs.get("transA", 0)
                or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0):
            nodes.append(n)
            continue
        wt = numpy_helper.from_array(np.ascontiguousarray(w.T if attrs.get("transB", 0) else w), f"{n.name}.weight_kn")
        out.graph.initializer.append(wt)
        has_bias = len(n.input) > 2 and bool(n.input[2])
        mm_out = f"{n.output[0]}__matmul" if has_bias else n.output[0]
        nodes.append(helper.make_node("MatMul", [n.input[0], wt.name], [mm_out], name=n.name))
        if has_bias:
            nodes.append(helper.make_node("Add", [mm_out, n.input[2]], [n.output[0]], name=f"{n.name}__bias"))
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    return out


def lower_int4(model: onnx.ModelProto, plan: QuantPlan) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """Weight-only block-wise symmetric INT4 for the plan's 4-bit MatMul/Gemm nodes, as ONNX Runtime's
    ``MatMulNBits`` (com.microsoft; written by ONNX Runtime's own ``MatMulNBitsQuantizer``, RTN rounding).

    Returns:
        (model, report entry: nodes asked for, nodes converted, block size).
    """
    names = int4_nodes(plan)
    blocks = [w.block_size for n in names if (w := plan.nodes[n].weight) is not None and w.block_size]
    block = int(min(blocks)) if blocks else 32
    prepared = gemm_to_matmul(model, names)
    with quiet_quantizer_logs():
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        q = MatMulNBitsQuantizer(prepared, bits=4, block_size=block, is_symmetric=True, nodes_to_include=names)
        q.process()
    out = q.model.model
    converted = sorted(n.name for n in out.graph.node if n.op_type == "MatMulNBits")
    return out, {"format": "MatMulNBits (com.microsoft), symmetric, block-wise", "block_size": block,
                 "nodes_requested": len(names), "nodes_int4": len(converted),
                 "not_converted": sorted(set(names) - {c.replace("_Q4", "") for c in converted})[:20]}


def save_optimized(model_path: Path, out_path: Path, level: str = "extended") -> float:
    """Write ONNX Runtime's ``level``-optimized graph of ``model_path`` to ``out_path``; seconds taken."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                                   "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED}[level]
    so.optimized_model_filepath = str(out_path)
    t0 = time.perf_counter()
    ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"])
    return time.perf_counter() - t0


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    counts: dict[str, int] = {}
    for n in model.graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return dict(sorted(counts.items()))


class OnnxRuntimeBackend:
    """INT8 ONNX for ONNX Runtime's CPU provider (static QDQ or dynamic) in the kernel flavour of the
    deployment CPU, with its speed against FP32 in the report."""

    name = "onnxruntime"
    description = "INT8 ONNX for ONNX Runtime's CPU provider (static QDQ or dynamic); throughput in queries/s"

    def honours_rounding(self, options: dict[str, Any]) -> bool:
        """Whether the plan's AdaRound bits (per-channel 127-level grid) apply: not in dynamic mode, whose
        7-bit weights ONNX Runtime's own quantizer rounds."""
        return (options.get("ort_mode") or "static") != "dynamic"

    def available(self) -> tuple[bool, str]:
        try:
            import onnxruntime.quantization  # noqa: F401
        except ImportError:
            return False, "onnxruntime is not installed; pip install -e '.[onnxruntime]'"
        return True, ""

    def check_options(self, options: dict[str, Any]) -> None:
        """Option values checked before any model work.

        Raises:
            BadInputError: an unknown ``ort_mode`` or ``ort_kernels``.
        """
        if (options.get("ort_mode") or "static") not in MODES:
            raise BadInputError(f"--ort-mode {options.get('ort_mode')!r}: use static or dynamic")
        if options.get("ort_kernels") is not None and options["ort_kernels"] not in KERNELS:
            raise BadInputError(f"ort_kernels {options['ort_kernels']!r}: use u8u8 or u8s8")

    def lower(self, ctx: LoweringContext) -> Artifact:
        mode = ctx.options.get("ort_mode") or "static"
        if mode not in MODES:
            raise BadInputError(f"--ort-mode {mode!r}: use static or dynamic")
        build = detect()
        flavour = flavour_for(ctx.options, mode, build.isa)
        kernels, reduce_range = flavour.kernels, flavour.reduce_range
        bits = 7 if reduce_range else 8
        d = ctx.out_dir / "onnxruntime"
        d.mkdir(parents=True, exist_ok=True)
        notes: list[str] = []
        extra: dict[str, Any] = {"mode": mode}
        skipped: list[dict[str, str]] = []
        if mode == "static":
            model, record = lower_qdq(ctx.reference, ctx.plan, policy_for(flavour))
            skipped = record.skipped
            extra.update({"activations": f"{flavour.activation_dtype} asymmetric per-tensor (plan ranges)",
                          "weights": f"symmetric {bits}-bit per-channel, stored as "
                                     f"{'uint8 (zero point 128)' if kernels == 'u8u8' else 'int8'}",
                          "quantized_activations": len(record.activations),
                          "quantized_weights": len(record.weights), "skipped": record.skipped,
                          "int32_bias": int32_bias(model)})
        else:
            model = lower_dynamic(ctx.fp32, ctx.plan, d, kernels, reduce_range)
            extra.update({"activations": "uint8, quantized at run time (DynamicQuantizeLinear)",
                          "weights": f"{'uint8' if kernels == 'u8u8' else 'int8'} {bits}-bit "
                                     f"(onnxruntime quantize_dynamic)",
                          "nodes_excluded": len(dynamic_exclusions(ctx.fp32, ctx.plan))})
            if ctx.plan.bias_correction:
                notes.append("dynamic mode: the plan's bias correction (computed for static activation "
                             "ranges) is not applied")
        if int4_nodes(ctx.plan):
            model, extra["weight_only_int4"] = lower_int4(model, ctx.plan)
            notes.append(f"{extra['weight_only_int4']['nodes_int4']} MatMul/Gemm weight(s) in block-wise INT4 "
                         f"(MatMulNBits, block {extra['weight_only_int4']['block_size']}), activations float")
        extra["float_nodes"] = float_nodes(model, ctx.plan, ctx.reference, "onnxruntime",
                                           skipped,
                                           static_policy(kernels, reduce_range).weighted_ops if mode == "static"
                                           else None, runs_fp16=False)
        note = float_nodes_note(extra["float_nodes"])
        if note:
            notes.append(note)
        islands = fp32_islands(ctx.reference, ctx.plan)
        if islands.get("fp16"):
            notes.append(f"{len(islands['fp16'])} FP16 node(s) of the plan run as FP32 islands (ONNX Runtime's CPU "
                         f"provider has few FP16 kernels)")
        extra["fp32_islands"] = islands
        extra["kernels"] = kernels
        extra["weight_bits"] = bits
        extra["kernel_flavour"] = flavour.to_dict()
        extra["build_cpu"] = build.to_dict()
        name, opt_name = artifact_name(ctx.plan, mode)
        path = d / name
        onnx.save(model, str(path))
        fp32_path = d / "model_fp32.onnx"
        onnx.save(ctx.fp32, str(fp32_path))
        opt_path = d / opt_name
        seconds = save_optimized(path, opt_path)
        extra["optimized_model"] = {"file": opt_path.name, "level": "extended", "seconds": round(seconds, 3),
                                    "runtime_level": "all", "op_counts": op_counts(onnx.load(str(opt_path)))}
        extra["op_counts"] = op_counts(model)
        import onnxruntime

        exact_here = exact_on(flavour, build.isa)
        if exact_here:
            verified_by = (f"ONNX Runtime {onnxruntime.__version__} CPU provider, graph optimizations on (its {kernels} "
                           f"int8 kernels on this {build.isa} CPU)")
        else:  # the fused kernels here would saturate where the deployment CPU does not: verify its arithmetic
            verified_by = (f"ONNX Runtime {onnxruntime.__version__}, graph optimizations off (exact Q/DQ arithmetic: "
                           f"what {flavour.isa}'s fused kernels compute; this {build.isa} CPU's would saturate)")
            notes.append(f"built for {flavour.isa} (--cpu) on a {build.isa} CPU: fidelity verified with exact Q/DQ "
                         f"arithmetic; speed here says nothing about the deployment CPU")
        if flavour.isa != build.isa:
            notes.append(f"kernel flavour {flavour.name} for {flavour.isa} (build CPU: {build.isa})")
        fp32_model, art_model = ctx.fp32, model
        do_speed = bool(ctx.options.get("ort_throughput", True))
        int8 = any(op in extra["op_counts"] for op in ("QuantizeLinear", "DynamicQuantizeLinear", "MatMulNBits"))

        def speed(samples: Sequence[Sample]) -> dict[str, Any]:
            return ort_speed.measure_speed(fp32_model, art_model, samples,
                                           seconds=float(ctx.options.get("ort_speed_seconds", 1.0)),
                                           same_cpu=flavour.isa == build.isa, int8=int8)

        return Artifact(
            path=path, fp32_path=fp32_path, run=onnx_runner(model, optimize=exact_here),
            fp32_run=onnx_runner(ctx.fp32, optimize=True), verified_by=verified_by,
            notes=notes, files=[opt_path], extra=extra, throughput=speed if do_speed else None,
        )


__all__ = ["OnnxRuntimeBackend", "POLICY", "artifact_name", "flavour_for", "int32_bias", "lower_dynamic", "policy_for",
           "quiet_quantizer_logs", "static_policy"]
