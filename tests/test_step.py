"""train_step's update decision: with a fused optimizer it is taken on the device (no host
read in the step), a non-finite step leaves the parameters as they were, and in error mode
no later update is applied either; the flags say so when the host reads them."""

import math

import pytest
import torch

from dgxtrain.data import GlobalBatchSchedule, SyntheticRegression
from dgxtrain.job import make_autocast
from dgxtrain.train import train_step


def _setup(fused: bool):
    torch.manual_seed(0)
    data = SyntheticRegression(8, 0.1, 1000, 64, "nonlinear", 0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=fused)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    schedule = GlobalBatchSchedule(1000, 0, 32, 0, 1, 32)
    return data, model, opt, sched, schedule


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


def _same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("fused", [True, False])
def test_a_non_finite_step_is_skipped_and_the_next_one_applied(fused):
    data, model, opt, sched, schedule = _setup(fused)
    step = lambda s, poison=lambda loss: loss: train_step(  # noqa: E731
        model, opt, sched, data, schedule(s), make_autocast(torch.device("cpu"), "fp32"), 1.0,
        poison)
    step(0)
    before = _params(model)
    result = step(1, lambda loss: loss * math.nan)
    assert result.deferred == fused  # fused: decided on the device, read later
    assert result.flags.read() == (False, False)
    assert _same(before, _params(model))  # the update was not applied
    # Adam's step count did not move either: the next update is the one it would have been.
    assert all(int(s["step"]) == 1 for s in opt.state.values())
    result = step(2)
    assert result.flags.read() == (True, False)
    assert not _same(before, _params(model))


def test_error_mode_applies_nothing_after_the_first_non_finite_step():
    data, model, opt, sched, schedule = _setup(True)
    halted = torch.zeros(())
    autocast = make_autocast(torch.device("cpu"), "fp32")
    train_step(model, opt, sched, data, schedule(0), autocast, 1.0, halted=halted)
    before = _params(model)
    train_step(model, opt, sched, data, schedule(1), autocast, 1.0,
               lambda loss: loss * math.nan, halted=halted)
    # The host has not read anything yet; the next step is finite, and still not applied.
    result = train_step(model, opt, sched, data, schedule(2), autocast, 1.0, halted=halted)
    assert result.flags.read() == (True, False) and halted.item() == 1.0
    assert _same(before, _params(model))


@pytest.mark.parametrize("fused", [True, False])
def test_clipping_is_that_of_clip_grad_norm(fused):
    # Fused: the kernel divides the gradients by grad_scale as it reads them; unfused:
    # clip_grad_norm_. Either way the update is the one clip_grad_norm_ + AdamW gives.
    autocast = make_autocast(torch.device("cpu"), "fp32")
    for clip in (0.05, 0.0):  # 0.05 clips (the norm is ~1), 0 does not
        data, model, opt, sched, schedule = _setup(fused)
        _, ref, ref_opt, _, _ = _setup(False)
        result = train_step(model, opt, sched, data, schedule(0), autocast, clip)
        x, y = data.sample(schedule(0)[0])
        torch.nn.functional.mse_loss(ref(x).reshape(y.shape), y).backward()
        norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), clip or math.inf)
        ref_opt.step()
        assert torch.allclose(result.grad_norm, norm, rtol=1e-6) and norm > 20 * clip
        moved = [(p - q).abs().max().item() for p, q in zip(model.parameters(), _params(ref))]
        assert max(moved) < 1e-6, (clip, moved)
