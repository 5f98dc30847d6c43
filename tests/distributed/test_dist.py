"""DistEnv reads torchrun, srun or nothing, and refuses a half-set environment."""

import pytest
import torch

from dgxtrain.distributed import slurm
from dgxtrain.distributed.env import DistEnv, shared_run_id
from dgxtrain.errors import DistEnvError

TORCHRUN = dict(RANK="3", WORLD_SIZE="8", LOCAL_RANK="1", MASTER_ADDR="node1",
                MASTER_PORT="29400")
SRUN = dict(SLURM_STEP_ID="0", SLURM_PROCID="5", SLURM_NTASKS="16", SLURM_LOCALID="5",
            SLURM_JOB_NODELIST="dgx[07-08]", SLURM_NNODES="2", SLURM_JOB_ID="4242")


def _set(monkeypatch, env):
    for k, v in env.items():
        monkeypatch.setenv(k, v)


def test_single_process_without_launcher():
    env = DistEnv.from_env("cpu")
    assert (env.rank, env.world_size, env.launcher, env.backend) == (0, 1, "single", "gloo")
    assert env.is_main and env.device == torch.device("cpu")


def test_torchrun_environment(monkeypatch):
    _set(monkeypatch, TORCHRUN)
    env = DistEnv.from_env("cpu")
    assert (env.rank, env.local_rank, env.world_size) == (3, 1, 8)
    assert (env.master_addr, env.master_port, env.launcher) == ("node1", 29400, "torchrun")
    assert not env.is_main


def test_srun_environment_uses_first_node_and_job_port(monkeypatch):
    _set(monkeypatch, SRUN)
    asked = []
    monkeypatch.setattr(slurm, "_scontrol", lambda *a: asked.append(a) or
                        "NodeName=dgx07 Arch=x86_64 NodeAddr=10.1.0.7 NodeHostName=dgx07")
    env = DistEnv.from_env("cpu")
    assert (env.rank, env.local_rank, env.world_size, env.launcher) == (5, 5, 16, "slurm")
    assert env.master_addr == "10.1.0.7" and asked == [("show", "node", "-o", "dgx07")]
    assert env.master_port == 15000 + 4242 % 20000


def test_srun_tasks_of_the_batch_script_meet_where_it_says(monkeypatch):
    # slurm/train.sbatch exports MASTER_ADDR/PORT for srun tasks: that is not half a torchrun.
    _set(monkeypatch, {**SRUN, "MASTER_ADDR": "10.1.0.7", "MASTER_PORT": "17000"})
    monkeypatch.setattr(slurm, "_scontrol", lambda *a: pytest.fail("asked scontrol"))
    env = DistEnv.from_env("cpu")
    assert (env.launcher, env.rank, env.master_addr, env.master_port) == (
        "slurm", 5, "10.1.0.7", 17000)


def test_torchrun_inside_srun_wins(monkeypatch):
    _set(monkeypatch, {**SRUN, **TORCHRUN})
    assert DistEnv.from_env("cpu").launcher == "torchrun"


def test_batch_script_without_srun_is_one_process(monkeypatch):
    _set(monkeypatch, {k: v for k, v in SRUN.items() if k != "SLURM_STEP_ID"})
    env = DistEnv.from_env("cpu")
    assert (env.world_size, env.launcher) == (1, "single")


@pytest.mark.parametrize("drop", ["WORLD_SIZE", "MASTER_PORT", "LOCAL_RANK"])
def test_half_set_torchrun_environment_is_an_error(monkeypatch, drop):
    _set(monkeypatch, {k: v for k, v in TORCHRUN.items() if k != drop})
    with pytest.raises(DistEnvError, match=f"half-set torchrun environment: {drop} unset"):
        DistEnv.from_env("cpu")


def test_half_set_srun_environment_is_an_error(monkeypatch):
    _set(monkeypatch, {k: v for k, v in SRUN.items() if k != "SLURM_LOCALID"})
    with pytest.raises(DistEnvError, match="SLURM_LOCALID"):
        DistEnv.from_env("cpu")


def test_run_id_is_shared_or_refused(monkeypatch):
    def run_id():
        shared_run_id.cache_clear()
        return shared_run_id()

    assert run_id()[:2] == "20"  # a single process: a timestamp
    _set(monkeypatch, TORCHRUN)
    with pytest.raises(DistEnvError, match="cannot agree on a run dir"):
        run_id()
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "abc")
    assert run_id() == "torchrun-abc"
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    assert run_id() == "slurm-77"
    monkeypatch.setenv("DGXTRAIN_RUN_ID", "mine")
    assert run_id() == "mine"
    shared_run_id.cache_clear()
