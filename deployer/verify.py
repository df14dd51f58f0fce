"""Fidelity metrics of an artifact against the FP32 reference, on held-out samples.

Standard names: ``top1_agreement`` (classifiers: fraction of samples whose arg-max class equals
FP32's), ``cosine_mean`` (embeddings: mean cosine similarity per sample), ``sqnr_db`` per output
(signal-to-quantization-noise ratio, ``10 log10(sum(ref^2) / sum((ref - out)^2))``; null when identical).
"""

from __future__ import annotations

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
             task: str) -> dict[str, object]:
    """Metrics for one artifact.

    Args:
        ref_outputs / outputs: per sample, the list of outputs (graph order).
        task: ``classification`` (adds top1_agreement on output 0), ``embedding`` (cosine_mean), or
            ``generic`` (SQNR only).
    """
    res: dict[str, object] = {}
    def stack(rows: list[np.ndarray]) -> np.ndarray:
        # outputs of different shapes (dynamic sequence length): one flat vector per sample
        same = len({np.shape(r)[1:] for r in rows}) <= 1
        return np.concatenate(rows) if same else np.concatenate([np.ravel(r)[None] for r in rows], axis=1)

    stacked_ref = [stack([r[i] for r in ref_outputs]) for i in range(len(output_names))]
    stacked = [stack([o[i] for o in outputs]) for i in range(len(output_names))]
    if task == "classification":
        res["top1_agreement"] = round(top1_agreement(stacked_ref[0], stacked[0]), 6)
    elif task == "embedding":
        res["cosine_mean"] = round(cosine_mean(stacked_ref[0], stacked[0]), 6)
    # identical outputs have infinite SQNR: written as null so report.json stays strict JSON
    res["sqnr_db"] = {n: (round(v, 3) if np.isfinite(v) else None)
                      for n, r, o in zip(output_names, stacked_ref, stacked) for v in [sqnr_db(r, o)]}
    res["samples"] = len(outputs)
    return res
