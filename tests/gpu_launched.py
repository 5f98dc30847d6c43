"""Run by tests/test_gpu.py under `torchrun --nproc_per_node=1`: dgxtrain's loop as train()
builds it (NCCL process group, DDP, torch.compile, the bf16 gradient hook timed by CUDA
events, the stop vote, every component), its host syncs counted over steps that decide
nothing.
    gpu_launched.py OUT_JSON"""

import json
import socket
import sys
import warnings

import torch
import torch.distributed as tdist
from torch.nn.parallel import DistributedDataParallel as DDP

from bench.common import TrainerLoop, build, tool_world
from dgxtrain.distributed import ddp
from dgxtrain.distributed.collectives import gather_objects
from dgxtrain.distributed.comm_timer import CommTimer
from dgxtrain.distributed.env import DistEnv

OVERRIDES = ["data.dim=256", "model.hidden_dim=1024", "trainer.precision=bf16",
             "trainer.compile=true", "dist.comm_hook=bf16", "trainer.log_every=1000",
             "checkpoint.every_steps=1000", "trainer.eval_every=0", "logger=none"]

env = DistEnv.from_env("cuda")
with tool_world(env, "dgxtrain-gpu-") as (tmp, watchdog):
    hosts = gather_objects(socket.gethostname())
    job = build(OVERRIDES, 256, env, tmp, watchdog)
    trainer = TrainerLoop(job, hosts)
    trainer.run(5)  # compilation, DDP's bucket rebuild, the optimizer's lazy state
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.run(10)  # steps 6..15: no log, save or eval decides on them
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    inner = getattr(job.wrapped, "_orig_mod", job.wrapped)
    out = {"backend": tdist.get_backend(), "compiled": inner is not job.wrapped,
           "ddp": isinstance(inner, DDP), "device": str(env.device),
           "timed": ddp.hook_state(job.wrapped, CommTimer) is not None,
           "comm_wait_s": ddp.comm_wait_s(job.wrapped),  # events of step 15, synced above
           "syncs": [str(w.message) for w in caught if "synchroniz" in str(w.message)],
           "finite": all(torch.isfinite(p).all().item() for p in job.model.parameters())}
    trainer.loop.stopping.close(trainer.loop.state)
with open(sys.argv[1], "w") as f:
    json.dump(out, f)
