"""The CUDA path: same data as on CPU, no host sync in a training step, bf16 + compile,
NCCL + DDP. Skipped without a GPU."""

import json
import subprocess
import sys
import time
import warnings

import pytest
import torch

from dgxtrain.data.order import GlobalBatchSchedule
from dgxtrain.data.synthetic import SyntheticRegression
from dgxtrain.loop.step import train_step
from dgxtrain.loop.train import train
from tests.conftest import ROOT, clean_env, compose_cfg, kill_tree, losses, read_metrics, run_ok
from tests.loop.test_step import make_parts

pytestmark = pytest.mark.gpu

SMALL = ["data.dim=16", "model.hidden_dim=64", "data.num_samples=1000", "trainer.max_steps=25",
         "trainer.warmup_steps=3", "trainer.log_every=1", "trainer.global_batch_size=64"]


def test_data_on_gpu_equals_data_on_cpu():
    kw = dict(dim=32, noise_std=0.1, num_samples=10**9, eval_samples=64, target="nonlinear",
              seed=1)
    cpu, gpu = SyntheticRegression(**kw), SyntheticRegression(**kw, device="cuda")
    sched_c = GlobalBatchSchedule(10**9, 1, 512, 1, 2, 128)
    sched_g = GlobalBatchSchedule(10**9, 1, 512, 1, 2, 128, device="cuda")
    idx = sched_c(1234)
    assert torch.equal(idx, sched_g(1234).cpu())  # integer maths: bit-identical
    (xc, yc), (xg, yg) = cpu.sample(idx[0]), gpu.sample(idx[0].cuda())
    torch.testing.assert_close(xg.cpu(), xc, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(yg.cpu(), yc, rtol=1e-4, atol=1e-4)


def test_the_sample_order_and_data_never_sync_in_dgx_8gpu_shapes():
    # experiment=dgx_8gpu's shapes: 8 ranks, 8192 samples per rank and step, so an index
    # chunk lasts 8 steps. 20 steps cross two refills, all inside the checked region.
    schedule = GlobalBatchSchedule(10**9, 1, 65536, 3, 8, 8192, device="cuda")
    data = SyntheticRegression(dim=1024, noise_std=0.1, num_samples=10**9, eval_samples=64,
                               target="nonlinear", seed=1, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            batches = [data.sample(schedule(s)[0]) for s in range(20)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert [str(w.message) for w in caught if "synchroniz" in str(w.message)] == []
    cpu = GlobalBatchSchedule(10**9, 1, 65536, 3, 8, 8192)
    assert torch.equal(schedule(19).cpu(), cpu(19))  # the same order as on the host
    assert batches[-1][0].shape == (8192, 1024)


def _count_syncs(fused: bool) -> tuple[int, int, list]:
    """Host syncs in 4 training steps on the GPU, after a first one (lazy optimizer state);
    their batches are made inside the checked region."""
    parts, schedule = make_parts(fused, device="cuda")
    train_step(parts, schedule(0), 1)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            results = [train_step(parts, schedule(s - 1), s) for s in range(2, 6)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message)]
    assert parts.guard.read().skipped == 0
    assert torch.isfinite(results[-1][0]) and results[-1][1] > 0
    return len(syncs), len(results), syncs


def test_fused_training_step_never_syncs_with_the_host():
    # The update decision is taken on the device (found_inf), read on decision steps only.
    syncs, steps, messages = _count_syncs(fused=True)
    assert syncs == 0, messages


def test_unfused_training_step_syncs_once_for_the_finite_check():
    # An optimizer that cannot skip on the device: the host reads the decision, once a step.
    syncs, steps, messages = _count_syncs(fused=False)
    assert syncs == steps, messages


def test_loader_path_adds_no_host_sync_per_step():
    # A token task through the loader path: pinned batches copied without blocking, the
    # global count of valid (non-padding) targets kept on the device. Fetching is inside
    # the checked region; the first step (lazy optimizer state, worker start) is not.
    from omegaconf import OmegaConf

    from dgxtrain.loop.build import make_autocast
    from dgxtrain.loop.guard import UpdateGuard
    from dgxtrain.loop.step import StepParts
    from dgxtrain.tasks import TaskLoss
    from dgxtrain.tasks.dataset import DatasetTask
    from tests.user_task import FlatCrossEntropy, PairModel

    dev = torch.device("cuda")
    data = OmegaConf.create({
        "train": {"_target_": "tests.user_task.NextSum", "size": 4096},
        "eval": {"_target_": "tests.user_task.NextSum", "size": 64, "offset": 1},
        "num_workers": 2, "prefetch_factor": 2, "pin_memory": True, "persistent_workers": True,
        "start_method": "forkserver", "seed_rngs": ["torch"]})
    loss = TaskLoss(FlatCrossEntropy(), "tests.user_task.FlatCrossEntropy")
    task = DatasetTask(OmegaConf.create({}), data, loss, ["loss", "accuracy"], 0, dev)
    model = PairModel(width=64)
    task.check(model)
    assert loss.counts_vary
    model = model.to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    parts = StepParts(model, task, opt, UpdateGuard("error", 5, dev), make_autocast(dev, "fp32"),
                      1.0)
    with task.train_feed(0, 256, 0, 1, 128, 0, 6, dev) as feed:
        train_step(parts, feed(0), 1)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                for s in range(1, 6):
                    train_step(parts, feed(s), s + 1)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message)]
    assert syncs == [], syncs
    assert parts.guard.read().skipped == 0


