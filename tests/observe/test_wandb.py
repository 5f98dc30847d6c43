"""W&B on CPU, offline, read back from the `.wandb` files W&B itself writes: one run per
job, continued after a crash, never fatal, never holding a secret."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from dgxtrain.observe.trackers import redact
from dgxtrain.observe.wandb_records import items, read_run, records
from dgxtrain.observe.wandb_run import resolve_mode
from tests.conftest import clean_env, free_port, read_metrics, run_cli, run_ok

pytestmark = pytest.mark.multiprocess

BASE = ["data.dim=16", "model.hidden_dim=32", "trainer.global_batch_size=64",
        "trainer.log_every=5", "checkpoint.every_steps=20", "data.eval_samples=256",
        "logger=wandb"]
TRAIN_KEYS = {"train/loss", "train/lr", "train/grad_norm", "train/skipped_steps",
              "perf/samples_per_s", "perf/step_time_s", "perf/data_s", "perf/fwd_bwd_s",
              "perf/optim_s", "perf/comm_wait_s", "perf/tflops", "perf/mfu",
              "perf/rank_busy_min_s", "perf/rank_busy_median_s", "perf/rank_busy_max_s",
              "perf/slowest_rank", "perf/slowest_host", "mem/max_rss_gb", "checkpoint/save_s"}


def wandb_files(run_dir: Path) -> list[Path]:
    """The .wandb file of each start of the run, oldest first."""
    return sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"))


def history(run_dir: Path) -> list[dict]:
    """Every start's history rows, in order; a crashed start's file may end early."""
    return [items(rec.history.item) for f in wandb_files(run_dir)
            for rec in records(f, strict=False) if rec.WhichOneof("record_type") == "history"]


def test_two_ranks_make_one_wandb_run_with_config_history_and_summary(tmp_path):
    summary = run_ok(tmp_path, [*BASE, "logger.mode=offline", "trainer.max_steps=30",
                                "logger.tags=[mine]"], nproc=2)
    files = wandb_files(tmp_path)
    assert len(files) == 1  # rank 1 opened none
    run = read_run(files[0])
    assert run["id"] == (tmp_path / "wandb" / "dgxtrain-run-id").read_text().strip()
    assert {"mine", "nodes:1", "world:2"} <= set(run["tags"]) and run["project"] == "dgxtrain"
    config = run["config"]
    assert config["trainer"]["max_steps"] == 30 and config["optim"]["lr"] == 1e-3
    derived = config["derived"]
    assert (derived["world_size"], derived["devices"], derived["grad_accum_steps"]) == (2, 2, 1)
    assert derived["parameters"] > 0 and derived["torch"] and derived["git_commit"]
    rows = {r["_step"]: r for r in history(tmp_path)}
    assert sorted(rows) == [5, 10, 15, 20, 25, 30]
    local = {m["step"]: m for m in read_metrics(tmp_path) if "train/loss" in m}
    for step, row in rows.items():
        assert TRAIN_KEYS <= row.keys(), TRAIN_KEYS - row.keys()
        assert row["train/loss"] == local[step]["train/loss"]  # the same numbers as the file
        assert row["perf/slowest_rank"] in (0, 1) and 0 < row["perf/mfu"] < 1
    assert {"eval/loss", "eval/r2"} <= rows[30].keys()
    assert rows[30]["eval/loss"] == summary["eval_loss"]
    assert run["summary"]["param_sha256"] == summary["param_sha256"]


def test_a_straggler_rank_is_named(tmp_path):
    # Rank 1 sleeps 30 ms in every step: the others wait for it in the gradient all-reduce.
    run_ok(tmp_path, [*BASE, "logger=none", "trainer.max_steps=20", "fault.step_delay_s=0.03",
                      "fault.rank=1"], nproc=2)
    rows = [m for m in read_metrics(tmp_path) if "train/loss" in m]
    assert [r["perf/slowest_rank"] for r in rows[1:]] == [1] * (len(rows) - 1), rows
    # The spread shows the 30 ms, in the median log step: on CPU a step's busy time mixes in
    # DDP's wait sampled at an earlier step, so one row of a loaded machine may read less.
    spreads = [r["perf/rank_busy_max_s"] - r["perf/rank_busy_min_s"] for r in rows[1:]]
    assert statistics.median(spreads) > 0.02, spreads
    assert all(r["perf/comm_wait_s"] > 0.01 for r in rows[1:])  # rank 0's wait, averaged


def test_a_crash_and_resume_continue_one_wandb_run_without_repeating_steps(tmp_path):
    args = [*BASE, "logger.mode=offline", "trainer.max_steps=40"]
    p = run_cli(tmp_path, [*args, "fault.crash_at_step=28"])
    assert p.returncode == 17, p.stderr[-2000:]
    p = run_cli(tmp_path, args)  # resumes from step 20; steps 21..27 ran before
    assert p.returncode == 0, p.stderr[-2000:]
    files = wandb_files(tmp_path)
    run_id = (tmp_path / "wandb" / "dgxtrain-run-id").read_text().strip()
    assert len(files) == 2 and all(f.name == f"run-{run_id}.wandb" for f in files)
    assert read_run(files[1])["id"] == run_id
    # The crash may cut the first file short of what W&B had not flushed; the restart sends
    # what is missing from metrics.jsonl, and skips what the run has.
    steps = [r["_step"] for r in history(tmp_path) if "train/loss" in r]
    assert steps == list(range(5, 41, 5))  # strictly increasing, no gap, no duplicate
    assert "steps 25..25 were logged before this restart; not sent again" in p.stderr


def test_an_unreachable_wandb_server_does_not_stop_training(tmp_path):
    env = clean_env(WANDB_API_KEY="0" * 40, WANDB_BASE_URL=f"http://127.0.0.1:{free_port()}")
    p = run_cli(tmp_path, [*BASE, "logger.mode=online", "logger.init_timeout_s=3",
                           "trainer.max_steps=20"], env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    warnings = [ln for ln in p.stderr.splitlines() if "WARNING" in ln and "W&B" in ln]
    assert len(warnings) == 1 and "logging offline instead; training goes on" in warnings[0]
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["steps"] == 20 and [m["step"] for m in read_metrics(tmp_path)
                                 if "train/loss" in m] == [5, 10, 15, 20]
    assert len(wandb_files(tmp_path)) == 1  # the offline run holds it all


def test_an_unwritable_wandb_dir_does_not_stop_training(tmp_path):
    # <run dir>/wandb cannot be made (here a file stands there; root ignores permissions).
    (tmp_path / "wandb").write_text("not a directory\n")
    p = run_cli(tmp_path, [*BASE, "trainer.max_steps=20"])
    assert p.returncode == 0, p.stderr[-3000:]
    warnings = [ln for ln in p.stderr.splitlines() if "WARNING" in ln and "W&B" in ln]
    assert len(warnings) == 1, warnings
    assert f"cannot write {tmp_path / 'wandb'}" in warnings[0]
    assert "metrics.jsonl" in warnings[0]  # where the run's numbers are instead
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["steps"] == 20 and [m["step"] for m in read_metrics(tmp_path)
                                 if "train/loss" in m] == [5, 10, 15, 20]


def test_an_api_key_is_logged_nowhere(tmp_path):
    key = "dgxtrainfakekey" + "7" * 25
    env = clean_env(WANDB_API_KEY=key)
    # Even interpolated into the config on purpose, it is redacted.
    p = run_cli(tmp_path, [*BASE, "logger.mode=offline", "trainer.max_steps=10",
                           "logger.tags=[${oc.env:WANDB_API_KEY}]"], env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    assert key not in p.stdout + p.stderr
    files = [f for f in tmp_path.rglob("*") if f.is_file()]
    assert len(files) > 10 and wandb_files(tmp_path)
    assert not [f for f in files if key.encode() in f.read_bytes()]
    run = read_run(wandb_files(tmp_path)[0])
    assert "<redacted>" in run["tags"] and run["config"]["logger"]["tags"] == ["<redacted>"]


def test_mode_auto_is_online_only_with_credentials(tmp_path):
    empty, login = tmp_path / "empty", tmp_path / "netrc"
    empty.write_text("")
    login.write_text("machine api.wandb.ai\n  login user\n  password " + "1" * 40 + "\n")
    assert resolve_mode("auto", {"NETRC": str(empty)}) == "offline"
    assert resolve_mode("auto", {"NETRC": str(empty), "WANDB_API_KEY": "k" * 40}) == "online"
    assert resolve_mode("auto", {"NETRC": str(login)}) == "online"  # `wandb login`
    assert resolve_mode("auto", {"NETRC": str(login),
                                 "WANDB_BASE_URL": "https://wandb.example.com"}) == "offline"
    assert resolve_mode("auto", {"WANDB_API_KEY": "k" * 40, "WANDB_MODE": "offline"}) == "offline"
    assert resolve_mode("online", {}) == "online" and resolve_mode("disabled", {}) == "disabled"


def test_redact_names_and_values(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_abcdefghijklmnop")
    cfg = {"model": {"api_key": "x", "note": "uses hf_abcdefghijklmnop here", "dim": 4},
           "tags": ["a", "hf_abcdefghijklmnop"], "password": None}
    assert redact(cfg) == {"model": {"api_key": "<redacted>", "note": "<redacted>", "dim": 4},
                           "tags": ["a", "<redacted>"], "password": "<redacted>"}
