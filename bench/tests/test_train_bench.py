"""The benchmark's quick mode on 2 gloo ranks: well-formed output, and the trainer's step
equal to the plain DDP loop's (speed is the benchmark's to report, not a test's)."""

import json
import math
import statistics
import subprocess
import sys

import pytest

from tests.conftest import ROOT, clean_env

pytestmark = pytest.mark.multiprocess


def test_quick_benchmark_on_two_ranks(tmp_path):
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc_per_node=2", "-m", "bench.train_bench", "--quick",
                        "--json", str(out), "--png", str(png)],
                       cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    r = json.loads(out.read_text())
    # The default path, the tuned plain DDP loop, the peers' loops (the dev extra installs
    # them), and the opt-in shared-memory path.
    assert r["workload"]["world_size"] == 2
    assert r["workload"]["loops"] == ["trainer", "reference", "reference_2", "fabric",
                                      "accelerate", "trainer_shm"]
    assert r["workload"]["loops_left_out"] == {}
    # Every loop ran every round, and the reported figures follow from the raw ones.
    for name in r["workload"]["loops"]:
        loop = r["loops"][name]
        assert len(loop["samples_per_s"]) == r["workload"]["rounds"] == 2
        assert all(s > 0 for s in loop["samples_per_s"])
        assert loop["median_samples_per_s"] == statistics.median(loop["samples_per_s"])
        ph = loop["phase_s"]
        # The step's three phases share it out; the comm wait (on CPU ranks DDP's sample
        # of an earlier step) is reported against the same whole.
        total = ph["data"] + ph["fwd_bwd"] + ph["optim"]
        assert all(ph[k] > 0 for k in ("data", "fwd_bwd", "optim")), (name, ph)
        assert loop["phase_share"] == pytest.approx(
            {k: ph[k] / total for k in ("data", "fwd_bwd", "optim")}, rel=1e-9)
        assert math.isclose(loop["comm_share"], ph["comm"] / total, rel_tol=1e-9)
        assert 0 < loop["fraction_of_matmul_peak"] < 2, (name, loop)
        tflops = r["workload"]["flops_per_sample"] * loop["median_samples_per_s"] / 2 / 1e12
        assert math.isclose(loop["tflops_per_device"], tflops, rel_tol=1e-9)
    # The reference is the mean of its two copies in each round; the speedups are over it,
    # by medians and as the median of the rounds' ratios; the noise is copy over copy.
    rounds = {name: r["loops"][name]["samples_per_s"] for name in r["workload"]["loops"]}
    reference = [(a + b) / 2 for a, b in zip(rounds["reference"], rounds["reference_2"])]
    assert r["reference_samples_per_s"] == pytest.approx(reference, rel=1e-12)
    for key, name in (("speedup", "trainer"), ("speedup_shm", "trainer_shm")):
        assert math.isclose(r[key], statistics.median(rounds[name]) / statistics.median(
            reference), rel_tol=1e-9)
    assert math.isclose(r["paired_speedup"], statistics.median(
        t / ref for t, ref in zip(rounds["trainer"], reference)), rel_tol=1e-9)
    assert math.isclose(r["noise"]["speedup"], statistics.median(rounds["reference_2"])
                        / statistics.median(rounds["reference"]), rel_tol=1e-9)
    assert math.isclose(r["noise"]["paired_speedup"], statistics.median(
        b / a for a, b in zip(rounds["reference"], rounds["reference_2"])), rel_tol=1e-9)
    for name in ("fabric", "accelerate"):
        assert math.isclose(r["trainer_vs"][name], r["loops"]["trainer"]["median_samples_per_s"]
                            / r["loops"][name]["median_samples_per_s"], rel_tol=1e-9)
    # The same mathematics: after identical batches the parameters agree in fp32 (every
    # loop against the reference: the trainer's paths, Fabric's and Accelerate's).
    a = r["agreement"]
    assert a["steps"] > 10 and a["equal"] and a["max_abs_diff"] <= 1e-5, a
    # nccl-tests definitions: busbw = algbw * 2(n-1)/n, which is algbw itself at n = 2.
    sizes = [row["bytes"] for row in r["allreduce"]]
    assert sizes == sorted(sizes) and len(sizes) >= 4
    for row in r["allreduce"]:
        assert row["algbw_gbps"] > 0
        assert math.isclose(row["algbw_gbps"], row["bytes"] / (row["time_us"] * 1e-6) / 1e9,
                            rel_tol=1e-6)
        assert math.isclose(row["busbw_gbps"], row["algbw_gbps"], rel_tol=1e-9)
    assert len(r["ranks"]) == 2 and all(x["peak_tflops"] > 0 for x in r["ranks"])
    # Peak memory does not grow with the dataset: 1e9 samples cost what 1e3 cost.
    m = r["memory_and_startup"]
    assert abs(m["peak_ratio_1e9_vs_1e3"] - 1) <= 0.05, m
    assert all(0 < m[k]["startup_s"] < 120
               for k in ("num_samples_1000", "num_samples_1000000000")), m
    assert "speedup trainer / reference" in p.stdout and "busbw" in p.stdout
    assert png.stat().st_size > 20_000


def test_a_peer_is_found_under_any_of_its_package_names():
    from bench import peers
    assert peers._installed(("no_such_package", "json")) == "json"
    assert peers._installed(("no_such_package.sub", "no_such_package")) is None


def test_rounds_hold_as_many_log_steps():
    # Quick mode logs every 5 steps: rounds of 3 would hold a log step or none.
    p = subprocess.run([sys.executable, "-m", "bench.train_bench", "--quick", "--steps", "3",
                        "--no-memory", "--no-peers"], cwd=ROOT, env=clean_env(),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode != 0
    assert "--steps 3 is not a multiple of trainer.log_every=5" in p.stderr, p.stderr[-2000:]
