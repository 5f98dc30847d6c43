"""Stopping early for a requeue: the requests (a signal, the stop file, the job's deadline),
the ranks' vote after every step, and the requeue exit. distributed/preempt.py has the
parts; this component decides with them, the same on every rank."""

from __future__ import annotations

import logging
import time
from collections import deque
from pathlib import Path

from dgxtrain.config import Config
from dgxtrain.distributed.collectives import all_agree
from dgxtrain.distributed.env import DistEnv
from dgxtrain.distributed.preempt import (
    Requeue,
    StopRequests,
    StopVote,
    control_dir,
    job_end_time,
    report_exit,
    share_limit,
)
from dgxtrain.loop.state import StopReason, TrainState
from dgxtrain.loop.step import StepOutput

log = logging.getLogger(__name__)


class Stopping:
    """A context: its signal handlers only record a request; the loop asks after each step."""

    def __init__(self, cfg: Config, env: DistEnv, run_dir: Path):
        p = cfg.preemption
        self.env, self.max_steps = env, cfg.trainer.max_steps
        self.requests = StopRequests(p.signals, control_dir(run_dir) / "stop",
                                     job_end_time(ask_slurm=env.is_main), p.deadline_margin_s,
                                     p.poll_s, leader=env.is_main)
        self._vote: StopVote | None = None
        self.asked_at = 0  # the step during which this rank's request came (0: none)
        # For the deadline: recent step times, the attempt's first (compiling) one left out.
        self.step_times: deque[float] = deque(maxlen=20)
        self._exit: Requeue | None = None
        if env.is_main:  # early: an attempt killed in its start-up still counts as idle
            share_limit("max_idle_requeues", p.max_idle_requeues)

    def __enter__(self) -> Stopping:
        self.requests.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.requests.__exit__(*exc)

    def due(self, step: int) -> bool:
        return False  # it acts through the vote, whenever a rank asks

    def vote(self, state: TrainState) -> bool:
        """After each step: this rank's wish into the vote; True when every rank stops
        after this step (the last step ends the run anyway)."""
        if self._vote is None:
            self._vote = StopVote(self.env.device, self.env.world_size)
        # A stop asked now is honoured after this step or the next, then saved: budget both.
        budget = 2 * max(self.step_times, default=0.0)
        if not self.asked_at and self.requests.poll(budget, state.checkpoint_s):
            self.asked_at = state.step
        return self._vote.after_step(bool(self.asked_at)) and state.step < self.max_steps

    def settle(self, state: TrainState, stop: bool) -> None:
        """On a decision step: the vote's stop becomes the loop's (unless the guard halted)."""
        if not stop or not state.running:
            return
        reason = self.requests.reason
        if self.requests.interrupted:
            log.warning("stopping after step %d for Ctrl-C (asked during step %d): saving it; "
                        "Ctrl-C again aborts at once without saving", state.step, self.asked_at)
        else:  # a rank that asked says why; the others follow quietly
            (log.warning if reason else log.info)(
                "stopping after step %d for a requeue: %s", state.step,
                f"{reason} (asked during step {self.asked_at})" if reason else
                "another rank asked")
        state.stop_reason = StopReason.REQUEUE
        self.requests.warn_if_grace_is_short(state.checkpoint_s)

    def after_step(self, state: TrainState, out: StepOutput) -> None:
        if not out.first:
            self.step_times.append(out.seconds)
        if state.stop_reason is StopReason.REQUEUE and self.requests.fired_at:
            log.info("the checkpoint for the requeue took %.2f s; saved %.2f s after the "
                     "signal", state.checkpoint_s, time.time() - self.requests.fired_at)

    def close(self, state: TrainState) -> None:
        """The loop is over: the last sum done, a request honoured is not honoured again."""
        if self._vote is not None:
            self._vote.close()
        if self.requests.reason or state.stop_reason is StopReason.REQUEUE:
            self.requests.consume()  # honoured (or overtaken by the end)

    def report(self, state: TrainState) -> None:
        """Inside the process group, after a requeue's save: rank 0 tells the batch shell
        before any rank exits (srun ends the step once a task exits non-zero)."""
        if state.stop_reason is not StopReason.REQUEUE:
            return
        why = self.requests.reason or "another rank asked"
        then = ("run the same command again to continue from there" if
                self.requests.interrupted else "requeue the job to continue from there")
        self._exit = Requeue(f"stopped after step {state.step} with a checkpoint ({why}); {then}")
        if self.env.is_main:  # a Ctrl-C is the user's stop: the batch script does not requeue
            report_exit("interrupted" if self.requests.interrupted else "requeue",
                        detail=str(self._exit))
        all_agree(True, self.env.device)

    def exit_for_requeue(self) -> None:
        """After the process group: hand the stop on (submitit's requeue) and exit 75."""
        if self._exit is not None:
            self.requests.hand_over()
            raise self._exit
