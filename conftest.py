"""What every test folder (tests/, bench/tests/) shares: the gpu marker's policy."""

import os

import pytest
import torch


def pytest_runtest_setup(item: pytest.Item) -> None:
    # A GPU test skips on a CPU-only machine, unless it must run (scripts/gpu_check.sh):
    # there a skip would let a GPU check pass without running.
    if item.get_closest_marker("gpu") is None or torch.cuda.is_available():
        return
    if os.environ.get("DGXTRAIN_REQUIRE_GPU") == "1":
        pytest.fail("GPU tests must run here (DGXTRAIN_REQUIRE_GPU=1), but torch sees no "
                    "CUDA GPU", pytrace=False)
    pytest.skip("needs a CUDA GPU")
