"""The process group and the few collectives the trainer needs beyond DDP's own."""

from __future__ import annotations

import contextlib
import datetime
import gc
import logging
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as tdist

from dgxtrain.distributed.env import DistEnv
from dgxtrain.ending import Board, StoreBoard, ending, run_dir_known
from dgxtrain.errors import DistEnvError, first_line

log = logging.getLogger(__name__)


@contextlib.contextmanager
def rendezvous(env: DistEnv, timeout_s: float, run_dir: Path | None = None) -> Iterator[Board]:
    """Reach the launcher's store, where the run's failure is told (ending.py), and tell
    there any failure in the block. It waits for no other rank: `arrive` does, after the
    checks that fail fast on a bad setting."""
    if env.launcher == "single":  # its errors are raised as they are: the caller's to tell
        run_dir_known(run_dir)
        yield Board()
        return
    with ending(Board(env.rank), run_dir):  # no one to agree with yet: this rank tells its own
        store = _connect(env, timeout_s)
    board = StoreBoard(store, env.rank)
    with ending(board, run_dir):
        yield board


def _connect(env: DistEnv, timeout_s: float) -> tdist.Store:
    where = f"{env.master_addr}:{env.master_port}"
    # torchrun's agent hosts the store; without torchrun, rank 0 does.
    host = env.rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"
    # A client retries its connection with a C++ stack trace per try: wait for the port here.
    if not host and not _port_open(env.master_addr, env.master_port, timeout_s):
        raise DistEnvError(f"dist.rendezvous_timeout_s={timeout_s:g}: the store at {where} "
                           f"(rank 0's) did not answer in {timeout_s:g} s; fix: {_FIX}")
    try:
        store = tdist.TCPStore(env.master_addr, env.master_port, env.world_size, host,
                               timeout=datetime.timedelta(seconds=timeout_s),
                               wait_for_workers=False, multi_tenant=True)
    except (RuntimeError, TimeoutError) as e:  # DistNetworkError, DistStoreError
        raise DistEnvError(f"dist.rendezvous_timeout_s={timeout_s:g}: cannot reach the store "
                           f"at {where} ({first_line(e)}); fix: {_FIX}") from e
    # torchrun's agent keeps its store across worker restarts: without a fresh prefix per
    # attempt, a restarted rank can read the dead generation's keys and addresses.
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return tdist.PrefixStore(f"dgxtrain/attempt-{attempt}", store)


_FIX = ("start every rank (torchrun --nnodes/--nproc_per_node, srun --ntasks), check that "
        "MASTER_ADDR/MASTER_PORT reach rank 0's node, or raise dist.rendezvous_timeout_s")


def arrive(board: Board, env: DistEnv, timeout_s: float) -> None:
    """Check in, and wait until every rank has, or name those that never came."""
    store = board.store
    if store is None:
        return
    store.set(f"arrived/{env.rank}", "1")
    store.add("arrived", 1)
    deadline = time.monotonic() + timeout_s
    while store.add("arrived", 0) < env.world_size:
        if time.monotonic() > deadline:
            missing = [r for r in range(env.world_size) if not store.check([f"arrived/{r}"])]
            shown = ", ".join(map(str, missing[:8])) + (", ..." if len(missing) > 8 else "")
            raise DistEnvError(f"dist.rendezvous_timeout_s={timeout_s:g}: {len(missing)} of "
                               f"{env.world_size} ranks never came (rank {shown}); fix: {_FIX}")
        time.sleep(0.05)


def _port_open(addr: str, port: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection((addr, port), timeout=2).close()
            return True
        except OSError:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.2)


