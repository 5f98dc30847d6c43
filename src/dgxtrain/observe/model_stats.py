"""What the trainer tells about a model: its parameter count, its FLOPs per sample, and the
fingerprint of its weights."""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from dgxtrain.tasks.losses import logits

log = logging.getLogger(__name__)


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def flops_per_sample(model: torch.nn.Module, x: Any, n: int | None = None,
                     **kwargs: Any) -> float | None:
    """Forward + backward FLOPs per sample, counted on a small batch `x` of `n` samples
    (a tensor, or a dict of keyword tensors), the model called with `kwargs` too (the
    target, under loss=model: a model's inference branch may compute less).

    Eval mode, so that batch-norm statistics do not move; the gradients are dropped after.
    Call it before DDP wraps the model: DDP's hooks would count this backward as a step.
    """
    was_training = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False) as counter:
            out = model(**x, **kwargs) if isinstance(x, dict) else model(x, **kwargs)
            logits(out).float().sum().backward()
        return counter.get_total_flops() / (n or len(x))
    except Exception as e:  # a user model the counter cannot trace: report n/a, never fail
        log.debug("FLOP count unavailable: %s", e)
        return None
    finally:
        model.train(was_training)
        for p in model.parameters():
            p.grad = None


def param_sha256(model: torch.nn.Module) -> str:
    """SHA-256 of the parameters as contiguous fp32 bytes, in state_dict order."""
    h = hashlib.sha256()
    for t in model.state_dict().values():
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()
