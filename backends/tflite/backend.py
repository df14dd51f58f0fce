"""TFLite / LiteRT full-integer backend.

Route (issue 17): the plan's prepared ONNX (bias correction, AdaRound weights and SmoothQuant already
folded in by :func:`deployer.recovery.prepare_for_lowering`; float16 up-cast) -> onnx2tf 2.6.9
"flatbuffer_direct" float ``.tflite`` (:mod:`backends.tflite.convert`) -> tensors mapped to the ONNX
tensors and verified by value (:mod:`backends.tflite.mapping`) -> ai-edge-quantizer 0.10 with the
plan's ranges as its calibration values (:mod:`backends.tflite.quantize`) -> verified in the LiteRT
interpreter, latency under XNNPACK with 1 thread. Every step that converts or loads a ``.tflite`` runs
in a child process (:mod:`backends.tflite.child`): a native crash is one error line, exit 2.

Report fields (``Artifact.extra``): ``io``, ``layout``, ``runtime_layout`` (per input the axis permutation ONNX -> ``.tflite``,
per output the ``.tflite`` output index and permutation back, as read from the file), ``input_shapes`` (dynamic or fixed, and from
where), ``float_nodes`` (``{node, op, reason}`` per op left float), ``float_ops`` (the same as
``{op, tensor, reason}``), ``plan_deviations`` (spec-forced parameters), ``tensors_from_plan``,
``tensors_without_plan_range``, ``plan_tensors`` (TFLite tensor -> the ONNX tensor whose plan
range it carries), ``mapping`` (how many tensors were mapped, found by value, rejected).

Options (``ctx.options``, CLI flags in brackets): ``tflite_io`` int8 | uint8 | float [--tflite-io];
``tflite_layout`` nhwc | nchw [--tflite-layout]; ``tflite_mode`` int8 | 16x8 [--tflite-mode];
``tflite_per_tensor`` [--tflite-per-tensor]; ``strict`` [--strict]; ``tflite_latency_runs`` (default
20, 0 = off); ``tflite_strip_names``; ``input_shapes`` (pins symbolic dims). See :class:`TFLiteOptions`.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from backends.base import Artifact, LoweringContext, Runner, refuse_int4
from backends.tflite import flatbuf
from backends.tflite.child import run_worker
from backends.tflite.convert import FloatModel, convert, upcast_half
from backends.tflite.worker import load_samples, save_samples
from calibration.dataset import Sample
from deployer.errors import BackendUnavailableError, BadInputError, ExternalToolError, GateFailedError
from deployer.findings import Finding
from deployer.plan import Precision

MAP_SAMPLES = 32
"""Calibration samples run through the float ``.tflite`` for the value check and for the min/max of
tensors without an ONNX counterpart (every mapped tensor takes the plan's range instead)."""
INSTALL = ("pip install -c constraints.txt '.[tflite]' && pip install --no-deps --ignore-requires-python "
           "onnx2tf==2.6.9")


class TFLiteBackend:
    """Full-integer INT8 ``.tflite`` for phones and MCUs."""

    name = "tflite"
    artifact_cpu = "arm"  # phones and MCUs: speed measured on another CPU is reported, not gated
    description = "full-integer INT8 .tflite (LiteRT / XNNPACK)"

    def honours_rounding(self, options: dict[str, Any]) -> bool:
        """Whether the plan's AdaRound bits (per-channel 127-level grid) apply: not with per-tensor weights."""
        return not TFLiteOptions.from_options(options).per_tensor

    def available(self) -> tuple[bool, str]:
        for mod in ("ai_edge_litert", "ai_edge_quantizer", "onnx2tf", "onnxsim", "sng4onnx", "psutil"):
            if importlib.util.find_spec(mod) is None:
                return False, f"{mod} is not installed; {INSTALL}"
        return True, ""

    def precheck(self, model: onnx.ModelProto, options: dict[str, Any],
                 sample: dict[str, np.ndarray] | None = None) -> list[Finding]:
        """Before calibration (``deploy --target tflite,...``): :meth:`check` on the first calibration
        ``sample`` (random inputs can leave a real model's value ranges, e.g. token ids or masks).

        Raises:
            GateFailedError: ``strict`` and an op would stay float (the target would fail after
                calibration otherwise; exit 1 as any ``--strict`` miss).
        """
        findings = self.check(model, sample)
        floats = [f for f in findings if f.rule == "tflite-float-op"]
        if floats and TFLiteOptions.from_options(options).strict:
            raise GateFailedError(f"--strict: {len(floats)} op(s) would stay float in the .tflite: "
                                  + ", ".join(f"{f.node} ({f.message[:60]})" for f in floats[:5])
                                  + "; drop --strict to keep them as float islands")
        return findings

    def escalation_options(self, options: dict[str, Any]) -> list[dict[str, Any]]:
        """What the fidelity floor tries before float islands: int16 activations (16x8), still full integer."""
        return [] if TFLiteOptions.from_options(options).mode == "16x8" else [{"tflite_mode": "16x8"}]

    def escalation_precision(self, options: dict[str, Any]) -> Precision | None:
        """Layers the floor keeps out of INT8 become float islands; none under ``strict``."""
        return None if TFLiteOptions.from_options(options).strict else Precision.FP32

    def check(self, model: onnx.ModelProto, sample: dict[str, np.ndarray] | None = None) -> list[Finding]:
        """Whether ``model`` converts to a ``.tflite`` and which ops would stay float, before any
        calibration: converts in a child process and quantizes a random sample's ranges (shapes:
        symbolic dims 1 on the first axis, 16 elsewhere).

        Returns:
            an ``error`` finding if the conversion fails; a ``warning`` per op that stays float.
        """
        ok, why = self.available()
        if not ok:
            return [Finding("tflite-unavailable", "-", why, INSTALL)]
        if sample is None:
            sample = random_sample(model)
        with tempfile.TemporaryDirectory(prefix="deployer-tflite-check-") as d:
            try:
                prepared, _ = upcast_half(model)
                fm = convert(prepared, Path(d) / "convert")
                res = _lower_job(Path(d) / "job", fm, prepared, [sample], {}, set(), TFLiteOptions())
            except ExternalToolError as e:
                return [Finding("tflite-convert", "-", str(e), "use --target onnxruntime, or simplify the graph",
                                source="onnx2tf 2.6.9 / ai-edge-quantizer 0.10")]
        return [Finding("tflite-float-op", f["node"], f"{f['op']} stays float: {f['reason']}",
                        "accept the float island or --strict fails; int8 needs an op LiteRT quantizes",
                        severity="warning", source="ai-edge-quantizer 0.10 static_wi8_ai8")
                for f in res["float_nodes"]]

    def lower(self, ctx: LoweringContext) -> Artifact:
        """Convert, quantize with the plan's ranges, measure latency; see the module docstring.

        Raises:
            BackendUnavailableError: a dependency is missing.
            BadInputError: an unknown option value.
            ExternalToolError: the converter or the quantizer failed or crashed (one line).
            GateFailedError: ``strict`` and an op stayed float.
        """
        refuse_int4(ctx.plan, "tflite", "ai-edge-quantizer's full-integer recipes cannot express (int8 weights only)")
        opts = TFLiteOptions.from_options(ctx.options)
        ok, why = self.available()
        if not ok:
            raise BackendUnavailableError(f"tflite backend unavailable: {why}")
        ctx.out_dir.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=".tflite-work-", dir=ctx.out_dir))
        try:
            return self._lower(ctx, opts, work)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def _lower(self, ctx: LoweringContext, opts: TFLiteOptions, work: Path) -> Artifact:
        notes: list[str] = []
        prepared, n_half = upcast_half(ctx.reference)
        if n_half:
            notes.append(f"float16/bfloat16 model up-cast to float32 before conversion ({n_half} tensors/casts)")
        from backends.tflite.rewrite import split_concat_convs

        prepared, split = split_concat_convs(prepared, ctx.plan)
        if split:
            notes.append(f"{len(split)} Concat(s) of inputs whose ranges differ 8x or more distributed over their "
                         f"convolutions ({', '.join(split[:3])}): each input keeps its own int8 scale instead of the "
                         f"Concat's shared one")
        keep = _input_names(prepared) if opts.layout == "nchw" else []
        samples = [dict(s) for s in list(ctx.calibration)[:MAP_SAMPLES]]
        samples = [{k: (v.astype(np.float32) if v.dtype in (np.float16,) else v) for k, v in s.items()}
                   for s in samples]
        fixed, shape_src = _fixed_shapes(prepared, ctx.options.get("input_shapes"), samples)
        fp32_src = None
        if ctx.fp32_reference is not None and ctx.fp32_reference is not ctx.reference:
            fp32_src = upcast_half(ctx.fp32_reference)[0]
        plan_ranges = {k: (r.min, r.max) for k, r in ctx.plan.ranges.items()}
        from deployer.patterns import mask_paths

        masks = mask_paths(prepared)
        islands = plan_float_tensors(prepared, ctx.plan)

        def attempt(fix: dict[str, list[int]], simplify: bool) -> tuple[FloatModel, bytes, dict[str, Any]]:
            tag = ("fixed" if fix else "dynamic") + ("-sim" if simplify else "")
            with ThreadPoolExecutor(2) as pool:
                fut = pool.submit(convert, prepared, work / f"convert-{tag}", keep, fix, simplify)
                fut32 = (pool.submit(convert, fp32_src, work / f"convert32-{tag}", keep, fix, simplify)
                         if fp32_src is not None else None)
                fm = fut.result()
                fp32 = fut32.result().data if fut32 else fm.data
            return fm, fp32, _lower_job(work / f"job-{tag}", fm, prepared, samples, plan_ranges, masks, opts,
                                        islands)

        symbolic = _symbolic_inputs(prepared)
        tries: list[tuple[dict[str, list[int]], bool]] = [(fixed, False), (fixed, True)]
        if symbolic and not fixed:  # dynamic first; else pinned to the first calibration sample's shapes
            seen = {n: [int(d) for d in np.shape(samples[0][n])] for n in symbolic} if samples else {}
            tries += [(seen, False), (seen, True)] if seen else []
        errors: list[str] = []
        for fix, simplify in tries:
            try:
                fm, fp32_bytes, res = attempt(fix, simplify)
                break
            except ExternalToolError as e:
                errors.append(str(e))
        else:
            raise ExternalToolError(errors[-1] + (f" (also tried: {'; '.join(e[:120] for e in errors[:-1])})"
                                                  if len(errors) > 1 else ""))
        if errors:
            notes.append(f"conversion needed {len(errors) + 1} tries (onnxsim first, or fixed shapes); first "
                         f"failure: {errors[0][:200]}")
        if fix and not fixed:
            shapes: dict[str, Any] = {"mode": "fixed", "shapes": fix, "source": "the first calibration sample"}
        elif fix:
            shapes = {"mode": "fixed", "shapes": fix, "source": shape_src}
        elif symbolic:
            shapes = {"mode": "dynamic", "inputs": symbolic,
                      "note": "symbolic dims kept dynamic; the interpreter is resized to each input"}
        else:
            shapes = {"mode": "static"}
        data = res.pop("quantized")
        float_nodes = res["float_nodes"]
        if opts.strict and float_nodes:
            raise GateFailedError(f"--strict: {len(float_nodes)} op(s) stayed float: "
                                  + ", ".join(f"{f['op']} ({f['node']}: {f['reason'][:60]})" for f in float_nodes[:5]))
        if float_nodes:
            notes.append(f"{len(float_nodes)} op(s) not integer (float_nodes); --strict fails instead")
        notes.append(f"{res['from_plan']} activation tensors carry the plan's ranges; {len(res['deviations'])} follow "
                     f"the TFLite spec instead (plan_deviations); {len(res['without_plan_range'])} without a plan "
                     f"range take their min/max over {len(samples)} calibration samples (tensors_without_plan_range)")
        if res["fitted_biases"]:
            n_ch = sum(len(f["channels"]) for f in res["fitted_biases"])
            notes.append(f"{n_ch} (nearly) dead weight channel(s) in {len(res['fitted_biases'])} op(s) got a larger "
                         f"weight scale so their int32 bias fits (bias_fitted_channels)")
        for dv in res["deviations"]:
            levels = (dv["plan"][1] - dv["plan"][0]) / max(dv["scale"], 1e-30)
            dv["levels"] = round(float(levels), 1)
            if levels < 16:
                notes.append(f"coarse: {dv['onnx_tensor']} (plan range [{dv['plan'][0]:.4g}, {dv['plan'][1]:.4g}]) is "
                             f"requantized to scale {dv['scale']:.4g} at {dv['op']} ({levels:.1f} levels): "
                             f"{dv['reason']}; most of its information is lost in int8 (try --tflite-mode 16x8)")
        if opts.mode == "16x8":
            notes.append("16x8: int16 activations (symmetric, zero point 0), int8 weights")
        if opts.per_tensor:
            notes.append("weights per-tensor: one scale per conv/depthwise/fully-connected weight and its int32 bias")
        if islands:
            notes.append(f"{len(islands)} tensor(s) of plan nodes kept in FP16/FP32 stay float in the .tflite "
                         f"(float islands, listed in float_nodes)")
        data = flatbuf.strip_tensor_names(data) if opts.strip_names else flatbuf.compact(data)
        tag = "int16x8" if opts.mode == "16x8" else "int8"
        out = ctx.out_dir / "tflite"
        out.mkdir(parents=True, exist_ok=True)
        path, fp32_path = out / f"model_{tag}.tflite", out / "model_fp32.tflite"
        path.write_bytes(data)
        fp32_path.write_bytes(fp32_bytes)
        layout = res["layout"]
        extra: dict[str, Any] = {
            "io": flatbuf.io_quantization(data), "layout": opts.layout, "io_type": opts.io_dtype,
            "activations": "int16" if opts.mode == "16x8" else "int8",
            "weights": "int8 per-tensor" if opts.per_tensor else "int8 per-channel",
            "input_shapes": shapes, "runtime_layout": layout, "float_nodes": float_nodes, "float_ops": res["float_ops"],
            "plan_deviations": res["deviations"], "tensors_from_plan": res["from_plan"],
            "tensors_without_plan_range": res["without_plan_range"], "plan_tensors": res["plan_tensors"],
            "bias_fitted_channels": res["fitted_biases"],
            "mapping": {"mapped": res["mapped"], "by_value": res["by_value"], "rejected": res["rejected"],
                        "activations": res["activations"]},
            "converter": "onnx2tf 2.6.9 (flatbuffer_direct) + ai-edge-quantizer 0.10",
        }
        if opts.latency_runs > 0 and samples:
            extra["latency_ms"] = measure_latency({"fp32": fp32_path, "artifact": path}, layout, samples[0],
                                                  opts.latency_runs)
        import ai_edge_litert

        version = getattr(ai_edge_litert, "__version__", "")
        return Artifact(path=path, fp32_path=fp32_path, run=tflite_runner(path, layout),
                        fp32_run=tflite_runner(fp32_path, layout),
                        verified_by=f"LiteRT interpreter (ai_edge_litert {version}, child process)".replace(" ,", ","),
                        notes=notes, extra=extra)


