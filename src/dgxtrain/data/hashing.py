"""Counter-based 32-bit hashing: the source of every pseudo-random number in the data and
the sample order. A hash of (key, index) needs no state, so any rank, world size or resume
computes the same value."""

from __future__ import annotations

import torch

M32 = 0xFFFFFFFF


def mix32(x):
    """A 32-bit integer hash (Wellons' lowbias32 family) for ints and int64 tensors.

    Both multipliers are < 2**31, so every product of a 32-bit value stays below 2**63:
    int64 arithmetic never overflows, on CPU or GPU.
    """
    x = x & M32
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & M32
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & M32
    return x ^ (x >> 15)


def mix32_(x: torch.Tensor) -> torch.Tensor:
    """mix32 in place, for a tensor already below 2**32: the data's hot loop, where each
    temporary costs a pass over memory."""
    x ^= x >> 16
    x *= 0x21F0AAAD
    x &= M32
    x ^= x >> 15
    x *= 0x735A2D97
    x &= M32
    x ^= x >> 15
    return x


def stream_key(*parts: int) -> int:
    h = 0x9E3779B9
    for p in parts:
        p &= (1 << 64) - 1
        h = mix32(mix32(h ^ (p & M32)) ^ (p >> 32))
    return h


def hash_index(key: int, idx: torch.Tensor) -> torch.Tensor:
    return mix32(mix32((idx & M32) ^ key) ^ (idx >> 32))


