"""Throughput of an ONNX model in ONNX Runtime's CPU provider, in queries (samples) per second.

A measurement is the median over ``repeats`` timed runs; each timed run executes the batched model on
consecutive batches of real samples for at least ``min_seconds`` (after one warm-up run) and counts
samples, not calls. Batches are built by concatenating samples along axis 0 (a ``batcher`` may instead
pad per batch, e.g. text trimmed to the longest sequence of the batch).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from calibration.dataset import Sample

Batcher = Callable[[Sequence[Sample]], dict[str, np.ndarray]]


@dataclass(frozen=True)
class Setting:
    """One point of the grid: batch size and intra-op threads."""

    batch: int
    threads: int


DEFAULT_SETTING = Setting(batch=1, threads=1)
REPORT_GRID = (Setting(1, 1), Setting(1, 2), Setting(8, 1), Setting(8, 2))
BENCHMARK_GRID = (Setting(1, 1), Setting(1, 2), Setting(32, 1), Setting(32, 2))


def concat_batcher(samples: Sequence[Sample]) -> dict[str, np.ndarray]:
    """Concatenate samples of batch 1 along axis 0."""
    return {k: np.concatenate([np.asarray(s[k]) for s in samples]) for k in samples[0]}


def session(model: onnx.ModelProto | str | Path, threads: int, level: str = "all", quiet: bool = False) -> Any:
    """An ONNX Runtime CPU session with ``threads`` intra-op threads (1 inter-op thread, sequential).

    ``level``: ``disable`` | ``basic`` | ``extended`` | ``all`` (see backends.onnxruntime.backend).
    ``quiet``: ONNX Runtime logs nothing below FATAL (for probes whose failure is an answer).
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    if quiet:
        so.log_severity_level = 4
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[level]
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


def _batches(samples: Sequence[Sample], batch: int, batcher: Batcher) -> list[dict[str, np.ndarray]]:
    if len(samples) < batch:
        raise ValueError(f"{len(samples)} samples cannot fill a batch of {batch}")
    return [batcher(samples[i:i + batch]) for i in range(0, len(samples) - batch + 1, batch)][:64]


def _timed(sess: Any, batches: list[dict[str, np.ndarray]], batch: int, min_seconds: float) -> float:
    n, i = 0, 0
    t0 = time.perf_counter()
    while True:
        sess.run(None, batches[i % len(batches)])
        n += batch
        i += 1
        dt = time.perf_counter() - t0
        if dt >= min_seconds and i >= 2:
            return n / dt


def measure_qps(model: onnx.ModelProto | str | Path, samples: Sequence[Sample], setting: Setting,
                repeats: int = 3, min_seconds: float = 0.3, batcher: Batcher = concat_batcher) -> float:
    """Median samples per second of ``model`` over ``repeats`` timed runs at ``setting``.

    Raises:
        ValueError: fewer samples than one batch.
    """
    sess = session(model, setting.threads)
    batches = _batches(samples, setting.batch, batcher)
    sess.run(None, batches[0])  # warm-up (allocations, prepacking)
    return float(statistics.median(_timed(sess, batches, setting.batch, min_seconds) for _ in range(repeats)))


def measure_pair(models: Sequence[onnx.ModelProto | str | Path], samples: Sequence[Sample], setting: Setting,
                 repeats: int = 3, min_seconds: float = 0.3, batcher: Batcher = concat_batcher) -> list[float]:
    """Median samples/s of each model, timed in alternation (model A, B, A, B ...) so that load from
    other processes on a shared machine falls on all of them alike.

    Raises:
        ValueError: fewer samples than one batch.
    """
    batches = _batches(samples, setting.batch, batcher)
    sessions = [session(m, setting.threads) for m in models]
    for s in sessions:
        s.run(None, batches[0])
    rates: list[list[float]] = [[] for _ in sessions]
    for _ in range(repeats):
        for k, s in enumerate(sessions):
            rates[k].append(_timed(s, batches, setting.batch, min_seconds))
    return [float(statistics.median(r)) for r in rates]


def with_dynamic_batch(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose graph inputs/outputs declare a symbolic batch dimension ``batch`` (axis 0)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for vi in list(out.graph.input) + list(out.graph.output):
        dims = vi.type.tensor_type.shape.dim
        if len(dims):
            dims[0].Clear()
            dims[0].dim_param = "batch"
    del out.graph.value_info[:]
    return out


def batchable(model: onnx.ModelProto, samples: Sequence[Sample], batch: int = 2,
              batcher: Batcher = concat_batcher, exact: bool = True) -> bool:
    """Does ``model`` (from :func:`with_dynamic_batch`) give per-sample results at batch ``batch``?

    A model exported with static shapes may have the batch size folded into Reshape constants; then
    it fails or mixes samples, and only batch 1 can be measured. ``exact=False`` checks shapes only
    (dynamic quantization takes one activation scale per batch, so its values depend on the batch).
    """
    if len(samples) < batch:
        return False
    try:
        sess = session(model, 1, quiet=True)  # a static export fails here by design: no error line on stderr
        names = [o.name for o in sess.get_outputs()]
        joint = sess.run(names, batcher(samples[:batch]))
        single = [sess.run(names, batcher(samples[i:i + 1])) for i in range(batch)]
    except Exception:
        return False
    for k in range(len(names)):
        ref = np.concatenate([s[k] for s in single])
        if joint[k].shape != ref.shape or (exact and not np.allclose(joint[k], ref, rtol=1e-3, atol=1e-4)):
            return False
    return True
