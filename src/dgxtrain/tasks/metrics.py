"""Eval metrics by name (`metrics: [loss, accuracy]`), or a user's own Metric `_target_`.

Each metric adds up float64 sums over every batch of every rank, so the value is over the
whole eval set with each sample counted once, whatever the world size.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any

import torch
from hydra.utils import instantiate

from dgxtrain.errors import ConfigError
from dgxtrain.tasks.losses import TaskLoss


class Metric(ABC):
    """An eval metric as sums of per-batch statistics: the sums of every rank's batches are
    added in one all-reduce (float64), then turned into values."""

    size: int  # how many statistics statistics() returns
    # statistics() gets the model's logits (losses.logits); True: its whole output, in which
    # a loss=model loss is.
    whole_output: bool = False

    @abstractmethod
    def statistics(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """A float64 vector of `size` sums over this batch."""

    @abstractmethod
    def values(self, totals: list[float]) -> dict[str, float]:
        """Named values (eval_<name>) from the statistics summed over every batch and rank."""


def _f64(like: torch.Tensor, *xs: torch.Tensor | float) -> torch.Tensor:
    """The values as one float64 vector on `like`'s device."""
    return torch.stack([torch.as_tensor(x, dtype=torch.float64, device=like.device)
                        for x in xs])


class Loss(Metric):
    """eval_loss: the loss's sum over the eval set / its count of targets (or samples)."""

    size = 2
    whole_output = True

    def __init__(self, loss: TaskLoss):
        self.loss = loss

    def statistics(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return _f64(target, self.loss.total(output, target), self.loss.count(target))

    def values(self, totals: list[float]) -> dict[str, float]:
        return {"eval_loss": totals[0] / max(totals[1], 1.0)}


class BitsPerToken(Loss):
    """eval_bits_per_token: a cross-entropy in nats per target, in bits."""

    def values(self, totals: list[float]) -> dict[str, float]:
        return {"eval_bits_per_token": super().values(totals)["eval_loss"] / math.log(2)}


class Perplexity(Loss):
    """eval_perplexity: exp of a cross-entropy in nats per target."""

    def values(self, totals: list[float]) -> dict[str, float]:
        return {"eval_perplexity": math.exp(min(super().values(totals)["eval_loss"], 700.0))}


class Accuracy(Metric):
    """eval_accuracy: argmax of the last axis equals the class target (ignored ones left out)."""

    size = 2

    def __init__(self, loss: TaskLoss):
        self.ignore_index = loss.ignore_index

    def statistics(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        valid = target != self.ignore_index if self.ignore_index is not None else \
            torch.ones_like(target, dtype=torch.bool)
        correct = (output.argmax(-1) == target) & valid
        return _f64(target, correct.sum(), valid.sum())

    def values(self, totals: list[float]) -> dict[str, float]:
        return {"eval_accuracy": totals[0] / max(totals[1], 1.0)}


class R2(Metric):
    """eval_r2: 1 - SSE / total sum of squares, from sums of squared errors, y and y²."""

    size = 4

    def __init__(self, loss: TaskLoss):
        pass

    def statistics(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if output.shape != target.shape:
            raise ValueError("r2 needs an output shaped like the target")
        y = target.double()
        err = output.double() - y
        return _f64(y, err.square().sum(), y.sum(), y.square().sum(), float(y.numel()))

    def values(self, totals: list[float]) -> dict[str, float]:
        sse, sy, syy, n = totals
        return {"eval_r2": 1.0 - sse / max(syy - sy * sy / max(n, 1.0), 1e-300)}


BUILT_IN = {"loss": Loss, "accuracy": Accuracy, "r2": R2, "bits_per_token": BitsPerToken,
            "perplexity": Perplexity}


def build_metrics(specs: Any, loss: TaskLoss) -> list[Metric]:
    """The metrics of `metrics:`, in order; `loss` first even when not named, since
    summary.json always holds eval_loss."""
    names = [s for s in specs if isinstance(s, str)]
    out: list[Metric] = [] if "loss" in names else [Loss(loss)]
    for spec in specs:
        if isinstance(spec, str) and spec in BUILT_IN:
            out.append(BUILT_IN[spec](loss))
            continue
        if not (hasattr(spec, "get") and spec.get("_target_")):
            raise ConfigError("metrics", spec, "unknown metric", "use names from "
                              f"{', '.join(BUILT_IN)}, or {{_target_: your.Metric}}")
        metric = instantiate(spec)
        if not isinstance(metric, Metric):
            raise ConfigError("metrics", spec.get("_target_"), "is not a "
                              "dgxtrain.tasks.base.Metric", "subclass Metric: size, "
                              "statistics(output, target) and values(totals)")
        out.append(metric)
    return out
