"""`torchrun ... -m bench.train_bench [--quick] [overrides]`: the trainer's loop, as users run
it, against a tuned plain DDP loop doing the same maths, side by side in one run; and how
close the trainer gets to the hardware.

Runs as one process or under torchrun / srun (one rank per device), from the repository's
root. In one invocation:
  - the trainer: loop/loop.py's Loop as train() builds and runs it (the step, the stop
    vote, the guard's reads, the log rows, the watchdog, the fault hooks), with trackers
    that keep the rows in memory; the same with the opt-in shared-memory hook (CPU ranks);
    a reference loop: a plain DistributedDataParallel loop tuned as a user would tune it
    (fused optimizer, gradient_as_bucket_view, static_graph, the same bucket size) doing
    the same maths (model, data, batch, optimizer, schedule, clipping), twice, built alike:
    the reference is the two copies' mean, and their ratio is the noise of the comparison;
    and the same step as Lightning Fabric and Accelerate users write it (peers.py);
    interleaved in rounds, in an order shuffled each round, so drift on a shared machine
    hits all of them; medians of the rounds, and the median of each round's ratio to the
    reference;
  - their parameters after the same steps: equal within 1e-5 in fp32;
  - FLOP/s (counted by torch.utils.flop_counter) against a matmul peak measured here;
  - all-reduce algbw/busbw over message sizes (nccl-tests definitions);
  - the share of a step spent on data, forward+backward (and in it the wait for the other
    ranks) and the optimizer: the trainer's from its own log rows, the plain loops' timed
    alike on a few steps per round;
  - peak memory for data.num_samples 1e3 vs 1e9, and launch-to-first-step, of the real CLI.
Writes JSON (--json), a PNG (--png), and a table on stdout (rank 0).
"""

from __future__ import annotations

import argparse
import logging
import math
import random
import socket
import statistics
import sys
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from bench.common import (
    PlainLoop,
    Steps,
    TrainerLoop,
    build,
    device_name,
    feed,
    max_param_diff,
    timed,
    tool_world,
)
from bench.peers import peer_loops
from bench.report import memory_and_startup, plot, table
from dgxtrain.distributed import ddp
from dgxtrain.distributed.collectives import gather_objects
from dgxtrain.distributed.env import DistEnv, cores_per_rank
from dgxtrain.distributed.watchdog import Watchdog
from dgxtrain.loop.build import Job, make_autocast
from dgxtrain.loop.optim import build_optimizer, build_scheduler
from dgxtrain.observe import logs
from dgxtrain.observe.model_stats import flops_per_sample
from dgxtrain.observe.peak import measured_matmul_tflops, peak_tflops
from dgxtrain.observe.perf import NULL_CLOCK, PhaseClock
from dgxtrain.tools import measure

log = logging.getLogger("bench.train_bench")
# The standard workload (docs/performance.md): an MLP 256 -> 3 x 1024 GELU -> 1, AdamW, fp32,
# 256 samples per rank and step.
STANDARD = ["data.dim=256", "model=mlp", "model.hidden_dim=1024", "model.num_layers=3",
            "optim=adamw", "trainer.precision=fp32", "logger=none"]
# A small model; log steps often enough that a few steps give the trainer's phases.
QUICK = ["data.dim=32", "model.hidden_dim=64", "model.num_layers=2", "trainer.log_every=5"]


