"""train(cfg): the run's story. train_step(): one optimizer step over this rank's micro-batches.

The loop only schedules (log, eval, stop); computing lives in train_step and evaluate.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import logging
import math
import os
import socket
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from dgxtrain import checkpoint, logs
from dgxtrain.comm import StepVotes, comm_wait_s
from dgxtrain.config import validate
from dgxtrain.dist import (DistEnv, cores_per_rank, gather_objects, gather_rows, grad_sync,
                           process_group, world_size_from_env)
from dgxtrain.evaluate import evaluate
from dgxtrain.faults import Watchdog
from dgxtrain.job import Job, build_job, describe, distribute, resume, save_checkpoint
from dgxtrain.metrics import StepMeter, param_sha256
from dgxtrain.optim import skips_on_device, total_norm
from dgxtrain.perf import PhaseClock, local_row, log_row, seconds_since_launch
from dgxtrain.preempt import EXIT_REQUEUE, Requeue, StopRequests, control_dir, job_end_time
from dgxtrain.tracking import NullTracker, build_tracker, redact, run_identity

log = logging.getLogger(__name__)


@dataclass
class TrainState:
    """The loop's mutable counters; everything else is derived from the config."""

    step: int = 0
    samples_seen: int = 0
    skipped_steps: int = 0
    consecutive_skips: int = 0
    stop_reason: str = ""

    def state_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def load_state_dict(self, d: dict[str, Any]) -> None:
        for k, v in d.items():
            setattr(self, k, v)


class StepFlags:
    """A step's decisions, summed over ranks: [loss non-finite, stop?, grad non-finite],
    on their way to the host. On a GPU they are copied without blocking and read one step
    later, when the device is long past them: the host never waits for the step it queued."""

    def __init__(self, flags: torch.Tensor):
        self.done = None
        if flags.is_cuda:
            self.host = torch.empty(flags.shape, dtype=flags.dtype, pin_memory=True)
            self.host.copy_(flags, non_blocking=True)
            self.done = torch.cuda.Event()
            self.done.record()
        else:
            self.host = flags

    def read(self) -> tuple[bool, bool]:
        """(the update was finite on every rank and taken, some rank asked to stop)."""
        if self.done is not None:
            self.done.synchronize()
        f = self.host.tolist()
        return not (f[0] or f[2]), f[1] > 0


class StepResult(NamedTuple):
    loss: torch.Tensor  # this rank's, on the device
    grad_norm: torch.Tensor
    flags: StepFlags
    deferred: bool  # the update was decided on the device: read the flags later


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
               scheduler: torch.optim.lr_scheduler.LRScheduler, dataset: Any,
               micro_batches: torch.Tensor, autocast: Callable, grad_clip: float,
               poison: Callable[[torch.Tensor], torch.Tensor] = lambda loss: loss,
               stop: torch.Tensor | None = None, clock: PhaseClock | None = None,
               halted: torch.Tensor | None = None) -> StepResult:
    """Forward/backward each micro-batch, clip, and step if the step is finite on every
    rank. `stop` (0 or 1, on the device) is this rank's wish to stop after this step;
    `clock`, on log steps only, times the phases; `halted` (on the device, error mode) turns
    1 at the first non-finite step, after which no update is applied."""
    accum = micro_batches.shape[0]
    loss_sum = None
    for i, idx in enumerate(micro_batches):
        x, y = dataset.sample(idx)
        if clock:
            clock.mark("data")
        # Only the last micro-batch's backward all-reduces: the sum arrives once.
        with grad_sync(model, i == accum - 1):
            with autocast():
                pred = model(x)
            # Mean over the micro-batch / accum, averaged over ranks by DDP = global mean.
            loss = poison(F.mse_loss(pred.float().reshape(y.shape), y) / accum)
            loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
            if i == accum - 1:
                # Every rank must take the same decisions: this rank's votes are summed
                # over ranks, with the gradients where the all-reduce can carry them.
                wish = stop > 0 if stop is not None else torch.zeros_like(loss_sum, dtype=bool)
                votes = StepVotes(model, torch.stack([~torch.isfinite(loss_sum), wish]).float())
            loss.backward()
        if clock:
            clock.mark("fwd_bwd")  # includes the wait for DDP's gradient all-reduce
    deferred, unclip = skips_on_device(optimizer), None
    if deferred:
        # The fused update divides the gradients by `grad_scale` as it reads them (as it
        # unscales a GradScaler's): clipping costs the norm, not one more pass over them.
        grad_norm = total_norm([p.grad for p in model.parameters() if p.grad is not None])
        if grad_clip > 0:  # clip_grad_norm_'s factor, max_norm / (norm + 1e-6), inverted
            unclip = ((grad_norm + 1e-6) / grad_clip).clamp_(min=1.0)
    else:
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(),
                                                   grad_clip if grad_clip > 0 else math.inf)
    # [loss non-finite, stop?, gradient non-finite], before any update.
    flags = votes.flags((~torch.isfinite(grad_norm)).float()[None])
    if deferred:
        bad = (flags[0] + flags[2] > 0).float()  # 0-d, as a GradScaler's
        if halted is not None:
            bad = halted.copy_(torch.maximum(halted, bad))
        optimizer.found_inf, optimizer.grad_scale = bad, unclip
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf, optimizer.grad_scale
    elif not (flags[0] + flags[2]).item():  # the host reads the flags here, once per step
        optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    if clock:
        clock.mark("optim")
    return StepResult(loss_sum, grad_norm, StepFlags(flags), deferred)


