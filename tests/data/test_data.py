"""Sample i depends on (seed, i) only; ranks' slices partition every pass."""

import hashlib
import resource

import pytest
import torch

from dgxtrain.data.order import FeistelPermutation, GlobalBatchSchedule
from dgxtrain.data.synthetic import SyntheticRegression


def _data(**kw) -> SyntheticRegression:
    args = dict(dim=8, noise_std=0.1, num_samples=1000, eval_samples=64, target="nonlinear",
                seed=3)
    return SyntheticRegression(**{**args, **kw})


def test_sample_is_a_pure_function_of_seed_and_index():
    d = _data()
    idx = torch.tensor([5, 999, 0, 123456789012, 5])
    x, y = d.sample(idx)
    assert torch.equal(x[0], x[4]) and torch.equal(y[0], y[4])
    # The same index alone, or in another batch, gives the same bits.
    for k in range(4):
        xk, yk = d.sample(idx[k:k + 1])
        assert torch.equal(xk[0], x[k]) and torch.equal(yk[0], y[k])
    assert not torch.equal(x[0], x[1])
    x2, _ = _data(seed=4).sample(idx)
    assert not torch.equal(x, x2)
    # The ground truth is drawn from the seed alone.
    assert torch.equal(_data().true_weight, d.true_weight)


@pytest.mark.parametrize("target", ["linear", "nonlinear"])
def test_a_sample_does_not_depend_on_its_batch(target):
    d = _data(dim=33, target=target)
    idx = torch.arange(1000, 1517)
    x, y = d.sample(idx)
    for lo, hi in [(0, 1), (0, 7), (3, 260), (100, 517)]:
        xs, ys = d.sample(idx[lo:hi])
        assert torch.equal(xs, x[lo:hi]) and torch.equal(ys, y[lo:hi])


def test_features_are_standard_normal():
    x, y = _data(dim=16).sample(torch.arange(20000))
    assert abs(x.mean().item()) < 0.01 and abs(x.std().item() - 1) < 0.01
    corr = torch.corrcoef(x.T)
    assert (corr - torch.eye(16)).abs().max() < 0.04  # columns independent
    assert abs(x[:, 0].double().pow(4).mean().item() - 3) < 0.15  # Gaussian kurtosis


@pytest.mark.parametrize("dim", [1, 7, 8])
def test_odd_widths_and_an_empty_batch(dim):
    # Box-Muller yields pairs of columns: an odd width drops the last one; a rank with no
    # evaluation samples gets empty tensors, not an error.
    data = _data(dim=dim)
    x, y = data.sample(torch.arange(5))
    assert x.shape == (5, dim) and y.shape == (5,) and torch.isfinite(x).all()
    x, y = data.sample(torch.arange(0))
    assert x.shape == (0, dim) and y.shape == (0,)


@pytest.mark.parametrize("n", [1, 2, 7, 1000, 4096])
def test_feistel_is_a_bijection(n):
    perm = FeistelPermutation(n, seed=11)
    pos = torch.arange(n)
    for epoch in (0, 1):
        out = perm(pos, torch.full_like(pos, epoch))
        assert torch.equal(out.sort().values, pos)
    if n > 100:  # a new order each pass, and not the identity
        a, b = perm(pos, torch.zeros_like(pos)), perm(pos, torch.ones_like(pos))
        assert not torch.equal(a, b) and not torch.equal(a, pos)


@pytest.mark.parametrize("world,micro", [(1, 48), (2, 24), (3, 8), (4, 12)])
def test_ranks_partition_each_pass(world, micro):
    n, gbs = 960, 48  # one pass = 20 steps
    ranks = [GlobalBatchSchedule(n, 5, gbs, r, world, micro) for r in range(world)]
    one = GlobalBatchSchedule(n, 5, gbs, 0, 1, gbs)
    seen = []
    for s in range(n // gbs):
        together = torch.cat([sched(s).reshape(-1) for sched in ranks])
        # The global batch at each step is the same list whatever the world size.
        assert torch.equal(together, one(s).reshape(-1))
        seen.append(together)
    assert torch.equal(torch.cat(seen).sort().values, torch.arange(n))  # each index once


def test_next_pass_is_a_new_permutation_and_batches_straddle_passes():
    n, gbs = 100, 32
    sched = GlobalBatchSchedule(n, 1, gbs, 0, 1, gbs)
    stream = torch.cat([sched(s).reshape(-1) for s in range(7)])  # 224 = 2 passes + 24
    first, second = stream[:n], stream[n:2 * n]
    assert torch.equal(first.sort().values, torch.arange(n))
    assert torch.equal(second.sort().values, torch.arange(n))
    assert not torch.equal(first, second)


def _order_digest(sched: GlobalBatchSchedule, steps: range) -> str:
    h = hashlib.sha256()
    for s in steps:
        h.update(sched(s).numpy().tobytes())
        h.update(sched.passes(s).numpy().tobytes())
    return h.hexdigest()


def test_the_order_is_the_one_checkpoints_were_made_with():
    # A run resumed by a newer dgxtrain must see the samples its checkpoint expects. The
    # digests pin the order as checkpoints were made with it: dgx_8gpu's shapes
    # (rank 3 of 8, 8192 samples each, so 20 steps cross two 8-step chunks; 1e9 samples
    # cycle-walk), and a small set whose stream crosses passes.
    dgx = GlobalBatchSchedule(10**9, 1, 65536, 3, 8, 8192)
    assert dgx.chunk_steps == 8
    assert _order_digest(dgx, range(20)) == (
        "473c52491eade64c3c3f6f836471d440a5e0dc663cab4f926495ad452eea3862")
    assert _order_digest(GlobalBatchSchedule(1000, 5, 48, 1, 4, 6), range(60)) == (
        "23308b61a4294311d0f06c3c315f321c4e8be4aca64b6d8ff754266656b7bffe")
    # And a chunk is what the step alone gives: positions, pass, permutation.
    for s in (7, 8, 19):
        pos = s * 65536 + 3 * 8192 + torch.arange(8192)
        assert torch.equal(dgx(s), dgx.perm(pos % 10**9, pos // 10**9).view(1, 8192))


def test_memory_does_not_grow_with_num_samples():
    def rss_mb() -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    before = rss_mb()
    huge = _data(num_samples=10**9)
    sched = GlobalBatchSchedule(10**9, 0, 1024, 1, 2, 256)
    idx = sched(123_456)
    x, y = huge.sample(idx[0])
    assert idx.shape == (2, 256) and int(idx.max()) < 10**9 and x.shape == (256, 8)
    assert rss_mb() - before < 100  # a materialised permutation would be 8 GB


def test_eval_indices_are_never_trained_on():
    d = _data(num_samples=200, eval_samples=50)
    ev = d.eval_indices()
    assert int(ev.min()) == 200 and len(ev) == 50
    sched = GlobalBatchSchedule(200, 3, 40, 0, 1, 40)
    trained = torch.cat([sched(s).reshape(-1) for s in range(25)])
    assert int(trained.max()) < 200
