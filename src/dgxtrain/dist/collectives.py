"""The process group and the few collectives the trainer needs beyond DDP's own."""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as tdist

from dgxtrain.dist.env import DistEnv

log = logging.getLogger(__name__)


@contextlib.contextmanager
def process_group(env: DistEnv, timeout_s: float = 1800) -> Iterator[None]:
    """Join the process group for the duration of the block; teardown always runs.

    Any launched job joins one, even of one rank: `torchrun --nproc_per_node=1` takes the
    same NCCL/DDP path as eight ranks. Only a plain `python -m dgxtrain` runs without.
    """
    if env.launcher == "single":
        yield
        return
    timeout = datetime.timedelta(seconds=timeout_s)
    url = f"tcp://{env.master_addr}:{env.master_port}?rank={env.rank}&world_size={env.world_size}"
    store, _, _ = next(tdist.rendezvous(url, timeout=timeout))
    # torchrun's agent keeps its store across worker restarts: without a fresh prefix per
    # attempt, a restarted rank can read the dead generation's addresses and fail to connect.
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    tdist.init_process_group(
        env.backend, store=tdist.PrefixStore(f"dgxtrain/attempt-{attempt}", store),
        rank=env.rank, world_size=env.world_size, timeout=timeout,
        # Binding the group to this rank's GPU lets NCCL connect eagerly and never guess.
        device_id=env.device if env.device.type == "cuda" else None)
    log.info("joined %s process group: rank %d of %d via %s:%d", env.backend, env.rank,
             env.world_size, env.master_addr, env.master_port)
    try:
        yield
    finally:
        tdist.destroy_process_group()


def all_reduce_(t: torch.Tensor, mean: bool = False, op: str = "sum") -> torch.Tensor:
    """In-place sum (or mean, or max) over ranks; a no-op in a single process."""
    if _initialized():
        tdist.all_reduce(t, op=tdist.ReduceOp.MAX if op == "max" else tdist.ReduceOp.SUM)
        if mean:
            t /= tdist.get_world_size()
    return t


def _initialized() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def broadcast_object(obj: Any) -> Any:
    """Rank 0's `obj` on every rank (a small picklable value)."""
    if not _initialized():
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=0)
    return box[0]


def all_agree(flag: bool, device: torch.device) -> bool:
    """True on every rank iff `flag` is true on every rank."""
    t = torch.tensor([0.0 if flag else 1.0], device=device)
    return all_reduce_(t).item() == 0.0


def gather_rows(row: torch.Tensor) -> torch.Tensor:
    """Every rank's 1-D `row`, stacked in rank order (world_size x n); log steps only."""
    if not _initialized():
        return row.unsqueeze(0)
    rows = [torch.empty_like(row) for _ in range(tdist.get_world_size())]
    tdist.all_gather(rows, row)
    return torch.stack(rows)


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's small picklable `obj`, in rank order."""
    if not _initialized():
        return [obj]
    out: list[Any] = [None] * tdist.get_world_size()
    tdist.all_gather_object(out, obj)
    return out
