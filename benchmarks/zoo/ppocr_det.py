"""PP-OCRv4 text detector (DB: MobileNetV3-style backbone, FPN with Resize/ConvTranspose, sigmoid map).

Weights: the ONNX shipped in ``rapidocr-onnxruntime`` (``ch_PP-OCRv4_det_infer.onnx``), shapes fixed
to 1x3x256x256. Inputs: text pages rendered with DejaVu fonts (fortunes sentences) and crops of
``skimage.data.text()`` (a real photographed page) for calibration; pages in other fonts and other
sentences for held-out. The DB post-processing binarizes the probability map at 0.3.
"""

from __future__ import annotations

import numpy as np

from benchmarks.zoo import common, data

SIZE = 256
DB_THRESHOLD = 0.3


def _pages(fonts: tuple[str, ...], n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    lines = list(data.text_split(8 * n, 0, seed)[0])
    return [data.text_page(lines[8 * k:8 * k + 8], fonts[k % len(fonts)], int(rng.integers(14, 28)), rng,
                           (SIZE, SIZE)) for k in range(n)]


def _skimage_text(n: int, seed: int) -> list[np.ndarray]:
    import skimage.data
    from PIL import Image

    page = skimage.data.text()
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        s = int(rng.integers(100, page.shape[0]))
        y, x = int(rng.integers(0, page.shape[0] - s + 1)), int(rng.integers(0, page.shape[1] - s + 1))
        crop = np.asarray(Image.fromarray(page[y:y + s, x:x + s]).resize((SIZE, SIZE), Image.BILINEAR))
        out.append(np.stack([crop] * 3, axis=-1))
    return out


def task_metric(ref: common.Outputs, out: common.Outputs) -> dict[str, float]:
    """Binary text-map IoU at the DB threshold 0.3, and the map's cosine."""
    return {"map_iou@0.3": common.map_iou(ref, out, 0, DB_THRESHOLD), "map_cosine": common.cosine(ref, out, 0)}


def build(cache_dir: str) -> common.ZooModel:
    d = common.entry_dir(cache_dir, "ppocr_det", __file__)
    path = common.fixed_onnx(common.site_file("rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx"),
                             d / "model.onnx", {"x": (1, 3, SIZE, SIZE)})
    cal = _pages(data.CALIB_FONTS, common.N_CALIB - 8, 1) + _skimage_text(8, 1)
    held = _pages(data.HELDOUT_FONTS, common.N_HELDOUT, 2)
    return common.ZooModel(
        "ppocr_det", "OCR text detection (DB probability map: Resize, ConvTranspose, HardSigmoid, sigmoid)", path,
        [{"x": data.nchw(im)} for im in cal], [{"x": data.nchw(im)} for im in held],
        {"sigmoid_0.tmp_0": "probability_map"}, task_metric, {"map_iou@0.3": (">=", 0.9)},
        "rapidocr-onnxruntime package ONNX (PP-OCRv4 det), real published weights",
        "rendered text pages (DejaVu fonts, fortunes sentences) + skimage.data.text() crops; held-out: other "
        "fonts and sentences")
