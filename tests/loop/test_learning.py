"""The trainer learns: it recovers a known linear truth and fits a nonlinear one."""

import json

import pytest
import torch

from dgxtrain.loop.train import train
from tests.conftest import compose_cfg, read_metrics


def test_linear_model_recovers_the_true_weights(tmp_path):
    cfg = compose_cfg(["experiment=linear_recovery", "device=cpu"])
    s = train(cfg, tmp_path)
    assert s["weight_rel_err"] < 1e-2 and s["bias_err"] < 1e-2
    # Eval MSE reaches the noise floor (noise_std=0.01 -> 1e-4) and R² is ~1.
    assert s["eval_loss"] < 2e-4 and s["eval_r2"] > 0.999


def test_mlp_fits_a_smooth_nonlinear_target(tmp_path):
    cfg = compose_cfg(["device=cpu", "data.target=nonlinear", "model=mlp",
                       "trainer.max_steps=600"])
    s = train(cfg, tmp_path)
    assert s["eval_r2"] > 0.95
    # The nonlinear part is real: the best linear fit explains clearly less.
    lin = train(compose_cfg(["device=cpu", "model=linear", "trainer.max_steps=600"]),
                tmp_path / "linear")
    assert lin["eval_r2"] < s["eval_r2"] - 0.1


def test_outputs_have_the_documented_fields(tmp_path):
    cfg = compose_cfg(["device=cpu", "experiment=smoke", "trainer.eval_every=10"])
    s = train(cfg, tmp_path)
    for key in ("world_size", "global_batch_size", "grad_accum_steps", "steps", "final_loss",
                "eval_loss", "eval_r2", "samples_per_s", "param_sha256", "wall_time_s"):
        assert key in s, key
    assert s == json.loads((tmp_path / "summary.json").read_text())
    rows = read_metrics(tmp_path)
    train_rows = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in train_rows] == [5, 10, 15, 20]
    for r in train_rows:
        assert {"train/loss", "train/lr", "train/grad_norm", "perf/samples_per_s",
                "perf/step_time_s"} <= r.keys()
    assert [r["step"] for r in rows if "eval/r2" in r] == [10, 20]  # periodic + final eval
    assert s["final_loss"] == train_rows[-1]["train/loss"]
    model = torch.load(tmp_path / "model.pt", weights_only=True)
    assert s["param_sha256"] == _sha(model)
    assert (tmp_path / "config.yaml").read_text().count("max_steps: 20") == 1


def _sha(state: dict) -> str:
    import hashlib

    h = hashlib.sha256()
    for t in state.values():
        h.update(t.float().contiguous().numpy().tobytes())
    return h.hexdigest()


def test_warmup_then_cosine_schedule_is_logged(tmp_path):
    cfg = compose_cfg(["device=cpu", "trainer.max_steps=40", "trainer.warmup_steps=10",
                       "trainer.log_every=1", "optim.lr=0.01", "trainer.min_lr_ratio=0.1"])
    train(cfg, tmp_path)
    lrs = [r["train/lr"] for r in read_metrics(tmp_path) if "train/lr" in r]
    assert lrs[0] == pytest.approx(0.001) and lrs[9] == pytest.approx(0.01)
    assert all(a > b for a, b in zip(lrs[10:], lrs[11:]))  # decays after warm-up
    assert lrs[-1] == pytest.approx(0.001, rel=0.05)


def test_bf16_autocast_trains(tmp_path):
    cfg = compose_cfg(["device=cpu", "trainer.precision=bf16", "trainer.max_steps=300"])
    assert train(cfg, tmp_path)["eval_r2"] > 0.9


def test_compile_failure_falls_back_to_eager(tmp_path, monkeypatch, caplog):
    def broken_compile(model, **kw):
        def fail(*a, **k):
            raise RuntimeError("no backend here")
        return fail

    monkeypatch.setattr(torch, "compile", broken_compile)
    cfg = compose_cfg(["device=cpu", "experiment=smoke", "trainer.compile=true"])
    eager = train(compose_cfg(["device=cpu", "experiment=smoke"]), tmp_path / "eager")
    s = train(cfg, tmp_path / "compiled")
    assert s["param_sha256"] == eager["param_sha256"]
    assert "torch.compile failed (RuntimeError: no backend here); training eagerly" in \
        (tmp_path / "compiled" / "train.log").read_text()
