"""How gradients are all-reduced and how ranks agree: auto is the backend's all-reduce, the
opt-in shared-memory hook gives gloo's bits, a step's decision rides on the gradients' own
all-reduce, the timed all-reduce (GPUs' comm wait) gives DDP's bits; the threads a rank gets."""

import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel as DDP

from dgxtrain.distributed import ddp
from dgxtrain.distributed.comm_timer import CommTimer, HostEvent
from dgxtrain.distributed.env import DistEnv, cores_per_rank
from dgxtrain.errors import ConfigError
from dgxtrain.observe.model_stats import param_sha256
from tests.conftest import ADAMW, SMALL, clean_env, free_port, run_cli


def _env(device: str = "cpu", world: int = 2) -> DistEnv:
    return DistEnv(0, 0, world, "torchrun", torch.device(device))


def test_auto_takes_the_backends_all_reduce_on_every_device():
    # CPU tests run the path GPU users run; shared memory is asked for, never chosen.
    model = torch.nn.Linear(4, 1)
    for env, hosts in ((_env(), ["a", "a"]), (_env("cuda"), ["a", "a"]), (_env(), ["a", "b"])):
        assert ddp.choose_hook("auto", env, model, hosts) == "allreduce"
    assert ddp.choose_hook("shm", _env(), model, ["a", "a"]) == "shm"
    with pytest.raises(ConfigError, match="dist.comm_hook=shm: .*one host.*fix"):
        ddp.choose_hook("shm", _env(), model, ["a", "b"])
    with pytest.raises(ConfigError, match="dist.comm_hook=shm: .*two or more"):
        ddp.choose_hook("shm", _env(world=1), model, ["a"])
    with pytest.raises(ConfigError, match="dist.comm_hook=shm: .*fp32"):
        ddp.choose_hook("shm", _env(), model.double(), ["a", "a"])
    with pytest.raises(ConfigError, match="dist.comm_hook=bf16: .*NCCL"):
        ddp.choose_hook("bf16", _env(), model.float(), ["a", "a"])


def test_threads_per_rank_are_the_cores_it_owns(monkeypatch):
    owned = len(os.sched_getaffinity(0))
    assert cores_per_rank() == owned  # one process owns them all
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(owned))
    assert cores_per_rank() == 1  # torchrun: its ranks share the affinity
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(owned * 4))
    assert cores_per_rank() == 1  # never 0
    for k in ("RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(k)
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "1")
    assert cores_per_rank() == 1  # srun says how many


@pytest.mark.multiprocess
def test_shared_memory_all_reduce_gives_the_bits_of_gloo(tmp_path, adamw_two_ranks):
    # Two ranks: each bucket is (a/2) + (b/2), in either order the same float.
    gloo_dir, gloo = adamw_two_ranks
    assert "gradient all-reduce by allreduce" in gloo.stderr
    sha = json.loads((gloo_dir / "summary.json").read_text())["param_sha256"]
    p = run_cli(tmp_path / "shm", [*SMALL, *ADAMW, "dist.comm_hook=shm"], nproc=2)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "gradient all-reduce by shm" in p.stderr
    assert json.loads((tmp_path / "shm" / "summary.json").read_text())["param_sha256"] == sha
    # Nothing is left in /dev/shm: the file is unlinked as soon as every rank mapped it.
    assert not list(Path("/dev/shm").glob("dgxtrain-*"))
    # Where the shared file cannot be made, every rank falls back to gloo, with one warning.
    p = run_cli(tmp_path / "fallback", [*SMALL, *ADAMW, "dist.comm_hook=shm"], nproc=2,
                env=clean_env(DGXTRAIN_SHM_DIR=str(tmp_path / "missing")))
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stderr.count("shared-memory gradient all-reduce unavailable") == 1
    assert "gradient all-reduce by allreduce" in p.stderr
    assert json.loads((tmp_path / "fallback" / "summary.json").read_text())["param_sha256"] == sha


