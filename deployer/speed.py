"""Speed of an artifact against FP32 on this machine, in one record shape for every target.

:func:`compare_speed` takes two runner factories (``threads -> run(batch)``), one for FP32 and one for the
artifact, and times them **in alternation, call by call** (FP32, artifact, FP32, artifact ... over the same
batches in the same order), so load from other processes on a shared machine falls on both alike; each
side's speed is the **median** per-call wall time. Measured on this 2-core shared machine
(EfficientNet-Lite0, three INT8 graphs vs FP32): alternating 1-second runs gave ratios that moved by up
to 0.3x between two runs of the same models; alternating single calls moved by 0.03x.

The record (``targets.<name>.speed`` in ``report.json``):

- ``batch``, ``threads``: the headline point (batch 1, 1 intra-op thread: one query on one core).
- ``fp32_qps``, ``artifact_qps``: samples per second (``batch`` / median seconds per call).
- ``ratio``: ``artifact_qps / fp32_qps`` (> 1: the artifact is faster).
- ``cpu_flags``: the int8-relevant /proc/cpuinfo flags (:data:`deployer.cpu.INT8_FLAGS`) and the ``isa``.
- ``load_average``: the 1-minute load average (/proc/loadavg) before and after, ``[start, end]``.
- ``grid``: every point measured, headline first, each ``{batch, threads, fp32_qps, artifact_qps, ratio,
  calls}`` (kept cheap by default: the headline and batch 8, 1 thread).
- ``calls``, ``seconds_per_point``, ``statistic``, ``notes`` (points not measured and why).

Sequence models: :func:`bucketed_batches` groups samples of similar length (sorted by the length of
their integer ``[1, L]`` inputs, non-zero tail = padding) and trims each batch to its longest member, so
padding does not hide the gain (a batch of 32 fortunes padded to 128 tokens costs ~5x its real length).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

Batch = Any
"""One input batch, whatever the runner takes (for ONNX Runtime: ``dict[input_name, ndarray]``)."""
Runner = Callable[[Batch], object]
RunnerFactory = Callable[[int], Runner]
"""``threads -> runner``: builds (once per point) a callable that runs one batch with that many threads."""


@dataclass(frozen=True)
class Point:
    """One measurement point: batch size and intra-op threads."""

    batch: int
    threads: int


HEADLINE = Point(1, 1)
DEFAULT_GRID: tuple[Point, ...] = (Point(8, 1),)
STATISTIC = ("median wall time per call; FP32 and artifact called in alternation (one call each, in turn) "
             "on the same batches")


def load_average() -> float | None:
    """1-minute load average from /proc/loadavg (None where there is none)."""
    try:
        return float(Path("/proc/loadavg").read_text(encoding="utf-8").split()[0])
    except (OSError, ValueError, IndexError):
        return None


def alternate(runners: Sequence[Runner], batches: Sequence[Batch], seconds: float = 1.0, min_rounds: int = 5,
              warmup: int = 2) -> list[list[float]]:
    """Per-call wall times (seconds) of each runner, called in turn (r0, r1, r0, r1 ...) on ``batches``
    cyclically, after ``warmup`` untimed calls each, until ``seconds`` have passed and at least
    ``min_rounds`` rounds ran.

    Raises:
        ValueError: no batches or no runners.
    """
    if not batches or not runners:
        raise ValueError("alternate() needs at least one runner and one batch")
    for r in runners:
        for i in range(warmup):
            r(batches[i % len(batches)])
    times: list[list[float]] = [[] for _ in runners]
    end = time.perf_counter() + seconds
    i = 0
    while i < min_rounds or time.perf_counter() < end:
        b = batches[i % len(batches)]
        for k, r in enumerate(runners):
            t0 = time.perf_counter()
            r(b)
            times[k].append(time.perf_counter() - t0)
        i += 1
    return times


def measure_point(fp32: RunnerFactory, artifact: RunnerFactory, batches: Sequence[Batch], point: Point,
                  seconds: float = 1.0) -> dict[str, Any]:
    """FP32 vs artifact at one point: ``{batch, threads, fp32_qps, artifact_qps, ratio, calls}``."""
    f, a = alternate([fp32(point.threads), artifact(point.threads)], batches, seconds)
    fq, aq = point.batch / statistics.median(f), point.batch / statistics.median(a)
    return {"batch": point.batch, "threads": point.threads, "fp32_qps": round(fq, 2), "artifact_qps": round(aq, 2),
            "ratio": round(aq / fq, 3), "calls": len(f)}


def compare_speed(fp32: RunnerFactory, artifact: RunnerFactory, batches: Callable[[int], Sequence[Batch]],
                  headline: Point = HEADLINE, grid: Sequence[Point] = DEFAULT_GRID, seconds: float = 1.0,
                  cpu_flags: dict[str, Any] | None = None, **fields: Any) -> dict[str, Any]:
    """The speed record (module docstring) of ``artifact`` against ``fp32``.

    Args:
        fp32 / artifact: runner factories (``threads -> run(batch)``).
        batches: ``batch size -> list of batches`` (may raise ``ValueError`` with the reason a batch size
            cannot be measured, e.g. too few samples or a static batch dimension; that point is skipped
            with a note).
        headline: the point reported at the top level (batch 1, 1 thread by default).
        grid: further points (duplicates of the headline are dropped).
        seconds: time budget per point (each side gets about half).
        cpu_flags: the machine's int8 flags (default: :func:`deployer.cpu.detect`).
        fields: extra keys copied into the record (e.g. ``same_cpu``, ``int8``).

    Raises:
        ValueError: the headline point cannot be measured.
    """
    if cpu_flags is None:
        from deployer.cpu import detect

        info = detect()
        cpu_flags = {"flags": list(info.flags), "isa": info.isa}
    start = load_average()
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    for p in dict.fromkeys([headline, *grid]):
        try:
            bs = batches(p.batch)
        except ValueError as e:
            if p == headline:
                raise
            notes.append(f"batch {p.batch}: not measured ({e})")
            continue
        rows.append(measure_point(fp32, artifact, bs, p, seconds))
    head = rows[0]
    return {"batch": head["batch"], "threads": head["threads"], "fp32_qps": head["fp32_qps"],
            "artifact_qps": head["artifact_qps"], "ratio": head["ratio"], "cpu_flags": cpu_flags,
            "load_average": [start, load_average()], "grid": rows, "calls": head["calls"],
            "seconds_per_point": seconds, "statistic": STATISTIC, "notes": notes, **fields}


def aliases(speed: dict[str, Any]) -> dict[str, Any]:
    """The report's older fields for the same measurement, kept in this schema version:
    ``throughput_qps`` ({fp32, artifact, speedup, setting, grid}) and ``latency_ms`` ({fp32, artifact},
    median milliseconds per call at the headline point)."""
    b = speed["batch"]
    return {"throughput_qps": {"fp32": speed["fp32_qps"], "artifact": speed["artifact_qps"], "speedup": speed["ratio"],
                               "setting": {"batch": b, "threads": speed["threads"]},
                               "grid": [{"batch": r["batch"], "threads": r["threads"], "fp32": r["fp32_qps"],
                                         "artifact": r["artifact_qps"], "speedup": r["ratio"]} for r in speed["grid"]]},
            "latency_ms": {"fp32": round(1000.0 * b / speed["fp32_qps"], 3),
                           "artifact": round(1000.0 * b / speed["artifact_qps"], 3)}}


# -- batches ---------------------------------------------------------------------------------------


def sequence_inputs(sample: dict[str, np.ndarray]) -> list[str]:
    """Inputs that look like token sequences: integer arrays of shape ``[1, L]`` (all with one ``L``)."""
    names = [k for k, v in sample.items() if np.asarray(v).ndim == 2 and np.asarray(v).shape[0] == 1
             and np.issubdtype(np.asarray(v).dtype, np.integer)]
    lengths = {np.asarray(sample[k]).shape[1] for k in names}
    return names if len(lengths) == 1 else []


def sequence_length(sample: dict[str, np.ndarray], names: Sequence[str]) -> int:
    """Real length of a right-padded sequence sample: one past the last non-zero entry of its mask
    input (a name containing ``mask``), else of its first sequence input; at least 1."""
    key = next((k for k in names if "mask" in k.lower()), names[0])
    nz = np.flatnonzero(np.asarray(sample[key])[0])
    return int(nz[-1]) + 1 if nz.size else 1


def bucketed_batches(samples: Sequence[dict[str, np.ndarray]], batch: int, trim: bool = False,
                     limit: int = 64) -> list[dict[str, np.ndarray]]:
    """Up to ``limit`` batches of ``batch`` samples concatenated on axis 0. Sequence samples
    (:func:`sequence_inputs`) are sorted by length first (length buckets), and with ``trim`` each batch is
    cut to its longest member (the model must accept a shorter sequence axis). Batch 1 keeps the
    samples' order.

    Raises:
        ValueError: fewer samples than one batch.
    """
    if len(samples) < batch:
        raise ValueError(f"only {len(samples)} samples")
    names = sequence_inputs(samples[0])
    order = list(range(len(samples)))
    if names and batch > 1:
        order.sort(key=lambda i: sequence_length(samples[i], names))
    out = []
    for s in range(0, len(order) - batch + 1, batch):
        chunk = [samples[i] for i in order[s:s + batch]]
        b = {k: np.concatenate([np.asarray(c[k]) for c in chunk]) for k in chunk[0]}
        if names and trim:
            width = max(sequence_length(c, names) for c in chunk)
            b.update({k: b[k][:, :width] for k in names})
        out.append(b)
    if names and batch > 1 and len(out) > limit:  # a spread of lengths, not only the shortest
        step = len(out) / limit
        return [out[int(i * step)] for i in range(limit)]
    return out[:limit]


__all__ = ["DEFAULT_GRID", "HEADLINE", "Point", "aliases", "alternate", "bucketed_batches", "compare_speed",
           "load_average", "measure_point", "sequence_inputs", "sequence_length"]
