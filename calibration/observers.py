"""Streaming, mergeable activation statistics and the observers that reduce them to ranges.

Per tensor we keep running min/max, the seed's EMA of per-batch min/max, a sample count and a
fixed-size :class:`calibration.histogram.Histogram`. Memory is O(tensors x bins), independent of the
number of calibration samples; two shards merge into exactly what one pass over both gives.

Observers (``reduce_range(stats, name, params)``) turn statistics into a ``(min, max)`` range that
always includes 0. The asymmetric variant (default) bounds each side separately; the symmetric
variant (``ObserverParams(symmetric=True)``) searches one threshold ``t`` on ``|x|`` and returns
``(-t, t)`` (``(0, t)`` for a tensor that is never negative). Backends derive scales from the range
(TensorRT takes ``max(|min|, |max|)``):

- ``minmax``: running min/max (ONNX Runtime ``MinMaxCalibrater``, TensorRT "max").
- ``ema``: EMA of per-batch min/max, ``ema = m * ema + (1 - m) * batch`` initialised with the first
  batch (the seed's method; TF ``MovingAverageQuantizer``, PyTorch ``MovingAverageMinMaxObserver``).
- ``percentile``: the ``p``-th percentile (default 99.99) of the histogram (ONNX Runtime
  ``PercentileCalibrater``; NVIDIA pytorch-quantization ``percentile``).
- ``entropy``: the threshold minimising KL(P || Q) between the clipped reference distribution and its
  128-level quantization, searched from 128 to 2048 bins, coarse-to-fine (Migacz, "8-bit Inference with TensorRT",
  GTC 2017; ONNX Runtime ``EntropyCalibrater``, which with its default 128 bins degenerates), never below
  the 99.9th percentile of the values (``ObserverParams.entropy_floor``; without it the search collapses
  on spiky distributions such as global-average-pool outputs of ReLU networks).

Rule for the histogram observers (percentile, entropy, mse), applied by the pipeline
(:func:`calibration.collect.unclipped_tensors`): the network outputs, and the logits that feed a final
Softmax/LogSoftmax, keep their min/max range. Clipping them flattens the top of the ranking (the
largest logits all become the clip value) and destroys top-1 agreement, whatever the KL or MSE says
about the bulk of the distribution.
- ``mse``: the clipping threshold minimising the expected squared quantization error (rounding plus
  clipping) of the histogram (Banner et al., "ACIQ", 2019; NVIDIA pytorch-quantization ``mse``).
- ``auto``: one of the above per tensor (:func:`auto_observer`): min/max where clipping is known to hurt
  (transformer residual streams and outlier channels, bounded activations, the classifier input),
  entropy on non-negative tensors, percentile on sparse heavy tails. With the graph context the pipeline
  supplies; ``reduce_range(stats, "auto")`` alone decides from the statistics only.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from calibration.histogram import DEFAULT_BINS, Histogram
from deployer.errors import BadInputError

OBSERVERS = ("minmax", "ema", "percentile", "entropy", "mse", "auto")
HISTOGRAM_OBSERVERS = ("percentile", "entropy", "mse")
DEFAULT_EMA_MOMENTUM = 0.9
DEFAULT_EMA_BATCH = 8
STATS_FORMAT = 3


@dataclass(frozen=True)
class ObserverParams:
    """Parameters of the histogram observers.

    Attributes:
        percentile: for ``percentile``, in (0, 100].
        symmetric: search one threshold on ``|x|`` instead of each side.
        quant_bins: levels of the entropy observer's quantized distribution (128 = int8 symmetric).
        search_bins: the entropy/MSE search runs on at most this many bins of ``|x|``.
        num_bits: integer width for the MSE observer.
        entropy_floor: the entropy threshold is never below this percentile of the values on its
            side (of ``|x|`` when symmetric); 0 disables the floor (plain TensorRT search). Reason:
            the KL search degenerates on a distribution with a spike: on EfficientNet-Lite0 55% of
            the global-average-pool outputs sit in the first bin (exact zeros of dead ReLU6
            channels); merging that bin with its neighbours into one quantization level costs more
            KL than clipping everything above the smallest candidate, so the search chose 1.0 for a
            tensor reaching 5.7 (its 99.9th percentile is 3.9) and INT8 top-1 agreement collapsed.
    """

    percentile: float = 99.99
    symmetric: bool = False
    quant_bins: int = 128
    search_bins: int = 2048
    num_bits: int = 8
    entropy_floor: float = 99.9

    def __post_init__(self) -> None:
        if not 0.0 < self.percentile <= 100.0:
            raise BadInputError(f"percentile {self.percentile} is outside (0, 100]; use e.g. 99.99")
        if not 0.0 <= self.entropy_floor <= 100.0:
            raise BadInputError(f"entropy floor {self.entropy_floor} is outside [0, 100]; use e.g. 99.9")


@dataclass(eq=False)
class TensorStats:
    """Running statistics of one tensor over the calibration set (floats are float64).

    ``ema_first_*`` keep the first batch's min/max so that EMA shards merge exactly.
    """

    min: float = float("inf")
    max: float = float("-inf")
    ema_min: float | None = None
    ema_max: float | None = None
    batches: int = 0
    samples: int = 0
    ema_first_min: float | None = None
    ema_first_max: float | None = None
    hist: Histogram | None = None
    channel_sum: list[float] | None = None
    channel_count: int = 0
    last_axis_absmax: list[float] | None = None
    last_axis_abssum: list[float] | None = None
    last_axis_rows: int = 0

    def observe_last_axis(self, values: np.ndarray) -> None:
        """Running max |x| (SmoothQuant's per-input-channel activation scale) and sum of |x| per index of
        the last axis."""
        if values.ndim < 2:
            return
        rows = np.abs(values.reshape(-1, values.shape[-1])).astype(np.float64)
        amax, asum = rows.max(axis=0), rows.sum(axis=0)
        if self.last_axis_absmax is None or self.last_axis_abssum is None:
            self.last_axis_absmax = [float(v) for v in amax]
            self.last_axis_abssum = [float(v) for v in asum]
            self.last_axis_rows = rows.shape[0]
        elif len(self.last_axis_absmax) == len(amax):
            self.last_axis_absmax = [max(a, float(b)) for a, b in zip(self.last_axis_absmax, amax)]
            self.last_axis_abssum = [a + float(b) for a, b in zip(self.last_axis_abssum, asum)]
            self.last_axis_rows += rows.shape[0]

    def observe_channels(self, values: np.ndarray) -> None:
        """Accumulate the per-channel (axis 1) sum, for bias correction's ``E[x]`` (tensors of rank >= 2)."""
        if values.ndim < 2:
            return
        red = tuple(a for a in range(values.ndim) if a != 1)
        sums = values.astype(np.float64).sum(axis=red)
        if self.channel_sum is None:
            self.channel_sum = [0.0] * len(sums)
        if len(self.channel_sum) != len(sums):
            return  # channel count changed between samples (dynamic shapes): keep the first
        self.channel_sum = [a + float(b) for a, b in zip(self.channel_sum, sums)]
        self.channel_count += int(values.size // values.shape[1])

    def channel_mean(self) -> np.ndarray | None:
        """Per-channel mean over all samples (float64, shape (C,)), or None if not observed."""
        if self.channel_sum is None or not self.channel_count:
            return None
        return np.asarray(self.channel_sum, dtype=np.float64) / self.channel_count

    def observe(self, values: np.ndarray, bins: int = DEFAULT_BINS,
                hist_values: np.ndarray | None = None) -> tuple[float, float]:
        """Fold values into min/max and the histogram (not the EMA); returns their (min, max).

        Args:
            values: the tensor (any shape).
            bins: histogram bins when the histogram is created.
            hist_values: a subset of ``values`` to bin instead of all of them (see
                :func:`calibration.collect.collect_statistics`), or None.
        """
        lo, hi = float(np.min(values)), float(np.max(values))
        self.min = min(self.min, lo)
        self.max = max(self.max, hi)
        if self.hist is None:
            self.hist = Histogram(bins)
        if hist_values is None:
            self.hist.add(values, lo, hi)
        else:
            self.hist.add(hist_values)
        return lo, hi

    def observe_reduced(self, lo: float, hi: float, hist_values: np.ndarray, bins: int = DEFAULT_BINS) -> None:
        """Fold a tensor whose min/max the caller computed into min/max and the histogram (not the EMA).

        Args:
            lo, hi: the whole tensor's min and max (the histogram widens to cover them, so it depends
                only on the data, whatever subset is binned).
            hist_values: the values to bin: all of them, or a fixed subset
                (:func:`calibration.collect.subset_indices`).
            bins: histogram bins when the histogram is created.
        """
        self.min = min(self.min, lo)
        self.max = max(self.max, hi)
        if self.hist is None:
            self.hist = Histogram(bins)
        self.hist.add(hist_values, lo, hi)

    def ema_step(self, bmin: float, bmax: float, momentum: float) -> None:
        """One EMA step with a batch's min/max."""
        if self.ema_min is None or self.ema_max is None:
            self.ema_min, self.ema_max = bmin, bmax
            self.ema_first_min, self.ema_first_max = bmin, bmax
        else:
            self.ema_min = momentum * self.ema_min + (1 - momentum) * bmin
            self.ema_max = momentum * self.ema_max + (1 - momentum) * bmax
        self.batches += 1

    def update(self, batch: np.ndarray, momentum: float, bins: int = DEFAULT_BINS) -> None:
        """Fold one batch (any shape, several samples stacked or one) into the statistics."""
        if batch.size == 0:
            return
        lo, hi = self.observe(batch, bins)
        self.ema_step(lo, hi, momentum)

    def merged(self, other: "TensorStats", momentum: float) -> "TensorStats":
        """``self`` followed by ``other``, exactly as one pass would give."""
        s = TensorStats(min=min(self.min, other.min), max=max(self.max, other.max),
                        batches=self.batches + other.batches, samples=self.samples + other.samples)
        a, b = self, other
        if a.ema_min is None or a.ema_max is None:
            s.ema_min, s.ema_max, s.ema_first_min, s.ema_first_max = b.ema_min, b.ema_max, b.ema_first_min, b.ema_first_max
        elif b.ema_min is None or b.ema_max is None:
            s.ema_min, s.ema_max, s.ema_first_min, s.ema_first_max = a.ema_min, a.ema_max, a.ema_first_min, a.ema_first_max
        else:
            # one pass continues a's EMA over b's k batches: m^k * A + (1-m) * sum m^(k-i) b_i,
            # and b's own EMA is B = m^(k-1) b_1 + (1-m) * sum_{i>=2} m^(k-i) b_i, so
            # one pass = m^k * A + B - m^k * b_1.
            w = momentum ** b.batches
            b1_min = b.ema_first_min if b.ema_first_min is not None else b.ema_min
            b1_max = b.ema_first_max if b.ema_first_max is not None else b.ema_max
            s.ema_min = w * a.ema_min + b.ema_min - w * b1_min
            s.ema_max = w * a.ema_max + b.ema_max - w * b1_max
            s.ema_first_min, s.ema_first_max = a.ema_first_min, a.ema_first_max
        if a.last_axis_absmax is not None and b.last_axis_absmax is not None:
            s.last_axis_absmax = [max(x, y) for x, y in zip(a.last_axis_absmax, b.last_axis_absmax)]
        else:
            s.last_axis_absmax = a.last_axis_absmax or b.last_axis_absmax
        if a.last_axis_abssum is not None and b.last_axis_abssum is not None:
            s.last_axis_abssum = [x + y for x, y in zip(a.last_axis_abssum, b.last_axis_abssum)]
            s.last_axis_rows = a.last_axis_rows + b.last_axis_rows
        else:
            src = a if a.last_axis_abssum is not None else b
            s.last_axis_abssum, s.last_axis_rows = src.last_axis_abssum, src.last_axis_rows
        if a.channel_sum is not None and b.channel_sum is not None and len(a.channel_sum) == len(b.channel_sum):
            s.channel_sum = [x + y for x, y in zip(a.channel_sum, b.channel_sum)]
            s.channel_count = a.channel_count + b.channel_count
        elif a.channel_sum is not None or b.channel_sum is not None:
            src = a if a.channel_sum is not None else b
            s.channel_sum, s.channel_count = list(src.channel_sum or []), src.channel_count
        if a.hist is not None and b.hist is not None:
            s.hist = a.hist.merged(b.hist)
        elif a.hist is not None or b.hist is not None:
            s.hist = (a.hist or b.hist).copy()  # type: ignore[union-attr]
        return s

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"min": self.min, "max": self.max, "ema_min": self.ema_min, "ema_max": self.ema_max,
                             "batches": self.batches, "samples": self.samples,
                             "ema_first_min": self.ema_first_min, "ema_first_max": self.ema_first_max}
        if self.hist is not None:
            d["hist"] = self.hist.to_dict()
        if self.channel_sum is not None:
            d["channel_sum"] = self.channel_sum
            d["channel_count"] = self.channel_count
        if self.last_axis_absmax is not None:
            d["last_axis_absmax"] = self.last_axis_absmax
        if self.last_axis_abssum is not None:
            d["last_axis_abssum"] = self.last_axis_abssum
            d["last_axis_rows"] = self.last_axis_rows
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TensorStats":
        d = dict(d)
        hist = d.pop("hist", None)
        return cls(**d, hist=Histogram.from_dict(hist) if hist is not None else None)

    def copy(self) -> "TensorStats":
        return TensorStats.from_dict(self.to_dict())

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TensorStats):
            return NotImplemented
        a, b = self.to_dict(), other.to_dict()
        a.pop("hist", None)
        b.pop("hist", None)
        return a == b and self.hist == other.hist


