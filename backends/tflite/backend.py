"""TFLite / LiteRT full-integer backend.

Route: FP32 reference ONNX -> TensorFlow function (our translator, NHWC) -> TFLiteConverter (float
model for the size/latency baseline; full-integer model, int8 symmetric weights) -> the plan's range
written into every activation tensor, int32 biases re-expressed (:mod:`backends.tflite.apply_plan`) ->
verified in the LiteRT interpreter (``ai_edge_litert``), latency measured there (XNNPACK, 1 thread).

The converter still receives the shared calibration set as its representative dataset: without one it
emits no integer kernels. Its own ranges are then replaced by the plan's for every activation mapped
to an ONNX tensor (``tensors_without_plan_range`` lists any that is not); spec-forced parameters
(SOFTMAX/LOGISTIC/TANH outputs, ops sharing input and output parameters) are listed in
``plan_deviations``; ops left in float in ``float_ops``.

Options (``ctx.options``, CLI flags in brackets): ``tflite_io`` int8 | uint8 | float [--tflite-io];
``tflite_layout`` nhwc | nchw [--tflite-layout]; ``tflite_mode`` int8 | 16x8 [--tflite-mode];
``tflite_per_tensor`` [--tflite-per-tensor]; ``strict`` [--strict]; ``tflite_latency_runs`` (default
20, 0 = off); ``tflite_strip_names``. See :class:`TFLiteOptions`.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from backends.base import Artifact, LoweringContext, refuse_int4
from calibration.dataset import Sample
from deployer.errors import BackendUnavailableError, BadInputError, GateFailedError
from deployer.plan import Precision


class TFLiteBackend:
    """Full-integer INT8 ``.tflite`` for phones and MCUs."""

    name = "tflite"
    artifact_cpu = "arm"  # phones and MCUs: speed measured on another CPU is reported, not gated
    description = "full-integer INT8 .tflite (LiteRT / XNNPACK)"

    def honours_rounding(self, options: dict[str, Any]) -> bool:
        """Whether the plan's AdaRound bits (per-channel 127-level grid) apply: not with per-tensor weights."""
        return not TFLiteOptions.from_options(options).per_tensor

    def available(self) -> tuple[bool, str]:
        try:
            import ai_edge_litert  # noqa: F401
            import tensorflow  # noqa: F401
        except ImportError as e:
            return False, f"{e.name} is not installed; pip install -e '.[tflite]' -c constraints.txt"
        return True, ""

    def lower(self, ctx: LoweringContext) -> Artifact:
        """Convert, write the plan's ranges, measure latency; see the module docstring for options.

        Raises:
            BackendUnavailableError: tensorflow or ai_edge_litert missing.
            BadInputError: an unknown option value.
            GateFailedError: ``strict`` and an op stayed float (or the converter could not make it integer).
        """
        refuse_int4(ctx.plan, "tflite", "this TFLite route cannot express (TFLiteConverter's full-integer path has int8 weights only)")
        ok, why = self.available()
        if not ok:
            raise BackendUnavailableError(f"tflite backend unavailable: {why}")
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        import tensorflow as tf

        from backends.tflite.apply_plan import apply_plan_ranges, float_ops, io_quantization
        from backends.tflite.onnx_to_tf import OnnxToTf

        opts = TFLiteOptions.from_options(ctx.options)
        ref = ctx.reference
        conv = OnnxToTf(ref, opts.layout)
        fn = conv.function()
        concrete = fn.get_concrete_function()
        in_names = [i.name for i in conv.inputs]
        to_layout = _layout_fn(ref, opts.layout)

        def representative() -> Any:
            for s in ctx.calibration:
                yield [to_layout(n, s[n]) for n in in_names]

        wide = opts.mode == "16x8"
        with _quiet():
            if ctx.fp32_reference is not None and ctx.fp32_reference is not ctx.reference:
                fp32_fn = OnnxToTf(ctx.fp32_reference, opts.layout, tag_tensors=False).function()
                c = tf.lite.TFLiteConverter.from_concrete_functions([fp32_fn.get_concrete_function()], fp32_fn)
            else:
                c = tf.lite.TFLiteConverter.from_concrete_functions([concrete], fn)
            fp32_bytes = c.convert()
            c = tf.lite.TFLiteConverter.from_concrete_functions([concrete], fn)
            c.optimizations = [tf.lite.Optimize.DEFAULT]
            # The converter needs a representative dataset to emit integer kernels; every activation it
            # calibrates is then overwritten with the plan's range (apply_plan_ranges).
            c.representative_dataset = representative
            integer_ops = (tf.lite.OpsSet.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8 if wide
                           else tf.lite.OpsSet.TFLITE_BUILTINS_INT8)
            c.target_spec.supported_ops = [integer_ops] if opts.strict else [integer_ops, tf.lite.OpsSet.TFLITE_BUILTINS]
            if opts.per_tensor:  # apply_plan_ranges(per_tensor=True) enforces one scale per weight either way
                c._experimental_disable_per_channel = True
                c._experimental_disable_per_channel_quantization_for_dense_layers = True
            io_dtype = {"int8": tf.int8, "uint8": tf.uint8, "int16": tf.int16}.get(opts.io_dtype)
            if io_dtype is not None:
                c.inference_input_type = io_dtype
                c.inference_output_type = io_dtype
            try:
                int8_bytes = c.convert()
            except Exception as e:  # the converter raises ConverterError/RuntimeError with its log
                if opts.strict:
                    raise GateFailedError(f"--strict: the TFLite converter could not make every op integer "
                                          f"({str(e).strip().splitlines()[-1][:300]}); drop --strict to keep such "
                                          f"ops in float") from None
                raise

        ids = [o for n in ref.graph.node for o in n.output]
        out_names = [o.name for o in ref.graph.output]
        notes: list[str] = []
        int8_bytes, applied = apply_plan_ranges(int8_bytes, ctx.plan, ids, out_names, in_names,
                                                per_tensor=opts.per_tensor)
        int8_bytes = strip_tensor_names(int8_bytes) if opts.strip_names else int8_bytes
        notes.append(f"{applied.from_plan} activation tensors carry the plan's ranges; "
                     f"{len(applied.deviations)} follow the TFLite spec instead (plan_deviations); "
                     f"{len(applied.unmapped)} without a plan range (tensors_without_plan_range)")
        floats = float_ops(int8_bytes)
        if floats and opts.strict:
            raise GateFailedError(f"--strict: {len(floats)} op(s) stayed float: "
                                  + ", ".join(f"{f['op']} ({f['tensor']})" for f in floats[:10]))
        if floats:
            notes.append(f"{len(floats)} op(s) not integer (float_ops); --strict fails instead")
        if wide:
            notes.append("16x8: int16 activations (symmetric, zero point 0), int8 weights")
        if opts.per_tensor:
            notes.append("weights per-tensor: one scale per conv/depthwise/fully-connected weight and its int32 "
                         "bias (for runtimes without per-channel support, e.g. TFLite Micro FULLY_CONNECTED)"
                         + (f"; {len(applied.requantized_weights)} weight tensor(s) the converter left per-channel "
                            f"were requantized per-tensor" if applied.requantized_weights else ""))
        non_int8 = [n for n, d in ctx.plan.nodes.items() if d.precision != Precision.INT8]
        if non_int8:
            notes.append(f"{len(non_int8)} plan node(s) not INT8 were lowered to integer: this backend is full-integer")

        tag = "int16x8" if wide else "int8"
        fp32_path = ctx.out_dir / "tflite" / "model_fp32.tflite"
        path = ctx.out_dir / "tflite" / f"model_{tag}.tflite"
        path.parent.mkdir(parents=True, exist_ok=True)
        fp32_path.write_bytes(fp32_bytes)
        path.write_bytes(int8_bytes)
        import ai_edge_litert

        version = getattr(ai_edge_litert, "__version__", "")
        extra: dict[str, Any] = {
            "io": io_quantization(int8_bytes), "layout": opts.layout, "io_type": opts.io_dtype,
            "activations": "int16" if wide else "int8",
            "weights": "int8 per-tensor" if opts.per_tensor else "int8 per-channel",
            **({"weights_requantized_per_tensor": applied.requantized_weights} if opts.per_tensor else {}),
            "plan_deviations": applied.deviations, "tensors_from_plan": applied.from_plan,
            "tensors_without_plan_range": applied.unmapped, "float_ops": floats,
        }
        if opts.latency_runs > 0:
            sample = [to_layout(n, ctx.calibration[0][n]) for n in in_names] if len(ctx.calibration) else None
            extra["latency_ms"] = {"fp32": measure_latency(fp32_path, sample, opts.latency_runs),
                                   "artifact": measure_latency(path, sample, opts.latency_runs),
                                   "how": f"LiteRT interpreter, XNNPACK (default delegate), 1 thread, batch 1, "
                                          f"median of {opts.latency_runs} runs after 3 warm-up runs"}
        return Artifact(
            path=path, fp32_path=fp32_path, run=tflite_runner(path, ref, opts.layout),
            fp32_run=tflite_runner(fp32_path, ref, opts.layout),
            verified_by=f"LiteRT interpreter (ai_edge_litert {version})".replace(" )", ")"),
            notes=notes, extra=extra,
        )


