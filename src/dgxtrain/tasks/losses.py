"""The loss as the step and the evaluation need it: the user's criterion (`loss._target_`),
and the count of targets its mean is over.

A criterion with ignore_index (a token loss with padding) averages over a number of
valid targets that differs between batches. The mean of per-micro-batch means is then
not the global batch's mean, so N ranks or another micro-batch split would train on a
different loss. The step normalises such a loss by the global count of valid targets
instead (torchtitan's `global_valid_tokens`): every split gives the same update.

Models are taken as people write them: an output that is a tuple or list, a dict, or an
object with `.logits` (a Hugging Face `ModelOutput`) gives its logits to any loss (`logits`
below). With `loss=model` (ModelLoss) the model computes its own loss from the target it
is handed, as published GPTs and Hugging Face models do.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any

import torch

from dgxtrain.errors import ConfigError, first_line


def shape_of(x: Any) -> str:
    """`[8, 64] float32`, `{tokens: ...}` for a dict (`Output{...}` for a dict subclass),
    `([8, 10] float32, None)` for a tuple, for one-line errors."""
    if torch.is_tensor(x):
        return f"{list(x.shape)} {str(x.dtype).removeprefix('torch.')}"
    if isinstance(x, Mapping):
        name = "" if type(x) is dict else type(x).__name__
        return name + "{" + ", ".join(f"{k}: {shape_of(v)}" for k, v in x.items()) + "}"
    if isinstance(x, (tuple, list)):
        inner = ", ".join(map(shape_of, x))
        return f"({inner})" if isinstance(x, tuple) else f"[{inner}]"
    return "None" if x is None else type(x).__name__


def logits(output: Any) -> torch.Tensor | None:
    """The logits in a model's output: the output itself if a tensor, else its `.logits`,
    its `["logits"]`, or its element 0 (a tuple or list); None if none of these is a tensor."""
    if torch.is_tensor(output):
        return output
    found = getattr(output, "logits", None)
    if found is None and isinstance(output, Mapping):
        found = output.get("logits")
    if found is None and isinstance(output, (tuple, list)) and output:
        found = output[0]
    return found if torch.is_tensor(found) else None


class ModelLoss:
    """`loss=model`: the model computes its own loss. It is called as
    `model(input, <target_arg>=target)`, and the loss is its output's `.loss`, `["loss"]`,
    element `index` of a tuple or list, or the output itself when that is a scalar."""

    def __init__(self, target_arg: str = "labels", index: int = 1):
        if not (isinstance(target_arg, str) and target_arg.isidentifier()):
            raise ConfigError("loss.target_arg", target_arg, "is not an argument name",
                              "name the argument the model's forward() takes the target as "
                              "(labels, targets, ...)")
        if not isinstance(index, int) or isinstance(index, bool):
            raise ConfigError("loss.index", index, "is not an integer", "give the loss's "
                              "position in the model's output tuple (e.g. loss.index=1)")
        self.target_arg, self.index = target_arg, index

    def __call__(self, output: Any, target: torch.Tensor) -> torch.Tensor | None:
        if torch.is_tensor(output):
            return output if output.ndim == 0 else None
        found = getattr(output, "loss", None)
        if found is None and isinstance(output, Mapping):
            found = output.get("loss")
        if found is None and isinstance(output, (tuple, list)) and -len(output) <= \
                self.index < len(output):
            found = output[self.index]
        return found if torch.is_tensor(found) else None


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
        self.from_model = isinstance(criterion, ModelLoss)

    def model_kwargs(self, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """What the model is called with besides its input: the target, for loss=model."""
        return {self.criterion.target_arg: target} if self.from_model else {}

    @property
    def counts_vary(self) -> bool:
        """Batches may hold different numbers of valid targets (an ignore_index)."""
        return self.per_target and self.ignore_index is not None

    def mean(self, output: Any, target: torch.Tensor) -> torch.Tensor:
        if self.from_model:
            return self.criterion(output, target).float()
        return self.criterion(logits(output).float(), target)

    def total(self, output: Any, target: torch.Tensor) -> torch.Tensor:
        """The sum of the loss over the batch's counted targets (or samples)."""
        if self.per_target:
            return self._summed(logits(output).float(), target)
        return self.mean(output, target) * len(target)

    def count(self, target: torch.Tensor) -> torch.Tensor:
        """How many targets (or samples) this batch's mean is over, as an int64 tensor."""
        if not self.per_target:
            return torch.tensor(len(target), device=target.device)
        if self.ignore_index is not None and not target.is_floating_point():
            return (target != self.ignore_index).sum()
        return torch.tensor(target.numel(), device=target.device)

    def check(self, output: Any, target: torch.Tensor, model_name: str) -> None:
        """At start, on one batch: the criterion takes this output and target, returns a
        scalar, and its sum / count is its mean (else it counts per sample)."""
        if self.from_model:
            mean = self.criterion(output, target)
            if mean is None or mean.ndim != 0:
                c = self.criterion
                raise ConfigError("loss", "model", f"the model's output {shape_of(output)} "
                                  f"holds no scalar loss (.loss, ['loss'] or element "
                                  f"{c.index})", f"return the loss from forward() when it is "
                                  f"given {c.target_arg}=, or set loss.index to its place in "
                                  "the output")
            return
        out = logits(output)
        if out is None:
            raise ConfigError("model._target_", model_name, f"returned {shape_of(output)}, "
                              "with no logits tensor in it", "return a tensor, a tuple or list "
                              "with the logits first, a dict with 'logits', or an object with "
                              ".logits")
        fix = ("choose a loss that fits the model's output (e.g. CrossEntropyLoss for "
               "logits [B, C] and class targets [B]), or change the model's output")
        # A tuple or a ModelOutput may carry the model's own loss.
        own = "; if the model computes its own loss, use loss=model" if out is not output else ""
        what = f"the model's output {shape_of(out)} and the target {shape_of(target)}"
        classes = isinstance(self.criterion, (torch.nn.CrossEntropyLoss, torch.nn.NLLLoss))
        if classes and target.dtype not in (torch.int64, torch.uint8) \
                and out.shape != target.shape:
            dtype = str(target.dtype).removeprefix("torch.")
            raise ConfigError("loss._target_", self.name, "takes class indices as the "
                              f"target, and the target is {dtype} ({what})", "return the target as an int64 tensor "
                              "(torch.long) from the dataset's __getitem__")
        if target.is_floating_point() and out.shape != target.shape:
            raise ConfigError("loss._target_", self.name, f"{what} differ in shape, which an "
                              "elementwise loss would broadcast", fix + " (e.g. return [B] "
                              "with .squeeze(-1) for targets [B])" + own)
        try:
            mean = self.mean(output, target)
        except Exception as e:
            raise ConfigError("loss._target_", self.name, f"cannot take {what} "
                              f"({first_line(e)})", fix + own) from e
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