@dataclass
class Statistics:
    """Statistics of every observed tensor, plus the settings they were collected with.

    ``input_shapes``: graph input -> ``{"min": [...], "max": [...]}``, the smallest and largest size of each
    axis over the calibration samples (dynamic shapes: what a backend's static shape or profile must
    cover).
    """

    tensors: dict[str, TensorStats] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    input_shapes: dict[str, dict[str, list[int]]] = field(default_factory=dict)

    def observe_input_shape(self, name: str, shape: tuple[int, ...]) -> None:
        """Widen ``input_shapes[name]`` to include ``shape`` (a rank change keeps the first rank)."""
        seen = self.input_shapes.get(name)
        if seen is None:
            self.input_shapes[name] = {"min": list(shape), "max": list(shape)}
        elif len(seen["min"]) == len(shape):
            seen["min"] = [min(a, b) for a, b in zip(seen["min"], shape)]
            seen["max"] = [max(a, b) for a, b in zip(seen["max"], shape)]

    def merge(self, other: "Statistics") -> "Statistics":
        """Combine two shards, ``other`` after ``self``: equal to one pass over both.

        For the EMA this holds when the shards were cut at a batch boundary.
        """
        out = Statistics(settings=dict(self.settings),
                         input_shapes={k: {"min": list(v["min"]), "max": list(v["max"])} for k, v in self.input_shapes.items()})
        for name, seen in other.input_shapes.items():
            out.observe_input_shape(name, tuple(seen["min"]))
            out.observe_input_shape(name, tuple(seen["max"]))
        m = float(self.settings.get("ema_momentum", DEFAULT_EMA_MOMENTUM))
        for name in sorted(set(self.tensors) | set(other.tensors)):
            a, b = self.tensors.get(name), other.tensors.get(name)
            if a is None or b is None:
                out.tensors[name] = (a or b).copy()  # type: ignore[union-attr]
            else:
                out.tensors[name] = a.merged(b, m)
        return out

    def degenerate(self) -> list[str]:
        """Tensors whose range is zero (min == max): their scale is clamped to a tiny epsilon."""
        return sorted(n for n, t in self.tensors.items() if t.batches and t.min == t.max)

    def save(self, path: str | Path) -> None:
        """Write compact JSON (histogram counts zlib + base64; never pickle)."""
        data = {"format": STATS_FORMAT, "settings": self.settings, "input_shapes": self.input_shapes,
                "tensors": {k: v.to_dict() for k, v in sorted(self.tensors.items())}}
        Path(path).write_text(json.dumps(data, sort_keys=True, separators=(",", ":")), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> "Statistics":
        """Read what :meth:`save` wrote (also the format-1 files without histograms)."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
            return cls({k: TensorStats.from_dict(v) for k, v in data["tensors"].items()}, data.get("settings", {}),
                       {str(k): {"min": [int(x) for x in v["min"]], "max": [int(x) for x in v["max"]]}
                        for k, v in data.get("input_shapes", {}).items()})
        except (ValueError, KeyError, TypeError) as e:
            raise BadInputError(f"statistics file {path} is not valid ({e}); delete it and recalibrate") from None


# -- reductions ----------------------------------------------------------------------------------------


def reduce_range(stats: TensorStats, observer: str, params: ObserverParams | None = None) -> tuple[float, float]:
    """Reduce statistics to a ``(min, max)`` range with the named observer.

    Ranges always include 0 (required by every integer scheme so that zero padding is exact) and never
    exceed the observed min/max.

    Raises:
        BadInputError: an unknown observer name.
    """
    p = params or ObserverParams()
    if observer not in OBSERVERS:
        raise BadInputError(f"unknown observer {observer!r}; choose one of {', '.join(OBSERVERS)}")
    if observer == "auto":
        observer = auto_observer(stats)[0]
    if not stats.batches and not math.isfinite(stats.min):
        return 0.0, 0.0
    lo, hi = stats.min, stats.max
    if observer == "ema" and stats.ema_min is not None and stats.ema_max is not None:
        lo, hi = stats.ema_min, stats.ema_max
    elif observer in HISTOGRAM_OBSERVERS and stats.hist is not None and stats.hist.total:
        h = stats.hist
        if observer == "percentile":
            lo, hi = _percentile_range(h, p)
        elif observer == "entropy":
            lo, hi = _side_search(h, p, stats, _entropy_threshold)
        else:
            lo, hi = _side_search(h, p, stats, _mse_threshold)
        lo, hi = max(lo, stats.min), min(hi, stats.max)
    if p.symmetric and observer not in HISTOGRAM_OBSERVERS:
        t = max(abs(lo), abs(hi))
        lo, hi = (-t if lo < 0 else 0.0), (t if hi > 0 else 0.0)
    return min(lo, 0.0), max(hi, 0.0)


def _percentile_range(h: Histogram, p: ObserverParams) -> tuple[float, float]:
    q = p.percentile / 100.0
    w = h.width
    if p.symmetric:
        cdf = np.cumsum(h.abs_counts())
        k = int(np.searchsorted(cdf, q * cdf[-1], side="left"))
        t = (k + 1) * w
        return -t, t
    cdf = np.cumsum(h.counts)
    n = cdf[-1]
    j_hi = int(np.searchsorted(cdf, q * n, side="left"))
    j_lo = int(np.searchsorted(cdf, (1.0 - q) * n, side="right"))
    return -h.half_range + j_lo * w, -h.half_range + (j_hi + 1) * w


def _side_search(h: Histogram, p: ObserverParams, stats: TensorStats, search: Any) -> tuple[float, float]:
    """Apply a threshold search to ``|x|`` (symmetric) or to each side of zero (asymmetric)."""
    half = h.bins // 2
    levels = 2 ** (p.num_bits - 1)  # 128 per side for int8
    if p.symmetric:
        t = search(h.abs_counts(), h.width, levels, p)
        return -t, t
    pos = h.counts[half:]
    neg = h.counts[:half][::-1]
    if not neg.any():
        return 0.0, search(pos, h.width, 2 * levels, p)
    if not pos.any():
        return -search(neg, h.width, 2 * levels, p), 0.0
    return -search(neg, h.width, levels, p), search(pos, h.width, levels, p)


def _collapse(counts: np.ndarray, width: float, max_bins: int) -> tuple[np.ndarray, float]:
    """Trim trailing empty bins and merge groups of adjacent bins to at most ``max_bins``."""
    nz = np.flatnonzero(counts)
    n = int(nz[-1]) + 1 if nz.size else 0
    c = counts[:n].astype(np.float64)
    f = max(1, math.ceil(n / max_bins))
    if f > 1:
        c = np.pad(c, (0, (-n) % f)).reshape(-1, f).sum(axis=1)
    return c, width * f


def smooth(d: np.ndarray, eps: float = 1e-4) -> np.ndarray:
    """Normalise ``d`` and move mass ``eps`` into each empty bin from the non-empty ones (ONNX Runtime
    ``smooth_distribution``)."""
    d = d / d.sum()
    zero = d == 0
    nz = int(np.count_nonzero(~zero))
    if nz == 0 or nz == d.size:
        return d
    out = d.copy()
    out[zero] = eps
    out[~zero] -= eps * (d.size - nz) / nz
    return out


def kl_divergence(hist: np.ndarray, i: int, quant_bins: int) -> float:
    """KL(P_i || Q_i) of one candidate ``i`` (TensorRT's entropy calibration, as ONNX Runtime does it).

    ``P_i`` is ``hist[:i]`` with all counts beyond ``i`` added to its last bin; ``Q_i`` quantizes
    ``hist[:i]`` (without those outliers) into ``quant_bins`` groups and spreads each group's mass
    evenly over the bins where ``P_i`` is non-empty. Both are smoothed with :func:`smooth`.
    """
    hist = np.asarray(hist, np.float64)
    ref = hist[:i]
    pdist = ref.copy()
    pdist[-1] += hist[i:].sum()
    group = (np.arange(i) * quant_bins) // i
    nonzero = pdist > 0
    qsum = np.bincount(group, weights=ref, minlength=quant_bins)
    qcnt = np.bincount(group, weights=nonzero, minlength=quant_bins)
    qdist = np.where(nonzero, qsum[group] / np.maximum(qcnt[group], 1), 0.0)
    if qdist.sum() <= 0:
        return math.inf
    ps, qs = smooth(pdist), np.maximum(smooth(qdist), 1e-12)  # smoothing can push a tiny bin below 0
    m = ps > 0
    return float(np.sum(ps[m] * np.log(ps[m] / qs[m])))


def kl_search(hist: np.ndarray, quant_bins: int, stride: int = 16, start: int | None = None) -> int:
    """The ``i`` in ``start .. len(hist)`` with the least KL divergence (``start`` defaults to, and is
    never below, ``quant_bins``).

    Coarse-to-fine: every ``stride``-th candidate first, then every candidate within ``stride`` of the
    best (``stride=1`` is TensorRT's exhaustive search).
    """
    n = len(hist)
    first = max(quant_bins, start or 0)
    if first >= n:
        return n
    coarse = list(range(first, n + 1, stride))
    if coarse[-1] != n:
        coarse.append(n)
    best = min(coarse, key=lambda i: (kl_divergence(hist, i, quant_bins), i))
    fine = range(max(first, best - stride + 1), min(n, best + stride - 1) + 1)
    return min(fine, key=lambda i: (kl_divergence(hist, i, quant_bins), i))


def quantile_bin(counts: np.ndarray, q: float) -> int:
    """Number of leading bins that hold at least the fraction ``q`` of the mass (``q`` in (0, 1])."""
    cdf = np.cumsum(counts, dtype=np.float64)
    if cdf[-1] <= 0:
        return 0
    return int(np.searchsorted(cdf, q * cdf[-1], side="left")) + 1


def _entropy_threshold(counts: np.ndarray, width: float, levels: int, p: ObserverParams) -> float:
    """Entropy threshold of a one-sided histogram (bins of ``width`` from 0).

    The KL search runs over candidates from ``quant_bins`` (TensorRT's 128 of 2048 bins, doubled for a
    one-sided tensor) and from the ``p.entropy_floor`` percentile of the side's values, whichever is
    higher (see :class:`ObserverParams`).
    """
    c, w = _collapse(counts, width, p.search_bins)
    n = len(c)
    quant_bins = min(p.quant_bins * levels // 128, p.search_bins)
    if n <= quant_bins:
        return n * w
    floor = quantile_bin(c, p.entropy_floor / 100.0) if p.entropy_floor else 0
    return kl_search(c, quant_bins, start=floor) * w


def _mse_threshold(counts: np.ndarray, width: float, levels: int, p: ObserverParams) -> float:
    """Threshold ``t`` minimising the squared error of quantizing ``|x|`` to ``levels - 1`` steps on [0, t].

    The mass of each bin sits at its centre; candidates are 256 bin edges spread over the range.
    """
    c, w = _collapse(counts, width, p.search_bins)
    n = len(c)
    if n == 0:
        return 0.0
    centers = (np.arange(n) + 0.5) * w
    cand = np.unique(np.linspace(1, n, min(n, 256)).round().astype(np.int64)) * w
    steps = levels - 1
    best, best_err = float(cand[-1]), math.inf
    for chunk in np.array_split(cand, max(1, len(cand) // 32)):
        s = chunk[:, None] / steps
        q = np.minimum(np.rint(centers[None, :] / s), steps) * s
        err = ((centers[None, :] - q) ** 2 * c[None, :]).sum(axis=1)
        k = int(np.argmin(err))
        if err[k] < best_err:
            best, best_err = float(chunk[k]), float(err[k])
    return best


# -- per-tensor choice (``auto``) ------------------------------------------------------------------

OUTLIER_CHANNEL_RATIO = 6.0
"""A tensor whose largest per-channel (last axis) mean |x| exceeds this multiple of the median channel's
has *systematic* outlier channels (transformer residual streams and LayerNorm outputs; Dettmers et al.
2022 "LLM.int8()", Bondarenko et al. 2021). Those values are rare in the histogram but carry the
model: clipping them is what collapsed all-MiniLM-L6-v2 under a global percentile or MSE observer
(cosine 0.748 / 0.767 vs 0.978 with min/max). Such tensors keep min/max."""

HEAVY_TAIL_RATIO = 2.0
"""A signed tensor whose max |x| exceeds this multiple of its 99.99th percentile of |x| has a heavy,
sparse tail (isolated spikes rather than outlier channels): the percentile observer clips it."""

CLAMPING_PRODUCERS = ("Clip", "Sigmoid", "HardSigmoid", "Softmax")
"""Ops whose output is bounded above by construction (ReLU6 exports as Clip): the bound is the range."""


def auto_observer(stats: TensorStats, producer: str | None = None, keep: str | None = None) -> tuple[str, str]:
    """The observer ``auto`` uses for one tensor, and why (one short phrase).

    Args:
        stats: the tensor's calibration statistics.
        producer: op type of the node producing it (None for graph inputs or unknown).
        keep: why the graph says this tensor keeps min/max, or None. The pipeline passes
            ``"residual stream"`` for LayerNorm inputs/outputs and residual Adds before a LayerNorm
            (:func:`deployer.patterns.find_patterns`; where transformers keep their outlier channels) and
            ``"classifier input"`` for the input of the layer producing the logits (clipping its largest
            features flattens the top of the ranking like clipping the logits: EfficientNet-Lite0,
            TensorRT rules, top-1 0.953 kept vs 0.943 clipped).

    Rules, first match wins:

    1. ``keep`` (residual stream, classifier input), or systematic outlier channels
       (:data:`OUTLIER_CHANNEL_RATIO`, from the per-channel mean |x| kept for MatMul/Gemm inputs):
       ``minmax``;
    2. an output bounded by its producer (:data:`CLAMPING_PRODUCERS`): ``minmax``;
    3. never negative (ReLU outputs, pooled ReLU features): ``entropy`` (TensorRT's calibrator for CNN
       activations, Migacz 2017, with its floor at the 99.9th percentile);
    4. a heavy, sparse tail (:data:`HEAVY_TAIL_RATIO`): ``percentile`` (99.99; Wu et al. 2020
       "Integer Quantization for Deep Learning Inference", section 4.2);
    5. otherwise ``minmax``.

    The caller keeps network outputs and pre-softmax logits at min/max in any case
    (:func:`calibration.collect.unclipped_tensors`).
    """
    if stats.hist is None or not stats.hist.total:
        return "minmax", "no histogram"
    if keep:
        return "minmax", keep
    ch = stats.last_axis_abssum
    if ch is not None and len(ch) >= 8 and stats.last_axis_rows:
        a = np.asarray(ch, dtype=np.float64) / stats.last_axis_rows
        med = float(np.median(a))
        if med > 0 and float(a.max()) > OUTLIER_CHANNEL_RATIO * med:
            return "minmax", "outlier channels"
    if producer in CLAMPING_PRODUCERS:
        return "minmax", "bounded activation"
    if stats.min >= 0.0:
        return "entropy", "non-negative"
    amax = max(abs(stats.min), abs(stats.max))
    cdf = np.cumsum(stats.hist.abs_counts())
    k = int(np.searchsorted(cdf, 0.9999 * cdf[-1], side="left"))
    p9999 = (k + 1) * stats.hist.width
    if p9999 > 0 and amax > HEAVY_TAIL_RATIO * p9999:
        return "percentile", "heavy tail"
    return "minmax", "light tail"
