"""Dataset adapters: image folders, text files and Python iterables -> ``dict[input_name, ndarray]``.

- :func:`image_folder`: photos plus a preprocessing spec (:class:`ImageSpec`, JSON/YAML): resize the
  shorter side, center or random crop, mean/std or scale/offset, NCHW/NHWC, dtype. With random crops
  any number of samples can be drawn from a few photos (seeded).
- :func:`text_files`: lines of text tokenized by a local ``transformers`` tokenizer
  (``local_files_only=True``: never downloads).
- :func:`from_iterable` (re-exported): any iterable of dicts/arrays or a ``torch.utils.data.DataLoader``.
- :func:`load_calibration`: a folder with ``calibration.json``/``.yaml`` (``{"kind": "image", ...}`` or
  ``{"kind": "text", ...}``) goes through the matching adapter; otherwise ``.npy``/``.npz`` files.
- :func:`split_samples`: seeded shuffle into disjoint calibration and held-out sets.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from calibration.dataset import (CalibrationSet, InputSpec, Sample, check_calibration_folder, from_iterable,
                                 load_folder, sample_files, sha256_file)
from deployer.errors import BadInputError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
SPEC_NAMES = ("calibration.json", "calibration.yaml", "calibration.yml")

__all__ = ["ImageSpec", "TextSpec", "image_folder", "text_files", "from_iterable", "load_calibration",
           "split_samples", "read_spec"]


@dataclass(frozen=True)
class ImageSpec:
    """How photos become one model input.

    Attributes:
        input: model input name.
        size: ``[height, width]`` of the crop.
        resize: shorter side after resizing (pixels), 0 for no resize.
        crop: ``center`` or ``random``.
        mean, std: per-channel, applied to pixel values in [0, 255] after ``scale``/``offset``:
            ``((pixel * scale + offset) - mean) / std``.
        scale, offset: linear map of 0..255 pixels (e.g. ``1/255`` and 0 for [0, 1]).
        layout: ``NCHW`` or ``NHWC`` (a batch dimension of 1 is added).
        dtype: numpy dtype name of the input (``float32``, ``uint8``, ``int8``).
    """

    input: str = "input"
    size: tuple[int, int] = (224, 224)
    resize: int = 256
    crop: str = "center"
    mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    std: tuple[float, ...] = (1.0, 1.0, 1.0)
    scale: float = 1.0 / 255.0
    offset: float = 0.0
    layout: str = "NCHW"
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.crop not in ("center", "random"):
            raise BadInputError(f"image spec: crop {self.crop!r} must be 'center' or 'random'")
        if self.layout not in ("NCHW", "NHWC"):
            raise BadInputError(f"image spec: layout {self.layout!r} must be 'NCHW' or 'NHWC'")
        if any(s == 0 for s in self.std):
            raise BadInputError("image spec: std must not contain 0")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ImageSpec":
        d = {k: v for k, v in d.items() if k != "kind"}
        _check_keys("image", d, cls)
        for k in ("size", "mean", "std"):
            if k in d:
                d[k] = tuple(d[k]) if isinstance(d[k], (list, tuple)) else (d[k], d[k]) if k == "size" else (d[k],)
        return cls(**d)


@dataclass(frozen=True)
class TextSpec:
    """How lines of text become token inputs.

    Attributes:
        tokenizer: a local directory (or a name already in the Hugging Face cache).
        max_length: padded/truncated sequence length.
        inputs: model inputs to fill (of ``input_ids``, ``attention_mask``, ``token_type_ids``).
        dtype: integer dtype of the inputs.
    """

    tokenizer: str
    max_length: int = 128
    inputs: tuple[str, ...] = ("input_ids", "attention_mask")
    dtype: str = "int64"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TextSpec":
        d = {k: v for k, v in d.items() if k != "kind"}
        _check_keys("text", d, cls)
        if "inputs" in d:
            d["inputs"] = tuple(d["inputs"])
        return cls(**d)


def _check_keys(kind: str, d: dict[str, Any], cls: type) -> None:
    unknown = set(d) - {f.name for f in fields(cls)}
    if unknown:
        raise BadInputError(f"{kind} spec: unknown keys {sorted(unknown)}; allowed: {[f.name for f in fields(cls)]}")


def read_spec(path: str | Path) -> dict[str, Any]:
    """Read a JSON or YAML spec file into a dict."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
        if p.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except (OSError, ValueError) as e:
        raise BadInputError(f"spec {p} cannot be read ({e}); write it as JSON or YAML") from None
    except Exception as e:  # yaml.YAMLError
        raise BadInputError(f"spec {p} is not valid YAML ({e})") from None
    if not isinstance(data, dict):
        raise BadInputError(f"spec {p} must hold a mapping")
    return data


