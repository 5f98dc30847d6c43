"""Stopping early for a requeue: the handler only records, the stop file and the deadline
are polled, the ranks' vote stops them all after one step, and real processes stopped through
torchrun by SIGTERM resume to the same numbers; one process sent SIGUSR1 exits 75."""

import datetime
import json
import logging
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp

from dgxtrain.distributed.preempt import EXIT_REQUEUE, StopRequests, StopVote
from tests.conftest import ROOT, clean_env, cli_args, free_port, run_ok

SMALL = ["data.dim=16", "model.hidden_dim=32", "trainer.global_batch_size=64",
         "trainer.max_steps=120", "trainer.log_every=5", "checkpoint.every_steps=1000",
         "data.eval_samples=256"]


def test_signal_is_recorded_then_handed_to_the_handler_that_was_there(tmp_path):
    seen = []

    def mine(sig, frame):
        seen.append(sig)

    outer = signal.signal(signal.SIGUSR1, mine)
    try:
        with StopRequests(["USR1"], tmp_path / "stop", None, 0.0, 1.0, leader=True) as stops:
            assert stops.poll(0.1, 0.1) == ""
            os.kill(os.getpid(), signal.SIGUSR1)
            assert stops.poll(0.1, 0.1) == "signal SIGUSR1" and seen == []  # ours, not outer
        assert signal.getsignal(signal.SIGUSR1) is mine  # restored
        stops.hand_over()
        assert seen == [signal.SIGUSR1]
    finally:
        signal.signal(signal.SIGUSR1, outer)


def test_a_stop_without_a_signal_is_handed_to_an_outer_handler_too(tmp_path):
    # A deadline stop under submitit: its SIGUSR2 handler still requeues the job.
    seen = []
    outer = signal.signal(signal.SIGUSR2, lambda sig, frame: seen.append(sig))
    try:
        with StopRequests(["USR1", "USR2"], tmp_path / "stop", time.time(), 60.0, 1.0,
                          leader=True) as stops:
            assert stops.poll(0.1, 0.1).startswith("deadline: ")
        stops.hand_over()
        assert seen == [signal.SIGUSR2]
    finally:
        signal.signal(signal.SIGUSR2, outer)


def test_stop_file_is_read_by_rank_0_only_and_consumed(tmp_path):
    stop = tmp_path / "stop"
    stop.write_text("USR1\n")
    with StopRequests([], stop, None, 0.0, 0.001, leader=False) as other:
        assert other.poll(0.1, 0.1) == ""
    with StopRequests([], stop, None, 0.0, 0.001, leader=True) as leader:
        assert leader.poll(0.1, 0.1) == f"stop file {stop} (USR1)"
        leader.consume()
    assert not stop.exists()


def test_deadline_counts_a_step_a_checkpoint_and_the_margin(tmp_path):
    end = time.time() + 10.0
    with StopRequests([], tmp_path / "stop", end, 5.0, 0.001, leader=True) as s:
        assert s.poll(step_s=1.0, checkpoint_s=1.0) == ""  # 10 s left, 7 s needed
        time.sleep(0.002)
        assert s.poll(step_s=1.0, checkpoint_s=4.0).startswith("deadline: ")  # 10 needed
    with StopRequests([], tmp_path / "stop", end, 5.0, 0.001, leader=False) as s:
        assert s.poll(step_s=1.0, checkpoint_s=40.0) == ""  # rank 0 decides


def _started(args: list[str], run_dir: Path, **env: str) -> subprocess.Popen:
    """The run in a session of its own, as a terminal's foreground job is, some steps in."""
    p = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         env=clean_env(DGXTRAIN_CONTROL_DIR=str(run_dir / "control"), **env),
                         text=True, start_new_session=True)
    end = time.monotonic() + 60
    while not (run_dir / "metrics.jsonl").exists() and time.monotonic() < end:
        time.sleep(0.2)
    time.sleep(1.0)  # some steps in
    return p


