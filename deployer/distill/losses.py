"""Distillation losses (PyTorch): logits, hidden states, attention maps, self-distillation.

All functions take float tensors (float32 on CPU in this project) and return a scalar tensor that
carries gradient to the student (and to a learnable temperature / projection where one is given);
teacher tensors are detached inside every loss, so a teacher never receives gradient.

Sources:

- Logit distillation and the T^2 factor: Hinton, Vinyals, Dean 2015, "Distilling the Knowledge in a
  Neural Network" (arXiv:1503.02531). The seed's range for a learnable T is [3, 10].
- Hidden-state matching: Romero et al. 2015, "FitNets: Hints for Thin Deep Nets" (learned regressor when
  widths differ); Sanh et al. 2019, "DistilBERT" (cosine embedding loss on hidden states); Jiao et al.
  2020, "TinyBERT" (layer mapping student layer i <- teacher layer g(i), learned projection W_h).
- Attention-map matching: Jiao et al. 2020 "TinyBERT" (MSE between attention matrices of mapped layers);
  Wang et al. 2020 "MiniLM" (last-layer self-attention distribution transfer).
- Self-distillation: Zhang et al. 2019, "Be Your Own Teacher" (shallow exits learn from the deepest
  exit of the same network); Furlanello et al. 2018, "Born-Again Neural Networks" (a model learns from a
  frozen earlier generation/checkpoint of itself).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
import torch
from torch import nn
from torch.nn import functional as F

from deployer.errors import BadInputError

T_MIN = 3.0
T_MAX = 10.0


class Temperature(nn.Module):
    """Distillation temperature, fixed or learnable within ``[t_min, t_max]`` (default the seed's [3, 10]).

    Learnable: ``T = t_min + (t_max - t_min) * sigmoid(raw)`` with ``raw`` an ``nn.Parameter``, so T can
    never leave the interval whatever the optimizer does, and it always receives gradient (the sigmoid
    never saturates to exactly 0 slope in float32 for |raw| < ~88).

    Args:
        value: initial temperature, strictly inside ``(t_min, t_max)`` when learnable, any ``> 0`` when fixed.
        learnable: make T a trained parameter.

    Raises:
        BadInputError: ``value`` out of range.
    """

    def __init__(self, value: float = 4.0, learnable: bool = False, t_min: float = T_MIN, t_max: float = T_MAX) -> None:
        super().__init__()
        self.t_min, self.t_max, self.learnable = float(t_min), float(t_max), bool(learnable)
        if learnable:
            if not t_min < value < t_max:
                raise BadInputError(f"learnable temperature must start strictly inside ({t_min}, {t_max}), got {value}")
            p = (value - t_min) / (t_max - t_min)
            self.raw = nn.Parameter(torch.tensor(float(torch.logit(torch.tensor(p))), dtype=torch.float32))
        else:
            if not value > 0:
                raise BadInputError(f"temperature must be > 0, got {value}")
            self.register_buffer("fixed", torch.tensor(float(value), dtype=torch.float32))

    def forward(self) -> torch.Tensor:
        """The temperature, a 0-d float32 tensor."""
        if self.learnable:
            return self.t_min + (self.t_max - self.t_min) * torch.sigmoid(self.raw)
        return self.fixed  # type: ignore[no-any-return]

    def value(self) -> float:
        return float(self.forward().detach())


def _temperature(t: float | torch.Tensor | Temperature) -> torch.Tensor:
    if isinstance(t, Temperature):
        return t()
    return t if isinstance(t, torch.Tensor) else torch.tensor(float(t))


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float | torch.Tensor | Temperature,
            direction: str = "forward") -> torch.Tensor:
    """Hinton et al. 2015 logit distillation: ``KL(p_T || p_S) * T^2`` averaged over the batch.

    ``p_S = softmax(student / T)``, ``p_T = softmax(teacher / T)`` along the last axis. The ``T^2`` factor
    keeps the gradient magnitude independent of T (Hinton et al. section 2). ``direction="forward"``
    (default, Hinton's form and the one every peer implements) is ``sum p_T (log p_T - log p_S)``;
    ``direction="reverse"`` is the literal ``KL(p_S || p_T)`` of the seed's notation.

    Args:
        student_logits, teacher_logits: float ``[B, C]`` (or ``[..., C]``; leading axes are averaged).

    Raises:
        BadInputError: shapes differ or ``direction`` is unknown.
    """
    if student_logits.shape != teacher_logits.shape:
        raise BadInputError(f"kd_loss: student logits {tuple(student_logits.shape)} and teacher logits "
                            f"{tuple(teacher_logits.shape)} differ; the student must predict the teacher's classes")
    t = _temperature(temperature)
    log_s = F.log_softmax(student_logits / t, dim=-1)
    log_t = F.log_softmax(teacher_logits.detach() / t, dim=-1)
    if direction == "forward":
        kl = (log_t.exp() * (log_t - log_s)).sum(-1)
    elif direction == "reverse":
        kl = (log_s.exp() * (log_s - log_t)).sum(-1)
    else:
        raise BadInputError(f"kd_loss: direction {direction!r} must be 'forward' or 'reverse'")
    return kl.mean() * t * t


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor | None,
                      temperature: float | torch.Tensor | Temperature, alpha: float = 0.5) -> torch.Tensor:
    """``alpha * kd_loss + (1 - alpha) * cross_entropy(student, labels)`` (Hinton et al. 2015).

    Without labels (``None``) the task term is dropped and the KD term has weight 1.

    Args:
        labels: int64 ``[B]`` class indices, or None.
        alpha: weight of the distillation term in [0, 1].

    Raises:
        BadInputError: ``alpha`` outside [0, 1].
    """
    if not 0.0 <= alpha <= 1.0:
        raise BadInputError(f"--alpha {alpha}: the distillation weight must be in [0, 1]")
    kd = kd_loss(student_logits, teacher_logits, temperature)
    if labels is None:
        return kd
    return alpha * kd + (1.0 - alpha) * F.cross_entropy(student_logits, labels)


def every_other_layer_map(n_student: int, n_teacher: int, with_embeddings: bool = True) -> dict[int, int]:
    """The uniform layer map of TinyBERT / DistilBERT: student layer i <- teacher layer ``i * n_teacher / n_student``.

    With ``with_embeddings`` the indices address a Hugging Face ``hidden_states`` tuple (index 0 the
    embeddings, index k the output of layer k), so for 3 <- 6 layers the map is ``{0: 0, 1: 2, 2: 4, 3: 6}``.
    Without, indices address attention maps of layers 0..n-1, each student layer matched to the teacher
    layer at the end of its block: ``{0: 1, 1: 3, 2: 5}``.

    Raises:
        BadInputError: the teacher depth is not a multiple of the student depth.
    """
    if n_student < 1 or n_teacher % n_student:
        raise BadInputError(f"layer map: teacher depth {n_teacher} is not a multiple of student depth {n_student}; "
                            f"give an explicit map")
    step = n_teacher // n_student
    if with_embeddings:
        return {i: i * step for i in range(n_student + 1)}
    return {i: (i + 1) * step - 1 for i in range(n_student)}


class HiddenStateLoss(nn.Module):
    """Cosine distance between mapped student and teacher hidden states (DistilBERT's cosine loss,
    TinyBERT's layer map, FitNets' learned regressor).

    ``loss = mean over mapped pairs (s, t) of mean over tokens of 1 - cos(W_s h_s, h_t)`` where ``W_s`` is
    a learned ``nn.Linear(student_width, teacher_width, bias=False)`` created only when the widths differ
    (identity otherwise). Padding tokens are excluded when a mask is given.

    Args:
        layer_map: student index -> teacher index into the sequences given to :meth:`forward`.
        student_width, teacher_width: last-axis sizes of the hidden states.

    Raises:
        BadInputError: an index is out of range or a width does not match (in :meth:`forward`).
    """

    def __init__(self, layer_map: Mapping[int, int], student_width: int, teacher_width: int) -> None:
        super().__init__()
        self.layer_map = {int(k): int(v) for k, v in layer_map.items()}
        self.student_width, self.teacher_width = int(student_width), int(teacher_width)
        self.projections = nn.ModuleDict()
        if student_width != teacher_width:
            for s in self.layer_map:
                self.projections[str(s)] = nn.Linear(student_width, teacher_width, bias=False)

    def forward(self, student_hidden: Sequence[torch.Tensor], teacher_hidden: Sequence[torch.Tensor],
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """Args: hidden states ``[B, L, D]`` (or ``[B, D]``); ``mask`` ``[B, L]`` of 0/1 (1 = real token)."""
        losses = []
        for s, t in self.layer_map.items():
            if s >= len(student_hidden) or t >= len(teacher_hidden):
                raise BadInputError(f"hidden-state map {s} <- {t}: the student has {len(student_hidden)} and the "
                                    f"teacher {len(teacher_hidden)} hidden states")
            hs, ht = student_hidden[s], teacher_hidden[t].detach()
            if hs.shape[-1] != self.student_width or ht.shape[-1] != self.teacher_width:
                raise BadInputError(f"hidden-state map {s} <- {t}: widths {hs.shape[-1]} / {ht.shape[-1]}, expected "
                                    f"{self.student_width} / {self.teacher_width}")
            if str(s) in self.projections:
                hs = self.projections[str(s)](hs)
            dist = 1.0 - F.cosine_similarity(hs, ht, dim=-1, eps=1e-8)
            if mask is not None and dist.dim() == 2:
                m = mask.to(dist.dtype)
                losses.append((dist * m).sum() / m.sum().clamp(min=1.0))
            else:
                losses.append(dist.mean())
        return torch.stack(losses).mean()


def attention_loss(student_attn: Sequence[torch.Tensor], teacher_attn: Sequence[torch.Tensor],
                   layer_map: Mapping[int, int], mask: torch.Tensor | None = None,
                   reduction: str = "mse") -> torch.Tensor:
    """L2 matching of attention probabilities of mapped layers (TinyBERT's attention loss, MiniLM).

    Attention tensors are ``[B, H, L, L]`` probabilities (rows sum to 1). When student and teacher head
    counts differ both sides are averaged over heads first (``[B, 1, L, L]``). ``reduction="mse"``: mean
    squared error over all elements (over valid query rows when ``mask`` is given);
    ``reduction="row_l2"``: squared L2 distance of each attention row (summed over keys), averaged over
    rows, i.e. the MSE times L -- the same minimiser with a scale that does not shrink with L.
    The result is averaged over the mapped layers.

    Args:
        mask: ``[B, L]`` 0/1; padded query rows are excluded.

    Raises:
        BadInputError: an index out of range, sequence lengths that differ, or an unknown reduction.
    """
    if reduction not in ("mse", "row_l2"):
        raise BadInputError(f"attention_loss: reduction {reduction!r} must be 'mse' or 'row_l2'")
    losses = []
    for s, t in layer_map.items():
        if s >= len(student_attn) or t >= len(teacher_attn):
            raise BadInputError(f"attention map {s} <- {t}: the student has {len(student_attn)} and the teacher "
                                f"{len(teacher_attn)} attention maps")
        a_s, a_t = student_attn[s], teacher_attn[t].detach()
        if a_s.shape[-2:] != a_t.shape[-2:] or a_s.shape[0] != a_t.shape[0]:
            raise BadInputError(f"attention map {s} <- {t}: shapes {tuple(a_s.shape)} and {tuple(a_t.shape)} differ")
        if a_s.shape[1] != a_t.shape[1]:
            a_s, a_t = a_s.mean(dim=1, keepdim=True), a_t.mean(dim=1, keepdim=True)
        sq = (a_s - a_t) ** 2
        per_row = sq.sum(-1) if reduction == "row_l2" else sq.mean(-1)  # [B, H, L]
        if mask is not None:
            m = mask.to(per_row.dtype)[:, None, :].expand_as(per_row)
            losses.append((per_row * m).sum() / m.sum().clamp(min=1.0))
        else:
            losses.append(per_row.mean())
    return torch.stack(losses).mean()


def self_distillation_loss(exit_logits: Sequence[torch.Tensor], labels: torch.Tensor | None,
                           temperature: float | torch.Tensor | Temperature, alpha: float = 0.5) -> torch.Tensor:
    """Be Your Own Teacher (Zhang et al. 2019): the deepest exit teaches every shallower exit.

    ``exit_logits`` are ``[B, C]`` logits of the exits from shallow to deep; the last one is the teacher
    (detached for the KD terms). Loss = task loss of the deepest exit (when labels are given) + sum over
    shallow exits of :func:`distillation_loss` against the deepest exit.

    Raises:
        BadInputError: fewer than two exits.
    """
    if len(exit_logits) < 2:
        raise BadInputError("self-distillation needs at least two exits (shallow ones and the deepest)")
    deepest = exit_logits[-1]
    total = F.cross_entropy(deepest, labels) if labels is not None else deepest.new_zeros(())
    for shallow in exit_logits[:-1]:
        total = total + distillation_loss(shallow, deepest.detach(), labels, temperature, alpha)
    return total


def frozen_copy(model: nn.Module) -> nn.Module:
    """Born-Again Networks (Furlanello et al. 2018): a frozen, eval-mode copy of ``model`` (an earlier
    checkpoint of itself) to use as its own teacher with :func:`distillation_loss`."""
    teacher = copy.deepcopy(model).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


__all__ = ["Temperature", "kd_loss", "distillation_loss", "HiddenStateLoss", "attention_loss",
           "self_distillation_loss", "frozen_copy", "every_other_layer_map", "T_MIN", "T_MAX"]

