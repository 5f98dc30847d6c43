"""`torchrun --nproc_per_node=N -m bench.restore_bench [--mb M] [--rounds R] [--cold]
[--dir D] [--json PATH]`: how a resume should read a checkpoint, measured on this storage.

The checkpoint is an MLP of M MiB of fp32 weights with its AdamW state (3 x M MiB in all),
saved by dgxtrain.checkpoint. Two ways to load it into every rank, in alternating rounds:
  - every rank reads: rank 0 reads each file to check its SHA-256, then every rank
    torch.loads model.pt and optim.pt itself (the way before rank 0 broadcast);
  - rank 0 reads, once, and broadcasts: checkpoint.choose + checkpoint.restore (the trainer's).
With --cold (as root) each round starts by dropping the machine's page cache, so every
read comes from the storage; without it, reads after the first may come from the cache. Per way: the median wall time from the first rank's start to
the last rank's finish, and the bytes read from storage over all ranks (/proc/self/io).
On one node, reading once per node is the broadcast way; across nodes see
docs/checkpoints.md.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as tdist

from bench.common import tool_world
from dgxtrain import checkpoint
from dgxtrain.distributed.collectives import all_reduce_, broadcast_object
from dgxtrain.distributed.env import DistEnv
from dgxtrain.observe import logs
from dgxtrain.tools import measure

log = logging.getLogger("bench.restore_bench")
META = {"seed": 0, "global_batch_size": 1, "num_samples": 1}


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.restore_bench")
    p.add_argument("--mb", type=int, default=256, help="MiB of fp32 weights (default 256)")
    p.add_argument("--rounds", type=int, default=3, help="rounds of each way (default 3)")
    p.add_argument("--cold", action="store_true", help="drop the page cache before each "
                   "way (root; it empties the whole machine's cache)")
    p.add_argument("--dir", type=Path, help="the storage to measure, shared by the ranks "
                   "(default: rank 0's scratch directory)")
    p.add_argument("--json", type=Path, help="write the results here as JSON")
    return p.parse_args(argv)


def build(mib: int, device: torch.device) -> tuple[torch.nn.Module, torch.optim.Optimizer, Any]:
    width = 1024
    depth = max(1, mib * 2**20 // (4 * width * width))
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False)
                                  for _ in range(depth)]).to(device)
    opt = torch.optim.AdamW(model.parameters())
    return model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)


def drop_page_cache(env: DistEnv) -> bool:
    """Whether the page cache could be emptied (rank 0 asks; every rank learns the answer)."""
    ok = True
    if env.is_main:
        try:
            Path("/proc/sys/vm/drop_caches").write_text("1\n")
        except OSError:
            ok = False
    flag = torch.tensor([0.0 if ok else 1.0], device=env.device)
    return all_reduce_(flag).item() == 0.0


def storage_read_bytes() -> int:
    """What this process has read from storage (not the page cache)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    return 0


def every_rank_reads(d: Path, env: DistEnv, model, opt, sched) -> None:
    if env.is_main and checkpoint.verify(d) is not None:
        raise RuntimeError(f"{d} does not verify")
    tdist.barrier()  # the ranks waited for rank 0's choice, as choose() made them
    model.load_state_dict(checkpoint.load_file(d / "model.pt", env.device))
    saved = checkpoint.load_file(d / "optim.pt", env.device)
    opt.load_state_dict(saved["optimizer"])
    sched.load_state_dict(saved["scheduler"])


def rank0_broadcasts(run_dir: Path, env: DistEnv, model, opt, sched) -> None:
    chosen = checkpoint.choose("auto", run_dir, env)
    checkpoint.restore(chosen, env, {**META, "world_size": env.world_size}, model, opt, sched)


def timed(way, env: DistEnv, *args) -> dict[str, float]:
    tdist.barrier()
    read0, started = storage_read_bytes(), time.perf_counter()
    way(*args)
    measure.sync(env.device)
    tdist.barrier()
    seconds = time.perf_counter() - started
    read = torch.tensor([float(storage_read_bytes() - read0)], device=env.device)
    return {"s": seconds, "read_bytes": all_reduce_(read).item()}


def run(args: argparse.Namespace, env: DistEnv, run_dir: Path) -> dict[str, Any]:
    torch.manual_seed(0)
    model, opt, sched = build(args.mb, env.device)
    model(torch.ones(1, 1024, device=env.device)).sum().backward()
    opt.step()
    shared = checkpoint.contents(model, opt, sched, {"step": 1}, {})
    failed = checkpoint.save(run_dir, 1, env, shared, {**META, "world_size": env.world_size}, 2)
    if failed:
        raise RuntimeError(failed)
    checkpoint.finish_pruning()
    d = checkpoint.root_of(run_dir) / "step-1"
    size = sum(f.stat().st_size for f in d.iterdir())
    ways = {"every rank reads": lambda: every_rank_reads(d, env, model, opt, sched),
            "rank 0 reads, broadcasts": lambda: rank0_broadcasts(run_dir, env, model, opt, sched)}
    rows: dict[str, list[dict[str, float]]] = {name: [] for name in ways}
    cold = args.cold
    for r in range(args.rounds):
        order = list(ways) if r % 2 == 0 else list(reversed(ways))
        for name in order:
            cold = cold and drop_page_cache(env)
            rows[name].append(timed(ways[name], env))
    return {"world_size": env.world_size, "device": str(env.device), "backend": env.backend,
            "checkpoint_bytes": size, "cold_cache": cold, "rounds": args.rounds,
            "ways": {name: {"median_s": statistics.median(x["s"] for x in runs),
                            "median_read_bytes": statistics.median(x["read_bytes"] for x in runs),
                            "runs": runs} for name, runs in rows.items()}}


def table(result: dict[str, Any]) -> str:
    ways = result["ways"]
    base = ways["every rank reads"]["median_s"]
    lines = [f"restoring a {measure.human_bytes(result['checkpoint_bytes'])} checkpoint on "
             f"{result['world_size']} ranks ({result['backend']}, "
             f"{'cold' if result['cold_cache'] else 'WARM'} page cache, "
             f"{result['rounds']} rounds, medians)",
             f"{'way':<26}{'seconds':>9}{'read from storage':>20}{'vs every rank':>15}"]
    for name, w in ways.items():
        lines.append(f"{name:<26}{w['median_s']:>9.3f}"
                     f"{measure.human_bytes(w['median_read_bytes']):>20}"
                     f"{w['median_s'] / base:>15.2f}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    env = DistEnv.from_env()
    logs.setup_logging(env.rank)
    with tool_world(env, "dgxtrain-restore-") as (tmp, _):
        run_dir = Path(broadcast_object(str((args.dir or tmp) / f"restore-bench-{os.getpid()}")))
        try:
            result = run(args, env, run_dir)
        finally:
            tdist.barrier()
            if env.is_main:
                shutil.rmtree(run_dir, ignore_errors=True)
    if env.is_main:
        sys.stdout.write(table(result))
        measure.write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
