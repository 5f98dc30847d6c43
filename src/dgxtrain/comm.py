"""Gradient communication: the DDP wrapper and how its buckets are all-reduced.

DDP splits the gradients into buckets and all-reduces each as soon as the backward pass
has filled it. On GPUs NCCL does that on its own stream, behind the rest of the backward.
On CPU ranks of one machine, gloo sends every bucket through loopback TCP: on this
project's 2-core reference machine that costs each rank ~12 ms of a ~55 ms step, on cores
the backward needs too. `ShmAllReduce` instead sums the buckets in shared memory: one copy
in, one add out, and a small gloo barrier. The sum is over ranks in rank order on every
rank, so every rank gets the same bits (with two ranks, the bits gloo gives).

`StepVotes` sums a step's per-rank flags (non-finite loss, stop) over ranks. Where the
shared-memory hook runs they ride on its barrier, a tiny all-reduce it needs anyway: one
collective per step instead of two, which on two busy cores is worth ~5% of the step.
"""

from __future__ import annotations

import logging
import mmap
import os
import time
import uuid
from typing import Any

import torch
import torch.distributed as tdist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel as DDP

from dgxtrain.config import ConfigError
from dgxtrain.dist import DistEnv, all_agree, all_reduce_, broadcast_object

log = logging.getLogger(__name__)


def wrap(model: torch.nn.Module, env: DistEnv, dist_cfg: Any, hosts: list[str],
         uses_no_sync: bool) -> DDP:
    """DDP with the knobs of `dist` (see config.DistConfig) and its gradient hook.
    `uses_no_sync`: gradient accumulation or the compile probe will call no_sync()."""
    # DDP's static graph breaks on a backward under no_sync() (an internal assert).
    static_graph = dist_cfg.static_graph and not uses_no_sync
    ddp = DDP(model, device_ids=[env.device.index] if env.device.type == "cuda" else None,
              bucket_cap_mb=dist_cfg.bucket_cap_mb,
              # Gradients live in the buckets: no copy into them, no copy out.
              gradient_as_bucket_view=dist_cfg.gradient_as_bucket_view,
              # The graph is the same every step: DDP stops re-checking which parameters
              # got gradients, and fixes its bucket order after the first step.
              static_graph=static_graph)
    hook = choose_hook(dist_cfg.comm_hook, env, model, hosts)
    shm = ShmAllReduce.create(env, model) if hook == "shm" else None
    if shm is not None:
        ddp.register_comm_hook(shm, ShmAllReduce.hook)
    elif hook == "shm":
        hook = "allreduce"
    elif hook == "bf16":
        # Halves the bytes on the wire and rounds every gradient to bf16 once: not the
        # fp32 maths of the other hooks, so never chosen by auto.
        ddp.register_comm_hook(None, default_hooks.bf16_compress_hook)
    log.info("DDP: gradient all-reduce by %s, buckets of %g MB, gradient_as_bucket_view=%s, "
             "static_graph=%s", hook, dist_cfg.bucket_cap_mb,
             dist_cfg.gradient_as_bucket_view, static_graph)
    return ddp


def choose_hook(name: str, env: DistEnv, model: torch.nn.Module, hosts: list[str]) -> str:
    """auto: shared memory where it can work (CPU ranks all on one host, fp32 parameters),
    else the backend's own all-reduce (NCCL on GPUs)."""
    possible = (env.device.type == "cpu" and len(set(hosts)) == 1 and env.world_size > 1
                and all(p.dtype == torch.float32 for p in model.parameters()))
    if name == "shm" and not possible:
        raise ConfigError("dist.comm_hook", name, "shared memory needs CPU ranks all on one "
                          "host and fp32 parameters", "use dist.comm_hook=auto")
    if name == "bf16" and env.device.type != "cuda":
        raise ConfigError("dist.comm_hook", name, "bf16 compression needs NCCL (CUDA GPUs); "
                          "gloo cannot sum bf16", "use dist.comm_hook=auto on CPU")
    if name == "auto":
        return "shm" if possible else "allreduce"
    return name