def _lower_job(job: Path, fm: FloatModel, model: onnx.ModelProto, samples: list[dict[str, np.ndarray]],
               plan_ranges: dict[str, tuple[float, float]], masks: set[str], opts: TFLiteOptions,
               float_tensors: set[str] | None = None) -> dict[str, Any]:
    """Run the worker's ``lower`` step; returns its result with ``float_nodes``/``float_ops`` added."""
    job.mkdir(parents=True, exist_ok=True)
    (job / "float.tflite").write_bytes(fm.data)
    onnx.save(model, str(job / "reference.onnx"))
    save_samples(job / "samples.npz", samples)
    (job / "job.json").write_text(json.dumps({
        "keep_nchw": opts.layout == "nchw", "correspondence": fm.correspondence,
        "plan_ranges": {k: [float(a), float(b)] for k, (a, b) in plan_ranges.items()}, "masks": sorted(masks),
        "mode": opts.mode, "per_tensor": opts.per_tensor, "io": opts.io,
        "float_tensors": sorted(float_tensors or ())}))
    run_worker("lower", job, "LiteRT mapping and quantization (ai-edge-quantizer)",
               "the float .tflite or its quantization crashed; `deploy check --target tflite MODEL` shows which "
               "ops convert, or use --tflite-mode 16x8 / --target onnxruntime")
    res: dict[str, Any] = json.loads((job / "result.json").read_text())
    data = (job / "quantized.tflite").read_bytes()
    res["quantized"] = data
    res["float_ops"] = flatbuf.float_ops(data, res.get("float_reasons"))
    res["float_nodes"] = [{"node": f["tensor"], "op": f["op"], "precision": "fp32", "reason": f["reason"]}
                          for f in res["float_ops"]]
    return res


