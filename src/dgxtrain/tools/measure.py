"""What the doctor measures with, and the lab's benchmarks too: all-reduce bandwidth over
message sizes, the CPU's name, and how to keep and print what they find."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as tdist

from dgxtrain.distributed.collectives import all_reduce_, broadcast_object


def write_json(path: Path | None, result: Any) -> None:
    """The tool's results as JSON at `path`, if one was given."""
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2, default=float))


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
