"""Students: a user factory (``module:function``) or a shrink rule applied to the teacher.

Shrink rules (``--student shrink`` / ``shrink:W``):

- Transformers (a Hugging Face BERT-like encoder with ``encoder.layer`` and ``config.num_hidden_layers``,
  anywhere inside the module): keep every other layer, initialised from the teacher's layers
  (DistilBERT, Sanh et al. 2019: "taking one layer out of two"). By default the layers ending each
  block of two (1, 3, 5 of 6) are kept, so the student's last layer is the teacher's last layer and
  its output space is the teacher's; ``shrink:W`` keeps ``round(W * depth)`` evenly spaced layers.
- CNNs (``Conv2d`` / ``BatchNorm2d`` / ``Linear`` modules declared in data-flow order, as in
  :mod:`deployer.examples.mnist`): every hidden width times ``W``; the input channels of the first conv and
  the outputs of the last ``Linear`` are kept. The student is initialised from the teacher's channels
  with the largest L1 norms (Li et al. 2017, "Pruning Filters for Efficient ConvNets"). Plain ``shrink``
  picks the largest ``W`` (in steps of 0.05) whose student has at most 1/4 of the teacher's parameters.
"""

from __future__ import annotations

import copy
import importlib
import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from deployer.errors import BadInputError

DEFAULT_PARAM_FRACTION = 0.25


def count_params(module: nn.Module) -> int:
    """Number of parameters (trainable or not) of ``module``."""
    return sum(p.numel() for p in module.parameters())


def load_factory(spec: str, what: str = "--student") -> Callable[..., Any]:
    """Resolve ``package.module:function`` to the callable.

    Raises:
        BadInputError: malformed spec, module that cannot be imported, missing or non-callable attribute.
    """
    if not isinstance(spec, str) or spec.count(":") != 1 or not all(spec.split(":")):
        raise BadInputError(f"{what} {spec!r}: give a factory as module:function (e.g. mypkg.models:make_student)")
    mod_name, fn_name = spec.split(":")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise BadInputError(f"{what} {spec!r}: cannot import module {mod_name!r} ({e.msg}); check the name and "
                            f"that it is on PYTHONPATH") from None
    except Exception as e:  # the user's module raised while importing
        raise BadInputError(f"{what} {spec!r}: importing {mod_name!r} failed: {type(e).__name__}: "
                            f"{' '.join(str(e).split())[:200]}") from None
    fn = getattr(mod, fn_name, None)
    if fn is None:
        raise BadInputError(f"{what} {spec!r}: module {mod_name!r} has no attribute {fn_name!r}")
    if not callable(fn):
        raise BadInputError(f"{what} {spec!r}: {fn_name!r} is a {type(fn).__name__}, not a function")
    return fn  # type: ignore[no-any-return]


