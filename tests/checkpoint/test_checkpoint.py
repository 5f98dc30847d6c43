"""Checkpoints: atomic, verified, pruned; resume is exact, refuses what it cannot honour."""

import json
import pickle
from pathlib import Path

import pytest
import torch

from dgxtrain.checkpoint import CheckpointError, verify
from dgxtrain.checkpoint.store import _sha256
from dgxtrain.distributed.preempt import Requeue, StopRequests
from dgxtrain.loop.evaluating import Evaluating
from dgxtrain.loop.train import train
from tests.conftest import compose_cfg, read_metrics

# Constant LR: a run's trajectory then does not depend on max_steps, so a run extended
# from a checkpoint can be compared with one that ran straight through.
BASE = ["device=cpu", "data.dim=16", "model.hidden_dim=32", "trainer.global_batch_size=64",
        "trainer.warmup_steps=0", "trainer.min_lr_ratio=1.0", "trainer.log_every=1",
        "checkpoint.every_steps=5", "data.eval_samples=128"]


def run(run_dir: Path, *extra: str) -> dict:
    return train(compose_cfg(BASE + list(extra)), run_dir)


def step_losses(run_dir: Path) -> dict[int, float]:
    """Loss per step; a step logged twice (before a kill and after the resume) counts once,
    the last time."""
    return {m["step"]: m["train/loss"] for m in read_metrics(run_dir) if "train/loss" in m}


