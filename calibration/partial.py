"""Partial calibration statistics of a run of samples, and the in-order fold that turns them into
:class:`calibration.observers.Statistics`.

A calibration pass (:func:`calibration.collect.collect_partial`) splits what it computes in two:

- **exact** parts, merged exactly in any order and grouping: min/max and the histogram (integer
  counts on a power-of-two grid, :mod:`calibration.histogram`), and the input shapes;
- **order-dependent** parts, one :class:`BatchRecord` per EMA batch: the batch min/max (the EMA,
  ``ema = m * ema + (1 - m) * batch``, is a chain of float operations), the float64 per-channel sums
  of bias correction and the per-last-axis sums of |x| of SmoothQuant (float addition is not
  associative).

:class:`Fold` folds batch records strictly in sample order, one batch at a time, with the same code
whether the records come from one process or from many shards. So a sharded calibration (shards cut
at EMA batch boundaries, :func:`shard_bounds`) gives statistics byte-identical to one process: every
float operation happens in the same order on the same operands. Sums accumulate per batch first
(sample order within the batch), then batch sums into the total (batch order).

The closed-form merge :meth:`calibration.observers.Statistics.merge` is exact only up to float
rounding for the EMA and the sums; this fold is exact bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from calibration.observers import Statistics, TensorStats


@dataclass
class BatchRecord:
    """The order-dependent statistics of one EMA batch (``size`` consecutive samples).

    Attributes:
        size: samples in the batch (``ema_batch``, fewer for the last one).
        bmin, bmax: tensor -> min / max over the batch (tensors with at least one element).
        chan_sum: tensor -> float64 (C,) sum over the batch per channel (axis 1) for bias correction.
        chan_count: tensor -> elements per channel summed.
        last_max, last_abs: tensor -> float64 max |x| and sum |x| per index of the last axis.
        last_rows: tensor -> rows summed into ``last_abs``.
    """

    size: int = 0
    bmin: dict[str, float] = field(default_factory=dict)
    bmax: dict[str, float] = field(default_factory=dict)
    chan_sum: dict[str, np.ndarray] = field(default_factory=dict)
    chan_count: dict[str, int] = field(default_factory=dict)
    last_max: dict[str, np.ndarray] = field(default_factory=dict)
    last_abs: dict[str, np.ndarray] = field(default_factory=dict)
    last_rows: dict[str, int] = field(default_factory=dict)


@dataclass
class Partial:
    """Statistics of a contiguous run of samples (one shard, or the whole set).

    Attributes:
        exact: tensor -> :class:`TensorStats` holding only min/max and the histogram.
        input_shapes: per graph input, the smallest and largest size of each axis.
        batches: the run's :class:`BatchRecord` s in sample order (empty when they were folded as
            they came, in a one-process pass).
        input_names: the model's graph inputs (for the degenerate-range warning).
        samples: samples seen.
        peak_rss_mb: the peak resident memory of the process that computed it (MiB), if measured.
    """

    exact: dict[str, TensorStats] = field(default_factory=dict)
    input_shapes: dict[str, dict[str, list[int]]] = field(default_factory=dict)
    batches: list[BatchRecord] = field(default_factory=list)
    input_names: list[str] = field(default_factory=list)
    samples: int = 0
    peak_rss_mb: float = 0.0


def _add_sum(total: dict[str, np.ndarray], counts: dict[str, int], name: str, part: np.ndarray, n: int) -> None:
    """``total[name] += part`` (a copy the first time); a part of another shape is dropped (the
    channel count changed under dynamic shapes: the first shape is kept)."""
    prev = total.get(name)
    if prev is None:
        total[name] = np.array(part, dtype=np.float64, copy=True)
        counts[name] = n
    elif prev.shape == part.shape:
        prev += part
        counts[name] += n


class Fold:
    """Folds batch records and exact parts, in sample order, into :class:`Statistics`.

    Args:
        momentum: EMA momentum.
        ema_batch: samples per EMA batch (recorded in the settings).
    """

    def __init__(self, momentum: float, ema_batch: int) -> None:
        self.momentum = momentum
        self.ema_batch = ema_batch
        self.tensors: dict[str, TensorStats] = {}
        self.shapes = Statistics()
        self.chan_sum: dict[str, np.ndarray] = {}
        self.chan_count: dict[str, int] = {}
        self.last_max: dict[str, np.ndarray] = {}
        self.last_abs: dict[str, np.ndarray] = {}
        self.last_rows: dict[str, int] = {}
        self.input_names: list[str] = []

    def _t(self, name: str) -> TensorStats:
        t = self.tensors.get(name)
        if t is None:
            t = self.tensors[name] = TensorStats()
        return t

    def add_batch(self, rec: BatchRecord) -> None:
        """Fold the next batch (batches must come in sample order)."""
        for n in rec.bmin:
            t = self._t(n)
            t.ema_step(rec.bmin[n], rec.bmax[n], self.momentum)
            t.samples += rec.size
        for n, a in rec.chan_sum.items():
            _add_sum(self.chan_sum, self.chan_count, n, a, rec.chan_count[n])
        for n, a in rec.last_abs.items():
            prev = self.last_max.get(n)
            if prev is None:
                self.last_max[n] = np.array(rec.last_max[n], dtype=np.float64, copy=True)
            elif prev.shape == a.shape:
                np.maximum(prev, rec.last_max[n], out=prev)
            _add_sum(self.last_abs, self.last_rows, n, a, rec.last_rows[n])

    def add_partial(self, part: Partial) -> None:
        """Fold a shard: its batch records (in order) and its exact parts."""
        for rec in part.batches:
            self.add_batch(rec)
        self.add_exact(part)

    def add_exact(self, part: Partial) -> None:
        """Merge the exact parts (min/max, histogram, input shapes) of a partial; order-free."""
        for n, e in part.exact.items():
            t = self._t(n)
            t.min, t.max = min(t.min, e.min), max(t.max, e.max)
            if e.hist is not None:
                t.hist = e.hist.copy() if t.hist is None else t.hist.merged(e.hist)
        for name, seen in part.input_shapes.items():
            self.shapes.observe_input_shape(name, tuple(seen["min"]))
            self.shapes.observe_input_shape(name, tuple(seen["max"]))
        self.input_names = self.input_names or list(part.input_names)

    def result(self) -> Statistics:
        """The folded statistics (keys: tensor names)."""
        for n, a in self.chan_sum.items():
            self.tensors[n].channel_sum = [float(x) for x in a]
            self.tensors[n].channel_count = self.chan_count[n]
        for n, a in self.last_max.items():
            self.tensors[n].last_axis_absmax = [float(x) for x in a]
            self.tensors[n].last_axis_abssum = [float(x) for x in self.last_abs[n]]
            self.tensors[n].last_axis_rows = self.last_rows[n]
        stats = Statistics(settings={"ema_momentum": self.momentum, "ema_batch": self.ema_batch},
                           input_shapes=self.shapes.input_shapes)
        stats.tensors = self.tensors
        return stats


def shard_bounds(n: int, shards: int, ema_batch: int) -> list[tuple[int, int]]:
    """Cut ``n`` samples into at most ``shards`` contiguous ``[start, stop)`` runs at EMA batch
    boundaries (every run but the last holds a multiple of ``ema_batch`` samples), as even as that
    allows; no empty run."""
    batches = -(-n // ema_batch)
    k = max(1, min(shards, batches))
    per = [batches // k + (1 if i < batches % k else 0) for i in range(k)]
    out, start = [], 0
    for b in per:
        stop = min(n, start + b * ema_batch)
        out.append((start, stop))
        start = stop
    return out
