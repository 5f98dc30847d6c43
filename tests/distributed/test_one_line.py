"""One line from any rank: whichever rank fails, the run ends with exactly one `dgxtrain:`
line (naming the rank when it is not 0), in train.log too, and under torchrun that line
closes torchrun's failure summary (the root cause's error file). Real torchrun ranks, a
dataset that fails on rank 1 only (tests/faulty_data.py)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT, clean_env, closes_torchrun_summary, dgxtrain_lines, run_cli

NUMBERS = "tests.faulty_data.Numbers"
TASK = ["data=dataset", f"data.train={{_target_:{NUMBERS}}}",
        f"data.eval={{_target_:{NUMBERS},size:64}}", "model=linear", "model.in_dim=4",
        "loss=mse", "trainer.global_batch_size=32", "trainer.max_steps=40",
        "trainer.log_every=5", "data.num_workers=0"]


@pytest.mark.multiprocess
def test_a_dataset_that_fails_to_build_on_rank_1(tmp_path):
    started = time.monotonic()
    p = run_cli(tmp_path, [*TASK, "+data.train.build_fail_rank=1"], nproc=2, timeout=120)
    assert p.returncode != 0
    [line] = dgxtrain_lines(p)
    assert line.startswith(f"dgxtrain: rank 1: config error: data.train._target_={NUMBERS}: "
                           "raised FileNotFoundError: /data/shard-1 is missing on this node")
    closes_torchrun_summary(p, line)
    assert line in (tmp_path / "train.log").read_text().splitlines()
    # Rank 0 was blocked waiting for rank 1 in the process group: it ended within seconds.
    assert time.monotonic() - started < 60


@pytest.mark.multiprocess
def test_a_dataset_of_another_length_on_rank_1_is_refused_at_start(tmp_path):
    p = run_cli(tmp_path, [*TASK, "+data.train.fewer_on_rank=1"], nproc=2, timeout=120)
    assert p.returncode != 0
    [line] = dgxtrain_lines(p)  # every rank finds it alike: rank 0 tells it
    assert line.startswith(f"dgxtrain: config error: data.train={NUMBERS}: has 512 training "
                           "samples on rank 0 and 510 on rank 1: the ranks would not train on "
                           "one sample order; fix: ")
    closes_torchrun_summary(p, line)
    assert not (tmp_path / "metrics.jsonl").exists()


@pytest.mark.multiprocess
@pytest.mark.parametrize("workers", [0, 2])
def test_a_getitem_that_raises_mid_run_on_rank_1(tmp_path, workers):
    p = run_cli(tmp_path, [*TASK, "+data.train.fail_rank=1", "+data.train.fail_after=150",
                           f"data.num_workers={workers}"], nproc=2, timeout=120)
    assert p.returncode != 0
    [line] = dgxtrain_lines(p)
    m = re.fullmatch(rf"dgxtrain: rank 1: data error: data.train={NUMBERS}: item (\d+) raised "
                     r"ValueError: corrupt record (\d+), for step (\d+); fix: .*", line)
    assert m and m[1] == m[2], line
    # 16 samples a step on rank 1 and the start-up checks' few: the 151st fetched is in step
    # 8 or so; each of 2 workers counts its own fetches, of every other batch.
    assert 2 <= int(m[3]) <= (10 if workers == 0 else 20), line
    closes_torchrun_summary(p, line)
    assert line in (tmp_path / "train.log").read_text().splitlines()
    assert p.stderr.count("Traceback") == 1  # torchrun's own, above its summary
    # Rank 0's own view, a peer's closed connection, is in its log only, with its traceback.
    log = (tmp_path / "train.log").read_text()
    assert "ending: a peer failed first" in log or "ending: blocked" in log
    assert not (tmp_path / "summary.json").exists()


def test_one_process_whose_getitem_raises(tmp_path):
    p = run_cli(tmp_path, [*TASK, "+data.train.fail_rank=0", "+data.train.fail_after=100"])
    assert p.returncode == 4, p.stderr[-2000:]
    [line] = dgxtrain_lines(p)
    assert line.startswith(f"dgxtrain: data error: data.train={NUMBERS}: item ")
    assert re.search(r", for step [34]; fix: ", line)  # 32 a step: the 101st fetched, in 3 or 4
    assert "Traceback" not in p.stderr
    assert line in (tmp_path / "train.log").read_text()


def _alone(tmp_path, timeout_s: float, **env: str) -> tuple[subprocess.CompletedProcess, float]:
    """`python -m dgxtrain` as one rank of two whose peer never comes."""
    launch = dict(WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                  MASTER_PORT=str(29000 + os.getpid() % 1000))
    started = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "dgxtrain", "device=cpu", "logger=none",
                        f"hydra.run.dir={tmp_path}", f"dist.rendezvous_timeout_s={timeout_s}"],
                       cwd=ROOT, env=clean_env(**{**launch, **env}), capture_output=True,
                       text=True, timeout=120)
    return p, time.monotonic() - started


@pytest.mark.parametrize("rank", ["0", "1"])
def test_a_rank_whose_peer_never_comes(tmp_path, rank):
    p, took = _alone(tmp_path, 3, RANK=rank)
    assert p.returncode == 2
    [line] = dgxtrain_lines(p)
    who = "" if rank == "0" else "rank 1: "
    assert line.startswith(f"dgxtrain: {who}config error: dist.rendezvous_timeout_s=3: ")
    assert "raise dist.rendezvous_timeout_s" in line
    assert took < 30  # its own timeout, not the 30-minute collective one
    assert len((p.stdout + p.stderr).strip().splitlines()) == 1


@pytest.mark.parametrize("env, says", [
    ({"RANK": "abc"}, "RANK='abc' is not an integer from 0 up"),
    ({"RANK": "0", "MASTER_PORT": "notaport"}, "MASTER_PORT='notaport' is not an integer from 1 "
                                               "to 65535"),
    ({"RANK": "3"}, "rank 3 is not below the world size 2 (RANK, WORLD_SIZE)"),
])
def test_a_bad_launcher_variable(tmp_path, env, says):
    p, _ = _alone(tmp_path, 3, **env)
    assert p.returncode == 2
    [line] = (p.stdout + p.stderr).strip().splitlines()
    who = "rank 3: " if env["RANK"] == "3" else ""
    assert line.startswith(f"dgxtrain: {who}config error: {says}; fix: "), line
