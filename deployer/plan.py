"""The quantization plan: the backend-neutral contract between the core and every backend.

A plan stores *decisions and ranges*, never backend encodings: per-node precision, the weight scheme,
the calibrated FP32 range of every activation tensor, tensors that must share one scale, the recipe
that produced it and its provenance. Each backend derives scale and zero point from the ranges under
its own rules (TensorRT symmetric, TFLite asymmetric activations, Ascend per-tensor Gemm ...).

Serialized as JSON (``plan.json``) with ``schema_version``; unknown keys, unknown versions, inverted
or non-finite ranges and unknown enum values raise :class:`deployer.errors.PlanError`.
The published JSON Schema lives in ``deployer/schemas/plan.schema.json``.

Shapes/units: ranges are float64 values in the tensor's own units (min <= max, both finite).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field, fields
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np

from deployer.errors import PlanError

SCHEMA_VERSION = "1.0"
SUPPORTED_SCHEMA_VERSIONS = ("1.0",)
FLOAT32_MAX = float(np.finfo(np.float32).max)


class Precision(str, Enum):
    """Numeric precision a node computes in."""

    INT8 = "int8"
    FP16 = "fp16"
    FP32 = "fp32"


class Granularity(str, Enum):
    """Granularity of a weight scale."""

    PER_CHANNEL = "per_channel"
    PER_TENSOR = "per_tensor"


class ObserverKind(str, Enum):
    """How activation ranges were reduced from calibration statistics."""

    MINMAX = "minmax"
    EMA = "ema"
    PERCENTILE = "percentile"
    ENTROPY = "entropy"
    MSE = "mse"
    AUTO = "auto"
    IMPORTED = "imported"


def _check_keys(kind: str, data: dict[str, Any], cls: type) -> None:
    if not isinstance(data, dict):
        raise PlanError(f"plan: {kind} must be an object, got {type(data).__name__}; fix the plan file")
    allowed = {f.name for f in fields(cls)}
    unknown = set(data) - allowed
    if unknown:
        raise PlanError(
            f"plan: unknown key(s) {sorted(unknown)} in {kind}; allowed: {sorted(allowed)} (remove them)"
        )


def _enum(cls: type[Enum], value: Any, where: str) -> Any:
    try:
        return cls(value)
    except ValueError:
        allowed = [e.value for e in cls]  # type: ignore[attr-defined]
        raise PlanError(f"plan: {where} = {value!r} is not one of {allowed}") from None


@dataclass(frozen=True)
class WeightScheme:
    """How a node's constant weight is quantized: symmetric integers, one scale per output channel.

    ``bits`` 8 (the default) or 4 (block-wise weight-only, ``block_size`` along the input axis).
    Source: symmetric per-channel INT8 weights, Krishnamoorthi 2018 "Quantizing deep convolutional
    networks for efficient inference"; TFLite int8 spec; TensorRT Q/DQ rules.
    """

    bits: int = 8
    symmetric: bool = True
    granularity: Granularity = Granularity.PER_CHANNEL
    block_size: int | None = None

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise PlanError(f"plan: weight bits {self.bits} unsupported; use 8 or 4")
        object.__setattr__(self, "granularity", _enum(Granularity, self.granularity, "weight granularity"))

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"bits": self.bits, "symmetric": self.symmetric, "granularity": self.granularity.value}
        if self.block_size is not None:
            d["block_size"] = self.block_size
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "WeightScheme":
        _check_keys("weight scheme", data, cls)
        return cls(**data)


@dataclass(frozen=True)
class NodeDecision:
    """What the plan decides for one ONNX node.

    Attributes:
        op_type: ONNX op type (checked against the model on lowering).
        precision: the precision the node computes in.
        weight: weight scheme for nodes with a constant weight input quantized to integers, else None.
        reason: which recipe rule (or search step) made the decision, for the report.
    """

    op_type: str
    precision: Precision
    weight: WeightScheme | None = None
    reason: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "precision", _enum(Precision, self.precision, f"precision of {self.op_type}"))

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"op_type": self.op_type, "precision": self.precision.value}
        if self.weight is not None:
            d["weight"] = self.weight.to_dict()
        if self.reason:
            d["reason"] = self.reason
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "NodeDecision":
        _check_keys("node", data, cls)
        data = dict(data)
        if data.get("weight") is not None:
            data["weight"] = WeightScheme.from_dict(data["weight"])
        if "op_type" not in data or "precision" not in data:
            raise PlanError("plan: every node needs 'op_type' and 'precision'")
        return cls(**data)


@dataclass(frozen=True)
class TensorRange:
    """Calibrated FP32 range of one activation tensor (min <= max, finite)."""

    min: float
    max: float

    def __post_init__(self) -> None:
        for v in (self.min, self.max):
            if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
                raise PlanError(f"plan: range [{self.min}, {self.max}] must hold numbers")
            if not math.isfinite(float(v)):
                raise PlanError(f"plan: range [{self.min}, {self.max}] is not finite; give finite numbers")
            if abs(float(v)) > FLOAT32_MAX:  # activations are float32; a wider range gives an infinite scale
                raise PlanError(f"plan: range [{self.min}, {self.max}] exceeds the float32 range; give float32 values")
        object.__setattr__(self, "min", float(self.min))
        object.__setattr__(self, "max", float(self.max))
        if self.min > self.max:
            raise PlanError(f"plan: range min {self.min} > max {self.max}; swap them")

    def to_dict(self) -> dict[str, float]:
        return {"min": float(self.min), "max": float(self.max)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TensorRange":
        _check_keys("range", data, cls)
        if "min" not in data or "max" not in data:
            raise PlanError("plan: a range needs 'min' and 'max'")
        return cls(min=data["min"], max=data["max"])


@dataclass(frozen=True)
class QuantPlan:
    """A complete, backend-neutral quantization plan.

    Attributes:
        model: ``{"sha256", "inputs": [{name, shape, dtype}], "outputs": [...], "opset"}``.
        calibration: ``{"sha256", "num_samples", "observer", "observer_params"}``.
        recipe: ``{"name", "rules"}`` that produced the decisions.
        nodes: node name -> :class:`NodeDecision` (nodes not listed stay FP32).
        ranges: tensor name -> :class:`TensorRange` (activation tensors, graph inputs included).
        shared_scales: groups of tensor names that must share one scale (Concat inputs/output).
        provenance: tool and library versions (no timestamps, so plans are byte-reproducible).
        schema_version: see :data:`SCHEMA_VERSION`.
        bias_correction: node -> per-output-channel bias deltas added before lowering
            (:mod:`deployer.recovery`, Nagel et al. 2019).
        smoothing: MatMul input tensor -> SmoothQuant factors (Xiao et al. 2023); the lowered graph
            reads ``<tensor>__smoothed`` = tensor / factors, whose range the plan holds.
        rounding: node -> AdaRound bits (Nagel et al. 2020; :mod:`deployer.adaround`): one bit per
            weight (``floor`` or ``floor + 1`` on the per-channel INT8 grid), packed, base64. Written
            only when non-empty.
    """

    model: dict[str, Any]
    calibration: dict[str, Any]
    recipe: dict[str, Any]
    nodes: dict[str, NodeDecision]
    ranges: dict[str, TensorRange]
    shared_scales: list[list[str]] = field(default_factory=list)
    provenance: dict[str, Any] = field(default_factory=dict)
    schema_version: str = SCHEMA_VERSION
    bias_correction: dict[str, list[float]] = field(default_factory=dict)
    smoothing: dict[str, list[float]] = field(default_factory=dict)
    rounding: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.schema_version not in SUPPORTED_SCHEMA_VERSIONS:
            raise PlanError(
                f"plan: schema_version {self.schema_version!r} is unknown; this deployer reads "
                f"{list(SUPPORTED_SCHEMA_VERSIONS)} (regenerate the plan with `deploy plan`)"
            )
        if not isinstance(self.bias_correction, dict):
            raise PlanError("plan: 'bias_correction' must map node names to lists of numbers")
        if not isinstance(self.smoothing, dict):
            raise PlanError("plan: 'smoothing' must map tensor names to lists of positive numbers")
        for tensor, factors in self.smoothing.items():
            if not isinstance(factors, list) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0 for v in factors
            ):
                raise PlanError(f"plan: smoothing of tensor {tensor!r} must be a list of positive finite numbers")
        if not isinstance(self.rounding, dict) or not all(isinstance(v, str) for v in self.rounding.values()):
            raise PlanError("plan: 'rounding' must map node names to base64 text (AdaRound bits)")
        for node, deltas in self.bias_correction.items():
            if not isinstance(deltas, list) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in deltas
            ):
                raise PlanError(f"plan: bias_correction of node {node!r} must be a list of finite numbers")

    # -- queries ---------------------------------------------------------------------------------
    def precision_of(self, node_name: str) -> Precision:
        """Precision of a node; nodes absent from the plan compute in FP32."""
        d = self.nodes.get(node_name)
        return d.precision if d else Precision.FP32

    def range_of(self, tensor: str) -> TensorRange | None:
        return self.ranges.get(tensor)

    def with_ranges(self, ranges: dict[str, TensorRange]) -> "QuantPlan":
        return dataclasses.replace(self, ranges=ranges)

    def with_nodes(self, nodes: dict[str, NodeDecision], recipe: dict[str, Any] | None = None) -> "QuantPlan":
        return dataclasses.replace(self, nodes=nodes, recipe=recipe or self.recipe)

    def with_bias_correction(self, corrections: dict[str, list[float]]) -> "QuantPlan":
        return dataclasses.replace(self, bias_correction=corrections)

    # -- (de)serialization -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = {
            "schema_version": self.schema_version,
            "model": self.model,
            "calibration": self.calibration,
            "recipe": self.recipe,
            "nodes": {k: self.nodes[k].to_dict() for k in sorted(self.nodes)},
            "ranges": {k: self.ranges[k].to_dict() for k in sorted(self.ranges)},
            "shared_scales": [list(g) for g in self.shared_scales],
            "provenance": self.provenance,
            "bias_correction": {k: self.bias_correction[k] for k in sorted(self.bias_correction)},
            "smoothing": {k: self.smoothing[k] for k in sorted(self.smoothing)},
        }
        if self.rounding:
            d["rounding"] = {k: self.rounding[k] for k in sorted(self.rounding)}
        return d

    def to_json(self) -> str:
        """Canonical JSON (sorted keys, fixed float repr): same plan -> same bytes."""
        return json.dumps(self.to_dict(), indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: Any) -> "QuantPlan":
        if not isinstance(data, dict):
            raise PlanError("plan: top level must be a JSON object")
        version = data.get("schema_version")
        if version is None:
            raise PlanError("plan: missing 'schema_version'; regenerate the plan with `deploy plan`")
        if not isinstance(version, str):
            raise PlanError(f"plan: schema_version must be a string like {SCHEMA_VERSION!r}, not a "
                            f"{type(version).__name__}; fix the plan file")
        data = migrate(dict(data))
        _check_keys("plan", data, cls)
        for key in ("model", "calibration", "recipe", "nodes", "ranges"):
            if key not in data:
                raise PlanError(f"plan: missing required key {key!r}")
        if not isinstance(data["nodes"], dict) or not isinstance(data["ranges"], dict):
            raise PlanError("plan: 'nodes' and 'ranges' must be objects keyed by name")
        nodes = {str(k): NodeDecision.from_dict(v) for k, v in data["nodes"].items()}
        ranges = {}
        for k, v in data["ranges"].items():
            try:
                ranges[str(k)] = TensorRange.from_dict(v)
            except PlanError as e:
                raise PlanError(f"{e} (tensor {k!r})") from None
        shared = data.get("shared_scales", [])
        if not isinstance(shared, list) or not all(isinstance(g, list) for g in shared):
            raise PlanError("plan: 'shared_scales' must be a list of lists of tensor names")
        return cls(
            model=data["model"], calibration=data["calibration"], recipe=data["recipe"], nodes=nodes,
            ranges=ranges, shared_scales=[[str(t) for t in g] for g in shared],
            provenance=data.get("provenance", {}), schema_version=data["schema_version"],
            bias_correction=data.get("bias_correction", {}),
            smoothing=data.get("smoothing", {}),
            rounding=data.get("rounding", {}),
        )

    @classmethod
    def load(cls, path: str | Path) -> "QuantPlan":
        """Read and validate a plan file.

        Raises:
            PlanError: unreadable file, invalid JSON or invalid content.
        """
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except OSError as e:
            raise PlanError(f"plan: cannot read {p}: {e.strerror}; check the --plan path") from None
        except UnicodeDecodeError:
            raise PlanError(f"plan: {p} is not a text (JSON) file; give the plan.json that deploy wrote") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise PlanError(f"plan: {p} is not valid JSON ({e.msg} at line {e.lineno}); fix or regenerate it") from None
        return cls.from_dict(data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json(), encoding="utf-8")


def migrate(data: dict[str, Any]) -> dict[str, Any]:
    """Upgrade an older plan dict to :data:`SCHEMA_VERSION` (:mod:`deployer.plan_migrations`)."""
    from deployer.plan_migrations import migrate as _migrate

    return _migrate(data)


def validate_against_model(plan: QuantPlan, node_types: dict[str, str], tensor_names: set[str]) -> None:
    """Check that a (possibly hand-edited) plan refers to this model.

    Args:
        node_types: node name -> op type of the model being lowered.
        tensor_names: every tensor name in the model.

    Raises:
        PlanError: a node or tensor in the plan is not in the model, or an op type differs.
    """
    for name, dec in plan.nodes.items():
        if name not in node_types:
            raise PlanError(f"plan: node {name!r} is not in the model; remove it or use the plan made for this model")
        if node_types[name] != dec.op_type:
            raise PlanError(f"plan: node {name!r} is {node_types[name]} in the model, not {dec.op_type}")
    tensor_names = set(tensor_names) | {f"{t}__smoothed" for t in plan.smoothing}
    for t in plan.smoothing:
        if t not in tensor_names:
            raise PlanError(f"plan: smoothing names tensor {t!r}, which is not in the model; remove it")
    for t in plan.ranges:
        if t not in tensor_names:
            raise PlanError(f"plan: tensor {t!r} is not in the model; remove its range or regenerate the plan")
    for name in plan.bias_correction:
        if name not in node_types:
            raise PlanError(f"plan: bias_correction names node {name!r}, which is not in the model; remove it")
    for name in plan.rounding:
        if name not in node_types:
            raise PlanError(f"plan: rounding names node {name!r}, which is not in the model; remove it")
    for g in plan.shared_scales:
        for t in g:
            if t not in tensor_names:
                raise PlanError(f"plan: shared-scale tensor {t!r} is not in the model")
