"""What a step costs: the pace between log steps, its phases, and which rank holds the
others up. Measured on log steps only, where a host sync is allowed."""

from __future__ import annotations

import os
import resource
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.distributed as tdist


class PhaseClock:
    """Wall time of a step's phases. It waits for the device at each mark, so it is only
    used on log steps; the other steps get NULL_CLOCK, which does nothing.

    The ranks start a timed step together (a tiny all-reduce): their phases then compare,
    and the time each waited there, `lag_wait_s`, is how far ahead of the slowest it was."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: dict[str, float] = defaultdict(float)
        started = time.perf_counter()
        if tdist.is_initialized():
            tdist.all_reduce(torch.zeros(1, device=device))
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        self._t = time.perf_counter()
        self.lag_wait_s = self._t - started

    def mark(self, phase: str) -> None:
        """The time since the previous mark was spent in `phase`."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.seconds[phase] += now - self._t
        self._t = now


class _NullClock(PhaseClock):
    def __init__(self) -> None:
        self.seconds, self.lag_wait_s = defaultdict(float), 0.0

    def mark(self, phase: str) -> None:
        pass


NULL_CLOCK = _NullClock()


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
COLUMNS = ("loss", "grad_norm", "data", "fwd_bwd", "optim", "comm_wait", "lag_wait",
           "alloc_gb", "reserved_gb", "rss_gb")


def local_row(loss: torch.Tensor, grad_norm: torch.Tensor, clock: PhaseClock,
              comm_wait_s: float, device: torch.device) -> torch.Tensor:
    cuda = device.type == "cuda"
    host = [clock.seconds["data"], clock.seconds["fwd_bwd"], clock.seconds["optim"], comm_wait_s,
            clock.lag_wait_s, torch.cuda.max_memory_allocated(device) / 2**30 if cuda else 0.0,
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
        "perf/optim_s": mean["optim"],
        # Waiting for the other ranks: at the timed step's start and in the gradient all-reduce.
        "perf/comm_wait_s": mean["comm_wait"] + mean["lag_wait"],
        "mem/max_rss_gb": max(cols["rss_gb"]),
    }
    if max(cols["reserved_gb"]) > 0:
        out["mem/max_allocated_gb"] = max(cols["alloc_gb"])
        out["mem/max_reserved_gb"] = max(cols["reserved_gb"])
    if flops_per_step and step_time_s > 0:
        tflops = flops_per_step / step_time_s / len(rows) / 1e12  # per device
        out["perf/tflops"] = tflops
        out["perf/mfu"] = tflops / peak_tflops if peak_tflops > 0 else 0.0
    # A step less its waits inside, plus how much later than the first rank it arrived.
    first = max(cols["lag_wait"])
    busy = [d + f - w + o + first - lag for d, f, w, o, lag in zip(
        cols["data"], cols["fwd_bwd"], cols["comm_wait"], cols["optim"], cols["lag_wait"])]
    return {**out, **stragglers(busy, hosts)}


class StepMeter:
    """Wall time between log steps. Read it only after a host sync (the loss .item())."""

    def __init__(self, samples_per_step: int, step: int = 0):
        self.samples_per_step = samples_per_step
        self._step, self._t = step, time.perf_counter()
        self.start = self._t

    def tick(self, step: int) -> dict[str, float]:
        now = time.perf_counter()
        steps, dt = step - self._step, now - self._t
        self._step, self._t = step, now
        return {"step_time_s": dt / max(steps, 1),
                "samples_per_s": steps * self.samples_per_step / dt if dt > 0 else 0.0}

    def elapsed(self) -> float:
        return time.perf_counter() - self.start
