"""Stopping early to be requeued: a preemption signal, a stop file, or the job's deadline.

A signal handler only records the request. The loop polls once per step, and StopVote sums
every rank's answer after each step, so all ranks stop after the same step, write one
checkpoint together and exit with EXIT_REQUEUE. SIGTERM (SLURM preempts, cancels and times
out with it; torchrun passes it on to its workers) reaches every rank: the stop follows the
step it arrived in. The stop file is the way for a notice that reaches the batch shell only
(the warning signal before the time limit): the shell writes <control dir>/stop, rank 0
sees it within `poll_s`, and the others follow one step later.

Ctrl-C (SIGINT) is a stop too, always handled: the step in progress is saved the same way
and the run exits 75, but the batch script is told "interrupted" and does not requeue. A
second Ctrl-C (or the SIGTERM that torchrun sends on the second one) aborts at once.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Mapping
from pathlib import Path
from types import FrameType
from typing import Any

import torch
import torch.distributed as tdist

from dgxtrain.distributed import slurm
from dgxtrain.files import write_json_atomic

log = logging.getLogger(__name__)
EXIT_REQUEUE = 75  # EX_TEMPFAIL, "try again later": checkpoint written, requeue to continue
EXIT_ABORTED = 130  # 128 + SIGINT, as a shell reports a process that Ctrl-C ended


class Requeue(Exception):
    """The run stopped early with a checkpoint written; requeue the job to continue."""


def deadline_near(now: float, end: float | None, step_s: float, checkpoint_s: float,
                  margin_s: float) -> bool:
    """True when one more step plus a checkpoint plus the margin no longer fits before `end`."""
    return end is not None and end - now < step_s + checkpoint_s + margin_s


def control_dir(run_dir: Path, env: Mapping[str, str] = os.environ) -> Path:
    """Where the stop file and the exit report live: the batch script's choice, else the run's."""
    return Path(env["DGXTRAIN_CONTROL_DIR"]) if env.get("DGXTRAIN_CONTROL_DIR") else (
        run_dir / "control")


def job_end_time(ask_slurm: bool, env: Mapping[str, str] = os.environ) -> float | None:
    """The job's end time: as the batch script exported it, else (in any other SLURM job, a
    sweep's say) scontrol's answer, asked by one rank so as not to flood the controller."""
    if env.get("DGXTRAIN_JOB_END_TIME"):
        return float(env["DGXTRAIN_JOB_END_TIME"])
    if ask_slurm and env.get("SLURM_JOB_ID"):
        return slurm.end_time(env["SLURM_JOB_ID"])
    return None


def _control_file(name: str) -> Path | None:
    """<control dir>/name where the batch script asked for a control dir (it reads the file
    after the workers have ended), else None. Rank 0 alone writes there."""
    directory = os.environ.get("DGXTRAIN_CONTROL_DIR")
    if not directory:
        return None
    Path(directory).mkdir(parents=True, exist_ok=True)
    return Path(directory) / name


def report_exit(status: str, **info: Any) -> None:
    """Tell the batch shell how the run ended (done, requeue, or a failure not worth retrying),
    since torchrun turns every worker failure into its own exit status 1."""
    if (path := _control_file("exit.json")) is not None:
        write_json_atomic(path, {"status": status, **info})


def share_limit(name: str, value: int) -> None:
    """A setting the batch shell needs once the workers have ended (a requeue limit)."""
    if (path := _control_file(name)) is not None:
        path.write_text(f"{value}\n")


class StopRequests:
    """Why this rank wants to stop early, if it does: polled once per step, cheaply."""

    def __init__(self, signals: list[str], stop_file: Path, end_time: float | None,
                 margin_s: float, poll_s: float, leader: bool):
        # Ctrl-C always: without it KeyboardInterrupt ends the ranks wherever they are.
        self.signals = list(dict.fromkeys(
            [signal.Signals[f"SIG{name}"] for name in signals] + [signal.SIGINT]))
        # Only rank 0 reads the file system and the clock: the all-reduce shares its answer.
        self.stop_file, self.end_time = (stop_file, end_time) if leader else (None, None)
        self.leader = leader
        self.margin_s, self.poll_s = margin_s, poll_s
        self.reason = ""
        self.fired: int | None = None
        self.fired_at: float | None = None  # epoch seconds
        self._previous: dict[int, Any] = {}
        self._next_poll = 0.0

    def __enter__(self) -> StopRequests:
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    @property
    def interrupted(self) -> bool:
        """The stop is the user's Ctrl-C: saved like a requeue, but not to be requeued."""
        return self.fired == signal.SIGINT

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self.interrupted and signum in (signal.SIGINT, signal.SIGTERM):
            self._abort(signal.Signals(signum).name)
        # Async-signal context: record only. The loop acts at the next step boundary.
        if not self.reason:
            self.reason, self.fired = f"signal {signal.Signals(signum).name}", signum
            self.fired_at = time.time()

    def _abort(self, name: str) -> None:
        """A second Ctrl-C: the user does not want to wait for the save. Under torchrun it
        comes as SIGTERM: the agent, interrupted while it waits for its workers, shuts them
        down with it. A checkpoint is written to a temporary dir and renamed when complete,
        so one cut short here is never taken for one."""
        if self.leader:
            log.warning("%s after Ctrl-C: aborted at once, the step in progress not saved; "
                        "the newest complete checkpoint is kept", name)
        os._exit(EXIT_ABORTED)

    def kill_in(self, env: Mapping[str, str] = os.environ) -> tuple[float, str] | None:
        """After the signal that fired: the seconds left before the processes are killed,
        and who kills them, where that is known. A SLURM preemption moves the job's end time
        to now + GraceTime; torchrun kills its workers TORCH_ELASTIC_SHUTDOWN_TIMEOUT
        (default 30 s) after it got SIGTERM itself. The sooner counts."""
        if self.fired_at is None:
            return None
        now, limits = time.time(), []
        end = slurm.end_time(env["SLURM_JOB_ID"]) if env.get("SLURM_JOB_ID") else None
        if end is not None:
            limits.append((end - now, "the SLURM job's end time: its time limit, or the "
                                      "grace after a preemption"))
        # torchrun passes its own SIGTERM or SIGINT on, and kills after the timeout.
        if env.get("TORCHELASTIC_RUN_ID") and self.fired in (signal.SIGTERM, signal.SIGINT):
            timeout = float(env.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", 30))
            limits.append((self.fired_at + timeout - now, "torchrun's shutdown timeout, "
                           f"TORCH_ELASTIC_SHUTDOWN_TIMEOUT={timeout:g}"))
        return min(limits) if limits else None

    def warn_if_grace_is_short(self, checkpoint_s: float) -> None:
        """After a signal, rank 0 says whether the save fits in the time left before the
        kill, where it can know it (kill_in); the last measured save time is the estimate."""
        left = self.kill_in() if self.leader else None
        if left is None:
            return
        seconds, by = left
        if checkpoint_s == 0.0:
            log.warning("%.0f s left before the kill (%s); no save measured yet to compare",
                        seconds, by)
        elif seconds < checkpoint_s:
            log.warning("the grace is too short: %.0f s left before the kill (%s), the last "
                        "checkpoint took %.1f s; this save may be cut off. Fix: a longer "
                        "grace, or a smaller checkpoint.every_steps so that less is lost",
                        seconds, by, checkpoint_s)
        else:
            log.info("%.0f s left before the kill (%s); the last checkpoint took %.1f s",
                     seconds, by, checkpoint_s)

    def hand_over(self) -> None:
        """Now that the checkpoint is written, pass the stop on to a handler that was there
        before ours: under hydra-submitit-launcher, submitit's SIGUSR2 handler, which requeues
        the job (on rank 0) and exits. The signal that fired, else (a deadline, the stop file)
        the first of ours with such a handler. Not after Ctrl-C: Python's own SIGINT
        handler raises KeyboardInterrupt, submitit's would requeue what the user stopped."""
        if self.interrupted:
            return
        order = [self.fired] if self.fired is not None else []
        for sig in order + [s for s in self._previous if s not in (self.fired, signal.SIGINT)]:
            outer = self._previous.get(sig)
            if callable(outer):
                log.info("handing %s on to %s", signal.Signals(sig).name,
                         getattr(outer, "__qualname__", outer))
                outer(sig, None)
                return

    def poll(self, step_s: float, checkpoint_s: float) -> str:
        """A reason to stop soon, or ''. `step_s`: the time of the steps that still run
        before the stop is honoured."""
        now = time.monotonic()
        if self.reason or now < self._next_poll:
            return self.reason
        self._next_poll = now + self.poll_s
        if self.stop_file is not None and self.stop_file.exists():
            note = self.stop_file.read_text().strip()
            self.reason = f"stop file {self.stop_file}" + (f" ({note})" if note else "")
        elif deadline_near(time.time(), self.end_time, step_s, checkpoint_s, self.margin_s):
            left = self.end_time - time.time() if self.end_time else 0.0
            self.reason = (f"deadline: {left:.0f} s left, the steps before the save take "
                           f"{step_s:.2f} s, a checkpoint {checkpoint_s:.1f} s, "
                           f"margin {self.margin_s:g} s")
        return self.reason

    def consume(self) -> None:
        """The request was honoured: a later run in this dir must not stop for it again."""
        if self.stop_file is not None:
            self.stop_file.unlink(missing_ok=True)


class StopVote:
    """Whether every rank stops after this step, agreed without a host sync on most steps.

    After each step every rank adds its wish (0 or 1) to a one-number all-reduce that runs in
    the background. All ranks stop after step s when step s-1's sum is non-zero: read one
    step late, when it is done. They stop already after step s itself when its sum is the
    world size, as for a SIGTERM, which reaches every rank: only a rank that wishes waits for
    that sum, since one that does not knows it falls short. Either way every rank reads the
    same sums and takes the same decision."""

    def __init__(self, device: torch.device, world_size: int):
        self.world_size = world_size
        # At most two sums are in flight, this step's and the one before: two buffers.
        self._sums, self._steps = (_Sum(device), _Sum(device)), 0
        self._previous: _Sum | None = None

    def after_step(self, wish: bool) -> bool:
        """Cast this step's wish; True when all ranks stop after this step."""
        now = self._sums[self._steps % 2]
        self._steps += 1
        now.start(wish)
        before, self._previous = self._previous, now
        late = before is not None and before.value() > 0
        return late or wish and now.value() == self.world_size

    def close(self) -> None:
        """Let the last sum finish before anything else uses the process group's streams."""
        if self._previous is not None:
            self._previous.value()
            self._previous = None


class _Sum:
    """One step's wishes, summed over the ranks in the background."""

    def __init__(self, device: torch.device):
        self._t = torch.zeros(1, device=device)
        self._cuda = device.type == "cuda"
        self._host = torch.zeros(1, pin_memory=True) if self._cuda else self._t
        self._done = torch.cuda.Event() if self._cuda else None
        self._work: Any = None
        self._value: float | None = None

    def start(self, wish: bool) -> None:
        self._t.fill_(float(wish))  # a kernel on the GPU: no host sync
        self._work = tdist.all_reduce(self._t, async_op=True) if tdist.is_initialized() else None
        self._value = None
        if self._cuda:
            if self._work is not None:
                self._work.wait()  # the copy after it waits for the sum, on the device only
            self._host.copy_(self._t, non_blocking=True)
            self._done.record()

    def value(self) -> float:
        if self._value is None:
            # The host waits for this sum. Read a step late it is done, unless the host ran
            # more than a step ahead of the device; read at once only on a rank that wishes.
            if self._done is not None:
                self._done.synchronize()
            elif self._work is not None:
                self._work.wait()
            self._value = float(self._host.item())
        return self._value
