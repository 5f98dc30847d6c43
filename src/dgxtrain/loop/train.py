"""train(cfg): the run's story, and the loop that schedules its steps.

The loop only schedules (log, evaluate, save, decide); computing lives in loop/step.py and
loop/evaluate.py, and what is trained in the task (tasks/).
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import json
import logging
import os
import socket
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from dgxtrain import checkpoint
from dgxtrain.config import Config, TrainerConfig, load
from dgxtrain.distributed import ddp
from dgxtrain.distributed.collectives import (
    all_agree,
    broadcast_object,
    gather_objects,
    gather_rows,
    process_group,
)
from dgxtrain.distributed.ddp import comm_wait_s
from dgxtrain.distributed.env import DistEnv, cores_per_rank, world_size_from_env
from dgxtrain.distributed.preempt import (
    EXIT_REQUEUE,
    Requeue,
    StopRequests,
    StopVote,
    control_dir,
    job_end_time,
    report_exit,
)
from dgxtrain.distributed.watchdog import Watchdog
from dgxtrain.loop.build import Job, build_job, describe, distribute, resume, save_checkpoint
from dgxtrain.loop.cadence import Cadence
from dgxtrain.loop.evaluate import evaluate
from dgxtrain.loop.guard import Reading, UpdateGuard
from dgxtrain.loop.step import StepParts, train_step
from dgxtrain.observe import logs
from dgxtrain.observe.model_stats import param_sha256
from dgxtrain.observe.perf import (
    NULL_CLOCK,
    PhaseClock,
    StepMeter,
    local_row,
    log_row,
    seconds_since_launch,
)
from dgxtrain.observe.trackers import NullTracker, build_tracker, redact, run_identity
from dgxtrain.tasks import Feed

log = logging.getLogger(__name__)


@dataclass
class TrainState:
    """The loop's mutable counters; everything else is derived from the config."""

    step: int = 0
    samples_seen: int = 0
    skipped_steps: int = 0
    consecutive_skips: int = 0
    stop_reason: str = ""
    checkpoint_s: float = 0.0  # the last save's measured time, for the deadline's budget

    def state_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def load_state_dict(self, d: dict[str, Any]) -> None:
        for k, v in d.items():
            setattr(self, k, v)


def train(cfg: DictConfig, run_dir: Path | None = None) -> dict[str, Any]:
    """Run one training job as configured; returns the summary rank 0 writes."""
    # Validate before picking a GPU or joining a process group: a bad setting costs nothing.
    config, spec = load(cfg, world_size_from_env(), torch.cuda.is_available())
    resolved = OmegaConf.to_container(cfg, resolve=True)
    env = DistEnv.from_env(config.device)
    if run_dir is None:
        from hydra.core.hydra_config import HydraConfig
        run_dir = Path(HydraConfig.get().runtime.output_dir)
    logs.setup_logging(env.rank, run_dir)
    p, t = config.preemption, config.trainer
    stops = StopRequests(p.signals, control_dir(run_dir) / "stop",
                         job_end_time(ask_slurm=env.is_main), p.deadline_margin_s, p.poll_s,
                         leader=env.is_main)
    with stops, Watchdog(run_dir, env.rank) as watchdog:  # this order: see Watchdog
        watchdog.arm(config.dist.init_timeout_s)
        if env.device.type == "cuda":
            torch.cuda.set_device(env.device)  # before any allocation: one context per GPU
        # torchrun sets OMP_NUM_THREADS=1 for every rank: right for 8 GPUs, idle cores on CPU.
        torch.set_num_threads(config.dist.threads_per_rank or cores_per_rank())
        job = build_job(config, resolved, env, spec, run_dir, watchdog)  # bad arguments fail here
        if t.warmup_steps >= t.max_steps:
            log.warning("trainer.warmup_steps=%d >= trainer.max_steps=%d: the LR never leaves "
                        "warm-up", t.warmup_steps, t.max_steps)
        # Collectives get more time than the watchdog, so a hang ends with stacks written.
        with process_group(env, timeout_s=config.dist.init_timeout_s + 60):
            try:
                state, summary = _run(job, run_dir, stops)
            finally:
                # DDP's reducer holds the process group. Freed later, its destructor would
                # join gloo's threads with the GIL held and can deadlock: free it now.
                job.wrapped = None
                gc.collect()
                checkpoint.finish_pruning()
            if state.stop_reason == "requeue":
                why = stops.reason or "another rank asked"
                stopped = Requeue(f"stopped after step {state.step} with a checkpoint ({why}); "
                                  "requeue the job to continue from there")
                if env.is_main:
                    report_exit("requeue", detail=str(stopped))
                # srun ends the step once a task exits non-zero (--kill-on-bad-exit): no rank
                # exits with 75 before rank 0 has reported it.
                all_agree(True, env.device)
    if state.stop_reason in ("non_finite", "too_many_skips"):
        raise FloatingPointError(
            f"non-finite loss or gradient at step {state.step + 1}, update not applied; fix: "
            "lower optim.lr, set trainer.grad_clip, or trainer.nonfinite=skip"
            if state.stop_reason == "non_finite" else
            f"{state.consecutive_skips} non-finite steps in a row (trainer.max_skipped="
            f"{t.max_skipped}), up to step {state.step}; fix: lower optim.lr or set "
            "trainer.grad_clip")
    if state.stop_reason == "requeue":
        stops.hand_over()
        raise stopped
    return summary


