"""Release gates: evaluated for every target, reported as ``targets.<name>.gates.<gate>``.

Each gate's entry is ``{"status": "pass" | "fail" | "not evaluated", "enforced": bool, "threshold": ...,
"reason": ...}`` plus the numbers it compared. Thresholds are set with ``--gate NAME=VALUE``
(repeatable), ``deployer.deploy(gates={NAME: VALUE})`` or a ``"gates": {NAME: VALUE}`` object in a
recipe file (a CLI/API value wins over the recipe's).

Gates:

- Fidelity gates, named after the report's metric keys (:data:`FIDELITY_GATES`: ``top1_agreement``,
  ``cosine_mean``, ``sqnr_db`` (dB), ``task_accuracy``, ``task_accuracy_relative``): pass when the
  target's ``fidelity.<name>`` >= VALUE; "not evaluated" where the artifact was not run here or the
  model has no such metric (``top1_agreement`` needs classification scores, ``task_accuracy*`` a
  labelled task metric). ``sqnr_db`` null (output identical to FP32) counts as infinite. Only the
  ones a user sets are evaluated.
- ``speed-per-fidelity`` (the seed's release principle "each 1% of fidelity lost must buy at least 2x
  speed"; VALUE = the speed-up each percentage point must buy, default 2): with ``loss`` the relative
  loss of the labelled task metric in percent and ``speedup`` the artifact/FP32 throughput ratio
  (``speed.ratio``, else FP32/artifact ``latency_ms``), passes when ``speedup >= max(1, VALUE *
  loss)``: an artifact slower than FP32 buys nothing and fails even at no loss. "Not evaluated"
  without labels (an agreement with FP32 is not a task metric), where no speed was measured, or where
  the speed was measured on a CPU other than the one the artifact was built for (``speed.same_cpu``
  false, e.g. a TFLite artifact for ARM timed on x86; GPU/NPU targets are not timed here).
- ``size-vs-recall`` (the seed's "a size reduction must not cost more than 5% recall"; VALUE = the
  maximum relative loss, default 0.05): the relative loss of macro recall on ``--eval`` data, else of
  the example's labelled ``task_accuracy``; passes when ``loss <= VALUE``. "Not evaluated" without
  labels or without a size reduction.
- ``fidelity-floor`` (:mod:`deployer.deliver`): always evaluated and enforced; its threshold is
  ``--min-fidelity``, not ``--gate``.

Enforcement (exit 1 after the outputs are written): a gate whose threshold the user set is enforced;
the two seed gates at their defaults only under ``--enforce-gates``; the floor always.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from deployer.errors import BadInputError

PASS, FAIL, NOT_EVALUATED = "pass", "fail", "not evaluated"
NA = NOT_EVALUATED  # the old name of the status

SPEED_GATE = "speed-per-fidelity"
SIZE_GATE = "size-vs-recall"
FLOOR_GATE = "fidelity-floor"
FIDELITY_GATES = ("top1_agreement", "cosine_mean", "sqnr_db", "task_accuracy", "task_accuracy_relative")
"""Fidelity metric keys of ``report.json`` that can be gated (pass when metric >= VALUE)."""
SEED_DEFAULTS = {SPEED_GATE: 2.0, SIZE_GATE: 0.05}
GATE_NAMES = (*FIDELITY_GATES, SPEED_GATE, SIZE_GATE)


@dataclass(frozen=True)
class GateConfig:
    """Gate thresholds: ``user`` holds the ones a user set (evaluated and enforced); the seed gates
    fall back to :data:`SEED_DEFAULTS`."""

    user: Mapping[str, float] = field(default_factory=dict)
    labelled_metric: str = "recall"

    @property
    def speed_per_fidelity_point(self) -> float:
        return float(self.user.get(SPEED_GATE, SEED_DEFAULTS[SPEED_GATE]))

    @property
    def max_recall_loss(self) -> float:
        return float(self.user.get(SIZE_GATE, SEED_DEFAULTS[SIZE_GATE]))


def check_gate_name(name: str) -> str:
    """``name`` if it is a gate, else :class:`BadInputError` with the closest names ("did you mean")."""
    if name in GATE_NAMES:
        return name
    if name == FLOOR_GATE:
        raise BadInputError("the fidelity-floor gate is set with --min-fidelity (e.g. --min-fidelity "
                            "cosine=0.99,sqnr=20), not --gate")
    close = difflib.get_close_matches(name, GATE_NAMES, n=2, cutoff=0.5)
    if close:
        raise BadInputError(f"unknown gate {name!r}; did you mean {' or '.join(close)}?")
    raise BadInputError(f"unknown gate {name!r}; gates: {', '.join(GATE_NAMES)}")


def parse_gates(specs: Mapping[str, Any] | Iterable[str] | None, where: str = "--gate") -> dict[str, float]:
    """Thresholds from ``["NAME=VALUE", ...]`` (the CLI) or ``{NAME: VALUE}`` (API, recipe file).

    Raises:
        BadInputError: unknown name (with "did you mean"), a value that is not a finite number, or a
            seed-gate value out of range (ratio > 0; max loss in [0, 1]).
    """
    if specs is None:
        return {}
    pairs: list[tuple[str, Any]] = []
    if isinstance(specs, Mapping):
        pairs = list(specs.items())
    else:
        for s in specs:
            name, sep, value = str(s).partition("=")
            if not sep:
                raise BadInputError(f"{where} {s!r}: write NAME=VALUE, e.g. {where} cosine_mean=0.99")
            pairs.append((name.strip(), value.strip()))
    out: dict[str, float] = {}
    for name, value in pairs:
        check_gate_name(str(name))
        try:
            v = float(value)
        except (TypeError, ValueError):
            raise BadInputError(f"{where} {name}={value!r}: the threshold must be a number, e.g. {name}=0.99") \
                from None
        if not math.isfinite(v):
            raise BadInputError(f"{where} {name}={value}: the threshold must be finite")
        if name == SPEED_GATE and v <= 0:
            raise BadInputError(f"{where} {name}={value}: the speed-up per point of fidelity lost must be > 0")
        if name == SIZE_GATE and not 0 <= v <= 1:
            raise BadInputError(f"{where} {name}={value}: the maximum relative loss must be in [0, 1], e.g. 0.05")
        out[str(name)] = v
    return out


def evaluate_gates(target: Mapping[str, Any], config: GateConfig = GateConfig()) -> dict[str, dict[str, Any]]:
    """Gates for one target entry of ``report.json`` (reads fidelity, speed / latency_ms, size_bytes,
    labelled); each entry carries ``enforced`` (True for a user-set threshold; the caller sets the
    seed gates' under ``--enforce-gates``)."""
    fid = target.get("fidelity") or {}
    gates: dict[str, dict[str, Any]] = {}
    for name in FIDELITY_GATES:
        if name in config.user:
            gates[name] = _fidelity_gate(fid, name, config.user[name])
    gates[SPEED_GATE] = _speed_gate(target, config)
    gates[SIZE_GATE] = _size_gate(target, config)
    for name, g in gates.items():
        g["enforced"] = name in config.user
    return gates


def _fidelity_gate(fid: Mapping[str, Any], name: str, threshold: float) -> dict[str, Any]:
    if not fid:
        return {"status": NOT_EVALUATED, "threshold": threshold, "reason": "artifact not run here"}
    if name not in fid:
        return {"status": NOT_EVALUATED, "threshold": threshold, "reason": f"this model has no {name}"}
    value = fid[name]
    v = math.inf if value is None else float(value)  # sqnr_db null: identical to FP32
    return {"status": PASS if v >= threshold else FAIL, "value": value, "threshold": threshold}


def labelled_loss(target: Mapping[str, Any], metric: str = "recall") -> tuple[float, str] | None:
    """Relative loss of the labelled task metric, ``(fp32 - artifact) / fp32``, and its name: ``--eval``
    data's ``metric`` (``labelled``), else the example's ``task_accuracy``; None without labels."""
    labelled = target.get("labelled") or {}
    f, a = (labelled.get("fp32") or {}).get(metric), (labelled.get("artifact") or {}).get(metric)
    if isinstance(f, (int, float)) and isinstance(a, (int, float)) and f > 0:
        return (float(f) - float(a)) / float(f), metric
    rel = (target.get("fidelity") or {}).get("task_accuracy_relative")
    if isinstance(rel, (int, float)):
        return 1.0 - float(rel), "task_accuracy"
    return None


def speed_ratio(target: Mapping[str, Any]) -> float | None:
    """Artifact speed / FP32 speed: ``speed.ratio``, else FP32/artifact ``latency_ms``, else
    ``throughput_qps.speedup``; None where none was measured."""
    speed = target.get("speed") or {}
    if isinstance(speed.get("ratio"), (int, float)) and speed["ratio"] > 0:
        return float(speed["ratio"])
    lat = target.get("latency_ms") or {}
    if isinstance(lat.get("fp32"), (int, float)) and isinstance(lat.get("artifact"), (int, float)) \
            and lat["artifact"] > 0:
        return float(lat["fp32"]) / float(lat["artifact"])
    tp = target.get("throughput_qps") or {}
    if isinstance(tp.get("speedup"), (int, float)) and tp["speedup"] > 0:
        return float(tp["speedup"])
    return None


def speed_warning(target: Mapping[str, Any]) -> str | None:
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


def _speed_gate(target: Mapping[str, Any], config: GateConfig) -> dict[str, Any]:
    ratio = config.speed_per_fidelity_point
    base: dict[str, Any] = {"threshold": ratio}
    loss = labelled_loss(target, config.labelled_metric)
    if loss is None:
        return {**base, "status": NOT_EVALUATED, "reason": "no labelled task metric (give --eval DIR)"}
    speedup = speed_ratio(target)
    if speedup is None:
        return {**base, "status": NOT_EVALUATED, "reason": "speed not measured for this target here"}
    for rec in (target.get("speed"), target.get("latency_ms"), target.get("throughput_qps")):
        if isinstance(rec, Mapping) and rec.get("same_cpu") is False:
            return {**base, "status": NOT_EVALUATED,
                    "reason": f"speed measured on a CPU other than the one the artifact was built for"
                              f"{' (' + str(rec['built_for']) + ')' if rec.get('built_for') else ''}"}
    points = max(0.0, loss[0] * 100.0)
    needed = max(1.0, ratio * points)
    return {**base, "status": PASS if speedup >= needed else FAIL, "metric": loss[1],
            "fidelity_loss_percent": round(points, 3), "speedup": round(speedup, 3),
            "required_speedup": round(needed, 3)}


def _size_gate(target: Mapping[str, Any], config: GateConfig) -> dict[str, Any]:
    max_loss = config.max_recall_loss
    base: dict[str, Any] = {"threshold": max_loss}
    loss = labelled_loss(target, config.labelled_metric)
    size = target.get("size_bytes") or {}
    if loss is None:
        return {**base, "status": NOT_EVALUATED, "reason": "no labelled task metric (give --eval DIR)"}
    if not size.get("fp32") or not size.get("artifact") or size["artifact"] >= size["fp32"]:
        return {**base, "status": NOT_EVALUATED, "reason": "no size reduction"}
    return {**base, "status": PASS if loss[0] <= max_loss else FAIL, "metric": loss[1],
            "relative_loss": round(loss[0], 4)}


def failed(gates: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Names of the gates whose status is ``fail`` (enforced or not)."""
    return [name for name, g in gates.items() if g.get("status") == FAIL]


def failed_enforced(gates: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Names of the enforced gates that failed."""
    return [name for name, g in gates.items() if g.get("status") == FAIL and g.get("enforced")]


def describe(name: str, gate: Mapping[str, Any]) -> str:
    """One line: ``"cosine_mean 0.981 < 0.99"``, ``"speed-per-fidelity: 0.7x < required 1.0x"`` ..."""
    if "value" in gate:
        v = gate["value"]
        return f"{name} {'inf' if v is None else v} {'>=' if gate.get('status') == PASS else '<'} {gate.get('threshold')}"
    if "required_speedup" in gate:
        return f"{name}: {gate.get('speedup')}x vs required {gate['required_speedup']}x"
    if "relative_loss" in gate:
        return f"{name}: {gate.get('metric')} lost {100 * float(gate['relative_loss']):.1f}% (max " \
               f"{100 * float(gate.get('threshold', 0)):.1f}%)"
    return f"{name}: {gate.get('status')}" + (f" ({gate['reason']})" if gate.get("reason") else "")


def gate_verdict(result: Any) -> None:
    """A target (``TargetResult``) that ships but failed an enforced gate (other than the floor, which
    gives its own verdict) does not ship: its ``verdict`` names the gates."""
    gates = result.extra.get("gates") or {}
    verdict = result.extra.get("verdict") or {}
    bad = [n for n in failed_enforced(gates) if n != FLOOR_GATE]
    if bad and verdict.get("ships", True):
        result.extra["verdict"] = {"ships": False,
                                   "reason": "gate failed: " + "; ".join(describe(n, gates[n]) for n in bad)}
