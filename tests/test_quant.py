"""Scale rules of deployer.quant: the MSE-optimal per-tensor weight scale."""

from __future__ import annotations

import numpy as np

from deployer.quant import dequantize, mse_weight_scale, quantize, symmetric_scale


def _err(w: np.ndarray, s: float) -> float:
    return float(np.sum((dequantize(quantize(w, s, 0, -127, 127), s) - w) ** 2))


def test_mse_scale_clips_a_heavy_tail_and_is_never_worse_than_max() -> None:
    rng = np.random.default_rng(0)
    w = (rng.standard_t(3, size=(256, 256)) * 0.02).astype(np.float32)  # heavy-tailed, like transformer weights
    s_max = symmetric_scale(float(w.min()), float(w.max()))
    s_mse = mse_weight_scale(w)
    assert s_mse < 0.9 * s_max  # clips the tail
    assert _err(w, s_mse) < 0.9 * _err(w, s_max)
    g = rng.normal(size=(32, 32)).astype(np.float32)  # no outlier: close to max, never worse
    assert _err(g, mse_weight_scale(g)) <= _err(g, symmetric_scale(float(g.min()), float(g.max()))) + 1e-9


def test_mse_scale_hand_computed_and_degenerate() -> None:
    # [1, 0.5]: with qmax 127 the max scale 1/127 represents both exactly: error 0, scale stays 1/127
    assert abs(mse_weight_scale(np.array([1.0, 0.5])) - 1 / 127) < 1e-12
    assert mse_weight_scale(np.zeros(4)) > 0  # never a zero scale
