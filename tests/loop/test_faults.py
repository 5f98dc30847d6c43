"""Failures of real processes: SIGKILL, a crashed rank under torchrun restarts, a change
of world size, a hung rank, a NaN on one rank."""

import json
import subprocess
import time
from pathlib import Path

import pytest
import torch

from tests.checkpoint.test_checkpoint import step_losses
from tests.conftest import (
    ROOT,
    children,
    clean_env,
    cli_args,
    closes_torchrun_summary,
    dgxtrain_lines,
    kill_tree,
    run_cli,
    run_ok,
)

pytestmark = pytest.mark.multiprocess

# Constant LR, so that a run extended from a checkpoint compares with a straight one.
BASE = ["data.dim=16", "model.hidden_dim=32", "trainer.global_batch_size=64",
        "trainer.warmup_steps=0", "trainer.min_lr_ratio=1.0", "trainer.log_every=1",
        "checkpoint.every_steps=10", "data.eval_samples=128", "trainer.max_steps=40"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """The uninterrupted 2-rank run everything is compared with."""
    d = tmp_path_factory.mktemp("straight")
    run_ok(d, BASE, nproc=2)
    return d


def summary(d: Path) -> dict:
    return json.loads((d / "summary.json").read_text())


def assert_close_run(d: Path, ref: Path, rtol: float = 1e-5) -> None:
    a, b = step_losses(d), step_losses(ref)
    assert a.keys() == b.keys() == set(range(1, 41))
    assert all(abs(a[s] - b[s]) <= rtol * abs(b[s]) for s in a), (a, b)
    pa = torch.load(d / "model.pt", weights_only=True)
    pb = torch.load(ref / "model.pt", weights_only=True)
    for k in pb:
        assert ((pa[k] - pb[k]).norm() / pb[k].norm()).item() <= rtol, k


def _wait_gone(pid: int, timeout: float = 10) -> None:
    """Until `pid` has exited (a zombie waiting for init to reap it counts as exited)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return
        except OSError:
            return
        time.sleep(0.1)
    raise AssertionError(f"rank process {pid} survived the kill")


def test_sigkill_after_a_checkpoint_then_restart_is_bit_exact(tmp_path, straight):
    run = tmp_path / "run"
    # Every rank stops at step 25 (after step-20 is saved) so that the kill lands mid-run.
    over = BASE + ["fault.hang_at_step=25", "fault.rank=-1"]
    job = subprocess.Popen(cli_args(run, over, nproc=2), cwd=ROOT, env=clean_env(),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = run / "faults" / "hang_at_step.rank0"
    deadline = time.time() + 120
    while not marker.exists() and time.time() < deadline and job.poll() is None:
        time.sleep(0.2)
    assert marker.exists(), "the job never reached step 25"
    workers = children(job.pid)
    assert len(workers) == 2
    kill_tree(job.pid)  # torchrun and both ranks at once, like a lost node
    job.wait()
    for w in workers:
        _wait_gone(w)
    assert not (run / "summary.json").exists()
    s = run_ok(run, over, nproc=2)  # the same command again
    assert s["resumed_from_step"] == 20
    assert s["param_sha256"] == summary(straight)["param_sha256"]
    assert step_losses(run) == step_losses(straight)


def test_torchrun_restarts_a_crashed_rank_and_the_run_completes(tmp_path, straight):
    s = run_ok(tmp_path, BASE + ["fault.crash_at_step=25", "fault.rank=1"], nproc=2,
               torchrun_args=("--max-restarts=1",))
    assert (tmp_path / "faults" / "crash_at_step.rank1").exists()  # it did crash
    assert s["resumed_from_step"] == 20 and s["steps"] == 40
    assert s["param_sha256"] == summary(straight)["param_sha256"]


@pytest.mark.parametrize("before,after", [(2, 1), (1, 2)])
def test_resume_on_a_different_world_size(tmp_path, straight, before, after):
    run_ok(tmp_path, BASE + ["trainer.max_steps=20"], nproc=before)
    s = run_ok(tmp_path, BASE, nproc=after)
    assert (s["resumed_from_step"], s["world_size"]) == (20, after)
    assert_close_run(tmp_path, straight)


def test_a_hung_rank_ends_the_job_with_every_stack_written(tmp_path):
    start = time.time()
    p = run_cli(tmp_path, BASE + ["fault.hang_at_step=5", "fault.rank=1", "dist.timeout_s=5"],
                nproc=2, timeout=120)
    elapsed = time.time() - start
    assert p.returncode != 0
    assert elapsed < 5 + 30, elapsed  # timeout plus start-up and a margin
    stacks = {r: (tmp_path / "stacks" / f"rank{r}.txt").read_text() for r in (0, 1)}
    assert "before_step" in stacks[1]  # the hung rank, caught where it hangs
    # The one waiting for it: caught in the loop's collective, or, when the hung rank's own
    # timer (armed a step earlier) ended it first, in train()'s teardown after that
    # collective failed. Either way a dump of its main thread inside train().
    where = [ln for ln in stacks[0].splitlines() if "dgxtrain" in ln or "distributed" in ln]
    assert "loop/train.py" in stacks[0], where
    if "loop/loop.py" in stacks[0]:
        # In a collective of the loop: the step's, the stop vote's (preempt.py), or a log
        # step's start-together all-reduce (perf.py), caught inside it or, once rank 1 died,
        # in c10d's error logging around it.
        assert any(w in stacks[0] for w in ("train_step", "all_reduce", "all_gather",
                                            "distributed/preempt.py", "observe/perf.py")), where


def test_nan_on_one_rank_stops_every_rank_before_the_update(tmp_path):
    p = run_cli(tmp_path, BASE + ["fault.nan_at_step=8", "fault.rank=1"], nproc=2)
    assert p.returncode != 0
    [line] = dgxtrain_lines(p)  # from rank 0: every rank stops alike, after the vote
    assert line.startswith("dgxtrain: stopped: non-finite loss or gradient at step 8, update "
                           "not applied; fix: ")
    closes_torchrun_summary(p, line)
    assert summary(tmp_path)["steps"] == 7
    newest = tmp_path / "checkpoints" / "step-40"
    assert not newest.exists()
    weights = torch.load(tmp_path / "model.pt", weights_only=True)
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_disk_full_on_one_rank_skips_that_checkpoint_on_all(tmp_path):
    s = run_ok(tmp_path, BASE + ["trainer.max_steps=30", "fault.enospc_at_step=20",
                                 "fault.rank=1", "checkpoint.keep_last=3"], nproc=2)
    assert s["steps"] == 30
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-10", "step-30"]


def test_each_rank_logs_to_a_file_of_its_own(tmp_path):
    # Appends from many nodes to one file on a shared file system interleave: rank 0 writes
    # train.log, rank 1 its warnings (here: a skipped non-finite step) to logs/rank1.log.
    run_ok(tmp_path, ["experiment=smoke", "logger=none", "trainer.nonfinite=skip",
                      "fault.nan_at_step=3", "fault.rank=1"], nproc=2)
    main = (tmp_path / "train.log").read_text().splitlines()
    other = (tmp_path / "logs" / "rank1.log").read_text().splitlines()
    assert main and all("[rank0]" in ln for ln in main)
    assert other and all("[rank1]" in ln for ln in other)
    assert any("non-finite step" in ln for ln in other)
