"""Held-out evaluation: MSE and R², each rank on its slice, reduced in float64."""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any, Callable

import torch

from dgxtrain.dist import DistEnv, all_reduce_
from dgxtrain.model import LinearRegressor


@torch.no_grad()
def evaluate(model: torch.nn.Module, dataset: Any, env: DistEnv, batch_size: int,
             autocast: Callable[[], AbstractContextManager]) -> dict[str, float]:
    """`model` is the unwrapped module: no DDP hooks or buffer broadcasts in evaluation."""
    was_training = model.training
    model.eval()
    mine = dataset.eval_indices().tensor_split(env.world_size)[env.rank]
    # sum of squared errors, sum y, sum y^2, count: enough for MSE and R² after one reduce.
    sums = torch.zeros(4, dtype=torch.float64, device=env.device)
    for idx in mine.split(batch_size):
        x, y = dataset.sample(idx)
        with autocast():
            pred = model(x)
        err = pred.float().reshape(y.shape).double() - y.double()
        y = y.double()
        sums += torch.stack([err.square().sum(), y.sum(), y.square().sum(),
                             torch.tensor(float(y.numel()), dtype=torch.float64,
                                          device=y.device)])
    model.train(was_training)
    sse, sy, syy, n = all_reduce_(sums).tolist()
    out = {"eval_loss": sse / n, "r2": 1.0 - sse / max(syy - sy * sy / n, 1e-300)}
    if isinstance(model, LinearRegressor) and getattr(dataset, "target", None) == "linear":
        w, w_true = model.linear.weight.detach().reshape(-1).float(), dataset.true_weight
        out["weight_rel_err"] = ((w - w_true).norm() / w_true.norm()).item()
        out["bias_err"] = abs(model.linear.bias.item() - dataset.true_bias.item())
    return out
