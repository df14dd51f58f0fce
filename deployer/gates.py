"""Release gates from the seed document, evaluated for every target and reported.

- ``speed-per-fidelity``: each 1% of fidelity lost must buy at least 2x speed. With ``loss`` the
  fidelity lost in percentage points of FP32 (primary metric) and ``speedup`` the target's
  ``speed.ratio`` (:mod:`deployer.speed`: artifact vs FP32 samples/s, batch 1, 1 thread, in alternation;
  for a target that reports only ``latency_ms``: FP32 latency / artifact latency), the gate passes when
  ``loss <= 0`` or ``speedup >= ratio * loss`` (``ratio`` = 2, configurable). Not applicable where no
  speed was measured.
- ``size-vs-recall``: a size reduction must not cost more than 5% recall: with labelled evaluation
  data, ``(recall_fp32 - recall_artifact) / recall_fp32 <= 0.05`` (configurable; the configured
  labelled metric replaces recall). Not applicable without labels.

A gate is ``pass``, ``fail`` or ``not applicable`` (with the reason). ``--enforce-gates`` turns a failed
gate into exit code 1 (after the outputs are written).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

PASS, FAIL, NA = "pass", "fail", "not applicable"


@dataclass(frozen=True)
class GateConfig:
    """Thresholds (defaults are the seed's)."""

    speed_per_fidelity_point: float = 2.0
    max_recall_loss: float = 0.05
    labelled_metric: str = "recall"


def evaluate_gates(target: dict[str, Any], config: GateConfig = GateConfig()) -> dict[str, dict[str, Any]]:
    """Gates for one target entry of ``report.json`` (reads fidelity, speed or latency_ms, size_bytes, labelled)."""
    fid = target.get("fidelity", {})
    gates: dict[str, dict[str, Any]] = {}
    rel = _primary_relative(fid)
    speedup = speed_ratio(target)
    if rel is None:
        gates["speed-per-fidelity"] = {"status": NA, "reason": "no primary fidelity metric"}
    elif speedup is None:
        gates["speed-per-fidelity"] = {"status": NA, "reason": "speed not measured for this target"}
    elif (target.get("speed") or {}).get("same_cpu") is False:
        gates["speed-per-fidelity"] = {"status": NA, "reason": "built for another CPU (--cpu): speed measured here "
                                                               "does not apply", "speedup_here": round(speedup, 3)}
    else:
        loss = max(0.0, (1.0 - rel) * 100.0)
        needed = config.speed_per_fidelity_point * loss
        ok = loss == 0.0 or speedup >= needed
        gates["speed-per-fidelity"] = {"status": PASS if ok else FAIL, "fidelity_loss_points": round(loss, 3),
                                       "speedup": round(speedup, 3), "required_speedup": round(needed, 3)}
    labelled = target.get("labelled") or {}
    metric = config.labelled_metric
    fp32_v, art_v = (labelled.get("fp32") or {}).get(metric), (labelled.get("artifact") or {}).get(metric)
    size = target.get("size_bytes") or {}
    if fp32_v is None or art_v is None:
        gates["size-vs-recall"] = {"status": NA, "reason": f"no labelled evaluation data ({metric} unknown)"}
    elif not size.get("fp32") or size.get("artifact", 0) >= size["fp32"]:
        gates["size-vs-recall"] = {"status": NA, "reason": "no size reduction"}
    else:
        loss = (float(fp32_v) - float(art_v)) / max(float(fp32_v), 1e-12)
        gates["size-vs-recall"] = {"status": PASS if loss <= config.max_recall_loss else FAIL,
                                   "metric": metric, "relative_loss": round(loss, 4),
                                   "max_relative_loss": config.max_recall_loss}
    return gates


def speed_ratio(target: dict[str, Any]) -> float | None:
    """Artifact speed / FP32 speed of a target entry: ``speed.ratio`` where the target reports the speed
    record, else FP32 latency / artifact latency from ``latency_ms``; None where neither was measured."""
    speed = target.get("speed") or {}
    if isinstance(speed.get("ratio"), (int, float)) and speed["ratio"] > 0:
        return float(speed["ratio"])
    lat = target.get("latency_ms") or {}
    if isinstance(lat.get("fp32"), (int, float)) and isinstance(lat.get("artifact"), (int, float)) and lat["artifact"] > 0:
        return float(lat["fp32"]) / float(lat["artifact"])
    return None


def speed_warning(target: dict[str, Any]) -> str | None:
    """The warning (terminal and ``speed_warning`` in the report, red in report.html) for an INT8 artifact
    slower than FP32 on the machine it was built for; None otherwise, and where the artifact was built for
    another CPU (``speed.same_cpu`` false: ``--cpu``) or holds no INT8 (``speed.int8`` false)."""
    speed = target.get("speed") or {}
    ratio = speed_ratio(target)
    if ratio is None or ratio >= 1.0 or speed.get("same_cpu") is False or speed.get("int8") is False:
        return None
    where = (f"batch {speed['batch']}, {speed['threads']} thread(s)" if speed else "latency_ms")
    flags = (speed.get("cpu_flags") or {}).get("isa")
    return (f"the INT8 artifact is slower than FP32 on this machine ({ratio:.2f}x, {where}"
            + (f", {flags} CPU" if flags else "") + "): quantization buys size here, not speed")


def _primary_relative(fid: dict[str, Any]) -> float | None:
    for key in ("task_accuracy_relative", "top1_agreement", "cosine_mean"):
        if isinstance(fid.get(key), (int, float)):
            return float(fid[key])
    return None


def failed(gates: dict[str, dict[str, Any]]) -> list[str]:
    return [name for name, g in gates.items() if g.get("status") == FAIL]
