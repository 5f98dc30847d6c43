"""bench.scaling_check on 2 gloo ranks: the scaling model measured, predicted and compared in
the world it runs in (the agreement is the tool's to report: it is a timing on a shared
machine)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, clean_env


def run_scaling(out: Path, nproc: int, steps: int) -> tuple[dict, str]:
    """`torchrun --nproc_per_node=nproc -m bench.scaling_check` in 2 short rounds: its JSON and
    its stdout."""
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        f"--nproc_per_node={nproc}", "-m", "bench.scaling_check", "--rounds", "2",
                        "--steps", str(steps), "--json", str(out)],
                       cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return json.loads(out.read_text()), p.stdout


@pytest.mark.multiprocess
def test_two_ranks_measure_predict_and_compare(tmp_path):
    r, stdout = run_scaling(tmp_path / "scaling.json", nproc=2, steps=3)
    w, c = r["workload"], r["compute"]
    assert w["world_size"] == 2 and not w["overlap"]  # CPU ranks: after the backward
    assert sum(w["bucket_bytes"]) == w["grad_bytes"] == 4 * w["parameters"]
    # The prediction follows from the measured parts: compute, then each bucket's
    # all-reduce as measured (the curve reproduces its own points).
    times = {row["bytes"]: row["time_us"] * 1e-6 for row in r["allreduce"]}
    comm = sum(times[b] for b in w["bucket_bytes"])
    assert r["predicted_comm_s"] == pytest.approx(comm, rel=1e-6)
    assert r["predicted_step_s"] == pytest.approx(c["step_s"] + comm, rel=1e-6)
    assert r["error"] == pytest.approx(r["predicted_step_s"] / r["measured_step_s"] - 1)
    assert len(r["measured_step_s_rounds"]) == 2 and r["measured_step_s"] > 0
    table = {row["gpus"]: row for row in r["table"]}
    assert table[1]["predicted_efficiency"] == 1.0
    assert table[2]["predicted_step_s"] == pytest.approx(r["predicted_step_s"])
    assert math.isfinite(table[1024]["predicted_efficiency"])
    assert "world of 2: measured step" in stdout


@pytest.mark.gpu
def test_the_scaling_tool_measures_under_torchrun_on_the_gpu(tmp_path):
    # Its compute is the DDP step with a hook that sends nothing: on GPUs that is the timed
    # hook's inner one, swapped (a DDP takes one comm hook).
    r, _ = run_scaling(tmp_path / "scaling.json", nproc=1, steps=5)
    assert r["workload"]["overlap"] and r["workload"]["device"] == "cuda:0"
    assert 0 < r["compute"]["step_s"] and 0 < r["measured_step_s"]
