"""The distillation training loop: seeded, resumable, with a progress bar.

- Determinism: ``torch.manual_seed(seed)`` before the run and a dedicated ``torch.Generator`` for the
  batch order (one permutation per epoch); the same seed, data and options give the same student.
- Checkpoints: every ``checkpoint_every`` steps and at each epoch end the loop writes
  ``checkpoint.pt`` (student, loss-module and optimizer state, epoch, batch, generator state at the
  start of the epoch, torch RNG state, elapsed time, history) atomically (write + rename). A run
  started again with ``resume=True`` continues from the last checkpoint at the same batch; checkpoints
  are read with ``torch.load(weights_only=True)`` (no pickled objects).
- Budget: ``max_seconds`` stops the loop (after a checkpoint) when the wall time, summed over resumes,
  exceeds it -- the fixed CPU budget of a benchmark.
- Progress: a rich progress bar on stderr when ``progress`` is true (the CLI enables it only on a
  terminal and never with ``--json``/``--quiet``).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deployer.errors import BadInputError

Batch = dict[str, torch.Tensor]
LossFn = Callable[[Batch, torch.Tensor | None], torch.Tensor]


@dataclass
class LoopConfig:
    """One training phase (distillation or QAT).

    Attributes:
        epochs: passes over the training samples.
        batch_size: samples per step.
        lr: Adam learning rate.
        seed: seed of the batch order and of torch's RNG.
        max_seconds: stop after this much wall time (None: no limit).
        checkpoint_every: steps between checkpoints (epoch ends always checkpoint).
        length_key: input holding a 0/1 attention mask: batches are then bucketed by text length
            (shuffle, sort chunks of 50 batches by length, shuffle the batches), so padding is trimmed
            per batch at little cost to randomness.
    """

    epochs: int = 5
    batch_size: int = 64
    lr: float = 1e-3
    seed: int = 0
    max_seconds: float | None = None
    checkpoint_every: int = 200
    length_key: str | None = None


def epoch_batches(n: int, batch_size: int, gen: torch.Generator, lengths: torch.Tensor | None = None
                  ) -> list[torch.Tensor]:
    """Index batches of one epoch drawn from ``gen`` (length-bucketed when ``lengths`` is given)."""
    order = torch.randperm(n, generator=gen)
    if lengths is None:
        return list(order.split(batch_size))
    batches: list[torch.Tensor] = []
    for chunk in order.split(batch_size * 50):
        chunk = chunk[torch.argsort(lengths[chunk], stable=True)]
        batches += list(chunk.split(batch_size))
    return [batches[int(i)] for i in torch.randperm(len(batches), generator=gen)]


@dataclass
class LoopResult:
    steps: int
    epochs_done: float
    seconds: float
    stopped_by_budget: bool
    resumed_from: dict[str, int] | None
    history: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "epochs_done": round(self.epochs_done, 3), "seconds": round(self.seconds, 1),
                "stopped_by_budget": self.stopped_by_budget, "resumed_from": self.resumed_from,
                "loss_per_epoch": [round(v, 6) for v in self.history]}


class _Bar:
    def __init__(self, enabled: bool, total: int, label: str, done: int = 0) -> None:
        self.p: Any = None
        if enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.p = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                              TextColumn("loss {task.fields[loss]}"), TimeRemainingColumn(),
                              console=Console(file=sys.stderr), transient=True)
            self.p.start()
            self.t = self.p.add_task(label, total=total, completed=done, loss="-")

    def update(self, done: int, loss: float) -> None:
        if self.p is not None:
            self.p.update(self.t, completed=done, loss=f"{loss:.4f}")

    def close(self) -> None:
        if self.p is not None:
            self.p.stop()


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """``torch.save`` to ``path`` through a temporary file and a rename (never a torn checkpoint)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path, key: str) -> dict[str, Any] | None:
    """The checkpoint at ``path`` (None when absent).

    Raises:
        BadInputError: unreadable, or written by a run with different options (``key`` differs).
    """
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        raise BadInputError(f"checkpoint {path} cannot be read (corrupt or not ours); delete it to start over") from None
    if not isinstance(state, dict) or state.get("key") != key:
        raise BadInputError(f"checkpoint {path} was written by a run with other options (teacher, student, data, "
                            f"seed, epochs ...); rerun with the same options or delete it to start over")
    return state