def ckpts(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


def test_resume_continues_bit_exactly(tmp_path):
    straight = run(tmp_path / "a", "trainer.max_steps=30")
    run(tmp_path / "b", "trainer.max_steps=20")
    resumed = run(tmp_path / "b", "trainer.max_steps=30")
    assert resumed["resumed_from_step"] == 20 and resumed["steps"] == 30
    assert resumed["param_sha256"] == straight["param_sha256"]
    assert step_losses(tmp_path / "b") == step_losses(tmp_path / "a")


def test_checkpoint_layout_manifest_and_pruning(tmp_path):
    run(tmp_path, "trainer.max_steps=22", "checkpoint.keep_last=3")
    assert ckpts(tmp_path) == ["step-15", "step-20", "step-22"]  # the end is always saved
    d = tmp_path / "checkpoints" / "step-22"
    m = json.loads((d / "manifest.json").read_text())
    assert (m["step"], m["world_size"], m["global_batch_size"]) == (22, 1, 64)
    assert {"config_sha256", "dgxtrain_version", "seed", "num_samples"} <= m.keys()
    assert sorted(m["files"]) == ["model.pt", "optim.pt", "rng-rank0.pt", "state.pt"]
    # Each file's size and SHA-256, hashed as it was written.
    assert all([(d / f).stat().st_size, _sha256(d / f)] == v for f, v in m["files"].items())
    for f in m["files"]:  # plain tensors and values only
        torch.load(d / f, weights_only=True)
    assert verify(d) is None


@pytest.mark.parametrize("damage", ["truncate", "flip", "no_manifest"])
def test_damaged_newest_checkpoint_is_skipped_with_a_reason(tmp_path, damage):
    run(tmp_path, "trainer.max_steps=20")
    newest = tmp_path / "checkpoints" / "step-20"
    data = (newest / "model.pt").read_bytes()
    if damage == "truncate":
        (newest / "model.pt").write_bytes(data[: len(data) // 2])
    elif damage == "flip":  # the same size, one byte changed
        (newest / "model.pt").write_bytes(data[:-9] + bytes([data[-9] ^ 1]) + data[-8:])
    else:
        (newest / "manifest.json").unlink()
    s = run(tmp_path, "trainer.max_steps=25")
    assert s["resumed_from_step"] == 15
    log = (tmp_path / "train.log").read_text()
    reason = {"truncate": f"model.pt has {len(data) // 2} bytes, not {len(data)}",
              "flip": "model.pt fails its checksum", "no_manifest": "no manifest"}[damage]
    assert f"skipping checkpoint {newest}: {reason}" in log


def test_disk_full_during_a_save_keeps_the_previous_checkpoint(tmp_path):
    s = run(tmp_path, "trainer.max_steps=12", "fault.enospc_at_step=10")
    assert s["steps"] == 12  # training went on
    assert ckpts(tmp_path) == ["step-12", "step-5"]  # no step-10, no .tmp-step-10 left
    log = (tmp_path / "train.log").read_text()
    assert "checkpoint step-10: rank 0: writing " in log and "No space left on device" in log
    assert str(tmp_path / "checkpoints" / ".tmp-step-10") in log  # the path is named
    assert verify(tmp_path / "checkpoints" / "step-5") is None


class Payload:
    def __reduce__(self):
        return (print, ("this would have run",))


def test_a_checkpoint_holding_an_arbitrary_object_is_refused(tmp_path):
    run(tmp_path, "trainer.max_steps=5")
    d = tmp_path / "checkpoints" / "step-5"
    with open(d / "model.pt", "wb") as f:
        torch.save({"weights": Payload()}, f, pickle_module=pickle)
    m = json.loads((d / "manifest.json").read_text())
    # It passes the size and checksum checks: only pickle guards.
    m["files"]["model.pt"] = [(d / "model.pt").stat().st_size, _sha256(d / "model.pt")]
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(CheckpointError, match="model.pt: refused to load"):
        run(tmp_path, "trainer.max_steps=10")
    assert not (tmp_path / "stacks").exists()  # the watchdog was disarmed on the way out


def test_what_cannot_be_honoured_is_a_clear_error_unless_starting_fresh(tmp_path):
    run(tmp_path, "trainer.max_steps=5")
    with pytest.raises(CheckpointError, match=r"trainer.global_batch_size=64, this run has 128"):
        run(tmp_path, "trainer.max_steps=10", "trainer.global_batch_size=128")
    with pytest.raises(CheckpointError, match=r"net.0.bias of shape=\(32,\), this run has \(48,\)"):
        run(tmp_path, "trainer.max_steps=10", "model.hidden_dim=48")
    fresh = run(tmp_path, "trainer.max_steps=10", "model.hidden_dim=48",
                "checkpoint.resume=never")
    assert fresh["resumed_from_step"] == 0
    (old,) = tmp_path.glob("previous-*")
    assert (old / "checkpoints" / "step-5" / "manifest.json").is_file()  # kept
    assert json.loads((old / "summary.json").read_text())["steps"] == 5  # its outputs too


def test_only_damaged_checkpoints_refuse_to_start_and_nothing_is_deleted(tmp_path):
    run(tmp_path, "trainer.max_steps=10")
    root = tmp_path / "checkpoints"
    (root / "step-10" / "model.pt").write_bytes(b"short")
    (root / "step-5" / "manifest.json").unlink()
    (tmp_path / "summary.json").unlink()  # as if the run died after its final save
    with pytest.raises(CheckpointError) as refused:  # it used to train from step 0
        run(tmp_path, "trainer.max_steps=10")
    line = str(refused.value)
    assert line.startswith(f"checkpoint.resume=auto: no checkpoint in {root} is complete "
                           "(step-10: model.pt has 5 bytes, not "), line
    assert "step-5: no manifest" in line and "fix: restore one, or checkpoint.resume=never " \
        "to start over" in line
    kept = sorted(d.name for d in root.iterdir())
    assert kept == ["step-10.damaged", "step-5.damaged"]
    with pytest.raises(CheckpointError, match="no checkpoint in .* is complete"):
        run(tmp_path, "trainer.max_steps=10")  # set aside, they still refuse a silent restart
    fresh = run(tmp_path, "trainer.max_steps=10", "checkpoint.resume=never")
    assert fresh["resumed_from_step"] == 0
    (old,) = tmp_path.glob("previous-*")
    assert sorted(d.name for d in (old / "checkpoints").iterdir()) == kept  # the evidence
    assert sorted(d.name for d in root.iterdir()) == ["step-10", "step-5"]


def test_a_damaged_checkpoint_is_never_pruned_or_replaced(tmp_path):
    run(tmp_path, "trainer.max_steps=15", "checkpoint.keep_last=3")
    root = tmp_path / "checkpoints"
    (root / "step-15" / "optim.pt").write_bytes(b"")
    (root / "step-5" / "rng-rank0.pt").write_bytes(b"")
    s = run(tmp_path, "trainer.max_steps=30", "checkpoint.keep_last=2")
    assert s["resumed_from_step"] == 10
    # step-15 set aside at the resume, step-5 by the pruning: neither deleted nor overwritten.
    assert ckpts(tmp_path) == ["step-15.damaged", "step-25", "step-30", "step-5.damaged"]
    assert (root / "step-15.damaged" / "optim.pt").read_bytes() == b""
    log = (tmp_path / "train.log").read_text()
    assert f"checkpoint {root / 'step-5'} is damaged (rng-rank0.pt has 0 bytes" in log


def test_a_start_over_does_not_leave_the_earlier_run_to_be_taken_for_finished(tmp_path,
                                                                            monkeypatch):
    first = run(tmp_path, "trainer.max_steps=10")
    real = Evaluating.run
    monkeypatch.setattr(Evaluating, "run", lambda self, step: (_ for _ in ()).throw(
        RuntimeError("killed in the final eval")) if step == 10 else real(self, step))
    with pytest.raises(RuntimeError, match="killed in the final eval"):
        run(tmp_path, "trainer.max_steps=10", "checkpoint.resume=never")
    monkeypatch.setattr(Evaluating, "run", real)
    # The relaunch resumes the new run's final checkpoint and finishes it: on main it found
    # the earlier run's summary and said "already complete".
    again = run(tmp_path, "trainer.max_steps=10")
    assert again["resumed_from_step"] == 10 and again["param_sha256"] == first["param_sha256"]
    assert json.loads((tmp_path / "summary.json").read_text())["resumed_from_step"] == 10
    (old,) = tmp_path.glob("previous-*")  # the earlier run's outputs, moved aside
    assert json.loads((old / "summary.json").read_text())["resumed_from_step"] == 0
    assert (old / "model.pt").is_file() and (old / "checkpoints" / "step-10").is_dir()
    assert "already complete" not in (tmp_path / "train.log").read_text()


def test_resume_never_continues_its_own_launch_after_a_requeue(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "41")
    run(tmp_path, "trainer.max_steps=10")  # an earlier job's run
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    (tmp_path / "control").mkdir()
    (tmp_path / "control" / "stop").write_text("USR1")  # the first attempt stops for a requeue
    with pytest.raises(Requeue):
        run(tmp_path, "trainer.max_steps=10", "checkpoint.resume=never")
    assert ckpts(tmp_path) == ["step-1"]
    # The requeued attempt: the same command, the same job. It used to start over again.
    s = run(tmp_path, "trainer.max_steps=10", "checkpoint.resume=never")
    assert s["resumed_from_step"] == 1
    assert len(list(tmp_path.glob("previous-*"))) == 1  # job 41's run, set aside once
    monkeypatch.setenv("SLURM_JOB_ID", "43")  # another job starts over
    assert run(tmp_path, "trainer.max_steps=10", "checkpoint.resume=never")[
        "resumed_from_step"] == 0
    assert len(list(tmp_path.glob("previous-*"))) == 2


def test_resume_from_an_explicit_path(tmp_path):
    run(tmp_path / "a", "trainer.max_steps=10")
    s = run(tmp_path / "b", "trainer.max_steps=12",
            f"checkpoint.resume={tmp_path / 'a' / 'checkpoints' / 'step-5'}")
    assert s["resumed_from_step"] == 5


def test_nan_in_error_mode_stops_before_the_update(tmp_path):
    with pytest.raises(FloatingPointError, match="at step 8, update not applied"):
        run(tmp_path, "trainer.max_steps=20", "fault.nan_at_step=8")
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["stop_reason"] == "non_finite" and s["steps"] == 7
    assert ckpts(tmp_path) == ["step-5"]
    weights = torch.load(tmp_path / "checkpoints" / "step-5" / "model.pt", weights_only=True)
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert all(torch.isfinite(w).all() for w in
               torch.load(tmp_path / "model.pt", weights_only=True).values())


def test_nan_in_skip_mode_is_skipped_and_counted(tmp_path):
    s = run(tmp_path, "trainer.max_steps=12", "fault.nan_at_step=8", "trainer.nonfinite=skip")
    assert (s["steps"], s["skipped_steps"], s["stop_reason"]) == (12, 1, "max_steps")
    rows = {m["step"]: m for m in read_metrics(tmp_path) if "train/loss" in m}
    assert rows[7]["train/skipped_steps"] == 0 and rows[8]["train/skipped_steps"] == 1
    assert rows[8]["train/loss"] is None  # NaN is written as null: the file stays valid JSON
    # The fault fires once per run dir: a resumed run does not see it again.
    again = run(tmp_path, "trainer.max_steps=14", "fault.nan_at_step=8",
                "trainer.nonfinite=skip")
    assert again["skipped_steps"] == 1


def test_two_non_finite_steps_in_a_row_name_the_first_and_count_right(tmp_path):
    # Steps 8 and 9 NaN, read at the decision step 10: error mode names 8 and ends at 7.
    over = ["trainer.max_steps=20", "trainer.log_every=10", "fault.nan_at_step=8",
            "fault.nan_steps=2"]
    with pytest.raises(FloatingPointError, match="at step 8, update not applied"):
        run(tmp_path / "error", *over)
    s = json.loads((tmp_path / "error" / "summary.json").read_text())
    assert (s["steps"], s["samples_seen"], s["stop_reason"]) == (7, 7 * 64, "non_finite")
    s = run(tmp_path / "skip", *over, "trainer.nonfinite=skip")
    assert (s["steps"], s["samples_seen"], s["skipped_steps"]) == (20, 20 * 64, 2)


def test_too_many_consecutive_skips_abort(tmp_path):
    with pytest.raises(FloatingPointError, match=r"3 non-finite steps in a row"):
        run(tmp_path, "trainer.max_steps=20", "trainer.nonfinite=skip",
            "trainer.max_skipped=3", "optim=sgd", "optim.lr=1e12", "trainer.grad_clip=0")


def test_a_restarted_run_budgets_the_deadline_with_the_measured_save_time(tmp_path,
                                                                          monkeypatch):
    run(tmp_path, "trainer.max_steps=10")  # saves at 5 and 10
    saved = torch.load(tmp_path / "checkpoints" / "step-10" / "state.pt", weights_only=True)
    measured = saved["train_state"]["checkpoint_s"]
    assert measured > 0  # step 5's save, measured before step 10's was written
    budgets = []
    real_poll = StopRequests.poll
    monkeypatch.setattr(StopRequests, "poll", lambda self, step_s, checkpoint_s:
                        budgets.append(checkpoint_s) or real_poll(self, step_s, checkpoint_s))
    run(tmp_path, "trainer.max_steps=12")
    assert budgets[0] == measured  # not 0 after the restart


def test_optimizer_settings_changed_on_resume_are_honoured_or_refused(tmp_path):
    run(tmp_path, "trainer.max_steps=10")  # AdamW, lr 1e-3, the default weight decay, betas
    changed = ["optim.lr=0.003", "optim.weight_decay=0.2", "optim.betas=[0.8,0.9]"]
    s = run(tmp_path, "trainer.max_steps=15", *changed)
    assert s["resumed_from_step"] == 10
    lrs = {m["step"]: m["train/lr"] for m in read_metrics(tmp_path) if "train/lr" in m}
    assert lrs[10] == pytest.approx(1e-3) and lrs[11] == pytest.approx(3e-3)  # main: 1e-3
    (group,) = torch.load(tmp_path / "checkpoints" / "step-15" / "optim.pt",
                          weights_only=True)["optimizer"]["param_groups"]
    assert (group["weight_decay"], tuple(group["betas"])) == (0.2, (0.8, 0.9))
    saved = torch.load(tmp_path / "checkpoints" / "step-10" / "optim.pt", weights_only=True)
    assert saved["optimizer"]["state"]  # the moments were carried over, not started afresh
    log = (tmp_path / "train.log").read_text()
    assert "resume: optim.weight_decay=0.2 from the config (the checkpoint had 0.0)" in log
    # Another optimizer cannot take AdamW's state: one line at start (main: KeyError 'momentum'
    # at the first step, after "resumed from").
    with pytest.raises(CheckpointError, match=r"has optim._target_=torch.optim.adamw.AdamW, "
                       r"this run has torch.optim.sgd.SGD .*fix: set optim to the checkpoint's"):
        run(tmp_path, "trainer.max_steps=20", "optim=sgd", *changed[:1])
