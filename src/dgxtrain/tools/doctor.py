"""Preflight check of a node or a cluster before training: devices and their links, versions,
the NCCL/SLURM environment, every rank's GEMM rate and the all-reduce bus bandwidth.

  python -m dgxtrain.tools.doctor                                    # this process only
  torchrun --standalone --nproc_per_node=8 -m dgxtrain.tools.doctor  # every GPU of a node
  srun --ntasks-per-node=8 --gpus-per-task=1 python -m dgxtrain.tools.doctor

With --predict (and the run's Hydra overrides after it), the report ends with the scaling
model's prediction for the model about to train, from 1 to 1024 GPUs: its step's FLOPs at
--mfu of the GEMM rate measured here, and the all-reduce measured here (published DGX
figures beyond this world); slurm/train.sbatch passes its overrides when DGXTRAIN_DOCTOR=1.

Rank 0 prints the report (--json writes it too). Exit 0: healthy; 1: problems found;
2: usage error. Drill: DGXTRAIN_DOCTOR_SLOW_RANK=<r> divides rank r's measured GEMM rate by
10, a fault injected to see the slow-rank check fire (tests use it; never set it for real).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from dgxtrain.distributed.collectives import broadcast_object, gather_objects, process_group
from dgxtrain.distributed.env import DistEnv, cores_per_rank
from dgxtrain.errors import DistEnvError
from dgxtrain.observe import logs, peak
from dgxtrain.scaling import workload
from dgxtrain.tools import measure

# Not __name__: that is "__main__" under python -m, outside the dgxtrain logger.
log = logging.getLogger("dgxtrain.tools.doctor")

SLOW_RANK_VAR = "DGXTRAIN_DOCTOR_SLOW_RANK"
# nccl-tests all_reduce_perf on 8 GPUs joined by NVLink 4 / NVSwitch (DGX H100, H200) reaches
# ~450-480 GB/s bus bandwidth at large sizes; a healthy node clears ~75% of that, 360 GB/s.
# --min-busbw-fraction (0.5) then flags only what is far below even that.
EXPECTED_BUSBW_GBPS = {"H100": 360.0, "H200": 360.0}
# Below this message size latency, not link bandwidth, sets busbw: no verdict on smaller runs.
MIN_JUDGED_BYTES = 256 * 2**20
ENV_PREFIXES = ("NCCL_", "TORCH_NCCL_")
ENV_NAMES = ("SLURM_JOB_ID", "SLURM_JOB_NODELIST", "SLURM_NNODES", "SLURM_NTASKS",
             "SLURM_NTASKS_PER_NODE", "SLURM_CPUS_PER_TASK", "SLURM_GPUS", "SLURM_GPUS_PER_NODE",
             "SLURM_GPUS_PER_TASK", "CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS", "MASTER_ADDR",
             "MASTER_PORT", "WORLD_SIZE", "LOCAL_WORLD_SIZE")
SECRET_MARKS = ("KEY", "TOKEN", "SECRET", "PASSWORD")


def relevant_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The NCCL, SLURM and launcher variables that shape a run; secret-looking values hidden."""
    names = sorted(k for k in environ if k.startswith(ENV_PREFIXES) or k in ENV_NAMES)
    return {k: "<redacted>" if any(m in k.upper() for m in SECRET_MARKS) else environ[k]
            for k in names}


def versions() -> dict[str, str | None]:
    nccl = ".".join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else None
    return {"python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "nccl": nccl}


def cpu_ranges(cpus: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5', the way taskset and numactl write CPU lists."""
    out: list[str] = []
    for i, c in enumerate(cpus):
        if i == 0 or c != cpus[i - 1] + 1:
            start = c
        if i == len(cpus) - 1 or cpus[i + 1] != c + 1:
            out.append(str(c) if c == start else f"{start}-{c}")
    return ",".join(out)


def node_devices(device: torch.device) -> dict[str, Any]:
    """What this node has: every visible GPU and how they are linked, or the CPU."""
    host = socket.gethostname()
    if device.type != "cuda":
        return {"host": host, "type": "cpu", "count": os.cpu_count(), "name": measure.cpu_model()}
    gpus = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        gpus.append({"index": i, "name": p.name, "capability": f"{p.major}.{p.minor}",
                     "memory_gib": round(p.total_memory / 2**30, 1)})
    return {"host": host, "type": "cuda", "count": len(gpus), "gpus": gpus,
            "topology": _nvidia_topology()}


def _nvidia_topology() -> str | None:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "topo", "-m"], capture_output=True, text=True, timeout=20,
                             check=True)
    except (OSError, subprocess.SubprocessError):
        return None  # a nice-to-have: a broken driver shows in the other checks anyway
    return out.stdout.rstrip()


