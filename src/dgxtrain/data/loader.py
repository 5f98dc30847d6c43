"""The loader path: a map-style Dataset read in the global sample order (data/order.py).

Each rank's DataLoader gets a batch sampler that yields, for steps start..end, exactly
this rank's slice of global batch s, as (index, pass) keys. Resuming at step s builds the
sampler at s: a seek in O(1), with no loader state to save and no batch to replay, and no
prefetched batch of the old position can reach the new one.

Before each item the global torch, numpy and `random` RNGs (data.seed_rngs) are seeded
from (seed, index, pass), so augmentation drawn from them (as torchvision transforms draw
it) gives the same sample whatever the world size, the number of workers, or where the run
resumed. The seeds are hashed in bulk with the step's indices; seeding costs ~1-5 us per
sample per RNG, which is why a dataset lists only the RNGs it draws from. In the main
process (num_workers=0) the RNG states are put back after each batch, so the training RNG
(dropout, say) runs the same stream with or without workers.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import multiprocessing.context as mpc
import os
import pickle
import random
import select
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, default_collate, get_worker_info

from dgxtrain.data.hashing import M32, mix32, stream_key
from dgxtrain.data.order import GlobalBatchSchedule
from dgxtrain.distributed.env import cores_per_rank
from dgxtrain.errors import ConfigError, DataError, first_line

log = logging.getLogger(__name__)
_SAMPLE_RNG = 0x5EED0005
RNGS = ("torch", "numpy", "random")
Key = tuple[int, int]  # (sample index, the RNG seed of this fetch of it)


def sample_keys(seed: int, indices: torch.Tensor, passes: torch.Tensor | int = 0) -> list[Key]:
    """(index, seed) per sample, the seed a pure function of (seed, index, pass): 63 bits
    from two 32-bit hashes, computed for the whole batch at once."""
    idx = indices.reshape(-1).to(torch.int64)
    passes = torch.as_tensor(passes, dtype=torch.int64).reshape(-1)
    key = mix32(passes ^ stream_key(seed, _SAMPLE_RNG))
    lo = mix32(mix32((idx & M32) ^ key) ^ (idx >> 32))
    hi = mix32(lo ^ mix32(key ^ 0x2545F491)) & 0x7FFFFFFF
    return list(zip(idx.tolist(), (hi << 32 | lo).tolist()))


class ItemError(Exception):
    """A dataset's __getitem__ raised: which item, and what (a message only, so that a
    loader worker can send it to the training process)."""

    def where(self) -> str:
        """The message, without the worker's traceback the DataLoader puts around it."""
        lines = [ln for ln in str(self).splitlines() if ln.strip()]
        return lines[-1].split("ItemError: ", 1)[-1] if lines else ""


class SeededItems(Dataset):
    """`dataset`, fetched by (index, seed) keys with the global RNGs in `rngs` seeded per
    sample."""

    def __init__(self, dataset: Dataset, rngs: Sequence[str] = RNGS):
        self.dataset, self.rngs = dataset, tuple(rngs)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: Key) -> Any:
        return self.__getitems__([key])[0]

    def __getitems__(self, keys: Sequence[Key]) -> list[Any]:
        # DataLoader hands a whole batch of keys here. A worker's RNGs are its own; the
        # training process's are saved once per batch and put back.
        saved = None if get_worker_info() else {n: _RNG_API[n][1]() for n in self.rngs}
        seeders = [_RNG_API[n][0] for n in self.rngs]
        try:
            out = []
            for index, s in keys:
                for seed_rng in seeders:
                    seed_rng(s)
                try:
                    out.append(self.dataset[index])
                except Exception as e:
                    raise ItemError(f"item {index} raised {first_line(e)}") from e
            return out
        finally:
            for name, state in (saved or {}).items():
                _RNG_API[name][2](state)


# Each RNG: seed it, get its state, put it back. The CPU generator only for torch:
# torch.manual_seed would also reseed CUDA's, which the model's dropout draws from.
_RNG_API = {
    "torch": (torch.default_generator.manual_seed, torch.get_rng_state, torch.set_rng_state),
    "numpy": (lambda s: np.random.seed(s & M32), np.random.get_state, np.random.set_state),
    "random": (random.seed, random.getstate, random.setstate),
}


class StepSampler:
    """Batch sampler: one batch per step, this rank's (index, seed) keys of global batch s."""

    def __init__(self, schedule: GlobalBatchSchedule, start: int, end: int, seed: int):
        self.schedule, self.start, self.end, self.seed = schedule, start, end, seed

    def __len__(self) -> int:
        return max(0, self.end - self.start)

    def __iter__(self) -> Iterator[list[Key]]:
        # Keys for 64 steps at a time: the hashing's per-call cost, shared by ~8k samples.
        per = self.schedule.per_rank
        for first in range(self.start, self.end, 64):
            steps = range(first, min(first + 64, self.end))
            keys = sample_keys(self.seed, torch.stack([self.schedule(s) for s in steps]),
                               torch.stack([self.schedule.passes(s) for s in steps]))
            for i in range(len(steps)):
                yield keys[i * per:(i + 1) * per]


