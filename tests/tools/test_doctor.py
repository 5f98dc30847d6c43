"""`python -m dgxtrain.tools.doctor`: the report of real gloo ranks, the slow-rank drill, one
process without a launcher, and the checks as pure functions of gathered data."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from dgxtrain.scaling import bandwidth, workload
from dgxtrain.scaling import model as scaling
from dgxtrain.tools import doctor, measure
from tests.conftest import ROOT, clean_env, kill_tree

# Only the tests that start torchrun carry the marker; the pure-function tests stay fast
# and run under -m "not multiprocess" too.
multiprocess = pytest.mark.multiprocess
PREDICTED = ["data.dim=16", "model.hidden_dim=48"]


def run_doctor(out: Path, args: list[str], nproc: int = 1,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    launcher = ([sys.executable] if nproc == 1 else
                [sys.executable, "-m", "torch.distributed.run", "--standalone",
                 f"--nproc_per_node={nproc}"])
    cmd = [*launcher, "-m", "dgxtrain.tools.doctor", "--device=cpu", "--json", str(out),
           "--gemm-seconds=0.2", *args]
    with subprocess.Popen(cmd, cwd=ROOT, env=env or clean_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True) as p:
        try:
            stdout, stderr = p.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            kill_tree(p.pid)  # the workers too, not only torchrun
            p.communicate()
            raise
    return subprocess.CompletedProcess(cmd, p.returncode, stdout, stderr)


@multiprocess
def test_two_cpu_ranks_report(tmp_path):
    out = tmp_path / "doctor.json"
    # Two ranks share this box's cores with whatever else runs: their GEMM rates can differ
    # by 2x, which the default 0.8 would flag. 0.3 still catches the drill's 10x below.
    p = run_doctor(out, ["--max-mb", "4", "--slow-fraction=0.3", "--predict", *PREDICTED],
                   nproc=2)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rep = json.loads(out.read_text())
    assert {"versions", "env", "devices", "ranks", "allreduce", "problems", "ok"} <= rep.keys()
    assert rep["ok"] is True and rep["problems"] == []
    assert rep["versions"]["torch"] and rep["versions"]["nccl"] is None
    assert rep["env"]["WORLD_SIZE"] == "2" and rep["env"]["OMP_NUM_THREADS"] == "1"
    ranks = rep["ranks"]
    assert sorted(r["rank"] for r in ranks) == [0, 1]
    for r in ranks:
        # Each rank gets its share of the cores, as training does.
        assert r["gemm_tflops"] > 0 and r["device"] == "cpu"
        assert r["threads"] == max(1, len(os.sched_getaffinity(0)) // 2)
        assert r["num_cpus"] >= 1 and r["host"]
    rows = rep["allreduce"]
    assert [r["bytes"] for r in rows] == [64 * 2**10, 256 * 2**10, 2**20, 4 * 2**20]
    n = 2
    for r in rows:
        assert r["time_us"] > 0 and r["algbw_gbps"] > 0 and r["busbw_gbps"] > 0
        assert r["algbw_gbps"] == pytest.approx(r["bytes"] / (r["time_us"] * 1e-6) / 1e9)
        assert r["busbw_gbps"] == pytest.approx(r["algbw_gbps"] * 2 * (n - 1) / n)
    # The report on stdout is rank 0's alone and shows what the JSON holds.
    assert p.stdout.count("dgxtrain doctor:") == 1
    assert "busbw" in p.stdout and "problems: none, OK" in p.stdout
    for r in ranks:
        assert f"{r['gemm_tflops']:.3f}" in p.stdout
    # The prediction for the run the overrides train: its model, the median rank's GEMM rate
    # at --mfu's default, and at 2 GPUs the all-reduce curve measured above.
    pred = rep["prediction"]
    w = workload.build(PREDICTED)
    assert (pred["parameters"], pred["bucket_bytes"]) == (w.parameters, w.bucket_bytes)
    assert pred["gemm_tflops"] == pytest.approx(statistics.median(r["gemm_tflops"]
                                                                  for r in ranks))
    assert pred["step_s"] == pytest.approx(w.compute(pred["gemm_tflops"], 0.42).step_s)
    two = next(row for row in pred["table"] if row["gpus"] == 2)
    curve = bandwidth.measured(rows, 2, pred["latency_s"])
    assert pred["latency_s"] > 0 and two["bandwidth"] == "measured here"
    assert two["comm_s"] == pytest.approx(sum(scaling.allreduce_s(b, 2, curve)
                                              for b in pred["bucket_bytes"]))
    assert f"scaling prediction for {' '.join(PREDICTED)}: {w.parameters:,} parameters" in p.stdout


@multiprocess
def test_slow_rank_drill_is_flagged(tmp_path):
    out = tmp_path / "doctor.json"
    p = run_doctor(out, ["--max-mb", "0.25"], nproc=2,
                   env=clean_env(DGXTRAIN_DOCTOR_SLOW_RANK="1"))
    assert p.returncode == 1, p.stdout[-3000:] + p.stderr[-3000:]
    rep = json.loads(out.read_text())
    assert rep["ok"] is False
    assert len(rep["problems"]) == 1 and rep["problems"][0].startswith("rank 1 on ")
    assert "GEMM" in rep["problems"][0] and "median" in rep["problems"][0]
    assert "problems (1):" in p.stdout and "  - rank 1 on " in p.stdout


def test_single_process_without_launcher(tmp_path):
    out = tmp_path / "doctor.json"
    p = run_doctor(out, [])
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rep = json.loads(out.read_text())
    assert rep["launcher"] == "single" and rep["ok"] is True
    assert [r["rank"] for r in rep["ranks"]] == [0] and rep["ranks"][0]["gemm_tflops"] > 0
    assert rep["allreduce"] == []
    assert "all-reduce: skipped, one rank" in p.stdout


def test_usage_errors_exit_2(monkeypatch, capsys):
    with pytest.raises(SystemExit) as e:
        doctor.main(["--slow-fraction", "1.5"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:  # an override with no --predict to take it
        doctor.main(["--device=cpu", "data.dim=16"])
    assert e.value.code == 2 and "go with --predict" in capsys.readouterr().err
    monkeypatch.setenv("RANK", "0")  # a half-set torchrun environment
    assert doctor.main(["--device=cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("dgxtrain: doctor: half-set torchrun environment")
    monkeypatch.delenv("RANK")
    monkeypatch.setenv(doctor.SLOW_RANK_VAR, "one")
    assert doctor.main(["--device=cpu"]) == 2
    assert doctor.SLOW_RANK_VAR in capsys.readouterr().err


def _rank(rank: int, tflops: float = 100.0, host: str = "node1",
          device_name: str = "NVIDIA H200", gpu_id: str | None = None) -> dict:
    return {"rank": rank, "host": host, "device": f"cuda:{rank}", "device_name": device_name,
            "gpu_id": gpu_id or f"GPU-{host}-{rank}", "gemm_tflops": tflops}


def _rows(busbw: float, size: int = 2**30) -> list[dict[str, float]]:
    return [{"bytes": 2**20, "time_us": 50.0, "algbw_gbps": 1.0, "busbw_gbps": 1.0},
            {"bytes": size, "time_us": 1.0, "algbw_gbps": busbw * 8 / 14, "busbw_gbps": busbw}]


def test_busbw_check_flags_slow_nvlink_only_where_it_applies():
    eight = [_rank(r) for r in range(8)]
    low = doctor.check_busbw(eight, _rows(90.0), fraction=0.5)
    assert len(low) == 1 and "90.0 GB/s" in low[0] and "H200" in low[0] and "1 GiB" in low[0]
    assert doctor.check_busbw(eight, _rows(450.0), fraction=0.5) == []
    assert doctor.check_busbw(eight, _rows(200.0), fraction=0.5) == []  # above 0.5 x 360
    assert doctor.check_busbw(eight, _rows(200.0), fraction=0.75) != []
    # No verdict: unknown GPU, small messages, one rank, ranks spread over nodes.
    a100 = [_rank(r, device_name="NVIDIA A100-SXM4-80GB") for r in range(8)]
    assert doctor.check_busbw(a100, _rows(90.0), fraction=0.5) == []
    assert doctor.check_busbw(eight, _rows(90.0, size=4 * 2**20), fraction=0.5) == []
    assert doctor.check_busbw(eight[:1], _rows(90.0), fraction=0.5) == []
    two_nodes = [_rank(r, host=f"node{r % 2}") for r in range(8)]
    assert doctor.check_busbw(two_nodes, _rows(90.0), fraction=0.5) == []


def test_slow_rank_check_uses_the_median():
    # Against the mean (89) rank 3's 75 would pass (0.8 x 89 = 71.2); against the median 99
    # (79.2) it does not.
    ranks = [_rank(0, 100.0), _rank(1, 101.0), _rank(2, 99.0), _rank(3, 75.0), _rank(4, 70.0)]
    problems = doctor.check_slow_ranks(ranks, fraction=0.8)
    assert [p.split(":")[0] for p in problems] == ["rank 3 on node1", "rank 4 on node1"]
    assert "median 99.000" in problems[0] and "nvidia-smi" in problems[0]
    assert doctor.check_slow_ranks(ranks[:3], fraction=0.8) == []
    assert doctor.check_slow_ranks([_rank(0, 1.0)], fraction=0.8) == []


def test_device_and_world_checks():
    ok = [_rank(0), _rank(1), _rank(0, host="node2")]  # same index on another node is fine
    ok[2]["rank"] = 2
    assert doctor.check_devices(ok) == [] and doctor.check_world(ok, 3) == []
    shared = [_rank(0, gpu_id="GPU-a"), _rank(1, gpu_id="GPU-a")]
    problems = doctor.check_devices(shared)
    assert len(problems) == 1 and "ranks 0, 1 on node1 share one GPU" in problems[0]
    cpu = dict(_rank(1), device="cpu")
    del cpu["gpu_id"]
    problems = doctor.check_devices([_rank(0), cpu])
    assert len(problems) == 1 and problems[0].startswith("rank 1 on node1 sees no GPU")
    cpus_only = [dict(cpu, rank=0), cpu]
    assert doctor.check_devices(cpus_only) == []  # CPU ranks share cores, not devices
    assert "launcher set a world of 4" in doctor.check_world(ok, 4)[0]
    cpu_wheel = [dict(cpus_only[0], nvidia_smi=True, cuda_available=False), cpus_only[1]]
    problems = doctor.check_devices(cpu_wheel)
    assert len(problems) == 1 and problems[0].startswith("torch sees no GPU on node1")
    # --device=cpu on a GPU node is a choice, not a fault.
    assert doctor.check_devices([dict(cpu_wheel[0], cuda_available=True)]) == []


def test_environment_selection_and_redaction():
    env = {"NCCL_IB_HCA": "mlx5", "NCCL_API_KEY": "s3cret", "SLURM_JOB_ID": "42",
           "SLURM_PROCID": "3", "MY_TOKEN": "x", "CUDA_VISIBLE_DEVICES": "0,1",
           "TORCH_NCCL_AUTH_PASSWORD": "pw", "HOME": "/root", "WORLD_SIZE": "8"}
    assert doctor.relevant_env(env) == {
        "CUDA_VISIBLE_DEVICES": "0,1", "NCCL_API_KEY": "<redacted>", "NCCL_IB_HCA": "mlx5",
        "SLURM_JOB_ID": "42", "TORCH_NCCL_AUTH_PASSWORD": "<redacted>", "WORLD_SIZE": "8"}


def test_message_sizes_and_cpu_ranges():
    assert measure.message_sizes(2**30) == [64 * 4**k * 2**10 for k in range(8)]
    assert measure.message_sizes(100 * 2**20)[-2:] == [64 * 2**20, 100 * 2**20]
    assert measure.message_sizes(2**10) == [2**10]
    assert doctor.cpu_ranges([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"
    assert doctor.cpu_ranges([3]) == "3"
