"""Every experiment composes and validates; every bad input is one line and exit 2,
before any process group could start."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from dgxtrain.config import TrainerConfig, load
from dgxtrain.errors import ConfigError
from tests.conftest import (
    CONF,
    ROOT,
    clean_env,
    cli_args,
    closes_torchrun_summary,
    compose_cfg,
    dgxtrain_lines,
    free_port,
    run_cli,
)

EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


def test_there_are_experiments():
    assert {"smoke", "dgx_8gpu"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_composes_and_validates(name):
    cfg = compose_cfg([f"experiment={name}"])
    world = 8 if name.startswith("dgx") else 2
    config, spec = load(cfg, world_size=world, cuda_available=True)
    assert isinstance(config.trainer, TrainerConfig)  # typed: the code reads dataclasses
    assert spec.global_batch_size == spec.micro_batch_size * world * spec.grad_accum_steps
    OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)


def test_grad_accum_is_derived():
    cfg = compose_cfg(["trainer.global_batch_size=64", "trainer.micro_batch_size=8"])
    assert load(cfg, 2, False)[1].grad_accum_steps == 4
    cfg = compose_cfg(["trainer.global_batch_size=64"])  # micro null: global / world
    spec = load(cfg, 4, False)[1]
    assert (spec.micro_batch_size, spec.grad_accum_steps) == (16, 1)


def test_validation_names_key_and_fix():
    cfg = compose_cfg(["trainer.global_batch_size=30", "trainer.micro_batch_size=4"])
    with pytest.raises(ConfigError) as e:
        load(cfg, world_size=2, cuda_available=False)
    assert e.value.key == "trainer.global_batch_size"
    assert "micro_batch_size * world_size = 4 * 2 = 8" in str(e.value)
    assert "fix: use a multiple of 8" in str(e.value)


BAD = [
    # (overrides, key the message must name, fix it must suggest)
    (["trainer.max_step=10"], "trainer.max_step", "trainer.max_steps"),
    (["trainer.max_steps=ten"], "trainer.max_steps", "fix:"),
    (["trainer.compile=maybe"], "trainer.compile", "fix:"),
    (["trainer.global_batch_size=48", "trainer.micro_batch_size=16"],
     "trainer.global_batch_size", "multiple of 32"),
    (["trainer.global_batch_size=33"], "trainer.global_batch_size", "multiple of 2"),
    (["optim.lr=0"], "optim.lr", "positive"),
    (["optim=sgd", "optim.lr=-0.1"], "optim.lr", "positive"),
    (["trainer.max_steps=-5"], "trainer.max_steps", ">= 1"),
    (["trainer.global_batch_size=0"], "trainer.global_batch_size", ">= 1"),
    (["trainer.micro_batch_size=0"], "trainer.micro_batch_size", ">= 1"),
    (["device=cuda"], "device=cuda", "device=cpu"),
    (["trainer.precision=fp16"], "trainer.precision=fp16", "trainer.precision=bf16"),
    (["model=transformer"], "model=transformer", "linear, mlp"),
    (["model._target_=nowhere.Net"], "model._target_=nowhere.Net", "dotted path"),
    (["optim._target_=torch.optim.RMSprop"], "optim._target_=torch.optim.RMSprop",
     "optim.* keys"),
    (["logger.backend=tensorboard"], "logger.backend=tensorboard", "logger=none"),
    (["preemption.signals=[SIGUSR1]"], "preemption.signals", "names without SIG"),
    (["preemption.poll_s=0"], "preemption.poll_s", "seconds > 0"),
    # A user's first day (issue 21): each used to train the default, trace back or crash.
    (["experiment=smok"], "experiment=smok", "did you mean experiment=smoke?"),
    (["seed=1e20"], "seed=1e+20", "schema's type"),
    (["dist.threads_per_rank=100000"], "dist.threads_per_rank=100000", "at most"),
    (["experiment=digits", "~data.eval"], "~data.eval: cannot be deleted", "set data.eval"),
    (["run_name=my", "run"], "Error parsing override 'run'", "quote a value with spaces"),
]


@pytest.fixture(scope="module")
def bad_runs(tmp_path_factory) -> tuple[Path, list[dict]]:
    """Each BAD case as `python -m dgxtrain` run by rank 0 of a 2-rank job whose rank 1
    never comes: joining the process group would hang until the timeout, so a prompt exit
    proves the error came before it. One process imports the CLI and forks a child per case
    (tests/forked_cli.py): the CLI's own exit code and output, one import of torch."""
    root = tmp_path_factory.mktemp("bad")
    cases = []
    for i, (overrides, _, _) in enumerate(BAD):
        env = clean_env(RANK="0", LOCAL_RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                        MASTER_PORT=str(free_port()), DGXTRAIN_RUN_ID="bad")
        args = cli_args(root / str(i), [o for o in overrides if not o.startswith("device=")])
        args += ["device=cuda"] if "device=cuda" in overrides else []
        cases.append({"argv": args[3:], "env": env})  # after python -m dgxtrain
    (root / "cases.json").write_text(json.dumps(cases))
    subprocess.run([sys.executable, "-m", "tests.forked_cli", str(root / "cases.json"),
                    str(root / "out.json")], cwd=ROOT, env=clean_env(), check=True,
                   timeout=60 * len(cases))
    return root, json.loads((root / "out.json").read_text())


@pytest.mark.parametrize("case", range(len(BAD)), ids=[" ".join(b[0]) for b in BAD])
def test_bad_input_fails_fast_with_one_line(bad_runs, case):
    root, results = bad_runs
    _, key, fix = BAD[case]
    code, output = results[case]["code"], results[case]["output"]
    assert code == 2, output
    lines = [ln for ln in output.splitlines() if ln.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("dgxtrain: config error: ") and "Traceback" not in output
    assert key in lines[0] and "fix:" in lines[0] and fix in lines[0], lines[0]
    assert not (root / str(case) / "metrics.jsonl").exists()


def test_an_output_dir_that_cannot_be_made(tmp_path):
    p = subprocess.run([sys.executable, "-m", "dgxtrain", "device=cpu", "logger=none"],
                       cwd=ROOT, env=clean_env(DGXTRAIN_OUTPUT_ROOT="/proc/no/outputs"),
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    [line] = (p.stdout + p.stderr).strip().splitlines()
    assert line.startswith("dgxtrain: config error: hydra.run.dir: cannot create /proc/no")
    assert "fix: choose a writable dir" in line


def test_config_error_under_torchrun_is_printed_once_and_closes_its_summary(tmp_path):
    p = run_cli(tmp_path / "run", ["trainer.global_batch_size=33"], nproc=2, timeout=120)
    assert p.returncode != 0
    [line] = dgxtrain_lines(p)  # rank 0's: every rank meets it, and only rank 0 says it
    assert line.startswith("dgxtrain: config error: trainer.global_batch_size=33")
    closes_torchrun_summary(p, line)


def test_range_checks_live_with_their_fields():
    # The dataclass checks itself, whoever builds it: a test, a tool, or load().
    with pytest.raises(ConfigError, match=r"trainer.max_skipped=0: must be positive"):
        TrainerConfig(max_skipped=0)
    with pytest.raises(ConfigError, match=r"trainer.nonfinite=warn: .*trainer.nonfinite=skip"):
        TrainerConfig(nonfinite="warn")
    assert TrainerConfig(max_steps=3).max_steps == 3
