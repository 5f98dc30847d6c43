"""Whether a step's update applies, decided on the device, read by the host on a cadence.

Every rank holds the same all-reduced gradients after the backward, hence the same norm,
hence the same decision: the guard needs no collective of its own. It keeps its counters
on the device, so a step costs no host read; the loop reads them on decision steps.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import torch

from dgxtrain.loop.optim import skips_on_device, step_unless
from dgxtrain.loop.state import StopReason, TrainState

log = logging.getLogger(__name__)


class Reading(NamedTuple):
    skipped: int  # non-finite steps in all, updates dropped
    streak: int  # of them, in a row up to the last step
    halted_at: int  # the step from which no update applies (0: none)


class UpdateGuard:
    """Skips a non-finite update on every rank alike, and halts for good at the first one
    (nonfinite=error) or at `max_skipped` in a row (nonfinite=skip): then no later update
    applies either, even one queued before the host looks."""

    def __init__(self, mode: str, max_skipped: int, device: torch.device, skipped: int = 0,
                 streak: int = 0):
        self.halt_on_first = mode == "error"
        self.max_skipped = max_skipped
        self.counts = torch.tensor([skipped, streak, 0], dtype=torch.int64, device=device)
        self.on_device: bool | None = None  # proven at the first update (optim.py)

    def update(self, optimizer: torch.optim.Optimizer, grad_norm: torch.Tensor,
               step: int) -> None:
        """optimizer.step() unless the gradient is non-finite or the guard has halted."""
        skipped, streak, halted_at = self.counts.unbind()
        live = halted_at == 0
        bad = ~torch.isfinite(grad_norm) & live  # after a halt nothing more is counted
        streak = torch.where(live, (streak + 1) * bad, streak)
        halt = bad if self.halt_on_first else live & (streak >= self.max_skipped)
        self.counts = torch.stack([skipped + bad, streak, halted_at + halt * step])
        if self.on_device is None:
            self.on_device = skips_on_device(optimizer)
            if getattr(optimizer, "_step_supports_amp_scaling", False) and not self.on_device:
                log.warning("%s did not honour found_inf on this torch: the host reads each "
                            "step's update decision instead (one sync per step)",
                            type(optimizer).__name__)
        step_unless(optimizer, bad | ~live | halt, self.on_device)

    def read(self) -> Reading:
        """The counters on the host: a device sync, for decision steps only."""
        return Reading(*self.counts.tolist())

    def settle(self, state: TrainState, samples_per_step: int) -> None:
        """On a decision step: the counters into the loop's state. After a halt the run
        stands where the last update applied: no update from the halting step on (error
        mode) or after it (skip mode)."""
        skipped, streak, halted_at = self.read()
        if skipped > state.skipped_steps:
            log.warning("%d non-finite step(s) up to step %d: their updates were skipped",
                        skipped - state.skipped_steps, state.step)
        state.skipped_steps, state.consecutive_skips = skipped, streak
        if halted_at:
            stand = halted_at - 1 if self.halt_on_first else halted_at
            state.samples_seen -= (state.step - stand) * samples_per_step
            state.step = stand
            state.stop_reason = (StopReason.NON_FINITE if self.halt_on_first
                                 else StopReason.TOO_MANY_SKIPS)


def halt_error(state: TrainState, max_skipped: int) -> FloatingPointError:
    """The error a halted run ends with (exit 3)."""
    if state.stop_reason is StopReason.NON_FINITE:
        return FloatingPointError(
            f"non-finite loss or gradient at step {state.step + 1}, update not applied; fix: "
            "lower optim.lr, set trainer.grad_clip, or trainer.nonfinite=skip")
    return FloatingPointError(
        f"{state.consecutive_skips} non-finite steps in a row (trainer.max_skipped="
        f"{max_skipped}), up to step {state.step}; fix: lower optim.lr or set "
        "trainer.grad_clip")
