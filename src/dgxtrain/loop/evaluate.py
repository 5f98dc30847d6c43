"""Held-out evaluation: each rank on its slice of the eval samples, every sample once, the
task's metrics summed over ranks in one float64 all-reduce."""

from __future__ import annotations

from collections.abc import Callable

import torch

from dgxtrain.distributed.collectives import all_reduce_
from dgxtrain.distributed.env import DistEnv
from dgxtrain.tasks import Task


@torch.no_grad()
def evaluate(task: Task, model: torch.nn.Module, env: DistEnv, batch_size: int,
             autocast: Callable) -> dict[str, float]:
    """`model` is the unwrapped module: no DDP hooks or buffer broadcasts in evaluation."""
    was_training = model.training
    model.eval()
    metrics = task.metrics()
    sums = [torch.zeros(m.size, dtype=torch.float64, device=env.device) for m in metrics]
    for inputs, target in task.eval_batches(env.rank, env.world_size, batch_size, env.device):
        with autocast():
            output = task.forward(model, inputs)
        sums = [s + m.statistics(output, target) for s, m in zip(sums, metrics)]
    model.train(was_training)
    totals = all_reduce_(torch.cat(sums)).tolist()
    out: dict[str, float] = {}
    for m in metrics:
        out.update(m.values(totals[:m.size]))
        totals = totals[m.size:]
    return out
