"""Resemblyzer speaker encoder (GE2E, Wan et al. 2018): 3-layer LSTM(256) on 40-band mel frames,
linear + ReLU, L2-normalized 256-d speaker embedding.

Weights: ``resemblyzer/pretrained.pt`` shipped in the ``resemblyzer`` package (real published weights).
Inputs: 160-frame partial utterances (1.6 s) of espeak-ng speech, volume-normalized to -30 dBFS and
turned into power mel spectrograms as resemblyzer does (25 ms Hann window, 10 ms hop, 40 Slaney mel
bands, no log); calibration and held-out voices and sentences disjoint.
"""

from __future__ import annotations

import numpy as np

from benchmarks.zoo import common, data

N_FFT, HOP, N_MELS, FRAMES = 400, 160, 40, 160


def make_net():  # type: ignore[no-untyped-def]
    import torch
    from torch import nn

    class SpeakerEncoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lstm = nn.LSTM(N_MELS, 256, 3, batch_first=True)
            self.linear = nn.Linear(256, 256)

        def forward(self, mels: torch.Tensor) -> torch.Tensor:
            _, (hidden, _) = self.lstm(mels)
            e = torch.relu(self.linear(hidden[-1]))
            return e / torch.norm(e, dim=1, keepdim=True)

    net = SpeakerEncoder()
    sd = __import__("torch").load(common.site_file("resemblyzer/pretrained.pt"), map_location="cpu",
                                  weights_only=True)["model_state"]
    net.load_state_dict({k: v for k, v in sd.items() if not k.startswith("similarity")})
    return net.eval()


def mel_filters(sr: int = data.SR) -> np.ndarray:
    """Slaney-style mel filterbank [N_MELS, N_FFT // 2 + 1] with area normalization (librosa's default)."""
    def hz_to_mel(f: np.ndarray) -> np.ndarray:
        f = np.asarray(f, np.float64)
        return np.where(f < 1000, f / (200 / 3), 15 + np.log(np.maximum(f, 1e-9) / 1000) / (np.log(6.4) / 27))

    def mel_to_hz(m: np.ndarray) -> np.ndarray:
        return np.where(m < 15, m * (200 / 3), 1000 * np.exp((m - 15) * (np.log(6.4) / 27)))

    hz = mel_to_hz(np.linspace(hz_to_mel(np.array(0.0)), hz_to_mel(np.array(sr / 2)), N_MELS + 2))
    fft = np.linspace(0, sr / 2, N_FFT // 2 + 1)
    lower = (fft[None] - hz[:-2, None]) / (hz[1:-1] - hz[:-2])[:, None]
    upper = (hz[2:, None] - fft[None]) / (hz[2:] - hz[1:-1])[:, None]
    w = np.maximum(0, np.minimum(lower, upper))
    return (w * (2.0 / (hz[2:] - hz[:-2]))[:, None]).astype(np.float32)


def mels(wav: np.ndarray) -> np.ndarray:
    """Power mel spectrogram [frames, 40] of a 16 kHz clip normalized to -30 dBFS (centred STFT)."""
    rms_db = 10 * np.log10(max(float(np.mean(wav.astype(np.float64) ** 2)), 1e-12))
    wav = wav * 10 ** ((-30 - rms_db) / 20)
    x = np.pad(wav, N_FFT // 2, mode="reflect")
    n = 1 + (len(x) - N_FFT) // HOP
    idx = np.arange(N_FFT)[None] + HOP * np.arange(n)[:, None]
    spec = np.abs(np.fft.rfft(x[idx] * np.hanning(N_FFT + 1)[:-1], axis=1)) ** 2
    return (spec @ mel_filters().T).astype(np.float32)


def partials(clips: list[np.ndarray], n: int, seed: int) -> list[common.Sample]:
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        m = mels(clips[k % len(clips)])
        if len(m) < FRAMES:
            m = np.pad(m, ((0, FRAMES - len(m)), (0, 0)))
        s = int(rng.integers(0, len(m) - FRAMES + 1))
        out.append({"mels": m[s:s + FRAMES][None].copy()})
    return out


def task_metric(ref: common.Outputs, out: common.Outputs) -> dict[str, float]:
    """Cosine of the speaker embeddings with FP32: mean and worst sample."""
    per = [common.cosine([r], [o], 0) for r, o in zip(ref, out)]
    return {"embedding_cosine": float(np.mean(per)), "embedding_cosine_min": float(np.min(per))}


def build(cache_dir: str) -> common.ZooModel:
    d = common.entry_dir(cache_dir, "resemblyzer", __file__)
    path = d / "model.onnx"
    if not path.exists():
        common.export_torch(make_net(), {"mels": np.zeros((1, FRAMES, N_MELS), np.float32)}, path, ["embedding"])
    cal_t, held_t = data.text_split(16, 16, seed=5)
    return common.ZooModel(
        "resemblyzer", "speaker embedding (3-layer LSTM on mel frames)", path,
        partials(data.speech_clips(cal_t, data.CALIB_VOICES, 5), common.N_CALIB, 5),
        partials(data.speech_clips(held_t, data.HELDOUT_VOICES, 6), common.N_HELDOUT, 6),
        {"embedding": "embedding"}, task_metric, {"embedding_cosine": (">=", 0.99)},
        "resemblyzer package weights (pretrained.pt), real published weights",
        "1.6 s mel partials of espeak-ng speech (fortunes sentences; held-out: other voices and sentences)")
