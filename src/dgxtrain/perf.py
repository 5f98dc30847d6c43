"""What a step costs: its phases, the FLOP rate against the device's peak, and which rank
holds the others up. Measured on log steps only, where a host sync is allowed."""

from __future__ import annotations

import os
import platform
import resource
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.distributed as tdist

from dgxtrain.dist import all_reduce_, broadcast_object

# Dense TFLOP/s per GPU from NVIDIA's data sheets, SXM parts as in DGX systems.
PEAK_TFLOPS = {
    "A100": {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5},
    "H100": {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "H200": {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9},
}


def _matmul_kind(device: torch.device, precision: str) -> str:
    if precision == "bf16":
        return "bf16"
    tf32 = device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32
    return "tf32" if tf32 else "fp32"


def peak_tflops(device: torch.device, precision: str) -> tuple[float, str]:
    """(peak TFLOP/s of one device, where the number comes from)."""
    kind = _matmul_kind(device, precision)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for gpu, peaks in PEAK_TFLOPS.items():
            if gpu in name:
                return peaks[kind], f"{gpu} {kind} data sheet"
    return measured_matmul_tflops(device, precision), f"{kind} matmul measured here"


def measured_matmul_tflops(device: torch.device, precision: str, seconds: float = 0.2,
                           n: int | None = None) -> float:
    """A square matmul's rate on this device and its threads: the CPU has no data sheet."""
    n = n or (4096 if device.type == "cuda" else 384)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    a @ b  # warm-up: allocation, kernel selection
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or count < 3:
        a @ b
        count += 1
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return 2 * n**3 * count / (time.perf_counter() - start) / 1e12


class PhaseClock:
    """Wall time of a step's phases. It waits for the device at each mark, so it is only
    started on log steps; the other steps keep their single host sync."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: dict[str, float] = defaultdict(float)
        self._t = time.perf_counter()

    def mark(self, phase: str) -> None:
        """The time since the previous mark was spent in `phase`."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.seconds[phase] += now - self._t
        self._t = now


def seconds_since_launch(pid: int | None = None) -> float:
    """Wall time since the job was launched: DGXTRAIN_LAUNCH_TIME (epoch seconds, which
    scripts/launch.sh sets just before it starts torchrun, after any set-up), else the start
    of process `pid` (default: this one; under a bare torchrun, pass its agent's pid)."""
    if os.environ.get("DGXTRAIN_LAUNCH_TIME"):
        return time.time() - float(os.environ["DGXTRAIN_LAUNCH_TIME"])
    stat = Path(f"/proc/{pid or os.getpid()}/stat").read_text()
    started_ticks = int(stat.rsplit(")", 1)[1].split()[19])  # field 22, after the name
    uptime = float(Path("/proc/uptime").read_text().split()[0])
    return uptime - started_ticks / os.sysconf("SC_CLK_TCK")


def max_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def stragglers(busy_s: list[float], hosts: list[str]) -> dict[str, float | int | str]:
    """Per-rank busy time (a step less its wait for the others): spread and the slowest."""
    slowest = max(range(len(busy_s)), key=busy_s.__getitem__)
    return {"perf/rank_busy_min_s": min(busy_s),
            "perf/rank_busy_median_s": statistics.median(busy_s),
            "perf/rank_busy_max_s": busy_s[slowest],
            "perf/slowest_rank": slowest, "perf/slowest_host": hosts[slowest]}


# What each rank reports on a log step, gathered in one collective (see local_row).
COLUMNS = ("loss", "grad_norm", "data", "fwd_bwd", "optim", "comm_wait", "alloc_gb",
           "reserved_gb", "rss_gb")


def local_row(loss: torch.Tensor, grad_norm: torch.Tensor, clock: PhaseClock,
              comm_wait_s: float, device: torch.device) -> torch.Tensor:
    cuda = device.type == "cuda"
    host = [clock.seconds["data"], clock.seconds["fwd_bwd"], clock.seconds["optim"], comm_wait_s,
            torch.cuda.max_memory_allocated(device) / 2**30 if cuda else 0.0,
            torch.cuda.max_memory_reserved(device) / 2**30 if cuda else 0.0, max_rss_gb()]
    return torch.cat([torch.stack([loss.float(), grad_norm.float()]).double(),
                      torch.tensor(host, dtype=torch.float64, device=device)])


def log_row(rows: list[list[float]], step_time_s: float, flops_per_step: float | None,
            peak_tflops: float, hosts: list[str]) -> dict[str, float | int | str]:
    """The metrics of a log step from every rank's row: means, maxima and stragglers."""
    cols = {name: [r[i] for r in rows] for i, name in enumerate(COLUMNS)}
    mean = {name: statistics.fmean(v) for name, v in cols.items()}
    out: dict[str, float | int | str] = {
        "train/loss": mean["loss"], "train/grad_norm": mean["grad_norm"],
        "perf/data_s": mean["data"], "perf/fwd_bwd_s": mean["fwd_bwd"],
        "perf/optim_s": mean["optim"], "perf/comm_wait_s": mean["comm_wait"],
        "mem/max_rss_gb": max(cols["rss_gb"]),
    }
    if max(cols["reserved_gb"]) > 0:
        out["mem/max_allocated_gb"] = max(cols["alloc_gb"])
        out["mem/max_reserved_gb"] = max(cols["reserved_gb"])
    if flops_per_step and step_time_s > 0:
        tflops = flops_per_step / step_time_s / len(rows) / 1e12  # per device
        out["perf/tflops"] = tflops
        out["perf/mfu"] = tflops / peak_tflops if peak_tflops > 0 else 0.0
    busy = [d + f - w + o for d, f, w, o in zip(cols["data"], cols["fwd_bwd"],
                                                cols["comm_wait"], cols["optim"])]
    return {**out, **stragglers(busy, hosts)}


def message_sizes(max_bytes: int, smallest: int = 64 * 2**10) -> list[int]:
    """Powers of 4 from `smallest` up to max_bytes, which is always the last size."""
    sizes = [min(smallest, max_bytes)]
    while sizes[-1] * 4 <= max_bytes:
        sizes.append(sizes[-1] * 4)
    return sizes + [max_bytes] if sizes[-1] < max_bytes else sizes


def human_bytes(n: float) -> str:
    """1048576 -> '1 MiB'."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:g} {unit}"
    return f"{n:g} B"


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (the machine type where there is none)."""
    info = Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.exists() else []
    return next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")),
                platform.machine())


