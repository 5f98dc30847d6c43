"""The run dir's name: the same for the same config, whatever says only how or how long it
runs; DGXTRAIN_RUN_ID, run_name and the SLURM job id before it."""

import pytest

from dgxtrain.config.identity import config_digest, run_name
from dgxtrain.errors import ConfigError
from tests.conftest import compose_cfg


def test_the_digest_follows_what_is_trained_not_how_it_runs():
    base = config_digest(compose_cfg(["experiment=smoke"]))
    assert base == config_digest(compose_cfg(["experiment=smoke"]))
    # How long, how often, where to, with which faults: the same run, launched again.
    for how in (["trainer.max_steps=999"], ["logger=none"], ["fault.crash_at_step=3"],
                ["checkpoint.every_steps=7", "checkpoint.resume=never"], ["device=cpu"],
                ["dist.timeout_s=9"], ["trainer.log_every=3"], ["run_name=x"]):
        assert config_digest(compose_cfg(["experiment=smoke", *how])) == base, how
    # A user's datasets: their loader's processes say how, the datasets what.
    mine = ["experiment=digits"]
    base = config_digest(compose_cfg(mine))
    for how in (["data.num_workers=4"], ["data.start_method=spawn", "data.prefetch_factor=8"]):
        assert config_digest(compose_cfg([*mine, *how])) == base, how
    assert config_digest(compose_cfg([*mine, "data.train.augment=false"])) != base
    # What is trained: another run.
    for what in (["optim.lr=0.5"], ["seed=1"], ["model.hidden_dim=7"], ["data.dim=3"],
                 ["trainer.global_batch_size=64"]):
        assert config_digest(compose_cfg(["experiment=smoke", *what])) != base, what


def test_the_name_is_the_launchers_the_users_or_the_configs():
    cfg = compose_cfg(["experiment=smoke"])
    assert run_name(cfg, {}) == f"run-{config_digest(cfg)}"
    assert run_name(cfg, {"SLURM_JOB_ID": "77"}) == "slurm-77"  # kept across requeues
    named = compose_cfg(["experiment=smoke", "run_name=mine"])
    assert run_name(named, {"SLURM_JOB_ID": "77"}) == "mine"
    assert run_name(named, {"DGXTRAIN_RUN_ID": "theirs"}) == "theirs"


@pytest.mark.parametrize("bad", ["../up", "a/b", ".hidden", "-x", "with space"])
def test_a_run_name_that_is_not_a_directory_name_is_refused(bad):
    with pytest.raises(ConfigError, match=r"run_name=.*not a directory name.*fix: "):
        run_name(compose_cfg(["experiment=smoke", f"run_name='{bad}'"]), {})
