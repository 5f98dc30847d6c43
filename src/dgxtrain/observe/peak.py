"""The peak FLOP rate of one device, against which MFU is reported: NVIDIA's data sheet for
the GPUs of DGX systems, a measured matmul elsewhere (a CPU has no data sheet)."""

from __future__ import annotations

import time

import torch

# Dense TFLOP/s per GPU from NVIDIA's data sheets, SXM parts as in DGX systems. The B200's
# are the HGX B200 data sheet's per-GPU figures (BF16 4.5 and TF32 2.2 PFLOP/s with 2:4
# sparsity, so half that dense; FP32 75 TFLOP/s).
PEAK_TFLOPS = {
    "A100": {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5},
    "H100": {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "H200": {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "B200": {"bf16": 2250.0, "tf32": 1100.0, "fp32": 75.0},
}


def _matmul_kind(device: torch.device, precision: str) -> str:
    if precision == "bf16":
        return "bf16"
    tf32 = device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32
    return "tf32" if tf32 else "fp32"


def peak_tflops(device: torch.device, precision: str) -> tuple[float, str]:
    """(peak TFLOP/s of one device, where the number comes from)."""
    kind = _matmul_kind(device, precision)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for gpu, peaks in PEAK_TFLOPS.items():
            if gpu in name:
                return peaks[kind], f"{gpu} {kind} data sheet"
    return measured_matmul_tflops(device, precision), f"{kind} matmul measured here"


def measured_matmul_tflops(device: torch.device, precision: str, seconds: float = 0.2,
                           n: int | None = None) -> float:
    """A square matmul's rate on this device and its threads: the CPU has no data sheet."""
    n = n or (4096 if device.type == "cuda" else 384)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    a @ b  # warm-up: allocation, kernel selection
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or count < 3:
        a @ b
        count += 1
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return 2 * n**3 * count / (time.perf_counter() - start) / 1e12


