"""The loader benchmark's quick mode: well-formed output whose reported figures follow from
its raw ones (speed, and the 0.95 target, are the benchmark's to report, not a test's)."""

import json
import math
import statistics
import subprocess
import sys

import pytest

from tests.conftest import ROOT, clean_env

pytestmark = pytest.mark.multiprocess


def test_quick_loader_benchmark(tmp_path):
    out = tmp_path / "loader.json"
    p = subprocess.run([sys.executable, "-m", "bench.loader_bench", "--quick",
                        "--json", str(out)], cwd=ROOT, env=clean_env(), capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "ratio" in p.stdout and "extrapolated" in p.stdout
    r = json.loads(out.read_text())
    w = r["workload"]
    assert w["samples"] > 0 and w["batch_per_rank"] == 128 and w["world_size"] == 2
    assert set(r["throughput"]) == {f"w{n}" for n in w["workers"]} == {"w0", "w2"}
    for t in r["throughput"].values():
        for side in ("ours", "plain"):
            rounds = t[f"{side}_samples_per_s"]
            assert len(rounds) == w["rounds"] and all(x > 0 and math.isfinite(x) for x in rounds)
            assert t[f"{side}_median"] == pytest.approx(statistics.median(rounds))
            assert t["startup_s"][side] > 0
        assert t["ratio"] == pytest.approx(t["ours_median"] / t["plain_median"])
        assert t["meets_target"] == (t["ratio"] >= w["target_ratio"])
    res = r["resume"]
    for key in ("ours_first_batch_s", "ours_first_batch_workers_s"):
        assert set(res[key]) == {"10", "1000000"} and all(v > 0 for v in res[key].values())
    for start, times in res["ours_first_batch_rounds_s"].items():
        assert res["ours_first_batch_s"][start] == pytest.approx(statistics.median(times))
    for key in ("skip_sampler_s", "replay_loading_s"):
        measured = {int(k): v for k, v in res[key]["measured"].items()}
        assert len(measured) == 2 and min(measured) == 10
        (k1, t1), (k2, t2) = sorted(measured.items())
        assert t1 > 0 and t2 > 0, measured
        # Linear extrapolation from the measured points, to k = 1e6; where noise made the
        # smaller k the slower, the rate at the larger k.
        slope = (t2 - t1) / (k2 - k1) if t2 > t1 else t2 / k2
        assert res[key]["extrapolated_1e6"] == pytest.approx(t2 + slope * (10**6 - k2))
        assert res[key]["extrapolated_1e6"] > t2
