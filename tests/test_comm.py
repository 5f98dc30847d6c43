"""How gradients are all-reduced: the shared-memory hook gives gloo's bits, and where each
hook may run; the threads a rank gets."""

import json
import os
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