# -- images -----------------------------------------------------------------------------------------


def _image_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise BadInputError(f"image folder {folder} does not exist")
    files = sample_files(folder, IMAGE_SUFFIXES, recursive=True)
    if not files:
        raise BadInputError(f"image folder {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return files


def preprocess_image(img: Any, spec: ImageSpec, rng: np.random.Generator) -> np.ndarray:
    """One PIL image -> one model input (batch of 1) under ``spec``."""
    from PIL import Image

    img = img.convert("RGB")
    if spec.resize:
        w, h = img.size
        k = spec.resize / min(w, h)
        img = img.resize((max(spec.size[1], round(w * k)), max(spec.size[0], round(h * k))), Image.BILINEAR)
    w, h = img.size
    ch, cw = spec.size
    if w < cw or h < ch:
        img = img.resize((max(w, cw), max(h, ch)), Image.BILINEAR)
        w, h = img.size
    if spec.crop == "center":
        top, left = (h - ch) // 2, (w - cw) // 2
    else:
        top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    a = np.asarray(img.crop((left, top, left + cw, top + ch)), np.float32)
    a = (a * spec.scale + spec.offset - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)  # type: ignore[assignment]
    if spec.layout == "NCHW":
        a = a.transpose(2, 0, 1)
    dt = np.dtype(spec.dtype)
    if dt.kind in "iu":
        info = np.iinfo(dt)
        a = np.clip(np.rint(a), info.min, info.max)
    return np.ascontiguousarray(a[None].astype(dt))


ADAPTER_VERSION = 2  # part of lazy sets' fingerprints: bump when the sample generation changes


def image_folder(folder: str | Path, spec: ImageSpec | dict[str, Any] | str | Path, n: int | None = None,
                 seed: int = 0) -> CalibrationSet:
    """Calibration samples from a folder of photos, produced lazily (one photo decoded per access).

    Args:
        folder: photos (searched recursively), sorted by name then shuffled with ``seed``.
        spec: an :class:`ImageSpec`, its dict, or a JSON/YAML file.
        n: number of samples; with ``crop="random"`` any ``n`` (photos are reused round-robin with new
            crops), with ``center`` at most the number of photos. None: one per photo.
        seed: seed of the shuffle and of the random crops. Sample ``k``'s crop is drawn from
            ``np.random.default_rng([seed, k])``, so it depends only on ``(seed, k)`` and any ``n``
            gives the first ``n`` samples of one fixed stream.

    Returns:
        A lazy :class:`CalibrationSet` of ``{spec.input: array}`` (shape and dtype from ``spec``); its
        sha256 is over the photos' bytes, the spec, ``seed``, ``n`` and :data:`ADAPTER_VERSION`.

    Raises:
        BadInputError: missing folder, no photos, more center crops than photos, a bad spec.
    """
    from PIL import Image

    if isinstance(spec, (str, Path)):
        spec = read_spec(spec)
    if isinstance(spec, dict):
        spec = ImageSpec.from_dict(spec)
    root = Path(folder)
    files = _image_files(root)
    rng = np.random.default_rng(seed)
    order = [files[i] for i in rng.permutation(len(files))]
    count = len(order) if n is None else n
    if spec.crop == "center" and count > len(order):
        raise BadInputError(f"{count} samples requested from {len(order)} photos with center crops; use "
                            f"crop: random to draw more, or fewer samples")
    fp = hashlib.sha256(json.dumps({"adapter": "image", "version": ADAPTER_VERSION, "spec": asdict(spec),
                                    "seed": seed, "n": count}, sort_keys=True).encode())
    for f in order:
        fp.update(str(f.relative_to(root)).encode() + b"\0" + sha256_file(f).encode())
    img_spec = spec

    def load(k: int) -> Sample:
        with Image.open(order[k % len(order)]) as img:
            return {img_spec.input: preprocess_image(img, img_spec, np.random.default_rng([seed, k]))}

    return CalibrationSet.lazy(count, load, name=f"images:{root}", fingerprint=fp.hexdigest())


# -- text -------------------------------------------------------------------------------------------


def read_lines(paths: str | Path | Sequence[str | Path]) -> list[str]:
    """Non-empty stripped lines of text files (a folder: every ``*.txt`` in it)."""
    if isinstance(paths, (str, Path)):
        p = Path(paths)
        paths = sorted(p.glob("*.txt")) if p.is_dir() else [p]
    lines: list[str] = []
    for p in paths:  # type: ignore[assignment]
        try:
            lines += [ln.strip() for ln in Path(p).read_text(encoding="utf-8", errors="replace").splitlines()]
        except OSError as e:
            raise BadInputError(f"text file {p} cannot be read ({e.strerror})") from None
    lines = [ln for ln in lines if ln]
    if not lines:
        raise BadInputError(f"no text found in {paths}")
    return lines


def load_tokenizer(name: str) -> Any:
    """A ``transformers`` tokenizer from a local folder or the local HF cache (never downloads)."""
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise BadInputError("text calibration needs transformers: pip install transformers") from None
    try:
        return AutoTokenizer.from_pretrained(name, local_files_only=True)
    except (OSError, ValueError) as e:
        raise BadInputError(f"tokenizer {name!r} is not available offline ({e}); give a local tokenizer folder") from None


def text_files(paths: str | Path | Sequence[str | Path] | Sequence[str], spec: TextSpec | dict[str, Any],
               n: int | None = None, seed: int = 0, texts: Sequence[str] | None = None) -> CalibrationSet:
    """Calibration samples from lines of text (one sample per line, shuffled with ``seed``), tokenized lazily.

    The lines are kept in memory (text is small); each sample is tokenized when it is accessed. The
    sha256 streams the tokenized samples.

    Args:
        paths: text files or a folder of ``*.txt`` (ignored when ``texts`` is given).
        spec: a :class:`TextSpec` or its dict.
        n: number of samples (at most the number of lines); None: all.
        texts: the texts themselves, instead of files.

    Returns:
        A lazy :class:`CalibrationSet` of ``{input: int array [1, max_length]}`` for ``spec.inputs``.

    Raises:
        BadInputError: no text, more samples than lines, a tokenizer not available offline or not
            producing ``spec.inputs``.
    """
    if isinstance(spec, dict):
        spec = TextSpec.from_dict(spec)
    lines = list(texts) if texts is not None else read_lines(paths)  # type: ignore[arg-type]
    order = np.random.default_rng(seed).permutation(len(lines))
    if n is not None:
        if n > len(lines):
            raise BadInputError(f"{n} text samples requested but only {len(lines)} lines are available")
        order = order[:n]
    tok = load_tokenizer(spec.tokenizer)
    dt = np.dtype(spec.dtype)
    text_spec = spec

    def load(k: int) -> Sample:
        enc = tok(lines[int(order[k])], padding="max_length", truncation=True, max_length=text_spec.max_length,
                  return_tensors="np")
        missing = [key for key in text_spec.inputs if key not in enc]
        if missing:
            raise BadInputError(f"tokenizer {text_spec.tokenizer!r} does not produce {missing}")
        return {key: np.asarray(enc[key]).astype(dt) for key in text_spec.inputs}

    cs = CalibrationSet.lazy(len(order), load, name=f"text:{paths if texts is None else 'texts'}")
    if len(cs):
        cs[0]  # a tokenizer that lacks an input fails here, not mid-calibration
    return cs


# -- dispatch and split -----------------------------------------------------------------------------


def load_calibration(folder: str | Path, inputs: Sequence[InputSpec], n: int | None = None,
                     seed: int = 0) -> CalibrationSet:
    """A calibration folder: with a ``calibration.json|yaml`` spec (``kind: image|text``) through the
    image/text adapter, otherwise ``.npy``/``.npz`` samples (:func:`calibration.dataset.load_folder`)."""
    root = check_calibration_folder(folder)
    spec_path = next((root / s for s in SPEC_NAMES if (root / s).is_file()), None)
    if spec_path is None:
        return load_folder(root, inputs)
    d = read_spec(spec_path)
    kind = d.get("kind")
    if kind == "image":
        cs = image_folder(root, d, n, seed)
    elif kind == "text":
        cs = text_files(root, d, n, seed)
    else:
        raise BadInputError(f"{spec_path}: 'kind' must be 'image' or 'text', got {kind!r}")
    cs.validate(inputs, full=False)  # the first sample now, the others as they are produced
    return cs


def split_samples(samples: Sequence[Sample], n_calib: int, n_heldout: int, seed: int = 0
                  ) -> tuple[CalibrationSet, CalibrationSet]:
    """Seeded shuffle, then the first ``n_calib`` calibrate and the next ``n_heldout`` are held out
    (disjoint by construction). Both are views of ``samples`` (lazy when it is).

    Raises:
        BadInputError: ``n_calib + n_heldout`` exceeds the number of samples.
    """
    if n_calib + n_heldout > len(samples):
        raise BadInputError(f"{n_calib} calibration + {n_heldout} held-out samples requested, only {len(samples)} exist")
    order = np.random.default_rng(seed).permutation(len(samples))
    cs = samples if isinstance(samples, CalibrationSet) else CalibrationSet(samples, getattr(samples, "name", "samples"))
    return cs.select(order[:n_calib]), cs.select(order[n_calib:n_calib + n_heldout])
