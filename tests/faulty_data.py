"""A user's dataset that fails on one rank only, as one on a node with a missing shard or
a corrupt record would: plugged in by `_target_`, for tests/distributed/test_one_line.py."""

from __future__ import annotations

import os

import torch
from torch.utils.data import Dataset


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


class Numbers(Dataset):
    """(x, sum of x) with x of 4 equal values. On rank `build_fail_rank` the constructor
    raises; on rank `fail_rank`, every item after the first `fail_after` fetched raises; on
    rank `fewer_on_rank` it has 2 items fewer."""

    def __init__(self, size: int = 512, build_fail_rank: int = -1, fail_rank: int = -1,
                 fail_after: int = -1, fewer_on_rank: int = -1):
        if _rank() == build_fail_rank:
            raise FileNotFoundError("/data/shard-1 is missing on this node")
        if _rank() == fewer_on_rank:  # a node whose listing lacks two files
            size -= 2
        self.size, self.fail_rank, self.fail_after, self.fetched = size, fail_rank, fail_after, 0

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int):
        self.fetched += 1
        if _rank() == self.fail_rank and self.fetched > self.fail_after >= 0:
            raise ValueError(f"corrupt record {i}")
        x = torch.full((4,), float(i % 7))
        return x, x.sum()