def build_from_factory(spec: str, teacher: nn.Module | None = None, what: str = "--student") -> nn.Module:
    """Call a ``module:function`` factory; it may take the teacher as its one argument.

    Raises:
        BadInputError: bad spec, the factory raised, or it did not return a ``torch.nn.Module``.
    """
    fn = load_factory(spec, what)
    try:
        params = [p for p in inspect.signature(fn).parameters.values()
                  if p.default is inspect.Parameter.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        params = []
    try:
        out = fn(teacher) if params and teacher is not None else fn()
    except Exception as e:
        raise BadInputError(f"{what} {spec!r}: the factory raised {type(e).__name__}: "
                            f"{' '.join(str(e).split())[:200]}") from None
    if not isinstance(out, nn.Module):
        raise BadInputError(f"{what} {spec!r}: the factory returned a {type(out).__name__}, not a torch.nn.Module")
    return out


def find_transformer(module: nn.Module) -> tuple[str, nn.Module] | None:
    """(dotted name, submodule) of the first BERT-like encoder: has ``config.num_hidden_layers`` and an
    ``encoder.layer`` ``nn.ModuleList``; None when there is none."""
    for name, sub in module.named_modules():
        enc = getattr(sub, "encoder", None)
        if hasattr(sub, "config") and isinstance(getattr(enc, "layer", None), nn.ModuleList):
            return name, sub
    return None


def shrink_transformer(teacher: nn.Module, keep: list[int] | None = None, fraction: float = 0.5) -> tuple[nn.Module, list[int]]:
    """Deep copy of ``teacher`` whose encoder keeps only layers ``keep`` (default: every other layer, the
    last of each pair: 1, 3, 5 of 6). Returns (student, kept teacher layer indices).

    Raises:
        BadInputError: no BERT-like encoder, or indices out of range.
    """
    found = find_transformer(teacher)
    if found is None:
        raise BadInputError("shrink: the teacher has no BERT-like encoder (encoder.layer) and no Conv2d/Linear "
                            "layers to narrow; give --student module:function")
    depth = len(found[1].encoder.layer)  # type: ignore[union-attr,arg-type]
    if keep is None:
        n = max(1, round(depth * fraction))
        step = depth / n
        keep = [int(round((i + 1) * step)) - 1 for i in range(n)]
    if not keep or any(not 0 <= k < depth for k in keep) or sorted(set(keep)) != list(keep):
        raise BadInputError(f"shrink: layers to keep {keep} must be increasing indices in 0..{depth - 1}")
    student = copy.deepcopy(teacher)
    name, enc_owner = find_transformer(student)  # type: ignore[misc]
    layers = enc_owner.encoder.layer  # type: ignore[union-attr]
    enc_owner.encoder.layer = nn.ModuleList([layers[k] for k in keep])  # type: ignore[union-attr,index]
    enc_owner.config.num_hidden_layers = len(keep)  # type: ignore[union-attr]
    for i, layer in enumerate(enc_owner.encoder.layer):  # type: ignore[union-attr,arg-type]
        attn = getattr(layer, "attention", None)
        for sub in (layer, attn, getattr(attn, "self", None)):
            if sub is not None and hasattr(sub, "layer_idx"):
                sub.layer_idx = i
    return student, list(keep)


def _cnn_layers(module: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in module.named_modules() if isinstance(m, (nn.Conv2d, nn.BatchNorm2d, nn.Linear))]


def shrink_cnn(teacher: nn.Module, width: float, example: torch.Tensor | None = None) -> nn.Module:
    """Copy of ``teacher`` with every hidden Conv2d/Linear width multiplied by ``width``.

    Layers are rebuilt in declaration order (which must be data-flow order): a conv's input channels
    follow the previous conv's kept channels, a ``Linear`` after convs keeps the flatten factor
    ``in_features / channels`` (channel-major flatten), ``BatchNorm2d`` follows its conv. Weights are the
    teacher's at the kept channels (largest L1 norm of each output filter/row). Grouped/depthwise convs are
    not supported.

    Args:
        width: multiplier in (0, 1].
        example: an input to check the rebuilt student with (recommended).

    Raises:
        BadInputError: width out of range, unsupported layers, or a student that does not run.
    """
    if not 0.0 < width <= 1.0:
        raise BadInputError(f"shrink:{width}: the width multiplier must be in (0, 1]")
    layers = _cnn_layers(teacher)
    if not any(isinstance(m, nn.Conv2d) for _, m in layers):
        raise BadInputError("shrink: the teacher has no Conv2d layer (and no BERT-like encoder); give --student module:function")
    if any(isinstance(m, nn.Conv2d) and m.groups != 1 for _, m in layers):
        raise BadInputError("shrink: grouped/depthwise convolutions are not supported by the width rule; give "
                            "--student module:function")
    linears = [n for n, m in layers if isinstance(m, nn.Linear)]
    last_linear = linears[-1] if linears else None
    student = copy.deepcopy(teacher)
    prev_keep: torch.Tensor | None = None  # kept channel indices of the previous layer's output
    prev_width: int | None = None  # the teacher's width of that output
    prev_conv = False
    for name, m in layers:
        new: nn.Module
        if isinstance(m, nn.Conv2d):
            w = m.weight.detach()
            in_idx = prev_keep if prev_keep is not None else torch.arange(m.in_channels)
            n_out = max(1, int(round(m.out_channels * width)))
            keep = torch.sort(torch.argsort(w.abs().sum(dim=(1, 2, 3)), descending=True, stable=True)[:n_out]).values
            new = nn.Conv2d(len(in_idx), n_out, m.kernel_size, m.stride, m.padding, m.dilation,  # type: ignore[arg-type]
                            bias=m.bias is not None, padding_mode=m.padding_mode)
            with torch.no_grad():
                new.weight.copy_(w[keep][:, in_idx])
                if m.bias is not None:
                    new.bias.copy_(m.bias.detach()[keep])  # type: ignore[union-attr]
            prev_keep, prev_width, prev_conv = keep, m.out_channels, True
        elif isinstance(m, nn.BatchNorm2d):
            if prev_keep is None or prev_width != m.num_features:
                raise BadInputError(f"shrink: BatchNorm2d {name!r} does not follow a conv of {m.num_features} channels")
            new = copy.deepcopy(m)
            new.num_features = len(prev_keep)
            with torch.no_grad():
                for attr in ("weight", "bias", "running_mean", "running_var"):
                    t = getattr(m, attr)
                    if t is not None:
                        setattr(new, attr, nn.Parameter(t.detach()[prev_keep].clone()) if isinstance(t, nn.Parameter)
                                else t.detach()[prev_keep].clone())
        else:
            assert isinstance(m, nn.Linear)
            w = m.weight.detach()
            if prev_keep is None:
                in_idx = torch.arange(m.in_features)
            elif prev_conv:
                assert prev_width is not None
                if m.in_features % prev_width:
                    raise BadInputError(f"shrink: Linear {name!r} has {m.in_features} inputs, not a multiple of the "
                                        f"{prev_width} channels before it; give --student module:function")
                spatial = m.in_features // prev_width
                in_idx = (prev_keep[:, None] * spatial + torch.arange(spatial)[None, :]).reshape(-1)
            else:
                in_idx = prev_keep
            n_out = m.out_features if name == last_linear else max(1, int(round(m.out_features * width)))
            keep = torch.arange(m.out_features) if name == last_linear else \
                torch.sort(torch.argsort(w.abs().sum(dim=1), descending=True, stable=True)[:n_out]).values
            new = nn.Linear(len(in_idx), n_out, bias=m.bias is not None)
            with torch.no_grad():
                new.weight.copy_(w[keep][:, in_idx])
                if m.bias is not None:
                    new.bias.copy_(m.bias.detach()[keep])
            prev_keep, prev_width, prev_conv = keep, m.out_features, False
        _set_submodule(student, name, new)
    if example is not None:
        try:
            with torch.no_grad():
                student.eval()(example)
        except Exception as e:
            raise BadInputError(f"shrink: the narrowed CNN does not run ({type(e).__name__}: "
                                f"{' '.join(str(e).split())[:160]}); its layers may not be declared in data-flow "
                                f"order; give --student module:function") from None
    return student


def _set_submodule(root: nn.Module, dotted: str, new: nn.Module) -> None:
    parent_name, _, attr = dotted.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, new)


