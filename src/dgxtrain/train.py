"""train(cfg): the run's story. train_step(): one optimizer step over this rank's micro-batches.

The loop only schedules (log, eval, stop); computing lives in train_step and evaluate.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import hashlib
import logging
import math
import platform
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch.nn.parallel import DistributedDataParallel as DDP

from dgxtrain import __version__, checkpoint, logs
from dgxtrain.config import ConfigError, RunSpec, validate
from dgxtrain.data import GlobalBatchSchedule
from dgxtrain.dist import DistEnv, all_agree, all_reduce_, process_group, world_size_from_env
from dgxtrain.evaluate import evaluate
from dgxtrain.faults import Faults, Watchdog
from dgxtrain.metrics import StepMeter, count_parameters, flops_per_sample, param_sha256
from dgxtrain.optim import build_optimizer, build_scheduler
from dgxtrain.tracking import NullTracker, build_tracker

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


def grad_sync(model: torch.nn.Module, enabled: bool) -> contextlib.AbstractContextManager:
    """DDP all-reduces gradients on every backward unless told not to (no_sync)."""
    if enabled or not hasattr(model, "no_sync"):
        return contextlib.nullcontext()
    return model.no_sync()


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
               scheduler: torch.optim.lr_scheduler.LRScheduler, dataset: Any,
               micro_batches: torch.Tensor, autocast: Callable, grad_clip: float,
               poison: Callable[[torch.Tensor], torch.Tensor] = lambda loss: loss,
               ) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Forward/backward each micro-batch, clip, and step if the step is finite on every
    rank. Returns (loss, grad norm) as device tensors, and whether the update was applied."""
    accum = micro_batches.shape[0]
    loss_sum = torch.zeros((), device=micro_batches.device)
    for i, idx in enumerate(micro_batches):
        x, y = dataset.sample(idx)
        # Only the last micro-batch's backward all-reduces: the sum arrives once.
        with grad_sync(model, i == accum - 1):
            with autocast():
                pred = model(x)
            # Mean over the micro-batch / accum, averaged over ranks by DDP = global mean.
            loss = poison(F.mse_loss(pred.float().reshape(y.shape), y) / accum)
            loss.backward()
        loss_sum += loss.detach()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(),
                                               grad_clip if grad_clip > 0 else math.inf)
    # Every rank must take the same decision: the loss flag is summed over ranks (the
    # gradients are all-reduced already). The step's one host sync, before any update.
    bad = all_reduce_(torch.stack([~torch.isfinite(loss_sum), ~torch.isfinite(grad_norm)])
                      .float())
    applied = not bad.any().item()
    if applied:
        optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum, grad_norm, applied


def make_autocast(device: torch.device, precision: str) -> Callable:
    return functools.partial(torch.autocast, device.type, dtype=torch.bfloat16,
                             enabled=precision == "bf16")


