"""How gradients are all-reduced: the shared-memory hook gives gloo's bits, and where each
hook may run; the threads a rank gets."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dgxtrain import comm, dist
from dgxtrain.config import ConfigError
from dgxtrain.dist import DistEnv
from tests.conftest import clean_env, run_cli
from tests.test_ddp import SMALL


def _env(device: str = "cpu", world: int = 2) -> DistEnv:
    return DistEnv(0, 0, world, "torchrun", torch.device(device))


def test_auto_takes_shared_memory_only_where_it_works():
    model = torch.nn.Linear(4, 1)
    assert comm.choose_hook("auto", _env(), model, ["a", "a"]) == "shm"
    assert comm.choose_hook("auto", _env(), model, ["a", "b"]) == "allreduce"  # two hosts
    assert comm.choose_hook("auto", _env(world=1), model, ["a"]) == "allreduce"
    assert comm.choose_hook("auto", _env("cuda"), model, ["a", "a"]) == "allreduce"  # NCCL
    assert comm.choose_hook("auto", _env(), model.double(), ["a", "a"]) == "allreduce"
    with pytest.raises(ConfigError, match="dist.comm_hook=shm: .*one host.*fix"):
        comm.choose_hook("shm", _env(), model.float(), ["a", "b"])
    with pytest.raises(ConfigError, match="dist.comm_hook=bf16: .*NCCL"):
        comm.choose_hook("bf16", _env(), model, ["a", "a"])


def test_threads_per_rank_are_the_cores_it_owns(monkeypatch):
    owned = len(os.sched_getaffinity(0))
    assert dist.cores_per_rank() == owned  # one process owns them all
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(owned))
    assert dist.cores_per_rank() == 1  # torchrun: its ranks share the affinity
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(owned * 4))
    assert dist.cores_per_rank() == 1  # never 0
    for k in ("RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(k)
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "1")
    assert dist.cores_per_rank() == 1  # srun says how many


@pytest.mark.multiprocess
def test_shared_memory_all_reduce_gives_the_bits_of_gloo(tmp_path):
    # Two ranks: each bucket is (a/2) + (b/2), in either order the same float.
    shas = {}
    for hook in ("shm", "allreduce"):
        p = run_cli(tmp_path / hook, [*SMALL, "optim=adamw", f"dist.comm_hook={hook}"], nproc=2)
        assert p.returncode == 0, p.stderr[-3000:]
        assert f"gradient all-reduce by {hook}" in p.stderr
        shas[hook] = json.loads((tmp_path / hook / "summary.json").read_text())["param_sha256"]
    assert shas["shm"] == shas["allreduce"]
    # Nothing is left in /dev/shm: the file is unlinked as soon as every rank mapped it.
    assert not list(Path("/dev/shm").glob("dgxtrain-*"))
    # Where the shared file cannot be made, every rank falls back to gloo, with one warning.
    p = run_cli(tmp_path / "fallback", [*SMALL, "optim=adamw"], nproc=2,
                env=clean_env(DGXTRAIN_SHM_DIR=str(tmp_path / "missing")))
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stderr.count("shared-memory gradient all-reduce unavailable") == 1
    assert "gradient all-reduce by allreduce" in p.stderr
    fallback = json.loads((tmp_path / "fallback" / "summary.json").read_text())["param_sha256"]
    assert fallback == shas["allreduce"]


VOTES_SCRIPT = """
import gc, json, sys
import torch, torch.distributed as tdist
from omegaconf import OmegaConf
from dgxtrain import comm, dist
from dgxtrain.config import DistConfig
env = dist.DistEnv.from_env("cpu")
with dist.process_group(env, timeout_s=60):
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 1)
    cfg = OmegaConf.structured(DistConfig(comm_hook=sys.argv[1]))
    ddp = comm.wrap(model, env, cfg, ["host"] * env.world_size, uses_no_sync=True)
    calls = []
    original = tdist.all_reduce
    tdist.all_reduce = lambda *a, **k: calls.append(1) or original(*a, **k)
    out = {}
    for name, sync in (("synced", True), ("no_sync", False)):
        votes = comm.StepVotes(ddp, torch.tensor([float(env.rank == 0), float(env.rank == 1)]))
        with dist.grad_sync(ddp, sync):
            ddp(torch.randn(4, 8)).sum().backward()
        calls.clear()
        flags = votes.flags(torch.tensor([0.0]))
        out[name] = {"flags": flags.tolist(), "collectives_after": len(calls)}
    # As train() does: DDP's reducer freed after the group would join gloo's threads
    # with the GIL held.
    del ddp
    gc.collect()
    if env.rank == 0:
        print(json.dumps(out))
"""


@pytest.mark.multiprocess
@pytest.mark.parametrize("hook", ["shm", "allreduce"])
def test_step_votes_are_summed_over_ranks_riding_on_the_shared_memory_barrier(tmp_path, hook):
    script = tmp_path / "votes.py"
    script.write_text(VOTES_SCRIPT)
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc_per_node=2", str(script), hook], env=clean_env(),
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    # Rank 0 voted [1, 0], rank 1 [0, 1]: every rank sees both, then its own local flag.
    assert out["synced"]["flags"] == out["no_sync"]["flags"] == [1.0, 1.0, 0.0]
    # Shared memory: the votes rode on the barrier the gradients needed anyway, none after
    # the backward; gloo's all-reduce cannot carry them: one collective of their own.
    assert out["synced"]["collectives_after"] == (0 if hook == "shm" else 1)
    # A backward that all-reduces nothing (no_sync) carries no votes: they go on their own.
    assert out["no_sync"]["collectives_after"] == 1
