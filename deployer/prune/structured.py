"""Structured channel pruning with Torch-Pruning (Fang et al. 2023, "DepGraph: Towards Any Structural
Pruning"; PyPI ``torch-pruning``).

Torch-Pruning traces the model once and builds a dependency graph: removing output channel ``k`` of a
convolution also removes input channel ``k`` of every consumer, the matching BatchNorm entries, the same
channel of every layer joined by a residual ``Add`` (the whole group loses it together), the matching slice
after a ``Concat``, and the channel of a depthwise convolution with its producer. Channels are ranked by
the chosen importance within each group and the lowest ``ratio`` are removed (``global_pruning=False``:
each group by its own ratio). The layer that produces the model output is never pruned (its channels are
the output's), so the output shape is unchanged.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from deployer.errors import BadInputError, BackendUnavailableError
from deployer.prune.options import PruneOptions, Rule

PRUNABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def _tp() -> Any:
    try:
        import torch_pruning
    except ImportError:
        raise BackendUnavailableError("channel pruning needs torch-pruning; run the README install command "
                                      "(pip install -e '.[pruning]' -c constraints.txt)") from None
    return torch_pruning


def importance(criterion: str) -> Any:
    """Torch-Pruning importance object for ``criterion`` (see :mod:`deployer.prune.options`)."""
    tp = _tp()
    if criterion == "l1":
        return tp.importance.MagnitudeImportance(p=1)
    if criterion == "l2":
        return tp.importance.MagnitudeImportance(p=2)
    if criterion == "bn-scale":
        return tp.importance.BNScaleImportance()
    if criterion == "taylor":
        return tp.importance.TaylorImportance()
    raise BadInputError(f"--criterion {criterion!r}: use one of l1, l2, bn-scale, taylor")


def output_layer(model: nn.Module, example: tuple[torch.Tensor, ...]) -> nn.Module | None:
    """The last Conv/Linear the forward pass runs (the output layer; kept whole)."""
    order: list[nn.Module] = []
    hooks = [m.register_forward_hook(lambda mod, i, o: order.append(mod)) for m in model.modules()
             if isinstance(m, PRUNABLE)]
    try:
        with torch.no_grad():
            model(*example)
    finally:
        for h in hooks:
            h.remove()
    return order[-1] if order else None


def layer_ratios(model: nn.Module, rules: list[Rule], default: float) -> dict[str, float]:
    """Module name -> ratio for every prunable layer under ordered ``rules`` (first fnmatch match wins)."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, PRUNABLE):
            hit = next((r for r in rules if fnmatch.fnmatchcase(name, r.match)), None)
            out[name] = hit.ratio if hit is not None else default
    return out


def channel_counts(model: nn.Module) -> dict[str, int]:
    """Module name -> output channels (Conv) / features (Linear)."""
    return {n: int(m.out_channels if isinstance(m, nn.modules.conv._ConvNd) else m.out_features)
            for n, m in model.named_modules() if isinstance(m, PRUNABLE)}


def count_macs_params(model: nn.Module, example: tuple[torch.Tensor, ...]) -> tuple[int, int]:
    """(multiply-accumulates, parameters) of one forward pass on ``example``.

    MACs of the weighted layers (subclasses included, e.g. "same"-padding convolutions): a convolution
    ``output elements x in_channels / groups x kernel size``, a Linear ``output elements x in_features``;
    MatMuls between activations (attention) and element-wise ops are not counted.
    """
    total = [0]

    def hook(m: nn.Module, i: Any, o: torch.Tensor) -> None:
        if isinstance(m, nn.modules.conv._ConvNd):
            k = int(torch.tensor(m.kernel_size).prod())
            total[0] += o.numel() * (m.in_channels // m.groups) * k
        elif isinstance(m, nn.Linear):
            total[0] += o.numel() * m.in_features

    hooks = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, PRUNABLE + (nn.ConvTranspose2d,))]
    try:
        with torch.no_grad():
            model(*example)
    finally:
        for h in hooks:
            h.remove()
    return int(total[0]), int(sum(p.numel() for p in model.parameters()))


