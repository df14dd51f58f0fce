"""Contract of the TensorRT engine build (backends/tensorrt/engine.py) against a stand-in ``tensorrt``.

TensorRT cannot be installed on these machines and there is no GPU, so a stand-in module injected
through ``sys.modules`` records every API call :func:`build_engine` makes.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np
import pytest

from backends.tensorrt.engine import (EngineOptions, build_engine, polygraphy_convert_argv, trtexec_argv)
from deployer.errors import BadInputError, ExternalToolError
from deployer.shapes import parse_input_shapes


class _Enum:
    def __init__(self, name: str, value: int) -> None:
        self.name, self.value = name, value

    def __int__(self) -> int:
        return self.value

    def __repr__(self) -> str:
        return self.name


def fake_tensorrt(calls: list[tuple], inputs: dict[str, tuple[int, ...]], version: str = "10.8.0",
                  strongly_typed_flag: bool = True, parse_ok: bool = True) -> types.ModuleType:
    """A stand-in for the documented subset of the TensorRT 10/11 Python API, recording calls."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version

    class ILogger:
        def __init__(self) -> None:
            pass

    class Logger(ILogger):
        WARNING = _Enum("WARNING", 2)

        def __init__(self, severity=None) -> None:
            pass

    flags = types.SimpleNamespace()
    if strongly_typed_flag:
        flags.STRONGLY_TYPED = _Enum("STRONGLY_TYPED", 5)
    trt.ILogger, trt.Logger, trt.NetworkDefinitionCreationFlag = ILogger, Logger, flags
    trt.BuilderFlag = types.SimpleNamespace(VERSION_COMPATIBLE=_Enum("VERSION_COMPATIBLE", 13))
    trt.HardwareCompatibilityLevel = types.SimpleNamespace(AMPERE_PLUS=_Enum("AMPERE_PLUS", 1),
                                                           SAME_COMPUTE_CAPABILITY=_Enum("SAME_COMPUTE_CAPABILITY", 2))

    class Tensor:
        def __init__(self, name, shape):
            self.name, self.shape = name, shape

    class Network:
        num_inputs = len(inputs)

        def get_input(self, i):
            name = list(inputs)[i]
            return Tensor(name, inputs[name])

    class Parser:
        num_errors = 0 if parse_ok else 1

        def __init__(self, network, logger):
            logger.log(Logger.WARNING, "parser created")

        def parse_from_file(self, path):
            calls.append(("parse_from_file", Path(path).name))
            return parse_ok

        def get_error(self, i):
            return "node conv: zero point must be 0"

    class Cache:
        def __init__(self, data):
            self.data = data

        def serialize(self):
            return b"CACHE:" + self.data

    class Profile:
        def set_shape(self, name, mn, opt, mx):
            calls.append(("set_shape", name, tuple(mn), tuple(opt), tuple(mx)))

    class Config:
        def __init__(self):
            self._cache = None
            self._hw = None

        def set_flag(self, f):
            calls.append(("set_flag", repr(f)))

        @property
        def hardware_compatibility_level(self):
            return self._hw

        @hardware_compatibility_level.setter
        def hardware_compatibility_level(self, v):
            calls.append(("hardware_compatibility_level", repr(v)))
            self._hw = v

        def create_timing_cache(self, data):
            calls.append(("create_timing_cache", bytes(data)))
            return Cache(bytes(data))

        def set_timing_cache(self, cache, ignore_mismatch):
            calls.append(("set_timing_cache", ignore_mismatch))
            self._cache = cache

        def get_timing_cache(self):
            return self._cache

        def add_optimization_profile(self, p):
            calls.append(("add_optimization_profile",))

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            calls.append(("create_network", flags))
            return Network()

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            calls.append(("build_serialized_network",))
            return b"ENGINE"

    trt.Builder, trt.OnnxParser = Builder, Parser
    return trt


@pytest.fixture
def onnx_file(tmp_path: Path) -> Path:
    p = tmp_path / "model_strongly_typed.onnx"
    p.write_bytes(b"not parsed by the stand-in")
    return p


def _build(monkeypatch, onnx_file, inputs, options, **kw):
    calls: list[tuple] = []
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(calls, inputs, **kw))
    engine = build_engine(onnx_file, onnx_file.with_name("model.engine"), options)
    return calls, engine


