"""slurm/train.sbatch against a real SLURM cluster on this machine (slurm/local/cluster.sh):
one node and two, torchrun and srun, preemption, the deadline, failures, Hydra sweeps."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dgxtrain.observe.wandb_records import read_run
from tests.conftest import ROOT, clean_env, read_metrics, run_ok

pytestmark = pytest.mark.slurm

STATE = Path(os.environ.get("DGXTRAIN_SLURM_DIR", "/tmp/dgxtrain-slurm"))
SLURM_CONF = str(STATE / "slurm.conf")
# One config for every job here, so that each compares with one local torchrun run. The
# step delay (a drill knob) makes jobs slow enough to interrupt; it changes no number. W&B
# only where a test reads its files (it costs each attempt about 2 s).
BASE = ["logger=none", "data.dim=16", "model.hidden_dim=32", "trainer.global_batch_size=64",
        "trainer.max_steps=200", "trainer.warmup_steps=0", "trainer.log_every=5",
        "checkpoint.every_steps=25", "data.eval_samples=256"]
DONE_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
               "BOOT_FAIL", "DEADLINE", "PREEMPTED"}


def _cluster_problem() -> str | None:
    if not shutil.which("sbatch"):
        return "SLURM is not installed (run slurm/local/cluster.sh up as root)"
    if not Path(SLURM_CONF).exists():
        return f"no local cluster at {STATE} (run slurm/local/cluster.sh up as root)"
    p = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], env={**os.environ,
                       "SLURM_CONF": SLURM_CONF}, capture_output=True, text=True, timeout=30)
    idle = [s for s in p.stdout.split() if s in ("idle", "mixed", "allocated")]
    if p.returncode != 0 or len(idle) < 2:
        return f"the local cluster is not up ({p.stdout.strip() or p.stderr.strip()})"
    return None


@pytest.fixture(scope="module", autouse=True)
def cluster() -> None:
    problem = _cluster_problem()
    if problem and os.environ.get("DGXTRAIN_REQUIRE_SLURM") == "1":
        pytest.fail(f"SLURM tests must run here (DGXTRAIN_REQUIRE_SLURM=1): {problem}")
    if problem:
        pytest.skip(problem)


def slurm_env(**extra: str) -> dict[str, str]:
    return clean_env(SLURM_CONF=SLURM_CONF, DGXTRAIN_PYTHON=sys.executable, **extra)


def scontrol(*args: str) -> str:
    return subprocess.run(["scontrol", *args], env=slurm_env(), capture_output=True,
                          text=True, timeout=30).stdout


def job(jid: str) -> dict[str, str]:
    return dict(re.findall(r"(\w+)=(\S*)", scontrol("show", "job", "-o", jid)))


def submit(out: Path, overrides: list[str], sbatch_args: tuple[str, ...] = (),
           base: list[str] = BASE, **env: str) -> str:
    """sbatch slurm/train.sbatch from the repo root, run dirs and log under `out`."""
    p = subprocess.run(
        ["sbatch", "--parsable", "--time=10", f"--output={out}/slurm-%j.out", *sbatch_args,
         "slurm/train.sbatch", *base, *overrides],
        cwd=ROOT, env=slurm_env(DGXTRAIN_OUTPUT_ROOT=str(out), **env), capture_output=True,
        text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    return p.stdout.strip().split(";")[0]


def log_of(out: Path, jid: str) -> str:
    path = out / f"slurm-{jid}.out"
    return path.read_text() if path.exists() else ""


class Releaser:
    """SLURM holds a requeued job for about two minutes before it may start again; here it is
    released (scontrol update StartTime=now) once it has been held 3 s. Not at once: slurmd
    revokes the ended attempt's credential as it cleans up, and a new attempt allocated
    before that is killed ("Job credential revoked") and the job fails."""

    def __init__(self, jid: str) -> None:
        self.jid, self.held_since = jid, None

    def poll(self) -> dict[str, str]:
        info = job(self.jid)
        if info.get("JobState") == "PENDING" and info.get("Reason") == "BeginTime":
            self.held_since = self.held_since or time.monotonic()
            if time.monotonic() - self.held_since >= 3:
                scontrol("update", f"JobId={self.jid}", "StartTime=now")
        else:
            self.held_since = None
        return info


def wait_job(out: Path, jid: str, timeout: float = 240) -> dict[str, str]:
    """Wait for the job to end, releasing it whenever it is held for a requeue."""
    end, releaser = time.monotonic() + timeout, Releaser(jid)
    while time.monotonic() < end:
        info = releaser.poll()
        if info.get("JobState") in DONE_STATES:
            return info
        time.sleep(0.5)
    scontrol("requeuehold", jid)  # hold it: nothing runs on after the test
    subprocess.run(["scancel", jid], env=slurm_env(), timeout=30)
    pytest.fail(f"job {jid} did not end in {timeout} s: {job(jid)}\n{log_of(out, jid)[-4000:]}")


def wait_for(path: Path, out: Path, jid: str, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > end or job(jid).get("JobState") in DONE_STATES:
            pytest.fail(f"{path} never appeared: {job(jid)}\n{log_of(out, jid)[-4000:]}")
        time.sleep(0.5)


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def assert_same_params(run_dir: Path, ref: Path, rtol: float = 1e-5) -> None:
    a = torch.load(run_dir / "model.pt", weights_only=True)
    b = torch.load(ref / "model.pt", weights_only=True)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=1e-7)


def assert_one_continuous_run(run_dir: Path) -> None:
    steps = [m["step"] for m in read_metrics(run_dir) if "train/loss" in m]
    assert steps == sorted(set(steps)) and steps[-1] == 200, steps


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The same config under a local `torchrun --standalone` with 2 CPU ranks."""
    d = tmp_path_factory.mktemp("torchrun")
    run_ok(d, BASE, nproc=2)
    return d


