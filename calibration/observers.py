"""Streaming activation statistics and the observers that reduce them to ranges.

Statistics are per tensor and mergeable: running min/max, the seed's exponential moving average of
per-batch min/max, and a sample count. Memory is O(number of tensors), independent of the number of
calibration samples. Observers turn statistics into a ``(min, max)`` range:

- ``minmax``: the running min/max over all samples (ONNX Runtime MinMax, TensorRT "max").
- ``ema``: exponential moving average of per-batch min/max with ``momentum`` (the seed's method;
  also TF QAT ``MovingAverageQuantizer``, PyTorch ``MovingAverageMinMaxObserver``):
  ``ema = momentum * ema + (1 - momentum) * batch_value``, initialised with the first batch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from deployer.errors import BadInputError

OBSERVERS = ("minmax", "ema")
DEFAULT_EMA_MOMENTUM = 0.9
DEFAULT_EMA_BATCH = 8


@dataclass
class TensorStats:
    """Running statistics of one tensor over the calibration set (all values float64)."""

    min: float = float("inf")
    max: float = float("-inf")
    ema_min: float | None = None
    ema_max: float | None = None
    batches: int = 0
    samples: int = 0

    def update(self, batch: np.ndarray, momentum: float) -> None:
        """Fold one batch (any shape, several samples stacked or one) into the statistics."""
        if batch.size == 0:
            return
        bmin = float(np.min(batch))
        bmax = float(np.max(batch))
        self.min = min(self.min, bmin)
        self.max = max(self.max, bmax)
        if self.ema_min is None or self.ema_max is None:
            self.ema_min, self.ema_max = bmin, bmax
        else:
            self.ema_min = momentum * self.ema_min + (1 - momentum) * bmin
            self.ema_max = momentum * self.ema_max + (1 - momentum) * bmax
        self.batches += 1

    def to_dict(self) -> dict[str, Any]:
        return {"min": self.min, "max": self.max, "ema_min": self.ema_min, "ema_max": self.ema_max,
                "batches": self.batches, "samples": self.samples}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TensorStats":
        return cls(**d)


@dataclass
class Statistics:
    """Statistics of every observed tensor, plus the settings they were collected with."""

    tensors: dict[str, TensorStats] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    def merge(self, other: "Statistics") -> "Statistics":
        """Combine two shards. Min/max merge exactly; EMA merges as if ``other`` followed ``self``."""
        out = Statistics(settings=dict(self.settings))
        m = float(self.settings.get("ema_momentum", DEFAULT_EMA_MOMENTUM))
        for name in sorted(set(self.tensors) | set(other.tensors)):
            a, b = self.tensors.get(name), other.tensors.get(name)
            if a is None or b is None:
                out.tensors[name] = TensorStats(**(a or b).to_dict())  # type: ignore[union-attr]
                continue
            s = TensorStats(min=min(a.min, b.min), max=max(a.max, b.max), batches=a.batches + b.batches,
                            samples=a.samples + b.samples)
            if a.ema_min is None:
                s.ema_min, s.ema_max = b.ema_min, b.ema_max
            elif b.ema_min is None or b.ema_max is None or a.ema_max is None:
                s.ema_min, s.ema_max = a.ema_min, a.ema_max
            else:
                # b's EMA started from its own first batch; continuing a's EMA over b's batches
                # weights a by m**b.batches.
                w = m ** b.batches
                s.ema_min = w * a.ema_min + (1 - w) * b.ema_min
                s.ema_max = w * a.ema_max + (1 - w) * b.ema_max
            out.tensors[name] = s
        return out

    def save(self, path: str | Path) -> None:
        """Write as JSON (compact, no pickle)."""
        data = {"settings": self.settings, "tensors": {k: v.to_dict() for k, v in sorted(self.tensors.items())}}
        Path(path).write_text(json.dumps(data, sort_keys=True), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> "Statistics":
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        return cls({k: TensorStats.from_dict(v) for k, v in data["tensors"].items()}, data.get("settings", {}))


def reduce_range(stats: TensorStats, observer: str) -> tuple[float, float]:
    """Reduce statistics to a ``(min, max)`` range with the named observer.

    Ranges always include 0 (required by every integer scheme so that zero padding is exact).

    Raises:
        BadInputError: an unknown observer name.
    """
    if observer == "minmax":
        lo, hi = stats.min, stats.max
    elif observer == "ema":
        if stats.ema_min is None or stats.ema_max is None:
            lo, hi = stats.min, stats.max
        else:
            lo, hi = stats.ema_min, stats.ema_max
    else:
        raise BadInputError(f"unknown observer {observer!r}; choose one of {', '.join(OBSERVERS)}")
    return min(lo, 0.0), max(hi, 0.0)
