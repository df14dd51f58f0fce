"""Real photos shipped by scikit-image and scikit-learn, cut into random square crops.

Split by source photo: :data:`HELDOUT_PHOTOS` give held-out crops only, every other photo gives
calibration crops only, so no crop of a held-out photo is ever seen by calibration. The
mixed-precision search scores plans on other crops (another seed) of :data:`VALIDATION_PHOTOS`, a
subset of the calibration photos: never on held-out photos.
"""

from __future__ import annotations

import numpy as np

CALIBRATION_PHOTOS = (
    "astronaut", "hubble_deep_field", "immunohistochemistry", "retina", "colorwheel", "camera", "coins",
    "grass", "gravel", "brick", "clock", "moon", "china", "motorcycle",
)
HELDOUT_PHOTOS = ("chelsea", "coffee", "flower", "rocket")
VALIDATION_PHOTOS = ("astronaut", "camera", "coins", "clock", "moon", "china", "motorcycle", "retina")
"""Object photos among the calibration photos whose fresh crops (another seed) score the search.

Texture photos (grass, gravel, brick, micrographs) give near-flat ImageNet logits where top-1
agreement mostly measures ties: the search would chase noise there (INT8 agreement 0.63-0.79 on
them vs 0.88-1.0 on object photos, measured with the TensorRT policy, 24 crops each)."""


def load_photos() -> dict[str, np.ndarray]:
    """All photos as uint8 RGB arrays (H, W, 3), keyed by name. Grayscale photos are replicated."""
    import skimage.data as skd
    from sklearn.datasets import load_sample_images

    out: dict[str, np.ndarray] = {}
    for name in CALIBRATION_PHOTOS + HELDOUT_PHOTOS:
        if name in ("china", "flower"):
            continue
        im = skd.stereo_motorcycle()[0] if name == "motorcycle" else getattr(skd, name)()
        if im.ndim == 2:
            im = np.stack([im] * 3, axis=-1)
        out[name] = np.ascontiguousarray(im[..., :3])
    sk = load_sample_images()
    for fname, im in zip(sk.filenames, sk.images):
        out[fname.replace("\\", "/").split("/")[-1].split(".")[0]] = im
    return out


def crop_at(photos: list[np.ndarray], k: int, size: int, seed: int) -> np.ndarray:
    """Crop ``k`` of a seeded stream: photo ``k % len(photos)``, drawn with ``default_rng([seed, k])``.

    Deterministic per index (so any number of crops can be drawn, lazily, in any order); same recipe
    as :func:`random_crops`. Returns a uint8 HWC array (``size`` x ``size`` x 3).
    """
    return random_crops([photos[k % len(photos)]], 1, size, np.random.default_rng([seed, k]))[0]


def photos_fingerprint(photos: list[np.ndarray]) -> str:
    """sha256 over the photos' shapes and bytes (part of a lazy crop set's content hash)."""
    import hashlib

    h = hashlib.sha256()
    for im in photos:
        h.update(str(im.shape).encode())
        h.update(np.ascontiguousarray(im).tobytes())
    return h.hexdigest()


def random_crops(photos: list[np.ndarray], n: int, size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """``n`` random square crops (side 25-100% of the short edge), resized to ``size``, random h-flip.

    Photos are used round-robin. Returns uint8 HWC arrays.
    """
    from PIL import Image

    out = []
    for i in range(n):
        im = photos[i % len(photos)]
        h, w, _ = im.shape
        side = int(rng.uniform(0.25, 1.0) * min(h, w))
        y = int(rng.integers(0, h - side + 1))
        x = int(rng.integers(0, w - side + 1))
        crop = Image.fromarray(im[y:y + side, x:x + side]).resize((size, size), Image.BILINEAR)
        if rng.random() < 0.5:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        out.append(np.asarray(crop, dtype=np.uint8))
    return out
