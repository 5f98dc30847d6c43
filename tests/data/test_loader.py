"""The loader path's pieces: per-sample seeds that depend on (seed, index, pass) only, a
batch sampler that starts at the resumed step without touching earlier ones, and the
training process's RNGs left as they were."""

from __future__ import annotations

import logging
import random

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from dgxtrain.data.loader import (
    LoaderFeed,
    SeededItems,
    StepSampler,
    loader_workers,
    make_loader,
    sample_keys,
)
from dgxtrain.data.order import GlobalBatchSchedule
from dgxtrain.distributed.env import cores_per_rank


class Noisy(Dataset):
    """Each item draws from all three global RNGs, as augmentations do."""

    def __len__(self) -> int:
        return 100

    def __getitem__(self, i: int):
        x = torch.tensor([float(i), torch.rand(()).item(), float(np.random.rand()),
                          random.random()])
        return x, torch.tensor(i)


def test_a_sample_seed_depends_on_seed_index_and_pass_only():
    idx = torch.tensor([3, 7, 3, 2**40 + 3])
    keys = sample_keys(5, idx, torch.tensor([0, 0, 1, 0]))
    assert [k[0] for k in keys] == [3, 7, 3, 2**40 + 3]
    seeds = [k[1] for k in keys]
    assert len(set(seeds)) == 4 and all(0 <= s < 2**63 for s in seeds)
    # The same sample alone, or in another batch, gets the same seed: no batch-mate matters.
    assert sample_keys(5, torch.tensor([7]))[0][1] == seeds[1]
    assert sample_keys(5, torch.tensor([3]), 1)[0][1] == seeds[2]
    assert sample_keys(6, torch.tensor([3]))[0][1] != seeds[0]


def test_seeded_items_are_pure_and_leave_the_training_rngs_alone():
    items = SeededItems(Noisy())
    keys = sample_keys(0, torch.arange(10))
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    first = items.__getitems__(keys)
    after = (torch.rand(()).item(), np.random.rand(), random.random())
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    assert after == (torch.rand(()).item(), np.random.rand(), random.random())
    # Fetched one by one, in another order: the same items.
    again = [items[k] for k in reversed(keys)][::-1]
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, again))
    # Another pass over the same index draws other augmentations.
    other = items[sample_keys(0, torch.tensor([0]), 1)[0]]
    assert not torch.equal(other[0], first[0][0]) and other[0][0] == first[0][0][0]


def test_only_the_listed_rngs_are_seeded():
    keys = sample_keys(0, torch.arange(4))
    a = SeededItems(Noisy(), ["torch"]).__getitems__(keys)
    b = SeededItems(Noisy(), ["torch"]).__getitems__(keys)
    assert all(x[0][1] == y[0][1] for x, y in zip(a, b))  # torch: reproducible
    assert any(x[0][2] != y[0][2] for x, y in zip(a, b))  # numpy: left running


class CountingSchedule(GlobalBatchSchedule):
    asked: list[int]

    def __call__(self, step: int) -> torch.Tensor:
        self.asked.append(step)
        return super().__call__(step)


def test_the_sampler_seeks_to_the_resumed_step():
    sched = CountingSchedule(100, 0, 8, 1, 2, 2)
    sched.asked = []
    batches = list(StepSampler(sched, 10**6, 10**6 + 3, 0))
    assert min(sched.asked) == 10**6 and len(batches) == 3  # nothing before the resume
    expect = sample_keys(0, sched(10**6 + 1), sched.passes(10**6 + 1))
    assert batches[1] == expect and len(expect) == 4  # rank 1's half of global batch s


def test_a_feed_gives_its_steps_in_order_as_micro_batches():
    sched = GlobalBatchSchedule(100, 0, 8, 0, 1, 4)
    loader = make_loader(Noisy(), StepSampler(sched, 5, 8, 0), num_workers=0,
                         prefetch_factor=2, persistent_workers=False, start_method="fork",
                         pin_memory=False)
    with LoaderFeed(loader, 5, sched.accum, torch.device("cpu"), 0) as feed:
        micro = feed(5)
        assert len(micro) == 2 and micro[0][0].shape == (4, 4)
        got = torch.cat([x[:, 0] for x, _ in micro]).long()
        assert torch.equal(got, sched(5).reshape(-1))
        with pytest.raises(RuntimeError, match="asked for step 7"):
            feed(7)


def test_loader_workers_by_default_and_beyond_the_cores():
    cores = cores_per_rank()
    # null: none on CPU ranks (workers would take the model's cores), a few on GPU ranks.
    assert loader_workers(None, torch.device("cpu")) == 0
    assert loader_workers(None, torch.device("cuda", 0)) == max(1, min(8, cores - 1))
    # A handler of its own: dgxtrain's logs propagate to caplog until a train() in the
    # session stops that (observe/logs.py), and caplog's own handler would see them twice.
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("dgxtrain")
    logger.addHandler(handler)
    try:
        assert loader_workers(2, torch.device("cpu")) == 2  # what is asked, within the cores
        assert not records
        assert loader_workers(cores + 30, torch.device("cpu")) == cores + 30
    finally:
        logger.removeHandler(handler)
    [record] = records
    assert record.getMessage().startswith(f"data.num_workers={cores + 30} is more than the "
                                          f"{cores} cores this rank owns")