def train_loop(student: nn.Module, loss_fn: LossFn, samples: Batch, labels: torch.Tensor | None,
               extra: Sequence[nn.Module], cfg: LoopConfig, checkpoint: Path | None = None, key: str = "",
               resume: bool = False, progress: bool = False, label: str = "distill",
               log: Callable[[str], None] = lambda s: None) -> LoopResult:
    """Train ``student`` (and the parameters of ``extra``: a learnable temperature, projections) with Adam.

    Args:
        loss_fn: ``(batch, labels) -> scalar loss``; it runs the student and the teacher itself.
        samples: input name -> tensor with the samples on axis 0 (all of equal length N).
        labels: int64 ``[N]`` or None.
        checkpoint: ``checkpoint.pt`` path (None: no checkpoints).
        key: identity of the run's options, stored in and checked against the checkpoint.
        resume: continue from ``checkpoint`` when it exists.

    Raises:
        BadInputError: no samples, or a checkpoint that does not belong to this run.
    """
    n = len(next(iter(samples.values()))) if samples else 0
    if n == 0:
        raise BadInputError("distillation needs at least one training sample")
    if cfg.epochs < 1 or cfg.batch_size < 1 or not cfg.lr > 0:
        raise BadInputError(f"--epochs {cfg.epochs}, batch size {cfg.batch_size} and lr {cfg.lr} must be positive")
    torch.manual_seed(cfg.seed)
    params = [p for p in student.parameters() if p.requires_grad]
    for m in extra:
        params += [p for p in m.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    steps_per_epoch = (n + cfg.batch_size - 1) // cfg.batch_size
    lengths = samples[cfg.length_key].sum(dim=1) if cfg.length_key in samples else None
    epoch, start_batch, elapsed, history = 0, 0, 0.0, []
    gen_state = gen.get_state()
    resumed = None
    state = load_checkpoint(checkpoint, key) if (checkpoint is not None and resume) else None
    if state is not None:
        student.load_state_dict(state["student"])
        for m, sd in zip(extra, state["extra"]):
            m.load_state_dict(sd)
        opt.load_state_dict(state["optimizer"])
        epoch, start_batch, elapsed = int(state["epoch"]), int(state["batch"]), float(state["elapsed"])
        history = [float(v) for v in state["history"]]
        gen_state = state["gen_state"]
        torch.set_rng_state(state["torch_rng"])
        resumed = {"epoch": epoch, "batch": start_batch}
        log(f"{label}: resuming at epoch {epoch + 1}, batch {start_batch} ({elapsed:.0f} s already spent)")

    def snapshot(ep: int, batch: int, gs: torch.Tensor, spent: float) -> None:
        if checkpoint is None:
            return
        save_checkpoint(checkpoint, {"key": key, "student": student.state_dict(),
                                     "extra": [m.state_dict() for m in extra], "optimizer": opt.state_dict(),
                                     "epoch": ep, "batch": batch, "gen_state": gs, "torch_rng": torch.get_rng_state(),
                                     "elapsed": spent, "history": list(history)})

    total = cfg.epochs * steps_per_epoch
    bar = _Bar(progress, total, label, epoch * steps_per_epoch + start_batch)
    t0 = time.perf_counter() - elapsed
    steps, stopped = 0, bool(cfg.max_seconds is not None and elapsed >= cfg.max_seconds)  # budget spent already
    student.train()
    try:
        while epoch < cfg.epochs and not stopped:
            gen.set_state(gen_state)
            batches = epoch_batches(n, cfg.batch_size, gen, lengths)
            next_gen_state = gen.get_state()
            running, count = 0.0, 0
            for b, idx in enumerate(batches):
                if b < start_batch:
                    continue
                batch = {k: v[idx] for k, v in samples.items()}
                opt.zero_grad(set_to_none=True)
                loss = loss_fn(batch, labels[idx] if labels is not None else None)
                if not torch.isfinite(loss):
                    raise BadInputError(f"{label}: the loss became {float(loss)} at epoch {epoch + 1}, batch {b}; "
                                        f"lower the learning rate")
                loss.backward()
                opt.step()
                steps += 1
                running += float(loss.detach())
                count += 1
                bar.update(epoch * steps_per_epoch + b + 1, running / count)
                spent = time.perf_counter() - t0
                if cfg.max_seconds is not None and spent >= cfg.max_seconds:
                    snapshot(epoch, b + 1, gen_state, spent)
                    stopped, start_batch = True, b + 1
                    log(f"{label}: CPU budget of {cfg.max_seconds:.0f} s reached at epoch {epoch + 1}, batch {b + 1}")
                    break
                if checkpoint is not None and steps % cfg.checkpoint_every == 0:
                    snapshot(epoch, b + 1, gen_state, spent)
            if stopped:
                break
            history.append(running / max(count, 1))
            epoch, start_batch, gen_state = epoch + 1, 0, next_gen_state
            snapshot(epoch, 0, gen_state, time.perf_counter() - t0)
            log(f"{label}: epoch {epoch}/{cfg.epochs} loss {history[-1]:.4f}")
    finally:
        bar.close()
        student.eval()
    done = epoch + (start_batch / steps_per_epoch if stopped else 0.0)
    return LoopResult(steps, done, time.perf_counter() - t0, stopped, resumed, history)