@dataclass(frozen=True)
class TFLiteOptions:
    """The backend's options (``ctx.options`` keys ``tflite_*`` and ``strict``), validated.

    Attributes:
        io: ``int8`` | ``uint8`` | ``float``: type of float-valued model inputs/outputs.
        layout: ``nhwc`` (image inputs transposed, TFLite's layout) | ``nchw`` (the source layout).
        mode: ``int8`` | ``16x8`` (int16 activations, int8 weights).
        per_tensor: one weight scale per tensor instead of per output channel.
        strict: fail instead of leaving float ops.
        latency_runs: timed runs for ``latency_ms`` (0 = do not measure).
        strip_names: drop tensor names from the deployed file (the plan mapping is done by then).
    """

    io: str = "int8"
    layout: str = "nhwc"
    mode: str = "int8"
    per_tensor: bool = False
    strict: bool = False
    latency_runs: int = 20
    strip_names: bool = False

    def __post_init__(self) -> None:
        if self.layout not in ("nhwc", "nchw"):
            raise BadInputError(f"--tflite-layout {self.layout!r}: use nhwc or nchw")
        if self.io not in ("int8", "uint8", "float"):
            raise BadInputError(f"--tflite-io {self.io!r}: use int8, uint8 or float")
        if self.mode not in ("int8", "16x8"):
            raise BadInputError(f"--tflite-mode {self.mode!r}: use int8 or 16x8")
        if self.mode == "16x8" and self.io == "uint8":
            raise BadInputError("--tflite-mode 16x8 has int16 (or float) inputs/outputs; use --tflite-io int8 "
                                "(gives int16 I/O) or float")
        if self.latency_runs < 0:
            raise BadInputError(f"tflite_latency_runs {self.latency_runs}: give 0 (off) or a positive count")

    @property
    def io_dtype(self) -> str:
        """The model's I/O dtype name: int8, uint8, int16 (16x8 integer I/O) or float."""
        return "int16" if self.mode == "16x8" and self.io == "int8" else self.io

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> TFLiteOptions:
        return cls(io=options.get("tflite_io", "int8"), layout=options.get("tflite_layout", "nhwc"),
                   mode=options.get("tflite_mode", "int8"), per_tensor=bool(options.get("tflite_per_tensor", False)),
                   strict=bool(options.get("strict", False)),
                   latency_runs=int(options.get("tflite_latency_runs", 20)),
                   strip_names=bool(options.get("tflite_strip_names", False)))


