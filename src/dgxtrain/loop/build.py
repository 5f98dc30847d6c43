"""A run's parts: built from the config, distributed (DDP, compile) and described."""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import platform
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate

from dgxtrain import tasks
from dgxtrain.config import Config, RunSpec
from dgxtrain.data.loader import to_device
from dgxtrain.distributed import ddp
from dgxtrain.distributed.collectives import all_agree
from dgxtrain.distributed.ddp import grad_sync
from dgxtrain.distributed.env import DistEnv
from dgxtrain.distributed.watchdog import Watchdog
from dgxtrain.errors import ConfigError, constructing
from dgxtrain.faults import Faults
from dgxtrain.loop.optim import build_optimizer, build_scheduler
from dgxtrain.observe.model_stats import count_parameters, flops_per_sample
from dgxtrain.observe.peak import peak_tflops
from dgxtrain.tasks import Task, TaskLoss
from dgxtrain.tasks.base import Batch

log = logging.getLogger(__name__)


def make_autocast(device: torch.device, precision: str) -> Callable:
    return functools.partial(torch.autocast, device.type, dtype=torch.bfloat16,
                             enabled=precision == "bf16")


def compile_or_eager(model: torch.nn.Module, task: Task, example: Batch, autocast: Callable,
                     device: torch.device) -> torch.nn.Module:
    """torch.compile, proven by one forward/backward; eager on every rank if any rank fails."""
    inputs, target = example
    try:
        compiled = torch.compile(model)
        # no_sync: a rank whose compile fails must not leave the others in an all-reduce.
        with grad_sync(compiled, False):
            with autocast():
                loss = task.loss.mean(task.forward(compiled, inputs, target), target)
            loss.backward()
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

    cfg: Config
    resolved: dict[str, Any]  # the composed config as plain values: logged, hashed, never read
    env: DistEnv
    spec: RunSpec
    task: Task
    model: torch.nn.Module  # unwrapped: evaluation, state_dict, parameter hash
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    autocast: Callable
    run_dir: Path
    faults: Faults
    watchdog: Watchdog
    wrapped: torch.nn.Module | None = None  # DDP and/or compiled: the training forward


def build_task(cfg: Config, device: torch.device, global_batch_size: int) -> Task:
    """The task with its loss and metrics; its data built (on `device` where it is made
    there) and checked against the batch."""
    with constructing("loss", cfg.loss):
        loss = TaskLoss(instantiate(cfg.loss), cfg.loss.get("_target_"))
    with constructing("data", cfg.data):
        task = tasks.build_task(cfg, loss, device)
    if task.num_samples < global_batch_size:
        raise ConfigError("trainer.global_batch_size", global_batch_size, f"is more than "
                          f"the {task.num_samples} training samples", "lower it to at most "
                          f"{task.num_samples}, or give more training data")
    return task


def build_model(cfg: Config, task: Task) -> torch.nn.Module:
    """The model with the run's initial weights, checked on the CPU against the task."""
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    with constructing("model", cfg.model):
        model = task.build_model()
    # On the CPU, before any GPU work: the model takes the data, the loss the output.
    task.check(model.eval())  # eval: no BatchNorm statistics move in the check
    return model.train()


def build_job(cfg: Config, resolved: dict[str, Any], env: DistEnv, spec: RunSpec,
              run_dir: Path, watchdog: Watchdog) -> Job:
    task = build_task(cfg, env.device, spec.global_batch_size)
    model = build_model(cfg, task).to(env.device)
    with constructing("optim", cfg.optim):
        optimizer = build_optimizer(cfg.optim, model)
    faults = Faults(cfg.fault, env.rank, run_dir)
    faults.attach(model)
    t = cfg.trainer
    if t.warmup_steps >= t.max_steps:
        log.warning("trainer.warmup_steps=%d >= trainer.max_steps=%d: the LR never leaves "
                    "warm-up", t.warmup_steps, t.max_steps)
    return Job(cfg, resolved, env, spec, task, model, optimizer,
               build_scheduler(optimizer, t.warmup_steps, t.max_steps, t.min_lr_ratio),
               make_autocast(env.device, t.precision), run_dir, faults, watchdog)


def distribute(job: Job, hosts: list[str]) -> torch.nn.Module:
    """DDP when launched (even at one rank: one code path), then torch.compile if asked."""
    env, wrapped = job.env, job.model
    if env.launcher != "single":
        # DDP broadcasts rank 0's weights at construction and buckets gradients so that
        # their all-reduce overlaps the rest of the backward pass.
        wrapped = ddp.wrap(wrapped, env, job.cfg.dist, hosts,
                           uses_no_sync=job.spec.grad_accum_steps > 1 or job.cfg.trainer.compile)
        # DDP times forward, backward and the gradient all-reduce on sampled iterations:
        # once per log interval, for the comm wait of CPU ranks (GPUs time theirs with
        # events: distributed/comm_timer.py) and the straggler metrics. A private API:
        # without it, comm_wait_s reads 0 (ddp.comm_wait_s) and the log says so.
        sample = getattr(wrapped, "_set_ddp_runtime_logging_sample_rate", None)
        if sample is not None and hasattr(wrapped, "_get_ddp_logging_data"):
            sample(job.cfg.trainer.log_every * job.spec.grad_accum_steps)
        else:
            log.info("this torch's DDP has no runtime logging: perf/comm_wait_s holds only "
                     "the wait at the start of log steps")
    if job.cfg.trainer.compile:
        example = to_device(job.task.example(job.spec.micro_batch_size), env.device)
        wrapped = compile_or_eager(wrapped, job.task, example, job.autocast, env.device)
    return wrapped


def describe(job: Job, hosts: list[str]) -> dict[str, Any]:
    """The derived values logged at start (and stored as derived.json). Before distribute()."""
    env, model = job.env, job.model
    inputs, target = to_device(job.task.example(), env.device)
    per_sample = flops_per_sample(model, inputs, len(target),
                                  **job.task.loss.model_kwargs(target))
    cuda = env.device.type == "cuda"
    # Only rank 0 reports MFU; on a CPU its peak is measured, which takes a moment.
    peak, source = (peak_tflops(env.device, job.cfg.trainer.precision) if env.is_main
                    else (0.0, ""))
    return {
        **job.task.describe(), **dataclasses.asdict(job.spec), "device": str(env.device),
        "backend": env.backend, "launcher": env.launcher, "parameters": count_parameters(model),
        "flops_per_step": per_sample * job.spec.global_batch_size if per_sample else None,
        "peak_tflops_per_device": peak, "peak_tflops_source": source,
        "device_name": (torch.cuda.get_device_name(env.device) if cuda
                        else platform.processor() or platform.machine()),
        "devices": env.world_size, "nodes": len(set(hosts)),
        "threads_per_rank": torch.get_num_threads(),
        "gpus_per_node": torch.cuda.device_count(),
        "torch": torch.__version__, "cuda": torch.version.cuda,
        "nccl": ".".join(map(str, torch.cuda.nccl.version())) if cuda else None,
        "python": platform.python_version(),
        "git_commit": _git_commit() if env.is_main else None,  # what rank 0 logs
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "slurm_nodelist": os.environ.get("SLURM_JOB_NODELIST"),
    }


def _git_commit() -> str | None:
    """The commit of the code that runs, with '-dirty' for uncommitted changes; None outside git."""
    repo = Path(__file__).resolve().parents[3]
    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "-uno"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
