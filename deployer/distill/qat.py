"""Quantization-aware fine-tuning of a student with the ranges and schemes of a :class:`QuantPlan`.

QAT after PTQ: the student is exported and a plan is computed by the ordinary pipeline (calibrated
ranges, per-node precision and weight schemes); then, for every INT8 node of that plan whose weight is
a parameter of the student, the module's weight is fake-quantized with the plan's weight scheme
(symmetric, per output channel or per tensor, ``bits``) and the module's input with the plan's
calibrated activation range (asymmetric per-tensor int8, as TFLite). The student trains briefly with
the distillation loss through these fake-quant ops; gradients pass them by the straight-through
estimator; then :func:`remove_fake_quant` bakes the quantized weights in and the student goes to
``deploy``, whose quantization of those weights is then exact.

Sources: Jacob et al. 2018, "Quantization and Training of Neural Networks for Efficient
Integer-Arithmetic-Only Inference" (simulated quantization in training); Krishnamoorthi 2018,
"Quantizing deep convolutional networks for efficient inference: A whitepaper" (per-channel symmetric
weights, STE, QAT after PTQ); Bengio et al. 2013 (straight-through estimator).
``torch.fake_quantize_per_channel_affine`` / ``torch.fake_quantize_per_tensor_affine`` implement the
rounding with the STE gradient (1 inside the clamp range, 0 outside).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn
from torch.nn.utils import parametrize

from deployer.plan import Granularity, Precision, QuantPlan

QUANT_OPS = ("Conv", "Gemm", "MatMul", "ConvTranspose")


def weight_scale(w: torch.Tensor, bits: int = 8, per_channel: bool = True, axis: int = 0) -> torch.Tensor:
    """Symmetric scale ``max|w| / (2^(bits-1) - 1)`` per channel along ``axis`` (float32 ``[C]``) or per
    tensor (0-d); dead channels get a tiny positive scale, never 0."""
    qmax = 2 ** (bits - 1) - 1
    if per_channel:
        dims = [d for d in range(w.dim()) if d != axis]
        amax = w.detach().abs().amax(dim=dims) if dims else w.detach().abs()
    else:
        amax = w.detach().abs().max()
    return (amax / qmax).clamp(min=1e-12).to(torch.float32)


class FakeQuantWeight(nn.Module):
    """Parametrization: symmetric fake quantization of a weight (``round(w / s)`` clamped to
    ``[-(2^(b-1)-1), 2^(b-1)-1]``, times ``s``), scale recomputed from the current weight each step."""

    def __init__(self, bits: int = 8, per_channel: bool = True, axis: int = 0) -> None:
        super().__init__()
        self.bits, self.per_channel, self.axis = bits, per_channel, axis

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        qmax = 2 ** (self.bits - 1) - 1
        s = weight_scale(w, self.bits, self.per_channel, self.axis)
        if self.per_channel:
            zp = torch.zeros(s.shape, dtype=torch.int32)
            return torch.fake_quantize_per_channel_affine(w, s, zp, self.axis, -qmax, qmax)
        return torch.fake_quantize_per_tensor_affine(w, float(s), 0, -qmax, qmax)


def activation_qparams(lo: float, hi: float) -> tuple[float, int]:
    """Asymmetric int8 (scale, zero point) of a range widened to hold 0 (TFLite's activation scheme)."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    scale = max((hi - lo) / 255.0, 1e-12)
    zp = int(np.clip(round(-128 - lo / scale), -128, 127))
    return scale, zp


@dataclass
class FakeQuantHandle:
    """What :func:`apply_fake_quant` attached; :func:`remove_fake_quant` undoes it.

    Attributes:
        modules: student module name -> ``{"node", "bits", "granularity", "input_range"}``.
        skipped: plan nodes left in float during QAT, with the reason.
    """

    modules: dict[str, dict[str, Any]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    hooks: list[Any] = field(default_factory=list)
    _parametrized: list[nn.Module] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {"fake_quantized_modules": len(self.modules), "modules": self.modules,
                "skipped_nodes": self.skipped}


def _digest(a: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(a, dtype=np.float32).tobytes()).hexdigest()


def map_plan_to_modules(student: nn.Module, model: onnx.ModelProto, plan: QuantPlan
                        ) -> tuple[dict[str, tuple[str, str, int]], dict[str, str]]:
    """Plan node -> (student module name, activation input tensor, weight axis) for INT8 weighted nodes.

    A node's weight initializer is matched to a student parameter by value (the parameter itself, or its
    transpose for a ``Linear`` exported as ``MatMul``), so the mapping survives renaming by the
    exporter and canonicalization. Returns (mapping, skipped node -> reason).
    """
    inits = {t.name: t for t in model.graph.initializer}
    by_value: dict[str, str] = {}
    for pname, p in student.named_parameters():
        if not pname.endswith("weight") or p.dim() < 2:
            continue
        mod = pname.rsplit(".", 1)[0] if "." in pname else ""
        a = p.detach().cpu().numpy()
        by_value.setdefault(_digest(a), mod)
        if a.ndim == 2:
            by_value.setdefault(_digest(a.T), mod)
    mapping: dict[str, tuple[str, str, int]] = {}
    skipped: dict[str, str] = {}
    nodes = {n.name: n for n in model.graph.node}
    for name, dec in plan.nodes.items():
        if dec.precision != Precision.INT8 or dec.op_type not in QUANT_OPS or name not in nodes:
            continue
        node = nodes[name]
        weight = next((i for i in node.input[1:2] if i in inits), None)
        if weight is None:
            skipped[name] = "no constant weight (activation x activation)"
            continue
        mod = by_value.get(_digest(numpy_helper.to_array(inits[weight])))
        if mod is None:
            skipped[name] = "weight not found among the student's parameters (changed by canonicalization)"
            continue
        axis = 1 if isinstance(student.get_submodule(mod), nn.ConvTranspose2d) else 0
        mapping[name] = (mod, node.input[0], axis)
    return mapping, skipped


def apply_fake_quant(student: nn.Module, model: onnx.ModelProto, plan: QuantPlan) -> FakeQuantHandle:
    """Attach weight and input fake quantization to the student's modules that the plan puts in INT8.

    Args:
        student: the torch module ``model`` was exported from (same weights).
        model: the canonical FP32 ONNX the plan was made for.
        plan: its plan (weight schemes and activation ranges are read, nothing is written).
    """
    handle = FakeQuantHandle()
    mapping, handle.skipped = map_plan_to_modules(student, model, plan)
    for node, (mod_name, act, axis) in mapping.items():
        mod = student.get_submodule(mod_name)
        if mod_name in handle.modules:
            continue
        scheme = plan.nodes[node].weight
        bits = scheme.bits if scheme is not None else 8
        per_channel = scheme is None or scheme.granularity == Granularity.PER_CHANNEL
        parametrize.register_parametrization(mod, "weight", FakeQuantWeight(bits, per_channel, axis))
        handle._parametrized.append(mod)
        rng = plan.ranges.get(act)
        info: dict[str, Any] = {"node": node, "bits": bits, "granularity": "per_channel" if per_channel else "per_tensor",
                                "input_range": None}
        if rng is not None:
            scale, zp = activation_qparams(rng.min, rng.max)
            info["input_range"] = [rng.min, rng.max]

            def pre_hook(_m: nn.Module, args: tuple[Any, ...], scale: float = scale, zp: int = zp) -> tuple[Any, ...]:
                x = args[0]
                return (torch.fake_quantize_per_tensor_affine(x, scale, zp, -128, 127), *args[1:])

            handle.hooks.append(mod.register_forward_pre_hook(pre_hook))
        handle.modules[mod_name] = info
    return handle


def remove_fake_quant(handle: FakeQuantHandle, bake_weights: bool = True) -> None:
    """Remove the hooks and parametrizations; with ``bake_weights`` the weights keep their fake-quantized
    values (on the plan's grid, so the later PTQ reproduces them exactly)."""
    for h in handle.hooks:
        h.remove()
    handle.hooks.clear()
    for mod in handle._parametrized:
        if parametrize.is_parametrized(mod, "weight"):
            parametrize.remove_parametrizations(mod, "weight", leave_parametrized=bake_weights)
    handle._parametrized.clear()
