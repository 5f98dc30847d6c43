"""One optimizer step over this rank's micro-batches."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch

from dgxtrain.distributed.collectives import all_reduce_
from dgxtrain.distributed.ddp import grad_sync
from dgxtrain.loop.guard import UpdateGuard
from dgxtrain.observe.perf import NULL_CLOCK, PhaseClock
from dgxtrain.tasks import Task
from dgxtrain.tasks.base import Batch


class StepOutput(NamedTuple):
    """What a step hands to the loop's components."""

    step: int
    loss: torch.Tensor  # this rank's, on the device
    grad_norm: torch.Tensor  # on the device
    lr: float  # the step's learning rate
    clock: PhaseClock  # its phases, timed on log steps
    seconds: float  # the step and its decisions, before the components act
    first: bool  # this attempt's first step (it may have compiled)


@dataclass
class StepParts:
    """What every step uses, built once."""

    model: torch.nn.Module  # the training forward: DDP-wrapped and/or compiled
    task: Task
    optimizer: torch.optim.Optimizer
    guard: UpdateGuard
    autocast: Callable
    grad_clip: float  # 0: no clipping (the norm is still computed)


def train_step(parts: StepParts, micro_batches: list[Batch], step: int,
               clock: PhaseClock = NULL_CLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward and backward each micro-batch, clip, and update unless the gradient is not
    finite. Returns (this rank's loss, the gradient norm), both still on the device."""
    model, loss_of, accum = parts.model, parts.task.loss, len(micro_batches)
    clock.mark("data")  # the wait for this step's batches
    per_rank = None
    if loss_of.counts_vary:  # e.g. tokens with ignore_index: the global valid count
        valid = sum(loss_of.count(t) for _, t in micro_batches).double()
        per_rank = all_reduce_(valid, mean=True).float()
    loss_sum = 0.0
    for i, (inputs, target) in enumerate(micro_batches):
        # DDP all-reduces the gradients in the last micro-batch's backward only.
        with grad_sync(model, enabled=i == accum - 1):
            with parts.autocast():
                output = parts.task.forward(model, inputs, target)
            # Averaged over ranks by DDP, each share adds up to the global batch's mean.
            loss = (loss_of.mean(output, target) / accum if per_rank is None
                    else loss_of.total(output, target) / per_rank)
            # A non-finite loss turns every gradient NaN, so the all-reduce tells all ranks.
            (loss * torch.where(torch.isfinite(loss), 1.0, math.nan)).backward()
        loss_sum = loss_sum + loss.detach()
        clock.mark("fwd_bwd")  # includes the wait for DDP's gradient all-reduce
    # Every rank now holds the same gradients, so the same norm and the same decision.
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), parts.grad_clip or math.inf)
    parts.guard.update(parts.optimizer, grad_norm, step)  # skipped on the device if not finite
    parts.optimizer.zero_grad(set_to_none=True)
    clock.mark("optim")
    return loss_sum, grad_norm
