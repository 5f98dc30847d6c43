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
from dgxtrain.distributed.env import DistEnv
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
    real_rename, real_fsync_dir = checkpoint.store.os.rename, checkpoint.store._fsync_dir
    monkeypatch.setattr(checkpoint.store.os, "rename",
                        lambda a, b: calls.append(("rename", Path(a).name)) or real_rename(a, b))
    monkeypatch.setattr(checkpoint.store, "_fsync_dir",
                        lambda p: calls.append(("fsync", Path(p).name)) or real_fsync_dir(p))
    assert _save(tmp_path, 4) is None
    assert calls.index(("fsync", ".tmp-step-4")) < calls.index(("rename", ".tmp-step-4"))


def test_replacing_a_step_never_leaves_it_missing(tmp_path, monkeypatch):
    assert _save(tmp_path, 5) is None
    real_rename = checkpoint.store.os.rename

    def rename(a, b):  # the publishing rename fails, as on a full or flaky file system
        if Path(a).name == ".tmp-step-5":
            raise OSError(5, "Input/output error (injected)", str(a))
        return real_rename(a, b)

    monkeypatch.setattr(checkpoint.store.os, "rename", rename)
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
    # Two good ones are kept: step-4 and step-2, not step-6 and step-4; step-6 is set aside.
    assert sorted(d.name for d in root.glob("step-*")) == ["step-2", "step-4", "step-6.damaged"]
    assert _save(tmp_path, 8, keep_last=2) is None
    checkpoint.finish_pruning()
    assert sorted(d.name for d in root.glob("step-*")) == ["step-4", "step-6.damaged", "step-8"]


SCRIPT = textwrap.dedent("""
    import builtins, json, sys
    from pathlib import Path
    import torch
    from dgxtrain import checkpoint
    from dgxtrain.distributed.collectives import broadcast_tensors, process_group
    from dgxtrain.distributed.env import DistEnv
    env, run_dir, out = DistEnv.from_env("cpu"), Path(sys.argv[1]), {}

    def digest(model, opt):
        state = opt.state_dict()["state"]
        tensors = list(model.state_dict().values()) + [
            t for k in sorted(state) for _, t in sorted(state[k].items())]
        return [t.detach().double().flatten().tolist() for t in tensors]

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
        # A resume: the ranks start from different weights; rank 0's saved ones come back.
        torch.manual_seed(env.rank)
        model, meta = torch.nn.Linear(3, 2), {"seed": 0, "global_batch_size": 1,
                                              "num_samples": 1, "world_size": 2}
        opt = torch.optim.AdamW(model.parameters())
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
        model(torch.ones(1, 3)).sum().backward()
        opt.step()
        out["saved"] = digest(model, opt)
        shared = checkpoint.contents(model, opt, sched, {"step": 2}, {})
        assert checkpoint.save(run_dir, 2, env, shared, meta, 2) is None
        torch.manual_seed(10 + env.rank)
        model = torch.nn.Linear(3, 2)
        opt = torch.optim.AdamW(model.parameters())
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
        opened, real_open = [], builtins.open
        builtins.open = lambda f, *a, **k: opened.append(Path(f).name) or real_open(f, *a, **k)
        chosen = checkpoint.choose("auto", run_dir, env)
        checkpoint.restore(chosen, env, meta, model, opt, sched)
        builtins.open = real_open
        out["restored"], out["opened"] = digest(model, opt), sorted(opened)
        # The broadcast itself, on what a state dict may hold: dtypes interleaved, a scalar,
        # an empty tensor, one above the bucket size, containers and plain values.
        g = torch.Generator().manual_seed(0)
        tree = {"a": [torch.randn(3, generator=g).bfloat16(), torch.tensor(7)],
                "b": (torch.randn(2, 5, generator=g), "text", 3), "empty": torch.zeros(0),
                "big": torch.randn(2**20 + 3, generator=g), "flags": torch.tensor([True, False]),
                "c": torch.randn(4, generator=g).half(), "d": torch.randn(6, generator=g)}
        got = broadcast_tensors(tree if env.rank == 0 else None, torch.device("cpu"))
        pairs = [(got["a"][0], tree["a"][0]), (got["a"][1], tree["a"][1]),
                 (got["b"][0], tree["b"][0]), *((got[k], tree[k]) for k in
                                                ("empty", "big", "flags", "c", "d"))]
        out["tree_equal"] = (all(x.dtype == y.dtype and torch.equal(x, y) for x, y in pairs)
                             and got["b"][1:] == ("text", 3) and type(got["b"]) is tuple)
    (run_dir / f"result{env.rank}.json").write_text(json.dumps(out))
""")


@pytest.mark.multiprocess
def test_errors_reach_every_rank_and_a_resume_reads_each_file_once(tmp_path):
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                        f"--master_port={free_port()}", str(script), str(tmp_path)], cwd=ROOT,
                       env=clean_env(), capture_output=True, text=True, timeout=120)
    results = {r: json.loads(f.read_text()) for r in (0, 1)
               if (f := tmp_path / f"result{r}.json").exists()}
    assert results.keys() == {0, 1} and all("tree_equal" in r for r in results.values()), \
        p.stderr[-3000:]
    errors = {"choose": "CheckpointError", "save": "CheckpointError"}
    assert [{k: r[k] for k in errors} for r in results.values()] == [errors, errors]
    # Rank 0's weights and AdamW state, bit for bit on both ranks (rank 1's own differed).
    assert results[0]["saved"] != results[1]["saved"]
    assert results[0]["restored"] == results[1]["restored"] == results[0]["saved"]
    # Each file read once, by rank 0 (the checksum and the load are one read), except each
    # rank's own RNG state; rank 0 reads rank 1's only to check it.
    assert results[0]["opened"] == ["model.pt", "optim.pt", "rng-rank0.pt", "rng-rank1.pt",
                                    "state.pt"]
    assert results[1]["opened"] == ["rng-rank1.pt"]
    assert results[0]["tree_equal"] and results[1]["tree_equal"]
