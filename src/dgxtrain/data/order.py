"""The global sample order: which sample indices each rank uses at each step.

The order is a pseudo-random permutation of [0, num_samples) per pass (a Feistel network
with cycle walking, keyed by seed and pass): global batch s covers stream positions
[s*B, (s+1)*B), and rank r takes its contiguous slice of them. It depends on the step
only, never on the world size or on what came before.
"""

from __future__ import annotations

import torch

from dgxtrain.data.hashing import mix32, stream_key

_PERMUTATION = 0x5EED0004


class FeistelPermutation:
    """A keyed bijection of [0, n) for each pass, without materialising it."""

    ROUNDS = 6

    def __init__(self, n: int, seed: int):
        bits = max(2, (n - 1).bit_length())
        self.half = (bits + 1) // 2  # a balanced network on [0, 4**half) >= n
        self.mask, self.n, self.seed = (1 << self.half) - 1, n, seed

    def _round_trip(self, x: torch.Tensor, keys: list[torch.Tensor]) -> torch.Tensor:
        left, right = x >> self.half, x & self.mask
        for k in keys:
            left, right = right, left ^ (mix32(right ^ k) & self.mask)
        return (left << self.half) | right

    def __call__(self, pos: torch.Tensor, epoch: torch.Tensor) -> torch.Tensor:
        shape, pos = pos.shape, pos.reshape(-1)
        base = stream_key(self.seed, _PERMUTATION)
        epoch = torch.as_tensor(epoch, device=pos.device).expand(shape).reshape(-1)
        keys = [mix32(mix32(epoch ^ base) ^ r) for r in range(self.ROUNDS)]
        y = self._round_trip(pos, keys)
        # Cycle walking: a bijection of the power-of-4 domain, walked until it lands in
        # [0, n), is a bijection of [0, n). Each round walks only the values still outside
        # (a quarter of them, or fewer). The loop reads its data: on a GPU that would be a
        # host sync per round, so GlobalBatchSchedule runs it on the host.
        out = (y >= self.n).nonzero().squeeze(1)
        while len(out):
            walked = self._round_trip(y[out], [k[out] for k in keys])
            y[out] = walked
            out = out[walked >= self.n]
        return y.view(shape)


class GlobalBatchSchedule:
    """Which sample indices rank `rank` uses at step s: a tensor [grad_accum, micro_batch].

    Pure in (seed, num_samples, global batch, step): a run can stop, resume, or change
    its world size and continue the same stream.
    """

    def __init__(self, num_samples: int, seed: int, global_batch_size: int, rank: int,
                 world_size: int, micro_batch_size: int, device: torch.device | str = "cpu"):
        self.perm = FeistelPermutation(num_samples, seed)
        self.global_batch, self.micro = global_batch_size, micro_batch_size
        self.per_rank = global_batch_size // world_size
        self.accum = self.per_rank // micro_batch_size
        self.offset = rank * self.per_rank
        self.device = torch.device(device)
        # Index maths for many steps at once: the host's share of a step stays small.
        self.chunk_steps = max(1, 65536 // self.per_rank)
        self._chunk_start, self._chunk, self._passes = -1, torch.empty(0), torch.empty(0)

    def positions(self, step: int, steps: int = 1) -> torch.Tensor:
        """Global positions of this rank's samples at steps [step, step + steps), on the host."""
        s = torch.arange(step, step + steps, dtype=torch.int64)
        local = torch.arange(self.per_rank, dtype=torch.int64)
        return s[:, None] * self.global_batch + self.offset + local[None, :]

    def __call__(self, step: int) -> torch.Tensor:
        i = self._fill(step)
        return self._chunk[i]

    def passes(self, step: int) -> torch.Tensor:
        """The pass over the data of each of step's samples, shaped like its indices."""
        i = self._fill(step)
        return self._passes[i]

    def _fill(self, step: int) -> int:
        start = step - step % self.chunk_steps
        if start != self._chunk_start:
            # On the host: the cycle walk loops on its data, which on a GPU would be a host
            # sync per round. Integer maths: the same bits on any device. The copy to the GPU
            # is from pinned memory and does not block.
            pos = self.positions(start, self.chunk_steps)
            n = self.perm.n
            passes = (pos // n).view(-1, self.accum, self.micro)
            chunk = self.perm(pos % n, passes.reshape(pos.shape)).view_as(passes)
            self._passes, self._chunk = (_to(t, self.device) for t in (passes, chunk))
            self._chunk_start = start
        return step - start


def _to(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`t` on `device`; to a GPU through pinned memory, without waiting for the copy."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)
