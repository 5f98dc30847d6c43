"""The loss as the step and the evaluation need it: the user's criterion (`loss._target_`),
and the count of targets its mean is over.

A criterion with ignore_index (a token loss with padding) averages over a number of
valid targets that differs between batches. The mean of per-micro-batch means is then
not the global batch's mean, so N ranks or another micro-batch split would train on a
different loss. The step normalises such a loss by the global count of valid targets
instead (torchtitan's `global_valid_tokens`): every split gives the same update.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch

from dgxtrain.errors import ConfigError, first_line


def shape_of(x: Any) -> str:
    """`[8, 64] float32`, or `{tokens: ...}` for a dict, for one-line errors."""
    if isinstance(x, dict):
        return "{" + ", ".join(f"{k}: {shape_of(v)}" for k, v in x.items()) + "}"
    return f"{list(x.shape)} {str(x.dtype).removeprefix('torch.')}" if torch.is_tensor(x) \
        else type(x).__name__


class TaskLoss:
    """`criterion(output, target) -> mean` plus the sum and the count behind that mean."""

    def __init__(self, criterion: Callable, name: str):
        self.criterion, self.name = criterion, name
        # torch.nn losses say how they reduce (`reduction`): a copy that sums gives totals.
        self._summed = None
        if isinstance(getattr(criterion, "reduction", None), str):
            self._summed = copy.copy(criterion)
            self._summed.reduction = "sum"
        self.ignore_index = getattr(criterion, "ignore_index", None)
        self.per_target = self._summed is not None  # settled by check()

    @property
    def counts_vary(self) -> bool:
        """Batches may hold different numbers of valid targets (an ignore_index)."""
        return self.per_target and self.ignore_index is not None

    def mean(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.criterion(output.float(), target)

    def total(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The sum of the loss over the batch's counted targets (or samples)."""
        if self.per_target:
            return self._summed(output.float(), target)
        return self.mean(output, target) * len(target)

    def count(self, target: torch.Tensor) -> torch.Tensor:
        """How many targets (or samples) this batch's mean is over, as an int64 tensor."""
        if not self.per_target:
            return torch.tensor(len(target), device=target.device)
        if self.ignore_index is not None and not target.is_floating_point():
            return (target != self.ignore_index).sum()
        return torch.tensor(target.numel(), device=target.device)

    def check(self, output: Any, target: torch.Tensor) -> None:
        """At start, on one batch: the criterion takes this output and target, returns a
        scalar, and its sum / count is its mean (else it counts per sample)."""
        fix = ("choose a loss that fits the model's output (e.g. CrossEntropyLoss for "
               "logits [B, C] and class targets [B]), or change the model's output")
        if not torch.is_tensor(output):
            raise ConfigError("model._target_", "", f"returned {shape_of(output)}, not a tensor",
                              "return the output tensor the loss takes from forward()")
        what = f"the model's output {shape_of(output)} and the target {shape_of(target)}"
        if target.is_floating_point() and output.shape != target.shape:
            raise ConfigError("loss._target_", self.name, f"{what} differ in shape, which an "
                              "elementwise loss would broadcast", fix + " (e.g. return [B] "
                              "with .squeeze(-1) for targets [B])")
        try:
            mean = self.mean(output, target)
        except Exception as e:
            raise ConfigError("loss._target_", self.name, f"cannot take {what} "
                              f"({first_line(e)})", fix) from e
        if not torch.is_tensor(mean) or mean.ndim != 0:
            raise ConfigError("loss._target_", self.name, f"returned {shape_of(mean)} for "
                              f"{what}, not a scalar", "use a loss with reduction='mean'")
        n = self.count(target).item()
        if self.per_target and n > 0:
            per = self.total(output, target).item() / n
            self.per_target = abs(per - mean.item()) <= 1e-4 * (1 + abs(per))
        if self.ignore_index is not None and not self.per_target:
            raise ConfigError("loss._target_", self.name, "has an ignore_index but its mean "
                              "is not over the valid targets (class weights?)", "drop the "
                              "weights, or use a loss whose mean is sum / valid targets")
