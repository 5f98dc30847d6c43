"""metrics.jsonl on a disk that fills, and after a kill mid-row: training goes on, the file
holds only whole rows, and a resumed run's first row is kept."""

import json
import subprocess

import pytest

from dgxtrain.loop.train import train
from dgxtrain.observe.trackers import logged_rows
from tests.conftest import compose_cfg

BASE = ["device=cpu", "logger=none", "data.dim=16", "model.hidden_dim=32",
        "trainer.global_batch_size=64", "trainer.log_every=1", "checkpoint.every_steps=10",
        "data.eval_samples=128"]


@pytest.fixture
def small_disk(tmp_path):
    """A real 8 KiB file system: writes past it fail with ENOSPC from the kernel."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8k", "tmpfs", str(mnt)],
                      capture_output=True).returncode != 0:
        pytest.skip("mounting a small tmpfs needs root (CI runs as root)")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=True)


def test_a_full_disk_under_metrics_is_warned_of_and_leaves_only_whole_rows(tmp_path,
                                                                           small_disk):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").symlink_to(small_disk / "metrics.jsonl")
    summary = train(compose_cfg(BASE + ["trainer.max_steps=60"]), run_dir)
    assert summary["steps"] == 60  # on main: OSError ENOSPC out of log_metrics, the run dead
    assert (run_dir / "checkpoints" / "step-60").is_dir()  # the other disk was not full
    text = (small_disk / "metrics.jsonl").read_text()
    assert text.endswith("\n")
    rows = [json.loads(line) for line in text.splitlines()]  # every line whole
    steps = [r["step"] for r in rows if "train/loss" in r]
    assert 5 < len(steps) < 60 and steps == list(range(1, len(steps) + 1))
    warned = [line for line in (run_dir / "train.log").read_text().splitlines()
              if "cannot write the row" in line]
    assert len(warned) == 1 and f"row of step {len(steps) + 1} " in warned[0], warned
    assert "No space left on device" in warned[0]


def test_a_row_torn_by_a_kill_does_not_swallow_the_resumed_runs_first(tmp_path):
    train(compose_cfg(BASE + ["trainer.max_steps=10"]), tmp_path)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 11, "train/loss": 0.5')  # a kill in the middle of a row
    train(compose_cfg(BASE + ["trainer.max_steps=15"]), tmp_path)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert all(json.loads(line) for line in lines)  # the torn one is gone
    steps = [r["step"] for r in logged_rows(tmp_path) if "train/loss" in r]
    assert steps == list(range(1, 16))  # on main step 11's row was lost in the torn line
    assert "ended in a line cut short (30 bytes" in (tmp_path / "train.log").read_text()
