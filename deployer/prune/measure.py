"""What the pruning report measures at each stage: parameters, MACs, serialized size, fidelity to the
unpruned model, and latency where the artifact runs here.

Latency: median wall time of one batch-1 inference over ``runs`` runs after 3 warm-up runs, one thread
(ONNX Runtime: all graph optimizations, ``intra_op_num_threads=1``; LiteRT: its default XNNPACK delegate,
``num_threads=1``), measured on the machine the report names. Inputs are the calibration sample (ONNX) or
zeros of the input's type (``.tflite``: the time does not depend on the values).
"""

from __future__ import annotations

import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx

LATENCY_RUNS = 50


def _median_ms(fn: Any, runs: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return round(float(np.median(times)) * 1e3, 4)


def onnx_latency_ms(model: onnx.ModelProto | str | Path, sample: dict[str, np.ndarray] | None = None,
                    runs: int = LATENCY_RUNS) -> float:
    """Median batch-1 latency (ms) of an ONNX model in ONNX Runtime on one CPU thread."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    sess = ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
    feed = {}
    for i in sess.get_inputs():
        if sample is not None and i.name in sample:
            feed[i.name] = sample[i.name]
        else:
            shape = [d if isinstance(d, int) else 1 for d in i.shape]
            dtype = {"tensor(float)": np.float32, "tensor(int64)": np.int64, "tensor(int32)": np.int32,
                     "tensor(int8)": np.int8, "tensor(uint8)": np.uint8}.get(i.type, np.float32)
            feed[i.name] = np.zeros(shape, dtype)
    return _median_ms(lambda: sess.run(None, feed), runs)


def tflite_latency_ms(path: str | Path, runs: int = LATENCY_RUNS) -> float:
    """Median batch-1 latency (ms) of a ``.tflite`` in LiteRT (``ai_edge_litert``) on one thread."""
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(path), num_threads=1)
    it.allocate_tensors()
    for d in it.get_input_details():
        it.set_tensor(d["index"], np.zeros(d["shape"], d["dtype"]))
    return _median_ms(it.invoke, runs)


def artifact_latency_ms(path: Path, verified_by: str = "") -> tuple[float | None, str]:
    """(latency, how) of a deploy artifact where it runs here; (None, why not) otherwise."""
    if path.suffix == ".tflite":
        try:
            return tflite_latency_ms(path), "LiteRT, 1 thread, batch 1, median"
        except ImportError:
            return None, "ai-edge-litert not installed"
    if path.suffix == ".onnx":
        if "strongly_typed" in path.name:
            return None, ("TensorRT strongly typed graph: its latency is the engine's (build_engine.sh on a GPU); "
                          "ONNX Runtime's run of Q/DQ here is no measure of it")
        return onnx_latency_ms(path), "ONNX Runtime CPU, 1 thread, batch 1, median"
    return None, f"no runner here for {path.suffix or path.name}"


def machine() -> dict[str, Any]:
    """CPU model and the INT8-relevant instruction-set flags (DESIGN.md section 6: speed depends on them)."""
    flags: list[str] = []
    name = platform.processor() or platform.machine()
    try:
        text = Path("/proc/cpuinfo").read_text()
        for line in text.splitlines():
            if line.startswith("model name") and name in ("", platform.machine()):
                name = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                flags = [f for f in ("avx2", "avx512_vnni", "avx_vnni", "amx_int8") if f in have]
                break
    except OSError:
        pass
    return {"cpu": name, "flags": flags}


def stage(params: int, macs: int, size_bytes: int, fidelity: dict[str, Any], latency_ms: float | None,
          **extra: Any) -> dict[str, Any]:
    """One ``pruning.stages`` entry."""
    return {"params": int(params), "macs": int(macs), "size_bytes": int(size_bytes), "fidelity": fidelity,
            "latency_ms": latency_ms, **extra}
