"""Calibration datasets: the one protocol every part of deployer speaks.

A calibration set is a finite, re-iterable sequence of samples; a sample is ``dict[input_name,
np.ndarray]`` with the model's input shapes (batch dimension included) and dtypes. Adapters turn
folders of ``.npy``/``.npz`` files and Python iterables into it. Backends adapt it to their own form
(TFLite representative dataset, TensorRT/ATC inputs). Pattern: ONNX Runtime ``CalibrationDataReader``,
Polygraphy ``DataLoader``.

A set is either in memory (a list of samples) or *lazy*: a length plus a loader ``load(i) -> sample``
called on access (files read, crops cut, texts tokenized when sample ``i`` is needed, then dropped).
Memory then does not grow with the number of samples: :func:`calibration.collect.collect_statistics`
streams through the set one sample at a time. Slices, :meth:`CalibrationSet.split` and
:meth:`CalibrationSet.select` are lazy views over the same loader.

Loading never unpickles (``allow_pickle=False``): an object array is refused.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from deployer.errors import BadInputError

Sample = dict[str, np.ndarray]
Loader = Callable[[int], Sample]


@dataclass(frozen=True)
class InputSpec:
    """Name, shape (None for a dynamic dim) and numpy dtype of one model input."""

    name: str
    shape: tuple[int | None, ...]
    dtype: np.dtype

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": str(np.dtype(self.dtype))}


def check_sample(s: Sample, idx: int, inputs: Sequence[InputSpec], name: str) -> None:
    """Check one sample against the model inputs.

    Raises:
        BadInputError: a missing/extra input name, a shape or dtype mismatch, NaN/Inf values. The
            message names the input and the sample index.
    """
    names = {i.name for i in inputs}
    missing = names - set(s)
    extra = set(s) - names
    if missing or extra:
        raise BadInputError(
            f"calibration sample {idx} of {name!r}: input names {sorted(s)} do not match the "
            f"model's {sorted(names)}; name files/keys after the model inputs"
        )
    for spec in inputs:
        a = s[spec.name]
        if a.ndim != len(spec.shape) or any(d is not None and d != n for d, n in zip(spec.shape, a.shape)):
            raise BadInputError(
                f"calibration sample {idx} of {name!r}: input {spec.name!r} has shape "
                f"{list(a.shape)}, the model expects {list(spec.shape)}; reshape the data"
            )
        if np.dtype(a.dtype) != np.dtype(spec.dtype):
            raise BadInputError(
                f"calibration sample {idx} of {name!r}: input {spec.name!r} is {a.dtype}, "
                f"the model expects {np.dtype(spec.dtype)}; cast the data"
            )
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            raise BadInputError(
                f"calibration sample {idx} of {name!r}: input {spec.name!r} contains NaN or Inf; "
                f"clean the data"
            )


def hash_sample(h: Any, s: Sample) -> None:
    """Feed one sample (names, dtypes, shapes, bytes; names sorted) into a hashlib object."""
    for k in sorted(s):
        a = np.ascontiguousarray(s[k])
        h.update(k.encode())
        h.update(str(a.dtype).encode())
        h.update(str(a.shape).encode())
        h.update(a.tobytes())


class CalibrationSet(Sequence[Sample]):
    """A finite sequence of samples with a content hash, held in memory or loaded on access.

    Args:
        samples: the samples, each ``{input_name: array}`` (kept in memory). Use :meth:`lazy` for a
            set that loads samples on access.
        name: where it came from (folder path or example name), for the report.

    Indexing with an int returns a sample (a lazy set loads it; an in-memory set returns the stored
    dict); a slice returns a :class:`CalibrationSet` view (lazy sets stay lazy).
    """

    def __init__(self, samples: Iterable[Sample] = (), name: str = "samples") -> None:
        self._items: list[Sample] | None = [dict(s) for s in samples]
        self._load: Loader = self._items.__getitem__
        self._index: Sequence[int] = range(len(self._items))
        self._fingerprint: str | None = None
        self._specs: tuple[InputSpec, ...] | None = None  # checked on access (lazy sets validated lazily)
        self._sha: str | None = None
        self.name = name

    @classmethod
    def lazy(cls, length: int, load: Loader, name: str = "samples", fingerprint: str | None = None
             ) -> "CalibrationSet":
        """A set of ``length`` samples, sample ``i`` produced by ``load(i)`` each time it is accessed.

        Args:
            length: number of samples (>= 0).
            load: ``i -> sample`` for ``0 <= i < length``; must be deterministic (same ``i``, same
                sample) and may be called any number of times.
            name: for the report.
            fingerprint: a string that identifies the content (e.g. file hashes + generator spec +
                seed + count); :meth:`sha256` then hashes it instead of streaming every sample.
                None: :meth:`sha256` streams the samples once (memory stays constant).
        """
        cs = cls((), name)
        cs._items = None
        cs._load = load
        cs._index = range(int(length))
        cs._fingerprint = fingerprint
        return cs

    @property
    def is_lazy(self) -> bool:
        """True when samples are loaded on access rather than held in memory."""
        return self._items is None

    @property
    def reads_files(self) -> bool:
        """True for a folder set (:func:`load_folder`, :func:`spill_to_folder`) and its views: its
        pickle holds file paths, not samples (what a Ray task receives)."""
        return self._items is None and isinstance(self._load, _FolderLoader)

    def _view(self, index: Sequence[int]) -> "CalibrationSet":
        cs = CalibrationSet((), self.name)
        cs._items, cs._load, cs._index, cs._specs = self._items, self._load, index, self._specs
        if self._fingerprint is not None:
            if list(index) == list(self._index):
                cs._fingerprint = self._fingerprint
            else:
                ih = hashlib.sha256(np.asarray(list(index), np.int64).tobytes()).hexdigest()
                cs._fingerprint = f"{self._fingerprint}|view:{ih}"
        return cs

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return self._view(self._index[i])
        pos = int(i)
        j = int(self._index[pos])  # IndexError past the end, as for a list
        s = self._load(j)
        if self._specs is not None:
            check_sample(s, pos if pos >= 0 else pos + len(self), self._specs, self.name)
        return s

    def __iter__(self) -> Iterator[Sample]:
        for i in range(len(self)):
            yield self[i]

    def select(self, indices: Sequence[int] | np.ndarray) -> "CalibrationSet":
        """A view of the samples at ``indices`` (in that order), lazy when this set is."""
        n = len(self)
        idx = [int(k) for k in indices]
        bad = [k for k in idx if not -n <= k < n]
        if bad:
            raise IndexError(f"calibration sample index {bad[0]} out of range for {n} samples")
        return self._view([int(self._index[k]) for k in idx])

    def shuffled(self, seed: int) -> "CalibrationSet":
        """A view in a seeded random order (``np.random.default_rng(seed).permutation``)."""
        return self.select(np.random.default_rng(seed).permutation(len(self)))

    def sha256(self) -> str:
        """sha256 of the content, computed once and remembered.

        In-memory sets and lazy sets without a fingerprint: over names, dtypes, shapes and bytes of every
        sample, in order (streamed: a lazy set loads one sample at a time). Lazy sets with a
        fingerprint: over the fingerprint (it names the content, e.g. file hashes and a generator spec).
        """
        if self._sha is None:
            h = hashlib.sha256()
            if self._fingerprint is not None:
                h.update(b"calibration-fingerprint:" + self._fingerprint.encode())
            else:
                for s in self:
                    hash_sample(h, s)
            self._sha = h.hexdigest()
        return self._sha

    def validate(self, inputs: Sequence[InputSpec], full: bool = True) -> None:
        """Check samples against the model inputs.

        Args:
            inputs: the model inputs.
            full: check every sample now (a lazy set streams through them, keeping none). False: check
                the first sample now and every other one when it is accessed (for generated sets whose
                shapes are fixed by their spec).

        Raises:
            BadInputError: no samples, a missing/extra input name, a shape or dtype mismatch,
                NaN/Inf values. The message names the input and the sample index.
        """
        if not len(self):
            raise BadInputError(f"calibration set {self.name!r} has no samples; give at least one .npy/.npz sample")
        specs = tuple(inputs)
        if not full:
            check_sample(self[0], 0, specs, self.name)
            self._specs = specs
            return
        for idx, s in enumerate(self):
            check_sample(s, idx, specs, self.name)

    def split(self, n: int) -> tuple["CalibrationSet", "CalibrationSet"]:
        """The first ``n`` samples and the rest (views)."""
        return self[:n], self[n:]


NPY_MAGIC = b"\x93NUMPY"
ZIP_MAGIC = b"PK\x03\x04"


def _load_array_file(path: Path, mmap: bool = False) -> dict[str, np.ndarray]:
    """``{key: array}`` of a ``.npz`` (``{"": array}`` for a ``.npy``; memory-mapped read-only if ``mmap``).

    Raises:
        BadInputError: unreadable, not written by numpy, pickled objects, corrupt.
    """
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
        return {"": np.load(path, allow_pickle=False, mmap_mode="r" if mmap else None)}
    except ValueError as e:
        if "pickle" in str(e).lower() or "object" in str(e).lower():
            raise BadInputError(
                f"calibration file {path} holds pickled objects, which deployer never loads; "
                f"save plain numeric arrays (np.save / np.savez)"
            ) from None
        raise BadInputError(f"calibration file {path} is not a valid .npy/.npz file ({e}); re-save it") from None
    except (OSError, EOFError) as e:
        raise BadInputError(f"calibration file {path} cannot be read ({e}); re-save it with numpy") from None


class _FolderLoader:
    """Sample ``i`` of a ``.npy``/``.npz`` folder, read from its file(s) when asked for.

    ``entries[i]`` is ``(files, row)``: ``files`` maps input name (``""`` for a bare ``.npy`` of a
    single-input model) to the file path and the key inside it; ``row`` is the index into a stacked
    file, or None. ``.npy`` files are memory-mapped and only the needed row is copied out; the last
    ``.npz`` read is kept (so a stacked ``.npz`` is read once per pass), nothing else is.
    """

    def __init__(self, names: list[str]) -> None:
        self.names = names
        self.entries: list[tuple[tuple[tuple[str, Path, str], ...], int | None]] = []
        self._last: tuple[Path, dict[str, np.ndarray]] | None = None

    def _arrays(self, path: Path) -> dict[str, np.ndarray]:
        if path.suffix == ".npz":
            if self._last is None or self._last[0] != path:
                self._last = (path, _load_array_file(path))
            return self._last[1]
        return _load_array_file(path, mmap=True)

    def __getstate__(self) -> dict[str, Any]:
        return {"names": self.names, "entries": self.entries, "_last": None}  # paths only, never the cached arrays

    def __call__(self, i: int) -> Sample:
        files, row = self.entries[i]
        out: Sample = {}
        for name, path, key in files:
            a = self._arrays(path)[key]
            out[name] = np.array(a if row is None else a[row])  # a copy: no view of a map or cached file
        return out


def load_folder(folder: str | Path, inputs: Sequence[InputSpec]) -> CalibrationSet:
    """Load a folder of calibration samples, lazily.

    Layout (files sorted by name; each file is one sample, or a stack of samples along a leading
    axis when its shape has one more dimension than the input):

    - ``*.npz`` with one key per model input, or
    - ``*.npy`` for a single-input model, or ``<input_name>/*.npy`` subfolders for several inputs.

    Every file is read once here (one at a time) to count and check its samples; the returned set
    then reads sample ``i`` from its file when it is accessed, so memory does not grow with the
    number of samples. Its :meth:`CalibrationSet.sha256` streams the samples (the same hash as an
    in-memory set with that content).

    Raises:
        BadInputError: missing or empty folder, unreadable or pickled files, mismatching names,
            shapes or dtypes, NaN/Inf (naming the input and the sample index).
    """
    root = check_calibration_folder(folder)
    names = [i.name for i in inputs]
    name = str(root)
    loader = _FolderLoader(names)
    files = sample_files(root, (".npy", ".npz"))
    subdirs = [root / n for n in names if (root / n).is_dir()]

    def add(arrays: dict[str, np.ndarray], paths: dict[str, tuple[Path, str]], src: Path) -> None:
        rows = _stack_rows(arrays, inputs, src)
        for r in ([None] if rows is None else range(rows)):
            idx = len(loader.entries)
            check_sample({k: (a if r is None else a[r]) for k, a in arrays.items()}, idx, inputs, name)
            loader.entries.append((tuple((k, *paths[k]) for k in sorted(paths)), r))

    if files:
        for f in files:
            arrays = _load_array_file(f, mmap=True)
            if "" in arrays:
                if len(names) != 1:
                    raise BadInputError(
                        f"calibration file {f} is a bare .npy but the model has inputs {names}; "
                        f"use .npz files keyed by input name or one subfolder per input"
                    )
                add({names[0]: arrays[""]}, {names[0]: (f, "")}, f)
            else:
                add(arrays, {k: (f, k) for k in arrays}, f)
            del arrays
    elif subdirs:
        if len(subdirs) != len(names):
            raise BadInputError(f"calibration folder {root} needs one subfolder per input {names}")
        per_input = {n: sample_files(root / n, (".npy",), root) for n in names}
        counts = {n: len(v) for n, v in per_input.items()}
        if len(set(counts.values())) != 1:
            raise BadInputError(f"calibration subfolders hold different sample counts {counts}; make them equal")
        for i in range(next(iter(counts.values()))):
            arrays = {n: _load_array_file(per_input[n][i], mmap=True)[""] for n in names}
            add(arrays, {n: (per_input[n][i], "") for n in names}, per_input[names[0]][i])
            del arrays
    if not loader.entries:
        raise BadInputError(f"calibration folder {root} holds no .npy/.npz samples; add at least one")
    return CalibrationSet.lazy(len(loader.entries), loader, name=name)


def spill_to_folder(samples: CalibrationSet, folder: str | Path) -> CalibrationSet:
    """Write ``samples`` to ``folder`` (created), one ``<index>.npz`` per sample keyed by input name,
    and return the lazy folder set reading them (same samples, same order, same dtypes).

    Raises:
        BadInputError: the folder cannot be written.
    """
    root = Path(folder)
    loader = _FolderLoader([])
    try:
        root.mkdir(parents=True, exist_ok=True)
        for i, s in enumerate(samples):
            path = root / f"{i:07d}.npz"
            arrays: dict[str, Any] = {k: np.asarray(v) for k, v in s.items()}
            np.savez(path, **arrays)
            loader.entries.append((tuple((k, path, k) for k in sorted(s)), None))
    except OSError as e:
        raise BadInputError(f"cannot write calibration samples to {root} ({e.strerror}); choose a writable "
                            f"shared folder") from None
    loader.names = sorted({k for files, _ in loader.entries for k, _p, _k in files})
    return CalibrationSet.lazy(len(loader.entries), loader, name=samples.name)


def _stack_rows(arrays: dict[str, np.ndarray], inputs: Sequence[InputSpec], src: Path) -> int | None:
    """A file holds one sample (input rank: None) or N stacked samples (input rank + 1: N)."""
    ranks = {i.name: len(i.shape) for i in inputs}
    stacked = [k for k, a in arrays.items() if k in ranks and a.ndim == ranks[k] + 1]
    if not stacked:
        return None
    if len(stacked) != len(arrays):
        raise BadInputError(f"calibration file {src}: some inputs are stacked and some are not; make them consistent")
    n = {arrays[k].shape[0] for k in stacked}
    if len(n) != 1:
        raise BadInputError(f"calibration file {src}: stacked inputs have different sample counts {sorted(n)}")
    return n.pop()


def from_iterable(samples: Iterable[Any], inputs: Sequence[InputSpec], name: str = "iterable") -> CalibrationSet:
    """Adapt Python samples (dicts, or arrays for a single-input model) to a CalibrationSet.

    - A :class:`CalibrationSet` is validated and returned as is (lazy sets stay lazy).
    - A sequence with ``len`` and integer indexing (a list, a ``torch.utils.data.Dataset`` with
      ``__len__``) becomes a lazy set: item ``i`` is converted when accessed.
    - A zero-argument callable returning a fresh iterator each time (a generator factory) is streamed
      once to count and check its samples, then becomes a lazy set that re-runs the factory on
      access (sequential access is cheap; random access costs a pass up to that index).
    - Any other iterable (a generator, a ``torch.utils.data.DataLoader``) is read into memory.

    torch tensors are converted with ``.detach().cpu().numpy()``.

    Raises:
        BadInputError: no samples, non-dict samples for a multi-input model, names/shapes/dtypes that
            do not match ``inputs``, NaN/Inf.
    """
    specs = tuple(inputs)

    def convert(s: Any) -> Sample:
        if not isinstance(s, dict):
            if len(specs) != 1:
                raise BadInputError("calibration samples must be dicts keyed by input name for multi-input models")
            s = {specs[0].name: s}
        return {k: _to_numpy(v) for k, v in s.items()}

    if isinstance(samples, CalibrationSet):
        samples.validate(specs)
        return samples
    if callable(samples) and not hasattr(samples, "__iter__"):
        factory = samples
        count = 0
        for count, s in enumerate(factory(), 1):
            check_sample(convert(s), count - 1, specs, name)
        loader = _FactoryLoader(factory, convert)
        cs = CalibrationSet.lazy(count, loader, name=name)
    elif hasattr(samples, "__len__") and hasattr(samples, "__getitem__") and not isinstance(samples, dict) \
            and not hasattr(samples, "batch_size"):  # a DataLoader has len() but is not indexable
        seq = samples
        cs = CalibrationSet.lazy(len(seq), lambda i: convert(seq[i]), name=name)  # type: ignore[arg-type,index]
    else:
        cs = CalibrationSet([convert(s) for s in samples], name=name)
    cs.validate(specs)
    return cs


class _FactoryLoader:
    """Sample ``i`` of a generator factory: continues the current pass when ``i`` is next, else restarts."""

    def __init__(self, factory: Callable[[], Iterable[Any]], convert: Callable[[Any], Sample]) -> None:
        self.factory, self.convert = factory, convert
        self._it: Iterator[Any] | None = None
        self._pos = 0

    def __call__(self, i: int) -> Sample:
        if self._it is None or i < self._pos:
            self._it, self._pos = iter(self.factory()), 0
        for _ in range(i - self._pos):
            next(self._it)
        self._pos = i + 1
        try:
            return self.convert(next(self._it))
        except StopIteration:
            raise BadInputError(f"the calibration generator yields fewer samples than its first pass ({i})") from None


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


def check_calibration_folder(folder: str | Path) -> Path:
    """``--calib DIR`` before any model work: it must resolve (no symlink loop) to an existing folder.

    Raises:
        BadInputError: a symlink loop (``ln -s loop loop``), a missing path or dangling link, or a file.
    """
    root = Path(folder)
    try:
        root.resolve(strict=True)
    except FileNotFoundError:
        raise BadInputError(f"calibration folder {root} does not exist; pass --calib DIR with .npy/.npz samples") from None
    except (RuntimeError, OSError) as e:  # ELOOP: RuntimeError before Python 3.13, OSError after
        raise BadInputError(f"calibration folder {root} is a symlink loop ({_why(e)}); pass --calib the real folder "
                            f"that holds the .npy/.npz samples") from None
    if not root.is_dir():
        raise BadInputError(f"calibration path {root} is not a folder; pass --calib DIR with .npy/.npz samples")
    return root


def _why(e: BaseException) -> str:
    return getattr(e, "strerror", None) or " ".join(str(e).split()) or type(e).__name__


def sample_files(folder: Path, suffixes: tuple[str, ...], root: Path | None = None, recursive: bool = False
                 ) -> list[Path]:
    """The sample files (by suffix, case-insensitive) of a calibration folder, sorted by path.

    A sample that is a symlink must resolve to a file inside the calibration folder ``root`` (default
    ``folder``): a loop, a dangling link or a link pointing outside is an error naming the file, never
    a silent skip (issue 22: looping links were skipped with exit 0).

    Raises:
        BadInputError: the first such link.
    """
    base = (root or folder).resolve()
    found = folder.rglob("*") if recursive else folder.iterdir()
    out = []
    for p in sorted(found):
        if p.suffix.lower() not in suffixes:
            continue
        if p.is_symlink():
            try:
                target = p.resolve(strict=True)
            except FileNotFoundError:
                raise BadInputError(f"calibration file {p} is a dangling symlink (its target is gone); remove it or "
                                    f"put the sample file there") from None
            except (RuntimeError, OSError) as e:
                raise BadInputError(f"calibration file {p} is a symlink loop ({_why(e)}); remove it or replace it by "
                                    f"the sample file") from None
            if base not in target.parents:
                raise BadInputError(f"calibration file {p} is a symlink to {target}, outside the calibration folder "
                                    f"{base}; copy the sample into the folder (or pass --calib the folder that "
                                    f"holds it)")
        if p.is_file():
            out.append(p)
    return out
