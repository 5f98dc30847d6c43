"""Optimizer from the `optim` group, what it can do inside its kernel, and the learning-rate
schedule."""

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


def skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """Fused Adam/AdamW/SGD take `found_inf` (as from a GradScaler) and skip the whole
    update inside the kernel where it is non-zero: no host read before the step."""
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False))


def total_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of all gradients together, as clip_grad_norm_ computes it, unclipped."""
    if hasattr(torch.nn.utils, "get_total_norm"):  # torch >= 2.6
        return torch.nn.utils.get_total_norm(grads)
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