def _run(job: Job, run_dir: Path, stops: StopRequests) -> tuple[TrainState, dict[str, Any]]:
    """Inside the process group: resume, distribute, loop, write the outputs."""
    cfg, env = job.cfg, job.env
    hosts = gather_objects(socket.gethostname())
    state = TrainState()
    saved = resume(job)
    if saved:
        state.load_state_dict({**saved["train_state"], "stop_reason": ""})
        # Launched again once finished: nothing to train, evaluate or log (no W&B run).
        done = broadcast_object(finished(run_dir, state.step, cfg.trainer.max_steps)
                                if env.is_main else None)
        if done is not None:
            log.info("the run is already complete at step %d (%s); nothing to do: raise "
                     "trainer.max_steps to train on", state.step, run_dir / "summary.json")
            state.stop_reason = done.get("stop_reason", "max_steps")
            return state, done
    derived = describe(job, hosts)
    job.wrapped = distribute(job, hosts)
    tracker = build_tracker(cfg, env.is_main, run_dir, **run_identity(cfg, run_dir, derived))
    tracker.load_state_dict(saved.get("tracker", {}))
    # No secret (an API key interpolated into the config, say) reaches a file or W&B.
    tracker.log_config(redact(job.resolved), redact(derived))
    log.info("run dir %s (a rank stuck for dist.timeout_s=%gs writes its stack to stacks/ "
             "and ends the job)", run_dir, cfg.dist.timeout_s)
    log.info("start: %s", " | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                     for k, v in derived.items()))
    # Starts at the resumed step: a seek, no replay, nothing read ahead from before.
    with job.task.train_feed(cfg.seed, job.spec.global_batch_size, env.rank, env.world_size,
                             job.spec.micro_batch_size, state.step, cfg.trainer.max_steps,
                             env.device) as feed:
        try:
            summary = run_loop(job, state, feed, tracker, stops, derived, hosts)
        except RuntimeError as e:
            named = ddp.unused_parameters(e)  # a model with a branch some steps skip
            if named is None:
                raise
            raise named from e
    if state.stop_reason == "requeue":  # not the end of the run: no final outputs yet
        tracker.finish(summary, exit_code=EXIT_REQUEUE)
        return state, summary
    tracker.save_model(job.model)
    tracker.finish(summary)
    return state, summary


def finished(run_dir: Path, step: int, max_steps: int) -> dict[str, Any] | None:
    """The summary of a run that ended at `step` (its last), if it wrote one."""
    path = run_dir / "summary.json"
    if step < max_steps or not path.is_file():
        return None
    summary = json.loads(path.read_text())
    return summary if summary.get("steps") == step else None


def run_loop(job: Job, state: TrainState, feed: Feed, tracker: NullTracker,
             stops: StopRequests, derived: dict[str, Any], hosts: list[str]) -> dict[str, Any]:
    """Step until done; log, evaluate, save and decide on schedule. Returns the summary."""
    cfg, env, batch = job.cfg, job.env, job.spec.global_batch_size
    t, first_step, last = cfg.trainer, state.step, {}
    guard = UpdateGuard(t.nonfinite, t.max_skipped, env.device, state.skipped_steps,
                        state.consecutive_skips)
    parts = StepParts(job.wrapped, job.task, job.optimizer, guard, job.autocast, t.grad_clip)
    cadence = Cadence(t, cfg.checkpoint.every_steps, first_step + 1)
    meter = StepMeter(batch, state.step)
    evaluate_now = functools.partial(evaluate, job.task, job.model, env, t.eval_batch_size,
                                     job.autocast)
    # For the deadline: recent step times (the first, compiling one excluded), last save's.
    step_times: deque[float] = deque(maxlen=20)
    # A restarted run budgets the deadline with the save time measured before the restart.
    checkpoint_s, startup_s = state.checkpoint_s, 0.0
    failures, saved_at = 0, first_step  # saves failed in a row; the newest good one's step
    vote, asked_at = StopVote(env.device, env.world_size), 0
    while state.step < t.max_steps and not state.stop_reason:
        step, started = state.step + 1, time.monotonic()
        job.faults.before_step(step)
        # The first step may compile or warm up allocators: it gets the start-up budget.
        job.watchdog.arm(cfg.dist.timeout_s if step > first_step + 1 else cfg.dist.init_timeout_s)
        # Log steps time their phases (a device sync per phase); the others do not.
        clock = PhaseClock(env.device) if cadence.logs(step) else NULL_CLOCK
        lr = job.optimizer.param_groups[0]["lr"]
        loss, grad_norm = train_step(parts, feed(state.step), step, clock)
        job.scheduler.step()
        state.step, state.samples_seen = step, state.samples_seen + batch
        # A stop asked now is honoured after this step or the next, then saved: budget both.
        if not asked_at and stops.poll(2 * max(step_times, default=0.0), checkpoint_s):
            asked_at = step
        stop = vote.after_step(bool(asked_at)) and step < t.max_steps
        if cadence.decides(step) or stop:
            decide(state, guard.read(), stop, stops, asked_at, t, batch)
            if state.stop_reason == "requeue":
                stops.warn_if_grace_is_short(checkpoint_s)
        if state.stop_reason in ("non_finite", "too_many_skips"):
            break
        if step > first_step + 1:
            step_times.append(time.monotonic() - started)
        else:
            startup_s = seconds_since_launch(os.getppid() if env.launcher == "torchrun" else None)
            log.info("first step done %.1f s after launch", startup_s)
        if cadence.logs(step):
            rows = gather_rows(local_row(loss, grad_norm, clock, comm_wait_s(job.wrapped),
                                         env.device)).tolist()
            tick = meter.tick(step)
            last = {**log_row(rows, tick["step_time_s"], derived.get("flops_per_step"),
                              derived.get("peak_tflops_per_device", 0.0), hosts),
                    "train/lr": lr, "train/skipped_steps": state.skipped_steps,
                    "perf/step_time_s": tick["step_time_s"],
                    "perf/samples_per_s": tick["samples_per_s"],
                    "checkpoint/save_s": checkpoint_s}
            tracker.log_metrics(step, last)
        if cadence.evaluates(step) and not state.stop_reason:
            job.watchdog.arm(cfg.dist.init_timeout_s)
            tracker.log_metrics(step, eval_metrics(evaluate_now()))
        if cadence.saves(step) and not state.stop_reason or state.stop_reason == "requeue":
            began = time.monotonic()
            failed = save_checkpoint(job, step, state.state_dict(), tracker)
            checkpoint_s = state.checkpoint_s = time.monotonic() - began
            failures = check_save(failed, failures, step, saved_at, state, cfg, tracker)
            saved_at = saved_at if failed else step
            if state.stop_reason == "requeue" and stops.fired_at:
                log.info("the checkpoint for the requeue took %.2f s; saved %.2f s after the "
                         "signal", checkpoint_s, time.time() - stops.fired_at)
    vote.close()
    if stops.reason or state.stop_reason == "requeue":
        stops.consume()  # honoured (or overtaken by the end): not again in this run dir
    if state.stop_reason == "requeue":
        return {"steps": state.step, "stop_reason": state.stop_reason}
    job.watchdog.arm(cfg.dist.init_timeout_s)
    state.stop_reason = state.stop_reason or "max_steps"
    train_time = meter.elapsed()
    final_eval = evaluate_now()
    tracker.log_metrics(state.step, eval_metrics(final_eval))
    return {
        "world_size": env.world_size, "global_batch_size": batch,
        "micro_batch_size": job.spec.micro_batch_size,
        "grad_accum_steps": job.spec.grad_accum_steps,
        "steps": state.step, "samples_seen": state.samples_seen,
        "skipped_steps": state.skipped_steps, "resumed_from_step": first_step,
        "stop_reason": state.stop_reason, "final_loss": last.get("train/loss"), **final_eval,
        **job.task.summary(job.model),
        "samples_per_s": (state.samples_seen - first_step * batch) / train_time
        if train_time > 0 else 0.0,
        # Rank 0's alone: DDP keeps the replicas bit-identical (test_comm checks it), and
        # hashing copies every parameter to the host.
        "param_sha256": param_sha256(job.model) if env.is_main else None,
        "wall_time_s": meter.elapsed(),
        "startup_s": startup_s,
    }


def decide(state: TrainState, guard: Reading, stop: bool, stops: StopRequests,
           asked_at: int, t: TrainerConfig, batch: int) -> None:
    """Apply what the steps since the last decision step decided, the same on every rank:
    the guard's counters (from the all-reduced gradients) and the ranks' stop vote."""
    if guard.skipped > state.skipped_steps:
        log.warning("%d non-finite step(s) up to step %d: their updates were skipped",
                    guard.skipped - state.skipped_steps, state.step)
    state.skipped_steps, state.consecutive_skips = guard.skipped, guard.streak
    if guard.halted_at:
        # No update from the halting step on (error mode) or after it (skip mode).
        stand = guard.halted_at - 1 if t.nonfinite == "error" else guard.halted_at
        state.samples_seen -= (state.step - stand) * batch
        state.step = stand
        state.stop_reason = "non_finite" if t.nonfinite == "error" else "too_many_skips"
        return
    if stop:
        # A rank that asked says why; the others follow quietly.
        (log.warning if stops.reason else log.info)(
            "stopping after step %d for a requeue: %s", state.step,
            f"{stops.reason} (asked during step {asked_at})" if stops.reason else
            "another rank asked")
        state.stop_reason = "requeue"


def check_save(failed: str | None, failures: int, step: int, saved_at: int,
               state: TrainState, cfg: Config, tracker: NullTracker) -> int:
    """A failed save is never taken for a saved one: it is logged to the trackers, and it
    ends the run where going on would lose work unseen. Returns the failures in a row."""
    if failed is None:
        return 0
    failures += 1
    tracker.log_metrics(step, {"checkpoint/failures": failures})
    fix = ("free space or repair the storage, then rerun: it resumes from " +
           (f"checkpoints/step-{saved_at}" if saved_at else "the start (no checkpoint yet)"))
    if state.stop_reason == "requeue":
        what = f"the checkpoint for the requeue at step {step} failed ({failed}); not requeued"
    elif step == cfg.trainer.max_steps:
        what = f"the final checkpoint at step {step} failed ({failed})"
    elif failures >= cfg.checkpoint.max_failures:
        what = (f"{failures} checkpoints in a row failed (checkpoint.max_failures="
                f"{cfg.checkpoint.max_failures}), the last at step {step} ({failed})")
    else:
        what = ""
    if what:
        raise checkpoint.CheckpointError(f"{what}; fix: {fix}")
    log.warning("checkpoint at step %d failed (%d in a row; the run ends at "
                "checkpoint.max_failures=%d); training on", step, failures,
                cfg.checkpoint.max_failures)
    return failures


def eval_metrics(result: dict[str, float]) -> dict[str, float]:
    """evaluate()'s result under the names the trackers use: eval_loss -> eval/loss, ..."""
    return {"eval/" + k.removeprefix("eval_"): v for k, v in result.items()}
