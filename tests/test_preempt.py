"""Stopping early for a requeue: the handler only records, the stop file and the deadline
are polled, and a real process stopped by SIGUSR1 resumes to the same numbers."""

import os
import signal
import subprocess
import time

import pytest

from dgxtrain.dist.preempt import EXIT_REQUEUE, StopRequests
from tests.conftest import ROOT, clean_env, cli_args, run_ok

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


@pytest.mark.multiprocess
def test_sigusr1_checkpoints_exits_75_and_the_rerun_matches(tmp_path):
    straight = run_ok(tmp_path / "straight", SMALL)
    run_dir = tmp_path / "stopped"
    args = cli_args(run_dir, [*SMALL, "fault.step_delay_s=0.05"])
    with subprocess.Popen(args, cwd=ROOT, env=clean_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True) as p:
        end = time.monotonic() + 60
        while not (run_dir / "metrics.jsonl").exists() and time.monotonic() < end:
            time.sleep(0.2)
        time.sleep(1.0)  # some steps in
        p.send_signal(signal.SIGUSR1)
        out = p.communicate(timeout=60)[0]
    assert p.returncode == EXIT_REQUEUE, out[-3000:]
    saved = sorted((run_dir / "checkpoints").glob("step-*"))
    assert len(saved) == 1 and 0 < int(saved[0].name[5:]) < 120, out[-3000:]
    assert f"stopped after step {saved[0].name[5:]} with a checkpoint (signal SIGUSR1)" in out
    assert not (run_dir / "summary.json").exists()  # not the end of the run
    resumed = run_ok(run_dir, SMALL)
    assert resumed["resumed_from_step"] == int(saved[0].name[5:])
    assert resumed["param_sha256"] == straight["param_sha256"]
