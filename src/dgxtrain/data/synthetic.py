"""Synthetic regression data, generated on the training device.

Sample i is a pure function of (seed, i): every number comes from a counter-based hash of
the seed, the index and the column, computed with integer tensor ops on the device. So no
rank, world size or earlier batch can change it, nothing is copied from the host per step,
and 1e9 samples cost what 1e3 cost.
"""

from __future__ import annotations

import functools
import math

import torch

from dgxtrain.data.hashing import hash_index, mix32, mix32_, stream_key

# Stream keys keep the different random quantities independent.
_FEATURES, _WEIGHTS = 0x5EED0001, 0x5EED0003


def gaussian(key: int, idx: torch.Tensor, width: int) -> torch.Tensor:
    """N(0, 1) of shape [len(idx), width]; entry (k, j) depends on (key, idx[k], j) only.

    Box-Muller turns two uniforms into two normals (r cos t, r sin t): columns 2m and 2m+1
    share one pair of hashes, which halves the integer work.
    """
    pairs = (width + 1) // 2
    h1 = mix32_(hash_index(key, idx)[:, None] ^ _column_hashes(key, pairs, idx.device))
    h2 = mix32_(h1 ^ 0x68E31DA4)
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
    return mix32(torch.arange(pairs, device=device, dtype=torch.int64) ^ key)


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
        truth = gaussian(stream_key(seed, _WEIGHTS), torch.arange(dim + 1, device=self.device), 5)
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
        draw = gaussian(stream_key(self.seed, _FEATURES), idx, self.dim + 1)
        x = draw[:, :self.dim].contiguous()
        return x, self.f_true(x) + self.noise_std * draw[:, self.dim]

    def eval_indices(self) -> torch.Tensor:
        """Held out: indices past the training range, which no pass ever visits."""
        return torch.arange(self.num_samples, self.num_samples + self.eval_samples,
                            device=self.device)