@pytest.mark.multiprocess
def test_sigusr1_to_one_process_checkpoints_and_exits_75(tmp_path):
    # The signal straight to the trainer, no launcher: its own exit status says requeue.
    run_dir = tmp_path / "stopped"
    args = cli_args(run_dir, [*SMALL, "fault.step_delay_s=0.05"])
    with subprocess.Popen(args, cwd=ROOT, env=clean_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True) as p:
        end = time.monotonic() + 60
        while not (run_dir / "metrics.jsonl").exists() and time.monotonic() < end:
            time.sleep(0.2)
        p.send_signal(signal.SIGUSR1)
        out = p.communicate(timeout=60)[0]
    assert p.returncode == EXIT_REQUEUE, out[-3000:]
    saved = [d.name for d in (run_dir / "checkpoints").iterdir()]
    assert len(saved) == 1 and 0 < int(saved[0][5:]) < 120, out[-3000:]
    assert f"stopped after step {saved[0][5:]} with a checkpoint (signal SIGUSR1)" in out
    assert not (run_dir / "summary.json").exists()  # not the end of the run


@pytest.mark.multiprocess
def test_ctrl_c_to_one_process_saves_the_step_in_progress_then_a_second_aborts(tmp_path):
    # The terminal's SIGINT reaches the trainer and its loader workers alike: the workers
    # must live on for the step in progress. Before: KeyboardInterrupt, nothing saved.
    over = ["experiment=digits", "data.num_workers=2", "trainer.max_steps=120",
            "trainer.log_every=5", "trainer.eval_every=1000", "checkpoint.every_steps=1000"]
    straight = run_ok(tmp_path / "straight", over)
    run_dir = tmp_path / "stopped"
    with _started(cli_args(run_dir, [*over, "fault.step_delay_s=0.05"]), run_dir) as p:
        os.killpg(p.pid, signal.SIGINT)
        out = p.communicate(timeout=60)[0]
    assert p.returncode == EXIT_REQUEUE, out[-3000:]
    m = re.search(r"stopping after step (\d+) for Ctrl-C \(asked during step (\d+)\): saving "
                  r"it; Ctrl-C again aborts at once", out)
    assert m, out[-3000:]
    stopped, asked = int(m.group(1)), int(m.group(2))
    assert 0 < stopped < 120 and stopped - asked in (0, 1)
    assert [d.name for d in (run_dir / "checkpoints").iterdir()] == [f"step-{stopped}"]
    assert (f"stopped after step {stopped} with a checkpoint (signal SIGINT); run the same "
            "command again to continue from there") in out
    assert json.loads((run_dir / "control" / "exit.json").read_text())["status"] == (
        "interrupted")
    assert "Traceback" not in out and "KeyboardInterrupt" not in out, out[-3000:]
    resumed = run_ok(run_dir, over)
    assert resumed["resumed_from_step"] == stopped
    assert resumed["param_sha256"] == straight["param_sha256"]

    # Two Ctrl-C in a row: the second one does not wait for the save. Steps of 1 s leave
    # the stop to come after 1 or 2 s. (Two signals within the same few bytecodes would
    # be taken for one, as for any Python handler: the second 0.3 s after the first.)
    aborted = tmp_path / "aborted"
    with _started(cli_args(aborted, [*over, "fault.step_delay_s=1"]), aborted) as p:
        os.killpg(p.pid, signal.SIGINT)
        time.sleep(0.3)
        os.killpg(p.pid, signal.SIGINT)
        out = p.communicate(timeout=60)[0]
    assert p.returncode == 130, out[-3000:]
    assert "SIGINT after Ctrl-C: aborted at once, the step in progress not saved" in out
    assert not (aborted / "checkpoints").exists() or not any(
        (aborted / "checkpoints").glob("step-*"))


