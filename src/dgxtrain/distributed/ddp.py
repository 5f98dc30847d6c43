"""DDP: the wrapper, its gradient hook, and its no_sync switch.

DDP splits the gradients into buckets and all-reduces each as soon as the backward pass
has filled it. On GPUs NCCL does that on its own stream, behind the rest of the backward;
on CPU ranks gloo does it. `dist.comm_hook=auto` takes the backend's own all-reduce on
every device, so CPU runs test the path GPU runs take; on GPUs it runs inside a hook that
times it with CUDA events (distributed/comm_timer.py). Two hooks are opt-in: bf16 compression
(NCCL) and the shared-memory sum for CPU ranks on one host (distributed/shm.py).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel as DDP

from dgxtrain.config import DistConfig
from dgxtrain.distributed.comm_timer import CommTimer
from dgxtrain.distributed.env import DistEnv
from dgxtrain.distributed.shm import ShmAllReduce
from dgxtrain.errors import ConfigError

log = logging.getLogger(__name__)


def wrap(model: torch.nn.Module, env: DistEnv, cfg: DistConfig, hosts: list[str],
         uses_no_sync: bool) -> DDP:
    """DDP with the knobs of `dist` (see config.DistConfig) and its gradient hook.
    `uses_no_sync`: gradient accumulation or the compile probe will call no_sync()."""
    # DDP's static graph breaks on a backward under no_sync() (an internal assert), and it
    # assumes the used parameters never change.
    static_graph = cfg.static_graph and not uses_no_sync and not cfg.find_unused_parameters
    ddp = DDP(model, device_ids=[env.device.index] if env.device.type == "cuda" else None,
              bucket_cap_mb=cfg.bucket_cap_mb,
              find_unused_parameters=cfg.find_unused_parameters,
              # Gradients live in the buckets: no copy into them, no copy out.
              gradient_as_bucket_view=cfg.gradient_as_bucket_view,
              # The graph is the same every step: DDP stops re-checking which parameters
              # got gradients, and fixes its bucket order after the first step.
              static_graph=static_graph)
    hook = choose_hook(cfg.comm_hook, env, model, hosts)
    if hook == "shm":
        shm = ShmAllReduce.create(env, model)
        if shm is not None:
            ddp.register_comm_hook(shm, ShmAllReduce.hook)
        else:
            hook = "allreduce"
    elif env.device.type == "cuda":
        # The same all-reduce (sum of the gradients / world size) as DDP's built-in one, with
        # device events around it: DDP's own timing on GPUs is of the enqueue, not of NCCL.
        # bf16 halves the bytes on the wire and rounds every gradient to bf16 once: not the
        # fp32 maths of the other hooks, so never chosen by auto.
        inner = (default_hooks.bf16_compress_hook if hook == "bf16"
                 else default_hooks.allreduce_hook)
        ddp.register_comm_hook(CommTimer(inner, None), CommTimer.hook)
    log.info("DDP: gradient all-reduce by %s, buckets of %g MB, gradient_as_bucket_view=%s, "
             "static_graph=%s", hook, cfg.bucket_cap_mb, cfg.gradient_as_bucket_view,
             static_graph)
    return ddp


@contextlib.contextmanager
def naming_unused_parameters() -> Iterator[None]:
    """DDP's error for a step that left parameters without a gradient (a model with a
    branch some steps skip), as one line naming the setting."""
    try:
        yield
    except RuntimeError as e:
        text = str(e)
        if "Expected to have finished reduction in the prior iteration" not in text:
            raise
        raise ConfigError("dist.find_unused_parameters", False, "the model left parameters "
                          "without a gradient in a step (DDP: " + text.splitlines()[0][:90] +
                          "...)", "set dist.find_unused_parameters=true for a model whose "
                          "used parameters change between steps") from e


def choose_hook(name: str, env: DistEnv, model: torch.nn.Module, hosts: list[str]) -> str:
    """auto: the backend's own all-reduce (NCCL on GPUs, gloo on CPU), on every device."""
    if name == "shm" and not (env.device.type == "cpu" and len(set(hosts)) == 1
                              and env.world_size > 1
                              and all(p.dtype == torch.float32 for p in model.parameters())):
        raise ConfigError("dist.comm_hook", name, "shared memory needs two or more CPU ranks "
                          "all on one host and fp32 parameters", "use dist.comm_hook=auto")
    if name == "bf16" and env.device.type != "cuda":
        raise ConfigError("dist.comm_hook", name, "bf16 compression needs NCCL (CUDA GPUs); "
                          "gloo cannot sum bf16", "use dist.comm_hook=auto on CPU")
    return "allreduce" if name == "auto" else name


def grad_sync(model: torch.nn.Module, enabled: bool) -> contextlib.AbstractContextManager:
    """DDP all-reduces gradients on every backward unless told not to (no_sync)."""
    if enabled or not hasattr(model, "no_sync"):
        return contextlib.nullcontext()
    return model.no_sync()


def comm_wait_s(model: torch.nn.Module) -> float:
    """How long a recent all-reducing backward waited for its all-reduce after its own
    compute ended: on GPUs the device's events around the last bucket (distributed/comm_timer.py);
    the shared-memory hook's barrier time in the last backward; or on CPU what DDP's runtime
    logging sampled (DDP files a sampled step's figures at the next forward, so they are of
    an earlier step). 0 where there is no DDP."""
    timer = hook_state(model, CommTimer)
    if timer is not None:
        return timer.last_wait_s()
    shm = shm_state(model)
    if shm is not None:
        return shm.last_wait_s
    ddp = getattr(model, "_orig_mod", model)  # under torch.compile
    if not hasattr(ddp, "_get_ddp_logging_data"):
        return 0.0
    data = ddp._get_ddp_logging_data()
    comm_end = data.get("backward_comm_time_end")
    compute_end = data.get("backward_compute_time_end")
    if not comm_end or not compute_end:
        return 0.0
    return max(0.0, (comm_end - compute_end) / 1e9)


def hook_state(model: torch.nn.Module, kind: type) -> Any:
    """The state of a DDP model's comm hook (compiled or not) if it is a `kind`, else None."""
    ddp = getattr(model, "_orig_mod", model)
    for _, state in getattr(ddp, "_comm_hooks", []):
        if isinstance(state, kind):
            return state
    return None


def shm_state(model: torch.nn.Module) -> ShmAllReduce | None:
    """The shared-memory hook of a DDP model (compiled or not), if it has one."""
    return hook_state(model, ShmAllReduce)
