"""Reporting: on log steps, every rank's figures gathered into one row for the trackers."""

from __future__ import annotations

import logging
import os
from typing import Any

from dgxtrain.distributed.collectives import gather_rows
from dgxtrain.distributed.ddp import comm_wait_s
from dgxtrain.loop.build import Job
from dgxtrain.loop.state import TrainState
from dgxtrain.loop.step import StepOutput
from dgxtrain.observe.perf import (
    NULL_CLOCK,
    PhaseClock,
    StepMeter,
    local_row,
    log_row,
    seconds_since_launch,
)
from dgxtrain.observe.trackers import NullTracker

log = logging.getLogger(__name__)


class Reporting:
    """Logs every trainer.log_every steps and the last; times the log steps' phases."""

    def __init__(self, job: Job, tracker: NullTracker, derived: dict[str, Any],
                 hosts: list[str], first_step: int):
        t = job.cfg.trainer
        self.job, self.tracker, self.derived = job, tracker, derived
        self.every, self.max_steps = t.log_every, t.max_steps
        self.resumed_at = first_step - 1
        self.meter = StepMeter(job.spec.global_batch_size, self.resumed_at)
        self.hosts = hosts
        self.last: dict[str, Any] = {}  # the newest row
        self.startup_s = 0.0

    def due(self, step: int) -> bool:
        return step % self.every == 0 or step == self.max_steps

    def clock(self, step: int) -> PhaseClock:
        """A clock that times the step's phases (a device sync each) on log steps only."""
        return PhaseClock(self.job.env.device) if self.due(step) else NULL_CLOCK

    def after_step(self, state: TrainState, out: StepOutput) -> None:
        if out.first:
            launcher = os.getppid() if self.job.env.launcher == "torchrun" else None
            self.startup_s = seconds_since_launch(launcher)
            log.info("first step done %.1f s after launch", self.startup_s)
        if not self.due(out.step):
            return
        env = self.job.env
        rows = gather_rows(local_row(out.loss, out.grad_norm, out.clock,
                                     comm_wait_s(self.job.wrapped), env.device)).tolist()
        tick = self.meter.tick(out.step)
        d = self.derived
        self.last = {**log_row(rows, tick["step_time_s"], d.get("flops_per_step"),
                               d.get("peak_tflops_per_device", 0.0), self.hosts),
                     "train/lr": out.lr, "train/skipped_steps": state.skipped_steps,
                     "perf/step_time_s": tick["step_time_s"],
                     "perf/samples_per_s": tick["samples_per_s"],
                     "checkpoint/save_s": state.checkpoint_s}
        self.tracker.log_metrics(out.step, self.last)

    def elapsed(self) -> float:
        return self.meter.elapsed()

    def summary(self, state: TrainState, trained_s: float) -> dict[str, Any]:
        """The run's final figures: its last loss, its pace, its start-up."""
        trained = state.samples_seen - self.resumed_at * self.job.spec.global_batch_size
        return {"final_loss": self.last.get("train/loss"),
                "samples_per_s": trained / trained_s if trained_s > 0 else 0.0,
                "wall_time_s": self.meter.elapsed(), "startup_s": self.startup_s}
