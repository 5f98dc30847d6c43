"""Distributed state: who am I, on which device, and the few collectives the loop needs.

Every rank question goes through `DistEnv`; nothing else reads RANK or SLURM_* from the
environment. Three launchers are understood, in this order:
  torchrun  RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT
  srun      SLURM_STEP_ID, SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, SLURM_JOB_NODELIST
  none      a single process
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as tdist

from dgxtrain import slurm

log = logging.getLogger(__name__)

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
SLURM_VARS = ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_JOB_NODELIST")


class DistEnvError(RuntimeError):
    """The launcher's environment is inconsistent; the message says what to set."""


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    launcher: str  # torchrun | slurm | single
    device: torch.device
    master_addr: str = "127.0.0.1"
    master_port: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def backend(self) -> str:
        # NCCL moves GPU tensors over NVLink/InfiniBand; gloo is the CPU equivalent.
        return "nccl" if self.device.type == "cuda" else "gloo"

    @classmethod
    def from_env(cls, device: str = "auto") -> DistEnv:
        launcher, rank, local_rank, world, addr, port = _read_launcher()
        return cls(rank, local_rank, world, launcher,
                   _pick_device(device, local_rank, launcher), addr, port)


def _missing(names: tuple[str, ...]) -> list[str]:
    return [n for n in names if not os.environ.get(n)]


def _read_launcher() -> tuple[str, int, int, int, str, int]:
    env = os.environ
    missing = _missing(TORCHRUN_VARS)
    # MASTER_ADDR/PORT alone are no torchrun: the batch script exports them for srun tasks.
    if any(env.get(n) for n in ("RANK", "WORLD_SIZE", "LOCAL_RANK")):
        if missing:
            raise DistEnvError(
                f"half-set torchrun environment: {', '.join(missing)} unset while "
                f"{', '.join(sorted(set(TORCHRUN_VARS) - set(missing)))} set; fix: launch "
                "with torchrun, or unset these variables for a single process")
        return ("torchrun", int(env["RANK"]), int(env["LOCAL_RANK"]), int(env["WORLD_SIZE"]),
                env["MASTER_ADDR"], int(env["MASTER_PORT"]))
    # SLURM_STEP_ID is set by srun only: the batch script itself also carries SLURM_PROCID
    # and SLURM_NTASKS, but there it is one process, not the first of many.
    if env.get("SLURM_STEP_ID"):
        missing = _missing(SLURM_VARS)
        if missing:
            raise DistEnvError(f"srun step without {', '.join(missing)}; fix: launch with "
                               "srun --ntasks-per-node=<GPUs>, or use torchrun")
        world = int(env.get("SLURM_STEP_NUM_TASKS") or env["SLURM_NTASKS"])
        nodes = env.get("SLURM_STEP_NODELIST") or env["SLURM_JOB_NODELIST"]
        num_nodes = int(env.get("SLURM_STEP_NUM_NODES") or env.get("SLURM_NNODES") or 1)
        try:
            addr = env.get("MASTER_ADDR") or slurm.head_address(nodes, num_nodes)
        except slurm.SlurmError as e:
            raise DistEnvError(str(e)) from None
        port = int(env.get("MASTER_PORT") or slurm.rendezvous_port(env.get("SLURM_JOB_ID", 0)))
        return ("slurm", int(env["SLURM_PROCID"]), int(env["SLURM_LOCALID"]), world, addr, port)
    return ("single", 0, 0, 1, "127.0.0.1", 0)


def world_size_from_env() -> int:
    """The number of ranks the launcher started (1 without one); checks the environment."""
    return _read_launcher()[3]


def _pick_device(pref: str, local_rank: int, launcher: str) -> torch.device:
    if pref == "cpu" or (pref == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    count = torch.cuda.device_count()
    if count == 1 and launcher == "slurm":
        # srun --gpus-per-task=1 (or --gpu-bind=single) shows each task only its own GPU.
        return torch.device("cuda", 0)
    if local_rank >= count:
        raise DistEnvError(f"local rank {local_rank} has no GPU ({count} visible); fix: start "
                           f"at most {count} processes per node, or use device=cpu")
    return torch.device("cuda", local_rank)


def cores_per_rank() -> int:
    """The CPU cores this process may use for its own threads: SLURM_CPUS_PER_TASK under
    srun, else its CPU affinity shared evenly among the processes torchrun started on this
    node (they all inherit the same affinity)."""
    env = os.environ
    owned = len(os.sched_getaffinity(0))
    if env.get("SLURM_STEP_ID") and env.get("SLURM_CPUS_PER_TASK") and not env.get("RANK"):
        return max(1, min(owned, int(env["SLURM_CPUS_PER_TASK"])))
    sharing = int(env.get("LOCAL_WORLD_SIZE") or 1) if env.get("RANK") else 1
    return max(1, owned // sharing)


def env_rank() -> int:
    """This process's global rank as the launcher set it (0 for a single process)."""
    return int(os.environ.get("RANK") or
               (os.environ.get("SLURM_STEP_ID") and os.environ.get("SLURM_PROCID")) or 0)


@functools.cache
def shared_run_id() -> str:
    """A run name every rank of one job agrees on (the default run dir's last part)."""
    env = os.environ
    if env.get("DGXTRAIN_RUN_ID"):
        return env["DGXTRAIN_RUN_ID"]
    if slurm.run_id(env):  # stable across requeues, the same on every node
        return slurm.run_id(env)
    if env.get("TORCHELASTIC_RUN_ID", "none") != "none":  # torchrun --standalone / --rdzv-id
        return f"torchrun-{env['TORCHELASTIC_RUN_ID']}"
    if world_size_from_env() > 1:
        raise DistEnvError("ranks cannot agree on a run dir (no shared run id); fix: export "
                           "DGXTRAIN_RUN_ID=<name> for every rank, pass torchrun --rdzv-id, "
                           "or set hydra.run.dir=<path>")
    return time.strftime("%Y-%m-%d_%H-%M-%S")


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


def grad_sync(model: torch.nn.Module, enabled: bool) -> contextlib.AbstractContextManager:
    """DDP all-reduces gradients on every backward unless told not to (no_sync)."""
    if enabled or not hasattr(model, "no_sync"):
        return contextlib.nullcontext()
    return model.no_sync()


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
