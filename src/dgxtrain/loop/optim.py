"""The optimizer from the `optim` group, an update that can be skipped on the device, and the
learning-rate schedule."""

from __future__ import annotations

import inspect
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
    """Whether this optimizer, on this torch, skips its update when given a non-zero
    `found_inf`, and applies it when given zero. `found_inf` is GradScaler's private protocol
    with the fused optimizers (`_step_supports_amp_scaling`): proven here, on a probe
    parameter with the optimizer's own settings, before the loop relies on it."""
    if not getattr(optimizer, "_step_supports_amp_scaling", False):
        return False
    device = optimizer.param_groups[0]["params"][0].device
    p = torch.nn.Parameter(torch.ones(4, device=device))
    accepted = inspect.signature(type(optimizer)).parameters
    settings = {k: optimizer.param_groups[0][k] for k in optimizer.defaults if k in accepted}
    moved = []
    try:
        probe = type(optimizer)([p], **{**settings, "lr": 0.1})
        for skip in (1.0, 0.0):
            before = p.detach().clone()
            p.grad = torch.ones_like(p)
            probe.found_inf = torch.tensor(skip, device=device)
            probe.step()
            moved.append(not torch.equal(before, p.detach()))
    except Exception:  # cannot be rebuilt from its settings, or refuses found_inf
        return False
    return moved == [False, True]


def step_unless(optimizer: torch.optim.Optimizer, skip: torch.Tensor, on_device: bool) -> None:
    """optimizer.step() unless `skip` (0-d, on the device) is true."""
    if on_device:
        # Fused Adam/AdamW/SGD take `found_inf` as from a GradScaler and apply nothing,
        # not even Adam's step count, where it is non-zero: no host read.
        optimizer.found_inf = skip.float()
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf
    elif not skip.item():  # other optimizers: the host reads the decision, once per step
        optimizer.step()
