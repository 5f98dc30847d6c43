"""What the lab's benchmarks share: the world they run in, the job train() would build, the
trainer's own loop as train() runs it, and timing every rank alike."""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import torch
from omegaconf import OmegaConf

from dgxtrain.config import compose, load
from dgxtrain.distributed.collectives import all_reduce_, process_group
from dgxtrain.distributed.env import DistEnv
from dgxtrain.distributed.watchdog import Watchdog
from dgxtrain.loop.build import Job, build_job, describe, distribute
from dgxtrain.loop.loop import Loop
from dgxtrain.loop.state import TrainState
from dgxtrain.loop.stopping import Stopping
from dgxtrain.observe.perf import NULL_CLOCK, PhaseClock
from dgxtrain.observe.trackers import NullTracker
from dgxtrain.tasks import Feed
from dgxtrain.tools import measure

# Benchmarks run in rounds of their own: no end in sight, and nothing saved or evaluated in
# between (those are the same I/O for every loop, and the plain loops do none).
ENDLESS = ["trainer.max_steps=1000000", "checkpoint.every_steps=0", "trainer.eval_every=0",
           "logger=none"]


@contextlib.contextmanager
def tool_world(env: DistEnv, prefix: str) -> Iterator[tuple[Path, Watchdog]]:
    """A benchmark's run: its GPU, a scratch dir, the hang watchdog, and the process group."""
    if env.device.type == "cuda":
        torch.cuda.set_device(env.device)
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp, \
            Watchdog(Path(tmp), env.rank) as watchdog, process_group(env, timeout_s=1800):
        yield Path(tmp), watchdog


def build(overrides: list[str], micro_batch: int | None, env: DistEnv, work: Path,
          watchdog: Watchdog) -> Job:
    """The job train() would build for these overrides, with `micro_batch` samples per rank
    and step (None: as the overrides say), endless."""
    batch = ([f"trainer.micro_batch_size={micro_batch}",
              f"trainer.global_batch_size={micro_batch * env.world_size}"] if micro_batch
             else [])
    cfg = compose([*overrides, *batch, *ENDLESS])
    typed, spec = load(cfg, env.world_size, torch.cuda.is_available())
    return build_job(typed, OmegaConf.to_container(cfg, resolve=True), env, spec, work,
                     watchdog)


def feed(job: Job) -> Feed:
    """The task's batches from step 0 on: the same for every loop of a benchmark."""
    s = job.spec
    return job.task.train_feed(job.cfg.seed, s.global_batch_size, job.env.rank,
                               job.env.world_size, s.micro_batch_size, 0,
                               job.cfg.trainer.max_steps, job.env.device)


class Steps(Protocol):
    """A loop a benchmark times: each call runs the next `n` steps."""

    def run(self, n: int) -> None: ...


class PlainLoop:
    """A plain loop's steps in order: run(n) calls step(s) for its next n steps."""

    at = 0

    def step(self, step: int, clock: PhaseClock = NULL_CLOCK) -> None:
        raise NotImplementedError

    def run(self, n: int) -> None:
        for _ in range(n):
            self.step(self.at)
            self.at += 1


class Rows(NullTracker):
    """A tracker that keeps the rows in memory: no file or W&B work in the timed steps."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def log_metrics(self, step: int, metrics: dict[str, Any]) -> None:
        self.rows.append(metrics)


class TrainerLoop:
    """dgxtrain's loop (loop/loop.py) as train() runs it, every component included, on a
    job that build() made; its trackers keep the log rows in memory."""

    def __init__(self, job: Job, hosts: list[str]):
        derived = describe(job, hosts)
        job.wrapped = distribute(job, hosts)
        self.job, self.tracker = job, Rows()
        # Not entered: the benchmark installs no signal handlers, so it is not preempted.
        stopping = Stopping(job.cfg, job.env, job.run_dir)
        self.loop = Loop(job, TrainState(), feed(job), self.tracker, stopping, derived, hosts)
        self.model, self.ddp = job.model, job.wrapped

    def run(self, n: int) -> None:
        self.loop.run(until=self.loop.state.step + n)


def timed(loop: Steps, steps: int, device: torch.device) -> float:
    """Seconds for `steps` steps of every rank, from a common start to the slowest end."""
    measure.sync(device)
    all_reduce_(torch.zeros(1, device=device))  # a common start
    started = time.perf_counter()
    loop.run(steps)
    measure.sync(device)
    elapsed = torch.tensor([time.perf_counter() - started], device=device, dtype=torch.float64)
    return all_reduce_(elapsed, op="max").item()


def max_param_diff(a: torch.nn.Module, b: torch.nn.Module) -> tuple[float, float]:
    """(largest absolute difference, largest norm of the difference relative to the norm)."""
    worst_abs, worst_rel = 0.0, 0.0
    for p, q in zip(a.parameters(), b.parameters()):
        d = p.detach().float() - q.detach().float()
        worst_abs = max(worst_abs, d.abs().max().item())
        worst_rel = max(worst_rel, (d.norm() / q.detach().float().norm().clamp_min(1e-30)).item())
    return worst_abs, worst_rel


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{os.cpu_count()}-core {measure.cpu_model()}"
