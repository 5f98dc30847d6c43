"""A user's own nn.Module, defined only here, trains through a config override alone."""

import pytest
import torch
from torch import nn

from dgxtrain.loop.train import train
from tests.conftest import compose_cfg, run_ok


class ResidualRegressor(nn.Module):
    """Not a dgxtrain model: takes the mlp node's keys."""

    def __init__(self, in_dim: int, hidden_dim: int, num_layers: int):
        super().__init__()
        self.inp = nn.Linear(in_dim, hidden_dim)
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(hidden_dim),
                                                  nn.Linear(hidden_dim, hidden_dim), nn.SiLU())
                                    for _ in range(num_layers))
        self.out = nn.Linear(hidden_dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for block in self.blocks:
            h = h + block(h)
        return self.out(h).squeeze(-1)


class TinyLinear(nn.Module):
    def __init__(self, in_dim: int):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(in_dim))
        self.b = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.w + self.b


@pytest.mark.multiprocess
def test_plugged_in_model_trains_on_two_ranks(tmp_path):
    s = run_ok(tmp_path, [f"model._target_={__name__}.ResidualRegressor", "model.hidden_dim=64",
                          "model.num_layers=3", "trainer.max_steps=300"], nproc=2)
    assert s["world_size"] == 2 and s["eval_r2"] > 0.9
    state = torch.load(tmp_path / "model.pt", weights_only=True)
    assert "blocks.2.0.weight" in state and state["inp.weight"].shape == (64, 32)


def test_plugged_in_model_gets_exactly_the_keys_of_its_node(tmp_path):
    cfg = compose_cfg(["device=cpu", "model=linear", f"model._target_={__name__}.TinyLinear",
                       "data.target=linear", "optim.lr=0.01", "trainer.max_steps=200"])
    assert train(cfg, tmp_path)["eval_r2"] > 0.99
