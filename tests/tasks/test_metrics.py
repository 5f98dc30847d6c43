"""FLOP counts agree with the arithmetic; the parameter hash is the documented one; the
time since launch."""

import hashlib
import time
from pathlib import Path

import pytest
import torch

from dgxtrain.observe.model_stats import flops_per_sample, param_sha256
from dgxtrain.observe.peak import peak_tflops
from dgxtrain.observe.perf import StepMeter, seconds_since_launch
from dgxtrain.tasks.regression import LinearRegressor, MLPRegressor


def test_flops_per_sample_match_the_matmul_count():
    x = torch.randn(8, 32)
    # Linear: forward 2*32, weight gradient 2*32; the input needs no gradient.
    assert flops_per_sample(LinearRegressor(32), x) == 128
    mlp = MLPRegressor(32, hidden_dim=256, num_layers=2)
    weights = 32 * 256 + 256 * 256 + 256
    input_grads = 256 * 256 + 256  # every layer but the first
    assert flops_per_sample(mlp, x) == 2 * weights * 2 + 2 * input_grads
    assert all(p.grad is None for p in mlp.parameters()) and mlp.training


def test_param_sha256_is_fp32_bytes_in_state_dict_order():
    model = MLPRegressor(4, hidden_dim=3, num_layers=1).to(torch.float64)
    h = hashlib.sha256()
    for t in model.state_dict().values():
        h.update(t.float().numpy().tobytes())
    assert param_sha256(model) == h.hexdigest()
    with torch.no_grad():
        model.net[0].weight[0, 0] += 1e-6
    assert param_sha256(model) != h.hexdigest()


def test_step_meter_rates():
    meter = StepMeter(samples_per_step=100)
    meter._t -= 2.0  # as if 2 s had passed
    m = meter.tick(10)
    assert abs(m["step_time_s"] - 0.2) < 0.01 and abs(m["samples_per_s"] - 500) < 25


def test_seconds_since_launch(monkeypatch):
    # This process's own start: after the machine booted, before now.
    uptime = float(Path("/proc/uptime").read_text().split()[0])
    assert 0 < seconds_since_launch() < uptime
    # scripts/launch.sh's stamp wins: set-up before it is not start-up.
    monkeypatch.setenv("DGXTRAIN_LAUNCH_TIME", f"{time.time() - 5:.6f}")
    assert 5 <= seconds_since_launch() < 6


@pytest.mark.parametrize("name, precision, peak", [("NVIDIA B200", "bf16", 2250.0),
                                                    ("NVIDIA H200", "bf16", 989.4),
                                                    ("NVIDIA B200", "fp32", 75.0)])
def test_dgx_gpus_have_their_data_sheet_peak(monkeypatch, name, precision, peak):
    # The sbatch header names DGX A100/H100/H200/B200: each has a data-sheet MFU baseline.
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    value, source = peak_tflops(torch.device("cuda", 0), precision)
    assert (value, source) == (peak, f"{name.split()[1]} {precision} data sheet")