def plan_float_tensors(model: onnx.ModelProto, plan: Any) -> set[str]:
    """Outputs of the nodes the plan keeps out of INT8, and of the Relu/Clip fused onto them: the float
    islands of the ``.tflite`` (a full-integer model otherwise)."""
    high = {n for n, d in plan.nodes.items() if d.precision != Precision.INT8}
    out: set[str] = set()
    for node in model.graph.node:
        if node.name in high:
            out.update(node.output)
    for node in model.graph.node:  # activations the converter fuses into the float op's output
        if node.op_type in ("Relu", "Clip", "LeakyRelu", "HardSwish", "Sigmoid") and set(node.input[:1]) & out:
            out.update(node.output)
    return out


def _input_names(model: onnx.ModelProto) -> list[str]:
    init = {i.name for i in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in init]


def _symbolic_inputs(model: onnx.ModelProto) -> list[str]:
    init = {i.name for i in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in init
            and any(not d.HasField("dim_value") for d in i.type.tensor_type.shape.dim)]


def _fixed_shapes(model: onnx.ModelProto, given: Any, samples: list[dict[str, np.ndarray]]
                  ) -> tuple[dict[str, list[int]], str]:
    """Shapes to pin from ``--input-shapes`` (its OPT shape), or none."""
    if not given:
        return {}, ""
    out = {}
    for n in _symbolic_inputs(model):
        if n in given:
            r = given[n]
            out[n] = [int(d) for d in getattr(r, "opt", r)]
    return out, "--input-shapes (OPT shape)"


