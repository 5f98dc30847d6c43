"""A user's own task, defined here only and plugged in through `--config-dir`: a token
dataset with random-length padding (ignore_index), a dict input, its model and its loss."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

from dgxtrain.tasks.metrics import Metric

VOCAB, SEQ = 16, 12


class NextSum(Dataset):
    """Tokens x; the target at t is (x[t] + x[t-1]) mod VOCAB. Each fetch pads a random
    tail (drawn from the global torch RNG, like an augmentation) with ignore_index."""

    def __init__(self, size: int, offset: int = 0):
        g = torch.Generator().manual_seed(1234 + offset)
        self.tokens = torch.randint(VOCAB, (size, SEQ), generator=g)

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        x = self.tokens[i]
        y = (x + x.roll(1)) % VOCAB
        y[0] = -100
        y[int(torch.randint(4, SEQ + 1, ())):] = -100  # a tail of random length is padding
        return {"tokens": x, "scale": torch.rand(1) + 0.5}, y


class PairModel(nn.Module):
    """Sees each token and the one before it; logits [B, T, VOCAB]."""

    def __init__(self, width: int):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, width)
        self.mix = nn.Sequential(nn.Linear(2 * width, width), nn.GELU(), nn.Linear(width, VOCAB))

    def forward(self, tokens: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        e = self.embed(tokens) * scale[:, :, None]
        return self.mix(torch.cat([e, e.roll(1, dims=1)], dim=-1))


class FlatCrossEntropy(nn.CrossEntropyLoss):
    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return super().forward(logits.flatten(0, -2), target.flatten())


class ValidTargets(Metric):
    """A metric of the user's own: how many targets of the eval set are not padding."""

    size = 1

    def statistics(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return (target != -100).sum().double().reshape(1)

    def values(self, totals: list[float]) -> dict[str, float]:
        return {"eval_valid_targets": totals[0]}


def write_config_dir(root: Path) -> Path:
    """The user's own config dir: data, model and loss files naming the classes above."""
    for group, text in {
        "data": "defaults: [dataset]\ntrain: {_target_: tests.user_task.NextSum, size: 4096}\n"
                "eval: {_target_: tests.user_task.NextSum, size: 300, offset: 1}\n",
        "model": "_target_: tests.user_task.PairModel\nwidth: 32\n",
        "loss": "_target_: tests.user_task.FlatCrossEntropy\n",
    }.items():
        (root / group).mkdir(parents=True, exist_ok=True)
        (root / group / "next_sum.yaml").write_text(text)
    return root
