"""The report's ``parity`` table: every target against FP32 and against each other, on the same held-out
samples (the first output of each, flattened; at most :data:`deployer.deliver.KEPT_SAMPLES` samples, so
memory stays at a few arrays per target).

Cosine is of the concatenated outputs; SQNR (dB) is ``10 log10(sum a^2 / sum (a - b)^2)`` with ``a`` the
row's reference (FP32, or the first target of the pair); null where the two are identical.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


def _pair(a: np.ndarray, b: np.ndarray) -> dict[str, float | None]:
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    na, nb = float(np.linalg.norm(a64)), float(np.linalg.norm(b64))
    cos = float(a64 @ b64 / (na * nb)) if na > 0 and nb > 0 else (1.0 if na == nb else 0.0)
    err = float(np.sum((a64 - b64) ** 2))
    sq = None if err == 0 else 10.0 * math.log10(max(float(np.sum(a64 ** 2)), 1e-30) / err)
    return {"cosine": round(cos, 6), "sqnr_db": None if sq is None else round(sq, 2)}


def parity(fp32: Sequence[np.ndarray], kept: Mapping[str, Sequence[np.ndarray]], output: str) -> dict[str, Any]:
    """``{"output", "samples", "pairs": [{"a", "b", "cosine", "sqnr_db"}]}`` for FP32 vs each target and
    each pair of targets, on the samples every one of them has."""
    names = [n for n, v in kept.items() if len(v)]
    n = min([len(fp32), *(len(kept[k]) for k in names)]) if names else 0
    if n == 0:
        return {"output": output, "samples": 0, "pairs": []}
    cat = {"fp32": np.concatenate([np.asarray(x, np.float32).ravel() for x in fp32[:n]])}
    for k in names:
        cat[k] = np.concatenate([np.asarray(x, np.float32).ravel() for x in kept[k][:n]])
    order = ["fp32", *names]
    pairs = [{"a": a, "b": b, **_pair(cat[a], cat[b])} for i, a in enumerate(order) for b in order[i + 1:]
             if cat[a].shape == cat[b].shape]
    return {"output": output, "samples": n, "pairs": pairs}
