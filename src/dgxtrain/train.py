"""train(cfg): the run's story. train_step(): one optimizer step over this rank's micro-batches.

The loop only schedules (log, eval, stop); computing lives in train_step and evaluate.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
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
from omegaconf import DictConfig
from torch.nn.parallel import DistributedDataParallel as DDP

from dgxtrain import logs
from dgxtrain.config import ConfigError, RunSpec, validate
from dgxtrain.data import GlobalBatchSchedule
from dgxtrain.dist import DistEnv, all_agree, all_reduce_, process_group, world_size_from_env
from dgxtrain.evaluate import evaluate
from dgxtrain.metrics import StepMeter, count_parameters, flops_per_sample, param_sha256
from dgxtrain.optim import build_optimizer, build_scheduler
from dgxtrain.tracking import NullTracker, build_tracker

log = logging.getLogger(__name__)


@dataclass
class TrainState:
    """The loop's mutable counters; everything else is derived from the config."""

    step: int = 0
    samples_seen: int = 0
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
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward/backward each micro-batch, then clip and step. Returns device tensors
    (loss, grad norm) so that nothing here waits for the GPU."""
    accum = micro_batches.shape[0]
    loss_sum = torch.zeros((), device=micro_batches.device)
    for i, idx in enumerate(micro_batches):
        x, y = dataset.sample(idx)
        # Only the last micro-batch's backward all-reduces: the sum arrives once.
        with grad_sync(model, i == accum - 1):
            with autocast():
                pred = model(x)
            # Mean over the micro-batch / accum, averaged over ranks by DDP = global mean.
            loss = F.mse_loss(pred.float().reshape(y.shape), y) / accum
            loss.backward()
        loss_sum += loss.detach()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(),
                                               grad_clip if grad_clip > 0 else math.inf)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum, grad_norm


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


def build_job(cfg: DictConfig, env: DistEnv, spec: RunSpec) -> Job:
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
               make_autocast(env.device, t.precision))


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


def train(cfg: DictConfig, run_dir: Path | None = None) -> dict[str, Any]:
    """Run one training job as configured; returns the summary rank 0 writes."""
    # Validate before picking a GPU or joining a process group: a bad setting costs nothing.
    spec = validate(cfg, world_size_from_env(), torch.cuda.is_available())
    env = DistEnv.from_env(cfg.device)
    if run_dir is None:
        from hydra.core.hydra_config import HydraConfig
        run_dir = Path(HydraConfig.get().runtime.output_dir)
    logs.setup_logging(env.rank, run_dir)
    if env.device.type == "cuda":
        torch.cuda.set_device(env.device)  # before any allocation: one CUDA context per GPU
    job = build_job(cfg, env, spec)  # bad constructor arguments fail before the group starts
    if cfg.trainer.warmup_steps >= cfg.trainer.max_steps:
        log.warning("trainer.warmup_steps=%d >= trainer.max_steps=%d: the LR never leaves "
                    "warm-up", cfg.trainer.warmup_steps, cfg.trainer.max_steps)
    with process_group(env):
        try:
            derived = describe(job)
            job.wrapped = distribute(job)
            tracker = build_tracker(cfg, env.is_main, run_dir)
            tracker.log_config(cfg, derived)
            log.info("run dir %s", run_dir)
            log.info("start: %s", " | ".join(
                f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                for k, v in derived.items()))
            state = TrainState()
            summary = run_loop(job, state, tracker)
            tracker.save_model(job.model)
            tracker.finish(summary)
        finally:
            # DDP's reducer holds the process group. Freed later, its destructor would join
            # gloo's threads with the GIL held and can deadlock; free it while the group lives.
            job.wrapped = None
            gc.collect()
    if state.stop_reason == "non_finite_loss":
        raise FloatingPointError(f"non-finite loss at step {state.step}; fix: lower optim.lr "
                                 "or set trainer.grad_clip")
    return summary


def run_loop(job: Job, state: TrainState, tracker: NullTracker) -> dict[str, Any]:
    """Step until done; log, evaluate and stop on schedule. Returns the summary."""
    t, env, spec = job.cfg.trainer, job.env, job.spec
    meter = StepMeter(spec.global_batch_size, state.step)
    last: dict[str, float] = {}
    evaluate_now = functools.partial(evaluate, job.model, job.dataset, env, t.eval_batch_size,
                                     job.autocast)
    while state.step < t.max_steps and not state.stop_reason:
        lr = job.optimizer.param_groups[0]["lr"]
        loss, grad_norm = train_step(job.wrapped, job.optimizer, job.scheduler, job.dataset,
                                     job.schedule(state.step), job.autocast, t.grad_clip)
        state.step += 1
        state.samples_seen += spec.global_batch_size
        done = state.step == t.max_steps
        if state.step % t.log_every == 0 or done:
            # The only host-device sync of a step, and only on log steps.
            stats = all_reduce_(torch.stack([loss, grad_norm.float()]), mean=True).tolist()
            last = {"loss": stats[0], "lr": lr, "grad_norm": stats[1],
                    **meter.tick(state.step)}
            tracker.log_metrics(state.step, last)
            if not math.isfinite(last["loss"]):
                state.stop_reason = "non_finite_loss"
        if t.eval_every and state.step % t.eval_every == 0 and not done:
            tracker.log_metrics(state.step, evaluate_now())
    state.stop_reason = state.stop_reason or "max_steps"
    train_time = meter.elapsed()
    final_eval = evaluate_now()
    tracker.log_metrics(state.step, final_eval)
    return {
        "world_size": env.world_size, "global_batch_size": spec.global_batch_size,
        "micro_batch_size": spec.micro_batch_size, "grad_accum_steps": spec.grad_accum_steps,
        "steps": state.step, "samples_seen": state.samples_seen,
        "stop_reason": state.stop_reason, "final_loss": last.get("loss"), **final_eval,
        "samples_per_s": state.samples_seen / train_time if train_time > 0 else 0.0,
        "param_sha256": param_sha256(job.model), "wall_time_s": meter.elapsed(),
    }
