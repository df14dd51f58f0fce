"""Thin engine build through TensorRT's Python API (imported lazily; never on these machines).

Strongly typed network: ``NetworkDefinitionCreationFlag.STRONGLY_TYPED`` on 10.x (the default and only
mode on 11.x), ONNX parsed with ``OnnxParser``, a timing cache saved beside the engine and reused.
"""

from __future__ import annotations

from pathlib import Path

from deployer.errors import ExternalToolError


def build_engine(onnx_path: Path, engine_path: Path, timing_cache: Path | None = None) -> Path:
    """Build and serialize a strongly typed engine from ``onnx_path``.

    Raises:
        ExternalToolError: the parser or builder failed (parser errors included).
    """
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExternalToolError(f"TensorRT could not parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    cache_path = timing_cache or engine_path.with_name("timing.cache")
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.exists() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExternalToolError(f"TensorRT failed to build an engine from {onnx_path.name}; see the build log")
    engine_path.write_bytes(bytes(serialized))
    cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))
    return engine_path
