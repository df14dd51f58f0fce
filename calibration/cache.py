"""A user cache of calibration statistics, so a second ``deploy`` on the same inputs does not recalibrate.

Entries are keyed by (model sha256, calibration-set sha256, statistics settings); the observer is not
part of the key, because every observer is reduced from the same statistics (histograms included).
The cache lives in the platform's user cache directory (``platformdirs.user_cache_dir("deployer")``,
e.g. ``~/.cache/deployer`` on Linux), or in ``$DEPLOYER_CACHE_DIR``. Files are the compact JSON of
:meth:`calibration.observers.Statistics.save`, written atomically; an unreadable entry is ignored.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import onnx

from calibration import collect
from calibration.dataset import CalibrationSet, Sample
from calibration.observers import DEFAULT_EMA_BATCH, DEFAULT_EMA_MOMENTUM, Statistics
from deployer.errors import DeployerError

ENV_VAR = "DEPLOYER_CACHE_DIR"


def cache_dir() -> Path:
    """``$DEPLOYER_CACHE_DIR`` or ``<user cache dir>/deployer/statistics``."""
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env)
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("deployer")) / "statistics"


def cache_key(model_sha256: str, calibration_sha256: str, settings: dict[str, Any]) -> str:
    """sha256 of the model hash, the calibration hash and the statistics settings."""
    blob = json.dumps({"model": model_sha256, "calibration": calibration_sha256, "settings": settings},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def load(key: str) -> Statistics | None:
    """The cached statistics for ``key``, or None (missing or unreadable)."""
    path = cache_dir() / f"{key}.json"
    if not path.is_file():
        return None
    try:
        return Statistics.load(path)
    except (DeployerError, OSError):
        return None


def store(key: str, stats: Statistics) -> Path | None:
    """Write ``stats`` under ``key`` (atomically); returns the path, or None if the cache is not writable."""
    d = cache_dir()
    path = d / f"{key}.json"
    tmp = d / f".{key}.{os.getpid()}.tmp"
    try:
        d.mkdir(parents=True, exist_ok=True)
        stats.save(tmp)
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        return None
    return path


def cached_statistics(model: onnx.ModelProto, samples: Sequence[Sample], model_sha256: str,
                      use_cache: bool = True, ema_momentum: float = DEFAULT_EMA_MOMENTUM,
                      ema_batch: int = DEFAULT_EMA_BATCH, skip: set[str] | None = None,
                      progress: Callable[[int, int], None] | None = None,
                      collector: Callable[..., Statistics] | None = None) -> tuple[Statistics, bool]:
    """Statistics from the cache, or from running the model (then stored).

    Args:
        model: the FP32 reference.
        samples: the calibration set (a :class:`CalibrationSet` is hashed by content).
        model_sha256: the plan's model hash (``deployer.model_io.model_sha256``).
        use_cache: False bypasses the cache entirely (``--no-cache``): no read, no write.
        collector: computes the statistics on a miss, called like
            :func:`calibration.collect.collect_statistics` (default that function; the sharded
            :func:`deployer.distributed.sharded_statistics` gives the same bytes, so one cache serves both).

    Returns:
        ``(statistics, hit)``; ``hit`` is True when the model did not run.
    """
    settings = collect.statistics_settings(ema_momentum, ema_batch, skip=skip)
    key = None
    if use_cache:
        cs = samples if isinstance(samples, CalibrationSet) else CalibrationSet(samples)
        key = cache_key(model_sha256, cs.sha256(), settings)
        hit = load(key)
        if hit is not None:
            if progress:
                progress(len(samples), len(samples))
            return hit, True
    stats = (collector or collect.collect_statistics)(model, samples, skip=skip, ema_momentum=ema_momentum, ema_batch=ema_batch,
                                       progress=progress)
    if key is not None:
        store(key, stats)
    return stats, False
