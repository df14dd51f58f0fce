"""Engine build and engine-vs-ONNX-Runtime comparison through TensorRT's Python API and Polygraphy.

Everything here that touches ``tensorrt`` or ``polygraphy`` imports it lazily inside a function: these
machines have neither a GPU nor TensorRT, so this code only runs where they exist (the TensorRT Docker
image on a GPU host). The command builders (:func:`trtexec_argv`, :func:`polygraphy_convert_argv`,
:func:`polygraphy_compare_argv`) are pure functions, unit-tested anywhere.

Build (TensorRT Developer Guide, "Strongly Typed Networks", "Optimization Profiles", "Timing Cache",
"Version Compatibility", "Hardware Compatibility"):

- strongly typed network: ``NetworkDefinitionCreationFlag.STRONGLY_TYPED`` on 10.x; on 11.x every network
  is strongly typed and the flag may be absent, so it is set only when it exists;
- one optimization profile holding a min/opt/max shape for every dynamic input, from ``--input-shapes``
  (``name:SHAPE`` static, ``name:MIN/OPT/MAX`` dynamic; grammar in :mod:`deployer.shapes`);
- a timing cache read before the build (if the file exists) and written after it;
- optional ``BuilderFlag.VERSION_COMPATIBLE`` and ``hardware_compatibility_level``;
- the engine and a build log (every builder message) written beside the ONNX file.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from deployer.errors import BadInputError, ExternalToolError
from deployer.shapes import ShapeRange

HARDWARE_LEVELS = {"ampere_plus": "AMPERE_PLUS", "same_compute_capability": "SAME_COMPUTE_CAPABILITY"}
"""``--trt-hardware-compatibility`` values -> ``tensorrt.HardwareCompatibilityLevel`` members."""


@dataclass(frozen=True)
class EngineOptions:
    """How to build one engine.

    Attributes:
        input_shapes: input name -> :class:`ShapeRange` (from ``--input-shapes``).
        timing_cache: timing-cache file (read if it exists, written after the build).
        version_compatible: build a version-compatible engine (runs on later TensorRT runtimes).
        hardware_compatibility: ``None``, ``"ampere_plus"`` or ``"same_compute_capability"``.
        sparse_weights: let TensorRT pick 2:4 sparse tensor-core kernels for weights holding the pattern
            (``BuilderFlag.SPARSE_WEIGHTS``; ``trtexec --sparsity=enable``; ``polygraphy --sparse-weights``;
            TensorRT Developer Guide, "Structured Sparsity"). Set by ``deploy --sparsity 2:4``.
    """

    input_shapes: Mapping[str, ShapeRange] = field(default_factory=dict)
    timing_cache: Path | None = None
    version_compatible: bool = False
    hardware_compatibility: str | None = None
    sparse_weights: bool = False

    def __post_init__(self) -> None:
        if self.hardware_compatibility is not None and self.hardware_compatibility not in HARDWARE_LEVELS:
            raise BadInputError(f"--trt-hardware-compatibility {self.hardware_compatibility!r}: use one of "
                                f"{', '.join(HARDWARE_LEVELS)}")

    @classmethod
    def from_backend_options(cls, options: Mapping[str, Any], timing_cache: Path | None) -> "EngineOptions":
        return cls(input_shapes=dict(options.get("input_shapes") or {}), timing_cache=timing_cache,
                   version_compatible=bool(options.get("trt_version_compatible", False)),
                   hardware_compatibility=options.get("trt_hardware_compatibility"),
                   sparse_weights=bool(options.get("trt_sparsity", False)))


# -- command lines (pure) ------------------------------------------------------------------------------

def _x(shape: Sequence[int]) -> str:
    return "x".join(str(d) for d in shape)


def _brackets(shape: Sequence[int]) -> str:
    return "[" + ",".join(str(d) for d in shape) + "]"


def trtexec_argv(onnx_path: str, engine_path: str, options: EngineOptions | None = None) -> list[str]:
    """The ``trtexec`` command equivalent to :func:`build_engine` (TensorRT 10.x / 11.x)."""
    o = options or EngineOptions()
    argv = ["trtexec", f"--onnx={onnx_path}", "--stronglyTyped", f"--saveEngine={engine_path}",
            f"--timingCacheFile={o.timing_cache.name if o.timing_cache else 'timing.cache'}"]
    if o.input_shapes:
        for flag, pick in (("--minShapes", "min"), ("--optShapes", "opt"), ("--maxShapes", "max")):
            argv.append(f"{flag}=" + ",".join(f"{n}:{_x(getattr(r, pick))}" for n, r in o.input_shapes.items()))
    if o.version_compatible:
        argv.append("--versionCompatible")
    if o.hardware_compatibility:
        argv.append("--hardwareCompatibilityLevel=" + {"ampere_plus": "ampere+",
                                                      "same_compute_capability": "none"}[o.hardware_compatibility])
    if o.sparse_weights:
        argv.append("--sparsity=enable")
    return argv


def polygraphy_convert_argv(onnx_path: str, engine_path: str, options: EngineOptions | None = None) -> list[str]:
    """The ``polygraphy convert`` command equivalent to :func:`build_engine`."""
    o = options or EngineOptions()
    cache = o.timing_cache.name if o.timing_cache else "timing.cache"
    argv = ["polygraphy", "convert", onnx_path, "--convert-to", "trt", "--strongly-typed", "-o", engine_path,
            "--load-timing-cache", cache, "--save-timing-cache", cache]
    argv += _polygraphy_shapes(o)
    if o.version_compatible:
        argv.append("--version-compatible")
    if o.hardware_compatibility:
        argv += ["--hardware-compatibility-level", o.hardware_compatibility]
    if o.sparse_weights:
        argv.append("--sparse-weights")
    return argv


def polygraphy_compare_argv(onnx_path: str, options: EngineOptions | None = None) -> list[str]:
    """``polygraphy run`` comparing the TensorRT engine with ONNX Runtime on the same inputs."""
    o = options or EngineOptions()
    return ["polygraphy", "run", onnx_path, "--trt", "--onnxrt", "--strongly-typed",
            *_polygraphy_shapes(o), "--atol", "1e-2", "--rtol", "1e-2"]


def _polygraphy_shapes(o: EngineOptions) -> list[str]:
    if not o.input_shapes:
        return []
    out = []
    for flag, pick in (("--trt-min-shapes", "min"), ("--trt-opt-shapes", "opt"), ("--trt-max-shapes", "max")):
        out += [flag, *(f"{n}:{_brackets(getattr(r, pick))}" for n, r in o.input_shapes.items())]
    return out


# -- engine build (TensorRT) ---------------------------------------------------------------------------

def tensorrt_version() -> str | None:
    """The importable TensorRT's version, or None when TensorRT is not installed."""
    try:
        import tensorrt as trt
    except ImportError:
        return None
    return str(getattr(trt, "__version__", "unknown"))