def test_tensorrt_engine_contract(monkeypatch, onnx_file):
    """What this proves: build_engine asks for a STRONGLY_TYPED network (bit 5 of the creation flags on
    10.x), parses the ONNX file, adds one optimization profile holding the MIN/OPT/MAX shapes from
    ``--input-shapes`` for each named input, loads an existing timing cache and saves the updated one,
    sets VERSION_COMPATIBLE and the hardware-compatibility level when asked, writes the engine bytes and
    a build log with the builder's messages.

    What it does NOT prove: that real TensorRT accepts our graphs (only the checker's rules are tested
    here), that the API names and signatures match any particular TensorRT release beyond what this
    stand-in mimics from the documentation, that the engine runs or is accurate or fast, that the
    profile ranges are valid for the model, that a timing cache produced by one GPU is accepted on
    another, or anything about Polygraphy's comparison (compare_engine is not exercised).
    """
    cache = onnx_file.with_name("timing.cache")
    cache.write_bytes(b"OLD")
    shapes = parse_input_shapes("input_ids:1x16/1x128/8x256,attention_mask:1x16/1x128/8x256")
    opts = EngineOptions(input_shapes=shapes, timing_cache=cache, version_compatible=True,
                         hardware_compatibility="ampere_plus")
    calls, engine = _build(monkeypatch, onnx_file, {"input_ids": (-1, -1), "attention_mask": (-1, -1)}, opts)
    assert ("create_network", 1 << 5) in calls
    assert ("parse_from_file", "model_strongly_typed.onnx") in calls
    assert ("set_shape", "input_ids", (1, 16), (1, 128), (8, 256)) in calls
    assert ("set_shape", "attention_mask", (1, 16), (1, 128), (8, 256)) in calls
    assert calls.count(("add_optimization_profile",)) == 1
    assert ("create_timing_cache", b"OLD") in calls and ("set_timing_cache", False) in calls
    assert cache.read_bytes() == b"CACHE:OLD"
    assert ("set_flag", "VERSION_COMPATIBLE") in calls
    assert ("hardware_compatibility_level", "AMPERE_PLUS") in calls
    order = [c[0] for c in calls]
    assert order.index("set_timing_cache") < order.index("build_serialized_network")
    assert engine.read_bytes() == b"ENGINE"
    log = engine.with_suffix(".build.log").read_text()
    assert "TensorRT 10.8.0" in log and "parser created" in log and "timing cache: timing.cache (loaded 3 bytes)" in log


def test_tensorrt11_without_flag_and_static_model(monkeypatch, onnx_file):
    """TensorRT 11 has no STRONGLY_TYPED flag (every network is strongly typed): flags stay 0; a static
    model needs no profile and no options; a missing timing cache starts empty."""
    calls, _ = _build(monkeypatch, onnx_file, {"x": (1, 3, 224, 224)}, EngineOptions(), version="11.0.0",
                      strongly_typed_flag=False)
    assert ("create_network", 0) in calls
    assert not any(c[0] in ("set_shape", "add_optimization_profile", "set_flag") for c in calls)
    assert ("create_timing_cache", b"") in calls
    assert onnx_file.with_name("timing.cache").read_bytes() == b"CACHE:"


def test_dynamic_input_without_shapes_and_unknown_name(monkeypatch, onnx_file):
    with pytest.raises(BadInputError, match="--input-shapes x:MIN/OPT/MAX"):
        _build(monkeypatch, onnx_file, {"x": (-1, 3, 224, 224)}, EngineOptions())
    with pytest.raises(BadInputError, match="not inputs of the network"):
        _build(monkeypatch, onnx_file, {"x": (1, 3, 8, 8)}, EngineOptions(input_shapes=parse_input_shapes("y:1x3")))


def test_parser_error_names_the_checker(monkeypatch, onnx_file):
    with pytest.raises(ExternalToolError, match="zero point must be 0.*deploy check --target tensorrt"):
        _build(monkeypatch, onnx_file, {"x": (1, 3)}, EngineOptions(), parse_ok=False)
    assert "parser errors" in onnx_file.with_name("model.build.log").read_text()


def test_command_lines():
    o = EngineOptions(input_shapes=parse_input_shapes("x:1x3x224x224/8x3x224x224/32x3x224x224"),
                      timing_cache=Path("timing.cache"), version_compatible=True, hardware_compatibility="ampere_plus")
    t = trtexec_argv("m.onnx", "m.engine", o)
    assert t[:3] == ["trtexec", "--onnx=m.onnx", "--stronglyTyped"]
    assert "--minShapes=x:1x3x224x224" in t and "--optShapes=x:8x3x224x224" in t and "--maxShapes=x:32x3x224x224" in t
    assert "--versionCompatible" in t and "--hardwareCompatibilityLevel=ampere+" in t
    p = polygraphy_convert_argv("m.onnx", "m.engine", o)
    assert p[:5] == ["polygraphy", "convert", "m.onnx", "--convert-to", "trt"] and "--strongly-typed" in p
    assert p[p.index("--trt-min-shapes") + 1] == "x:[1,3,224,224]"
    assert "--load-timing-cache" in p and "--save-timing-cache" in p and "--version-compatible" in p
    with pytest.raises(BadInputError):
        EngineOptions(hardware_compatibility="turing")


def _gpu_available() -> bool:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    import shutil

    return shutil.which("nvidia-smi") is not None


@pytest.mark.gpu
@pytest.mark.skipif(not _gpu_available(), reason="needs TensorRT and an NVIDIA GPU")
def test_engine_builds_and_matches_onnxruntime(tmp_path):
    """On a GPU host: the strongly typed residual block builds, and the engine agrees with ORT."""
    import onnx

    from backends.tensorrt.engine import compare_engine
    from test_tensorrt import _samples, lowered

    m, _, _ = lowered("residual", "mixed")
    path = tmp_path / "m.onnx"
    onnx.save(m, str(path))
    engine = build_engine(path, tmp_path / "m.engine")
    res = compare_engine(engine, path, list(_samples(m, 16, 0)))
    assert res["outputs"]["y"]["cosine"] > 0.999 and np.isfinite(res["latency_ms"]["trt_median"])
