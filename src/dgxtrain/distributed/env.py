"""Distributed state: who am I, on which device, and the run id every rank agrees on.

Every rank question goes through `DistEnv`; nothing else reads RANK or SLURM_* from the
environment. Three launchers are understood, in this order:
  torchrun  RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT
  srun      SLURM_STEP_ID, SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, SLURM_JOB_NODELIST
  none      a single process
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from dgxtrain.distributed import slurm
from dgxtrain.errors import DistEnvError

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
SLURM_VARS = ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_JOB_NODELIST")


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


def _int(name: str, low: int = 0, high: int | None = None) -> int:
    """An integer variable the launcher sets, checked: a bad one is a one-line error."""
    raw = os.environ[name]
    try:
        value = int(raw)
    except ValueError:
        value = None
    if value is None or value < low or (high is not None and value > high):
        span = f"from {low}" + (f" to {high}" if high is not None else " up")
        raise DistEnvError(f"{name}={raw!r} is not an integer {span}; fix: let the launcher "
                           f"set it (torchrun, srun), or set it to one")
    return value


def _check_rank(rank: int, world: int, names: str) -> None:
    if rank >= world:
        raise DistEnvError(f"rank {rank} is not below the world size {world} ({names}); fix: "
                           "give every process a rank from 0 to the world size - 1")


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
        rank, world = _int("RANK"), _int("WORLD_SIZE", 1)
        _check_rank(rank, world, "RANK, WORLD_SIZE")
        return ("torchrun", rank, _int("LOCAL_RANK"), world, env["MASTER_ADDR"],
                _int("MASTER_PORT", 1, 65535))
    # SLURM_STEP_ID is set by srun only: the batch script itself also carries SLURM_PROCID
    # and SLURM_NTASKS, but there it is one process, not the first of many.
    if env.get("SLURM_STEP_ID"):
        missing = _missing(SLURM_VARS)
        if missing:
            raise DistEnvError(f"srun step without {', '.join(missing)}; fix: launch with "
                               "srun --ntasks-per-node=<GPUs>, or use torchrun")
        world = _int("SLURM_STEP_NUM_TASKS" if env.get("SLURM_STEP_NUM_TASKS")
                     else "SLURM_NTASKS", 1)
        nodes = env.get("SLURM_STEP_NODELIST") or env["SLURM_JOB_NODELIST"]
        num_nodes = int(env.get("SLURM_STEP_NUM_NODES") or env.get("SLURM_NNODES") or 1)
        try:
            addr = env.get("MASTER_ADDR") or slurm.head_address(nodes, num_nodes)
        except slurm.SlurmError as e:
            raise DistEnvError(str(e)) from None
        port = (_int("MASTER_PORT", 1, 65535) if env.get("MASTER_PORT")
                else slurm.rendezvous_port(env.get("SLURM_JOB_ID", 0)))
        rank = _int("SLURM_PROCID")
        _check_rank(rank, world, "SLURM_PROCID, SLURM_NTASKS")
        return ("slurm", rank, _int("SLURM_LOCALID"), world, addr, port)
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
    """This process's global rank as the launcher set it (0 for a single process, and for
    one that is no integer: DistEnv says what is wrong with it, and someone must)."""
    raw = os.environ.get("RANK") or \
        (os.environ.get("SLURM_STEP_ID") and os.environ.get("SLURM_PROCID")) or "0"
    return int(raw) if raw.isdigit() else 0


def launch_id(env: Mapping[str, str] = os.environ) -> str | None:
    """This launch's name: kept across its own restarts (a SLURM requeue, a torchrun
    restart), new for another launch; None for a process started by hand."""
    if slurm.run_id(env):
        return slurm.run_id(env)
    if env.get("TORCHELASTIC_RUN_ID", "none") != "none":
        return f"torchrun-{env['TORCHELASTIC_RUN_ID']}"
    return None


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


def register_resolvers() -> None:
    """Config resolvers that must agree on every rank, so they come from the launcher."""
    from omegaconf import OmegaConf

    # The run dir must be the same on every rank: ${now:} is resolved per process, so the
    # id comes from what the launcher shares (see shared_run_id).
    OmegaConf.register_new_resolver("dgx_run_id", shared_run_id, replace=True)
    # Only rank 0 writes Hydra's .hydra/ folder; N ranks writing the same files race.
    OmegaConf.register_new_resolver(
        "dgx_hydra_subdir", lambda: ".hydra" if env_rank() == 0 else None, replace=True)
