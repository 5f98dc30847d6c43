"""A failed save is never reported as saved: a requeue or final save that fails ends the job
as a checkpoint error naming the file, periodic failures are logged and abort the run after
checkpoint.max_failures in a row; and a finished run, launched again, only says so."""

from __future__ import annotations

import json
import re
import time

import pytest

from tests.conftest import clean_env, read_metrics, run_cli, run_ok

pytestmark = pytest.mark.multiprocess

BASE = ["experiment=smoke", "logger=none", "trainer.log_every=2"]


def _exit_status(run_dir) -> dict:
    return json.loads((run_dir / "control" / "exit.json").read_text())


def test_a_requeue_whose_save_fails_is_a_checkpoint_error(tmp_path):
    # The SLURM deadline a minute away (within the margin): stop for requeue after step 1 or
    # 2 (rank 0 alone asks), and that save, the first, hits a full disk. There is no
    # checkpoint to requeue to.
    env = clean_env(DGXTRAIN_JOB_END_TIME=f"{time.time() + 60:.0f}",
                    DGXTRAIN_CONTROL_DIR=str(tmp_path / "control"))
    p = run_cli(tmp_path, BASE + ["fault.enospc_at_step=1", "fault.enospc_saves=2"], nproc=2,
                env=env)
    assert p.returncode == 1, p.stderr[-2000:]  # torchrun's code for a worker's exit 2
    status = _exit_status(tmp_path)
    assert status["status"] == "checkpoint_error", status
    assert re.search(r"the checkpoint for the requeue at step [12] failed", status["detail"])
    assert "No space left on device" in status["detail"]
    assert "rng-rank" in status["detail"] or "model.pt" in status["detail"]
    assert "requeue the job to continue" not in p.stderr
    assert not list((tmp_path / "checkpoints").glob("step-*"))


def test_periodic_save_failures_are_logged_and_abort_after_max_failures(tmp_path):
    over = BASE + ["checkpoint.every_steps=2", "checkpoint.max_failures=3",
                   "fault.enospc_at_step=4", "fault.enospc_saves=3"]
    p = run_cli(tmp_path, over)
    assert p.returncode == 2, p.stderr[-2000:]
    line = [ln for ln in p.stderr.splitlines() if ln.startswith("dgxtrain: checkpoint error")]
    assert len(line) == 1 and "3 checkpoints in a row failed" in line[0], p.stderr[-2000:]
    assert "step-2" in line[0]  # where the rerun resumes
    failures = [(m["step"], m["checkpoint/failures"]) for m in read_metrics(tmp_path)
                if "checkpoint/failures" in m]
    assert failures == [(4, 1), (6, 2), (8, 3)]
    assert sorted(d.name for d in (tmp_path / "checkpoints").glob("step-*")) == ["step-2"]


def test_one_failed_save_is_logged_and_training_goes_on(tmp_path):
    s = run_ok(tmp_path, BASE + ["checkpoint.every_steps=2", "checkpoint.max_failures=2",
                                 "fault.enospc_at_step=4"])
    assert s["steps"] == 20
    assert [m["checkpoint/failures"] for m in read_metrics(tmp_path)
            if "checkpoint/failures" in m] == [1]


def test_a_failed_final_save_is_a_checkpoint_error(tmp_path):
    p = run_cli(tmp_path, BASE + ["fault.enospc_at_step=20"])
    assert p.returncode == 2, p.stderr[-2000:]
    assert "the final checkpoint at step 20 failed" in p.stderr
    assert not (tmp_path / "summary.json").exists()


def test_a_finished_run_launched_again_only_says_so(tmp_path):
    first = run_ok(tmp_path, BASE)
    before = (tmp_path / "metrics.jsonl").read_text()
    p = run_cli(tmp_path, BASE)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "already complete at step 20" in p.stderr
    assert (tmp_path / "metrics.jsonl").read_text() == before  # no eval row again
    assert json.loads((tmp_path / "summary.json").read_text()) == first
    # Asked for more steps, it continues from there.
    more = run_ok(tmp_path, BASE + ["trainer.max_steps=24"])
    assert (more["resumed_from_step"], more["steps"]) == (20, 24)
