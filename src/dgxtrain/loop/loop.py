"""The loop: one attempt's steps, and the components that act after each.

Each component owns its cadence and its state (loop/reporting.py, evaluating.py,
saving.py, stopping.py); the loop only runs the step, takes the decisions every rank takes
at the same step, and hands each step's outcome on.
"""

from __future__ import annotations

import time
from typing import Any, Protocol

from dgxtrain.loop.build import Job
from dgxtrain.loop.evaluating import Evaluating
from dgxtrain.loop.guard import UpdateGuard
from dgxtrain.loop.reporting import Reporting
from dgxtrain.loop.saving import Saving
from dgxtrain.loop.state import StopReason, TrainState
from dgxtrain.loop.step import StepOutput, StepParts, train_step
from dgxtrain.loop.stopping import Stopping
from dgxtrain.observe.model_stats import param_sha256
from dgxtrain.observe.trackers import NullTracker
from dgxtrain.tasks import Feed


class Component(Protocol):
    def due(self, step: int) -> bool:
        """Whether it acts after `step` on its own schedule: the host reads the ranks'
        decisions first."""

    def after_step(self, state: TrainState, out: StepOutput) -> None: ...


class Loop:
    """The steps from `state` on, with `job`'s parts; `run` steps, `finish` ends the run."""

    def __init__(self, job: Job, state: TrainState, feed: Feed, tracker: NullTracker,
                 stopping: Stopping, derived: dict[str, Any], hosts: list[str]):
        t = job.cfg.trainer
        self.job, self.state, self.feed, self.tracker = job, state, feed, tracker
        self.first = state.step + 1  # this attempt's first step
        self.guard = UpdateGuard(t.nonfinite, t.max_skipped, job.env.device,
                                 state.skipped_steps, state.consecutive_skips)
        self.parts = StepParts(job.wrapped, job.task, job.optimizer, self.guard, job.autocast,
                               t.grad_clip)
        self.stopping = stopping
        self.reporting = Reporting(job, tracker, derived, hosts, self.first)
        self.evaluating = Evaluating(job, tracker)
        self.saving = Saving(job, tracker, self.first)
        # In this order after each step: a step's row is logged before it is evaluated and
        # saved, and the stop's log line follows its save.
        self.components: tuple[Component, ...] = (self.reporting, self.evaluating,
                                                  self.saving, stopping)

    def run(self, until: int) -> None:
        """Step until step `until`, a stop, or a non-finite halt."""
        state, job, batch = self.state, self.job, self.job.spec.global_batch_size
        while state.step < until and state.running:
            step, started = state.step + 1, time.monotonic()
            job.faults.before_step(step)
            # The first step may compile or warm up allocators: it gets the start-up budget.
            job.watchdog.arm(job.cfg.dist.timeout_s if step > self.first
                             else job.cfg.dist.init_timeout_s)
            clock = self.reporting.clock(step)  # log steps time their phases
            lr = job.optimizer.param_groups[0]["lr"]
            loss, grad_norm = train_step(self.parts, self.feed(state.step), step, clock)
            job.scheduler.step()
            state.advance(batch)
            # The decisions every rank takes at the same step: the stop vote after every
            # step; the guard's counters read (a host sync) where the host acts anyway.
            stop = self.stopping.vote(state)
            if stop or step == self.first or any(c.due(step) for c in self.components):
                self.guard.settle(state, batch)
                self.stopping.settle(state, stop)
            if state.stop_reason.failed:
                break
            out = StepOutput(step, loss, grad_norm, lr, clock, time.monotonic() - started,
                             first=step == self.first)
            for component in self.components:
                component.after_step(state, out)

    def finish(self) -> dict[str, Any]:
        """After the last step: the final evaluation and the summary (or, for a requeue,
        only where the run stands)."""
        state, job = self.state, self.job
        self.stopping.close(state)
        if state.stop_reason is StopReason.REQUEUE:  # not the end: no final outputs
            return {"steps": state.step, "stop_reason": state.stop_reason.value}
        if state.running:
            state.stop_reason = StopReason.MAX_STEPS
        trained_s = self.reporting.elapsed()
        final = self.evaluating.run(state.step)
        s = job.spec
        return {
            "world_size": s.world_size, "global_batch_size": s.global_batch_size,
            "micro_batch_size": s.micro_batch_size, "grad_accum_steps": s.grad_accum_steps,
            "steps": state.step, "samples_seen": state.samples_seen,
            "skipped_steps": state.skipped_steps, "resumed_from_step": self.first - 1,
            "stop_reason": state.stop_reason.value, **final, **job.task.summary(job.model),
            # Rank 0's alone: DDP keeps the replicas bit-identical (test_comm checks it), and
            # hashing copies every parameter to the host.
            "param_sha256": param_sha256(job.model) if job.env.is_main else None,
            **self.reporting.summary(state, trained_s)}
