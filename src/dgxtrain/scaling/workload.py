"""The model a run is about to train, as the scaling model sees it: its gradient buckets and
its FLOPs, built from the same Hydra overrides as the run (scaling's CLI, the doctor)."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from dgxtrain.dist.env import DistEnv
from dgxtrain.faults import Watchdog
from dgxtrain.observe.metrics import flops_per_sample
from dgxtrain.scaling import model
from dgxtrain.tools import bench


def grad_bytes(net: torch.nn.Module, comm_hook: str) -> list[int]:
    """Gradient bytes in the order the backward produces them (the reverse of definition
    order for a model that runs its layers in that order), as the wire carries them."""
    scale = 0.5 if comm_hook == "bf16" else 1.0  # the hook sends fp32 gradients as bf16
    return [int(p.numel() * p.element_size() * scale)
            for p in reversed(list(net.parameters())) if p.requires_grad]


@dataclass(frozen=True)
class Workload:
    micro_batch: int  # samples per GPU and step
    parameters: int
    grad_bytes: list[int]
    bucket_bytes: list[int]
    flops_per_sample: float

    def compute(self, tflops: float, mfu: float) -> model.Compute:
        """One GPU's step at `mfu` of `tflops`, split as dense layers split it (the backward
        twice the forward); the optimizer is not counted."""
        step = self.flops_per_sample * self.micro_batch / (tflops * 1e12 * mfu)
        return model.Compute(step / 3, 2 * step / 3, 0.0)

    def describe(self) -> dict:
        return {"micro_batch_per_rank": self.micro_batch, "parameters": self.parameters,
                "grad_bytes": sum(self.grad_bytes), "bucket_bytes": self.bucket_bytes,
                "flops_per_sample": self.flops_per_sample}


def build(overrides: list[str], micro_batch: int | None = None) -> Workload:
    """The run's model on the CPU of this process (a GPU's worth of samples: the
    experiment's micro-batch, or its global batch over 8)."""
    env = DistEnv.from_env("cpu")
    t = bench.compose_config(overrides, None, 8).trainer
    micro = micro_batch or t.micro_batch_size or t.global_batch_size // 8
    with tempfile.TemporaryDirectory(prefix="dgxtrain-scaling-") as tmp, \
            Watchdog(Path(tmp), 0) as watchdog:
        job = bench.build(overrides, micro, env, Path(tmp), watchdog, ["localhost"])
    sizes = grad_bytes(job.model, job.cfg.dist.comm_hook)
    return Workload(micro, sum(p.numel() for p in job.model.parameters()), sizes,
                    model.buckets(sizes, int(job.cfg.dist.bucket_cap_mb * model.MiB)),
                    flops_per_sample(job.model, job.task.example()[0].to(env.device)))
