"""`torchrun --standalone --nproc_per_node=N -m bench.scaling_check [overrides]`: the scaling
model (dgxtrain.scaling) checked against the step it predicts, in the world it runs in.

  1. one device's compute: dgxtrain's loop with a comm hook that sends nothing, its ranks
     meeting before every step (the cores or GPUs are as busy as in the DDP run);
  2. the all-reduce over the world at the step's bucket sizes, and of 4 bytes (latency);
  3. the DDP step predicted from 1 and 2 (scaling/model.py), and dgxtrain's own DDP step
     timed, in interleaved rounds: measured_step_s against predicted_step_s;
  4. the table from 1 to 1024 GPUs with that compute: bandwidth measured here up to one
     node, published DGX H100/H200 figures beyond (scaling/bandwidth.py).
Hydra overrides choose the model and batch, as for training (default: VALIDATION below).
"""

from __future__ import annotations

import argparse
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from bench.common import TrainerLoop, build, device_name, feed, timed, tool_world
from dgxtrain.distributed import ddp
from dgxtrain.distributed.collectives import all_reduce_, broadcast_object, gather_objects
from dgxtrain.distributed.comm_timer import CommTimer
from dgxtrain.distributed.env import DistEnv, cores_per_rank
from dgxtrain.distributed.watchdog import Watchdog
from dgxtrain.loop.build import Job
from dgxtrain.loop.optim import build_optimizer
from dgxtrain.observe import logs
from dgxtrain.scaling import bandwidth, model, workload
from dgxtrain.scaling.__main__ import render
from dgxtrain.tools import measure

# Wide enough that the all-reduce is a real share of the step on 2 CPU ranks: 3.7 M
# parameters, 14 MiB of gradients in one bucket.
VALIDATION = ["data.dim=512", "model=mlp", "model.hidden_dim=1024", "model.num_layers=4",
              "optim=adamw", "trainer.precision=fp32", "logger=none"]


class LocalStep:
    """The step with no communication: the job's model, copied, with its own optimizer."""

    def __init__(self, job: Job):
        cfg, env = job.cfg, job.env
        self.model = job.task.build_model().to(env.device)
        self.optimizer = build_optimizer(cfg.optim, self.model)
        self.autocast, self.device = job.autocast, env.device
        self.feed, self.clip = feed(job), cfg.trainer.grad_clip

    def phases(self, step: int) -> tuple[float, float, float]:
        x, y = self.feed(step)[0]
        t0 = time.perf_counter()
        with self.autocast():
            pred = self.model(x)
        loss = torch.nn.functional.mse_loss(pred.float(), y)
        t1 = _synced(self.device)
        loss.backward()
        t2 = _synced(self.device)
        if self.clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        t3 = _synced(self.device)
        return t1 - t0, t2 - t1, t3 - t2


def _synced(device: torch.device) -> float:
    measure.sync(device)
    return time.perf_counter()


def _no_comm(world, bucket):  # noqa: ANN001 (DDP checks a hook's annotations, if any)
    """A DDP comm hook that sends nothing but averages as DDP's own all-reduce does: the
    step as it is, less the transfer."""
    fut = torch.futures.Future()
    fut.set_result(bucket.buffer().div_(world))
    return fut