class ShmAllReduce:
    """All-reduce of DDP buckets through a shared-memory file that every rank maps.

    Each bucket is copied in as the backward produces it; at the last bucket one barrier,
    then every bucket is summed and its future completed (DDP waits for them only after the
    backward). Two sets of slots alternate per backward: a rank writes backward k + 2 only
    after the barrier of k + 1, which every rank passes after it has read backward k. The
    file is unlinked once mapped, so a crash leaves nothing behind.
    """

    def __init__(self, rank: int, world: int, group: Any, buffer: mmap.mmap, slot: int):
        self.rank, self.world, self.group, self.buffer = rank, world, group, buffer
        self.slots = torch.frombuffer(buffer, dtype=torch.float32).view(2, world, slot)
        self.backwards, self.offset = 0, 0
        self.pending: list[tuple[torch.Tensor, torch.Tensor, torch.futures.Future]] = []
        self.votes: torch.Tensor | None = None  # to be summed at the next barrier (carry)
        self.summed: torch.Tensor | None = None  # the last barrier's sum of them
        self.seconds = 0.0  # all time spent here (the benchmark's)
        self.last_wait_s = 0.0  # the last backward's wait at the barrier: other ranks' lag

    @classmethod
    def create(cls, env: DistEnv, model: torch.nn.Module) -> ShmAllReduce | None:
        """Map one shared file on every rank, or return None on every rank (with a warning)
        where that fails: a container's private /dev/shm, or one too small (Docker's 64 MB)."""
        slot = sum(p.numel() for p in model.parameters() if p.requires_grad)  # every bucket
        size = 2 * env.world_size * slot * 4
        # Barriers on a group of their own: never interleaved with the trainer's collectives.
        group = tdist.new_group(backend="gloo")
        where = os.environ.get("DGXTRAIN_SHM_DIR", "/dev/shm")  # tmpfs, shared by the node
        path = broadcast_object(f"{where}/dgxtrain-{uuid.uuid4().hex}")
        buffer, error = None, ""
        if env.rank == 0:
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
                try:
                    # Reserved now: a full tmpfs would otherwise kill a rank with SIGBUS later.
                    os.posix_fallocate(fd, 0, size)
                finally:
                    os.close(fd)
            except OSError as e:
                error = f"{path}: {e.strerror}"
        if all_agree(not error, env.device):
            try:
                fd = os.open(path, os.O_RDWR)
                try:
                    buffer = mmap.mmap(fd, size)
                finally:
                    os.close(fd)
            except OSError as e:
                error = f"{path}: {e.strerror}"
        mapped = all_agree(buffer is not None, env.device)
        if env.rank == 0 and os.path.exists(path):
            os.unlink(path)  # every rank has mapped it (or given up): nothing left behind
        if not mapped:  # said once, by rank 0: every rank falls back alike
            (log.warning if env.is_main else log.debug)(
                "shared-memory gradient all-reduce unavailable (%s, %.0f MB); using the "
                "backend's all-reduce", error or "another rank failed", size / 1e6)
            return None
        return cls(env.rank, env.world_size, group, buffer, slot)

    # No annotations: DDP compares them with its own classes, and under
    # `from __future__ import annotations` they would be strings.
    def hook(self, bucket):  # noqa: ANN001, ANN201
        started = time.perf_counter()
        grads = bucket.buffer()
        n = grads.numel()
        if self.offset + n > self.slots.shape[2]:
            raise RuntimeError(f"DDP bucket of {n} gradients past the shared slot's "
                               f"{self.slots.shape[2]}; fix: dist.comm_hook=allreduce")
        region = self.slots[self.backwards % 2, :, self.offset:self.offset + n]
        self.offset += n
        # As DDP's own hook: each rank's share is divided first, then summed (the mean).
        torch.div(grads, self.world, out=region[self.rank])
        done = torch.futures.Future()
        self.pending.append((grads, region, done))
        if bucket.is_last():
            # The barrier is an all-reduce of the carried votes (or of nothing): through
            # gloo's sockets, it ends on no rank before every rank's copies above are done.
            arrived = time.perf_counter()
            votes = self.votes if self.votes is not None else torch.zeros(1)
            tdist.all_reduce(votes, group=self.group)
            self.summed, self.votes = self.votes, None
            self.last_wait_s = time.perf_counter() - arrived
            for out, summands, future in self.pending:
                torch.add(summands[0], summands[1], out=out)
                for r in range(2, self.world):
                    out.add_(summands[r])
                future.set_result(out)
            self.pending, self.offset = [], 0
            self.backwards += 1
        self.seconds += time.perf_counter() - started
        return done


class StepVotes:
    """A step's per-rank flags (1.0 = yes) summed over ranks, so that every rank takes the
    same decisions. Made before the backward that all-reduces the gradients: the
    shared-memory hook sums them at its barrier; elsewhere `flags` all-reduces them."""

    def __init__(self, model: torch.nn.Module, votes: torch.Tensor):
        self.shm, self.votes = shm_state(model), votes
        if self.shm is not None:
            self.shm.votes = votes

    def flags(self, local: torch.Tensor) -> torch.Tensor:
        """The votes summed over ranks, then `local`: flags every rank computed from the
        all-reduced gradients. The shared-memory sum gives every rank the same bits, so
        those flags agree as they are; other backends' all-reduce sums them too."""
        carried = None
        if self.shm is not None:  # no hook ran (no all-reducing backward): none carried
            carried, self.shm.summed, self.shm.votes = self.shm.summed, None, None
        if carried is not None:
            return torch.cat([carried, local])
        return all_reduce_(torch.cat([self.votes, local]))


def comm_wait_s(model: torch.nn.Module) -> float:
    """How long a recent all-reducing backward waited for the other ranks: the shared-memory
    hook's barrier time in the last backward, or what DDP's runtime logging sampled (the wait
    for the all-reduce after the backward's own compute ended; DDP files a sampled step's
    figures at the next forward, so they are of an earlier step); 0 where there is no DDP."""
    shm = shm_state(model)
    if shm is not None:
        return shm.last_wait_s
    ddp = getattr(model, "_orig_mod", model)  # under torch.compile
    if not hasattr(ddp, "_get_ddp_logging_data"):
        return 0.0
    data = ddp._get_ddp_logging_data()
    comm_end = data.get("backward_comm_time_end")
    compute_end = data.get("backward_compute_time_end")
    if not comm_end or not compute_end:
        return 0.0
    return max(0.0, (comm_end - compute_end) / 1e9)


def shm_state(model: torch.nn.Module) -> ShmAllReduce | None:
    """The shared-memory hook of a DDP model (compiled or not), if it has one."""
    ddp = getattr(model, "_orig_mod", model)
    for _, state in getattr(ddp, "_comm_hooks", []):
        if isinstance(state, ShmAllReduce):
            return state
    return None
