"""The built-in task: regression on synthetic data (data/synthetic.py), generated on the
training device; MSE by default (conf/loss/mse.yaml).

Its models take `in_dim`, which their configs interpolate from the data (`${data.dim}`);
any nn.Module plugs in through `model._target_`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import nn

from dgxtrain.data.order import GlobalBatchSchedule
from dgxtrain.tasks.base import Task
from dgxtrain.tasks.losses import TaskLoss


class RegressionTask(Task):
    def __init__(self, model_cfg: DictConfig, data_cfg: DictConfig, loss: TaskLoss,
                 metric_specs: Any, seed: int, device: torch.device):
        super().__init__(model_cfg, loss, metric_specs)
        self.data = instantiate(data_cfg, seed=seed, device=device)
        self.num_samples = self.data.num_samples

    def batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.data.sample(indices)

    def example(self, n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.batch(torch.arange(min(n, self.num_samples), device=self.data.device))
        return x.cpu(), y.cpu()

    def train_feed(self, seed: int, global_batch: int, rank: int, world_size: int,
                   micro_batch: int, start: int, end: int, device: torch.device) -> DeviceFeed:
        return DeviceFeed(self.batch, GlobalBatchSchedule(
            self.num_samples, seed, global_batch, rank, world_size, micro_batch, device))

    def eval_batches(self, rank: int, world_size: int, batch_size: int,
                     device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        mine = self.data.eval_indices().tensor_split(world_size)[rank]
        return (self.batch(indices) for indices in mine.split(batch_size))

    def describe(self) -> dict[str, Any]:
        return {"train_samples": self.num_samples, "eval_samples": self.data.eval_samples}

    def summary(self, model: nn.Module) -> dict[str, float]:
        """How close a linear model on linear data came to the true weights."""
        if not (isinstance(model, LinearRegressor) and self.data.target == "linear"):
            return {}
        w, w_true = model.linear.weight.detach().reshape(-1).float(), self.data.true_weight
        return {"weight_rel_err": ((w - w_true).norm() / w_true.norm()).item(),
                "bias_err": abs(model.linear.bias.item() - self.data.true_bias.item())}


class DeviceFeed:
    """Batches generated on the training device from the step's sample indices."""

    def __init__(self, batch: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
                 schedule: GlobalBatchSchedule):
        self.batch, self.schedule = batch, schedule

    def __call__(self, step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [self.batch(indices) for indices in self.schedule(step)]

    def __enter__(self) -> DeviceFeed:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


class LinearRegressor(nn.Module):
    """y = x.w + b: the model whose learned weights can be compared with the truth."""

    def __init__(self, in_dim: int):
        super().__init__()
        self.linear = nn.Linear(in_dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x).squeeze(-1)


class MLPRegressor(nn.Module):
    """num_layers hidden layers of hidden_dim units with GELU, then a linear head."""

    def __init__(self, in_dim: int, hidden_dim: int = 256, num_layers: int = 2):
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(num_layers):
            layers += [nn.Linear(in_dim if i == 0 else hidden_dim, hidden_dim), nn.GELU()]
        layers.append(nn.Linear(hidden_dim if num_layers else in_dim, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)