def check_picklable(dataset: Dataset, key: str, target: Any, start_method: str) -> None:
    """Workers started by forkserver or spawn receive the dataset pickled: say so at start."""
    if start_method == "fork":
        return
    try:
        pickle.dumps(dataset)
    except Exception as e:
        raise ConfigError(key, target, f"cannot be pickled for the loader workers "
                          f"({first_line(e)})",
                          "keep no open files, locks or lambdas in the dataset (open them "
                          "lazily in __getitem__), or set data.num_workers=0") from e


def loader_workers(asked: int | None, device: torch.device) -> int:
    """data.num_workers, or for null what serves the device (see its doc)."""
    cores = cores_per_rank()
    if asked is None:
        return 0 if device.type == "cpu" else max(1, min(8, cores - 1))
    if asked > cores:
        log.warning("data.num_workers=%d is more than the %d cores this rank owns: its "
                    "workers start slowly and take cores from training; fix: "
                    "data.num_workers=%d or fewer, or null for the default", asked, cores,
                    cores)
    return asked


def _end_with(rank_pid: int, worker_id: int) -> None:
    """worker_init_fn: end this loader worker as soon as its rank (pid `rank_pid`) ends.

    torch's own check in the worker watches the worker's parent, which under forkserver is
    the forkserver, not the rank; and the forkserver (and the resource tracker) exit only
    once every worker has closed its pipe to them. A rank that died abruptly (SIGKILL, the
    hang watchdog's exit, a crash fault) thus left its workers, forkserver and tracker
    alive for good: torchrun signals the process group of a rank still running only.
    Here a thread waits on a pidfd of the rank (readable once it has exited, even before
    it is reaped) and ends the worker, and with the last one the forkserver and tracker.

    Ctrl-C is ignored here too (see _SigintBlocked), for a forkserver that was started
    before ours, without SIGINT blocked."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        fd = os.pidfd_open(rank_pid)
    except ProcessLookupError:  # the rank is gone already
        os._exit(0)
    except (AttributeError, OSError):  # no pidfd (not Linux >= 5.3): poll once a second
        fd = None

    def watch() -> None:
        if fd is not None:
            select.select([fd], [], [])
        else:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                while True:
                    os.kill(rank_pid, 0)
                    time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, name="dgxtrain-rank-watch", daemon=True).start()


class _SigintBlocked:
    """A loader worker's process, started with SIGINT blocked.

    The terminal sends Ctrl-C to the rank and its loader workers alike, and a worker ends
    on it (torch's worker loop returns on KeyboardInterrupt); the rank, which saves before it
    stops (distributed/preempt.py), then fails for want of its batches. The blocked signal
    is inherited by the worker, and by the forkserver, hence by the workers it forks, from
    their very start: worker_init_fn would come after a start that can take seconds."""

    def start(self) -> None:
        before = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            super().start()  # type: ignore[misc]
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, before)


# At module level: spawn and forkserver pickle the process object, its class by name.
class _Fork(_SigintBlocked, mpc.ForkProcess):
    pass


class _Spawn(_SigintBlocked, mpc.SpawnProcess):
    pass


class _ForkServer(_SigintBlocked, mpc.ForkServerProcess):
    pass


class _ForkContext(mpc.ForkContext):
    Process = _Fork


class _SpawnContext(mpc.SpawnContext):
    Process = _Spawn


class _ForkServerContext(mpc.ForkServerContext):
    Process = _ForkServer


_CONTEXTS = {"fork": _ForkContext(), "spawn": _SpawnContext(),
             "forkserver": _ForkServerContext()}


def make_loader(dataset: Dataset, batch_sampler: Any, *, num_workers: int,
                prefetch_factor: int, persistent_workers: bool, start_method: str,
                pin_memory: bool, seed_rngs: Sequence[str] = RNGS) -> DataLoader:
    workers = {"prefetch_factor": prefetch_factor, "persistent_workers": persistent_workers,
               "multiprocessing_context": _CONTEXTS[start_method],
               "worker_init_fn": functools.partial(_end_with, os.getpid())} if num_workers else {}
    return DataLoader(SeededItems(dataset, seed_rngs), batch_sampler=batch_sampler,
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


@contextlib.contextmanager
def item_errors(name: str, when: str) -> Iterator[None]:
    """A dataset's own error while training, as one line: which dataset, item and step."""
    try:
        yield
    except ItemError as e:
        raise DataError(f"{name}: {e.where()}, for {when}; fix: make __getitem__ return "
                        "(input, target) for every index below len(); try it alone with "
                        "data.num_workers=0 for the whole traceback") from e


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
                 num_workers: int, name: str = "data.train"):
        self.loader, self.step, self.accum, self.device = loader, start, accum, device
        self.num_workers, self.name = num_workers, name
        self._it: Iterator | None = None

    def __call__(self, step: int) -> list[tuple[Any, torch.Tensor]]:
        if step != self.step:  # the loader reads ahead in order: it cannot jump
            raise RuntimeError(f"LoaderFeed at step {self.step} was asked for step {step}")
        if self._it is None:
            self._it = iter(self.loader)
        with item_errors(self.name, f"step {step + 1}"):
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