def test_the_stop_vote_reads_its_sums_through_pinned_memory_without_a_sync_call():
    # One rank, a process group of one on NCCL: the sums go the GPU path (all-reduce, copy
    # to pinned memory, event), and the host waits only on the event of a finished sum.
    import datetime
    import os

    import torch.distributed as tdist

    from dgxtrain.distributed.preempt import StopVote
    from tests.conftest import free_port

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    tdist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda:0"),
                             timeout=datetime.timedelta(seconds=60))
    try:
        vote = StopVote(torch.device("cuda"), 1)
        assert vote.after_step(False) is False  # a first sum, in flight
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                quiet = [vote.after_step(False) for _ in range(5)]
                stop = vote.after_step(True)  # every rank (the one) wishes: at once
        finally:
            torch.cuda.set_sync_debug_mode("default")
        vote.close()
    finally:
        tdist.destroy_process_group()
    assert quiet == [False] * 5 and stop is True
    assert [str(w.message) for w in caught if "synchroniz" in str(w.message)] == []


def test_cuda_fp32_follows_the_cpu_trajectory(tmp_path):
    run_ok(tmp_path / "cpu", SMALL)
    gpu = train(compose_cfg(SMALL + ["device=cuda"]), tmp_path / "gpu")
    assert gpu["world_size"] == 1
    for a, b in zip(losses(tmp_path / "gpu"), losses(tmp_path / "cpu")):
        assert abs(a - b) <= 1e-3 * abs(b)


def test_bf16_and_compile_learn_on_gpu(tmp_path):
    cfg = compose_cfg(["device=cuda", "trainer.precision=bf16", "trainer.compile=true",
                       "trainer.max_steps=600"])
    s = train(cfg, tmp_path)
    assert s["eval_r2"] > 0.95
    log = (tmp_path / "train.log").read_text()
    assert "model compiled with torch.compile" in log and "training eagerly" not in log
    derived = json.loads((tmp_path / "derived.json").read_text())
    assert derived["device"] == "cuda:0" and derived["backend"] == "nccl"
    assert derived["cuda"] and derived["nccl"] and derived["gpus_per_node"] >= 1
    if any(gpu in derived["device_name"] for gpu in ("A100", "H100", "H200")):
        assert derived["peak_tflops_source"].endswith("bf16 data sheet")
    rows = [m for m in read_metrics(tmp_path) if "train/loss" in m]
    assert all(r["mem/max_allocated_gb"] > 0 and 0 < r["perf/mfu"] < 1 for r in rows[1:])


def test_checkpoint_resume_on_gpu(tmp_path):
    base = SMALL + ["device=cuda", "trainer.min_lr_ratio=1.0", "checkpoint.every_steps=10"]
    straight = train(compose_cfg(base + ["trainer.max_steps=30"]), tmp_path / "a")
    train(compose_cfg(base + ["trainer.max_steps=20"]), tmp_path / "b")
    resumed = train(compose_cfg(base + ["trainer.max_steps=30"]), tmp_path / "b")
    assert resumed["resumed_from_step"] == 20
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")[-30:]
    assert all(abs(x - y) <= 1e-6 * abs(y) for x, y in zip(b, a))
    print("bit-exact on GPU:", resumed["param_sha256"] == straight["param_sha256"])


def _torchrun(run_dir, overrides: list[str]) -> list[str]:
    """`torchrun --nproc_per_node=1 -m dgxtrain` on the GPU: the NCCL path of eight ranks."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
            "-m", "dgxtrain", "device=cuda", "logger=none", f"hydra.run.dir={run_dir}",
            *overrides]


def test_under_torchrun_nccl_ddp_compile_bf16_hook_and_vote_never_sync(tmp_path):
    out = tmp_path / "launched.json"
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc_per_node=1", str(ROOT / "tests" / "gpu_launched.py"), str(out)],
                       cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(out.read_text())
    assert (r["backend"], r["compiled"], r["ddp"], r["finite"]) == ("nccl", True, True, True), r
    assert r["syncs"] == [], r["syncs"]  # the comm timer's events included
    assert r["timed"] and 0 <= r["comm_wait_s"] < 1, r
    assert "gradient all-reduce by bf16" in p.stderr


def test_torchrun_on_nccl_killed_then_rerun_resumes_bit_exactly(tmp_path):
    base = SMALL + ["trainer.min_lr_ratio=1.0", "checkpoint.every_steps=10"]
    straight = tmp_path / "straight"
    assert subprocess.run(_torchrun(straight, base), cwd=ROOT, env=clean_env(),
                          capture_output=True, timeout=600).returncode == 0
    run = tmp_path / "run"
    args = _torchrun(run, base + ["fault.hang_at_step=15", "fault.rank=-1"])
    with subprocess.Popen(args, cwd=ROOT, env=clean_env(), stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL) as job:
        marker = run / "faults" / "hang_at_step.rank0"
        end = time.time() + 300
        while not marker.exists() and job.poll() is None and time.time() < end:
            time.sleep(0.2)
        kill_tree(job.pid)  # after the step-10 checkpoint: a node lost mid-run
    assert marker.exists() and not (run / "summary.json").exists()
    p = subprocess.run(args, cwd=ROOT, env=clean_env(), capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    a, b = (json.loads((d / "summary.json").read_text()) for d in (straight, run))
    assert b["resumed_from_step"] == 10 and b["world_size"] == 1
    assert b["param_sha256"] == a["param_sha256"]
