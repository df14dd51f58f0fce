"""Fidelity metrics of an artifact against the FP32 reference, on held-out samples.

Standard names: ``top1_agreement`` (classifiers: fraction of samples whose arg-max class equals
FP32's), ``cosine_mean`` (mean cosine similarity per sample), ``sqnr_db`` (signal-to-quantization-noise
ratio, ``10 log10(sum(ref^2) / sum((ref - out)^2))``; null when identical). Per-output records and the
choice of metric per output live in :mod:`deployer.judge`.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def sqnr_db(ref: np.ndarray, out: np.ndarray) -> float:
    """SQNR in dB; +inf when identical."""
    noise = float(np.sum((ref.astype(np.float64) - out.astype(np.float64)) ** 2))
    signal = float(np.sum(ref.astype(np.float64) ** 2))
    if noise == 0.0:
        return float("inf")
    return 10.0 * float(np.log10(max(signal, 1e-30) / noise))


def top1_agreement(ref: np.ndarray, out: np.ndarray) -> float:
    """Fraction of rows (N, classes) where arg-max agrees."""
    r = ref.reshape(ref.shape[0], -1)
    o = out.reshape(out.shape[0], -1)
    return float(np.mean(np.argmax(r, axis=1) == np.argmax(o, axis=1)))


def cosine_mean(ref: np.ndarray, out: np.ndarray) -> float:
    """Mean cosine similarity of rows (N, D)."""
    r = ref.reshape(ref.shape[0], -1).astype(np.float64)
    o = out.reshape(out.shape[0], -1).astype(np.float64)
    num = np.sum(r * o, axis=1)
    den = np.linalg.norm(r, axis=1) * np.linalg.norm(o, axis=1)
    return float(np.mean(num / np.maximum(den, 1e-30)))


def fidelity(ref_outputs: list[list[np.ndarray]], outputs: list[list[np.ndarray]], output_names: list[str],
             task: str, input_shapes: dict[str, tuple[int, ...]] | None = None) -> dict[str, Any]:
    """Metrics for one artifact: every output judged with the metric for its kind, the worst one as summary.

    Args:
        ref_outputs / outputs: per sample, the list of outputs (graph order).
        task: ``classification`` (top1_agreement on output 0), ``embedding`` (cosine on output 0), or
            ``generic`` (each output's kind inferred from its FP32 values, :mod:`deployer.judge`).
        input_shapes: graph input name -> shape (recognises recurrent state outputs).

    Returns:
        :func:`deployer.judge.judge`'s record: ``outputs.<name>`` per output; ``sqnr_db`` and ``cosine_mean``
        of the worst output; ``top1_agreement`` for classification tasks; ``samples``.
    """
    from deployer.judge import judge

    return judge(ref_outputs, outputs, output_names, task, input_shapes)
