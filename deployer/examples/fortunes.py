"""Real labelled short texts from the Debian package ``fortunes`` (DESIGN.md section 5).

Each topic file under ``/usr/share/games/fortunes/`` is a label; its entries are separated by lines
holding only ``%``. Index files (``.dat``), ``.u8`` links and sub-folders (the offensive ``off/``
set) are skipped. A text found in more than one topic is dropped (its label is ambiguous), duplicates
inside a topic are kept once, and only topics with at least :data:`MIN_TEXTS_PER_TOPIC` texts are used.

:func:`split` makes a stratified held-out split and a shuffled training pool from a fixed seed; the
two never share a text.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from deployer.errors import BackendUnavailableError

FORTUNES_DIR = Path("/usr/share/games/fortunes")
MIN_TEXTS_PER_TOPIC = 100
INSTALL_HINT = ("install the Debian package `fortunes` (scripts/install.sh does it; by hand: "
                "`apt-get install fortunes`)")


@dataclass(frozen=True)
class Corpus:
    """Texts with integer labels; ``topics[label]`` is the topic (file) name."""

    texts: list[str]
    labels: np.ndarray
    topics: list[str]


def read_topic(path: str | Path) -> list[str]:
    """Entries of one fortune file, stripped, empty ones dropped, in file order."""
    entries: list[str] = []
    cur: list[str] = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.rstrip("\n").rstrip("\r")
            if line.strip() == "%":
                entries.append("\n".join(cur).strip())
                cur = []
            else:
                cur.append(line)
    entries.append("\n".join(cur).strip())
    return [e for e in entries if e]


def topic_files(directory: str | Path = FORTUNES_DIR) -> dict[str, Path]:
    """Topic name -> file, sorted by name.

    Raises:
        BackendUnavailableError: the folder is missing (the package is not installed).
    """
    d = Path(directory)
    if not d.is_dir():
        raise BackendUnavailableError(f"the minilm example needs real labelled text from {d}, which is missing; "
                                      f"{INSTALL_HINT}")
    out: dict[str, Path] = {}
    for name in sorted(os.listdir(d)):
        p = d / name
        if name.startswith(".") or name.endswith((".dat", ".u8")) or not p.is_file():
            continue
        out[name] = p
    if not out:
        raise BackendUnavailableError(f"{d} holds no fortune files; {INSTALL_HINT}")
    return out


def load_corpus(directory: str | os.PathLike[str] = FORTUNES_DIR, min_texts: int = MIN_TEXTS_PER_TOPIC) -> Corpus:
    """All topics with at least ``min_texts`` unambiguous texts (deterministic order).

    Raises:
        BackendUnavailableError: the package is missing or fewer than two topics qualify.
    """
    per_topic = {name: list(dict.fromkeys(read_topic(p))) for name, p in topic_files(Path(directory)).items()}
    owners = Counter(t for texts in per_topic.values() for t in texts)
    texts: list[str] = []
    labels: list[int] = []
    topics: list[str] = []
    for name, entries in per_topic.items():
        unique = [t for t in entries if owners[t] == 1]
        if len(unique) < min_texts:
            continue
        texts.extend(unique)
        labels.extend([len(topics)] * len(unique))
        topics.append(name)
    if len(topics) < 2:
        raise BackendUnavailableError(f"{directory}: fewer than two topics with {min_texts} texts; {INSTALL_HINT}")
    return Corpus(texts, np.asarray(labels, dtype=np.int64), topics)


def split(labels: np.ndarray, n_heldout: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified held-out indices (``n_heldout``) and the shuffled remaining (training) indices.

    Deterministic for a given ``seed``; the two index sets are disjoint.
    """
    n = len(labels)
    if not 0 < n_heldout < n:
        raise ValueError(f"n_heldout must be in 1..{n - 1}, got {n_heldout}")
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    # Largest-remainder allocation of the held-out quota over the classes (proportional, sums exactly).
    quota = counts * n_heldout / n
    take = np.floor(quota).astype(int)
    rest = n_heldout - int(take.sum())
    if rest:
        take[np.argsort(-(quota - take), kind="stable")[:rest]] += 1
    held: list[np.ndarray] = []
    train: list[np.ndarray] = []
    for c, k in zip(classes, take):
        idx = rng.permutation(np.flatnonzero(labels == c))
        held.append(idx[:k])
        train.append(idx[k:])
    return rng.permutation(np.concatenate(held)), rng.permutation(np.concatenate(train))