def train(cfg: DictConfig, run_dir: Path | None = None) -> dict[str, Any]:
    """Run one training job as configured; returns the summary rank 0 writes."""
    # Validate before picking a GPU or joining a process group: a bad setting costs nothing.
    spec = validate(cfg, world_size_from_env(), torch.cuda.is_available())
    env = DistEnv.from_env(cfg.device)
    if run_dir is None:
        from hydra.core.hydra_config import HydraConfig
        run_dir = Path(HydraConfig.get().runtime.output_dir)
    logs.setup_logging(env.rank, run_dir)
    p = cfg.preemption
    stops = StopRequests(list(p.signals), control_dir(run_dir) / "stop",
                         job_end_time(ask_slurm=env.is_main), p.deadline_margin_s, p.poll_s,
                         leader=env.is_main)
    with Watchdog(run_dir, env.rank) as watchdog, stops:
        watchdog.arm(cfg.dist.init_timeout_s)
        if env.device.type == "cuda":
            torch.cuda.set_device(env.device)  # before any allocation: one context per GPU
        # torchrun sets OMP_NUM_THREADS=1 for every rank: right for 8 GPUs, idle cores on CPU.
        torch.set_num_threads(cfg.dist.threads_per_rank or cores_per_rank())
        job = build_job(cfg, env, spec, run_dir, watchdog)  # bad arguments fail here already
        if cfg.trainer.warmup_steps >= cfg.trainer.max_steps:
            log.warning("trainer.warmup_steps=%d >= trainer.max_steps=%d: the LR never leaves "
                        "warm-up", cfg.trainer.warmup_steps, cfg.trainer.max_steps)
        # Collectives get more time than the watchdog, so a hang ends with stacks written.
        with process_group(env, timeout_s=cfg.dist.init_timeout_s + 60):
            try:
                state, summary = _run(job, run_dir, stops)
            finally:
                # DDP's reducer holds the process group. Freed later, its destructor would
                # join gloo's threads with the GIL held and can deadlock: free it now.
                job.wrapped = None
                gc.collect()
                checkpoint.finish_pruning()
    if state.stop_reason in ("non_finite", "too_many_skips"):
        raise FloatingPointError(
            f"non-finite loss or gradient at step {state.step + 1}, update not applied; fix: "
            "lower optim.lr, set trainer.grad_clip, or trainer.nonfinite=skip"
            if state.stop_reason == "non_finite" else
            f"{state.consecutive_skips} non-finite steps in a row (trainer.max_skipped="
            f"{cfg.trainer.max_skipped}), up to step {state.step}; fix: lower optim.lr or set "
            "trainer.grad_clip")
    if state.stop_reason == "requeue":
        stops.hand_over()
        why = stops.reason or "another rank asked"
        raise Requeue(f"stopped after step {state.step} with a checkpoint ({why}); requeue "
                      "the job to continue from there")
    return summary