def rank_info(env: DistEnv, gemm_seconds: float, slow_rank: int | None) -> dict[str, Any]:
    """This rank's host, device, threads and measured GEMM rate."""
    cuda = env.device.type == "cuda"
    precision = "bf16" if cuda else "fp32"  # what training runs at on each kind of device
    tflops = peak.measured_matmul_tflops(env.device, precision, gemm_seconds)
    if env.rank == slow_rank:
        tflops /= 10  # the drill (module docstring): a fault injected after measuring
    cpus = sorted(os.sched_getaffinity(0))
    info = {"rank": env.rank, "local_rank": env.local_rank, "host": socket.gethostname(),
            "device": str(env.device), "device_name": "cpu", "threads": torch.get_num_threads(),
            "cpus": cpu_ranges(cpus), "num_cpus": len(cpus), "gemm_tflops": tflops,
            "precision": precision, "cuda_available": torch.cuda.is_available(),
            "nvidia_smi": shutil.which("nvidia-smi") is not None}
    if cuda:
        p = torch.cuda.get_device_properties(env.device)
        # The UUID names the physical GPU: under srun --gpus-per-task=1 every task has cuda:0.
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "all")
        info.update(device_name=p.name,
                    gpu_id=str(getattr(p, "uuid", "")) or f"{visible}/{env.device.index}")
    return info


def check_world(ranks: list[dict[str, Any]], world_size: int) -> list[str]:
    got = sorted(r["rank"] for r in ranks)
    if got == list(range(world_size)):
        return []
    return [f"gathered ranks {got} but the launcher set a world of {world_size}; fix: check "
            "WORLD_SIZE / SLURM_NTASKS against the processes actually started"]


def check_devices(ranks: list[dict[str, Any]]) -> list[str]:
    """A GPU node's torch sees its GPUs; on GPUs every rank has one, no two ranks share one."""
    # The classic: a CPU-only torch wheel on a GPU node quietly trains on the CPU.
    blind = sorted({r["host"] for r in ranks
                    if r.get("nvidia_smi") and not r.get("cuda_available", True)})
    if blind:
        return [f"torch sees no GPU on {', '.join(blind)} although nvidia-smi is there; fix: "
                "install a CUDA build of torch (torch.version.cuda is None on a CPU build) "
                "or check the driver with nvidia-smi"]
    if not any(r["device"].startswith("cuda") for r in ranks):
        return []
    problems = [f"rank {r['rank']} on {r['host']} sees no GPU while others do; fix: check "
                "CUDA_VISIBLE_DEVICES and the job's GPU request (--gpus-per-task, --gres=gpu:N)"
                for r in ranks if not r["device"].startswith("cuda")]
    owners: dict[tuple[str, str], list[int]] = defaultdict(list)
    for r in ranks:
        if "gpu_id" in r:
            owners[(r["host"], r["gpu_id"])].append(r["rank"])
    problems += [f"ranks {', '.join(map(str, rs))} on {host} share one GPU ({gid}); fix: one "
                 "rank per GPU: torchrun --nproc_per_node=<GPUs per node>, or srun "
                 "--ntasks-per-node=<GPUs> --gpus-per-task=1"
                 for (host, gid), rs in owners.items() if len(rs) > 1]
    return problems


def check_slow_ranks(ranks: list[dict[str, Any]], fraction: float) -> list[str]:
    """Ranks whose GEMM rate is below `fraction` x the median of all ranks."""
    # The median, not the mean: one slow GPU must not drag the bar down with it.
    median = statistics.median(r["gemm_tflops"] for r in ranks)
    problems = []
    for r in ranks:
        if r["gemm_tflops"] < fraction * median:
            look = ("its clocks, power and temperature (nvidia-smi -q -d PERFORMANCE,CLOCK) and "
                    "other processes on it" if r["device"].startswith("cuda") else
                    "other load on its cores and its CPU affinity")
            problems.append(f"rank {r['rank']} on {r['host']}: GEMM {r['gemm_tflops']:.3f} "
                            f"TFLOP/s is below {fraction:g} x the median {median:.3f}; "
                            f"fix: look at {look}")
    return problems