class Reference(PlainLoop):
    """A plain DDP loop as a user tunes it, on the trainer's data: fused optimizer, gradients
    as bucket views, static graph, the trainer's bucket size; clipping as the trainer's."""

    def __init__(self, job: Job):
        cfg, env = job.cfg, job.env
        torch.manual_seed(cfg.seed)  # the trainer's initial weights (build_job seeds alike)
        self.model = job.task.build_model().to(env.device)
        self.ddp = (DDP(self.model, device_ids=[env.device.index] if env.device.type == "cuda"
                        else None, bucket_cap_mb=cfg.dist.bucket_cap_mb,
                        gradient_as_bucket_view=True, static_graph=True)
                    if env.launcher != "single" else self.model)
        self.optimizer = build_optimizer(cfg.optim, self.model)
        t = cfg.trainer
        self.scheduler = build_scheduler(self.optimizer, t.warmup_steps, t.max_steps,
                                         t.min_lr_ratio)
        self.job, self.autocast = job, make_autocast(env.device, t.precision)
        self.feed = feed(job)

    def step(self, step: int, clock: PhaseClock = NULL_CLOCK) -> None:
        x, y = self.feed(step)[0]
        clock.mark("data")
        with self.autocast():
            pred = self.ddp(x)
        torch.nn.functional.mse_loss(pred.float(), y).backward()
        clock.mark("fwd_bwd")
        torch.nn.utils.clip_grad_norm_(self.model.parameters(),
                                       self.job.cfg.trainer.grad_clip or math.inf)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        clock.mark("optim")


def plain_phases(loop: PlainLoop, steps: int, device: torch.device) -> dict[str, float]:
    """Mean seconds per step in each phase of a plain loop, timed as the trainer times its
    log steps (PhaseClock); runs one step more. comm, part of fwd_bwd: the wait at the
    step's start and the wait DDP measured after the backward's compute, which DDP files at
    the next forward (step i's is read after step i + 1)."""
    totals = {"data": 0.0, "fwd_bwd": 0.0, "comm": 0.0, "optim": 0.0}
    sampling = getattr(loop.ddp, "_set_ddp_runtime_logging_sample_rate", lambda rate: None)
    sampling(1)  # DDP times every step's all-reduce (on GPUs, with a sync per step)
    for i in range(steps + 1):
        clock = PhaseClock(device)
        loop.step(loop.at, clock)
        loop.at += 1
        if i < steps:
            for name in ("data", "fwd_bwd", "optim"):
                totals[name] += clock.seconds[name]
            totals["comm"] += clock.lag_wait_s
        if i >= 1:  # the all-reduce wait of step i - 1
            totals["comm"] += ddp.comm_wait_s(loop.ddp)
    sampling(100)  # DDP's default again for the timed steps: one step in 100
    return {k: v / steps for k, v in totals.items()}


def trainer_phases(loop: TrainerLoop) -> dict[str, float]:
    """The trainer's phases as its own log rows report them (medians of the rows)."""
    rows = loop.tracker.rows
    return {name: statistics.median(r[f"perf/{key}"] for r in rows) for name, key in
            (("data", "data_s"), ("fwd_bwd", "fwd_bwd_s"), ("comm", "comm_wait_s"),
             ("optim", "optim_s"))}


