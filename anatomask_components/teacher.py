"""EMA teacher as an Ignite handler (docs/method.md §8)."""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn as nn
from ignite.engine import Engine, Events
from torch.profiler import record_function

__all__ = ["EMATeacher", "unwrap_model"]


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel / DataParallel wrappers (or the model itself)."""
    while isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
        model = model.module
    return model


class EMATeacher:
    """Exponential-moving-average copy of the student that chooses the masks.

    ``theta_T <- m * theta_T + (1 - m) * theta_S`` for every parameter and floating-point buffer, after
    every optimiser step. The teacher starts as an exact copy of the student, stays in eval mode and
    never receives gradients. Integer buffers (e.g. BatchNorm's ``num_batches_tracked``) are copied.

    Args:
        student: the network being trained (DDP / DataParallel wrappers are unwrapped).
        momentum_start: ``m`` at the start of training (0.999).
        momentum_end: ``m`` after the warm-up (0.9999).
        warmup_fraction: fraction of the epochs over which ``m`` rises linearly (a quarter).
        per_iteration: raise ``m`` every iteration instead of once per epoch (reference).
        frozen: never update: the teacher stays at the student's random initialisation (the paper's
            "no self-distillation" ablation).
    """

    def __init__(
        self,
        student: nn.Module,
        momentum_start: float = 0.999,
        momentum_end: float = 0.9999,
        warmup_fraction: float = 0.25,
        per_iteration: bool = False,
        frozen: bool = False,
    ) -> None:
        for name, value in (("momentum_start", momentum_start), ("momentum_end", momentum_end)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}.")
        self.student = unwrap_model(student)
        self.teacher = copy.deepcopy(self.student).eval()
        self.teacher.requires_grad_(False)
        self.momentum_start = momentum_start
        self.momentum_end = momentum_end
        self.warmup_fraction = warmup_fraction
        self.per_iteration = per_iteration
        self.frozen = frozen
        self.last_momentum = 1.0 if frozen else momentum_start

    def momentum(self, epoch: float, max_epochs: int) -> float:
        """``m`` at a 0-based (possibly fractional) epoch of ``max_epochs``."""
        warmup = self.warmup_fraction * max_epochs
        progress = 1.0 if warmup <= 0 else min(epoch / warmup, 1.0)
        return self.momentum_start + progress * (self.momentum_end - self.momentum_start)

    @torch.no_grad()
    @record_function("anatomask.ema")
    def update(self, momentum: float) -> None:
        """One EMA step with the given momentum."""
        student_params = dict(self.student.named_parameters())
        student_buffers = dict(self.student.named_buffers())
        ema, source = [], []
        for name, t in self.teacher.named_parameters():
            ema.append(t)
            source.append(student_params[name].detach())
        for name, t in self.teacher.named_buffers():
            if t.is_floating_point():
                ema.append(t)
                source.append(student_buffers[name].detach())
            else:
                t.copy_(student_buffers[name])
        # the same arithmetic as t.mul_(m).add_(s, alpha=1 - m) per tensor, in a few fused kernels
        torch._foreach_mul_(ema, momentum)
        torch._foreach_add_(ema, source, alpha=1.0 - momentum)

    def __call__(self, engine: Engine) -> None:
        if self.frozen:
            return
        epoch = engine.state.epoch - 1
        if self.per_iteration:
            epoch_length = engine.state.epoch_length or 1
            epoch += ((engine.state.iteration - 1) % epoch_length) / epoch_length
        self.last_momentum = self.momentum(epoch, engine.state.max_epochs)
        self.update(self.last_momentum)

    def attach(self, engine: Engine) -> None:
        """Update after every iteration (the optimiser step happens inside the iteration)."""
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def state_dict(self) -> dict[str, Any]:
        return {"teacher": self.teacher.state_dict(), "last_momentum": self.last_momentum}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.teacher.load_state_dict(state["teacher"])
        self.last_momentum = float(state["last_momentum"])
