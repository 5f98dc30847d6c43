"""A DDP step's time on N GPUs, from one device's compute and the all-reduce's bandwidth.

Weak scaling: every GPU keeps its micro-batch, so the compute of a step does not change
with N; what grows is the gradient all-reduce. DDP cuts the gradients into buckets and
all-reduces each once the backward has produced it, one after another on one stream
(PyTorch's DDP notes: "When gradients in one bucket are all ready, the Reducer kicks off an
asynchronous allreduce", in bucket order). A bucket of b bytes costs the ring all-reduce's
alpha + 2(N-1)/N * b / busbw. The step ends when the backward and the last all-reduce
have, then the optimizer runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from dgxtrain.scaling.bandwidth import Curve, published, ring_factor

MiB = 2**20
GPUS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]  # the tables' world sizes


@dataclass(frozen=True)
class Compute:
    """One device's step without communication, in its three phases (seconds)."""

    forward_s: float
    backward_s: float
    optimizer_s: float

    @property
    def step_s(self) -> float:
        return self.forward_s + self.backward_s + self.optimizer_s


def buckets(grad_bytes: list[int], cap_bytes: int, first_cap_bytes: int | None = None) -> list[int]:
    """DDP's bucket sizes, in the order they are all-reduced, for gradients of these sizes in
    the order the backward produces them: a bucket closes once it holds its cap (the first
    bucket's, then `cap_bytes`), as torch's _compute_bucket_assignment_by_size assigns them.
    DDP's first cap is 1 MiB only when bucket_cap_mb is left unset (torch's
    _DEFAULT_FIRST_BUCKET_BYTES); dgxtrain sets it, so its first cap is `cap_bytes` too."""
    limit, out, current = first_cap_bytes or cap_bytes, [], 0
    for b in grad_bytes:
        current += b
        if current >= limit:
            out.append(current)
            current, limit = 0, cap_bytes
    return out + [current] if current else out


def allreduce_s(nbytes: float, gpus: int, curve: Curve) -> float:
    """The ring all-reduce of `nbytes` over `gpus` ranks: latency plus the bytes each rank
    sends, 2(n-1)/n of them, at the curve's bus bandwidth for that size."""
    if gpus <= 1:
        return 0.0
    return curve.latency_s + ring_factor(gpus) * nbytes / (curve.link_gbps(nbytes) * 1e9)


def step_s(compute: Compute, bucket_bytes: list[int], comm_s: list[float],
           overlap: bool) -> float:
    """The step: bucket i may start once the backward has produced its bytes (spread evenly
    over the backward) and the bucket before it is done. Without overlap (CPU ranks, whose
    all-reduce runs on the cores the backward uses) every bucket waits for the backward."""
    total = sum(bucket_bytes) or 1
    backward_end = compute.forward_s + compute.backward_s
    ready_bytes, comm_end = 0, 0.0
    for b, c in zip(bucket_bytes, comm_s):
        ready_bytes += b
        ready = (compute.forward_s + compute.backward_s * ready_bytes / total if overlap
                 else backward_end)
        comm_end = max(comm_end, ready) + c
    return max(backward_end, comm_end) + compute.optimizer_s


@dataclass(frozen=True)
class Prediction:
    gpus: int
    bandwidth: str
    comm_s: float  # all the buckets' all-reduces, end to end
    step_s: float
    efficiency: float  # one device's step time over this one: per-GPU throughput kept


def predict(compute: Compute, bucket_bytes: list[int], gpus: int, curve: Curve | None = None,
            overlap: bool = True, gpus_per_node: int = 8) -> Prediction:
    curve = curve or published(gpus, gpus_per_node)
    comm = [allreduce_s(b, gpus, curve) for b in bucket_bytes]
    t = step_s(compute, bucket_bytes, comm, overlap) if gpus > 1 else compute.step_s
    return Prediction(gpus, curve.name if gpus > 1 else "none", sum(comm) if gpus > 1 else 0.0,
                      t, compute.step_s / t)


def table(compute: Compute, bucket_bytes: list[int], gpus: list[int], overlap: bool = True,
          curve: Curve | None = None, curve_max_gpus: int = 8,
          gpus_per_node: int = 8) -> list[dict]:
    """Predictions for each world size, as rows (the JSON's `table`). A given curve (one
    measured on a node) serves up to `curve_max_gpus`; beyond, the published ones."""
    rows = []
    for n in gpus:
        p = predict(compute, bucket_bytes, n, curve if n <= curve_max_gpus else None, overlap,
                    gpus_per_node)
        rows.append({"gpus": n, "nodes": math.ceil(n / gpus_per_node), "bandwidth": p.bandwidth,
                     "comm_s": p.comm_s, "exposed_comm_s": p.step_s - compute.step_s,
                     "predicted_step_s": p.step_s, "predicted_efficiency": p.efficiency})
    return rows


def render_table(rows: list[dict]) -> list[str]:
    """table()'s rows as text lines."""
    return [f"{'GPUs':>5} {'nodes':>5} {'all-reduce ms':>13} {'exposed ms':>10} "
            f"{'step ms':>8} {'efficiency':>10}  bandwidth",
            *(f"{t['gpus']:>5} {t['nodes']:>5} {t['comm_s'] * 1e3:>13.2f} "
              f"{t['exposed_comm_s'] * 1e3:>10.2f} {t['predicted_step_s'] * 1e3:>8.2f} "
              f"{t['predicted_efficiency']:>10.1%}  {t['bandwidth']}" for t in rows)]
