"""The built-in task: regression on synthetic data (data/synthetic.py), trained with MSE.

Its models take `in_dim`, which the task passes from the data; any nn.Module with that
argument plugs in through `model._target_`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import nn

from dgxtrain.tasks.base import Metric, Task


class RegressionTask(Task):
    def __init__(self, model_cfg: DictConfig, data_cfg: DictConfig, seed: int,
                 device: torch.device):
        self.model_cfg = model_cfg
        self.data = instantiate(data_cfg, seed=seed, device=device)
        self.num_samples = self.data.num_samples

    def build_model(self) -> nn.Module:
        return instantiate(self.model_cfg, in_dim=self.data.dim)

    def batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.data.sample(indices)

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(output.float().reshape(target.shape), target)

    def eval_indices(self) -> torch.Tensor:
        return self.data.eval_indices()

    def metrics(self) -> list[Metric]:
        return [SquaredError()]

    def summary(self, model: nn.Module) -> dict[str, float]:
        """How close a linear model on linear data came to the true weights."""
        if not (isinstance(model, LinearRegressor) and self.data.target == "linear"):
            return {}
        w, w_true = model.linear.weight.detach().reshape(-1).float(), self.data.true_weight
        return {"weight_rel_err": ((w - w_true).norm() / w_true.norm()).item(),
                "bias_err": abs(model.linear.bias.item() - self.data.true_bias.item())}


class SquaredError(Metric):
    """eval_loss (the MSE) and R², from the sums of squared errors, y and y², in float64."""

    def statistics(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        y = target.double()
        err = output.float().reshape(target.shape).double() - y
        n = torch.tensor(float(y.numel()), dtype=torch.float64, device=y.device)
        return torch.stack([err.square().sum(), y.sum(), y.square().sum(), n])

    def values(self, totals: list[float]) -> dict[str, Any]:
        sse, sy, syy, n = totals
        return {"eval_loss": sse / n, "r2": 1.0 - sse / max(syy - sy * sy / n, 1e-300)}


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
