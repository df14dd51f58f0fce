"""magika standard_v3_3 (file-type detection from raw bytes): integer-input model, 214 content types.

Weights: the ONNX shipped in the ``magika`` package. Input ``bytes`` int32 [1, 2048]: the first and
the last 1024 bytes of a file (whitespace-stripped, padded with token 256), built with magika's own
feature helpers. Files: real files of this OS of many types (:func:`benchmarks.zoo.data.os_files`),
a seeded round-robin over extensions; calibration and held-out files disjoint.
"""

from __future__ import annotations

import json
from collections import defaultdict

import numpy as np

from benchmarks.zoo import common, data


def features(path: str, cfg: dict) -> np.ndarray:
    """magika's model input for one file: int32 [1, beg_size + end_size]."""
    from magika import Magika

    with open(path, "rb") as f:
        blob = f.read()
    n = min(cfg["block_size"], len(blob))
    beg = Magika._get_beg_ints_with_padding(blob[:n].lstrip(), cfg["beg_size"], cfg["padding_token"])
    end = Magika._get_end_ints_with_padding(blob[len(blob) - n:].rstrip(), cfg["end_size"], cfg["padding_token"])
    return np.array([beg + end], np.int32)


def pick_files(n: int, seed: int) -> tuple[list[str], list[str]]:
    """Two disjoint lists of ``n`` files, round-robin over extensions (seeded order within each)."""
    rng = np.random.default_rng(seed)
    by_ext: dict[str, list[str]] = defaultdict(list)
    for p in data.os_files():
        by_ext[p.rsplit(".", 1)[-1] if "." in p.rsplit("/", 1)[-1] else ""].append(p)
    lists = [list(rng.permutation(v)) for _, v in sorted(by_ext.items())]
    order = [str(v[k]) for k in range(max(len(v) for v in lists)) for v in lists if k < len(v)]
    return order[0:2 * n:2], order[1:2 * n:2]


def task_metric(ref: common.Outputs, out: common.Outputs) -> dict[str, float]:
    """Top-1 content-type agreement with FP32 and the cosine of the score vectors."""
    return {"top1_agreement": common.top1_agreement(ref, out), "score_cosine": common.cosine(ref, out, 0)}


def build(cache_dir: str) -> common.ZooModel:
    d = common.entry_dir(cache_dir, "magika", __file__)
    src = common.site_file("magika/models/standard_v3_3/model.onnx")
    cfg = json.loads((src.parent / "config.min.json").read_text())
    path = common.fixed_onnx(src, d / "model.onnx", {"bytes": (1, cfg["beg_size"] + cfg["end_size"])})
    cal_f, held_f = pick_files(common.N_CALIB, 0)
    return common.ZooModel(
        "magika", "file-type detection from bytes (int32 input, conv + attention-free MLP)", path,
        [{"bytes": features(p, cfg)} for p in cal_f], [{"bytes": features(p, cfg)} for p in held_f],
        {"target_label": "class_scores"}, task_metric, {"top1_agreement": (">=", 0.95)},
        "magika package ONNX (standard_v3_3), real published weights",
        "real OS files (/usr/share, /usr/lib, /etc, /usr/bin), one per folder and extension, disjoint splits")