def random_sample(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """One input sample for ``check``: standard normal floats, zeros for integer inputs (token ids)."""
    rng = np.random.default_rng(0)
    init = {i.name for i in model.graph.initializer}
    out = {}
    for i in model.graph.input:
        if i.name in init:
            continue
        tt = i.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else (1 if k == 0 else 16) for k, d in enumerate(tt.shape.dim)]
        dt = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)
        out[i.name] = (rng.standard_normal(shape).astype(np.float32) if np.dtype(dt).kind == "f"
                       else np.zeros(shape, dt))
    return out


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


def measure_latency(models: dict[str, Path], layout: dict[str, Any], sample: dict[str, np.ndarray],
                    runs: int) -> dict[str, Any]:
    """Median wall time (ms) of ``invoke`` per model in the LiteRT interpreter (XNNPACK, 1 thread, batch 1),
    in a child process."""
    with tempfile.TemporaryDirectory(prefix="deployer-tflite-lat-") as d:
        job = Path(d)
        for k, p in models.items():
            shutil.copy(p, job / f"{k}.tflite")
        save_samples(job / "samples.npz", [sample])
        (job / "job.json").write_text(json.dumps({"layout": layout, "runs": runs,
                                                  "models": [f"{k}.tflite" for k in models]}))
        run_worker("latency", job, "LiteRT latency measurement", "the .tflite cannot run here")
        ms = json.loads((job / "result.json").read_text())
    return {**{k: ms[f"{k}.tflite"] for k in models},
            "how": f"LiteRT interpreter, XNNPACK (default delegate), 1 thread, batch 1, median of {runs} runs after "
                   f"3 warm-up runs, the models timed in alternation"}


