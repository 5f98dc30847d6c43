"""Held-out evaluation: each rank on its slice of the eval samples, every sample once, the
task's metrics summed over ranks in one float64 all-reduce."""

from __future__ import annotations

from collections.abc import Callable

import torch

from dgxtrain.dist.collectives import all_reduce_
from dgxtrain.dist.env import DistEnv
from dgxtrain.tasks import Task


@torch.no_grad()
def evaluate(task: Task, model: torch.nn.Module, env: DistEnv, batch_size: int,
             autocast: Callable) -> dict[str, float]:
    """`model` is the unwrapped module: no DDP hooks or buffer broadcasts in evaluation."""
    was_training = model.training
    model.eval()
    metrics = task.metrics()
    sums: list[torch.Tensor | float] = [0.0] * len(metrics)
    mine = task.eval_indices().tensor_split(env.world_size)[env.rank]
    # split() of no indices is one empty batch: a rank without samples adds zeros.
    for indices in mine.split(batch_size):
        inputs, target = task.batch(indices)
        with autocast():
            output = task.forward(model, inputs)
        sums = [s + m.statistics(output, target) for s, m in zip(sums, metrics)]
    model.train(was_training)
    totals = all_reduce_(torch.cat(sums)).tolist()
    out: dict[str, float] = {}
    for m, s in zip(metrics, sums):
        out.update(m.values(totals[:len(s)]))
        totals = totals[len(s):]
    return out
