"""The scaling model: DDP's buckets, the ring all-reduce's cost, the overlap with the
backward, and `python -m dgxtrain.scaling` (from FLOPs, and against published results)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as tdist

from dgxtrain.scaling import bandwidth, model, published
from dgxtrain.scaling.__main__ import main

MiB = 2**20


@pytest.mark.parametrize("first", [None, 1 * MiB])
def test_buckets_are_the_ones_ddp_assigns(first):
    g = torch.Generator().manual_seed(0)
    sizes = [int(x) for x in torch.randint(1, 3_000_000, (40,), generator=g)]
    tensors = [torch.empty(n) for n in sizes]  # fp32: 4 bytes each
    cap = 25 * MiB
    limits = [first, cap] if first else [cap]
    indices, _ = tdist._compute_bucket_assignment_by_size(tensors, limits, [False] * len(sizes))
    expect = [sum(sizes[i] * 4 for i in bucket) for bucket in indices]
    assert model.buckets([n * 4 for n in sizes], cap, first) == expect
    assert len(expect) > 3


def test_a_curve_gives_back_its_published_times_and_the_ring_grows_with_the_world():
    c = bandwidth.DGX_H100_NVLINK
    for size, busbw in c.points:
        t = model.allreduce_s(size, 8, c)  # the world the figures were measured in
        assert t == pytest.approx(2 * 7 / 8 * size / (busbw * 1e9), rel=1e-9)
    assert model.allreduce_s(64 * MiB, 1, c) == 0.0
    assert model.allreduce_s(64 * MiB, 2, c) < model.allreduce_s(64 * MiB, 8, c)
    # Between two sizes the time lies between theirs; a bigger message is never faster.
    ts = [model.allreduce_s(s, 8, c) for s in (16 * MiB, 24 * MiB, 32 * MiB, 512 * MiB)]
    assert ts == sorted(ts)
    # Across nodes: slower than one node for the same bytes, and more so with more nodes.
    assert (model.allreduce_s(25 * MiB, 8, c) < model.allreduce_s(25 * MiB, 16,
                                                                    bandwidth.published(16))
            < model.allreduce_s(25 * MiB, 1024, bandwidth.published(1024)))


def test_step_time_overlaps_buckets_with_the_backward_in_order():
    c = model.Compute(forward_s=1.0, backward_s=3.0, optimizer_s=1.0)
    # Each third of the bytes is ready at 2, 3 and 4 s; each all-reduce takes 0.5 s.
    assert model.step_s(c, [1, 1, 1], [0.5, 0.5, 0.5], overlap=True) == pytest.approx(5.5)
    # One after another, all waiting for the end of the backward at 4 s.
    assert model.step_s(c, [1, 1, 1], [0.5, 0.5, 0.5], overlap=False) == pytest.approx(6.5)
    # A slow link: the queue, not the backward, sets the end.
    assert model.step_s(c, [1, 1, 1], [2.0, 2.0, 2.0], overlap=True) == pytest.approx(9.0)


def test_published_results_lie_between_the_models_two_bounds():
    rows = published.comparisons()
    assert {r["case"] for r in rows} >= {"Horovod ResNet-101", "Horovod VGG-16"}
    for r in rows:
        assert r["predicted_kept_no_overlap"] <= r["published_kept"] <= r["predicted_kept"], r
        assert r["source"]


def test_a_table_from_flops_for_the_dgx_experiment(tmp_path, capsys):
    out = tmp_path / "dgx.json"
    assert main(["experiment=dgx_8gpu", "--peak-tflops", "989", "--mfu", "0.42",
                 "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    w = r["workload"]
    assert w["micro_batch_per_rank"] == 8192  # the experiment's, not a default
    step = w["flops_per_sample"] * 8192 / (989e12 * 0.42)
    assert r["compute"]["step_s"] == pytest.approx(step)
    eff = [row["predicted_efficiency"] for row in r["table"]]
    assert [row["gpus"] for row in r["table"]][::5] == [1, 32, 1024]
    assert eff[0] == 1.0 and eff == sorted(eff, reverse=True) and 0.5 < eff[-1] < 1.0
    assert "1024" in capsys.readouterr().out
