"""The optimizer from the `optim` group, an update that can be skipped on the device, and the
learning-rate schedule."""

from __future__ import annotations

import math

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig


def build_optimizer(cfg: DictConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """`optim._target_` names any torch.optim class; the other keys are its arguments."""
    return instantiate(cfg, params=model.parameters(), _convert_="all")


def lr_factor(step: int, warmup_steps: int, max_steps: int, min_ratio: float) -> float:
    """Linear warm-up from 0 over warmup_steps, then cosine decay to min_ratio at max_steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int, max_steps: int,
                    min_ratio: float) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, warmup_steps, max_steps, min_ratio))


def step_unless(optimizer: torch.optim.Optimizer, skip: torch.Tensor) -> None:
    """optimizer.step() unless `skip` (0-d, on the device) is true."""
    if getattr(optimizer, "_step_supports_amp_scaling", False):
        # Fused Adam/AdamW/SGD take `found_inf` as from a GradScaler and apply nothing,
        # not even Adam's step count, where it is non-zero: no host read.
        optimizer.found_inf = skip.float()
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf
    elif not skip.item():  # other optimizers: the host reads the decision, once per step
        optimizer.step()
