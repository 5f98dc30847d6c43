"""The restore benchmark runs under torchrun and reports what it measured: each way's median
of its rounds, and the storage it read (which of the two ways is faster is its to report)."""

import json
import statistics
import subprocess
import sys

import pytest

from tests.conftest import ROOT, clean_env, free_port

pytestmark = pytest.mark.multiprocess


def test_restore_benchmark_on_two_ranks(tmp_path):
    out = tmp_path / "restore.json"
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                        f"--master_port={free_port()}", "-m", "bench.restore_bench",
                        "--mb", "4", "--rounds", "2", "--dir", str(tmp_path), "--json", str(out)],
                       cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "rank 0 reads, broadcasts" in p.stdout and "every rank reads" in p.stdout
    r = json.loads(out.read_text())
    # 4 MiB of weights, and AdamW's two moments of the same size, plus the small files.
    assert 12 * 2**20 < r["checkpoint_bytes"] < 13 * 2**20 and r["world_size"] == 2
    assert r["cold_cache"] is False  # only --cold empties the machine's page cache
    for way in r["ways"].values():
        assert len(way["runs"]) == 2 and all(run["s"] > 0 for run in way["runs"])
        assert way["median_s"] == pytest.approx(statistics.median(x["s"] for x in way["runs"]))
    assert not list(tmp_path.glob("restore-bench-*")), "the benchmark left its checkpoint"
