"""The task boundary: what is trained, as the loop sees it.

The loop, the step, the evaluation and the trackers know a task through this interface
only. A task answers:

  build_model()          the nn.Module: model._target_ with exactly its own config keys
  num_samples            training samples are the indices [0, num_samples)
  example(n)             n training samples (input, target) on the CPU, for checks
  train_feed(...)        this rank's micro-batches of global batch s, on the device
  eval_batches(...)      this rank's share of the held-out samples, each one once
  forward(model, input, target)  the model's output (input is a tensor, or a dict of
                         keyword tensors; the target goes in too under loss=model)
  loss                   the criterion (loss._target_) with the count its mean is over
  metrics()              eval metrics: each adds up per-batch statistics of the logits
                         (losses.logits), reduced over ranks
  check(model)           at start, on the CPU: the model takes the data, the loss and the
                         metrics its output; else one line naming the setting
  describe()             values about the data, logged at start (sizes, hashes)
  summary(model)         values of the trained model itself (default: none)

As in Composer (`ComposerModel.loss`, `eval_forward`) the loss belongs to the task, not to
the loop; as in torchtitan's train spec a task is one object the loop is handed. Which
sample indices a rank trains on at step s is fixed by data/order.py: that is what keeps
the sample order independent of the world size.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from typing import Any, Protocol

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from dgxtrain.errors import ConfigError, first_line
from dgxtrain.tasks.losses import TaskLoss, logits, shape_of
from dgxtrain.tasks.metrics import Metric, build_metrics

Batch = tuple[Any, torch.Tensor]  # (input: a tensor or a dict of tensors, target)


class Feed(Protocol):
    """Steps' batches in order: feed(s) is this rank's micro-batches of global batch s."""

    def __call__(self, step: int) -> list[Batch]: ...

    def __enter__(self) -> Feed: ...

    def __exit__(self, *exc: object) -> None: ...


class Task(ABC):
    """A model, the samples it learns from, its loss and its eval metrics."""

    num_samples: int

    def __init__(self, model_cfg: DictConfig, loss: TaskLoss, metric_specs: Any):
        self.model_cfg, self.loss = model_cfg, loss
        self._metrics = build_metrics(metric_specs, loss)  # a bad name fails at start

    def build_model(self) -> torch.nn.Module:
        return instantiate(self.model_cfg)

    @abstractmethod
    def example(self, n: int = 8) -> Batch: ...

    @abstractmethod
    def train_feed(self, seed: int, global_batch: int, rank: int, world_size: int,
                   micro_batch: int, start: int, end: int, device: torch.device) -> Feed: ...

    @abstractmethod
    def eval_batches(self, rank: int, world_size: int, batch_size: int,
                     device: torch.device) -> Iterable[Batch]: ...

    def metrics(self) -> list[Metric]:
        return self._metrics

    def forward(self, model: torch.nn.Module, inputs: Any, target: torch.Tensor) -> Any:
        """The model's output as it returns it: a tensor, a tuple, a dict, a ModelOutput."""
        extra = self.loss.model_kwargs(target)  # loss=model: the target, by its name
        return model(**inputs, **extra) if isinstance(inputs, dict) else model(inputs, **extra)

    def check(self, model: torch.nn.Module) -> None:
        """Before any GPU work: the model takes the data's input, the loss its output."""
        inputs, target = self.example()
        name = self.model_cfg.get("_target_")
        try:
            with torch.no_grad():
                output = self.forward(model, inputs, target)
        except Exception as e:
            if self.loss.from_model and isinstance(e, TypeError) and \
                    self.loss.criterion.target_arg in str(e):
                raise ConfigError("loss.target_arg", self.loss.criterion.target_arg,
                                  f"is not an argument of {name}'s forward() "
                                  f"({first_line(e)})", "set loss.target_arg to the name its "
                                  "forward() gives the target (e.g. targets)") from e
            raise ConfigError("model._target_", name,
                              f"cannot take the data's input {shape_of(inputs)} "
                              f"({first_line(e)})", "make the model's input size match the "
                              "data's (its in_dim, say), or the data's items the model") from e
        self.loss.check(output, target, name)
        for metric in self._metrics:
            try:
                stats = metric.statistics(output if metric.whole_output else logits(output),
                                          target)
                ok = stats.shape == (metric.size,)
            except Exception as e:
                raise ConfigError("metrics", type(metric).__name__, f"cannot take the model's "
                                  f"output {shape_of(output)} and the target {shape_of(target)} "
                                  f"({first_line(e)})", "choose metrics that fit the task "
                                  "(accuracy for classes, r2 for regression)") from e
            if not ok:
                raise ConfigError("metrics", type(metric).__name__, f"statistics() returned "
                                  f"{shape_of(stats)}, not its size {metric.size}",
                                  "return a float64 vector of `size` sums")

    def describe(self) -> dict[str, Any]:
        return {}

    def summary(self, model: torch.nn.Module) -> dict[str, Any]:
        return {}
