"""What is trained: the task interface (base.py) and the built-in tasks."""

from __future__ import annotations

import torch

from dgxtrain.config import Config
from dgxtrain.tasks.base import Metric, Task
from dgxtrain.tasks.regression import RegressionTask


def build_task(cfg: Config, device: torch.device) -> Task:
    """The task of this config: today the built-in synthetic regression."""
    return RegressionTask(cfg.model, cfg.data, cfg.seed, device)


__all__ = ["Metric", "Task", "build_task"]