def tflite_runner(path: Path, layout: dict[str, Any] | onnx.ModelProto, layout_name: str = "nhwc",
                  threads: int = 2) -> Runner:
    """Runner for a ``.tflite``: runs the samples in a child process (a LiteRT abort becomes one
    :class:`~deployer.errors.ExternalToolError` line), quantizing float inputs into integer ones and
    dequantizing integer outputs; outputs come back in the ONNX layout and order.

    Args:
        path: the ``.tflite``.
        layout: the ``runtime_layout`` the backend found, or the FP32 ONNX reference (``deploy verify``
            of an existing file: the layout is then read from the shapes, ``layout_name`` first).
    """
    if isinstance(layout, onnx.ModelProto):
        params: dict[str, Any] = {"layout": None, "in_names": _input_names(layout), "layout_name": layout_name,
                                  "out_shapes": [[d.dim_value if d.HasField("dim_value") else None
                                                  for d in o.type.tensor_type.shape.dim] for o in layout.graph.output]}
    else:
        params = {"layout": layout}

    def run(samples: Sequence[Sample]) -> list[list[np.ndarray]]:
        with tempfile.TemporaryDirectory(prefix="deployer-tflite-run-") as d:
            job = Path(d)
            shutil.copy(path, job / "model.tflite")
            save_samples(job / "samples.npz", [dict(s) for s in samples])
            (job / "job.json").write_text(json.dumps({**params, "threads": threads}))
            run_worker("run", job, f"LiteRT run of {path.name}",
                       "the interpreter cannot run this model; `deploy check --target tflite MODEL` lists its "
                       "float ops, or try --tflite-mode 16x8")
            z = np.load(job / "outputs.npz")
            rows: dict[int, dict[int, np.ndarray]] = {}
            for key in z.files:
                k, j = (int(x) for x in key.split("/"))
                rows.setdefault(k, {})[j] = z[key]
        return [[rows[k][j] for j in sorted(rows[k])] for k in sorted(rows)] if rows else [[] for _ in samples]

    return run


__all__ = ["TFLiteBackend", "TFLiteOptions", "load_samples", "measure_latency", "random_sample", "tflite_runner"]
