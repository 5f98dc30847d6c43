"""A checkpoint is complete only as every rank reported it, published atomically, and
pruned by what verifies; an error choosing or writing one reaches every rank."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from dgxtrain import checkpoint
from dgxtrain.dist.env import DistEnv
from tests.conftest import ROOT, clean_env, free_port

CPU = torch.device("cpu")
META = {"world_size": 1, "seed": 0}


def _env(world: int = 1, rank: int = 0) -> DistEnv:
    return DistEnv(rank, rank, world, "single", CPU)


def _save(run_dir: Path, step: int, env: DistEnv | None = None, keep_last: int = 2,
          **shared) -> str | None:
    shared = shared or {"model.pt": {"w": torch.full((4,), float(step))}}
    return checkpoint.save(run_dir, step, env or _env(), shared, META, keep_last)


def test_the_manifest_lists_what_every_rank_reported(tmp_path):
    # Rank 0 of 2, with no rank 1 reporting its RNG file: a listing of the directory would
    # call this complete; the manifest's expected files do not.
    failed = _save(tmp_path, 3, _env(world=2))
    assert failed is not None and "no report of rng-rank1.pt" in failed
    assert not list((tmp_path / "checkpoints").glob("step-*"))
    assert _save(tmp_path, 3) is None
    files = checkpoint.manifest(tmp_path / "checkpoints" / "step-3")["files"]
    assert sorted(files) == ["model.pt", "rng-rank0.pt"]


def test_the_directory_is_fsynced_before_it_is_published(tmp_path, monkeypatch):
    calls = []
    real_rename, real_fsync_dir = checkpoint.os.rename, checkpoint._fsync_dir
    monkeypatch.setattr(checkpoint.os, "rename",
                        lambda a, b: calls.append(("rename", Path(a).name)) or real_rename(a, b))
    monkeypatch.setattr(checkpoint, "_fsync_dir",
                        lambda p: calls.append(("fsync", Path(p).name)) or real_fsync_dir(p))
    assert _save(tmp_path, 4) is None
    assert calls.index(("fsync", ".tmp-step-4")) < calls.index(("rename", ".tmp-step-4"))


def test_replacing_a_step_never_leaves_it_missing(tmp_path, monkeypatch):
    assert _save(tmp_path, 5) is None
    real_rename = checkpoint.os.rename

    def rename(a, b):  # the publishing rename fails, as on a full or flaky file system
        if Path(a).name == ".tmp-step-5":
            raise OSError(5, "Input/output error (injected)", str(a))
        return real_rename(a, b)

    monkeypatch.setattr(checkpoint.os, "rename", rename)
    assert "Input/output error" in _save(tmp_path, 5, model=None)
    found = checkpoint.find_latest(tmp_path / "checkpoints")
    assert found is not None and found.name == "step-5"
    assert checkpoint.load_file(found / "model.pt")["w"][0] == 5.0  # the old one, whole
    # A save that died between the two renames left step-5.replaced: still resumable.
    monkeypatch.undo()
    (tmp_path / "checkpoints" / "step-5").rename(tmp_path / "checkpoints" / "step-5.replaced")
    assert checkpoint.find_latest(tmp_path / "checkpoints").name == "step-5.replaced"


def test_pruning_counts_only_checkpoints_that_verify(tmp_path):
    for step in (2, 4, 6):
        assert _save(tmp_path, step, keep_last=10) is None
    checkpoint.finish_pruning()
    root = tmp_path / "checkpoints"
    (root / "step-6" / "model.pt").write_bytes(b"short")  # the newest lost its data
    checkpoint.prune(root, keep_last=2)
    # Two good ones are kept: step-4 and step-2, not step-6 and step-4.
    assert sorted(d.name for d in root.glob("step-*")) == ["step-2", "step-4", "step-6"]
    assert _save(tmp_path, 8, keep_last=2) is None
    checkpoint.finish_pruning()
    assert sorted(d.name for d in root.glob("step-*")) == ["step-4", "step-6", "step-8"]


SCRIPT = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import torch
    from dgxtrain import checkpoint
    from dgxtrain.dist.collectives import process_group
    from dgxtrain.dist.env import DistEnv
    env, run_dir, out = DistEnv.from_env("cpu"), Path(sys.argv[1]), {}

    def fail_on_rank0(step, path):
        if env.rank == 0:
            raise RuntimeError("not a storage error")

    with process_group(env, timeout_s=20):
        try:  # rank 0 finds no such checkpoint; rank 1 waits for its answer
            checkpoint.choose(str(run_dir / "no-such" / "step-3"), run_dir, env)
        except Exception as e:
            out["choose"] = type(e).__name__
        try:
            checkpoint.save(run_dir, 1, env, {"model.pt": {"w": torch.zeros(1)}},
                            {"seed": 0}, 2, fail_on_rank0)
        except Exception as e:
            out["save"] = type(e).__name__
    (run_dir / f"result{env.rank}.json").write_text(json.dumps(out))
""")


@pytest.mark.multiprocess
def test_choosing_and_writing_errors_reach_every_rank(tmp_path):
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                        f"--master_port={free_port()}", str(script), str(tmp_path)], cwd=ROOT,
                       env=clean_env(), capture_output=True, text=True, timeout=120)
    results = {r: json.loads(f.read_text()) for r in (0, 1)
               if (f := tmp_path / f"result{r}.json").exists()}
    expected = {"choose": "CheckpointError", "save": "CheckpointError"}
    assert results == {0: expected, 1: expected}, p.stdout[-2000:] + p.stderr[-2000:]