DECISION_SCRIPT = """
import gc, json, math, sys
import torch, torch.distributed as tdist
from dgxtrain.config import DistConfig
from dgxtrain.distributed import ddp
from dgxtrain.distributed.collectives import process_group
from dgxtrain.distributed.env import DistEnv
from dgxtrain.loop.step import train_step
from dgxtrain.observe.model_stats import param_sha256
from tests.loop.test_step import make_parts
env = DistEnv.from_env("cpu")
with process_group(env, timeout_s=60):
    parts, schedule = make_parts(fused=sys.argv[1] == "fused", mode="skip")
    model = parts.model
    parts.model = ddp.wrap(model, env, DistConfig(comm_hook=sys.argv[2]),
                           ["host"] * env.world_size, uses_no_sync=False)
    nan = [False]
    # Rank 1 alone makes its loss NaN at step 2: every rank must skip that update.
    model.register_forward_hook(lambda m, a, out: out * math.nan if nan[0] else out)
    calls = []
    for name in ("all_reduce", "all_gather", "broadcast", "barrier", "all_gather_object"):
        original = getattr(tdist, name)
        setattr(tdist, name, lambda *a, _o=original, _n=name, **k: calls.append(_n) or _o(*a, **k))
    for step in (1, 2, 3):
        nan[0] = step == 2 and env.rank == 1
        if step == 2:
            before = [p.detach().clone() for p in model.parameters()]
        train_step(parts, schedule(step - 1), step)
        if step == 2:
            unchanged = all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    reading = parts.guard.read()
    out = {"rank": env.rank, "reading": list(reading), "unchanged_at_2": unchanged,
           "python_collectives": calls, "param_sha256": param_sha256(model)}
    parts.model = None  # as train() does: DDP's reducer freed before the group
    gc.collect()
    with open(f"{sys.argv[3]}/rank{env.rank}.json", "w") as f:  # stdout would interleave
        json.dump(out, f)
"""


@pytest.mark.multiprocess
@pytest.mark.parametrize("fused,hook", [("fused", "auto"), ("unfused", "auto"),
                                        ("fused", "shm")])
def test_every_rank_skips_a_step_that_is_non_finite_on_one_without_a_collective(
        tmp_path, fused, hook):
    script = tmp_path / "decide.py"
    script.write_text(DECISION_SCRIPT)
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc_per_node=2", str(script), fused, hook, str(tmp_path)],
                       env=clean_env(), capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert sorted(r["rank"] for r in rows) == [0, 1]
    for r in rows:
        # Rank 0's loss was finite, yet it skipped too: the NaN reached it in the gradients.
        assert r["reading"] == [1, 0, 0] and r["unchanged_at_2"], r
        # The decision took no collective of its own: DDP's gradient all-reduce carried it
        # (the shared-memory hook's one barrier per backward is that all-reduce).
        assert r["python_collectives"] == (["barrier"] * 3 if hook == "shm" else []), r
    # And the replicas are the same to the bit, which is why rank 0 alone hashes them.
    assert rows[0]["param_sha256"] == rows[1]["param_sha256"]


def _timed_backward(rank: int, port: int, out: Path) -> None:
    """Two gloo ranks, DDP with the timed all-reduce (host clocks in place of CUDA events);
    rank 1's forward is 0.3 s late, so rank 0's backward ends that much before the
    all-reduce can."""
    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                             world_size=2, timeout=datetime.timedelta(seconds=60))
    results = {}
    for timed in (False, True):
        torch.manual_seed(0)
        net = torch.nn.Sequential(*[torch.nn.Linear(256, 256) for _ in range(4)])
        model = DDP(net, bucket_cap_mb=0.25)  # a few buckets
        if timed:
            timer = CommTimer(default_hooks.allreduce_hook, None, event=HostEvent)
            model.register_comm_hook(timer, CommTimer.hook)
            if rank == 1:
                net.register_forward_hook(lambda m, a, o: time.sleep(0.3) or o)
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        g = torch.Generator().manual_seed(rank)
        waits = []
        for _ in range(3):
            model(torch.randn(64, 256, generator=g)).square().mean().backward()
            opt.step()
            opt.zero_grad()
            waits.append(timer.last_wait_s() if timed else 0.0)
        results[timed] = {"sha": param_sha256(net), "waits": waits}
    (out / f"rank{rank}.json").write_text(json.dumps(results))
    tdist.destroy_process_group()


@pytest.mark.multiprocess
def test_the_timed_all_reduce_gives_ddps_bits_and_the_wait_after_the_backward(tmp_path):
    ctx = mp.start_processes(_timed_backward, args=(free_port(), tmp_path), nprocs=2,
                             join=False, start_method="spawn")
    end = time.monotonic() + 120
    while not ctx.join(timeout=5):
        assert time.monotonic() < end, "the ranks hang"
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    # The same all-reduce as DDP's own: the same parameters, on both ranks.
    assert r0["false"]["sha"] == r0["true"]["sha"] == r1["true"]["sha"]
    # Rank 0 waited for late rank 1 after its backward; rank 1 hardly at all.
    assert all(0.2 < w < 1.0 for w in r0["true"]["waits"]), r0
    assert all(w < 0.1 for w in r1["true"]["waits"]), r1
