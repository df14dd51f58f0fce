"""Calibration datasets: the one protocol every part of deployer speaks.

A calibration set is a finite, re-iterable sequence of samples; a sample is ``dict[input_name,
np.ndarray]`` with the model's input shapes (batch dimension included) and dtypes. Adapters turn
folders of ``.npy``/``.npz`` files and Python iterables into it. Backends adapt it to their own form
(TFLite representative dataset, TensorRT/ATC inputs). Pattern: ONNX Runtime ``CalibrationDataReader``,
Polygraphy ``DataLoader``.

Loading never unpickles (``allow_pickle=False``): an object array is refused.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from deployer.errors import BadInputError

Sample = dict[str, np.ndarray]


@dataclass(frozen=True)
class InputSpec:
    """Name, shape (None for a dynamic dim) and numpy dtype of one model input."""

    name: str
    shape: tuple[int | None, ...]
    dtype: np.dtype

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": str(np.dtype(self.dtype))}


class CalibrationSet(Sequence[Sample]):
    """An in-memory list of samples with a content hash.

    Args:
        samples: the samples, each ``{input_name: array}``.
        name: where it came from (folder path or example name), for the report.
    """

    def __init__(self, samples: Iterable[Sample], name: str = "samples") -> None:
        self._samples = [dict(s) for s in samples]
        self.name = name

    def __len__(self) -> int:
        return len(self._samples)

    def __getitem__(self, i: Any) -> Any:
        return self._samples[i]

    def __iter__(self) -> Iterator[Sample]:
        return iter(self._samples)

    def sha256(self) -> str:
        """sha256 over names, dtypes, shapes and bytes of every sample, in order."""
        h = hashlib.sha256()
        for s in self._samples:
            for k in sorted(s):
                a = np.ascontiguousarray(s[k])
                h.update(k.encode())
                h.update(str(a.dtype).encode())
                h.update(str(a.shape).encode())
                h.update(a.tobytes())
        return h.hexdigest()

    def validate(self, inputs: Sequence[InputSpec]) -> None:
        """Check every sample against the model inputs.

        Raises:
            BadInputError: no samples, a missing/extra input name, a shape or dtype mismatch,
                NaN/Inf values. The message names the input and the sample index.
        """
        if not self._samples:
            raise BadInputError(f"calibration set {self.name!r} has no samples; give at least one .npy/.npz sample")
        names = {i.name for i in inputs}
        for idx, s in enumerate(self._samples):
            missing = names - set(s)
            extra = set(s) - names
            if missing or extra:
                raise BadInputError(
                    f"calibration sample {idx} of {self.name!r}: input names {sorted(s)} do not match the "
                    f"model's {sorted(names)}; name files/keys after the model inputs"
                )
            for spec in inputs:
                a = s[spec.name]
                if a.ndim != len(spec.shape) or any(d is not None and d != n for d, n in zip(spec.shape, a.shape)):
                    raise BadInputError(
                        f"calibration sample {idx} of {self.name!r}: input {spec.name!r} has shape "
                        f"{list(a.shape)}, the model expects {list(spec.shape)}; reshape the data"
                    )
                if np.dtype(a.dtype) != np.dtype(spec.dtype):
                    raise BadInputError(
                        f"calibration sample {idx} of {self.name!r}: input {spec.name!r} is {a.dtype}, "
                        f"the model expects {np.dtype(spec.dtype)}; cast the data"
                    )
                if a.dtype.kind == "f" and not np.isfinite(a).all():
                    raise BadInputError(
                        f"calibration sample {idx} of {self.name!r}: input {spec.name!r} contains NaN or Inf; "
                        f"clean the data"
                    )

    def split(self, n: int) -> tuple["CalibrationSet", "CalibrationSet"]:
        return CalibrationSet(self._samples[:n], self.name), CalibrationSet(self._samples[n:], self.name)


NPY_MAGIC = b"\x93NUMPY"
ZIP_MAGIC = b"PK\x03\x04"


def _load_array_file(path: Path) -> dict[str, np.ndarray]:
    try:
        with open(path, "rb") as f:
            head = f.read(6)
    except OSError as e:
        raise BadInputError(f"calibration file {path} cannot be read ({e.strerror}); check its permissions") from None
    expected = ZIP_MAGIC if path.suffix == ".npz" else NPY_MAGIC
    if not head.startswith(expected[: len(head)]) or len(head) < len(expected):
        raise BadInputError(f"calibration file {path} is not a {path.suffix} file written by numpy; "
                            f"save samples with np.save / np.savez")
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        return {"": np.load(path, allow_pickle=False)}
    except ValueError as e:
        if "pickle" in str(e).lower() or "object" in str(e).lower():
            raise BadInputError(
                f"calibration file {path} holds pickled objects, which deployer never loads; "
                f"save plain numeric arrays (np.save / np.savez)"
            ) from None
        raise BadInputError(f"calibration file {path} is not a valid .npy/.npz file ({e}); re-save it") from None
    except (OSError, EOFError) as e:
        raise BadInputError(f"calibration file {path} cannot be read ({e}); re-save it with numpy") from None


def load_folder(folder: str | Path, inputs: Sequence[InputSpec]) -> CalibrationSet:
    """Load a folder of calibration samples.

    Layout (files sorted by name; each file is one sample, or a stack of samples along a leading
    axis when its shape has one more dimension than the input):

    - ``*.npz`` with one key per model input, or
    - ``*.npy`` for a single-input model, or ``<input_name>/*.npy`` subfolders for several inputs.

    Raises:
        BadInputError: missing or empty folder, unreadable or pickled files, mismatching names.
    """
    root = Path(folder)
    if not root.is_dir():
        raise BadInputError(f"calibration folder {root} does not exist; pass --calib DIR with .npy/.npz samples")
    names = [i.name for i in inputs]
    samples: list[Sample] = []
    files = sorted(p for p in root.iterdir() if p.is_file() and p.suffix in (".npy", ".npz"))
    subdirs = [root / n for n in names if (root / n).is_dir()]
    if files:
        for f in files:
            arrays = _load_array_file(f)
            if "" in arrays:
                if len(names) != 1:
                    raise BadInputError(
                        f"calibration file {f} is a bare .npy but the model has inputs {names}; "
                        f"use .npz files keyed by input name or one subfolder per input"
                    )
                arrays = {names[0]: arrays[""]}
            samples.extend(_unstack(arrays, inputs, f))
    elif subdirs:
        if len(subdirs) != len(names):
            raise BadInputError(f"calibration folder {root} needs one subfolder per input {names}")
        per_input = {n: sorted((root / n).glob("*.npy")) for n in names}
        counts = {n: len(v) for n, v in per_input.items()}
        if len(set(counts.values())) != 1:
            raise BadInputError(f"calibration subfolders hold different sample counts {counts}; make them equal")
        for i in range(next(iter(counts.values()))):
            arrays = {n: _load_array_file(per_input[n][i])[""] for n in names}
            samples.extend(_unstack(arrays, inputs, per_input[names[0]][i]))
    if not samples:
        raise BadInputError(f"calibration folder {root} holds no .npy/.npz samples; add at least one")
    cs = CalibrationSet(samples, name=str(root))
    cs.validate(inputs)
    return cs


def _unstack(arrays: dict[str, np.ndarray], inputs: Sequence[InputSpec], src: Path) -> list[Sample]:
    """A file may hold one sample (input rank) or N stacked samples (input rank + 1)."""
    ranks = {i.name: len(i.shape) for i in inputs}
    stacked = [k for k, a in arrays.items() if k in ranks and a.ndim == ranks[k] + 1]
    if not stacked:
        return [arrays]
    if len(stacked) != len(arrays):
        raise BadInputError(f"calibration file {src}: some inputs are stacked and some are not; make them consistent")
    n = {arrays[k].shape[0] for k in stacked}
    if len(n) != 1:
        raise BadInputError(f"calibration file {src}: stacked inputs have different sample counts {sorted(n)}")
    return [{k: arrays[k][i] for k in arrays} for i in range(n.pop())]


def from_iterable(samples: Iterable[Any], inputs: Sequence[InputSpec], name: str = "iterable") -> CalibrationSet:
    """Adapt a Python iterable of dicts (or of arrays, for a single-input model) to a CalibrationSet.

    torch tensors are converted with ``.numpy()``; a ``torch.utils.data.DataLoader`` yielding tensors
    or dicts works as well.
    """
    out: list[Sample] = []
    for s in samples:
        if not isinstance(s, dict):
            if len(inputs) != 1:
                raise BadInputError("calibration samples must be dicts keyed by input name for multi-input models")
            s = {inputs[0].name: s}
        out.append({k: _to_numpy(v) for k, v in s.items()})
    cs = CalibrationSet(out, name=name)
    cs.validate(inputs)
    return cs


def _to_numpy(v: Any) -> np.ndarray:
    if hasattr(v, "detach"):
        v = v.detach().cpu().numpy()
    return np.asarray(v)


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
