"""A small U-Net (two down / two up levels, ``ConvTranspose`` upsampling, skip ``Concat``), trained here
to denoise real photo crops (Gaussian noise, sigma 0.1 on [0, 1] RGB); output = input + predicted
residual, [1, 3, 64, 64].

Training: seeded, about a minute on 2 cores, cached; crops of the calibration photos. Calibration
samples: noisy crops of calibration photos; held-out: noisy crops of the held-out photos.
"""

from __future__ import annotations

import numpy as np

from benchmarks.zoo import common, data

SIZE, SIGMA, STEPS, BATCH = 64, 0.1, 250, 16


def make_net():  # type: ignore[no-untyped-def]
    import torch
    from torch import nn

    def double(cin: int, cout: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(cin, cout, 3, 1, 1), nn.ReLU(), nn.Conv2d(cout, cout, 3, 1, 1), nn.ReLU())

    class UNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.e1, self.e2, self.mid = double(3, 16), double(16, 32), double(32, 64)
            self.u2, self.d2 = nn.ConvTranspose2d(64, 32, 2, 2), double(64, 32)
            self.u1, self.d1 = nn.ConvTranspose2d(32, 16, 2, 2), double(32, 16)
            self.out = nn.Conv2d(16, 3, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            e1 = self.e1(x)
            e2 = self.e2(nn.functional.max_pool2d(e1, 2))
            m = self.mid(nn.functional.max_pool2d(e2, 2))
            d2 = self.d2(torch.cat([self.u2(m), e2], 1))
            d1 = self.d1(torch.cat([self.u1(d2), e1], 1))
            return x + self.out(d1)

    return UNet()


def noisy(photos: list[np.ndarray], n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(noisy, clean) float32 [n, 3, 64, 64]: seeded crops plus Gaussian noise of :data:`SIGMA`."""
    clean = np.stack([c.astype(np.float32).transpose(2, 0, 1) / 255.0 for c in data.crops(photos, n, SIZE, seed)])
    rng = np.random.default_rng(seed + 1000)
    return (clean + rng.normal(0, SIGMA, clean.shape)).astype(np.float32), clean


def _train(photos: list[np.ndarray]):  # type: ignore[no-untyped-def]
    import torch

    x, y = noisy(photos, 800, 100)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)

    def batches(rng: np.random.Generator):  # type: ignore[no-untyped-def]
        idx = rng.integers(0, len(xt), BATCH)
        return xt[idx], yt[idx]

    torch.set_num_threads(2)
    return common.fit(make_net(), batches, torch.nn.functional.mse_loss, STEPS, lr=2e-3)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB for signals in [0, 1]."""
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * float(np.log10(1.0 / mse))


def task_metric(ref: common.Outputs, out: common.Outputs) -> dict[str, float]:
    """PSNR of the artifact's denoised image against FP32's (dB; mean and worst sample) and output SQNR
    (named ``output_sqnr_db``: a metric named ``sqnr_db`` would overwrite the report's per-output field)."""
    per = [psnr(r[0], o[0]) for r, o in zip(ref, out)]
    return {"psnr_vs_fp32_db": float(np.mean(np.minimum(per, 99.0))), "psnr_vs_fp32_min_db": float(min(min(per), 99.0)),
            "output_sqnr_db": min(common.sqnr_db(ref, out, 0), 99.0)}


def build(cache_dir: str) -> common.ZooModel:
    d = common.entry_dir(cache_dir, "unet_denoise", __file__)
    path = d / "model.onnx"
    cal_photos, held_photos = data.photo_sets()
    if not path.exists():
        net = common.train_cached(d / "weights.pt", lambda: _train(cal_photos), make_net())
        common.export_torch(net, {"noisy": np.zeros((1, 3, SIZE, SIZE), np.float32)}, path, ["denoised"])
    cal, _ = noisy(cal_photos, common.N_CALIB, 1)
    held, held_clean = noisy(held_photos, common.N_HELDOUT, 2)
    m = common.ZooModel(
        "unet_denoise", "image denoising (U-Net: ConvTranspose upsampling, skip Concat)", path,
        [{"noisy": x[None]} for x in cal], [{"noisy": x[None]} for x in held],
        {"denoised": "regression"}, task_metric, {"psnr_vs_fp32_db": (">=", 35.0)},
        "trained here (seeded, ~1 min, cached) on noisy crops of skimage/sklearn photos",
        "noisy crops of photos (sigma 0.1); held-out photos disjoint")
    den = common.run_onnx(path, m.heldout)
    m.notes.append(f"FP32 denoising on held-out: PSNR {psnr(held, held_clean):.1f} dB noisy -> "
                   f"{psnr(np.concatenate([o[0] for o in den]), held_clean):.1f} dB denoised")
    return m
