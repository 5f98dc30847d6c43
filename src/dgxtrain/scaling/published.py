"""Published weak-scaling results, next to what the model predicts for their communication
to compute ratio (python -m dgxtrain.scaling --published; docs/performance.md)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from dgxtrain.scaling import bandwidth, model


@dataclass(frozen=True)
class Case:
    name: str
    gpus: tuple[int, int]  # from, to
    kept: float  # published per-GPU throughput kept from `gpus[0]` to `gpus[1]`
    step_s: float  # one GPU's step
    grad_bytes: float  # what the all-reduce carries per step
    curve: Callable[[int], bandwidth.Curve]  # the bandwidth for a world size
    note: str
    source: str

    def predicted(self, overlap: bool = True) -> float:
        """Throughput kept from gpus[0] to gpus[1]: with the buckets behind the backward, or
        (overlap=False) all after it, the two bounds of what a real run gets."""
        compute = model.Compute(self.step_s / 3, 2 * self.step_s / 3, 0.0)
        # 25 MiB buckets, as DDP's default cap; the first bucket's size hardly counts here.
        n = max(1, math.ceil(self.grad_bytes / (25 * model.MiB)))
        buckets = [int(self.grad_bytes / n)] * n
        a, b = (model.predict(compute, buckets, g, self.curve(g), overlap) for g in self.gpus)
        return a.step_s / b.step_s


def _flat(name: str, busbw_gbps: float, latency_s: float):
    """A network whose ring runs at one bus bandwidth whatever the size (a NIC's line rate)."""
    return lambda gpus: bandwidth.Curve(name, ((2**30, busbw_gbps), (2**31, busbw_gbps)), gpus,
                                        latency_s, "line rate")


CASES = [
    # torchtitan's Llama 3.1 8B on H100 (Grand Teton, 400 Gb/s RDMA per GPU), FSDP with bf16
    # parameters and fp32 reductions, local batch 2 x 8192 tokens: 5,762 -> 5,605 tokens/s
    # per GPU from 8 to 128 GPUs (6,667 -> 6,514 compiled; 8,532 -> 8,380 with Float8).
    # The step: 16,384 tokens / 5,762 per s. FSDP moves ~1.5x DDP's all-reduce (all-gathers
    # in forward and backward, a reduce-scatter): taken as an fp32 all-reduce of 1.5 x 8.03e9
    # parameters.
    Case("torchtitan Llama 3.1 8B, FSDP", (8, 128), 5605 / 5762, 16384 / 5762,
         1.5 * 4 * 8.03e9, lambda g: bandwidth.published(g),
         "FSDP, not DDP; 1.5x an all-reduce's bytes",
         "https://github.com/pytorch/torchtitan/blob/main/benchmarks/"
         "llama3_h100_202412_torchtitan.md (Tables 1 and 3)"),
    # Horovod (Sergeev & Del Balso 2018): 128 servers x 4 Pascal GPUs on 25 Gbit/s RoCE,
    # 90 % for ResNet-101 and 68 % for VGG-16 at 512 GPUs. One P100's step at batch 64:
    # VGG-16 154 images/s (TensorFlow's DGX-1 benchmarks); ResNet-101 has no published figure:
    # ~125 images/s, between ResNet-50's 219 and ResNet-152's 91.8 by FLOPs (derived).
    # Parameters (torchvision): 44,549,160 and 138,357,544, fp32 gradients. The ring's bus
    # bandwidth: one 25 Gb/s NIC per server, 3.1 GB/s.
    Case("Horovod ResNet-101", (1, 512), 0.90, 64 / 125, 4 * 44_549_160,
         _flat("25 Gb/s RoCE", 3.125, 50e-6), "P100 step derived (no published figure)",
         "arXiv:1802.05799; github.com/horovod/horovod docs/benchmarks.rst; "
         "tensorflow/docs r1 guide/performance/benchmarks.md"),
    Case("Horovod VGG-16", (1, 512), 0.68, 64 / 154, 4 * 138_357_544,
         _flat("25 Gb/s RoCE", 3.125, 50e-6), "",
         "arXiv:1802.05799; github.com/horovod/horovod docs/benchmarks.rst; "
         "tensorflow/docs r1 guide/performance/benchmarks.md"),
]


def comparisons() -> list[dict]:
    return [{"case": c.name, "gpus": list(c.gpus), "published_kept": c.kept,
             "predicted_kept": c.predicted(), "predicted_kept_no_overlap": c.predicted(False),
             "comm_to_compute": c.grad_bytes * 2 / (c.curve(c.gpus[1]).link_gbps(25 * model.MiB)
                                                    * 1e9) / c.step_s,
             "note": c.note, "source": c.source} for c in CASES]