def test_a_grace_shorter_than_the_last_save_is_said_with_both_times(tmp_path, monkeypatch,
                                                                     caplog):
    # Under torchrun, which kills its workers TORCH_ELASTIC_SHUTDOWN_TIMEOUT after SIGTERM.
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    monkeypatch.setenv("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "5")
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    with StopRequests(["TERM"], tmp_path / "stop", None, 0.0, 1.0, leader=True) as stops:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stops.poll(0.1, 0.1) == "signal SIGTERM"
    # The trainer's own logging set-up (an in-process run earlier) stops at "dgxtrain".
    monkeypatch.setattr(logging.getLogger("dgxtrain"), "propagate", True)
    with caplog.at_level("INFO", logger="dgxtrain"):
        stops.warn_if_grace_is_short(checkpoint_s=12.0)
        stops.warn_if_grace_is_short(checkpoint_s=1.0)
    short, fits = (r.getMessage() for r in caplog.records)
    assert short.startswith("the grace is too short: 5 s left before the kill (torchrun's "
                            "shutdown timeout, TORCH_ELASTIC_SHUTDOWN_TIMEOUT=5)")
    assert "the last checkpoint took 12.0 s" in short and "checkpoint.every_steps" in short
    assert fits.startswith("5 s left before the kill") and "took 1.0 s" in fits


# The step from which each of two ranks wishes to stop (a wish stays), per case.
VOTES = {"every rank": (3, 3), "rank 0 only": (3, None), "one step apart": (3, 4),
         "nobody": (None, None)}


def _vote(rank: int, port: int, out: Path) -> None:
    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                             world_size=2, timeout=datetime.timedelta(seconds=30))
    stops = {}
    for case, first in VOTES.items():
        vote, stops[case] = StopVote(torch.device("cpu"), 2), None
        for step in range(1, 9):
            wish = first[rank] is not None and step >= first[rank]
            if vote.after_step(wish):
                stops[case] = step
                break
        vote.close()
    (out / f"rank{rank}.json").write_text(json.dumps(stops))
    tdist.destroy_process_group()


@pytest.mark.multiprocess
def test_the_vote_stops_every_rank_after_the_same_step(tmp_path):
    ctx = mp.start_processes(_vote, args=(free_port(), tmp_path), nprocs=2, join=False,
                             start_method="spawn")
    end = time.monotonic() + 120
    while not ctx.join(timeout=5):
        assert time.monotonic() < end, "the ranks disagreed and hang in the vote"
    stops = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert stops[0] == stops[1]
    # A wish on every rank: after that very step. On some: one step later, when the sum of
    # the step before is read.
    assert stops[0] == {"every rank": 3, "rank 0 only": 4, "one step apart": 4,
                        "nobody": None}


@pytest.mark.multiprocess
@pytest.mark.parametrize("sig", ["TERM", "INT"])
def test_sigterm_or_ctrl_c_to_torchrun_saves_the_step_in_progress_and_the_rerun_matches(
        tmp_path, sig):
    # SIGTERM as a preemption sends it (SLURM signals the step's task, torchrun passes it on),
    # or `kill` of a local run: each rank stops after the step it was in. Ctrl-C: the
    # terminal signals torchrun's process group, which holds the agent alone (each rank has
    # a session of its own); the agent passes SIGINT on to the ranks.
    straight = run_ok(tmp_path / "straight", SMALL, nproc=2)
    run_dir = tmp_path / "stopped"
    with _started(cli_args(run_dir, [*SMALL, "fault.step_delay_s=0.05"], nproc=2),
                  run_dir) as p:
        os.killpg(p.pid, signal.Signals[f"SIG{sig}"])
        out = p.communicate(timeout=60)[0]
    why = "for a requeue: signal SIGTERM" if sig == "TERM" else "for Ctrl-C"
    m = re.search(rf"rank0.*stopping after step (\d+) {why} \(asked during step (\d+)\)", out)
    assert m, out[-3000:]
    stopped, asked = int(m.group(1)), int(m.group(2))
    assert 0 < stopped < 120 and stopped - asked in (0, 1), out[-3000:]
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == [f"step-{stopped}"]
    status = json.loads((run_dir / "control" / "exit.json").read_text())["status"]
    assert status == ("requeue" if sig == "TERM" else "interrupted")
    assert re.search(r"the checkpoint for the requeue took [\d.]+ s; saved [\d.]+ s after "
                     r"the signal", out)
    assert not (run_dir / "stacks").exists()  # nothing hung: the stack dump is dropped
    assert not (run_dir / "summary.json").exists()  # not the end of the run
    resumed = run_ok(run_dir, SMALL, nproc=2)
    assert resumed["resumed_from_step"] == stopped
    assert resumed["param_sha256"] == straight["param_sha256"]
