"""The same command launched again continues its run: no run dir named by hand, no
environment variable; torchrun --standalone and python -m dgxtrain alike."""

import json
import logging
import socket
import subprocess
import sys
import time

import pytest

from dgxtrain.errors import ConfigError
from dgxtrain.loop.run_dir import holding
from tests.conftest import clean_env, kill_tree

pytestmark = pytest.mark.multiprocess

SMOKE = ["experiment=smoke", "device=cpu", "logger=none", "checkpoint.every_steps=5"]


def _launch(cwd, overrides, nproc=2):
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
                 f"--nproc_per_node={nproc}", "-m", "dgxtrain"] if nproc > 1 else
                [sys.executable, "-m", "dgxtrain"])
    return subprocess.run(launcher + overrides, cwd=cwd, env=clean_env(), capture_output=True,
                          text=True, timeout=300)


def test_a_rerun_after_a_crash_continues_and_a_finished_run_is_not_redone(tmp_path):
    crashed = _launch(tmp_path, SMOKE + ["fault.crash_at_step=12"])
    assert crashed.returncode != 0
    (run_dir,) = (tmp_path / "outputs").iterdir()
    assert run_dir.name.startswith("smoke-")
    assert "a new run" in crashed.stderr
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-10", "step-5"]

    again = _launch(tmp_path, SMOKE)  # the same command, less the injected crash
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"run dir {run_dir}: continuing from step 10" in again.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["resumed_from_step"] == 10 and summary["steps"] == 20

    # Once more, as one process: the finished run only says so.
    done = _launch(tmp_path, SMOKE, nproc=1)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "the run is already complete at step 20" in done.stderr
    assert [p.name for p in (tmp_path / "outputs").iterdir()] == [run_dir.name]


def test_another_config_or_a_run_name_gets_a_dir_of_its_own(tmp_path):
    for extra in ([], ["optim.lr=0.02"], ["run_name=mine"]):
        p = _launch(tmp_path, SMOKE + ["trainer.max_steps=2"] + extra, nproc=1)
        assert p.returncode == 0, p.stderr[-3000:]
        assert "a new run" in p.stderr
    names = sorted(p.name for p in (tmp_path / "outputs").iterdir())
    assert len(names) == 3 and "mine" in names, names


def test_a_second_launch_of_a_run_still_going_is_refused(tmp_path):
    long = SMOKE + ["trainer.max_steps=1000000"]
    log = tmp_path / "first.err"
    with log.open("w") as err:
        first = subprocess.Popen([sys.executable, "-m", "dgxtrain", *long], cwd=tmp_path,
                                 env=clean_env(), stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.monotonic() + 120
        while "a new run" not in log.read_text():
            assert first.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.2)
        second = _launch(tmp_path, long, nproc=1)
    finally:
        kill_tree(first.pid)
        first.wait()
    assert second.returncode == 2, second.stderr[-2000:]
    (line,) = [ln for ln in second.stderr.splitlines() if ln.startswith("dgxtrain:")]
    assert "is in use by another launch of the same run (pid " in line, line
    assert "fix: wait for it to end, or launch this one with run_name=" in line
    # The first run's log holds nothing of the second launch.
    (run_dir,) = (tmp_path / "outputs").iterdir()
    assert (run_dir / "train.log").read_text().count("a new run") == 1


HOLDER = """
import sys, time
from pathlib import Path
from dgxtrain.loop.run_dir import holding
with holding(Path(sys.argv[1]), True):
    print("held", flush=True)
    time.sleep(600)
"""


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.text = ""

    def emit(self, record):
        self.text += record.getMessage() + "\n"


def test_the_lock_names_its_holder_and_a_killed_holder_is_taken_over(tmp_path):
    # Its own handler: a train() earlier in the session stops dgxtrain's logs propagating.
    lines = _Lines()
    logging.getLogger("dgxtrain.loop.run_dir").addHandler(lines)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], env=clean_env(),
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        began = time.monotonic()
        with pytest.raises(ConfigError) as refused, holding(tmp_path, True):
            pass
        assert time.monotonic() - began < 1  # at once, not after a timeout
        assert f"({f'pid {holder.pid} on {socket.gethostname()}'})" in str(refused.value)
    finally:
        holder.kill()  # SIGKILL: no chance to let go
        holder.wait()
    with holding(tmp_path, True):
        pass
    assert (f"took over from pid {holder.pid} on {socket.gethostname()}, which ended "
            "without letting go") in lines.text
    lines.text = ""
    with holding(tmp_path, True):  # let go cleanly last time
        pass
    assert "took over" not in lines.text
    logging.getLogger("dgxtrain.loop.run_dir").removeHandler(lines)
