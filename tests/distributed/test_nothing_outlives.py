"""After an abrupt end of a rank or of torchrun, no process of the run is alive 30 s later
(polled: the test ends as soon as none is):
not a rank, not a loader worker, not a forkserver or resource tracker (issue 22 items 1, 2).
The process tree is listed from /proc, with 2 loader workers and the default start method."""

import contextlib
import os
import signal
import subprocess
import time

import pytest

from tests.conftest import children, clean_env, cli_args

pytestmark = pytest.mark.multiprocess


def _tree(pid: int) -> list[int]:
    todo, tree = [pid], []
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(children(p))
    return tree


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has ended
    except OSError:
        return False


@pytest.mark.parametrize("killed", ["ranks", "torchrun", "watchdog"])
def test_no_process_of_the_run_outlives_a_sigkill(tmp_path, killed):
    # watchdog: rank 1 hangs at step 30, its watchdog ends it after dist.timeout_s, torchrun
    # restarts both ranks (an elastic restart): the first ones' processes must all be gone.
    hang = (["fault.hang_at_step=30", "fault.rank=1", "dist.timeout_s=5",
             "fault.step_delay_s=0.1"] if killed == "watchdog" else [])
    args = cli_args(tmp_path / "run", ["experiment=digits", "data.num_workers=2",
                                       "trainer.max_steps=100000", *hang], nproc=2,
                    torchrun_args=("--max-restarts=1",) if hang else ())
    agent = subprocess.Popen(args, env=clean_env(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        log = tmp_path / "run" / "train.log"
        deadline = time.monotonic() + 120
        while not (log.is_file() and "first step done" in log.read_text()):
            assert agent.poll() is None and time.monotonic() < deadline
            time.sleep(0.5)
        time.sleep(2)  # the eval workers too, and every worker past its start
        tree = _tree(agent.pid)
        ranks = children(agent.pid)
        assert len(ranks) == 2 and len(tree) >= 1 + 2 * 4, tree  # ranks, forkserver, workers
        if hang:
            end = time.monotonic() + 60
            while set(children(agent.pid)) & set(ranks) or len(children(agent.pid)) < 2:
                assert agent.poll() is None and time.monotonic() < end, "no restart"
                time.sleep(0.5)
            tree.remove(agent.pid)  # torchrun lives on, with the new ranks
        else:
            for pid in ranks if killed == "ranks" else [agent.pid]:
                os.kill(pid, signal.SIGKILL)
        end = time.monotonic() + 30
        while (left := [p for p in tree if _alive(p)]) and time.monotonic() < end:
            agent.poll()  # reap torchrun itself
            time.sleep(0.5)
        # Before the fix: each rank's workers, forkserver and tracker (PPID 1), and after a
        # killed torchrun both ranks training on.
        assert left == [], [open(f"/proc/{p}/cmdline").read()[:120] for p in left]
    finally:
        for p in _tree(agent.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)
        agent.wait()
