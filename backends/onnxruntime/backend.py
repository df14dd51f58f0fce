"""ONNX Runtime CPU backend: INT8 for CPU servers, static (QDQ from the plan's ranges) or dynamic.

Modes (``--ort-mode``):

- ``static`` (default): the plan lowered as a QDQ ONNX (:mod:`deployer.qdq`) that ONNX Runtime fuses
  into its integer kernels (QLinearConv, QGemm, MatMulIntegerToFloat, QLinearAdd ...). Activation
  ranges come from the plan; activations are **uint8** asymmetric and weights int8 symmetric
  per-channel with ``reduce_range`` (7-bit weights, |q| <= 63). Reason: ONNX Runtime's x86 U8S8
  kernels on CPUs without VNNI (AVX2, AVX-512 without VNNI) multiply with ``vpmaddubsw``, whose int16
  sum of two u8 x s8 products saturates for full 8-bit weights (255 * 127 * 2 > 32767); 7-bit weights
  keep it exact (255 * 63 * 2 < 32767). ONNX Runtime documents the same remedy ("reduce_range",
  onnxruntime.quantization). Measured here (AVX2, no VNNI): a symmetric int8/int8 Q/DQ EfficientNet-Lite0
  graph gave top-1 agreement 0.36 with graph optimizations on vs 0.94 with them off.
- Kernels (API option ``ort_kernels``): ``u8u8`` (static default) stores the plan's symmetric 8-bit weights as
  uint8 with zero point 128; ONNX Runtime's U8U8 kernels widen to int16 before multiplying and never
  saturate. Measured here (AVX2, no VNNI), EfficientNet-Lite0, 300 held-out crops, same plan: U8U8
  fused 0.967 top-1 agreement (exact Q/DQ arithmetic 0.960); U8S8 with 7-bit weights 0.843; U8S8 with
  8-bit weights 0.767. ``u8s8`` uses int8 weights, 7-bit with ``ort_reduce_range`` (default True);
  on a VNNI CPU (``avx512_vnni``/``avx_vnni`` in /proc/cpuinfo) U8S8 with 8-bit weights is exact and
  usually the fastest: pass ``ort_kernels="u8s8", ort_reduce_range=False`` there.
- ``dynamic``: weights INT8 offline, activations quantized at run time (DynamicQuantizeLinear +
  MatMulInteger / ConvInteger), by ONNX Runtime's own ``quantize_dynamic`` on the FP32 model; the plan's
  non-INT8 nodes are passed as ``nodes_to_exclude``. The seed's rule "CPU -> dynamic quantization".
  Kernels default to ``u8s8`` with 7-bit weights here (``reduce_range``; exact without VNNI): measured
  on all-MiniLM-L6-v2, 1000 held-out fortunes texts (benchmarks/results/onnxruntime.md), U8S8 7-bit
  gave topic accuracy 0.450 (FP32 0.450), cosine 0.991, at 1.47x FP32 (batch 32, 2 threads) and 1.77x
  (batch 1, 1 thread), timed in alternation with U8U8 (0.441, cosine 0.9925, 1.16x and 1.43x).

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
from backends.onnxruntime.throughput import (DEFAULT_SETTING, REPORT_GRID, Setting, batchable, measure_pair, session,
                                             with_dynamic_batch)
from calibration.dataset import Sample
from deployer.errors import BadInputError, ExternalToolError
from deployer.float_nodes import float_nodes, float_nodes_note
from deployer.plan import Granularity, Precision, QuantPlan
from deployer.qdq import QdqPolicy, lower_qdq

ORT_OPSET = 17
MODES = ("static", "dynamic")
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


KERNELS = ("u8u8", "u8s8")


def static_policy(kernels: str = "u8u8", reduce_range: bool = True) -> QdqPolicy:
    """ONNX Runtime placement: inputs of Conv/Gemm/MatMul and of the ops it has QLinear kernels for
    (Add, pooling), so each quantized op's output meets the next Q and fuses; uint8 activations.

    ``kernels="u8u8"``: symmetric 8-bit weights stored as uint8 with zero point 128 (exact on any x86);
    ``"u8s8"``: int8 weights, 7-bit when ``reduce_range``.
    """
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
        activation_dtype="uint8",
        weight_dtype="uint8" if kernels == "u8u8" else "int8",
        weight_qmax=REDUCED_WEIGHT_QMAX if (reduce_range and kernels == "u8s8") else 127,
    )


POLICY = static_policy()


def cpu_features() -> dict[str, Any]:
    """CPU model and the instruction-set flags that decide ONNX Runtime's int8 kernel path (Linux)."""
    flags: set[str] = set()
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
            elif line.startswith("model name") and not model:
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    vnni = bool({"avx512_vnni", "avx_vnni", "amx_int8"} & flags)
    return {"model": model, "avx2": "avx2" in flags, "avx512f": "avx512f" in flags,
            "vnni": vnni, "int8_path": "VNNI (no int16 saturation)" if vnni else
            "AVX2/AVX-512 u8s8 via vpmaddubsw (int16 saturation: needs reduce_range)"}


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


