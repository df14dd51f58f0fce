"""A Conv1d spoken-digit classifier, trained here on espeak-ng speech of "zero" ... "nine".

Architecture (written here): log-mel frames [1, 40, 100] (1 s, 40 bands as channels) -> Conv1d(5) +
BatchNorm + ReLU x 3 (strides 1, 2, 2) -> global average pool over time -> Linear(10).
Training: seeded, seconds on 2 cores, cached; the four calibration voices at random speeds and pitches.
Calibration samples: those voices (new speeds/pitches); held-out: four other voices.
"""

from __future__ import annotations

import numpy as np

from benchmarks.zoo import common, data
from benchmarks.zoo.resemblyzer_lstm import mels

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
FRAMES, STEPS, BATCH = 100, 250, 32


def make_net():  # type: ignore[no-untyped-def]
    from torch import nn

    def block(cin: int, cout: int, stride: int) -> list[nn.Module]:
        return [nn.Conv1d(cin, cout, 5, stride, 2), nn.BatchNorm1d(cout), nn.ReLU()]

    return nn.Sequential(*block(40, 64, 1), *block(64, 64, 2), *block(64, 128, 2),
                         nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(128, 10))


def features(wav: np.ndarray) -> np.ndarray:
    """log-mel [1, 40, FRAMES], the word centred (zero-padded or cut)."""
    m = np.log(mels(wav) + 1e-6).T
    out = np.full((40, FRAMES), np.log(1e-6), np.float32)
    n = min(FRAMES, m.shape[1])
    a, b = (FRAMES - n) // 2, (m.shape[1] - n) // 2
    out[:, a:a + n] = m[:, b:b + n]
    return out[None]


def words(voices: tuple[str, ...], n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(features [n, 40, FRAMES], labels [n]): word ``k % 10``, voice, speed and pitch drawn per clip."""
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for k in range(n):
        w = k % 10
        wav = data.speak(WORDS[w], voices[int(rng.integers(len(voices)))], int(rng.integers(110, 220)),
                         int(rng.integers(20, 80)))
        wav = wav + rng.normal(0, 0.003, wav.shape).astype(np.float32)
        xs.append(features(wav)[0])
        ys.append(w)
    return np.stack(xs), np.array(ys, np.int64)


def _train():  # type: ignore[no-untyped-def]
    import torch

    x, y = words(data.CALIB_VOICES, 400, 100)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)

    def batches(rng: np.random.Generator):  # type: ignore[no-untyped-def]
        idx = rng.integers(0, len(xt), BATCH)
        return xt[idx] + 0.1 * torch.randn(len(idx), 40, FRAMES), yt[idx]

    torch.set_num_threads(2)
    return common.fit(make_net(), batches, torch.nn.functional.cross_entropy, STEPS)


def task_metric(ref: common.Outputs, out: common.Outputs) -> dict[str, float]:
    """Top-1 agreement with FP32 and logit cosine."""
    return {"top1_agreement": common.top1_agreement(ref, out), "logit_cosine": common.cosine(ref, out, 0)}


def build(cache_dir: str) -> common.ZooModel:
    d = common.entry_dir(cache_dir, "conv1d_words", __file__)
    path = d / "model.onnx"
    if not path.exists():
        net = common.train_cached(d / "weights.pt", _train, make_net())
        common.export_torch(net, {"logmel": np.zeros((1, 40, FRAMES), np.float32)}, path, ["logits"])
    cal, _ = words(data.CALIB_VOICES, common.N_CALIB, 1)
    held, held_y = words(data.HELDOUT_VOICES, common.N_HELDOUT, 2)
    m = common.ZooModel(
        "conv1d_words", "spoken-digit recognition (Conv1d over log-mel frames)", path,
        [{"logmel": x[None]} for x in cal], [{"logmel": x[None]} for x in held],
        {"logits": "class_scores"}, task_metric, {"top1_agreement": (">=", 0.95)},
        "trained here (seeded, seconds, cached) on espeak-ng spoken digits",
        "espeak-ng spoken digits; held-out: four voices never used for training or calibration")
    acc = np.mean([int(np.argmax(o[0])) == y for o, y in zip(common.run_onnx(path, m.heldout), held_y)])
    m.notes.append(f"FP32 accuracy on held-out voices: {acc:.2f}")
    return m