def _logger(trt: Any, lines: list[str]) -> Any:
    class RecordingLogger(trt.ILogger):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            trt.ILogger.__init__(self)

        def log(self, severity: Any, msg: str) -> None:
            lines.append(f"[{getattr(severity, 'name', severity)}] {msg}")

    return RecordingLogger()


def build_engine(onnx_path: Path, engine_path: Path, options: EngineOptions | None = None,
                 log_path: Path | None = None) -> Path:
    """Build and serialize a strongly typed engine from ``onnx_path``; write the build log.

    Raises:
        BadInputError: a dynamic input has no ``--input-shapes`` entry, or an entry names no input.
        ExternalToolError: the parser or builder failed (its messages are in the log and the error).
    """
    import tensorrt as trt

    o = options or EngineOptions()
    lines: list[str] = [f"TensorRT {getattr(trt, '__version__', 'unknown')}; ONNX {onnx_path.name}"]
    log_path = log_path or engine_path.with_suffix(".build.log")
    try:
        logger = _logger(trt, lines)
        builder = trt.Builder(logger)
        flags = 0
        if hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):  # 10.x; the only mode on 11.x
            flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(onnx_path)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            lines.append("parser errors: " + errors)
            raise ExternalToolError(f"TensorRT could not parse {onnx_path.name}: {errors}; run "
                                    f"`deploy check --target tensorrt {onnx_path.name}` for the rule it breaks")
        config = builder.create_builder_config()
        _add_profile(trt, builder, network, config, o.input_shapes)
        if o.version_compatible:
            config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
        if o.sparse_weights:
            config.set_flag(trt.BuilderFlag.SPARSE_WEIGHTS)
        if o.hardware_compatibility:
            config.hardware_compatibility_level = getattr(trt.HardwareCompatibilityLevel,
                                                          HARDWARE_LEVELS[o.hardware_compatibility])
        cache_path = o.timing_cache or engine_path.with_name("timing.cache")
        cached = cache_path.read_bytes() if cache_path.exists() else b""
        lines.append(f"timing cache: {cache_path.name} ({'loaded ' + str(len(cached)) + ' bytes' if cached else 'new'})")
        cache = config.create_timing_cache(cached)
        config.set_timing_cache(cache, ignore_mismatch=False)
        t0 = time.perf_counter()
        serialized = builder.build_serialized_network(network, config)
        lines.append(f"build: {time.perf_counter() - t0:.1f} s")
        if serialized is None:
            raise ExternalToolError(f"TensorRT failed to build an engine from {onnx_path.name}; see {log_path.name}")
        engine_path.write_bytes(bytes(serialized))
        cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))
        return engine_path
    finally:
        log_path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _add_profile(trt: Any, builder: Any, network: Any, config: Any, shapes: Mapping[str, ShapeRange]) -> None:
    """One optimization profile with a min/opt/max shape for every dynamic input (and every input named
    in ``--input-shapes``)."""
    inputs = [network.get_input(i) for i in range(network.num_inputs)]
    names = {t.name for t in inputs}
    unknown = sorted(set(shapes) - names)
    if unknown:
        raise BadInputError(f"--input-shapes names {unknown}, not inputs of the network ({sorted(names)})")
    dynamic = [t for t in inputs if any(int(d) < 0 for d in t.shape)]
    missing = [t.name for t in dynamic if t.name not in shapes]
    if missing:
        raise BadInputError(f"input(s) {missing} have dynamic dimensions; give --input-shapes "
                            f"{missing[0]}:MIN/OPT/MAX (e.g. 1x3x224x224/8x3x224x224/32x3x224x224)")
    if not shapes:
        return
    profile = builder.create_optimization_profile()
    for t in inputs:
        r = shapes.get(t.name)
        if r is not None:
            profile.set_shape(t.name, r.min, r.opt, r.max)
    config.add_optimization_profile(profile)