def measure_latency(path: Path, sample: list[np.ndarray] | None, runs: int) -> float:
    """Median wall time (ms) of ``invoke`` in the LiteRT interpreter: XNNPACK, 1 thread, batch 1.

    Integer inputs are filled with the sample quantized by the input parameters (zeros without one).
    """
    import time

    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(path), num_threads=1)
    if sample is not None:  # dynamic dims (shape_signature -1): time the sample's own shape
        for d, x in zip(it.get_input_details(), sample):
            if tuple(d["shape"]) != np.shape(x):
                it.resize_tensor_input(d["index"], list(np.shape(x)))
    it.allocate_tensors()
    for i, d in enumerate(it.get_input_details()):
        x = sample[i] if sample is not None and i < len(sample) else np.zeros(d["shape"], np.float32)
        if _quantized(d) and np.asarray(x).dtype.kind == "f":
            scale, zp = d["quantization"]
            info = np.iinfo(d["dtype"])
            x = np.clip(np.rint(x / scale + zp), info.min, info.max)
        it.set_tensor(d["index"], np.asarray(x).astype(d["dtype"]).reshape(d["shape"]))
    for _ in range(3):
        it.invoke()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        it.invoke()
        times.append((time.perf_counter() - t0) * 1e3)
    return round(float(np.median(times)), 3)


