"""N gloo ranks under torchrun follow the trajectory of one process with the same global
batch: per-step losses and final parameters agree."""

from pathlib import Path

import pytest
import torch

from tests.conftest import losses, run_ok

pytestmark = pytest.mark.multiprocess

SMALL = ["data.dim=16", "model.hidden_dim=64", "data.num_samples=1000", "data.eval_samples=256",
         "trainer.max_steps=25", "trainer.warmup_steps=3", "trainer.log_every=1",
         "trainer.global_batch_size=64", "seed=7"]


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


@pytest.mark.parametrize("optim", ["sgd", "adamw"])
def test_two_ranks_equal_one_process(tmp_path, optim):
    over = SMALL + [f"optim={optim}"] + (["optim.lr=3e-3"] if optim == "adamw" else [])
    one = run_ok(tmp_path / "one", over)
    two = run_ok(tmp_path / "two", over, nproc=2)
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert (one["grad_accum_steps"], two["grad_accum_steps"]) == (1, 1)
    assert_same_trajectory(tmp_path / "two", tmp_path / "one")


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    over = SMALL + ["optim=adamw", "optim.lr=3e-3"]
    run_ok(tmp_path / "one", over)
    two = run_ok(tmp_path / "accum", over + ["trainer.micro_batch_size=16"], nproc=2)
    assert (two["world_size"], two["micro_batch_size"], two["grad_accum_steps"]) == (2, 16, 2)
    assert_same_trajectory(tmp_path / "accum", tmp_path / "one")