def allreduce_bandwidth(device: torch.device, sizes_bytes: list[int], min_time_s: float = 0.05,
                        max_iters: int = 50) -> list[dict[str, float]]:
    """All-reduce (sum, fp32) timing over message sizes, with nccl-tests' definitions:
    algbw = bytes / time, busbw = algbw * 2(n-1)/n, the bandwidth each link must carry.

    Collective: every rank calls it with the same sizes. The iteration count of each size is
    decided on rank 0 and shared, so all ranks issue the same collectives. GB/s are 1e9 B/s.
    """
    n = tdist.get_world_size() if tdist.is_initialized() else 1
    rows = []
    for size in sizes_bytes:
        buf = torch.ones(max(1, size // 4), dtype=torch.float32, device=device)
        sync(device)
        started = time.perf_counter()
        all_reduce_(buf)  # warm-up: connections, buffers; also a first timing
        sync(device)
        first = time.perf_counter() - started
        iters = broadcast_object(max(1, min(max_iters, int(min_time_s / max(first, 1e-6)))))
        sync(device)
        started = time.perf_counter()
        for _ in range(iters):
            all_reduce_(buf)
        sync(device)
        # The slowest rank's time is the collective's time.
        elapsed = all_reduce_(torch.tensor([time.perf_counter() - started], device=device,
                                           dtype=torch.float64), op="max").item() / iters
        algbw = buf.numel() * 4 / elapsed / 1e9
        rows.append({"bytes": buf.numel() * 4, "time_us": elapsed * 1e6, "algbw_gbps": algbw,
                     "busbw_gbps": algbw * 2 * (n - 1) / n if n > 1 else 0.0})
    return rows


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on CPU, where work is synchronous)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
