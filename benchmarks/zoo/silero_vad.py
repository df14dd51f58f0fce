"""silero-vad v5 (voice activity detection): conv front end + LSTM with state input and output.

Weights: the ONNX shipped in the ``silero-vad`` package (``silero_vad_16k_op15.onnx``), with the
sample rate frozen at 16 kHz and shapes fixed to one 512-sample chunk plus 64 samples of context
(the package's own streaming wrapper feeds 576 samples), so the sample-rate ``If`` folds away.
Inputs: espeak-ng speech with silence before and after; each sample is one chunk and the LSTM state
the FP32 model had reached at that point of the clip (real recurrent state, not zeros).
"""

from __future__ import annotations

import numpy as np

from benchmarks.zoo import common, data

CHUNK, CONTEXT = 512, 64


def _chunks(path: str, clips: list[np.ndarray], n: int, seed: int) -> list[common.Sample]:
    """Stream every clip through the FP32 model; keep ``n`` (chunk, state) pairs spread over the clips."""
    import onnxruntime as ort

    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed)
    pool = []
    for clip in clips:
        pad = rng.normal(0, 0.003, int(0.4 * data.SR)).astype(np.float32)
        x = np.concatenate([pad, clip, pad])
        state = np.zeros((2, 1, 128), np.float32)
        ctx = np.zeros(CONTEXT, np.float32)
        steps = []
        for k in range(0, len(x) - CHUNK, CHUNK):
            inp = np.concatenate([ctx, x[k:k + CHUNK]])[None].astype(np.float32)
            steps.append({"input": inp, "state": state})
            _, state = sess.run(None, {"input": inp, "state": state})
            ctx = x[k + CHUNK - CONTEXT:k + CHUNK]
        pool.append(steps)
    per = max(1, n // len(pool))
    out = [s for steps in pool for s in (steps[i] for i in rng.choice(len(steps), min(per, len(steps)), replace=False))]
    return out[:n]


def task_metric(ref: common.Outputs, out: common.Outputs) -> dict[str, float]:
    """Speech-frame decision agreement (probability > 0.5), mean absolute probability error, state cosine."""
    p_ref = np.array([float(np.ravel(r[0])[0]) for r in ref])
    p_out = np.array([float(np.ravel(o[0])[0]) for o in out])
    return {"speech_decision_agreement": common.decision_agreement(ref, out, 0, 0.5),
            "prob_mae": float(np.abs(p_ref - p_out).mean()),
            "state_cosine": common.cosine(ref, out, 1)}


def build(cache_dir: str) -> common.ZooModel:
    d = common.entry_dir(cache_dir, "silero_vad", __file__)
    path = common.fixed_onnx(common.site_file("silero_vad/data/silero_vad_16k_op15.onnx"), d / "model.onnx",
                             {"input": (1, CHUNK + CONTEXT), "state": (2, 1, 128)},
                             {"sr": np.array(16000, np.int64)})
    cal_t, held_t = data.text_split(8, 8, seed=1)
    cal = _chunks(str(path), data.speech_clips(cal_t, data.CALIB_VOICES, 1), common.N_CALIB, 1)
    held = _chunks(str(path), data.speech_clips(held_t, data.HELDOUT_VOICES, 2), common.N_HELDOUT, 2)
    return common.ZooModel(
        "silero_vad", "voice activity detection (audio conv + LSTM, recurrent state in/out)", path, cal, held,
        {"output": "class_scores", "stateN": "state"}, task_metric,
        {"speech_decision_agreement": (">=", 0.95), "state_cosine": (">=", 0.99)},
        "silero-vad package ONNX (v5, 16 kHz), real published weights",
        "espeak-ng speech of fortunes sentences (4 calibration voices, 4 other held-out voices) with silence")
