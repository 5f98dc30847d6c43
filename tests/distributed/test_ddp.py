"""N gloo ranks under torchrun follow the trajectory of one process with the same global
batch: per-step losses and final parameters agree."""

import json
from pathlib import Path

import pytest
import torch

from dgxtrain.loop.train import train
from tests.conftest import ADAMW, SMALL, compose_cfg, losses, run_ok

pytestmark = pytest.mark.multiprocess


def _params(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "model.pt", weights_only=True)


def assert_same_trajectory(a: Path, b: Path, rtol: float = 1e-5) -> None:
    la, lb = losses(a), losses(b)
    assert len(la) == len(lb) == 25
    for step, (x, y) in enumerate(zip(la, lb), 1):
        assert abs(x - y) <= rtol * abs(y), f"step {step}: loss {x} vs {y}"
    pa, pb = _params(a), _params(b)
    assert pa.keys() == pb.keys()
    for k in pa:
        rel = ((pa[k] - pb[k]).norm() / pb[k].norm()).item()
        assert rel <= rtol, f"{k}: relative difference {rel:.2e}"
    # And the run moved: the comparison is not between two untrained models.
    assert sum(la[-5:]) < 0.7 * sum(la[:5])


def one_process(run_dir: Path, overrides: list[str]) -> dict:
    """The reference, in this process: the same train() as under torchrun."""
    return train(compose_cfg(["device=cpu", "logger=none", *overrides]), run_dir)


@pytest.fixture(scope="module")
def adamw_one_process(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("adamw_one")
    one_process(d, SMALL + ADAMW)
    return d


def test_two_ranks_equal_one_process_with_sgd(tmp_path):
    over = SMALL + ["optim=sgd"]
    one = one_process(tmp_path / "one", over)
    two = run_ok(tmp_path / "two", over, nproc=2)
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert (one["grad_accum_steps"], two["grad_accum_steps"]) == (1, 1)
    assert_same_trajectory(tmp_path / "two", tmp_path / "one")


def test_two_ranks_equal_one_process_with_adamw(adamw_two_ranks, adamw_one_process):
    two = json.loads((adamw_two_ranks[0] / "summary.json").read_text())
    assert (two["world_size"], two["grad_accum_steps"]) == (2, 1)
    assert_same_trajectory(adamw_two_ranks[0], adamw_one_process)


def test_gradient_accumulation_matches_one_big_batch(tmp_path, adamw_one_process):
    two = run_ok(tmp_path / "accum", SMALL + ADAMW + ["trainer.micro_batch_size=16"], nproc=2)
    assert (two["world_size"], two["micro_batch_size"], two["grad_accum_steps"]) == (2, 16, 2)
    assert_same_trajectory(tmp_path / "accum", adamw_one_process)