def run(args: argparse.Namespace, env: DistEnv, work: Path,
        watchdog: Watchdog) -> dict[str, Any]:
    overrides = STANDARD + (QUICK if args.quick else []) + args.overrides
    hosts = gather_objects(socket.gethostname())
    job = build(overrides, args.micro_batch, env, work, watchdog)
    cfg = job.cfg
    if args.steps % cfg.trainer.log_every:
        # A round holding a log step more or less than another would skew the medians.
        raise SystemExit(f"--steps {args.steps} is not a multiple of trainer.log_every="
                         f"{cfg.trainer.log_every}: every round must hold as many log steps; "
                         f"fix: --steps {cfg.trainer.log_every}")
    torch.set_num_threads(cfg.dist.threads_per_rank or cores_per_rank())  # as train() does
    per_sample = flops_per_sample(job.model, job.task.example()[0].to(env.device))
    # reference_2, built alike, is the noise control: how far two identical loops land apart
    # side by side in this run.
    loops: dict[str, Steps] = {"trainer": TrainerLoop(job, hosts), "reference": Reference(job),
                               "reference_2": Reference(job)}
    peers, left_out = peer_loops(job) if args.peers else ({}, {"peers": "--no-peers"})
    loops.update(peers)
    if env.device.type == "cpu" and env.world_size > 1 and cfg.dist.comm_hook == "auto":
        # The opt-in shared-memory hook, on an identical job of its own.
        shm = build(overrides + ["dist.comm_hook=shm"], args.micro_batch, env, work, watchdog)
        loops["trainer_shm"] = TrainerLoop(shm, hosts)
    for loop in loops.values():  # warm-up: allocators, kernels, torch.compile
        timed(loop, args.warmup, env.device)
    seconds: dict[str, list[float]] = {name: [] for name in loops}
    # The plain loops' phases are timed in every round, after its timed steps: under the
    # same drift. The trainers run as many steps untimed: every loop stays at one step.
    phase_rounds: dict[str, list[dict[str, float]]] = {name: [] for name in loops}
    peaks = []  # the matmul peak, measured in every round: a shared machine drifts
    for r in range(args.rounds):
        # Shuffled by the round's number (alike on every rank): each loop follows each other
        # in some rounds, so what one leaves behind (caches, threads) hits all of them.
        order = random.Random(r).sample(list(loops), len(loops))
        for name in order:
            loop = loops[name]
            seconds[name].append(timed(loop, args.steps, env.device))
            if isinstance(loop, PlainLoop):
                phase_rounds[name].append(plain_phases(loop, args.phase_steps, env.device))
            else:
                loop.run(args.phase_steps + 1)
        peaks.append(matmul_peak(env.device, cfg.trainer.precision))
    step = args.warmup + args.rounds * (args.steps + args.phase_steps + 1)
    phase_s = {name: trainer_phases(loop) if isinstance(loop, TrainerLoop) else
               {k: statistics.median(p[k] for p in phase_rounds[name]) for k in
                phase_rounds[name][0]} for name, loop in loops.items()}
    # Every loop's weights against the reference's, after the same steps.
    diff_abs, diff_rel = max(max_param_diff(lp.model, loops["reference"].model)
                             for n, lp in loops.items() if n != "reference")
    ranks = gather_objects({"rank": env.rank, "host": socket.gethostname(),
                            "threads": torch.get_num_threads(),
                            "peak_tflops": statistics.median(peaks)})
    top = 2**22 if args.quick else (2**30 if env.device.type == "cuda" else 2**26)
    allreduce = (measure.allreduce_bandwidth(env.device,
                                             measure.message_sizes(top, smallest=2**12))
                 if env.world_size > 1 else [])
    spec = job.spec
    batch = spec.global_batch_size
    result: dict[str, Any] = {
        "workload": {"overrides": overrides, "world_size": env.world_size,
                     "micro_batch_per_rank": spec.micro_batch_size, "global_batch": batch,
                     "device": str(env.device), "device_name": device_name(env.device),
                     "backend": env.backend, "loops": list(loops),
                     "comm_hook": cfg.dist.comm_hook,
                     "precision": cfg.trainer.precision, "compile": cfg.trainer.compile,
                     "torch": torch.__version__, "threads_per_rank": torch.get_num_threads(),
                     "steps_per_round": args.steps, "rounds": args.rounds,
                     "flops_per_sample": per_sample, "loops_left_out": left_out},
        "loops": {}, "ranks": ranks, "allreduce": allreduce,
        "agreement": {"steps": step, "max_abs_diff": diff_abs, "max_rel_diff": diff_rel,
                      "tolerance": 1e-5, "equal": diff_abs <= 1e-5},
    }
    peak = statistics.median(r["peak_tflops"] for r in ranks)
    for name, secs in seconds.items():
        per_s = [args.steps * batch / s for s in secs]
        median = statistics.median(per_s)
        tflops = (per_sample or 0.0) * median / env.world_size / 1e12  # per device
        ph = phase_s[name]
        total = ph["data"] + ph["fwd_bwd"] + ph["optim"]
        result["loops"][name] = {
            "samples_per_s": per_s, "median_samples_per_s": median,
            "step_time_s": batch / median, "tflops_per_device": tflops,
            "fraction_of_matmul_peak": tflops / peak if peak else None,
            # comm, the wait for the other ranks, is part of fwd_bwd (and the step's start).
            "phase_s": ph, "phase_share": {k: ph[k] / total for k in ("data", "fwd_bwd",
                                                                       "optim")},
            "comm_share": ph["comm"] / total}
    loops_out = result["loops"]
    t, a, b = (loops_out[n]["samples_per_s"] for n in ("trainer", "reference", "reference_2"))
    # The reference is both copies: each round's mean. Each round's loops ran close together,
    # so a round's ratio is free of the drift between rounds: the median of those ratios.
    reference = [(x + y) / 2 for x, y in zip(a, b)]
    result["reference_samples_per_s"] = reference
    result["speedup"] = statistics.median(t) / statistics.median(reference)
    result["paired_speedup"] = paired(t, reference)
    # How far two identical loops land apart side by side in this run.
    result["noise"] = {"speedup": statistics.median(b) / statistics.median(a),
                       "paired_speedup": paired(b, a)}
    # The trainer's throughput over each peer's: above 1, the trainer is faster.
    result["trainer_vs"] = {name: statistics.median(t) / loops_out[name][
        "median_samples_per_s"] for name in peers}
    if "trainer_shm" in loops_out:
        result["speedup_shm"] = (loops_out["trainer_shm"]["median_samples_per_s"]
                                 / statistics.median(reference))
    result["matmul_peak_tflops_per_device"] = peak
    sheet, source = peak_tflops(env.device, cfg.trainer.precision)
    if env.device.type == "cuda" and "data sheet" in source:
        result["mfu_vs_data_sheet"] = t["tflops_per_device"] / sheet
        result["data_sheet_peak_tflops"] = sheet
    return result


