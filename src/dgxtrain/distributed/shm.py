"""An opt-in DDP gradient hook for CPU ranks on one host (dist.comm_hook=shm).

On CPU ranks of one machine, gloo sends every bucket through loopback TCP: on this
project's 2-core reference machine that costs each rank ~12 ms of a ~55 ms step, on cores
the backward needs too. `ShmAllReduce` instead sums the buckets in shared memory: one copy
in, one add out, and a small gloo barrier. The sum is over ranks in rank order on every
rank, so every rank gets the same bits (with two ranks, the bits gloo gives). Nothing else
in the trainer knows it exists: DDP calls it, the step does not.
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

from dgxtrain.distributed.collectives import all_agree, broadcast_object
from dgxtrain.distributed.env import DistEnv

log = logging.getLogger(__name__)


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
            # The barrier: through gloo's sockets, it ends on no rank before every rank's
            # copies above are done.
            arrived = time.perf_counter()
            tdist.barrier(group=self.group)
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
