"""Regressors. Any nn.Module taking `in_dim` plugs in through `model._target_`."""

from __future__ import annotations

import torch
from torch import nn


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