def hook_time(device: torch.device, nbytes: int, world: int, min_time_s: float = 0.2) -> dict:
    """One bucket's all-reduce (the sum; the step without it averages already). Every rank
    runs the same number of rounds; the slowest rank's time counts, as in the step."""
    buf = torch.ones(max(1, nbytes // 4), device=device)
    all_reduce_(buf)  # warm-up: connections, buffers
    rounds = broadcast_object(max(3, min(50, int(min_time_s / max(_timed(buf, device), 1e-6)))))
    t = statistics.median(_timed(buf, device) for _ in range(rounds))
    t = all_reduce_(torch.tensor([t], device=device, dtype=torch.float64), op="max").item()
    busbw = bandwidth.ring_factor(world) * buf.numel() * 4 / t / 1e9
    return {"bytes": buf.numel() * 4, "time_us": t * 1e6, "busbw_gbps": busbw}


def _timed(buf: torch.Tensor, device: torch.device) -> float:
    measure.sync(device)
    started = time.perf_counter()
    all_reduce_(buf)
    measure.sync(device)
    return time.perf_counter() - started


def meet_before_each_step(model: torch.nn.Module, device: torch.device) -> None:
    """The ranks meet at every forward, as DDP's all-reduce makes them meet: each step then
    lasts as long as its slowest rank's, which is what a world waits for."""
    flag = torch.zeros(1, device=device)

    def meet(module: torch.nn.Module, args: Any) -> None:
        all_reduce_(flag)

    model.register_forward_pre_hook(meet)


def measure_and_check(args: argparse.Namespace, env: DistEnv, work: Path,
                      watchdog: Watchdog) -> dict[str, Any]:
    hosts = gather_objects(socket.gethostname())
    jobs = [build(args.overrides, args.micro_batch, env, work, watchdog) for _ in range(2)]
    cfg = jobs[0].cfg
    if cfg.dist.comm_hook != "auto":
        raise SystemExit("bench.scaling_check: measure with dist.comm_hook=auto (the "
                         "all-reduce the model predicts)")
    torch.set_num_threads(cfg.dist.threads_per_rank or cores_per_rank())  # as train() does
    local = LocalStep(jobs[0])
    ddp_step, no_comm = TrainerLoop(jobs[0], hosts), TrainerLoop(jobs[1], hosts)
    timer = ddp.hook_state(no_comm.ddp, CommTimer)
    if timer is not None:  # GPUs: ddp.wrap registered its timed hook; it times nothing now
        timer.inner, timer.inner_state = _no_comm, env.world_size
    else:
        no_comm.ddp.register_comm_hook(env.world_size, _no_comm)
    meet_before_each_step(no_comm.ddp, env.device)
    sizes = workload.grad_bytes(jobs[0].model, cfg.dist.comm_hook)
    buckets = model.buckets(sizes, int(cfg.dist.bucket_cap_mb * model.MiB))
    for loop in (ddp_step, no_comm):  # warm-up: allocators, DDP's bucket rebuild
        timed(loop, 3, env.device)
    phases = [local.phases(s) for s in range(3, 3 + args.steps)]
    seconds: dict[str, list[float]] = {"ddp": [], "no_comm": []}
    for r in range(args.rounds):  # interleaved: both see the same drift of a shared machine
        for name, loop in (("ddp", ddp_step), ("no_comm", no_comm))[::1 if r % 2 else -1]:
            seconds[name].append(timed(loop, args.steps, env.device) / args.steps)
    rows = [hook_time(env.device, b, env.world_size) for b in sorted(set(buckets))]
    latency = hook_time(env.device, 4, env.world_size)["time_us"] * 1e-6
    # One device's step is the DDP step without its all-reduce, the slowest rank's in each
    # step (less the meeting's latency), in the proportions of the plain step's phases.
    shares = [statistics.median(p[i] for p in phases) for i in range(3)]
    alone = statistics.median(seconds["no_comm"]) - latency
    compute = model.Compute(*(alone * x / sum(shares) for x in shares))
    curve = bandwidth.measured(rows, env.world_size, latency)
    overlap = env.device.type == "cuda"
    predicted = model.predict(compute, buckets, env.world_size, curve, overlap)
    measured = statistics.median(seconds["ddp"])
    return {
        "workload": {"overrides": args.overrides, "world_size": env.world_size,
                     "device": str(env.device), "device_name": device_name(env.device),
                     "micro_batch_per_rank": jobs[0].spec.micro_batch_size,
                     "parameters": sum(p.numel() for p in jobs[0].model.parameters()),
                     "grad_bytes": sum(sizes), "bucket_bytes": buckets,
                     "comm_hook": cfg.dist.comm_hook, "overlap": overlap,
                     "rounds": args.rounds, "steps_per_round": args.steps},
        "compute": {"forward_s": compute.forward_s, "backward_s": compute.backward_s,
                    "optimizer_s": compute.optimizer_s, "step_s": compute.step_s,
                    "rounds_s": seconds["no_comm"]},
        "allreduce": rows, "latency_s": latency,
        "measured_step_s": measured, "measured_step_s_rounds": seconds["ddp"],
        "predicted_step_s": predicted.step_s, "predicted_comm_s": predicted.comm_s,
        "error": predicted.step_s / measured - 1,
        # On GPUs the curve measured here serves up to one node, published ones beyond; a
        # CPU world is its own curve all the way (nothing published fits it).
        "table": model.table(compute, buckets, model.GPUS, overlap, curve,
                             curve_max_gpus=8 if overlap else max(model.GPUS)),
    }


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.scaling_check", description=__doc__.split(
        "\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("overrides", nargs="*", help="Hydra overrides for the model and batch")
    p.add_argument("--micro-batch", type=int, default=256, help="samples per GPU and step")
    p.add_argument("--rounds", type=int, default=7, help="interleaved measuring rounds")
    p.add_argument("--steps", type=int, default=10, help="steps per round")
    p.add_argument("--json", type=Path, help="write the results here")
    args = p.parse_args(argv)
    for name in ("rounds", "steps", "micro_batch"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if not any(o.startswith("experiment=") for o in args.overrides):
        args.overrides = VALIDATION + args.overrides
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    env = DistEnv.from_env("auto")
    logs.setup_logging(env.rank)
    with tool_world(env, "dgxtrain-scaling-") as (tmp, watchdog):
        result = measure_and_check(args, env, tmp, watchdog)
    if env.is_main:
        sys.stdout.write(render(result))
        measure.write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