def check_busbw(ranks: list[dict[str, Any]], rows: list[dict[str, float]],
                fraction: float) -> list[str]:
    """Within one node of known GPUs: the largest all-reduce is near the NVLink figure."""
    if len(ranks) < 2 or not rows or len({r["host"] for r in ranks}) > 1:
        return []  # across nodes the network, not NVLink, sets the limit
    gpu = next((g for g in EXPECTED_BUSBW_GBPS if all(g in r["device_name"] for r in ranks)),
               None)
    top = max(rows, key=lambda row: row["bytes"])
    if gpu is None or top["bytes"] < MIN_JUDGED_BYTES:
        return []
    expected = EXPECTED_BUSBW_GBPS[gpu]
    if top["busbw_gbps"] >= fraction * expected:
        return []
    return [f"all-reduce busbw {top['busbw_gbps']:.1f} GB/s at "
            f"{measure.human_bytes(top['bytes'])} is below {fraction:g} x the {expected:.0f} GB/s "
            f"expected of {gpu} over NVLink; fix: check "
            "that nvidia-smi topo -m shows NV# links, nvidia-fabricmanager runs, and "
            "NCCL_P2P_DISABLE / NCCL_SHM_DISABLE / NCCL_P2P_LEVEL are unset"]


def render(rep: dict[str, Any]) -> str:
    """The human-readable report."""
    v, ranks, rows = rep["versions"], rep["ranks"], rep["allreduce"]
    lines = [f"dgxtrain doctor: {len(ranks)} rank(s) on {len(rep['devices'])} host(s), "
             f"launcher {rep['launcher']}, backend {rep['backend']}",
             f"versions: python {v['python']}, torch {v['torch']}, CUDA {v['cuda'] or '-'}, "
             f"NCCL {v['nccl'] or '-'}"]
    for host, d in rep["devices"].items():
        if d["type"] == "cpu":
            lines.append(f"devices on {host}: {d['count']} CPU cores, {d['name']}")
            continue
        lines.append(f"devices on {host}: {d['count']} GPU(s)")
        lines += [f"  cuda:{g['index']} {g['name']}, capability {g['capability']}, "
                  f"{g['memory_gib']} GiB" for g in d["gpus"]]
        if d["topology"]:
            lines += ["  nvidia-smi topo -m:", *("    " + t for t in d["topology"].splitlines())]
    lines += [f"GEMM per rank ({ranks[0]['precision']} matmul):",
              f"  {'rank':>4}  {'host':<24} {'device':<8} {'threads':>7}  {'cpus':<12} TFLOP/s"]
    lines += [f"  {r['rank']:>4}  {r['host']:<24} {r['device']:<8} {r['threads']:>7}  "
              f"{r['cpus']:<12} {r['gemm_tflops']:.3f}" for r in ranks]
    if rows:
        lines += [f"all-reduce (fp32 sum, {len(ranks)} ranks; busbw = algbw x 2(n-1)/n as in "
                  "nccl-tests):", f"  {'size':>10} {'time us':>11} {'algbw GB/s':>11} "
                  f"{'busbw GB/s':>11}"]
        lines += [f"  {measure.human_bytes(r['bytes']):>10} {r['time_us']:>11.1f} "
                  f"{r['algbw_gbps']:>11.3f} {r['busbw_gbps']:>11.3f}" for r in rows]
    else:
        lines.append("all-reduce: skipped, one rank (launch with torchrun or srun to measure)")
    lines.append("environment:" if rep["env"] else "environment: no NCCL/SLURM/launcher variables")
    lines += [f"  {k}={val}" for k, val in rep["env"].items()]
    if "prediction" in rep:
        lines += workload.render_forecast(rep["prediction"])
    problems = rep["problems"]
    lines.append(f"problems ({len(problems)}):" if problems else "problems: none, OK")
    lines += [f"  - {p}" for p in problems]
    return "\n".join(lines)


