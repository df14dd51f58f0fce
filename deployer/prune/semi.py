"""2:4 semi-structured sparsity of a torch model: which layers are eligible, the magnitude masks, and
keeping them during recovery fine-tuning.

Eligibility (each rule with its source):

- ``nn.Linear`` and ``nn.Conv2d`` with ``groups == 1``: the layer types NVIDIA's ASP (Automatic SParsity,
  ``apex.contrib.sparsity``) prunes by default; a depthwise/grouped convolution has no input-channel
  reduction of 4 to prune along.
- weight ``[O, I, ...]`` with ``O % 8 == 0`` and ``I % 16 == 0``: ASP skips every other shape
  ("check for NVIDIA's TC compatibility", ``apex/contrib/sparsity/asp.py``), the shapes sparse tensor cores
  take; ``I % 4 == 0`` is the pattern's own minimum (TensorRT Developer Guide, "Structured Sparsity").
- the pattern runs along the input channels (for a convolution: for each output channel and each kernel
  position, every 4 consecutive input channels hold at least 2 zeros), as TensorRT and cuSPARSELt require
  (TensorRT Developer Guide, "Structured Sparsity"; NVIDIA blog "Accelerating Inference with Sparsity Using
  the NVIDIA Ampere Architecture and NVIDIA TensorRT", 2021).

Masks are magnitude masks (ASP's ``m4n2_1d``: keep the 2 largest |w| of each group). During fine-tuning each
eligible weight is reparametrized as ``weight = original * mask`` (``torch.nn.utils.parametrize``), so the
optimizer cannot move a pruned weight off zero; :func:`bake_masks` removes the parametrization and leaves
the masked weight.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from deployer.prune.pattern import is_2to4, mask_2to4


def eligible(module: nn.Module) -> tuple[bool, str]:
    """(eligible, reason when not) for 2:4 pruning of ``module``'s weight (rules in the module docstring)."""
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            return False, f"grouped/depthwise convolution (groups {module.groups})"
    elif not isinstance(module, nn.Linear):
        return False, "not a Linear or Conv2d"
    o, i = int(module.weight.shape[0]), int(module.weight.shape[1])
    if o % 8 or i % 16:
        return False, f"weight {tuple(module.weight.shape)}: ASP needs output channels % 8 == 0 and input channels % 16 == 0"
    return True, ""


class _Mask(nn.Module):
    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * self.mask


def apply_2to4(model: nn.Module, skip: set[str] | None = None, keep_masks: bool = True) -> dict[str, Any]:
    """Prune every eligible weight of ``model`` to 2:4 by magnitude and keep the masks for fine-tuning.

    Args:
        skip: module names left dense.
        keep_masks: register the masks as parametrizations (False: only zero the weights).

    Returns:
        ``{"sparse_layers": [names], "skipped": {name: reason}}``; the masks live as parametrizations until
        :func:`bake_masks`.
    """
    sparse, skipped = [], {}
    for name, m in list(model.named_modules()):
        if not isinstance(m, (nn.Linear, nn.Conv2d)):
            continue
        ok, why = eligible(m)
        if skip and name in skip:
            ok, why = False, "kept dense (output layer)"
        if not ok:
            skipped[name] = why
            continue
        w = m.weight.detach().cpu().numpy()
        mask = torch.from_numpy(mask_2to4(w, 1).astype(np.float32))
        with torch.no_grad():
            m.weight.mul_(mask)
        if keep_masks:
            parametrize.register_parametrization(m, "weight", _Mask(mask))
        sparse.append(name)
    return {"sparse_layers": sparse, "skipped": skipped}


def bake_masks(model: nn.Module) -> None:
    """Remove the mask parametrizations, leaving ``weight = original * mask`` as a plain parameter."""
    for m in model.modules():
        if parametrize.is_parametrized(m, "weight"):
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)


def torch_pattern_holds(model: nn.Module, names: list[str]) -> dict[str, bool]:
    """Module name -> the 2:4 pattern holds in its weight (input channels = axis 1)."""
    out = {}
    for name in names:
        w = model.get_submodule(name).weight.detach().cpu().numpy()
        out[name] = is_2to4(w, 1)
    return out
