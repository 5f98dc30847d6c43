"""Synthetic regression data and the global sample order.

Sample i is a pure function of (seed, i): every number comes from a counter-based hash of
the seed, the index and the column, computed with integer tensor ops on the training
device. So no rank, world size or earlier batch can change it, nothing is copied from the
host per step, and 1e9 samples cost what 1e3 cost.

The order is a pseudo-random permutation of [0, num_samples) per pass (a Feistel network
with cycle walking, keyed by seed and pass): global batch s covers stream positions
[s*B, (s+1)*B), and rank r takes its contiguous slice of them.
"""

from __future__ import annotations

import functools
import math

import torch

_M32 = 0xFFFFFFFF
# Stream keys keep the different random quantities independent.
_FEATURES, _WEIGHTS, _PERMUTATION = 0x5EED0001, 0x5EED0003, 0x5EED0004


def _mix32(x):
    """A 32-bit integer hash (Wellons' lowbias32 family) for ints and int64 tensors.

    Both multipliers are < 2**31, so every product of a 32-bit value stays below 2**63:
    int64 arithmetic never overflows, on CPU or GPU.
    """
    x = x & _M32
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & _M32
    return x ^ (x >> 15)


def _mix32_(x: torch.Tensor) -> torch.Tensor:
    """_mix32 in place, for a tensor already below 2**32: the data's hot loop, where each
    temporary costs a pass over memory."""
    x ^= x >> 16
    x *= 0x21F0AAAD
    x &= _M32
    x ^= x >> 15
    x *= 0x735A2D97
    x &= _M32
    x ^= x >> 15
    return x


def _key(*parts: int) -> int:
    h = 0x9E3779B9
    for p in parts:
        p &= (1 << 64) - 1
        h = _mix32(_mix32(h ^ (p & _M32)) ^ (p >> 32))
    return h


def _hash_index(key: int, idx: torch.Tensor) -> torch.Tensor:
    return _mix32(_mix32((idx & _M32) ^ key) ^ (idx >> 32))


def gaussian(key: int, idx: torch.Tensor, width: int) -> torch.Tensor:
    """N(0, 1) of shape [len(idx), width]; entry (k, j) depends on (key, idx[k], j) only.

    Box-Muller turns two uniforms into two normals (r cos t, r sin t): columns 2m and 2m+1
    share one pair of hashes, which halves the integer work.
    """
    pairs = (width + 1) // 2
    h1 = _mix32_(_hash_index(key, idx)[:, None] ^ _column_hashes(key, pairs, idx.device))
    h2 = _mix32_(h1 ^ 0x68E31DA4)
    # 24-bit uniforms are exact in fp32; u1 is in (0, 1) so log(u1) is finite.
    r = (h1 >> 8).float().add_(0.5).mul_(2.0**-24).log_().mul_(-2.0).sqrt_()
    theta = (h2 >> 8).float().mul_(2.0 * math.pi * 2.0**-24)
    # A complex tensor stores (real, imaginary) side by side: the pairs interleave in one
    # pass, 7x faster than torch.stack(..., dim=-1) and bit for bit the same.
    z = torch.complex(r * theta.cos(), r.mul_(theta.sin_()))
    out = torch.view_as_real(z).view(len(idx), 2 * pairs)
    return out[:, :width] if width % 2 else out


@functools.lru_cache(maxsize=16)
def _column_hashes(key: int, pairs: int, device: torch.device) -> torch.Tensor:
    return _mix32(torch.arange(pairs, device=device, dtype=torch.int64) ^ key)


class SyntheticRegression:
    """y = f_true(x) + noise_std * eps with x ~ N(0, I); f_true is drawn from the seed.

    linear:    f(x) = x.w + b
    nonlinear: f(x) = x.w + b + sum_k sin(x.v_k) / sqrt(K), K = 4, |v_k| = 1
    """

    def __init__(self, dim: int, noise_std: float, num_samples: int, eval_samples: int,
                 target: str, seed: int, device: torch.device | str = "cpu"):
        self.dim, self.noise_std, self.target = dim, noise_std, target
        self.num_samples, self.eval_samples, self.seed = num_samples, eval_samples, seed
        self.device = torch.device(device)
        truth = gaussian(_key(seed, _WEIGHTS), torch.arange(dim + 1, device=self.device), 5)
        self.true_weight = truth[:dim, 0] / math.sqrt(dim)  # |w| ~ 1: signal variance ~ 1
        self.true_bias = truth[dim, 0] * 0.5
        v = truth[:dim, 1:]
        self._ridges = v / v.norm(dim=0, keepdim=True)
        # One [5, dim] table: the linear part and the four ridge directions in one pass.
        directions = self._ridges.T if target == "nonlinear" else self._ridges.T[:0]
        self._directions = torch.cat([self.true_weight[None, :], directions]).contiguous()

    def f_true(self, x: torch.Tensor) -> torch.Tensor:
        # Row-wise products and sums, not matmuls: a matmul's reduction order depends on
        # the batch shape, which would make a label depend on its batch-mates.
        proj = (x[:, None, :] * self._directions).sum(-1)
        y = proj[:, 0] + self.true_bias
        if self.target == "nonlinear":
            y = y + torch.sin(proj[:, 1:]).sum(-1) / 2.0
        return y

    def sample(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Features [n, dim] and targets [n] of the samples with these indices."""
        # The label noise is one more column of the same draw: one pass instead of two.
        draw = gaussian(_key(self.seed, _FEATURES), idx, self.dim + 1)
        x = draw[:, :self.dim].contiguous()
        return x, self.f_true(x) + self.noise_std * draw[:, self.dim]

    def eval_indices(self) -> torch.Tensor:
        """Held out: indices past the training range, which no pass ever visits."""
        return torch.arange(self.num_samples, self.num_samples + self.eval_samples,
                            device=self.device)


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
            left, right = right, left ^ (_mix32(right ^ k) & self.mask)
        return (left << self.half) | right

    def __call__(self, pos: torch.Tensor, epoch: torch.Tensor) -> torch.Tensor:
        base = _key(self.seed, _PERMUTATION)
        keys = [_mix32(_mix32(epoch ^ base) ^ r) for r in range(self.ROUNDS)]
        y = self._round_trip(pos, keys)
        # Cycle walking: a bijection of the power-of-4 domain, walked until it lands in
        # [0, n), is a bijection of [0, n). Expected < 4 rounds; one host sync per chunk.
        while bool((out := y >= self.n).any()):
            y = torch.where(out, self._round_trip(y, keys), y)
        return y


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
        # Index maths for many steps at once keeps the permutation's host sync rare.
        self.chunk_steps = max(1, 65536 // self.per_rank)
        self._chunk_start, self._chunk = -1, torch.empty(0)

    def positions(self, step: int, steps: int = 1) -> torch.Tensor:
        s = torch.arange(step, step + steps, device=self.device, dtype=torch.int64)
        local = torch.arange(self.per_rank, device=self.device, dtype=torch.int64)
        return s[:, None] * self.global_batch + self.offset + local[None, :]

    def __call__(self, step: int) -> torch.Tensor:
        start = step - step % self.chunk_steps
        if start != self._chunk_start:
            pos = self.positions(start, self.chunk_steps)
            n = self.perm.n
            self._chunk = self.perm(pos % n, pos // n).view(-1, self.accum, self.micro)
            self._chunk_start = start
        return self._chunk[step - start]
