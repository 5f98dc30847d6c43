"""Saving: the checkpoint cadence, the save and its measured time, the failure policy, and
the resume at start. checkpoint/ writes, verifies and restores the files."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from dgxtrain import __version__, checkpoint
from dgxtrain.distributed.env import launch_id
from dgxtrain.loop.build import Job
from dgxtrain.loop.state import StopReason, TrainState
from dgxtrain.loop.step import StepOutput
from dgxtrain.observe.trackers import NullTracker

log = logging.getLogger(__name__)


class Saving:
    """Saves every checkpoint.every_steps, at the end, and for a requeue. A failed save is
    never taken for a saved one: it is logged to the trackers, and it ends the run where
    going on would lose work unseen."""

    def __init__(self, job: Job, tracker: NullTracker, first_step: int):
        self.job, self.tracker = job, tracker
        self.every, self.max_steps = job.cfg.checkpoint.every_steps, job.cfg.trainer.max_steps
        self.max_failures = job.cfg.checkpoint.max_failures
        self.failures = 0  # saves failed in a row
        self.saved_at = first_step - 1  # the newest good checkpoint's step (0: none)

    def due(self, step: int) -> bool:
        return step == self.max_steps or bool(self.every) and step % self.every == 0

    def after_step(self, state: TrainState, out: StepOutput) -> None:
        if (state.running and self.due(out.step)
                or state.stop_reason is StopReason.REQUEUE):
            self.save(state)

    def save(self, state: TrainState) -> None:
        job, step = self.job, state.step
        job.watchdog.arm(job.cfg.dist.init_timeout_s)
        began = time.monotonic()
        failed = checkpoint.save(
            job.run_dir, step, job.env,
            checkpoint.contents(job.model, job.optimizer, job.scheduler, state.state_dict(),
                                self.tracker.state_dict()),
            checkpoint_meta(job), job.cfg.checkpoint.keep_last, job.faults.before_write)
        state.checkpoint_s = time.monotonic() - began  # failed or not, it took this long
        if failed is None:
            self.failures, self.saved_at = 0, step
            return
        self.failures += 1
        self.tracker.log_metrics(step, {"checkpoint/failures": self.failures})
        fatal = self._fatal(state, failed)
        if fatal:
            where = f"checkpoints/step-{self.saved_at}" if self.saved_at else (
                "the start (no checkpoint yet)")
            raise checkpoint.CheckpointError(f"{fatal}; fix: free space or repair the "
                                             f"storage, then rerun: it resumes from {where}")
        log.warning("checkpoint at step %d failed (%d in a row; the run ends at "
                    "checkpoint.max_failures=%d); training on", step, self.failures,
                    self.max_failures)

    def _fatal(self, state: TrainState, failed: str) -> str:
        """Why this failure ends the run, or '' if training goes on."""
        step = state.step
        if state.stop_reason is StopReason.REQUEUE:
            return f"the checkpoint for the requeue at step {step} failed ({failed}); not requeued"
        if step == self.max_steps:
            return f"the final checkpoint at step {step} failed ({failed})"
        if self.failures >= self.max_failures:
            return (f"{self.failures} checkpoints in a row failed (checkpoint.max_failures="
                    f"{self.max_failures}), the last at step {step} ({failed})")
        return ""


def checkpoint_meta(job: Job) -> dict[str, Any]:
    """What a checkpoint records about the run that wrote it (manifest.json)."""
    cfg_json = json.dumps(job.resolved, sort_keys=True, default=str)
    return {"world_size": job.env.world_size, "global_batch_size": job.spec.global_batch_size,
            "seed": job.cfg.seed, "num_samples": job.task.num_samples,
            "config_sha256": hashlib.sha256(cfg_json.encode()).hexdigest(),
            "launch": launch_id(),
            "optimizer": f"{type(job.optimizer).__module__}.{type(job.optimizer).__qualname__}",
            "dgxtrain_version": __version__, "torch_version": torch.__version__}


def resume(job: Job) -> dict[str, Any]:
    """Load the newest complete checkpoint (or as checkpoint.resume says) into the job;
    returns its state.pt ({"train_state", "tracker"}), or {} for a fresh start."""
    found = checkpoint.choose(job.cfg.checkpoint.resume, job.run_dir, job.env, launch_id())
    if found is None:
        return {}
    saved = checkpoint.restore(found, job.env, checkpoint_meta(job), job.model,
                               job.optimizer, job.scheduler)
    if not found.path.resolve().is_relative_to(job.run_dir.resolve()):
        saved.pop("tracker", None)  # another run's checkpoint: its W&B run is not this one
    return saved


def finished(run_dir: Path, step: int, max_steps: int) -> dict[str, Any] | None:
    """The summary of a run that ended at `step` (its last), if it wrote one."""
    path = run_dir / "summary.json"
    if step < max_steps or not path.is_file():
        return None
    summary = json.loads(path.read_text())
    return summary if summary.get("steps") == step else None