# -- engine vs ONNX Runtime (Polygraphy) ---------------------------------------------------------------

def compare_engine(engine_path: Path, onnx_path: Path, samples: Sequence[Mapping[str, np.ndarray]],
                   warmup: int = 5, atol: float = 1e-2, rtol: float = 1e-2) -> dict[str, Any]:
    """Run the engine and ONNX Runtime (graph optimizations off) on the same samples with Polygraphy's
    ``Comparator`` and summarize the differences.

    Returns:
        ``{"outputs": {name: error_stats}, "polygraphy_pass": bool, "latency_ms": {"trt_median", "trt_p90",
        "onnxrt_median"}, "samples": n}``; errors are engine vs the same ONNX in ONNX Runtime.
    """
    import onnxruntime as ort
    from polygraphy.backend.onnxrt import OnnxrtRunner
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner
    from polygraphy.comparator import Comparator, CompareFunc

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
    runners = [TrtRunner(EngineFromBytes(engine_path.read_bytes()), name="trt"), OnnxrtRunner(sess, name="onnxrt")]
    results = Comparator.run(runners, data_loader=[dict(s) for s in samples], warm_up=warmup)
    accuracy = Comparator.compare_accuracy(results, compare_func=CompareFunc.simple(atol=atol, rtol=rtol))
    by_name = dict(results.items())
    trt_iters, ort_iters = by_name["trt"], by_name["onnxrt"]
    outputs = {}
    for name in ort_iters[0].keys():
        pairs = [(np.asarray(o[name], np.float64), np.asarray(t[name], np.float64)) for o, t in zip(ort_iters, trt_iters)]
        outputs[name] = error_stats(pairs)
    ms = lambda iters: [1e3 * it.runtime for it in iters]  # noqa: E731
    return {"outputs": outputs, "polygraphy_pass": bool(accuracy), "samples": len(samples),
            "latency_ms": {"trt_median": float(np.median(ms(trt_iters))),
                           "trt_p90": float(np.percentile(ms(trt_iters), 90)),
                           "onnxrt_median": float(np.median(ms(ort_iters)))}}


def error_stats(pairs: Sequence[tuple[np.ndarray, np.ndarray]]) -> dict[str, float]:
    """Per-output error statistics of (reference, candidate) pairs."""
    ref = np.concatenate([np.ravel(r) for r, _ in pairs])
    got = np.concatenate([np.ravel(g) for _, g in pairs])
    err = np.abs(ref - got)
    denom = float(np.linalg.norm(ref) * np.linalg.norm(got))
    return {"max_abs": float(err.max()), "mean_abs": float(err.mean()), "p99_abs": float(np.percentile(err, 99)),
            "max_rel": float((err / np.maximum(np.abs(ref), 1e-6)).max()),
            "cosine": float(ref @ got / denom) if denom else 1.0}