def paired(loop: list[float], ref: list[float]) -> float:
    """The median over rounds of a loop's samples/s over the reference's in that round."""
    return statistics.median(x / y for x, y in zip(loop, ref))


def matmul_peak(device: torch.device, precision: str) -> float:
    """The best square-matmul rate over a few sizes, every rank at once (as in training):
    a peak, not one size's luck."""
    sizes = (4096, 8192) if device.type == "cuda" else (256, 384, 512, 1024)
    return max(measured_matmul_tflops(device, precision, 0.1, n) for n in sizes)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.train_bench", description=__doc__.split(
        "\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="Hydra overrides on top of the standard "
                   "workload, e.g. model.hidden_dim=8192 trainer.precision=bf16")
    p.add_argument("--quick", action="store_true", help="a small model and few steps (CI)")
    p.add_argument("--micro-batch", type=int, default=256, help="samples per rank and step")
    p.add_argument("--rounds", type=int, help="interleaved rounds (default 41; quick 2)")
    p.add_argument("--steps", type=int, help="steps per loop and round, a multiple of "
                   "trainer.log_every (default 10; quick 5)")
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--png", type=Path, help="plot them here (needs matplotlib)")
    p.add_argument("--no-peers", dest="peers", action="store_false",
                   help="leave out the Lightning Fabric and Accelerate loops")
    p.add_argument("--no-memory", action="store_true",
                   help="skip the peak-memory and launch-time runs of the CLI")
    args = p.parse_args(argv)
    args.rounds = args.rounds or (2 if args.quick else 41)
    args.steps = args.steps or (5 if args.quick else 10)
    args.warmup, args.phase_steps = (2, 2) if args.quick else (5, 3)
    for name in ("rounds", "steps", "micro_batch"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    env = DistEnv.from_env("auto")
    logs.setup_logging(env.rank)
    with tool_world(env, "dgxtrain-bench-") as (tmp, watchdog):
        result = run(args, env, tmp, watchdog)
    if not env.is_main:
        return 0
    if not args.no_memory:
        result["memory_and_startup"] = memory_and_startup(
            STANDARD + (QUICK if args.quick else []) + args.overrides, args.micro_batch,
            steps=10 if args.quick else 30)
    sys.stdout.write(table(result))
    measure.write_json(args.json, result)
    if args.png:
        plot(result, args.png)
    # Only fp32 maths must agree: bf16 autocast or bf16 gradients round differently.
    w = result["workload"]
    ok = result["agreement"]["equal"] or w["precision"] != "fp32" or w["comm_hook"] == "bf16"
    return 0 if ok and math.isfinite(result["speedup"]) else 1


if __name__ == "__main__":
    sys.exit(main())
