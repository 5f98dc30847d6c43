"""The schemas of the `_target_` groups (model, data, optim) that conf/ extends. A node of
one is instantiated as it is; its fields check their ranges on the way (config.load)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from omegaconf import MISSING

from dgxtrain.config.checks import Checked


@dataclass
class LinearModelConfig(Checked):
    section: ClassVar[str] = "model"
    _target_: str = "dgxtrain.tasks.regression.LinearRegressor"
    in_dim: int = MISSING
    """Input features: `${data.dim}` in conf/model/linear.yaml."""

    def __post_init__(self) -> None:
        self.positive("in_dim")


@dataclass
class MLPModelConfig(Checked):
    section: ClassVar[str] = "model"
    _target_: str = "dgxtrain.tasks.regression.MLPRegressor"
    in_dim: int = MISSING
    """Input features: `${data.dim}` in conf/model/mlp.yaml."""
    hidden_dim: int = 256
    """Width of every hidden layer."""
    num_layers: int = 2
    """Number of hidden layers (each Linear + GELU)."""

    def __post_init__(self) -> None:
        self.positive("in_dim", "hidden_dim", "num_layers")


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
class DatasetDataConfig(Checked):
    section: ClassVar[str] = "data"
    train: Any = MISSING
    """The training set: `_target_` names any map-style torch Dataset whose items are
    (input, target) pairs (input a tensor or a dict of tensors); the other keys are its
    arguments. Its randomness (augmentation) must come from the global torch, numpy or
    random RNGs, which are seeded per sample from (seed, index, pass)."""
    eval: Any = MISSING
    """The held-out set, a Dataset like data.train; each item is evaluated once."""
    num_workers: int | None = None
    """Loader worker processes per rank; 0 = load in the training process; null = 0 on CPU
    ranks (workers would take cores from the model's own threads) and one per core the
    rank owns beyond one, up to 8, on GPU ranks. More than the rank's cores is warned of."""
    prefetch_factor: int = 2
    """Batches each worker reads ahead."""
    pin_memory: bool = True
    """Page-locked batches on GPUs, so the copy to the device is asynchronous."""
    persistent_workers: bool = True
    """Keep the eval loader's workers between evaluations."""
    start_method: str = "forkserver"
    """How workers start: forkserver or spawn (safe with CUDA; the dataset is pickled to
    them), or fork (CPU runs only)."""
    seed_rngs: list[str] = field(default_factory=lambda: ["torch", "numpy", "random"])
    """The global RNGs seeded from (seed, index, pass) before each item: those the
    dataset's randomness draws from. Each costs ~1-5 us per item; [] if it draws none."""

    def __post_init__(self) -> None:
        self.require("num_workers", self.num_workers is None or self.num_workers >= 0,
                     "must not be negative", "set data.num_workers >= 0, or null")
        self.positive("prefetch_factor")
        self.one_of("start_method", "forkserver", "spawn", "fork")
        for name in self.seed_rngs:
            self.require("seed_rngs", name in ("torch", "numpy", "random"), f"unknown RNG "
                         f"{name}", "list some of torch, numpy, random (or [] for none)")


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
