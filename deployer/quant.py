"""Scale and zero-point derivation from plan ranges, and integer quantize/dequantize helpers.

Rules (each backend picks the one its spec demands):

- symmetric int8 (TensorRT, Ascend weights, TFLite weights): ``scale = max(|min|, |max|) / 127``,
  zero point 0, values in [-127, 127] for weights (TFLite int8 spec, TensorRT Q/DQ docs).
- asymmetric int8 (TFLite activations, ONNX Runtime): ``scale = (max - min) / 255`` over a range that
  includes 0, ``zero_point = round(-128 - min / scale)`` clamped to [-128, 127] (TFLite int8 spec).

Scales are never zero: a dead range or channel gets :data:`MIN_SCALE` (TensorRT's parser rejects
zero scales; DESIGN.md section 3).
"""

from __future__ import annotations

import numpy as np

MIN_SCALE = 1e-8


def symmetric_scale(lo: float, hi: float, qmax: int = 127) -> float:
    """Symmetric scale for a range: ``max(|lo|, |hi|) / qmax``, at least :data:`MIN_SCALE`."""
    return max(max(abs(lo), abs(hi)) / qmax, MIN_SCALE)


def asymmetric_params(lo: float, hi: float, qmin: int = -128, qmax: int = 127) -> tuple[float, int]:
    """Asymmetric ``(scale, zero_point)`` for a range (extended to include 0)."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = max((hi - lo) / (qmax - qmin), MIN_SCALE)
    zp = int(np.clip(round(qmin - lo / scale), qmin, qmax))
    return scale, zp


def mse_weight_scale(w: np.ndarray, qmax: int = 127, grid: int = 100, floor: float = 0.5) -> float:
    """Per-tensor symmetric weight scale minimizing ``||w - dequantize(quantize(w))||^2``.

    Candidates are ``c * max|w| / qmax`` for ``grid`` clip ratios ``c`` evenly spaced in
    [``floor``, 1]; ``c = 1`` (plain max) is always a candidate, so the result is never worse than
    max scaling in this error. One scale for a whole tensor spends its 255 levels on the largest
    weight: clipping a few outliers lowers the rounding error of all others (the weight-scale search of
    Huawei AMCT's ARQ and of Banner et al. 2019 "Post training 4-bit quantization", MSE criterion).

    Args:
        w: weight of any shape (float).
    Returns:
        scale (float, at least :data:`MIN_SCALE`).
    """
    flat = np.abs(w.astype(np.float64)).ravel()
    amax = float(flat.max()) if flat.size else 0.0
    if amax <= 0.0:
        return MIN_SCALE
    best, best_err = amax / qmax, np.inf
    for c in np.linspace(1.0, floor, grid):
        s = c * amax / qmax
        err = float(np.sum((np.clip(np.rint(flat / s), 0, qmax) * s - flat) ** 2))
        if err < best_err:
            best, best_err = s, err
    return max(best, MIN_SCALE)


def per_channel_scales(w: np.ndarray, axis: int, qmax: int = 127) -> np.ndarray:
    """Symmetric per-channel weight scales along ``axis`` (float32, shape ``(w.shape[axis],)``)."""
    red = tuple(i for i in range(w.ndim) if i != axis)
    amax = np.max(np.abs(w), axis=red) if red else np.abs(w)
    return np.maximum(amax / qmax, MIN_SCALE).astype(np.float32)


def quantize(x: np.ndarray, scale: np.ndarray | float, zero_point: np.ndarray | int = 0,
             qmin: int = -128, qmax: int = 127, axis: int | None = None) -> np.ndarray:
    """Round-half-to-even quantization (as ONNX QuantizeLinear), returns int32 values in [qmin, qmax]."""
    s = np.asarray(scale, dtype=np.float64)
    z = np.asarray(zero_point, dtype=np.float64)
    if axis is not None and s.ndim == 1:
        shape = [1] * x.ndim
        shape[axis] = -1
        s = s.reshape(shape)
        z = z.reshape(shape) if z.ndim == 1 else z
    q = np.rint(x.astype(np.float64) / s) + z
    return np.clip(q, qmin, qmax).astype(np.int32)


def dequantize(q: np.ndarray, scale: np.ndarray | float, zero_point: np.ndarray | int = 0,
               axis: int | None = None) -> np.ndarray:
    """Inverse of :func:`quantize` (float32)."""
    s = np.asarray(scale, dtype=np.float64)
    z = np.asarray(zero_point, dtype=np.float64)
    if axis is not None and s.ndim == 1:
        shape = [1] * q.ndim
        shape[axis] = -1
        s = s.reshape(shape)
        z = z.reshape(shape) if z.ndim == 1 else z
    return ((q.astype(np.float64) - z) * s).astype(np.float32)
