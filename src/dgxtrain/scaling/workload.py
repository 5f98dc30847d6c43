"""The model a run is about to train, as the scaling model sees it: its gradient buckets and
its FLOPs, built from the same Hydra overrides as the run (scaling's CLI), and the forecast
for it from a measured GEMM rate and all-reduce curve (the doctor's --predict)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from dgxtrain.config import compose, load
from dgxtrain.loop.build import build_model, build_task
from dgxtrain.observe.model_stats import flops_per_sample
from dgxtrain.scaling import bandwidth, model


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
    typed, _ = load(compose(overrides), 1, cuda_available=False)
    t = typed.trainer
    micro = micro_batch or t.micro_batch_size or t.global_batch_size // 8
    cpu = torch.device("cpu")
    task = build_task(typed, cpu, micro)
    net = build_model(typed, task)
    sizes = grad_bytes(net, typed.dist.comm_hook)
    inputs, target = task.example()
    return Workload(micro, sum(p.numel() for p in net.parameters()), sizes,
                    model.buckets(sizes, int(typed.dist.bucket_cap_mb * model.MiB)),
                    flops_per_sample(net, inputs, **task.loss.model_kwargs(target)))


def forecast(overrides: list[str], tflops: float, mfu: float, rows: list[dict[str, float]],
             world: int, latency_s: float, cuda: bool) -> dict[str, Any]:
    """The scaling table for the run these overrides train, from a measured GEMM rate and,
    if `rows` were measured over `world` ranks, their all-reduce curve (the doctor's)."""
    w = build(overrides)
    compute = w.compute(tflops, mfu)
    curve = bandwidth.measured(rows, world, latency_s) if rows else None
    # A CPU world is its own curve all the way (nothing published fits it); GPUs use the
    # measured curve up to the world measured, the published DGX figures beyond it.
    top = world if cuda else max(model.GPUS)
    return {"overrides": overrides, **w.describe(), "gemm_tflops": tflops, "mfu": mfu,
            "step_s": compute.step_s, "overlap": cuda, "latency_s": latency_s,
            "table": model.table(compute, w.bucket_bytes, model.GPUS, cuda, curve, top)}


def render_forecast(p: dict[str, Any]) -> list[str]:
    if "error" in p:
        return [f"scaling prediction: not made ({p['error']})"]
    return [f"scaling prediction for {' '.join(p['overrides']) or 'the default job'}: "
            f"{p['parameters']:,} parameters, {p['grad_bytes'] / 2**20:.1f} MiB of gradients in "
            f"{len(p['bucket_bytes'])} buckets, {p['micro_batch_per_rank']} samples per GPU; "
            f"step {p['step_s'] * 1e3:.2f} ms at {p['mfu']:g} of {p['gemm_tflops']:.3g} "
            "TFLOP/s (python -m dgxtrain.scaling measures it instead)",
            *("  " + line for line in model.render_table(p["table"]))]
