"""Every output judged with the metric that fits what it is, and the fidelity floor.

An artifact's outputs are compared with the FP32 reference's on the same held-out samples. Each output
first gets a *kind*, read from the task and from the reference values (never from the artifact):

========================  ==========================================================  ==================
kind                      recognised by                                               primary metric
========================  ==========================================================  ==================
``class_scores``          output 0 of a classification task, or a rank-2 ``[N, C]``   ``top1_agreement``
                          output (C >= 2) whose rows are probability distributions
``embedding``             output 0 of an embedding task                               ``cosine``
``sequence``              rank-3 ``[N, T, C]`` (C >= 2) whose last axis is a          ``step_agreement``
                          distribution per step (CTC recognizers, taggers)
``state``                 recurrent state: the name says state/hidden/cell, or a      ``sqnr_db``
                          graph input has the same name stem and shape
``map``                   rank >= 3 with values in [0, 1] (probability/heat maps)     ``sqnr_db``
``regression``            everything else (boxes, landmarks, one-element outputs)     ``sqnr_db``
========================  ==========================================================  ==================

Every output also gets ``cosine`` (mean per-sample cosine similarity), ``sqnr_db``
(``10 log10(sum ref^2 / sum (ref - out)^2)``, null when identical) and ``max_abs_error``. The summary of
a target is its *worst* output (lowest cosine, lowest SQNR), never the first one. Agreement metrics on
fewer than :data:`MIN_SAMPLES` samples carry a 95% Wilson confidence interval and a warning.

The floor (:class:`FidelityFloor`, on by default: cosine >= 0.99 and SQNR >= 20 dB on every output, and
top-1 agreement >= 0.97 on class scores judged on at least 30 samples) is what an artifact must reach
against FP32 to ship. 20 dB SQNR is a noise power of 1% of the signal; a
cosine of 0.99 is the embedding goal of this project's issues and about 17 dB for zero-mean signals.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from deployer.errors import BadInputError

MIN_SAMPLES = 30
"""Below this many held-out samples, agreement metrics get a confidence interval and a warning."""

KINDS = ("class_scores", "embedding", "sequence", "state", "map", "regression")
PRIMARY = {"class_scores": "top1_agreement", "embedding": "cosine", "sequence": "step_agreement",
           "state": "sqnr_db", "map": "sqnr_db", "regression": "sqnr_db"}
_STATE_NAME = re.compile(r"(^|[^a-z])((state|hidden|cell)(n|s)?|hn|cn|h_n|c_n|h0|c0)([^a-z0-9]|$)", re.IGNORECASE)


@dataclass(frozen=True)
class FidelityFloor:
    """Minimum fidelity against FP32 on every output for an artifact to ship.

    Attributes:
        cosine: minimum mean per-sample cosine similarity (default 0.99).
        sqnr_db: minimum SQNR in dB (default 20 dB: noise at 1% of the signal's power).
        top1_agreement: minimum top-1 agreement of class-score outputs (default 0.97, the issues' goal for
            classifiers), judged only on at least :data:`MIN_SAMPLES` samples (fewer: too coarse to gate on).
    """

    cosine: float = 0.99
    sqnr_db: float = 20.0
    top1_agreement: float = 0.97

    def __post_init__(self) -> None:
        if not (math.isfinite(self.cosine) and -1.0 <= self.cosine <= 1.0):
            raise BadInputError(f"--min-fidelity cosine={self.cosine}: give a cosine in [-1, 1], e.g. cosine=0.99")
        if not math.isfinite(self.sqnr_db):
            raise BadInputError(f"--min-fidelity sqnr_db={self.sqnr_db}: give a finite number of dB, e.g. sqnr_db=20")
        if not (math.isfinite(self.top1_agreement) and 0.0 <= self.top1_agreement <= 1.0):
            raise BadInputError(f"--min-fidelity top1_agreement={self.top1_agreement}: give a fraction in [0, 1]")

    @classmethod
    def parse(cls, spec: str | float | dict[str, float] | FidelityFloor | None) -> FidelityFloor:
        """``"cosine=0.99,sqnr_db=20,top1_agreement=0.97"``, a dict with those keys, or a bare number (a cosine).

        Raises:
            BadInputError: unknown key or a value that is not a number.
        """
        if spec is None:
            return cls()
        if isinstance(spec, FidelityFloor):
            return spec
        if isinstance(spec, (int, float)) and not isinstance(spec, bool):
            return cls(cosine=float(spec))
        items: list[tuple[str, Any]]
        if isinstance(spec, dict):
            items = list(spec.items())
        elif isinstance(spec, str):
            items = []
            for part in (p.strip() for p in spec.split(",") if p.strip()):
                if "=" not in part:
                    try:
                        items.append(("cosine", float(part)))
                        continue
                    except ValueError:
                        raise BadInputError(f"--min-fidelity {spec!r}: write cosine=0.99,sqnr_db=20") from None
                k, v = part.split("=", 1)
                items.append((k.strip(), v.strip()))
        else:
            raise BadInputError(f"min_fidelity {spec!r}: give 'cosine=0.99,sqnr_db=20', a dict or a number")
        values: dict[str, float] = {}
        for k, raw in items:
            if k not in ("cosine", "sqnr_db", "top1_agreement"):
                raise BadInputError(f"--min-fidelity: unknown key {k!r}; use cosine=..., sqnr_db=..., "
                                    f"top1_agreement=...")
            try:
                values[k] = float(raw)
            except (TypeError, ValueError):
                raise BadInputError(f"--min-fidelity {k}={raw!r}: not a number") from None
        return cls(**values)

    def to_dict(self) -> dict[str, float]:
        return {"cosine": self.cosine, "sqnr_db": self.sqnr_db, "top1_agreement": self.top1_agreement}


def _stack(rows: Sequence[np.ndarray]) -> np.ndarray:
    """Per-sample outputs as one array; samples of different shapes become one flat row each."""
    if len({np.shape(r)[1:] for r in rows}) <= 1 and all(np.ndim(r) >= 1 for r in rows):
        return np.concatenate([np.asarray(r, np.float64) for r in rows])
    return np.concatenate([np.ravel(np.asarray(r, np.float64))[None] for r in rows], axis=1)


def _is_distribution(a: np.ndarray, axis: int = -1) -> bool:
    if a.size == 0 or a.shape[axis] < 2 or np.min(a) < -1e-6:
        return False
    return bool(np.allclose(np.sum(a, axis=axis), 1.0, atol=1e-3))


def output_kind(name: str, ref: np.ndarray, index: int, task: str, input_shapes: dict[str, tuple[int, ...]]) -> str:
    """The kind of one output (see the module table) from its name, FP32 values ``ref`` and the task."""
    if index == 0 and task == "classification":
        return "class_scores"
    if index == 0 and task == "embedding":
        return "embedding"
    stem = re.sub(r"(out(put)?|new|next|_|\.|:|\d)+", "", name.lower())
    if _STATE_NAME.search(name) or any(
            stem and stem == re.sub(r"(in(put)?|prev|old|_|\.|:|\d)+", "", n.lower()) and shape[1:] == ref.shape[1:]
            for n, shape in input_shapes.items()):
        return "state"
    if ref.ndim == 2 and ref.shape[1] >= 2 and _is_distribution(ref):
        return "class_scores"
    if ref.ndim == 3 and ref.shape[2] >= 2 and _is_distribution(ref):
        return "sequence"
    if ref.ndim >= 3 and ref.size and float(np.min(ref)) >= 0.0 and float(np.max(ref)) <= 1.0:
        return "map"
    return "regression"


def sqnr(ref: np.ndarray, out: np.ndarray) -> float:
    """SQNR in dB; +inf when identical."""
    noise = float(np.sum((ref - out) ** 2))
    if noise == 0.0:
        return float("inf")
    return 10.0 * math.log10(max(float(np.sum(ref ** 2)), 1e-30) / noise)


def cosine(ref: np.ndarray, out: np.ndarray) -> float:
    """Mean per-sample cosine similarity; a sample that is zero in both counts as 1."""
    r = ref.reshape(ref.shape[0], -1)
    o = out.reshape(out.shape[0], -1)
    nr, no = np.linalg.norm(r, axis=1), np.linalg.norm(o, axis=1)
    cos = np.sum(r * o, axis=1) / np.maximum(nr * no, 1e-30)
    cos = np.where((nr == 0) & (no == 0), 1.0, cos)
    return float(np.mean(cos))


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (Wilson 1927), for agreement on few samples."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return max(0.0, centre - half), min(1.0, centre + half)


def judge_output(kind: str, ref: np.ndarray, out: np.ndarray) -> dict[str, Any]:
    """One output's record: kind, primary metric name and value, cosine, sqnr_db, max_abs_error, samples."""
    if ref.shape != out.shape:
        raise BadInputError(f"artifact output of shape {out.shape} does not match FP32's {ref.shape}")
    sq = sqnr(ref, out)
    rec: dict[str, Any] = {"kind": kind, "cosine": round(cosine(ref, out), 6),
                           "sqnr_db": round(sq, 3) if math.isfinite(sq) else None,
                           "max_abs_error": float(np.max(np.abs(ref - out))) if ref.size else 0.0,
                           "samples": int(ref.shape[0])}
    agree: np.ndarray | None = None
    if kind == "class_scores":
        agree = np.argmax(ref.reshape(ref.shape[0], -1), 1) == np.argmax(out.reshape(out.shape[0], -1), 1)
        rec["top1_agreement"] = round(float(np.mean(agree)), 6)
    elif kind == "sequence":
        agree = np.argmax(ref, -1) == np.argmax(out, -1)
        rec["step_agreement"] = round(float(np.mean(agree)), 6)
        rec["sequence_exact"] = round(float(np.mean(np.all(agree, axis=1))), 6)
    if agree is not None and ref.shape[0] < MIN_SAMPLES:
        lo, hi = wilson_interval(int(np.sum(agree)), int(agree.size))
        rec["ci95"] = [round(lo, 4), round(hi, 4)]
    rec["metric"] = PRIMARY[kind]
    rec["value"] = rec["sqnr_db"] if PRIMARY[kind] == "sqnr_db" else rec[PRIMARY[kind]]
    return rec


def judge(ref_outputs: list[list[np.ndarray]], outputs: list[list[np.ndarray]], output_names: Sequence[str],
          task: str, input_shapes: dict[str, tuple[int, ...]] | None = None,
          kinds: dict[str, str] | None = None) -> dict[str, Any]:
    """The ``fidelity`` record of one artifact: per-output records and the worst-output summary.

    Args:
        ref_outputs / outputs: per sample, the outputs in graph order (float arrays, same shapes).
        output_names: graph output names.
        task: ``classification``, ``embedding`` or ``generic`` (from the example or the user).
        input_shapes: graph input name -> shape of the first sample (to recognise state outputs).
        kinds: output name -> kind, overriding the inference.

    Returns:
        ``{"outputs": {name: record}, "cosine_mean", "sqnr_db" (worst, null if all identical), "samples",
        "worst_output", "top1_agreement" (classification tasks)}``.
    """
    recs: dict[str, dict[str, Any]] = {}
    for i, name in enumerate(output_names):
        ref = _stack([r[i] for r in ref_outputs])
        out = _stack([o[i] for o in outputs])
        kind = (kinds or {}).get(name) or output_kind(name, ref, i, task, input_shapes or {})
        recs[name] = judge_output(kind, ref, out)
    res: dict[str, Any] = {"outputs": recs, "samples": len(outputs)}
    if recs:
        worst = min(recs, key=lambda n: (recs[n]["sqnr_db"] if recs[n]["sqnr_db"] is not None else math.inf,
                                         recs[n]["cosine"]))
        res["worst_output"] = worst
        res["cosine_mean"] = min(r["cosine"] for r in recs.values())
        finite = [r["sqnr_db"] for r in recs.values() if r["sqnr_db"] is not None]
        res["sqnr_db"] = min(finite) if finite else None
        first = recs[output_names[0]]
        if "top1_agreement" in first:
            res["top1_agreement"] = first["top1_agreement"]
            if "ci95" in first:
                res["top1_agreement_ci95"] = first["ci95"]
    if len(outputs) < MIN_SAMPLES:
        res["warning"] = (f"only {len(outputs)} held-out samples (< {MIN_SAMPLES}): agreement metrics are coarse; "
                          f"see ci95, or give more with --heldout DIR")
    return res


def below_floor(fid: Mapping[str, Any], floor: FidelityFloor) -> list[str]:
    """Outputs that miss the floor, as ``"name: cosine 0.93 < 0.99"`` lines (empty = the floor holds)."""
    misses = []
    for name, rec in (fid.get("outputs") or {}).items():
        if rec["cosine"] < floor.cosine:
            misses.append(f"{name}: cosine {rec['cosine']:.4f} < {floor.cosine}")
        if rec["sqnr_db"] is not None and rec["sqnr_db"] < floor.sqnr_db:
            misses.append(f"{name}: SQNR {rec['sqnr_db']:.1f} dB < {floor.sqnr_db} dB")
        if _top1_judged(rec) and rec["top1_agreement"] < floor.top1_agreement:
            misses.append(f"{name}: top-1 agreement {rec['top1_agreement']:.3f} < {floor.top1_agreement} "
                          f"({rec['samples']} samples)")
    return misses


def _top1_judged(rec: Mapping[str, Any]) -> bool:
    return "top1_agreement" in rec and rec["samples"] >= MIN_SAMPLES


def floor_margin(fid: Mapping[str, Any], floor: FidelityFloor) -> float:
    """How far the worst output is above the floor, in dB (>= 0: the floor holds).

    The cosine and top-1 criteria are expressed in dB too: ``10 log10((1 - floor) / (1 - value))``.
    """
    margin = math.inf
    for rec in (fid.get("outputs") or {}).values():
        if rec["sqnr_db"] is not None:
            margin = min(margin, rec["sqnr_db"] - floor.sqnr_db)
        gap = max(1.0 - rec["cosine"], 1e-12)
        margin = min(margin, 10.0 * math.log10(max(1.0 - floor.cosine, 1e-12) / gap))
        if _top1_judged(rec):
            gap = max(1.0 - rec["top1_agreement"], 1e-3)
            margin = min(margin, 10.0 * math.log10(max(1.0 - floor.top1_agreement, 1e-3) / gap))
    return margin if math.isfinite(margin) else 1e9