def strip_tensor_names(tflite_bytes: bytes) -> bytes:
    """Empty every tensor name except model inputs/outputs (smaller file; names serve no runtime purpose)."""
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(tflite_bytes))
    for sg in model.subgraphs:
        keep = {int(i) for i in sg.inputs} | {int(o) for o in sg.outputs}
        for i, t in enumerate(sg.tensors):
            if i not in keep:
                t.name = b""
    from backends.tflite.apply_plan import serialize

    return serialize(model)


def _layout_fn(model: onnx.ModelProto, layout: str) -> Any:
    ranks = {i.name: len(i.type.tensor_type.shape.dim) for i in model.graph.input}

    def to_layout(name: str, a: np.ndarray) -> np.ndarray:
        if layout == "nhwc" and ranks.get(name) == 4:
            return np.ascontiguousarray(np.transpose(a, (0, 2, 3, 1)))
        return a

    return to_layout


def tflite_runner(path: Path, reference: onnx.ModelProto, layout: str) -> Any:
    """Runner for a ``.tflite``: quantizes float samples into integer inputs with the model's input
    parameters, dequantizes integer outputs, and returns outputs in the reference's layout."""
    from ai_edge_litert.interpreter import Interpreter

    to_layout = _layout_fn(reference, layout)
    in_names = [i.name for i in reference.graph.input if i.name not in {x.name for x in reference.graph.initializer}]
    out_ranks = [len(o.type.tensor_type.shape.dim) for o in reference.graph.output]

    def run(samples: Sequence[Sample]) -> list[list[np.ndarray]]:
        it = Interpreter(model_path=str(path), num_threads=2)
        it.allocate_tensors()
        ins = it.get_input_details()
        outs = it.get_output_details()
        results = []
        for s in samples:
            xs = [to_layout(name, s[name]) for name in in_names]
            if any(tuple(it.get_input_details()[k]["shape"]) != x.shape for k, x in enumerate(xs)):
                # dynamic dims (shape_signature -1): resize to this sample, as LiteRT documents
                for d, x in zip(ins, xs):
                    it.resize_tensor_input(d["index"], list(x.shape))
                it.allocate_tensors()
            for d, x in zip(ins, xs):
                if _quantized(d) and x.dtype.kind == "f":
                    scale, zp = d["quantization"]
                    info = np.iinfo(d["dtype"])
                    x = np.clip(np.rint(x / scale + zp), info.min, info.max)
                it.set_tensor(d["index"], x.astype(d["dtype"]))
            it.invoke()
            row = []
            for d, rank in zip(outs, out_ranks):
                y = it.get_tensor(d["index"])
                if _quantized(d):
                    scale, zp = d["quantization"]
                    y = (y.astype(np.float32) - zp) * scale
                if layout == "nhwc" and rank == 4:
                    y = np.transpose(y, (0, 3, 1, 2))
                row.append(np.asarray(y, np.float32))
            results.append(row)
        return results

    return run


def _quantized(detail: dict[str, Any]) -> bool:
    """An integer model input/output carrying a real-valued scale (int8, uint8, int16); token ids have none."""
    return np.dtype(detail["dtype"]).kind in "iu" and bool(detail["quantization"][0])


@contextlib.contextmanager
def _quiet() -> Any:
    """Silence the converter's Python warnings (its C++ logging is set by TF_CPP_MIN_LOG_LEVEL)."""
    import warnings

    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield
