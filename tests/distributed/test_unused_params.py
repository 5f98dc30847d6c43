"""A model whose used parameters change between steps (a branch taken on some steps only):
with dist.find_unused_parameters it trains on 2 ranks, with gradient accumulation, as one
process does; without it the run ends in one line naming the setting; with compile it is
refused at start."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dgxtrain.errors import ConfigError
from dgxtrain.loop.train import train
from tests.conftest import compose_cfg, losses, run_cli, run_ok

pytestmark = pytest.mark.multiprocess

BASE = ["experiment=smoke", "logger=none", "trainer.global_batch_size=64", "optim.lr=1e-2",
        "model=linear",
        f"model._target_={__name__}.SometimesBranch", "trainer.log_every=1"]


class SometimesBranch(nn.Module):
    """A residual branch on every third forward (the same forwards on every rank)."""

    def __init__(self, in_dim: int):
        super().__init__()
        self.trunk, self.extra = nn.Linear(in_dim, 16), nn.Linear(16, 16)
        self.head = nn.Linear(16, 1)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        h = nn.functional.gelu(self.trunk(x))
        if self.training and self.calls % 3 == 0:
            h = h + self.extra(h)
        return self.head(h).squeeze(-1)


def test_with_find_unused_parameters_it_trains_with_accumulation(tmp_path):
    one = train(compose_cfg(["device=cpu", *BASE]), tmp_path / "one")
    two = run_ok(tmp_path / "two", BASE + ["dist.find_unused_parameters=true",
                                           "trainer.micro_batch_size=16"], nproc=2)
    assert two["grad_accum_steps"] == 2
    # The branch's calls differ between one process (1 forward a step) and 2 ranks with 2
    # micro-batches each, so compare learning, not bits.
    la, lb = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(la) == len(lb) == 20
    for run in (la, lb):
        assert sum(run[-5:]) < 0.7 * sum(run[:5]), run
    assert one["steps"] == two["steps"] == 20


def test_without_it_the_run_ends_in_one_line_naming_the_setting(tmp_path):
    p = run_cli(tmp_path, BASE, nproc=2)
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("dgxtrain: config error:")]
    assert p.returncode != 0 and len(lines) == 1, p.stderr[-2000:]
    assert lines[0].startswith("dgxtrain: config error: dist.find_unused_parameters=False: the "
                               "model left parameters without a gradient in a step")
    assert "fix: set dist.find_unused_parameters=true" in lines[0]


def test_with_compile_it_is_refused_at_start(tmp_path):
    with pytest.raises(ConfigError, match="torch.compile's DDP cannot leave parameters unused"):
        train(compose_cfg(["device=cpu", *BASE, "dist.find_unused_parameters=true",
                           "trainer.compile=true"]), tmp_path)