def throughput_grid(fp32: onnx.ModelProto, artifact: onnx.ModelProto, samples: Sequence[Sample],
                    grid: Sequence[Setting] = REPORT_GRID, default: Setting = DEFAULT_SETTING,
                    repeats: int = 3, min_seconds: float = 0.2) -> dict[str, Any]:
    """``throughput_qps`` of the report: FP32 vs artifact at ``default`` plus the full ``grid``.

    Settings with batch > 1 are measured only when both models give per-sample results with a
    symbolic batch dimension (a static export may fold the batch size into its Reshapes).
    """
    fp32_b, art_b = with_dynamic_batch(fp32), with_dynamic_batch(artifact)
    can_batch = batchable(fp32_b, samples) and batchable(art_b, samples, exact=False)
    rows, notes = [], []
    for s in dict.fromkeys([default, *grid]):
        if s.batch > 1 and not can_batch:
            notes.append(f"batch {s.batch}: not measured (the model's batch dimension is static)")
            continue
        if len(samples) < s.batch:
            notes.append(f"batch {s.batch}: not measured (only {len(samples)} samples)")
            continue
        f, a = measure_pair([fp32_b, art_b], samples, s, repeats, min_seconds)
        rows.append({"batch": s.batch, "threads": s.threads, "fp32": round(f, 2), "artifact": round(a, 2),
                     "speedup": round(a / f, 3)})
    head = next(r for r in rows if r["batch"] == default.batch and r["threads"] == default.threads)
    return {"fp32": head["fp32"], "artifact": head["artifact"], "speedup": head["speedup"],
            "setting": {"batch": default.batch, "threads": default.threads}, "grid": rows,
            "repeats": repeats, "statistic": "median samples/s over repeats, FP32 and INT8 timed in alternation",
            "load_average": _load_average(), "notes": sorted(set(notes)),
            "cpu": cpu_features()}


def _load_average() -> float | None:
    try:
        return float(Path("/proc/loadavg").read_text(encoding="utf-8").split()[0])
    except (OSError, ValueError, IndexError):
        return None


class OnnxRuntimeBackend:
    """INT8 ONNX for ONNX Runtime's CPU provider (static QDQ or dynamic), with throughput in the report."""

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
        reduce_range = bool(ctx.options.get("ort_reduce_range", True))
        kernels = ctx.options.get("ort_kernels") or ("u8s8" if mode == "dynamic" else "u8u8")
        if kernels not in KERNELS:
            raise BadInputError(f"ort_kernels {kernels!r}: use u8u8 or u8s8")
        bits = 7 if (reduce_range and kernels == "u8s8") else 8
        if mode not in MODES:
            raise BadInputError(f"--ort-mode {mode!r}: use static or dynamic")
        d = ctx.out_dir / "onnxruntime"
        d.mkdir(parents=True, exist_ok=True)
        notes: list[str] = []
        extra: dict[str, Any] = {"mode": mode}
        skipped: list[dict[str, str]] = []
        if mode == "static":
            model, record = lower_qdq(ctx.reference, ctx.plan, static_policy(kernels, reduce_range))
            skipped = record.skipped
            extra.update({"activations": "uint8 asymmetric per-tensor (plan ranges)",
                          "weights": f"symmetric {bits}-bit per-channel, stored as "
                                     f"{'uint8 (zero point 128)' if kernels == 'u8u8' else 'int8'}",
                          "quantized_activations": len(record.activations),
                          "quantized_weights": len(record.weights), "skipped": record.skipped})
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
        extra["cpu"] = cpu_features()
        if not extra["cpu"]["vnni"] and kernels == "u8s8" and not reduce_range:
            notes.append("reduce_range off on a CPU without VNNI: ONNX Runtime's u8s8 kernels saturate int16 "
                         "sums; expect large errors (pass ort_reduce_range=True)")
        import onnxruntime

        fp32_model, art_model = ctx.fp32, model
        do_tp = bool(ctx.options.get("ort_throughput", True))

        def throughput(samples: Sequence[Sample]) -> dict[str, Any]:
            return throughput_grid(fp32_model, art_model, samples,
                                   repeats=int(ctx.options.get("ort_repeats", 3)))

        return Artifact(
            path=path, fp32_path=fp32_path, run=onnx_runner(model, optimize=True),
            fp32_run=onnx_runner(ctx.fp32, optimize=True),
            verified_by=f"ONNX Runtime {onnxruntime.__version__} CPU provider, graph optimizations on (fused int8 kernels)",
            notes=notes, files=[opt_path], extra=extra, throughput=throughput if do_tp else None,
        )


__all__ = ["OnnxRuntimeBackend", "POLICY", "artifact_name", "quiet_quantizer_logs", "static_policy", "lower_dynamic",
           "throughput_grid", "cpu_features", "session"]
