"""What is trained: the task interface (base.py), the built-in synthetic regression, and a
user's own map-style datasets (dataset.py)."""

from __future__ import annotations

import torch

from dgxtrain.config import Config
from dgxtrain.tasks.base import Feed, Task
from dgxtrain.tasks.dataset import DatasetTask
from dgxtrain.tasks.losses import TaskLoss
from dgxtrain.tasks.metrics import Metric
from dgxtrain.tasks.regression import RegressionTask


def build_task(cfg: Config, loss: TaskLoss, device: torch.device) -> Task:
    """Datasets of your own when data.train is set (data=dataset), else the built-in
    synthetic regression."""
    kind = DatasetTask if "train" in cfg.data else RegressionTask
    return kind(cfg.model, cfg.data, loss, cfg.metrics, cfg.seed, device)


__all__ = ["Feed", "Metric", "Task", "TaskLoss", "build_task"]