def wait_for_step(run_dir: Path, out: Path, jid: str, step: int) -> None:
    """Until the run has logged `step`: training, well past start-up."""
    def logged() -> int:
        try:
            return read_metrics(run_dir)[-1]["step"]
        except (OSError, ValueError, IndexError):  # not yet there, or a line half written
            return 0

    end = time.monotonic() + 120
    while logged() < step:
        if time.monotonic() > end or job(jid).get("JobState") in DONE_STATES:
            pytest.fail(f"step {step} never came: {job(jid)}\n{log_of(out, jid)[-4000:]}")
        time.sleep(0.5)


def preempt(out: Path, node: str = "node1") -> str:
    """A job in the higher partition that needs `node` whole: SLURM preempts the debug job
    there (SIGTERM to its steps' tasks, GraceTime, then requeue)."""
    p = subprocess.run(["sbatch", "--parsable", "--partition=urgent", "--exclusive",
                        f"--nodelist={node}", "--time=1", f"--output={out}/urgent-%j.out",
                        "--wrap", "sleep 1"], env=slurm_env(), capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    return p.stdout.strip()


def sigterm_stop(log: str) -> int:
    """The step the SIGTERM stop saved: the one the signal came in, or the next."""
    m = re.search(r"stopping after step (\d+) for a requeue: signal SIGTERM \(asked during "
                  r"step (\d+)\)", log)
    assert m, log[-4000:]
    stopped, asked = int(m.group(1)), int(m.group(2))
    assert stopped - asked in (0, 1), log[-4000:]
    return stopped


def grace_left(log: str) -> float:
    """What rank 0 said was left before the kill, from the job's end time."""
    return float(re.search(r"(-?\d+) s left before the kill \(the SLURM job", log).group(1))


@pytest.mark.parametrize("launcher,preempted", [("torchrun", False), ("srun", True)])
def test_two_nodes_form_one_world(tmp_path, reference, launcher, preempted):
    # 2 nodes x 1 rank: one world of 2, the same numbers as 1 node x 2 ranks. With torchrun
    # the doctor runs first, on a 2-core machine shared with other work: only a rank 3x
    # slower than the other is sick. With srun the ranks are the step's tasks: a job that
    # needs node1 preempts this one, and its SIGTERM reaches them on both nodes.
    # checkpoint.every_steps=1000: only that save is there.
    doctor = {} if preempted else dict(DGXTRAIN_DOCTOR="1",
                                       DGXTRAIN_DOCTOR_ARGS="--slow-fraction=0.3 --max-mb=4")
    jid = submit(tmp_path, ["fault.step_delay_s=0.03" if preempted else "fault.step_delay_s=0",
                            "checkpoint.every_steps=1000"],
                 ("--nodes=2",), NPROC="1", DGXTRAIN_LAUNCHER=launcher, **doctor)
    run_dir = tmp_path / f"slurm-{jid}"
    if preempted:
        wait_for_step(run_dir, tmp_path, jid, 30)
        urgent = preempt(tmp_path)
    info = wait_job(tmp_path, jid)
    log = log_of(tmp_path, jid)
    assert (info["JobState"], info["Restarts"]) == ("COMPLETED", str(int(preempted))), log[-4000:]
    assert info["NodeList"] == "node[1-2]"
    s = summary(run_dir)
    assert s["world_size"] == 2
    assert f"launcher {launcher if launcher == 'torchrun' else 'slurm'}" in log
    assert_same_params(run_dir, reference)
    assert f"rendezvous 127.0.0.1:{15000 + int(jid) % 20000}" in log
    if preempted:
        assert s["resumed_from_step"] == sigterm_stop(log)
        assert 0 < grace_left(log) <= 30  # GraceTime=30 on the local cluster
        assert job(urgent)["JobState"] == "COMPLETED"
    else:  # the preflight ran first, on both ranks, and found the nodes healthy
        report = json.loads((run_dir / "doctor-0.json").read_text())
        assert report["ok"] and len(report["ranks"]) == 2 and report["allreduce"], log[-3000:]
        # ...and predicted the scaling of the very model the job then trained.
        derived = json.loads((run_dir / "derived.json").read_text())
        prediction = report["prediction"]
        assert prediction["parameters"] == derived["parameters"], prediction
        assert [row["gpus"] for row in prediction["table"]][:3] == [1, 2, 4]
        assert "scaling prediction for " in log


def test_preempted_job_checkpoints_requeues_and_resumes(tmp_path, reference):
    """Twice. Attempt 0 gets the warning signal in the batch shell (SIGUSR1), which reaches
    the workers through the stop file. Attempt 1 is preempted for real: SIGTERM to the steps
    only, which on one node the relay step passes on to torchrun's workers."""
    jid = submit(tmp_path, ["fault.step_delay_s=0.03", "logger=wandb"], ("--nodelist=node1",))
    run_dir = tmp_path / f"slurm-{jid}"
    wait_for(run_dir / "checkpoints" / "step-25", tmp_path, jid)
    subprocess.run(["scancel", "--signal=USR1", "--batch", jid], env=slurm_env(), check=True,
                   timeout=30)
    end, releaser = time.monotonic() + 120, Releaser(jid)
    while "attempt 1" not in log_of(tmp_path, jid) and time.monotonic() < end:
        releaser.poll()
        time.sleep(1)
    first = int(re.search(r"stopping after step (\d+) for a requeue: stop file",
                          log_of(tmp_path, jid)).group(1))
    wait_for_step(run_dir, tmp_path, jid, first + 15)
    urgent = preempt(tmp_path)
    info = wait_job(tmp_path, jid)
    log = log_of(tmp_path, jid)
    assert (info["JobState"], info["Restarts"]) == ("COMPLETED", "2"), log[-4000:]
    attempt0, later = log.split("attempt 1")
    assert "got SIGUSR1" in attempt0 and "attempt 2" in later
    second = sigterm_stop(later)
    s = summary(run_dir)
    assert 25 <= first < second < 200 and s["resumed_from_step"] == second
    assert s["param_sha256"] == summary(reference)["param_sha256"]
    assert 0 < grace_left(later) <= 30
    assert job(urgent)["JobState"] == "COMPLETED"
    assert_one_continuous_run(run_dir)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == [run_dir.name]
    # One W&B run (offline here) across the attempts, grouped by the job.
    runs = [read_run(f) for f in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"))]
    assert len(runs) == 3 and len({r["id"] for r in runs}) == 1
    assert {r["group"] for r in runs} == {f"slurm-{jid}"}
    steps = [row["_step"] for r in runs for row in r["history"] if "train/loss" in row]
    assert steps == list(range(5, 201, 5))


def test_one_node_survives_a_sigterm_to_the_batch_step(tmp_path, reference):
    # scancel --full signals every process of the job, srun included, which would kill the
    # ranks it started: on one node torchrun does not run under srun.
    jid = submit(tmp_path, ["fault.step_delay_s=0.03", "checkpoint.every_steps=1000"])
    run_dir = tmp_path / f"slurm-{jid}"  # keyed by the job id
    wait_for_step(run_dir, tmp_path, jid, 30)
    subprocess.run(["scancel", "--signal=TERM", "--full", jid], env=slurm_env(), check=True,
                   timeout=30)
    info = wait_job(tmp_path, jid)
    log = log_of(tmp_path, jid)
    assert (info["JobState"], info["Restarts"]) == ("COMPLETED", "1"), log[-4000:]
    assert "got SIGTERM" in log  # the batch shell's trap too
    s = summary(run_dir)
    assert (s["world_size"], s["steps"], s["resumed_from_step"]) == (2, 200, sigterm_stop(log))
    assert s["param_sha256"] == summary(reference)["param_sha256"]
    assert json.loads((run_dir / "control" / "exit.json").read_text())["status"] == "done"


def test_a_cancelled_job_saves_and_stays_cancelled(tmp_path):
    # scancel sends SIGTERM as a preemption does, and the ranks save; but the job must not
    # requeue itself out of a cancel.
    jid = submit(tmp_path, ["fault.step_delay_s=0.03", "checkpoint.every_steps=1000"])
    run_dir = tmp_path / f"slurm-{jid}"
    wait_for_step(run_dir, tmp_path, jid, 10)
    subprocess.run(["scancel", jid], env=slurm_env(), check=True, timeout=30)
    info = wait_job(tmp_path, jid)
    log = log_of(tmp_path, jid)
    assert (info["JobState"], info["Restarts"]) == ("CANCELLED", "0"), log[-4000:]
    assert "the job was cancelled" in log
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == [
        f"step-{sigterm_stop(log)}"]


def test_deadline_stops_for_requeue_without_a_signal(tmp_path, reference):
    # A 120 s limit less a 100 s margin leaves about 20 s, start-up included, for 200 steps
    # of 0.1 s: the first attempt cannot finish. The warning signal is moved to 5 s before
    # the end (SLURM may send it up to 60 s early: still after the trainer's own stop).
    jid = submit(tmp_path, ["fault.step_delay_s=0.1", "preemption.deadline_margin_s=100"],
                 ("--time=2", "--signal=B:USR1@5"))
    info = wait_job(tmp_path, jid, timeout=300)
    log = log_of(tmp_path, jid)
    # On a loaded machine the second attempt's 20 s may not cover the rest either: each
    # attempt that stops must have stopped for the deadline, never for the signal.
    restarts = int(info["Restarts"])
    assert info["JobState"] == "COMPLETED" and restarts >= 1, log[-4000:]
    assert log.count("for a requeue: deadline") == restarts, log[-4000:]
    assert "got SIGUSR1" not in log
    s = summary(tmp_path / f"slurm-{jid}")
    assert 0 < s["resumed_from_step"] < 200
    assert s["param_sha256"] == summary(reference)["param_sha256"]


def test_failure_without_retries_left_fails_and_is_not_requeued(tmp_path):
    jid = submit(tmp_path, ["fault.crash_at_step=3"], DGXTRAIN_MAX_FAILURES="0")
    info = wait_job(tmp_path, jid)
    log = log_of(tmp_path, jid)
    assert (info["JobState"], info["Restarts"]) == ("FAILED", "0"), log[-3000:]
    assert "not requeued" in log
    assert not (tmp_path / f"slurm-{jid}" / "summary.json").exists()


def test_failure_is_retried_once_and_resumes(tmp_path, reference):
    # The injected crash fires once per run dir: the retry resumes and finishes.
    jid = submit(tmp_path, ["fault.crash_at_step=60"])
    info = wait_job(tmp_path, jid)
    log = log_of(tmp_path, jid)
    assert (info["JobState"], info["Restarts"]) == ("COMPLETED", "1"), log[-4000:]
    assert "failure 1 of 1 allowed" in log
    s = summary(tmp_path / f"slurm-{jid}")
    assert s["resumed_from_step"] == 50
    assert s["param_sha256"] == summary(reference)["param_sha256"]


def test_attempts_without_progress_end_the_job_instead_of_requeueing(tmp_path):
    # Each attempt fails in its first steps (rank 0's 21st item raises), before any
    # checkpoint, and failures may be retried 5 times: without the limit the job would
    # requeue 5 times for nothing, and a job whose time never covers its start-up for ever.
    numbers = "tests.faulty_data.Numbers"
    task = ["logger=none", "data=dataset", f"data.train={{_target_:{numbers}}}",
            f"data.eval={{_target_:{numbers},size:64}}", "model=linear", "model.in_dim=4",
            "loss=mse", "trainer.global_batch_size=32", "trainer.max_steps=40",
            "checkpoint.every_steps=1000", "data.num_workers=0"]
    jid = submit(tmp_path, ["+data.train.fail_rank=0", "+data.train.fail_after=20",
                            "preemption.max_idle_requeues=2"], base=task,
                 DGXTRAIN_MAX_FAILURES="5")
    info = wait_job(tmp_path, jid)
    log = log_of(tmp_path, jid)
    assert (info["JobState"], info["Restarts"]) == ("FAILED", "1"), log[-4000:]
    assert ("not requeued (failure 2 of 5 allowed, exit 1): no progress in 2 attempts in a "
            "row, the newest checkpoint is still step 0 (preemption.max_idle_requeues=2)"
            ) in log, log[-4000:]


def test_config_error_is_never_retried(tmp_path):
    jid = submit(tmp_path, ["trainer.max_steps=0"])
    info = wait_job(tmp_path, jid)
    log = log_of(tmp_path, jid)
    assert (info["JobState"], info["Restarts"]) == ("FAILED", "0"), log[-3000:]
    assert "dgxtrain: config error: trainer.max_steps=0" in log
    assert "not retried: config_error" in log


def test_hydra_sweep_submits_one_job_per_point_and_survives_preemption(tmp_path, reference):
    """Two points through hydra-submitit-launcher (conf/hydra/launcher/dgx.yaml), 2 srun
    tasks each. Point 1 is preempted (SIGUSR2, as submitit's time warning): it checkpoints,
    submitit requeues it, and it resumes in its own run dir."""
    args = [sys.executable, "-m", "dgxtrain", "-m", "hydra/launcher=dgx",
            "hydra.launcher.tasks_per_node=2", "hydra.launcher.timeout_min=10",
            "optim.lr=1e-3,3e-3", *BASE, "logger=wandb", "fault.step_delay_s=0.03"]
    with subprocess.Popen(args, cwd=ROOT, env=slurm_env(DGXTRAIN_OUTPUT_ROOT=str(tmp_path)),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as p:
        try:
            sweep = _wait_for_glob(tmp_path, "*/1/checkpoints/step-25", p).parents[2]
            task = next(d.name for d in (sweep / ".submitit").iterdir()
                        if re.fullmatch(r"\d+_1", d.name))
            subprocess.run(["scancel", "--signal=USR2", task], env=slurm_env(), check=True,
                           timeout=30)
            end, releaser = time.monotonic() + 240, Releaser(task)
            while p.poll() is None and time.monotonic() < end:
                releaser.poll()
                time.sleep(1)
            out = p.communicate(timeout=10)[0]
        finally:
            if p.poll() is None:
                p.kill()
                subprocess.run(["scancel", task.split("_")[0]], env=slurm_env(), timeout=30)
    assert p.returncode == 0, out[-4000:]
    points = [summary(sweep / str(i)) for i in (0, 1)]
    assert [s["world_size"] for s in points] == [2, 2]
    assert [s["steps"] for s in points] == [200, 200]
    assert points[0]["param_sha256"] == summary(reference)["param_sha256"]  # lr=1e-3 = BASE's
    assert points[1]["param_sha256"] != points[0]["param_sha256"]
    assert points[0]["resumed_from_step"] == 0 and points[1]["resumed_from_step"] >= 25
    assert job(task)["Restarts"] == "1"
    assert_one_continuous_run(sweep / "1")
    # Each point its own W&B run, the sweep their group.
    runs = [read_run(f) for i in (0, 1) for f in (sweep / str(i)).glob("wandb/*/run-*.wandb")]
    assert len({r["id"] for r in runs}) == 2 and {r["group"] for r in runs} == {sweep.name}


def _wait_for_glob(root: Path, pattern: str, proc: subprocess.Popen,
                   timeout: float = 120) -> Path:
    end = time.monotonic() + timeout
    while time.monotonic() < end and proc.poll() is None:
        found = sorted(root.glob(pattern))
        if found:
            return found[0]
        time.sleep(0.5)
    pytest.fail(f"{pattern} never appeared under {root}")
