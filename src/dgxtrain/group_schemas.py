"""The schemas of the `_target_` groups (model, data, optim) that conf/ extends. A node of
one is instantiated as it is; its fields check their ranges on the way (config.load)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from dgxtrain.checks import Checked


@dataclass
class LinearModelConfig(Checked):
    section: ClassVar[str] = "model"
    _target_: str = "dgxtrain.tasks.regression.LinearRegressor"


@dataclass
class MLPModelConfig(Checked):
    section: ClassVar[str] = "model"
    _target_: str = "dgxtrain.tasks.regression.MLPRegressor"
    hidden_dim: int = 256
    """Width of every hidden layer."""
    num_layers: int = 2
    """Number of hidden layers (each Linear + GELU)."""

    def __post_init__(self) -> None:
        self.positive("hidden_dim", "num_layers")


@dataclass
class SyntheticDataConfig(Checked):
    section: ClassVar[str] = "data"
    _target_: str = "dgxtrain.data.synthetic.SyntheticRegression"
    dim: int = 32
    """Input features per sample."""
    noise_std: float = 0.1
    """Standard deviation of the Gaussian label noise."""
    num_samples: int = 1_000_000
    """Training indices [0, num_samples); costs no memory, 1e9 is fine."""
    eval_samples: int = 4096
    """Held-out indices [num_samples, num_samples + eval_samples)."""
    target: str = "nonlinear"
    """Ground truth: linear (w.x + b) or nonlinear (linear + sum of sines)."""

    def __post_init__(self) -> None:
        self.positive("dim", "num_samples", "eval_samples")
        self.require("num_samples", self.num_samples <= 2**62,
                     "too large for the sample index space", "use data.num_samples <= 2**62")
        self.not_negative("noise_std")
        self.one_of("target", "linear", "nonlinear")


@dataclass
class OptimConfig(Checked):
    section: ClassVar[str] = "optim"
    _target_: str = "torch.optim.AdamW"
    lr: float = 1e-3
    """Peak learning rate (after warm-up)."""
    weight_decay: float = 0.0
    """Decoupled weight decay (AdamW) or L2 penalty (SGD)."""
    fused: bool = True
    """One kernel for the whole update instead of a dozen passes per tensor (CPU and
    CUDA); the same maths up to rounding. It also skips a non-finite step on the device."""

    def __post_init__(self) -> None:
        self.require("lr", self.lr > 0, "must be positive",
                     "set optim.lr to a positive number, e.g. optim.lr=1e-3")
        self.not_negative("weight_decay")


@dataclass
class AdamWConfig(OptimConfig):
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """Decay rates of the gradient's running mean and of its square's."""
    eps: float = 1e-8
    """Added to the denominator, for numerical stability."""


@dataclass
class SGDConfig(OptimConfig):
    _target_: str = "torch.optim.SGD"
    lr: float = 0.05
    momentum: float = 0.9
    """Momentum factor."""