def prune_channels(model: nn.Module, example: tuple[torch.Tensor, ...], opts: PruneOptions,
                   taylor_loss: Callable[[nn.Module], torch.Tensor] | None = None) -> dict[str, Any]:
    """Remove output channels of ``model`` in place (see the module docstring).

    Args:
        example: one batch of inputs (the dependency graph is traced on it).
        opts: ``ratio`` (global) or ``rules``/``default``, ``criterion``, ``round_to``.
        taylor_loss: for ``taylor``: a function computing a scalar loss of the model on a few samples (its
            gradients rank the channels).

    Returns:
        ``{"layers": {name: {"before": c, "after": c}}, "ignored": [...], "output_layer": name}``.

    Raises:
        BadInputError: a transformer encoder (prune it with ``--sparsity 2:4``), or the output shape changed.
    """
    from deployer.distill.students import find_transformer

    tp = _tp()
    if find_transformer(model) is not None:
        raise BadInputError("structured channel pruning of transformer encoders (attention heads) is not supported; "
                            "use --sparsity 2:4 (TensorRT) or distillation (deploy distill) for them")
    model.eval()
    with torch.no_grad():
        ref_shape = tuple(model(*example).shape)
    out_layer = output_layer(model, example)
    names = {m: n for n, m in model.named_modules()}
    ignored: list[nn.Module] = [out_layer] if out_layer is not None else []
    ratio_dict: dict[nn.Module, float] = {}
    global_ratio = opts.ratio or 0.0
    if opts.rules:
        for name, r in layer_ratios(model, opts.rules, opts.default).items():
            mod = model.get_submodule(name)
            if mod not in ignored and r > 0.0:  # ratio 0: the layer's own group is not pruned (its channels
                ratio_dict[mod] = r              # still follow a group it is tied to: depthwise, residual)
    before = channel_counts(model)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    for p in model.parameters():  # Torch-Pruning traces the graph through autograd: a frozen model shows no layer
        p.requires_grad_(True)
    pruner = tp.pruner.MetaPruner(model, example[0] if len(example) == 1 else example,
                                  importance=importance(opts.criterion), pruning_ratio=global_ratio,
                                  pruning_ratio_dict=ratio_dict or None, ignored_layers=ignored,
                                  round_to=opts.round_to, global_pruning=False)
    if opts.criterion == "taylor":
        if taylor_loss is None:
            raise BadInputError("--criterion taylor needs data to compute gradients; give --data")
        model.zero_grad()
        taylor_loss(model).backward()
    pruner.step()
    model.zero_grad(set_to_none=True)
    for n, p in model.named_parameters():  # pruning replaced the pruned parameters: restore by name
        if n in frozen:
            p.requires_grad_(False)
    after = channel_counts(model)
    with torch.no_grad():
        shape = tuple(model(*example).shape)
    if shape != ref_shape:
        raise BadInputError(f"pruning changed the output shape {ref_shape} -> {shape}; keep the output layers whole "
                            f"with a rules entry of ratio 0")
    return {"layers": {n: {"before": before[n], "after": after.get(n, before[n])} for n in before},
            "ignored": sorted(names[m] for m in ignored if m in names),
            "output_layer": names.get(out_layer) if out_layer is not None else None}


def load_pruned_state(module: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """Load a pruned state dict (``pruned.pt``) into a fresh, unpruned instance of the same class, resizing
    Conv / Linear / BatchNorm layers to the saved shapes (a depthwise convolution stays depthwise).

    Returns ``module`` (changed in place, eval mode).

    Raises:
        BadInputError: a key of ``state`` is not a parameter or buffer of ``module``.
    """
    own = dict(module.named_parameters()) | dict(module.named_buffers())
    unknown = sorted(set(state) - set(own))
    if unknown:
        raise BadInputError(f"pruned state dict: {unknown[:3]} are not in this module; build the model class the "
                            f"pruned model came from")
    for name, m in module.named_modules():
        prefix = f"{name}." if name else ""
        for attr, tensor in list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False)):
            key = prefix + attr
            if key in state and tuple(state[key].shape) != tuple(tensor.shape):
                new = state[key].clone()
                if isinstance(tensor, nn.Parameter):
                    setattr(m, attr, nn.Parameter(new, requires_grad=tensor.requires_grad))
                else:
                    m.register_buffer(attr, new)
        if isinstance(m, nn.modules.conv._ConvNd):
            depthwise = m.groups == m.in_channels and m.groups > 1
            m.out_channels = int(m.weight.shape[0])
            if depthwise:
                m.groups = m.out_channels
            m.in_channels = int(m.weight.shape[1]) * m.groups
        elif isinstance(m, nn.Linear):
            m.out_features, m.in_features = int(m.weight.shape[0]), int(m.weight.shape[1])
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.num_features = int(m.running_mean.shape[0]) if m.running_mean is not None else m.num_features
    module.load_state_dict(state)
    return module.eval()
