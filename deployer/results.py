"""Typed records of a deployment result (what ``report.json`` holds per target), for release pipelines.

They are ``TypedDict``\\ s: at run time plain dicts (so ``result.targets["tflite"].fidelity["cosine_mean"]``
and ``json.dumps`` keep working), under mypy each key has its type. Keys are optional (``total=False``)
where the report has them only for some models or targets (``top1_agreement`` needs classification
scores; ``speed`` only where the target was timed here).

Units: ``sqnr_db`` in dB (null = identical to FP32); ``*_qps`` samples per second; ``latency`` in ms;
sizes in bytes; cosine and agreement fractions in [0, 1].
"""

from __future__ import annotations

from typing import Any, Literal, TypedDict

TargetName = Literal["tflite", "tensorrt", "ascend", "onnxruntime"]
"""The built-in targets. Plugin backends (entry point ``deployer.backends``) take any ``str`` at run time:
``deploy(targets=cast(TargetName, "mine"))`` or a comma-separated string."""

GateStatus = Literal["pass", "fail", "not evaluated"]


class OutputRecord(TypedDict, total=False):
    """``fidelity.outputs.<name>``: one graph output against FP32 (:func:`deployer.judge.judge_output`)."""

    kind: str
    cosine: float
    sqnr_db: float | None
    max_abs_error: float
    samples: int
    top1_agreement: float
    ci95: list[float]


class Fidelity(TypedDict, total=False):
    """``fidelity``: the worst output as the summary, every output under ``outputs``."""

    outputs: dict[str, OutputRecord]
    samples: int
    worst_output: str
    cosine_mean: float
    sqnr_db: float | None
    top1_agreement: float
    top1_agreement_ci95: list[float]
    task_accuracy: float
    task_accuracy_fp32: float | None
    task_accuracy_relative: float
    warning: str


class Verdict(TypedDict):
    """``verdict``: whether the target ships and why, in one line."""

    ships: bool
    reason: str


class GateResult(TypedDict, total=False):
    """``gates.<name>`` (:mod:`deployer.gates`)."""

    status: GateStatus
    enforced: bool
    threshold: float
    value: float | None
    reason: str
    metric: str
    speedup: float
    required_speedup: float
    fidelity_loss_percent: float
    relative_loss: float
    misses: list[str]


class SpeedRecord(TypedDict, total=False):
    """``speed``: artifact vs FP32 throughput on this machine (where the target was timed)."""

    batch: int
    threads: int
    fp32_qps: float
    artifact_qps: float
    ratio: float
    cpu_flags: dict[str, Any]
    load_average: list[float]
    grid: list[dict[str, Any]]
    same_cpu: bool
    built_for: str
