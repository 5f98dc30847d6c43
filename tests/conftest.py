"""Shared helpers: compose the real config, run the real CLI in real processes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import DictConfig

from dgxtrain.config import compose
from dgxtrain.distributed.env import register_resolvers

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
register_resolvers()

# Launcher variables of an outer job must not leak into the processes tests start; nor the
# W&B service that an in-process run started here (its processes would share it).
_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                "MASTER_PORT", "TORCHELASTIC_RUN_ID", "DGXTRAIN_RUN_ID", "WANDB_SERVICE",
                "DGXTRAIN_LAUNCH_TIME")


def compose_cfg(overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    return compose(overrides)


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in _LAUNCH_VARS and not k.startswith("SLURM_")}
    path = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=path, **extra)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli_args(run_dir: Path, overrides: list[str], nproc: int = 1,
             torchrun_args: tuple[str, ...] = (), config_dir: Path | None = None) -> list[str]:
    """`python -m dgxtrain` (nproc=1) or `torchrun --standalone` with nproc CPU ranks; a
    user's own `--config-dir` if given. No tracker unless the overrides name one (the last
    `logger=` wins): W&B's start and finish cost each run about 2 s, and its tests say
    logger=wandb."""
    launcher = ([sys.executable, "-m", "dgxtrain"] if nproc == 1 else
                [sys.executable, "-m", "torch.distributed.run", "--standalone",
                 f"--nproc_per_node={nproc}", *torchrun_args, "-m", "dgxtrain"])
    extra = [f"--config-dir={config_dir}"] if config_dir else []
    return launcher + extra + ["device=cpu", "logger=none", f"hydra.run.dir={run_dir}", *overrides]


def children(pid: int) -> list[int]:
    """The live child processes of `pid` (from /proc)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if stat.read_text().rsplit(")", 1)[1].split()[1] == str(pid):
                out.append(int(stat.parent.name))
        except OSError:  # gone meanwhile
            continue
    return out


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants, like a node going away. torchrun starts
    each worker in a session of its own, so a process-group kill would miss them."""
    todo, tree = [pid], []
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(children(p))
    for p in tree:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def run_cli(run_dir: Path, overrides: list[str], nproc: int = 1, timeout: float = 300,
            env: dict[str, str] | None = None, torchrun_args: tuple[str, ...] = (),
            config_dir: Path | None = None) -> subprocess.CompletedProcess:
    args = cli_args(run_dir, overrides, nproc, torchrun_args, config_dir)
    with subprocess.Popen(args, cwd=ROOT, env=env or clean_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True) as p:
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_tree(p.pid)  # the workers too, not only torchrun
            p.communicate()
            raise
    return subprocess.CompletedProcess(args, p.returncode, out, err)


def run_ok(run_dir: Path, overrides: list[str], nproc: int = 1,
           torchrun_args: tuple[str, ...] = (), config_dir: Path | None = None) -> dict:
    p = run_cli(run_dir, overrides, nproc, torchrun_args=torchrun_args, config_dir=config_dir)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return json.loads((run_dir / "summary.json").read_text())


def dgxtrain_lines(p: subprocess.CompletedProcess) -> list[str]:
    """The lines dgxtrain prints itself for a failure (torchrun's summary quotes them)."""
    return [ln for ln in (p.stdout + p.stderr).splitlines() if ln.startswith("dgxtrain:")]


def closes_torchrun_summary(p: subprocess.CompletedProcess, line: str) -> None:
    """torchrun's failure summary, printed last, ends with the root cause, whose traceback
    field is `line` (the failed rank's error file)."""
    tail = p.stderr.rstrip().splitlines()
    assert tail[-1].startswith("=====") and tail[-2] == f"  traceback : {line}", tail[-12:]
    assert "Root Cause (first observed failure):" in tail[-10:]


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: Path) -> list[float]:
    return [m["train/loss"] for m in read_metrics(run_dir) if "train/loss" in m]


@pytest.fixture(autouse=True)
def _no_launcher_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in _LAUNCH_VARS:
        monkeypatch.delenv(k, raising=False)
    for k in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(k, raising=False)


# A small synthetic run that trains visibly in 25 steps: test_ddp compares its ranks with one
# process, test_comm its gradient all-reduces with each other.
SMALL = ["data.dim=16", "model.hidden_dim=64", "data.num_samples=1000", "data.eval_samples=256",
         "trainer.max_steps=25", "trainer.warmup_steps=3", "trainer.log_every=1",
         "trainer.global_batch_size=64", "seed=7"]
ADAMW = ["optim=adamw", "optim.lr=3e-3"]


@pytest.fixture(scope="session")
def adamw_two_ranks(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """SMALL with AdamW on 2 torchrun ranks and the default gradient all-reduce."""
    d = tmp_path_factory.mktemp("adamw_two_ranks")
    p = run_cli(d, SMALL + ADAMW, nproc=2)
    assert p.returncode == 0, p.stderr[-3000:]
    return d, p
