"""Teacher-vs-student evaluation on the held-out split and the ``distill_report.json`` contents.

Classification: label accuracy of teacher and student (when labels exist), the student's accuracy
relative to the teacher's, and top-1 agreement. Embeddings: mean cosine between student and teacher
embeddings, and topic accuracy under the minilm example's probe protocol (a scikit-learn
``LogisticRegression``, ``C`` = :data:`deployer.examples.minilm.PROBE_C`, trained on each model's own
embeddings of the probe-training texts), plus the teacher's probe applied to the student's embeddings.
Sizes: parameter counts, ONNX bytes, state-dict bytes.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from deployer.distill.data import Source


def forward_batched(module: nn.Module, data: dict[str, torch.Tensor], batch: int = 64,
                    rows: np.ndarray | None = None) -> np.ndarray:
    """Outputs of ``module`` on the samples of ``data`` (axis 0), float32 ``[N, ...]``, in order.

    Token inputs (``attention_mask`` present) are sorted by length and trimmed to each batch's longest
    text, which changes nothing in a masked encoder and saves most of the compute.
    """
    n = len(next(iter(data.values())))
    rows_ = np.arange(n) if rows is None else np.asarray(rows)
    # a frozen teacher's outputs never change: cached on the module itself, keyed by the data tensor it holds
    frozen = not any(p.requires_grad for p in module.parameters())
    first = next(iter(data.values()))
    cache: dict[bytes, tuple[torch.Tensor, np.ndarray]] = module.__dict__.setdefault("_distill_outputs", {})
    hit = cache.get(rows_.tobytes()) if frozen else None
    if hit is not None and hit[0] is first:
        return hit[1]
    pos = np.arange(len(rows_))  # output positions, processed in order of text length
    mask = data.get("attention_mask")
    if mask is not None:
        lengths = mask[torch.from_numpy(rows_)].sum(dim=1).numpy()
        pos = pos[np.argsort(lengths, kind="stable")]
    outs: list[np.ndarray] = []
    module.eval()
    with torch.inference_mode():
        for s in range(0, len(pos), batch):
            r = torch.from_numpy(rows_[pos[s:s + batch]])
            args = [v[r] for v in data.values()]
            if mask is not None:
                width = max(1, int(mask[r].sum(dim=1).max()))
                args = [a[:, :width] for a in args]
            outs.append(module(*args).float().numpy())
    res = np.concatenate(outs)
    out = np.empty_like(res)
    out[pos] = res
    if frozen:
        cache[rows_.tobytes()] = (first, out)
    return out


def onnx_bytes(module: nn.Module, example: dict[str, np.ndarray], output_names: list[str]) -> int:
    """Size of the module's ONNX export (opset 17, one file)."""
    import contextlib
    import warnings

    from deployer.model_io import export_torch

    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        return len(export_torch(module, example, output_names).SerializeToString())


def state_dict_bytes(module: nn.Module) -> int:
    buf = io.BytesIO()
    torch.save(module.state_dict(), buf)
    return buf.getbuffer().nbytes


def make_probe(embeddings: np.ndarray, labels: np.ndarray, seed: int) -> Any:
    """The minilm example's probe protocol on given embeddings (fitted ``LogisticRegression``)."""
    from sklearn.linear_model import LogisticRegression

    from deployer.examples.minilm import PROBE_C

    return LogisticRegression(C=PROBE_C, max_iter=1000, random_state=seed).fit(embeddings, labels)


def evaluate(source: Source, teacher: nn.Module, student: nn.Module, seed: int
             ) -> tuple[dict[str, Any], Callable[[list[list[np.ndarray]]], dict[str, float]] | None]:
    """Held-out fidelity of the student vs the teacher, and the task metric for the student's ``deploy``.

    Returns (the report's ``fidelity`` section, metric over per-sample artifact outputs or None).
    """
    t_out = forward_batched(teacher, source.heldout)
    s_out = forward_batched(student, source.heldout)
    fid: dict[str, Any] = {"heldout_samples": int(len(t_out))}
    metric: Callable[[list[list[np.ndarray]]], dict[str, float]] | None = None
    labels = source.heldout_labels.numpy() if source.heldout_labels is not None else None
    if source.kind == "classification":
        tp, sp = t_out.argmax(-1), s_out.argmax(-1)
        fid["top1_agreement"] = round(float(np.mean(tp == sp)), 6)
        if labels is not None:
            ta, sa = float(np.mean(tp == labels)), float(np.mean(sp == labels))
            fid.update({"teacher_accuracy": round(ta, 6), "student_accuracy": round(sa, 6),
                        "student_accuracy_relative": round(sa / ta, 6) if ta else None})
            lab = labels

            def label_accuracy(outputs: list[list[np.ndarray]]) -> dict[str, float]:
                pred = np.array([int(np.argmax(o[0])) for o in outputs])
                return {"label_accuracy": float(np.mean(pred == lab[: len(pred)]))}

            metric = label_accuracy
        return fid, metric
    t = t_out.reshape(len(t_out), -1)
    s = s_out.reshape(len(s_out), -1)
    cos = np.sum(t * s, 1) / np.maximum(np.linalg.norm(t, axis=1) * np.linalg.norm(s, axis=1), 1e-12)
    fid.update({"cosine_mean": round(float(np.mean(cos)), 6), "cosine_min": round(float(np.min(cos)), 6)})
    if source.probe is not None and labels is not None:
        rows, plabels = source.probe["rows"], source.probe["labels"]
        t_train = forward_batched(teacher, source.train, rows=rows).reshape(len(rows), -1)
        s_train = forward_batched(student, source.train, rows=rows).reshape(len(rows), -1)
        t_probe, s_probe = make_probe(t_train, plabels, seed), make_probe(s_train, plabels, seed)
        fid.update({
            "teacher_topic_accuracy": round(float(np.mean(t_probe.predict(t) == labels)), 6),
            "student_topic_accuracy": round(float(np.mean(s_probe.predict(s) == labels)), 6),
            "student_topic_accuracy_teacher_probe": round(float(np.mean(t_probe.predict(s) == labels)), 6),
            "probe": f"LogisticRegression per model on its own embeddings of {len(rows)} training texts "
                     f"(the minilm example's protocol); *_teacher_probe: the teacher's probe on student embeddings",
        })
        fid["student_topic_accuracy_relative"] = round(fid["student_topic_accuracy"] / fid["teacher_topic_accuracy"], 6) \
            if fid["teacher_topic_accuracy"] else None
        lab2 = labels

        def task_accuracy(outputs: list[list[np.ndarray]]) -> dict[str, float]:
            emb = np.concatenate([np.asarray(o[0]).reshape(1, -1) for o in outputs])
            emb = np.nan_to_num(emb, nan=0.0, posinf=0.0, neginf=0.0)
            return {"task_accuracy": round(float(np.mean(s_probe.predict(emb) == lab2[: len(emb)])), 6)}

        metric = task_accuracy
    return fid, metric
