"""Your own task keeps every guarantee of the built-in one: for a user's Dataset, model and
loss defined only in tests/user_task.py (plugged in with --config-dir) and for the two
example tasks, a run equals the one-process reference run whatever the world size, the
micro-batch split, the number of loader workers, a SIGKILL and rerun, or a resume on
another world size."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch
from torch.utils.data import default_collate

from dgxtrain.config import compose
from dgxtrain.data.loader import SeededItems, sample_keys
from dgxtrain.loop.train import train
from tests.conftest import ROOT, clean_env, cli_args, kill_tree, read_metrics, run_ok
from tests.user_task import FlatCrossEntropy, NextSum, PairModel, write_config_dir

pytestmark = pytest.mark.multiprocess

SHORT = ["trainer.max_steps=20", "trainer.warmup_steps=2", "trainer.log_every=5",
         "checkpoint.every_steps=10", "logger=none"]
TASKS = {
    "user": ["data=next_sum", "model=next_sum", "loss=next_sum",
             "metrics=[loss,accuracy,{_target_:tests.user_task.ValidTargets}]",
             "trainer.global_batch_size=64", "optim.lr=3e-2"],
    "digits": ["experiment=digits"],
    "charlm": ["experiment=charlm", "data.eval.max_eval_sequences=128"],
}


@pytest.fixture(scope="module")
def user_conf(tmp_path_factory) -> Path:
    return write_config_dir(tmp_path_factory.mktemp("user_conf"))


def _overrides(task: str, user_conf: Path) -> list[str]:
    return ["device=cpu", *SHORT, *TASKS[task]]


def _config_dir(task: str, user_conf: Path) -> Path | None:
    return user_conf if task == "user" else None


def _in_process(run_dir: Path, task: str, user_conf: Path, extra: list[str]) -> dict:
    # A user's --config-dir is a search path Hydra adds (here by the override it becomes).
    search = [f"hydra.searchpath=[file://{user_conf}]"] if task == "user" else []
    return train(compose([*_overrides(task, user_conf), *extra, *search]), run_dir)


def _losses(run_dir: Path) -> dict[int, float]:
    """The train loss of each log step (a resumed run's log keeps its first attempt's)."""
    return {m["step"]: m["train/loss"] for m in read_metrics(run_dir) if "train/loss" in m}


def _params(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "model.pt", weights_only=True)


def assert_same_run(a: Path, b: Path, tol: float = 1e-5) -> None:
    """Train losses of every log step, eval metrics and parameters within `tol`."""
    la, lb = _losses(a), _losses(b)
    assert list(la) == list(lb) == [5, 10, 15, 20]
    assert all(abs(la[s] - lb[s]) <= tol * abs(lb[s]) for s in lb), (la, lb)
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    evals = [k for k in sb if k.startswith("eval_")]
    assert "eval_loss" in evals and len(evals) >= 2
    for k in evals:
        assert abs(sa[k] - sb[k]) <= tol * max(abs(sb[k]), 1e-3), (k, sa[k], sb[k])
    # All parameters as one vector: Adam turns the rounding noise of a gradient that is
    # zero in exact arithmetic (an attention key's bias) into steps of size lr.
    pa, pb = (torch.cat([p.flatten() for p in _params(d).values()]) for d in (a, b))
    assert ((pa - pb).norm() / pb.norm()).item() <= tol
    assert lb[20] < 0.9 * lb[5]  # and it learned: not two untrained models compared
    assert all(m["perf/data_s"] > 0 for m in read_metrics(b) if "train/loss" in m)


@pytest.fixture(scope="module", params=list(TASKS))
def reference(request, tmp_path_factory, user_conf) -> tuple[str, Path]:
    """One process, no loader workers, no micro-batches: what every variant must equal."""
    run_dir = tmp_path_factory.mktemp(f"ref_{request.param}")
    _in_process(run_dir, request.param, user_conf, ["data.num_workers=0"])
    return request.param, run_dir


def test_two_ranks_equal_one_process(reference, user_conf, tmp_path):
    task, ref = reference
    s = run_ok(tmp_path, _overrides(task, user_conf), nproc=2,
               config_dir=_config_dir(task, user_conf))
    assert s["world_size"] == 2
    assert_same_run(tmp_path, ref)


def test_micro_batches_equal_one_batch(reference, user_conf, tmp_path):
    task, ref = reference
    s = _in_process(tmp_path, task, user_conf, ["data.num_workers=0",
                                                "trainer.micro_batch_size=16"])
    assert s["grad_accum_steps"] > 1
    assert_same_run(tmp_path, ref)


def test_loader_workers_give_the_same_bits(reference, user_conf, tmp_path):
    task, ref = reference
    s = _in_process(tmp_path, task, user_conf, ["data.num_workers=2"])
    assert s["param_sha256"] == json.loads((ref / "summary.json").read_text())["param_sha256"]


@pytest.mark.parametrize("reference", ["user", "charlm"], indirect=True)  # digits: as user's
def test_sigkill_then_rerun_is_bitwise_and_resumes_on_another_world_size(reference, user_conf,
                                                                         tmp_path):
    task, ref = reference
    over, config_dir = _overrides(task, user_conf), _config_dir(task, user_conf)
    args = cli_args(tmp_path / "run", over + ["fault.step_delay_s=0.15"], config_dir=config_dir)
    with subprocess.Popen(args, cwd=ROOT, env=clean_env(), stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL) as p:
        manifest = tmp_path / "run" / "checkpoints" / "step-10" / "manifest.json"
        deadline = time.monotonic() + 120
        while not manifest.exists() and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        kill_tree(p.pid)  # mid-run: a node lost after the step-10 checkpoint
    assert p.returncode == -9 and not (tmp_path / "run" / "summary.json").exists()
    shutil.copytree(tmp_path / "run", tmp_path / "wider")
    s = _in_process(tmp_path / "run", task, user_conf, [])  # the same command, rerun
    assert s["resumed_from_step"] == 10
    assert s["param_sha256"] == json.loads((ref / "summary.json").read_text())["param_sha256"]
    if task != "user":
        return  # the seek is the same for every dataset: the hardest one (padding) will do
    # The same checkpoint, resumed by two ranks: the same run to within rounding.
    w = run_ok(tmp_path / "wider", over, nproc=2, config_dir=config_dir)
    assert (w["resumed_from_step"], w["world_size"]) == (10, 2)
    assert_same_run(tmp_path / "wider", ref)


# The examples' own runs without loader workers: the same bits as with them
# (test_loader_workers_give_the_same_bits), without starting 4 more processes.
def test_digits_reach_their_held_out_accuracy(tmp_path):
    s = run_ok(tmp_path, ["experiment=digits", "data.num_workers=0"], nproc=2)
    assert s["steps"] == 300 and s["eval_accuracy"] >= 0.95
    derived = json.loads((tmp_path / "derived.json").read_text())
    assert (derived["train_samples"], derived["eval_samples"]) == (1438, 359)


def test_charlm_beats_the_unigram_entropy_and_writes_a_sample(tmp_path):
    # 120 of the example's 400 steps (~3.1 bits; 2.4 after 400): the test's time is the suite's.
    s = run_ok(tmp_path, ["experiment=charlm", "trainer.max_steps=120", "data.num_workers=0"],
               nproc=2)
    derived = json.loads((tmp_path / "derived.json").read_text())
    corpus = derived["data.train"]  # the Dataset's describe(), under its own key
    assert corpus["corpus_files"] > 50 and len(corpus["corpus_sha256"]) == 64
    assert derived["data.eval"]["corpus_sha256"] == corpus["corpus_sha256"]
    unigram = corpus["unigram_bits_per_char"]
    assert 3.5 < unigram < 6.0 and s["unigram_bits_per_char"] == unigram
    assert s["eval_bits_per_token"] < unigram - 1.0, (s["eval_bits_per_token"], unigram)
    assert s["eval_bits_per_token"] == pytest.approx(s["eval_loss"] / math.log(2))
    assert s["sample"].startswith("def ") and len(s["sample"]) > 100


@pytest.mark.parametrize("reference", ["user"], indirect=True)
def test_eval_counts_every_sample_once(reference):
    """eval_loss and a metric of the user's own, recomputed from the eval set directly (the
    2-rank run's equal them: test_two_ranks_equal_one_process)."""
    _, ref = reference
    model = PairModel(width=32)
    model.load_state_dict(_params(ref))
    items = SeededItems(NextSum(300, offset=1))
    inputs, target = default_collate(items.__getitems__(sample_keys(0, torch.arange(300))))
    with torch.no_grad():
        total = FlatCrossEntropy(reduction="sum")(model(**inputs), target).item()
    valid = (target != -100).sum().item()
    s = json.loads((ref / "summary.json").read_text())
    assert s["eval_valid_targets"] == valid and 300 * 3 < valid < 300 * 11
    assert s["eval_loss"] == pytest.approx(total / valid, rel=1e-6)
