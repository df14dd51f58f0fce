"""TFLite / LiteRT full-integer backend.

Route: FP32 reference ONNX -> TensorFlow function (our translator, NHWC) -> TFLiteConverter (float
model for the size/latency baseline; full-integer model with int8 per-channel symmetric weights) ->
plan ranges written into every activation tensor (:mod:`backends.tflite.apply_plan`) -> verified in
the LiteRT interpreter (``ai_edge_litert``).

Defaults: int8 inputs/outputs for float-valued I/O (integer inputs keep their dtype), NHWC for 4-D
image inputs. Options (``ctx.options``): ``tflite_io`` (int8|uint8|float), ``tflite_layout``
(nhwc|nchw).
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from backends.base import Artifact, LoweringContext
from calibration.dataset import Sample
from deployer.errors import BadInputError, BackendUnavailableError
from deployer.plan import Precision


class TFLiteBackend:
    """Full-integer INT8 ``.tflite`` for phones and MCUs."""

    name = "tflite"
    description = "full-integer INT8 .tflite (LiteRT / XNNPACK)"

    def available(self) -> tuple[bool, str]:
        try:
            import ai_edge_litert  # noqa: F401
            import tensorflow  # noqa: F401
        except ImportError as e:
            return False, f"{e.name} is not installed; pip install -e '.[tflite]' -c constraints.txt"
        return True, ""

    def lower(self, ctx: LoweringContext) -> Artifact:
        ok, why = self.available()
        if not ok:
            raise BackendUnavailableError(f"tflite backend unavailable: {why}")
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        import tensorflow as tf

        from backends.tflite.apply_plan import apply_plan_ranges, io_quantization
        from backends.tflite.onnx_to_tf import OnnxToTf

        layout = ctx.options.get("tflite_layout", "nhwc")
        io_type = ctx.options.get("tflite_io", "int8")
        if layout not in ("nhwc", "nchw"):
            raise BadInputError(f"--tflite-layout {layout!r}: use nhwc or nchw")
        if io_type not in ("int8", "uint8", "float"):
            raise BadInputError(f"--tflite-io {io_type!r}: use int8, uint8 or float")
        ref = ctx.reference
        conv = OnnxToTf(ref, layout)
        fn = conv.function()
        concrete = fn.get_concrete_function()
        in_names = [i.name for i in conv.inputs]
        to_layout = _layout_fn(ref, layout)

        def representative() -> Any:
            for s in ctx.calibration:
                yield [to_layout(n, s[n]) for n in in_names]

        with _quiet():
            if ctx.fp32_reference is not None and ctx.fp32_reference is not ctx.reference:
                fp32_fn = OnnxToTf(ctx.fp32_reference, layout).function()
                c = tf.lite.TFLiteConverter.from_concrete_functions([fp32_fn.get_concrete_function()], fp32_fn)
            else:
                c = tf.lite.TFLiteConverter.from_concrete_functions([concrete], fn)
            fp32_bytes = c.convert()
            c = tf.lite.TFLiteConverter.from_concrete_functions([concrete], fn)
            c.optimizations = [tf.lite.Optimize.DEFAULT]
            c.representative_dataset = representative
            c.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
            if io_type != "float":
                c.inference_input_type = tf.int8 if io_type == "int8" else tf.uint8
                c.inference_output_type = tf.int8 if io_type == "int8" else tf.uint8
            int8_bytes = c.convert()

        ids = [o for n in ref.graph.node for o in n.output]
        out_names = [o.name for o in ref.graph.output]
        notes: list[str] = []
        if io_type == "int8":
            int8_bytes, applied = apply_plan_ranges(int8_bytes, ctx.plan, ids, out_names, in_names)
            notes.append(f"{applied.from_plan} activation tensors carry the plan's ranges; "
                         f"{len(applied.deviations)} follow the TFLite spec instead (listed in plan_deviations)")
        else:
            applied = None
            notes.append(f"--tflite-io {io_type}: activation ranges come from the converter's calibration on the "
                         "shared calibration set (plan ranges are applied only with int8 I/O)")
        non_int8 = [n for n, d in ctx.plan.nodes.items() if d.precision != Precision.INT8]
        if non_int8:
            notes.append(f"{len(non_int8)} plan node(s) not INT8 were lowered to INT8: this backend is full-integer")

        fp32_path = ctx.out_dir / "tflite" / "model_fp32.tflite"
        path = ctx.out_dir / "tflite" / "model_int8.tflite"
        path.parent.mkdir(parents=True, exist_ok=True)
        fp32_path.write_bytes(fp32_bytes)
        path.write_bytes(int8_bytes)
        import ai_edge_litert

        version = getattr(ai_edge_litert, "__version__", "")
        extra: dict[str, Any] = {"io": io_quantization(int8_bytes), "layout": layout, "io_type": io_type}
        if applied is not None:
            extra["plan_deviations"] = applied.deviations
            extra["tensors_from_plan"] = applied.from_plan
            extra["tensors_without_plan_range"] = applied.unmapped
        return Artifact(
            path=path, fp32_path=fp32_path, run=tflite_runner(path, ref, layout),
            fp32_run=tflite_runner(fp32_path, ref, layout),
            verified_by=f"LiteRT interpreter (ai_edge_litert {version})".replace(" )", ")"),
            notes=notes, extra=extra,
        )


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
            for d, name in zip(ins, in_names):
                x = to_layout(name, s[name])
                if d["dtype"] in (np.int8, np.uint8) and x.dtype.kind == "f":
                    scale, zp = d["quantization"]
                    info = np.iinfo(d["dtype"])
                    x = np.clip(np.rint(x / scale + zp), info.min, info.max)
                it.set_tensor(d["index"], x.astype(d["dtype"]))
            it.invoke()
            row = []
            for d, rank in zip(outs, out_ranks):
                y = it.get_tensor(d["index"])
                if d["dtype"] in (np.int8, np.uint8):
                    scale, zp = d["quantization"]
                    y = (y.astype(np.float32) - zp) * scale
                if layout == "nhwc" and rank == 4:
                    y = np.transpose(y, (0, 3, 1, 2))
                row.append(np.asarray(y, np.float32))
            results.append(row)
        return results

    return run


@contextlib.contextmanager
def _quiet() -> Any:
    """Silence the converter's Python warnings (its C++ logging is set by TF_CPP_MIN_LOG_LEVEL)."""
    import warnings

    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield
