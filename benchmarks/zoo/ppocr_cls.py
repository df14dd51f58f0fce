"""PP-OCR text-direction classifier (MobileNetV3-small style: HardSigmoid/SE blocks; 0 vs 180 degrees).

Weights: the ONNX shipped in ``rapidocr-onnxruntime`` (``ch_ppocr_mobile_v2.0_cls_infer.onnx``),
shapes fixed to 1x3x48x192. Inputs: rendered text lines (as for ``ppocr_rec``), half of them rotated
by 180 degrees; held-out lines in other fonts and words.
"""

from __future__ import annotations

import numpy as np

from benchmarks.zoo import common, data
from benchmarks.zoo.ppocr_rec import lines

H, W = 48, 192


def _samples(fonts: tuple[str, ...], n: int, seed: int) -> list[common.Sample]:
    out = []
    for k, im in enumerate(lines(fonts, n, seed)):
        im = data.fit_line(im, H, W)
        out.append({"x": data.nchw(im[::-1, ::-1] if k % 2 else im)})
    return out


def task_metric(ref: common.Outputs, out: common.Outputs) -> dict[str, float]:
    """Top-1 agreement of the direction decision, and the mean absolute probability error."""
    err = np.mean([np.abs(np.asarray(r[0]) - np.asarray(o[0])).max() for r, o in zip(ref, out)])
    return {"top1_agreement": common.top1_agreement(ref, out), "prob_mae": float(err)}


def build(cache_dir: str) -> common.ZooModel:
    d = common.entry_dir(cache_dir, "ppocr_cls", __file__)
    path = common.fixed_onnx(common.site_file("rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx"),
                             d / "model.onnx", {"x": (1, 3, H, W)})
    return common.ZooModel(
        "ppocr_cls", "OCR text direction classification (MobileNetV3-small, HardSigmoid SE)", path,
        _samples(data.CALIB_FONTS, common.N_CALIB, 21), _samples(data.HELDOUT_FONTS, common.N_HELDOUT, 22),
        {"save_infer_model/scale_0.tmp_1": "class_scores"}, task_metric, {"top1_agreement": (">=", 0.95)},
        "rapidocr-onnxruntime package ONNX (PP-OCR mobile v2.0 cls), real published weights",
        "rendered text lines, half rotated 180 degrees; held-out: other fonts and words")
