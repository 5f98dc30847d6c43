"""The task boundary: what is trained, as the loop sees it.

The loop, the step, the evaluation and the trackers know a task through this interface
only. A task answers:

  build_model()          the nn.Module, built once (the same initial weights on every rank)
  num_samples            training samples are the indices [0, num_samples)
  batch(indices)         (input, target) of those sample indices, on the training device:
                         a pure function of the indices, whoever asks and whenever
  forward(model, input)  the model's output (input is a tensor, or a dict of keyword tensors)
  loss(output, target)   the batch's mean loss, a scalar in fp32
  eval_indices()         the held-out samples, each evaluated once
  metrics()              eval metrics: each adds up per-batch statistics, reduced over ranks
  summary(model)         values of the trained model itself (default: none)

As in Composer (`ComposerModel.loss`, `eval_forward`) the loss belongs to the task, not to
the loop; as in torchtitan's train spec a task is one object the loop is handed. Which
sample indices a rank asks for, and when, is the loop's business (data/order.py): that is
what keeps the sample order independent of the world size.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch


class Metric(ABC):
    """An eval metric as sums of per-batch statistics: the sums of every rank's batches are
    added in one all-reduce (float64), then turned into values."""

    @abstractmethod
    def statistics(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """A float64 vector of sums over this batch (the same length every call)."""

    @abstractmethod
    def values(self, totals: list[float]) -> dict[str, float]:
        """Named values from the statistics summed over every batch of every rank."""


class Task(ABC):
    """A model, the samples it learns from, its loss and its eval metrics."""

    num_samples: int

    @abstractmethod
    def build_model(self) -> torch.nn.Module: ...

    @abstractmethod
    def batch(self, indices: torch.Tensor) -> tuple[Any, torch.Tensor]: ...

    @abstractmethod
    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def eval_indices(self) -> torch.Tensor: ...

    @abstractmethod
    def metrics(self) -> list[Metric]: ...

    def forward(self, model: torch.nn.Module, inputs: Any) -> torch.Tensor:
        return model(**inputs) if isinstance(inputs, dict) else model(inputs)

    def summary(self, model: torch.nn.Module) -> dict[str, float]:
        return {}
