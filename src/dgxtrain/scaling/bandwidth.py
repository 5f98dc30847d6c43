"""All-reduce bus bandwidth by message size: published DGX figures, or a measured curve.

busbw is nccl-tests' figure: algbw * 2(n-1)/n, with algbw = bytes / time, so that a ring
all-reduce of `b` bytes over n ranks takes 2(n-1)/n * b / busbw. Published figures are end
to end: they include the collective's latency. A Curve gives back its bandwidth with its
own latency taken out, and the cost model adds the latency of the world it predicts for
(model.allreduce_s): at the curve's own world that gives back the published times.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

MiB, GiB = 2**20, 2**30


@dataclass(frozen=True)
class Curve:
    """busbw (GB/s, 1e9 B/s) at message sizes (bytes), measured over `ranks` ranks whose
    small-message all-reduce takes `latency_s`."""

    name: str
    points: tuple[tuple[int, float], ...]
    ranks: int
    latency_s: float
    source: str

    def link_gbps(self, nbytes: float) -> float:
        """busbw at `nbytes` with the curve's latency taken out, interpolated in log size
        (and held at the end points outside them)."""
        pts = [(math.log(s), self._without_latency(s, b)) for s, b in self.points]
        x = math.log(max(nbytes, 1.0))
        if x <= pts[0][0] or len(pts) == 1:
            return pts[0][1]
        if x >= pts[-1][0]:
            return pts[-1][1]
        i = bisect.bisect_left([p[0] for p in pts], x)
        (x0, y0), (x1, y1) = pts[i - 1], pts[i]
        return y0 + (y1 - y0) * (x - x0) / (x1 - x0)

    def _without_latency(self, nbytes: int, busbw_gbps: float) -> float:
        total = ring_factor(self.ranks) * nbytes / (busbw_gbps * 1e9)
        # A figure at or below the latency (a noisy small size) keeps 5 % of its time.
        return ring_factor(self.ranks) * nbytes / max(total - self.latency_s, 0.05 * total) / 1e9


def ring_factor(n: int) -> float:
    """The bytes each rank sends in a ring all-reduce, per byte reduced: 2(n-1)/n."""
    return 2 * (n - 1) / n


def measured(rows: list[dict[str, float]], ranks: int, latency_s: float) -> Curve:
    """A curve from timed all-reduces (rows of `bytes` and `busbw_gbps`) and a tiny one's
    time."""
    pts = tuple(sorted((int(r["bytes"]), r["busbw_gbps"]) for r in rows))
    return Curve("measured here", pts, ranks, latency_s,
                 "tools.measure.allreduce_bandwidth on this machine")


# One node, 8 x H100 SXM over NVLink 4 / NVSwitch, NCCL 2.18.5 all_reduce_perf (NVLS from
# 2 MiB up), in-place busbw. Azure ND H100 v5, "NCCL Bandwidth":
# https://github.com/Azure/AI-benchmarking-guide/blob/main/Azure_Results/ND_H100_v5_results.md
# H200 (ND H200 v5, NCCL 2.20.5, same page set) is within 2 %: 300.9 at 32 MiB, 467.6 at 1 GiB.
# Latency: the same table's 1 KB row, about 26 us.
DGX_H100_NVLINK = Curve(
    "8x H100/H200, NVLink + NVLS (one node)",
    ((16 * MiB, 234.45), (32 * MiB, 295.53), (64 * MiB, 361.78), (128 * MiB, 400.61),
     (256 * MiB, 423.38), (512 * MiB, 438.46), (1 * GiB, 466.35), (8 * GiB, 478.87)),
    8, 26e-6, "Azure ND H100 v5 nccl-tests (AI-benchmarking-guide)")

# Ring only (NCCL_ALGO=RING) reaches about 370 GB/s at large sizes ("effective NVLink
# bandwidth of 370GB/s", NVIDIA's S. Jeaugey, https://github.com/NVIDIA/nccl-tests/issues/212):
# NCCL picks NVLS on these nodes by itself, so the curve above is what DDP gets.

# Across nodes, 8 x 400 Gb/s per node (one NIC per GPU; "up to 48-49GB/s per NIC",
# nccl-tests#267). Large messages: ~330 GB/s on 1-2 nodes and ~320 beyond 2 (H100, 8x400G,
# NCCL 2.19.3, 4-8 GB: https://github.com/NVIDIA/nccl/issues/1221); 248 nodes x 8 H200 at
# 512 MB "typically measuring around 350G, but occasionally dropping below 300G"
# (https://github.com/NVIDIA/nccl-tests/issues/283): 300 is taken from 64 nodes on.
# Mid sizes fall much lower across nodes. The one published per-size table found is 4 x 8
# B200 over EFA (stas00/ml-engineering, network/README.md: 91.2 GB/s at 32 MiB, 156.7 at
# 64 MiB, 362 at 1 GiB, 381.8 at 16 GiB); its shape, relative to 16 GiB, scales the large-
# message figure here. A pessimistic stand-in for InfiniBand, whose latency is lower.
# Latency: ~47 us for tiny messages on 2 nodes x 8 GPUs over NDR InfiniBand
# (https://github.com/NVIDIA/nccl/issues/1244), 21 us above one node's 26; taken to grow by
# that much per doubling of the nodes, as the depth of NCCL's trees does (an assumption).
_EFA_SHAPE = ((32 * MiB, 91.19 / 381.8), (64 * MiB, 156.74 / 381.8), (1 * GiB, 361.99 / 381.8),
              (16 * GiB, 1.0))
_LARGE_MESSAGE_GBPS = ((2, 330.0), (4, 320.0), (64, 300.0))


def multi_node(nodes: int) -> Curve:
    large = next(b for n, b in reversed(_LARGE_MESSAGE_GBPS) if nodes >= n)
    return Curve(f"{nodes} x 8 GPUs, 8x400 Gb/s InfiniBand",
                 tuple((s, large * f) for s, f in _EFA_SHAPE), nodes * 8,
                 26e-6 + 21e-6 * math.log2(max(nodes, 2)),
                 "nccl#1221, nccl-tests#283 (large messages); ml-engineering's 4-node EFA "
                 "table (shape by size); nccl#1244 (latency)")


def published(gpus: int, gpus_per_node: int = 8) -> Curve:
    """The built-in curve for a world of `gpus` DGX H100/H200 GPUs."""
    if gpus <= gpus_per_node:
        return DGX_H100_NVLINK
    return multi_node(math.ceil(gpus / gpus_per_node))
