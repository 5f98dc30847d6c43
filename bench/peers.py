"""The bench's peer loops: the same step written as a Lightning Fabric user and a Hugging Face
Accelerate user write it, on the trainer's model, data, optimizer, schedule and clipping.

Each is tuned as its documentation tunes DDP (the reference loop's DDP options: the
trainer's bucket size, gradients as bucket views, static graph) and left to choose its own
device and precision plumbing. The LR schedule is stepped by hand in both: Accelerate's
prepared scheduler would step once per process. Neither package is a dependency of
dgxtrain: a loop whose package is missing is left out, and the bench says so.
"""

from __future__ import annotations

import importlib.util
import math
import os
from typing import Any

import torch
from hydra.utils import instantiate

from bench.common import PlainLoop, feed
from dgxtrain.loop.build import Job
from dgxtrain.loop.optim import build_scheduler
from dgxtrain.observe.perf import NULL_CLOCK, PhaseClock


def _ddp_options(job: Job) -> dict[str, Any]:
    return {"bucket_cap_mb": job.cfg.dist.bucket_cap_mb, "gradient_as_bucket_view": True,
            "static_graph": True}


class _Peer(PlainLoop):
    """What both peers share: the trainer's initial weights, optimizer, schedule and feed,
    and the step; each peer wraps the model and does the backward and clipping its way."""

    def __init__(self, job: Job):
        cfg = job.cfg
        torch.manual_seed(cfg.seed)  # the trainer's initial weights (build_job seeds alike)
        self.model = job.task.build_model().to(job.env.device)
        self.optimizer = instantiate(cfg.optim, params=self.model.parameters(),
                                     _convert_="all")
        t = cfg.trainer
        self.scheduler = build_scheduler(self.optimizer, t.warmup_steps, t.max_steps,
                                         t.min_lr_ratio)
        self.clip, self.feed = t.grad_clip or math.inf, feed(job)
        self.distributed = job.env.launcher != "single"
        self.forward: torch.nn.Module = self.model  # the wrapped model, set by each peer

    def step(self, step: int, clock: PhaseClock = NULL_CLOCK) -> None:
        x, y = self.feed(step)[0]
        clock.mark("data")
        self.backward(torch.nn.functional.mse_loss(self.forward(x).float(), y))
        clock.mark("fwd_bwd")
        self.clip_gradients()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        clock.mark("optim")


class FabricLoop(_Peer):
    def __init__(self, job: Job):
        super().__init__(job)
        package = _installed(FABRIC)
        Fabric = importlib.import_module(package).Fabric
        DDPStrategy = importlib.import_module(f"{package}.strategies").DDPStrategy
        env = job.env
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", env.world_size))
        strategy = (DDPStrategy(process_group_backend=env.backend, **_ddp_options(job))
                    if self.distributed else "auto")
        self.fabric = Fabric(
            accelerator=env.device.type, devices=per_node, num_nodes=env.world_size // per_node,
            strategy=strategy,
            precision="bf16-mixed" if job.cfg.trainer.precision == "bf16" else "32-true")
        self.fabric.launch()  # the process group dgxtrain joined is reused
        self.forward, self.optimizer = self.fabric.setup(self.model, self.optimizer)
        self.ddp = self.forward._forward_module  # the DDP itself, for the bench's timers

    def backward(self, loss: torch.Tensor) -> None:
        self.fabric.backward(loss)

    def clip_gradients(self) -> None:
        self.fabric.clip_gradients(self.forward, self.optimizer, max_norm=self.clip)


class AccelerateLoop(_Peer):
    def __init__(self, job: Job):
        super().__init__(job)
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs
        self.accelerator = Accelerator(
            cpu=job.env.device.type == "cpu",
            mixed_precision="bf16" if job.cfg.trainer.precision == "bf16" else "no",
            kwargs_handlers=[DistributedDataParallelKwargs(**_ddp_options(job))])
        self.ddp, self.optimizer = self.accelerator.prepare(self.model, self.optimizer)
        self.forward = self.ddp

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)

    def clip_gradients(self) -> None:
        self.accelerator.clip_grad_norm_(self.ddp.parameters(), self.clip)


# Fabric is its own package (lightning-fabric) and part of the `lightning` one.
FABRIC = ("lightning_fabric", "lightning.fabric")
PEERS = {"fabric": (FABRIC, FabricLoop), "accelerate": (("accelerate",), AccelerateLoop)}


def _installed(modules: tuple[str, ...]) -> str | None:
    """The first of these modules that can be imported here."""
    for name in modules:
        try:
            if importlib.util.find_spec(name) is not None:
                return name
        except ModuleNotFoundError:  # lightning.fabric without lightning
            pass
    return None


def peer_loops(job: Job) -> tuple[dict[str, Any], dict[str, str]]:
    """The peer loops whose package is installed, and why each other one is left out."""
    loops, missing = {}, {}
    for name, (modules, loop) in PEERS.items():
        if _installed(modules) is None:
            missing[name] = (f"{' or '.join(modules)} is not installed (pip install "
                             f"{modules[0].replace('_', '-')})")
            continue
        loops[name] = loop(job)
    return loops, missing