def _run(job: Job, run_dir: Path, stops: StopRequests) -> tuple[TrainState, dict[str, Any]]:
    """Inside the process group: resume, distribute, loop, write the outputs."""
    cfg, env = job.cfg, job.env
    hosts = gather_objects(socket.gethostname())
    derived = describe(job, hosts)
    state = TrainState()
    saved = resume(job)
    if saved:
        state.load_state_dict({**saved["train_state"], "stop_reason": ""})
    job.wrapped = distribute(job, hosts)
    tracker = build_tracker(cfg, env.is_main, run_dir, **run_identity(cfg, run_dir, derived))
    tracker.load_state_dict(saved.get("tracker", {}))
    # No secret (an API key interpolated into the config, say) reaches a file or W&B.
    tracker.log_config(redact(OmegaConf.to_container(cfg, resolve=True)), redact(derived))
    log.info("run dir %s (a rank stuck for dist.timeout_s=%gs writes its stack to stacks/ "
             "and ends the job)", run_dir, cfg.dist.timeout_s)
    log.info("start: %s", " | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                     for k, v in derived.items()))
    summary = run_loop(job, state, tracker, stops, derived, hosts)
    if state.stop_reason == "requeue":  # not the end of the run: no final outputs yet
        tracker.finish(summary, exit_code=EXIT_REQUEUE)
        return state, summary
    tracker.save_model(job.model)
    tracker.finish(summary)
    return state, summary


def run_loop(job: Job, state: TrainState, tracker: NullTracker, stops: StopRequests,
             derived: dict[str, Any], hosts: list[str]) -> dict[str, Any]:
    """Step until done; log, evaluate, checkpoint and stop on schedule. Returns the summary."""
    # Plain dataclasses, not DictConfig: each lookup of those costs ~10 us, every step.
    t, timeouts = OmegaConf.to_object(job.cfg.trainer), OmegaConf.to_object(job.cfg.dist)
    env, spec, every = job.env, job.spec, job.cfg.checkpoint.every_steps
    meter = StepMeter(spec.global_batch_size, state.step)
    first_step, last = state.step, {}
    evaluate_now = functools.partial(evaluate, job.model, job.dataset, env, t.eval_batch_size,
                                     job.autocast)
    # For the deadline: recent step times (the first, compiling one excluded), last save's.
    step_times: deque[float] = deque(maxlen=20)
    checkpoint_s, asked, stop_wish = 0.0, False, torch.zeros((), device=env.device)
    startup_s = 0.0  # launch to the end of this attempt's first step
    pending: tuple[int, StepFlags] | None = None  # the last step, its decisions not yet read
    # Error mode: once a step is non-finite no later update is applied, even one queued
    # before the host read that step's flags.
    halted = torch.zeros((), device=env.device) if t.nonfinite == "error" else None
    while state.step < t.max_steps and not state.stop_reason:
        step, started = state.step + 1, time.monotonic()
        # Log steps time their phases (a device sync per phase); the others do not.
        clock = PhaseClock(env.device) if step % t.log_every == 0 or step == t.max_steps else None
        # Two steps: a stop is read with the step after the one that asked (see settle).
        if not asked and stops.poll(2 * max(step_times, default=0.0), checkpoint_s):
            stop_wish.fill_(1.0)  # shared in the step's all-reduce
            asked = True
        job.faults.before_step(step)
        # The first step may compile or warm up allocators: it gets the start-up budget.
        job.watchdog.arm(timeouts.timeout_s if step > first_step + 1
                         else timeouts.init_timeout_s)
        lr = job.optimizer.param_groups[0]["lr"]
        loss, grad_norm, flags, deferred = train_step(
            job.wrapped, job.optimizer, job.scheduler, job.dataset, job.schedule(state.step),
            job.autocast, t.grad_clip, functools.partial(job.faults.poison, step=step), stop_wish,
            clock, halted)
        state.step = step
        state.samples_seen += spec.global_batch_size
        done = state.step == t.max_steps
        # A step's decisions are read one step late, when the device is long past them,
        # except where the host acts on this step: the first, logs, evaluations, saves, end.
        if pending is not None:
            settle(state, *pending, t, stops, spec.global_batch_size)
        pending = (step, flags)
        if (not deferred or clock or done or step == first_step + 1 or state.stop_reason
                or every and step % every == 0 or t.eval_every and step % t.eval_every == 0):
            settle(state, *pending, t, stops, spec.global_batch_size)
            pending = None
        if state.stop_reason == "non_finite":
            break
        if step > first_step + 1:
            step_times.append(time.monotonic() - started)
        else:
            startup_s = seconds_since_launch(os.getppid() if env.launcher == "torchrun" else None)
            log.info("first step done %.1f s after launch", startup_s)
        if clock:
            rows = gather_rows(local_row(loss, grad_norm, clock, comm_wait_s(job.wrapped),
                                         env.device)).tolist()
            tick = meter.tick(state.step)
            last = {**log_row(rows, tick["step_time_s"], derived.get("flops_per_step"),
                              derived.get("peak_tflops_per_device", 0.0), hosts),
                    "train/lr": lr, "train/skipped_steps": state.skipped_steps,
                    "perf/step_time_s": tick["step_time_s"],
                    "perf/samples_per_s": tick["samples_per_s"],
                    "checkpoint/save_s": checkpoint_s}
            tracker.log_metrics(state.step, last)
        if t.eval_every and state.step % t.eval_every == 0 and not done and not state.stop_reason:
            job.watchdog.arm(timeouts.init_timeout_s)
            tracker.log_metrics(state.step, eval_metrics(evaluate_now()))
        if ((done or (every and state.step % every == 0)) and not state.stop_reason
                or state.stop_reason == "requeue"):
            began = time.monotonic()
            save_checkpoint(job, state.step, state.state_dict(), tracker)
            checkpoint_s = time.monotonic() - began
    if asked or state.stop_reason == "requeue":
        stops.consume()  # honoured (or overtaken by the end): not again in this run dir
    if state.stop_reason == "requeue":
        return {"steps": state.step, "stop_reason": state.stop_reason}
    job.watchdog.arm(timeouts.init_timeout_s)
    state.stop_reason = state.stop_reason or "max_steps"
    train_time = meter.elapsed()
    final_eval = evaluate_now()
    tracker.log_metrics(state.step, eval_metrics(final_eval))
    return {
        "world_size": env.world_size, "global_batch_size": spec.global_batch_size,
        "micro_batch_size": spec.micro_batch_size, "grad_accum_steps": spec.grad_accum_steps,
        "steps": state.step, "samples_seen": state.samples_seen,
        "skipped_steps": state.skipped_steps, "resumed_from_step": first_step,
        "stop_reason": state.stop_reason, "final_loss": last.get("train/loss"), **final_eval,
        "samples_per_s": (state.samples_seen - first_step * spec.global_batch_size) / train_time
        if train_time > 0 else 0.0,
        "param_sha256": param_sha256(job.model), "wall_time_s": meter.elapsed(),
        "startup_s": startup_s,
    }


def settle(state: TrainState, step: int, flags: StepFlags, t: Any, stops: StopRequests,
           batch: int) -> None:
    """Apply the decisions of step `step` (flags summed over ranks) to the loop's state."""
    applied, stop = flags.read()
    if not applied:
        state.skipped_steps += 1
        state.consecutive_skips += 1
        log.warning("step %d: non-finite loss or gradient, update skipped", step)
        if t.nonfinite == "error":
            # Neither this update nor any after it was applied: the run stands at step - 1.
            state.samples_seen -= (state.step - step + 1) * batch
            state.step, state.stop_reason = step - 1, "non_finite"
            return
        if state.consecutive_skips >= t.max_skipped:
            state.stop_reason = "too_many_skips"
    else:
        state.consecutive_skips = 0
    if stop and state.step < t.max_steps and not state.stop_reason:
        # The rank that asked says why; the others follow quietly.
        (log.warning if stops.reason else log.info)(
            "stopping after step %d for a requeue: %s", state.step,
            stops.reason or "another rank asked")
        state.stop_reason = "requeue"


def eval_metrics(result: dict[str, float]) -> dict[str, float]:
    """evaluate()'s result under the names the trackers use: eval_loss -> eval/loss, ..."""
    return {"eval/" + k.removeprefix("eval_"): v for k, v in result.items()}
