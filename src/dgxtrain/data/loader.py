"""The loader path: a map-style Dataset read in the global sample order (data/order.py).

Each rank's DataLoader gets a batch sampler that yields, for steps start..end, exactly
this rank's slice of global batch s, as (index, pass) keys. Resuming at step s builds the
sampler at s: a seek in O(1), with no loader state to save and no batch to replay, and no
prefetched batch of the old position can reach the new one.

Before each item the global torch, numpy and `random` RNGs are seeded from (seed, index,
pass), so augmentation drawn from them (as torchvision transforms draw it) gives the same
sample whatever the world size, the number of workers, or where the run resumed. In the
main process (num_workers=0) the RNG states are put back after each batch, so the
training RNG (dropout, say) runs the same stream with or without workers.
"""

from __future__ import annotations

import logging
import pickle
import random
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from dgxtrain.data.hashing import stream_key
from dgxtrain.data.order import GlobalBatchSchedule
from dgxtrain.errors import ConfigError, DataError

log = logging.getLogger(__name__)

_SAMPLE_RNG = 0x5EED0005
Key = tuple[int, int]  # (sample index, pass)


def sample_seed(seed: int, index: int, pass_: int) -> int:
    """The RNG seed of one fetch of one sample: a pure function of (seed, index, pass)."""
    return stream_key(seed, _SAMPLE_RNG, index, pass_) << 32 | stream_key(seed, index, pass_)


class SeededItems(Dataset):
    """`dataset`, fetched by (index, pass) keys with the global RNGs seeded per sample."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: Key) -> Any:
        return self.__getitems__([key])[0]

    def __getitems__(self, keys: Sequence[Key]) -> list[Any]:
        # DataLoader hands a whole batch of keys here: the states are saved once per batch.
        saved = torch.get_rng_state(), np.random.get_state(), random.getstate()
        try:
            out = []
            for index, pass_ in keys:
                s = sample_seed(self.seed, int(index), int(pass_))
                # The CPU generator only: torch.manual_seed would also reseed CUDA's.
                torch.default_generator.manual_seed(s)
                np.random.seed(s & 0xFFFFFFFF)
                random.seed(s)
                out.append(self.dataset[int(index)])
            return out
        finally:
            torch.set_rng_state(saved[0])
            np.random.set_state(saved[1])
            random.setstate(saved[2])


class StepSampler:
    """Batch sampler: one batch per step, this rank's (index, pass) keys of global batch s."""

    def __init__(self, schedule: GlobalBatchSchedule, start: int, end: int):
        self.schedule, self.start, self.end = schedule, start, end

    def __len__(self) -> int:
        return max(0, self.end - self.start)

    def __iter__(self) -> Iterator[list[Key]]:
        for step in range(self.start, self.end):
            idx, passes = self.schedule(step).reshape(-1), self.schedule.passes(step).reshape(-1)
            yield list(zip(idx.tolist(), passes.tolist()))


def check_picklable(dataset: Dataset, key: str, target: Any, start_method: str) -> None:
    """Workers started by forkserver or spawn receive the dataset pickled: say so at start."""
    if start_method == "fork":
        return
    try:
        pickle.dumps(dataset)
    except Exception as e:
        raise ConfigError(key, target, f"cannot be pickled for the loader workers "
                          f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})",
                          "keep no open files, locks or lambdas in the dataset (open them "
                          "lazily in __getitem__), or set data.num_workers=0") from e


def make_loader(dataset: Dataset, seed: int, batch_sampler: Any, *, num_workers: int,
                prefetch_factor: int, persistent_workers: bool, start_method: str,
                pin_memory: bool) -> DataLoader:
    workers = {"prefetch_factor": prefetch_factor, "persistent_workers": persistent_workers,
               "multiprocessing_context": start_method} if num_workers else {}
    return DataLoader(SeededItems(dataset, seed), batch_sampler=batch_sampler,
                      num_workers=num_workers, collate_fn=default_collate,
                      pin_memory=pin_memory, **workers)


def worker_death(e: BaseException, num_workers: int) -> DataError | None:
    """A loader worker that died (killed, out of memory) as one line naming the fix."""
    first = str(e).splitlines()[0] if str(e) else ""
    if not (isinstance(e, RuntimeError) and first.startswith("DataLoader worker")):
        return None
    return DataError(f"data.num_workers={num_workers}: a loader worker died ({first}); fix: "
                     "look above for its own error; a worker killed by a signal is often out "
                     "of memory: lower data.num_workers or data.prefetch_factor, or set "
                     "data.num_workers=0 to debug in the main process")


def to_device(batch: Any, device: torch.device) -> Any:
    """Tensors (or dicts of them) to the device; non-blocking, as pinned memory allows."""
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch.to(device, non_blocking=True)


def split(batch: Any, parts: int) -> list[Any]:
    """A collated (input, target) batch as `parts` equal micro-batches, in order."""
    if isinstance(batch, dict):
        pieces = {k: split(v, parts) for k, v in batch.items()}
        return [{k: v[i] for k, v in pieces.items()} for i in range(parts)]
    if isinstance(batch, (tuple, list)):
        return [type(batch)(p) for p in zip(*(split(v, parts) for v in batch))]
    return list(batch.chunk(parts))


class LoaderFeed:
    """This rank's micro-batches of each step, read ahead by the DataLoader's workers."""

    def __init__(self, loader: DataLoader, start: int, accum: int, device: torch.device,
                 num_workers: int):
        self.loader, self.step, self.accum, self.device = loader, start, accum, device
        self.num_workers = num_workers
        self._it: Iterator | None = None

    def __call__(self, step: int) -> list[tuple[Any, torch.Tensor]]:
        if step != self.step:  # the loader reads ahead in order: it cannot jump
            raise RuntimeError(f"LoaderFeed at step {self.step} was asked for step {step}")
        if self._it is None:
            self._it = iter(self.loader)
        batch = next(self._it)
        self.step += 1
        return split(to_device(batch, self.device), self.accum)

    def close(self) -> None:
        """Stop the workers now, prefetched batches and all (a DataLoader iterator shuts
        its workers down when it is freed)."""
        self._it = None

    def __enter__(self) -> LoaderFeed:
        return self

    def __exit__(self, typ: type | None, exc: BaseException | None, tb: object) -> None:
        self.close()
        # DataLoader reports a dead worker from its SIGCHLD handler, wherever the loop was
        # (a backward, an evaluation): the whole loop runs inside this block.
        death = worker_death(exc, self.num_workers) if exc is not None else None
        if death is not None:
            raise death from exc
