"""PP-OCRv4 text recognizer (SVTR-LCNet backbone + CTC head, 6625-symbol softmax per time step).

Weights: the ONNX shipped in ``rapidocr-onnxruntime`` (``ch_PP-OCRv4_rec_infer.onnx``), shapes fixed
to 1x3x48x320 (40 CTC steps). Inputs: text lines (fortunes words) rendered with DejaVu fonts,
resized to height 48 and right-padded (PaddleOCR's rule); held-out lines in other fonts and words.
"""

from __future__ import annotations

import numpy as np

from benchmarks.zoo import common, data

H, W = 48, 320


def lines(fonts: tuple[str, ...], n: int, seed: int) -> list[np.ndarray]:
    """``n`` rendered text lines (a fortunes sentence cut to 8-24 characters), uint8 (H, W, 3)."""
    rng = np.random.default_rng(seed)
    texts = data.text_split(n, 0, seed)[0]
    out = []
    for k, t in enumerate(texts):
        a = int(rng.integers(0, max(1, len(t) - 24)))
        out.append(data.fit_line(data.render_line(t[a:a + int(rng.integers(8, 25))].strip() or t,
                                                  fonts[k % len(fonts)]), H, W))
    return out


def task_metric(ref: common.Outputs, out: common.Outputs) -> dict[str, float]:
    """Exact match of the greedy CTC strings, and per-step argmax agreement."""
    exact = np.mean([common.ctc_greedy(r[0]) == common.ctc_greedy(o[0]) for r, o in zip(ref, out)])
    return {"ctc_exact_match": float(exact), "step_argmax_agreement": common.top1_agreement(ref, out)}


def build(cache_dir: str) -> common.ZooModel:
    d = common.entry_dir(cache_dir, "ppocr_rec", __file__)
    path = common.fixed_onnx(common.site_file("rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx"),
                             d / "model.onnx", {"x": (1, 3, H, W)})
    return common.ZooModel(
        "ppocr_rec", "OCR text-line recognition (CTC sequence logits)", path,
        [{"x": data.nchw(im)} for im in lines(data.CALIB_FONTS, common.N_CALIB, 11)],
        [{"x": data.nchw(im)} for im in lines(data.HELDOUT_FONTS, common.N_HELDOUT, 12)],
        {"softmax_11.tmp_0": "sequence_logits"}, task_metric,
        {"ctc_exact_match": (">=", 0.9), "step_argmax_agreement": (">=", 0.98)},
        "rapidocr-onnxruntime package ONNX (PP-OCRv4 rec), real published weights",
        "rendered text lines (DejaVu fonts, fortunes words); held-out: other fonts and words")
