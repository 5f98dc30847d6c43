"""train(cfg): the run's story. The loop (loop.py) steps; its components log, evaluate,
save and stop; what is trained is the task's (tasks/)."""

from __future__ import annotations

import logging
import socket
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from dgxtrain import checkpoint
from dgxtrain.config import Config, RunSpec, load
from dgxtrain.distributed import ddp
from dgxtrain.distributed.collectives import (
    arrive,
    broadcast_object,
    gather_objects,
    process_group,
    rendezvous,
)
from dgxtrain.distributed.env import DistEnv, cores_per_rank, world_size_from_env
from dgxtrain.distributed.preempt import EXIT_REQUEUE
from dgxtrain.distributed.watchdog import Watchdog
from dgxtrain.errors import ConfigError
from dgxtrain.loop.build import Job, build_job, describe, distribute
from dgxtrain.loop.guard import halt_error
from dgxtrain.loop.loop import Loop
from dgxtrain.loop.run_dir import holding
from dgxtrain.loop.saving import finished, resume
from dgxtrain.loop.state import StopReason, TrainState
from dgxtrain.loop.stopping import Stopping
from dgxtrain.observe import logs
from dgxtrain.observe.trackers import build_tracker, redact, run_identity

log = logging.getLogger(__name__)


def train(cfg: DictConfig, run_dir: Path | None = None) -> dict[str, Any]:
    """Run one training job as configured; returns the summary rank 0 writes."""
    # Validate before picking a GPU or joining a process group: a bad setting costs nothing.
    config, spec = load(cfg, world_size_from_env(), torch.cuda.is_available())
    env = DistEnv.from_env(config.device)
    run_dir = run_dir or _hydra_run_dir()
    with holding(run_dir, env.is_main):  # one launch per run dir: before its log is touched
        return _train(cfg, config, spec, env, run_dir)


def _train(cfg: DictConfig, config: Config, spec: RunSpec, env: DistEnv,
           run_dir: Path) -> dict[str, Any]:
    """The run in `run_dir`, which this launch holds."""
    logs.setup_logging(env.rank, run_dir)
    stopping = Stopping(config, env, run_dir)
    with stopping, Watchdog(run_dir, env.rank) as watchdog:  # this order: see Watchdog
        watchdog.arm(config.dist.init_timeout_s)
        if env.device.type == "cuda":
            torch.cuda.set_device(env.device)  # before any allocation: one context per GPU
        # torchrun sets OMP_NUM_THREADS=1 for every rank: right for 8 GPUs, idle cores on CPU.
        torch.set_num_threads(config.dist.threads_per_rank or cores_per_rank())
        # On the launcher's store, whichever rank fails, the run's one line is told.
        with rendezvous(env, config.dist.rendezvous_timeout_s, run_dir) as board:
            job = build_job(config, OmegaConf.to_container(cfg, resolve=True), env, spec,
                            run_dir, watchdog)  # bad arguments fail here, before any wait
            arrive(board, env, config.dist.rendezvous_timeout_s)
            # Collectives get more time than the watchdog, so a hang ends with stacks written.
            with process_group(env, config.dist.init_timeout_s + 60, board):
                try:
                    state, summary = _run(job, stopping)
                finally:
                    # DDP's reducer holds the process group. Freed later, its destructor
                    # would join gloo's threads with the GIL held and can deadlock: let it go.
                    job.wrapped = None
                    checkpoint.finish_pruning()
                stopping.report(state)
    if state.stop_reason.failed:
        raise halt_error(state, config.trainer.max_skipped)
    stopping.exit_for_requeue()
    return summary


def _check_one_dataset(sizes: list[int], cfg: Config) -> None:
    """Every rank builds the sample order from its own len(): they must agree, or the ranks
    train on orders of their own (a per-node file listing). Raised alike on every rank."""
    other = next((r for r, n in enumerate(sizes) if n != sizes[0]), None)
    if other is None:
        return
    key, target = (("data.train", cfg.data.train.get("_target_")) if "train" in cfg.data
                   else ("data.num_samples", sizes[0]))
    raise ConfigError(key, target, f"has {sizes[0]} training samples on rank 0 and "
                      f"{sizes[other]} on rank {other}: the ranks would not train on one "
                      "sample order", "give every rank the same dataset (list files from a "
                      "shared, sorted manifest, not each node's own directory listing)")


def _run(job: Job, stopping: Stopping) -> tuple[TrainState, dict[str, Any]]:
    """Inside the process group: resume, distribute, loop, write the outputs."""
    cfg, env = job.cfg, job.env
    gathered = gather_objects((socket.gethostname(), job.task.num_samples))
    hosts = [host for host, _ in gathered]
    _check_one_dataset([n for _, n in gathered], cfg)
    state, saved = TrainState(), resume(job)
    if saved:
        state.load_state_dict(saved["train_state"])
        # Launched again once finished: nothing to train, evaluate or log (no W&B run).
        done = broadcast_object(finished(job.run_dir, state.step, cfg.trainer.max_steps)
                                if env.is_main else None)
        if done is not None:
            log.info("the run is already complete at step %d (%s); nothing to do: raise "
                     "trainer.max_steps to train on", state.step, job.run_dir / "summary.json")
            state.stop_reason = StopReason(done.get("stop_reason", "max_steps"))
            return state, done
        log.info("run dir %s: continuing from step %d (checkpoint.resume=never starts over; "
                 "run_name=<name> runs in a dir of its own)", job.run_dir, state.step)
    else:
        log.info("run dir %s: a new run (launched again with the same config, it continues "
                 "here)", job.run_dir)
    derived = describe(job, hosts)
    job.wrapped = distribute(job, hosts)
    # Started over: a new W&B run too. Resumed (under resume=never, this launch's own
    # checkpoint after a requeue): the same one.
    tracker = build_tracker(cfg, env.is_main, job.run_dir, fresh=not saved and
                            cfg.checkpoint.resume == "never",
                            **run_identity(cfg, job.run_dir, derived))
    tracker.load_state_dict(saved.get("tracker", {}))
    # No secret (an API key interpolated into the config, say) reaches a file or W&B.
    tracker.log_config(redact(job.resolved), redact(derived))
    log.info("a rank stuck for dist.timeout_s=%gs writes its stack to %s and ends the job",
             cfg.dist.timeout_s, job.run_dir / "stacks")
    log.info("start: %s", " | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                     for k, v in derived.items()))
    # Starts at the resumed step: a seek, no replay, nothing read ahead from before.
    with job.task.train_feed(cfg.seed, job.spec.global_batch_size, env.rank, env.world_size,
                             job.spec.micro_batch_size, state.step, cfg.trainer.max_steps,
                             env.device) as feed, ddp.naming_unused_parameters():
        loop = Loop(job, state, feed, tracker, stopping, derived, hosts)
        loop.run(until=cfg.trainer.max_steps)
        summary = loop.finish()
    if state.stop_reason is StopReason.REQUEUE:  # not the end of the run: no final outputs
        tracker.finish(summary, exit_code=EXIT_REQUEUE)
    else:
        tracker.save_model(job.model)
        tracker.finish(summary)
    return state, summary


def _hydra_run_dir() -> Path:
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir)