def _number(low: float, high: float = float("inf")) -> Any:
    def parse(text: str) -> float:
        if not low < float(text) <= high:
            raise argparse.ArgumentTypeError(f"{text} is not in ({low:g}, {high:g}]")
        return float(text)
    return parse


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dgxtrain.tools.doctor", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--json", type=Path, metavar="PATH", help="also write the report as JSON")
    p.add_argument("--max-mb", type=_number(0), help="largest all-reduce message in MiB "
                   "(default 1024 on GPUs, 64 on CPU)")
    p.add_argument("--gemm-seconds", type=_number(0), default=0.5, help="GEMM time per rank")
    p.add_argument("--slow-fraction", type=_number(0, 1), default=0.8,
                   help="flag ranks whose GEMM rate is below this x the median")
    p.add_argument("--min-busbw-fraction", type=_number(0, 1), default=0.5,
                   help="flag busbw below this x the expected NVLink figure (H100/H200)")
    p.add_argument("--timeout", type=_number(0), default=300, help="process group timeout, s")
    p.add_argument("--predict", action="store_true", help="end with the scaling prediction for "
                   "the run that the overrides after it train")
    p.add_argument("--mfu", type=_number(0, 1), default=0.42, help="with --predict: the share "
                   "of the GEMM rate a step reaches (default 0.42, dgxtrain's last H200 "
                   "measurement)")
    p.add_argument("overrides", nargs="*", help="with --predict: the run's Hydra overrides")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_intermixed_args(argv)
    if args.overrides and not args.predict:
        parser.error(f"unrecognized arguments: {' '.join(args.overrides)} (Hydra overrides "
                     "go with --predict)")
    slow = os.environ.get(SLOW_RANK_VAR, "")
    if slow and not slow.isdigit():
        sys.stderr.write(f"dgxtrain: doctor: {SLOW_RANK_VAR}={slow!r} is no rank number; "
                         "fix: set it to a rank (0, 1, ...) or unset it\n")
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.stderr.write(f"dgxtrain: doctor: --device=cuda but torch {torch.__version__} sees no "
                         "GPU; fix: check nvidia-smi and the torch build, or use --device=cpu\n")
        return 2
    try:
        env = DistEnv.from_env(args.device)
    except DistEnvError as e:
        sys.stderr.write(f"dgxtrain: doctor: {e}\n")
        return 2
    logs.setup_logging(env.rank)
    cuda = env.device.type == "cuda"
    if cuda:
        torch.cuda.set_device(env.device)
    torch.set_num_threads(cores_per_rank())  # the threads training would use
    with process_group(env, timeout_s=args.timeout):
        log.info("measuring GEMM on every rank for %g s", args.gemm_seconds)
        mine = rank_info(env, args.gemm_seconds, int(slow) if slow else None)
        # Each node's devices once, from its first rank.
        gathered = gather_objects((mine, node_devices(env.device) if env.local_rank == 0 else None))
        rows: list[dict[str, float]] = []
        latency_s = 0.0
        if env.world_size > 1:  # one rank has nothing to all-reduce with
            max_bytes = int((args.max_mb or (1024 if cuda else 64)) * 2**20)
            log.info("measuring all-reduce up to %s", measure.human_bytes(max_bytes))
            rows = measure.allreduce_bandwidth(env.device, measure.message_sizes(max_bytes),
                                            min_time_s=0.1, max_iters=50)
            if args.predict:  # the scaling model's latency term: a 4-byte all-reduce
                latency_s = measure.allreduce_bandwidth(env.device, [4])[0]["time_us"] * 1e-6
        ranks = [r for r, _ in gathered]
        problems = (check_world(ranks, env.world_size) + check_devices(ranks) +
                    check_slow_ranks(ranks, args.slow_fraction) +
                    check_busbw(ranks, rows, args.min_busbw_fraction))
        if env.is_main:
            rep = {"launcher": env.launcher, "backend": env.backend,
                   "world_size": env.world_size, "versions": versions(),
                   "env": relevant_env(os.environ),
                   "devices": {d["host"]: d for _, d in gathered if d}, "ranks": ranks,
                   "allreduce": rows, "problems": problems, "ok": not problems}
            if args.predict:
                try:
                    tflops = statistics.median(r["gemm_tflops"] for r in ranks)
                    rep["prediction"] = workload.forecast(args.overrides, tflops, args.mfu,
                                                          rows, len(ranks), latency_s, cuda)
                except Exception as e:  # the checks stand; a prediction is a nice-to-have
                    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
                    rep["prediction"] = {"error": f"{type(e).__name__}: {first}"}
            sys.stdout.write(render(rep) + "\n")
            sys.stdout.flush()
            if args.json:
                args.json.parent.mkdir(parents=True, exist_ok=True)
                args.json.write_text(json.dumps(rep, indent=2) + "\n")
        # Every rank waits here for rank 0's report, and exits with its verdict: a launcher
        # that stops all workers when one exits non-zero cannot cut the report short.
        ok = broadcast_object(not problems)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