@contextlib.contextmanager
def process_group(env: DistEnv, timeout_s: float = 1800,
                  board: Board | None = None) -> Iterator[None]:
    """Join the process group for the duration of the block, on the store the ranks met on
    (rendezvous: the trainer), or on one of its own (the tools); teardown always runs.

    Any launched job joins one, even of one rank: `torchrun --nproc_per_node=1` takes the
    same NCCL/DDP path as eight ranks. Only a plain `python -m dgxtrain` runs without.
    """
    if env.launcher == "single":
        yield
        return
    timeout = datetime.timedelta(seconds=timeout_s)
    store = board.store if board is not None else _connect(env, timeout_s)
    tdist.init_process_group(
        env.backend, store=store, rank=env.rank, world_size=env.world_size,
        timeout=timeout,
        # Binding the group to this rank's GPU lets NCCL connect eagerly and never guess.
        device_id=env.device if env.device.type == "cuda" else None)
    log.info("joined %s process group: rank %d of %d via %s:%d", env.backend, env.rank,
             env.world_size, env.master_addr, env.master_port)
    try:
        yield
    finally:
        # What still holds the group (a DDP reducer, a finished Work in a cycle) must go while
        # the interpreter is alive: freed at exit, gloo's threads can abort the process.
        gc.collect()
        tdist.destroy_process_group()
        gc.collect()


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


class _Slot:
    """Where a tensor was in a tree that travels without its tensors."""

    def __init__(self, t: torch.Tensor):
        self.shape, self.dtype = tuple(t.shape), t.dtype


def _map_tensors(tree: Any, fn) -> Any:
    """`tree` with each tensor (or _Slot) x replaced by fn(x), in a fixed order; dicts, lists
    and plain tuples are walked, anything else is kept as it is."""
    if isinstance(tree, (torch.Tensor, _Slot)):
        return fn(tree)
    if isinstance(tree, dict):
        return type(tree)((k, _map_tensors(v, fn)) for k, v in tree.items())
    if isinstance(tree, list) or type(tree) is tuple:
        return type(tree)(_map_tensors(v, fn) for v in tree)
    return tree


def broadcast_tensors(tree: Any, device: torch.device, bucket_bytes: int = 4 * 2**20) -> Any:
    """Rank 0's `tree` (nested dicts and lists of tensors and plain values, such as a state
    dict) on every rank, each tensor on `device` with rank 0's exact bits; other ranks pass
    None. The structure travels as one pickled object; tensors of `bucket_bytes` or more go
    as they are, smaller ones in flat buckets of one dtype, so that thousands of small
    optimizer-state tensors cost a few collectives. (Copying a large tensor into a bucket
    would cost about as much as sending it, measured on gloo.)"""
    if not _initialized():
        return tree
    main = tdist.get_rank() == 0
    tensors: list[torch.Tensor] = []  # in the order _map_tensors visits them, on every rank

    def take(t: torch.Tensor) -> _Slot:
        tensors.append(t.to(device))
        return _Slot(t)

    def make(slot: _Slot) -> None:
        tensors.append(torch.empty(slot.shape, dtype=slot.dtype, device=device))

    skeleton = broadcast_object(_map_tensors(tree, take) if main else None)
    if not main:
        _map_tensors(skeleton, make)
    for bucket in _buckets(tensors, bucket_bytes):
        if len(bucket) == 1 and bucket[0].is_contiguous():  # a large tensor: no copy
            tdist.broadcast(bucket[0], src=0)
            continue
        flat = (torch.cat([t.reshape(-1) for t in bucket]) if main else
                torch.empty(sum(t.numel() for t in bucket), dtype=bucket[0].dtype, device=device))
        tdist.broadcast(flat, src=0)
        if not main:
            for t, part in zip(bucket, flat.split([t.numel() for t in bucket])):
                t.copy_(part.view(t.shape))
    received = iter(tensors)
    return _map_tensors(skeleton, lambda s: next(received))


def _buckets(tensors: list[torch.Tensor], cap_bytes: int) -> Iterator[list[torch.Tensor]]:
    """The tensors grouped by dtype (mixed precision interleaves them), then cut into runs of
    at most `cap_bytes` (a larger tensor goes alone)."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for group in by_dtype.values():
        bucket, size = [], 0
        for t in group:
            if bucket and size + t.nbytes > cap_bytes:
                yield bucket
                bucket, size = [], 0
            bucket.append(t)
            size += t.nbytes
        yield bucket
