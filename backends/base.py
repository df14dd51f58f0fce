"""The backend contract and discovery.

A backend is an instance with a ``name``, ``available() -> (bool, reason)`` and
``lower(ctx) -> Artifact``; the returned :class:`Artifact` carries a ``run`` callable that executes it
on samples here (or None if nothing can run it here). Backends are found through the entry-point
group ``deployer.backends``; a backend whose dependency is missing is listed as unavailable with the
reason and the install command and fails only when used. Heavy imports (tensorflow, tensorrt) happen
inside the backend that needs them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import onnx

from calibration.dataset import Sample
from deployer.errors import BackendUnavailableError, BadInputError
from deployer.findings import Finding
from deployer.plan import QuantPlan

ENTRY_POINT_GROUP = "deployer.backends"


@dataclass
class LoweringContext:
    """Everything a backend gets to lower one plan.

    Attributes:
        reference: the model to lower: the canonical FP32 model with the plan's weight adjustments
            (bias correction) applied.
        fp32_reference: the unmodified FP32 model (for the FP32 baseline artifact); None = reference.
        plan: the validated plan.
        out_dir: directory to write artifacts into (the temporary output directory).
        calibration: calibration samples (for backends that need a representative dataset).
        options: backend options from the CLI/API (``soc_version``, ``input_shapes``, ``tflite_io`` ...).
    """

    reference: onnx.ModelProto
    plan: QuantPlan
    out_dir: Path
    calibration: Sequence[Sample]
    options: dict[str, Any] = field(default_factory=dict)
    fp32_reference: onnx.ModelProto | None = None

    @property
    def fp32(self) -> onnx.ModelProto:
        return self.fp32_reference if self.fp32_reference is not None else self.reference


Runner = Callable[[Sequence[Sample]], list[list[np.ndarray]]]
"""Runs an artifact on samples; returns, per sample, the list of outputs (float32, graph order)."""


@dataclass
class Artifact:
    """A lowered artifact.

    Attributes:
        path: the file a user deploys (inside the output directory).
        fp32_path: the FP32 model in the same format (for the size comparison), or None.
        run: runner executing the artifact here, or None.
        fp32_run: runner executing ``fp32_path`` here, or None.
        verified_by: what ``run`` uses (e.g. "LiteRT interpreter 2.3.0").
        notes: human-readable notes (steps not run, deviations from the plan).
        files: other files written (build commands, logs, deploy forms), relative names.
        extra: backend-specific report fields (I/O quantization, deviations, commands).
        throughput: optional speed measurement on held-out samples (``throughput_qps`` in the report).
    """

    path: Path
    fp32_path: Path | None
    run: Runner | None
    verified_by: str
    fp32_run: Runner | None = None
    notes: list[str] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    throughput: Callable[[Sequence[Sample]], dict[str, Any]] | None = None
    """Measures FP32 vs artifact speed on held-out samples (report ``throughput_qps``), or None."""


class Backend(Protocol):
    name: str
    description: str

    def available(self) -> tuple[bool, str]:
        """(True, "") or (False, reason with the install command)."""
        ...

    def lower(self, ctx: LoweringContext) -> Artifact:
        ...


class CheckingBackend(Backend, Protocol):
    """A backend that also checks any ONNX model against its vendor's rules (``deploy check``)."""

    def check(self, model: onnx.ModelProto) -> list[Finding]:
        ...


def discover() -> dict[str, Backend]:
    """Instantiate every backend registered under :data:`ENTRY_POINT_GROUP`.

    Raises:
        BackendUnavailableError: no backend registered (the package is not installed).
    """
    eps = metadata.entry_points(group=ENTRY_POINT_GROUP)
    found: dict[str, Backend] = {}
    for ep in sorted(eps, key=lambda e: e.name):
        cls = ep.load()
        found[ep.name] = cls()
    if not found:
        raise BackendUnavailableError("no deployer backends are registered; install the package: pip install -e .")
    return found


def resolve_targets(spec: str | Sequence[str], backends: dict[str, Backend]) -> list[str]:
    """Parse ``tflite,tensorrt`` / ``all`` into a list of backend names.

    Raises:
        BadInputError: unknown target name.
    """
    if isinstance(spec, str):
        names = [spec]
    elif isinstance(spec, Sequence) and all(isinstance(n, str) for n in spec):
        names = list(spec)
    else:
        raise BadInputError(f"targets {spec!r}: give a name, a comma-separated string or a list of names "
                            f"(tflite, tensorrt, ascend, onnxruntime, all)")
    parts = [p.strip() for n in names for p in n.split(",") if p.strip()]
    if not parts:
        raise BadInputError("no target given; use --target tflite,tensorrt,ascend or all")
    if "all" in parts:
        return [n for n in ("tflite", "tensorrt", "ascend") if n in backends]
    for p in parts:
        if p not in backends:
            import difflib

            close = difflib.get_close_matches(p, [*backends, "all"], n=1, cutoff=0.6)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise BadInputError(f"unknown target {p!r}; {hint}`deploy targets` lists: {', '.join(sorted(backends))}")
    return list(dict.fromkeys(parts))


def onnx_runner(model: onnx.ModelProto | str | Path, threads: int = 0, optimize: bool = True) -> Runner:
    """A runner executing an ONNX model with ONNX Runtime's CPU provider.

    ``optimize=False`` disables graph optimizations so Q/DQ nodes run as written (exact
    quantize-dequantize arithmetic, as TensorRT and Ascend compute them with int32 accumulation).
    With optimizations on, ONNX Runtime fuses Q/DQ into its own int8 kernels, whose u8s8 path
    saturates 16-bit intermediates on x86 CPUs without VNNI (measured here: EfficientNet-Lite0
    top-1 agreement 0.36 fused vs 0.94 exact for the same symmetric Q/DQ graph).
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if threads:
        so.intra_op_num_threads = threads
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    sess = ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]

    def run(samples: Sequence[Sample]) -> list[list[np.ndarray]]:
        return [[np.asarray(v, dtype=np.float32) for v in sess.run(names, dict(s))] for s in samples]

    return run


def int4_nodes(plan: QuantPlan) -> list[str]:
    """Nodes whose plan asks for 4-bit (weight-only, block-wise) weights."""
    return sorted(n for n, d in plan.nodes.items() if d.weight is not None and d.weight.bits == 4)


def refuse_int4(plan: QuantPlan, target: str, why: str) -> None:
    """Stop a target that cannot lower 4-bit weights instead of silently giving them 8 bits.

    Raises:
        BadInputError: the plan has 4-bit weights (names the first nodes, the reason and the fix).
    """
    nodes = int4_nodes(plan)
    if nodes:
        raise BadInputError(f"target {target}: the plan asks for INT4 weights on {len(nodes)} node(s) "
                            f"({', '.join(nodes[:3])}{' ...' if len(nodes) > 3 else ''}), which {why}; "
                            f"use --target onnxruntime for weight-only INT4, or an int8 recipe here")
