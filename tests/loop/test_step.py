"""train_step's update decision: taken on the device from the all-reduced gradient norm (no
host read in the step), a non-finite step leaves the parameters as they were, and once the
guard halts no later update applies; the guard's counters say so when the host reads them."""

import math

import pytest
import torch
from omegaconf import OmegaConf

from dgxtrain.loop.build import make_autocast
from dgxtrain.loop.guard import Reading, UpdateGuard
from dgxtrain.loop.optim import skips_on_device
from dgxtrain.loop.step import StepParts, train_step
from dgxtrain.tasks import TaskLoss
from dgxtrain.tasks.regression import RegressionTask

DATA = {"_target_": "dgxtrain.data.synthetic.SyntheticRegression", "dim": 8, "noise_std": 0.1,
        "num_samples": 1000, "eval_samples": 64, "target": "nonlinear"}


class PoisonableMSE(torch.nn.MSELoss):
    """MSE that can be made non-finite on demand."""

    extra = 0.0  # added to the loss: a constant, so the gradients stay finite

    def forward(self, output, target):
        return super().forward(output, target) + self.extra


def make_parts(fused: bool, mode: str = "error", max_skipped: int = 5, device: str = "cpu"):
    """The step's parts on the regression task, and its feed: feed(s) is step s's batches."""
    torch.manual_seed(0)
    dev = torch.device(device)
    task = RegressionTask(OmegaConf.create({}), OmegaConf.create(DATA),
                          TaskLoss(PoisonableMSE(), "PoisonableMSE"), ["loss"], 0, dev)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(),
                                torch.nn.Linear(16, 1), torch.nn.Flatten(0)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=fused)
    guard = UpdateGuard(mode, max_skipped, torch.device(device))
    parts = StepParts(model, task, opt, guard, make_autocast(torch.device(device), "fp32"), 1.0)
    return parts, task.train_feed(0, 32, 0, 1, 32, 0, 1000, dev)


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


def _same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


def _poison_output(model):
    """NaN outputs while `flag[0]`: a NaN loss whose gradients are NaN too."""
    flag = [False]
    model.register_forward_hook(lambda m, a, out: out * math.nan if flag[0] else out)
    return flag


@pytest.mark.parametrize("fused", [True, False])
def test_a_non_finite_step_is_skipped_and_the_next_one_applied(fused):
    parts, schedule = make_parts(fused, mode="skip")
    nan = _poison_output(parts.model)
    train_step(parts, schedule(0), 1)
    before = _params(parts.model)
    nan[0] = True
    _, grad_norm = train_step(parts, schedule(1), 2)
    assert not torch.isfinite(grad_norm)
    assert parts.guard.read() == Reading(skipped=1, streak=1, halted_at=0)
    assert _same(before, _params(parts.model))  # the update was not applied
    # Adam's step count did not move either: the next update is the one it would have been.
    assert all(int(s["step"]) == 1 for s in parts.optimizer.state.values())
    nan[0] = False
    train_step(parts, schedule(2), 3)
    assert parts.guard.read() == Reading(skipped=1, streak=0, halted_at=0)
    assert not _same(before, _params(parts.model))


@pytest.mark.parametrize("fused", [True, False])
def test_a_non_finite_loss_is_skipped_even_where_its_gradients_are_finite(fused):
    # inf added as a constant: d(loss)/d(params) is finite, yet the step must not apply.
    parts, schedule = make_parts(fused, mode="skip")
    before = _params(parts.model)
    parts.task.loss.criterion.extra = math.inf
    loss, grad_norm = train_step(parts, schedule(0), 1)
    assert loss.item() == math.inf and not torch.isfinite(grad_norm)
    assert parts.guard.read().skipped == 1 and _same(before, _params(parts.model))


def test_error_mode_applies_nothing_after_the_first_non_finite_step():
    parts, schedule = make_parts(fused=True, mode="error")
    nan = _poison_output(parts.model)
    train_step(parts, schedule(0), 1)
    before = _params(parts.model)
    nan[0] = True
    train_step(parts, schedule(1), 2)
    nan[0] = False
    # The host has not read anything yet; the next steps are finite, and still not applied.
    train_step(parts, schedule(2), 3)
    train_step(parts, schedule(3), 4)
    assert parts.guard.read() == Reading(skipped=1, streak=1, halted_at=2)
    assert _same(before, _params(parts.model))


def test_skip_mode_halts_after_max_skipped_in_a_row():
    parts, schedule = make_parts(fused=True, mode="skip", max_skipped=2)
    nan = _poison_output(parts.model)
    nan[0] = True
    train_step(parts, schedule(0), 1)
    assert parts.guard.read() == Reading(1, 1, 0)  # one in a row: not yet
    train_step(parts, schedule(1), 2)
    nan[0] = False
    before = _params(parts.model)
    train_step(parts, schedule(2), 3)
    assert parts.guard.read() == Reading(2, 2, 2)  # halted at the second; step 3 not counted
    assert _same(before, _params(parts.model))


@pytest.mark.parametrize("fused", [True, False])
def test_clipping_is_that_of_clip_grad_norm(fused):
    # The update is the one clip_grad_norm_ + AdamW gives, clipped or not.
    for clip in (0.05, 0.0):  # 0.05 clips (the norm is ~1), 0 does not
        parts, schedule = make_parts(fused)
        parts.grad_clip = clip
        ref_parts, _ = make_parts(False)
        ref, ref_opt = ref_parts.model, ref_parts.optimizer
        _, grad_norm = train_step(parts, schedule(0), 1)
        x, y = schedule(0)[0]
        torch.nn.functional.mse_loss(ref(x), y).backward()
        norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), clip or math.inf)
        ref_opt.step()
        assert torch.allclose(grad_norm, norm, rtol=1e-6) and norm > 20 * clip
        moved = [(p - q).abs().max().item() for p, q in zip(parts.model.parameters(),
                                                           _params(ref))]
        assert max(moved) < 1e-6, (clip, moved)


def test_the_found_inf_protocol_is_proven_before_it_is_trusted():
    # found_inf is GradScaler's private protocol: fused AdamW and SGD honour it on this
    # torch; an optimizer that claims it but ignores it gets the host's decision instead.
    for fused in (torch.optim.AdamW, torch.optim.SGD):
        assert skips_on_device(fused([torch.nn.Parameter(torch.ones(2))], lr=0.1, fused=True))
    assert not skips_on_device(torch.optim.AdamW([torch.nn.Parameter(torch.ones(2))], lr=0.1))

    class Pretends(torch.optim.SGD):
        _step_supports_amp_scaling = True  # and then applies every update regardless

    parts, schedule = make_parts(fused=False, mode="skip")
    parts.optimizer = Pretends(parts.model.parameters(), lr=0.01)
    nan = _poison_output(parts.model)
    train_step(parts, schedule(0), 1)
    assert parts.guard.on_device is False
    before = _params(parts.model)
    nan[0] = True
    train_step(parts, schedule(1), 2)
    assert _same(before, _params(parts.model))  # skipped all the same
