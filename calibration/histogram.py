"""A fixed-size, mergeable histogram on a power-of-two grid.

Every tensor gets ``bins`` counters (default 8192) over the symmetric range ``[-R, R)`` with
``R = 2**exp``: the smallest power of two strictly above the largest ``|x|`` seen (at least
``2**MIN_EXP``). Bin ``j`` covers ``[-R + j*w, -R + (j+1)*w)`` with ``w = 2R / bins``.

When a batch exceeds the range, ``R`` doubles as often as needed and each doubling merges adjacent
bin pairs (old bin ``j`` goes to new bin ``(j + bins/2) // 2``). Because the grid is fixed by powers of
two, binning a value under a small ``R`` and widening later gives exactly the bin it would get under
the large ``R`` directly: the final histogram depends only on the multiset of values, not on their
order or on how they were split into shards. So merging two shards equals one pass over both, and
memory is ``bins`` int64 counters per tensor whatever the number of samples.

Non-finite values (``-inf`` attention masks, NaN) are counted in ``nonfinite`` and not binned.
"""

from __future__ import annotations

import base64
import math
import zlib
from typing import Any

import numpy as np

DEFAULT_BINS = 8192
MIN_EXP = -24


def range_exp(absmax: float) -> int:
    """Smallest ``e >= MIN_EXP`` with ``2**e > absmax`` (absmax finite, >= 0)."""
    if absmax <= 0.0:
        return MIN_EXP
    return max(math.frexp(absmax)[1], MIN_EXP)


class Histogram:
    """Signed histogram of one tensor (see the module docstring for the grid).

    Args:
        bins: number of bins, a power of two >= 4.
        exp: ``log2`` of the half range ``R``.
        counts: int64 array of ``bins`` counts (zeros when omitted).
        nonfinite: count of NaN/Inf values seen.
    """

    def __init__(self, bins: int = DEFAULT_BINS, exp: int = MIN_EXP, counts: np.ndarray | None = None,
                 nonfinite: int = 0) -> None:
        if bins < 4 or bins & (bins - 1):
            raise ValueError(f"histogram bins must be a power of two >= 4, got {bins}")
        self.bins = bins
        self.exp = exp
        self.counts = np.zeros(bins, np.int64) if counts is None else np.asarray(counts, np.int64).copy()
        if self.counts.shape != (bins,):
            raise ValueError(f"histogram counts have shape {self.counts.shape}, expected ({bins},)")
        self.nonfinite = nonfinite

    # -- geometry ----------------------------------------------------------------------------------
    @property
    def half_range(self) -> float:
        return math.ldexp(1.0, self.exp)

    @property
    def width(self) -> float:
        return 2.0 * self.half_range / self.bins

    def edges(self) -> np.ndarray:
        """``bins + 1`` bin edges (float64)."""
        return -self.half_range + self.width * np.arange(self.bins + 1, dtype=np.float64)

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    def abs_counts(self) -> np.ndarray:
        """Histogram of ``|x|``: ``bins/2`` bins over ``[0, R)`` of the same width."""
        h = self.bins // 2
        return self.counts[h:] + self.counts[:h][::-1]

    # -- updates -----------------------------------------------------------------------------------
    def widen_to(self, exp: int) -> None:
        """Double the range until ``R = 2**exp`` (a no-op when already that wide)."""
        h = self.bins // 2
        steps = exp - self.exp
        if steps > 0 and not self.counts.any():  # nothing binned yet: nothing to merge
            self.exp = exp
            return
        # after log2(bins) + 1 doublings every count sits in the two centre bins and stays there
        for _ in range(min(steps, int(math.log2(self.bins)) + 2)):
            padded = np.concatenate([np.zeros(h, np.int64), self.counts, np.zeros(h, np.int64)])
            self.counts = padded.reshape(-1, 2).sum(axis=1)
        self.exp = max(self.exp, exp)

    def add(self, values: np.ndarray, lo: float | None = None, hi: float | None = None) -> None:
        """Bin ``values`` (any shape, float or int).

        ``lo``/``hi``: bounds of the values when the caller has them (their min/max, or the min/max of
        the whole tensor they were drawn from); the range widens to cover them. Omitted: computed.
        Non-finite values are counted in ``nonfinite`` and not binned.
        """
        v = np.asarray(values)
        if v.size == 0:
            return
        if v.dtype.kind not in "f":
            v = v.astype(np.float64)
        if lo is None or hi is None:
            lo, hi = float(np.min(v)), float(np.max(v))
        if not (math.isfinite(lo) and math.isfinite(hi)):
            finite = np.isfinite(v)
            self.nonfinite += int(v.size - np.count_nonzero(finite))
            v = v[finite]
            if v.size == 0:
                return
            lo, hi = float(np.min(v)), float(np.max(v))
        self.widen_to(range_exp(max(-lo, hi)))
        # idx = floor(x * bins / 2R) + bins/2; the scale is a power of two, so the product is exact
        scale = math.ldexp(1.0, int(math.log2(self.bins)) - 1 - self.exp)
        work = np.float32 if (v.dtype == np.float32 and 2.0 ** -120 < scale < 2.0 ** 120) else np.float64
        t = np.multiply(v, work(scale), dtype=work)
        np.floor(t, out=t)
        idx = t.astype(np.int64).ravel()
        idx += self.bins // 2  # |x| < R, so idx is in [0, bins) without clipping
        self.counts += np.bincount(idx, minlength=self.bins)

    def merged(self, other: "Histogram") -> "Histogram":
        """A new histogram holding both (exactly what one pass over both would give)."""
        if other.bins != self.bins:
            raise ValueError(f"cannot merge histograms of {self.bins} and {other.bins} bins")
        a, b = self.copy(), other.copy()
        e = max(a.exp, b.exp)
        a.widen_to(e)
        b.widen_to(e)
        return Histogram(self.bins, e, a.counts + b.counts, a.nonfinite + b.nonfinite)

    def copy(self) -> "Histogram":
        return Histogram(self.bins, self.exp, self.counts, self.nonfinite)

    # -- serialization -----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; counts are zlib-compressed little-endian int64, base64-encoded."""
        raw = zlib.compress(self.counts.astype("<i8").tobytes(), 6)
        return {"bins": self.bins, "exp": self.exp, "nonfinite": self.nonfinite,
                "counts_zlib_b64": base64.b64encode(raw).decode("ascii")}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Histogram":
        counts = np.frombuffer(zlib.decompress(base64.b64decode(d["counts_zlib_b64"])), dtype="<i8")
        return cls(int(d["bins"]), int(d["exp"]), counts.astype(np.int64), int(d.get("nonfinite", 0)))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Histogram):
            return NotImplemented
        if self.bins != other.bins or self.nonfinite != other.nonfinite:
            return False
        a, b = self.copy(), other.copy()
        e = max(a.exp, b.exp)
        a.widen_to(e)
        b.widen_to(e)
        return bool(np.array_equal(a.counts, b.counts)) and (self.exp == other.exp or not self.total)

    def __repr__(self) -> str:
        return f"Histogram(bins={self.bins}, R=2**{self.exp}, total={self.total}, nonfinite={self.nonfinite})"