def compile_or_eager(model: torch.nn.Module, example: torch.Tensor, autocast: Callable,
                     device: torch.device) -> torch.nn.Module:
    """torch.compile, proven by one forward/backward; eager on every rank if any rank fails."""
    try:
        compiled = torch.compile(model)
        # no_sync: a rank whose compile fails must not leave the others in an all-reduce.
        with grad_sync(compiled, False):
            with autocast():
                out = compiled(example)
            out.float().sum().backward()
        ok = True
    except Exception as e:  # backend missing, no C++ compiler, an untraceable user model
        log.warning("torch.compile failed (%s: %s); training eagerly",
                    type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        ok = False
    for p in model.parameters():
        p.grad = None
    if all_agree(ok, device):
        log.info("model compiled with torch.compile")
        return compiled
    return model


@dataclass
class Job:
    """What a run is made of, built once before the loop."""

    cfg: DictConfig
    env: DistEnv
    spec: RunSpec
    dataset: Any
    model: torch.nn.Module  # unwrapped: evaluation, state_dict, parameter hash
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    schedule: GlobalBatchSchedule
    autocast: Callable
    run_dir: Path
    faults: Faults
    watchdog: Watchdog
    wrapped: torch.nn.Module | None = None  # DDP and/or compiled: the training forward


@contextlib.contextmanager
def _constructing(group: str, node: DictConfig) -> Iterator[None]:
    """A class that rejects the config's arguments is a config error, named as one."""
    try:
        yield
    except InstantiationException as e:
        cause = e.__cause__ or e
        raise ConfigError(f"{group}._target_", node.get("_target_"),
                          f"its constructor failed ({type(cause).__name__}: "
                          f"{str(cause).splitlines()[0] if str(cause) else ''})",
                          f"make the {group}.* keys match that class's arguments") from e


def build_job(cfg: DictConfig, env: DistEnv, spec: RunSpec, run_dir: Path,
              watchdog: Watchdog) -> Job:
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    with _constructing("data", cfg.data):
        dataset = instantiate(cfg.data, seed=cfg.seed, device=env.device)
    with _constructing("model", cfg.model):
        model = instantiate(cfg.model, in_dim=dataset.dim).to(env.device)
    with _constructing("optim", cfg.optim):
        optimizer = build_optimizer(cfg.optim, model)
    t = cfg.trainer
    return Job(cfg, env, spec, dataset, model, optimizer,
               build_scheduler(optimizer, t.warmup_steps, t.max_steps, t.min_lr_ratio),
               GlobalBatchSchedule(dataset.num_samples, cfg.seed, spec.global_batch_size,
                                   env.rank, env.world_size, spec.micro_batch_size, env.device),
               make_autocast(env.device, t.precision), run_dir,
               Faults(cfg.fault, env.rank, run_dir), watchdog)


def distribute(job: Job) -> torch.nn.Module:
    """DDP when launched (even at one rank: one code path), then torch.compile if asked."""
    env, wrapped = job.env, job.model
    if env.launcher != "single":
        # DDP broadcasts rank 0's weights at construction and buckets gradients so that
        # their all-reduce overlaps the rest of the backward pass.
        wrapped = DDP(wrapped, device_ids=[env.device.index] if env.device.type == "cuda"
                      else None)
    if job.cfg.trainer.compile:
        example = job.dataset.sample(job.schedule(0)[0])[0]
        wrapped = compile_or_eager(wrapped, example, job.autocast, env.device)
    return wrapped


def describe(job: Job) -> dict[str, Any]:
    """The derived values logged at start (and stored as derived.json). Before distribute()."""
    env, model = job.env, job.model
    probe = job.dataset.sample(job.dataset.eval_indices()[:8])[0]
    per_sample = flops_per_sample(model, probe)
    return {
        **dataclasses.asdict(job.spec), "device": str(env.device), "backend": env.backend,
        "launcher": env.launcher, "parameters": count_parameters(model),
        "flops_per_step": per_sample * job.spec.global_batch_size if per_sample else None,
        "torch": torch.__version__, "python": platform.python_version(),
        "device_name": (torch.cuda.get_device_name(env.device) if env.device.type == "cuda"
                        else platform.processor() or platform.machine()),
    }


def checkpoint_meta(job: Job) -> dict[str, Any]:
    """What a checkpoint records about the run that wrote it (manifest.json)."""
    cfg_yaml = OmegaConf.to_yaml(job.cfg, resolve=True)
    return {"world_size": job.env.world_size, "global_batch_size": job.spec.global_batch_size,
            "seed": job.cfg.seed, "num_samples": job.dataset.num_samples,
            "config_sha256": hashlib.sha256(cfg_yaml.encode()).hexdigest(),
            "dgxtrain_version": __version__, "torch_version": torch.__version__}


def save_checkpoint(job: Job, state: TrainState, tracker: NullTracker) -> bool:
    job.watchdog.arm(job.cfg.dist.init_timeout_s)
    return checkpoint.save(
        job.run_dir, state.step, job.env,
        checkpoint.contents(job.model, job.optimizer, job.scheduler, state.state_dict(),
                            tracker.state_dict()),
        checkpoint_meta(job), job.cfg.checkpoint.keep_last, job.faults.before_write)


def resume(job: Job, state: TrainState) -> dict[str, Any]:
    """Continue from the newest complete checkpoint (or as checkpoint.resume says)."""
    found = checkpoint.choose(job.cfg.checkpoint.resume, job.run_dir, job.env)
    if found is None:
        return {}
    saved = checkpoint.restore(found, job.env, checkpoint_meta(job), job.model,
                               job.optimizer, job.scheduler)
    state.load_state_dict({**saved["train_state"], "stop_reason": ""})
    return saved["tracker"]


def train(cfg: DictConfig, run_dir: Path | None = None) -> dict[str, Any]:
    """Run one training job as configured; returns the summary rank 0 writes."""
    # Validate before picking a GPU or joining a process group: a bad setting costs nothing.
    spec = validate(cfg, world_size_from_env(), torch.cuda.is_available())
    env = DistEnv.from_env(cfg.device)
    if run_dir is None:
        from hydra.core.hydra_config import HydraConfig
        run_dir = Path(HydraConfig.get().runtime.output_dir)
    logs.setup_logging(env.rank, run_dir)
    watchdog = Watchdog(run_dir, env.rank)
    watchdog.arm(cfg.dist.init_timeout_s)
    if env.device.type == "cuda":
        torch.cuda.set_device(env.device)  # before any allocation: one CUDA context per GPU
    job = build_job(cfg, env, spec, run_dir, watchdog)  # bad arguments fail before the group
    if cfg.trainer.warmup_steps >= cfg.trainer.max_steps:
        log.warning("trainer.warmup_steps=%d >= trainer.max_steps=%d: the LR never leaves "
                    "warm-up", cfg.trainer.warmup_steps, cfg.trainer.max_steps)
    # Collectives get more time than the watchdog, so that a hang ends with stacks written.
    with process_group(env, timeout_s=cfg.dist.init_timeout_s + 60):
        try:
            derived = describe(job)
            state = TrainState()
            tracker_state = resume(job, state)
            job.wrapped = distribute(job)
            tracker = build_tracker(cfg, env.is_main, run_dir)
            tracker.load_state_dict(tracker_state)
            tracker.log_config(cfg, derived)
            log.info("run dir %s", run_dir)
            log.info("start: %s", " | ".join(
                f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                for k, v in derived.items()))
            summary = run_loop(job, state, tracker)
            tracker.save_model(job.model)
            tracker.finish(summary)
        finally:
            # DDP's reducer holds the process group. Freed later, its destructor would join
            # gloo's threads with the GIL held and can deadlock; free it while the group lives.
            job.wrapped = None
            gc.collect()
            checkpoint.finish_pruning()
    watchdog.close()
    if state.stop_reason in ("non_finite", "too_many_skips"):
        raise FloatingPointError(
            f"non-finite loss or gradient at step {state.step + 1}, update not applied; fix: "
            "lower optim.lr, set trainer.grad_clip, or trainer.nonfinite=skip"
            if state.stop_reason == "non_finite" else
            f"{state.consecutive_skips} non-finite steps in a row (trainer.max_skipped="
            f"{cfg.trainer.max_skipped}), up to step {state.step}; fix: lower optim.lr or set "
            "trainer.grad_clip")
    return summary


def run_loop(job: Job, state: TrainState, tracker: NullTracker) -> dict[str, Any]:
    """Step until done; log, evaluate, checkpoint and stop on schedule. Returns the summary."""
    t, env, spec = job.cfg.trainer, job.env, job.spec
    every = job.cfg.checkpoint.every_steps
    meter = StepMeter(spec.global_batch_size, state.step)
    first_step, last = state.step, {}
    evaluate_now = functools.partial(evaluate, job.model, job.dataset, env, t.eval_batch_size,
                                     job.autocast)
    while state.step < t.max_steps and not state.stop_reason:
        step = state.step + 1
        job.faults.before_step(step)
        # The first step may compile or warm up allocators: it gets the start-up budget.
        job.watchdog.arm(job.cfg.dist.timeout_s if step > first_step + 1
                         else job.cfg.dist.init_timeout_s)
        lr = job.optimizer.param_groups[0]["lr"]
        loss, grad_norm, applied = train_step(
            job.wrapped, job.optimizer, job.scheduler, job.dataset, job.schedule(state.step),
            job.autocast, t.grad_clip, functools.partial(job.faults.poison, step=step))
        if not applied:
            state.skipped_steps += 1
            state.consecutive_skips += 1
            log.warning("step %d: non-finite loss or gradient, update skipped", step)
            if t.nonfinite == "error":
                state.stop_reason = "non_finite"  # the step is not counted: nothing changed
                break
            if state.consecutive_skips >= t.max_skipped:
                state.stop_reason = "too_many_skips"
        else:
            state.consecutive_skips = 0
        state.step = step
        state.samples_seen += spec.global_batch_size
        done = state.step == t.max_steps
        if state.step % t.log_every == 0 or done:
            stats = all_reduce_(torch.stack([loss, grad_norm.float()]), mean=True).tolist()
            last = {"loss": stats[0], "lr": lr, "grad_norm": stats[1],
                    "skipped_steps": state.skipped_steps, **meter.tick(state.step)}
            tracker.log_metrics(state.step, last)
        if t.eval_every and state.step % t.eval_every == 0 and not done:
            job.watchdog.arm(job.cfg.dist.init_timeout_s)
            tracker.log_metrics(state.step, evaluate_now())
        if (done or (every and state.step % every == 0)) and not state.stop_reason:
            save_checkpoint(job, state, tracker)
    job.watchdog.arm(job.cfg.dist.init_timeout_s)
    state.stop_reason = state.stop_reason or "max_steps"
    train_time = meter.elapsed()
    final_eval = evaluate_now()
    tracker.log_metrics(state.step, final_eval)
    return {
        "world_size": env.world_size, "global_batch_size": spec.global_batch_size,
        "micro_batch_size": spec.micro_batch_size, "grad_accum_steps": spec.grad_accum_steps,
        "steps": state.step, "samples_seen": state.samples_seen,
        "skipped_steps": state.skipped_steps, "resumed_from_step": first_step,
        "stop_reason": state.stop_reason, "final_loss": last.get("loss"), **final_eval,
        "samples_per_s": (state.samples_seen - first_step * spec.global_batch_size) / train_time
        if train_time > 0 else 0.0,
        "param_sha256": param_sha256(job.model), "wall_time_s": meter.elapsed(),
    }