def shrink(teacher: nn.Module, spec: str, example: torch.Tensor | None = None,
           max_fraction: float = DEFAULT_PARAM_FRACTION) -> tuple[nn.Module, dict[str, Any]]:
    """Apply the built-in shrink rule ``spec`` (``shrink`` or ``shrink:W``) to ``teacher``.

    Returns (student, description) where the description names the rule and its parameters for the report.

    Raises:
        BadInputError: malformed spec, or a teacher the rules do not cover.
    """
    head, _, arg = spec.partition(":")
    if head != "shrink":
        raise BadInputError(f"--student {spec!r}: give shrink, shrink:W or module:function")
    width: float | None = None
    if arg:
        try:
            width = float(arg)
        except ValueError:
            raise BadInputError(f"--student {spec!r}: W in shrink:W must be a number in (0, 1]") from None
        if not 0.0 < width <= 1.0:
            raise BadInputError(f"--student {spec!r}: W in shrink:W must be in (0, 1]")
    if find_transformer(teacher) is not None:
        student, keep = shrink_transformer(teacher, fraction=0.5 if width is None else width)
        return student, {"rule": "transformer: keep every other layer" if width in (None, 0.5) else
                         f"transformer: keep {len(keep)} evenly spaced layers",
                         "kept_teacher_layers": keep, "init": "teacher layers (copied)"}
    total = count_params(teacher)
    if width is None:
        for k in range(20, 0, -1):
            w = k / 20
            cand = shrink_cnn(teacher, w, example)
            if count_params(cand) <= max_fraction * total:
                return cand, {"rule": f"cnn width multiplier (largest W giving <= {max_fraction:g} of the teacher's "
                              f"parameters)", "width": w, "init": "teacher channels with the largest L1 norm"}
        raise BadInputError("shrink: no width multiplier reaches the parameter budget; give shrink:W")
    return shrink_cnn(teacher, width, example), {"rule": "cnn width multiplier", "width": width,
                                                 "init": "teacher channels with the largest L1 norm"}
