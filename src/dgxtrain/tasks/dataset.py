"""A user's own task: map-style Datasets of (input, target) pairs (conf/data/dataset.yaml),
any model, any loss, read through the loader path (data/loader.py)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset, default_collate

from dgxtrain.data.loader import (
    ItemError,
    LoaderFeed,
    SeededItems,
    StepSampler,
    check_picklable,
    item_errors,
    loader_workers,
    make_loader,
    sample_keys,
    to_device,
)
from dgxtrain.data.order import GlobalBatchSchedule
from dgxtrain.errors import ConfigError, constructing
from dgxtrain.tasks.base import Batch, Task
from dgxtrain.tasks.losses import TaskLoss, shape_of


class DatasetTask(Task):
    def __init__(self, model_cfg: DictConfig, data_cfg: DictConfig, loss: TaskLoss,
                 metric_specs: Any, seed: int, device: torch.device):
        super().__init__(model_cfg, loss, metric_specs)
        self.cfg, self.seed, self.device = data_cfg, seed, device
        with constructing("data.train", data_cfg.train):
            self.train: Dataset = instantiate(data_cfg.train)
        with constructing("data.eval", data_cfg.eval):
            self.eval: Dataset = instantiate(data_cfg.eval)
        self.num_samples = len(self.train)
        self.num_workers = loader_workers(data_cfg.num_workers, device)
        if data_cfg.start_method == "fork" and device.type == "cuda" and self.num_workers:
            raise ConfigError("data.start_method", "fork", "is unsafe once the trainer has "
                              "initialised CUDA", "use forkserver (the default) or spawn")
        for split in ("train", "eval"):
            dataset, key = getattr(self, split), f"data.{split}"
            if len(dataset) == 0:
                raise ConfigError(key, data_cfg[split].get("_target_"), "has no samples",
                                  f"give {key} a dataset with at least one item")
            _check_item(dataset, key, data_cfg[split].get("_target_"), data_cfg.seed_rngs)
            if self.num_workers:
                check_picklable(dataset, key, data_cfg[split].get("_target_"),
                                data_cfg.start_method)
        self._eval_loader: DataLoader | None = None

    def _loader(self, dataset: Dataset, batch_sampler: Any) -> DataLoader:
        c = self.cfg
        return make_loader(dataset, batch_sampler, num_workers=self.num_workers,
                           prefetch_factor=c.prefetch_factor,
                           persistent_workers=c.persistent_workers,
                           start_method=c.start_method, seed_rngs=c.seed_rngs,
                           pin_memory=c.pin_memory and self.device.type == "cuda")

    def example(self, n: int = 8) -> Batch:
        keys = sample_keys(self.seed, torch.arange(min(n, self.num_samples)))
        return default_collate(SeededItems(self.train, self.cfg.seed_rngs).__getitems__(keys))

    def train_feed(self, seed: int, global_batch: int, rank: int, world_size: int,
                   micro_batch: int, start: int, end: int, device: torch.device) -> LoaderFeed:
        # The order's index maths is cheap on the CPU, where the loader needs the keys.
        schedule = GlobalBatchSchedule(self.num_samples, seed, global_batch, rank,
                                       world_size, micro_batch)
        return LoaderFeed(self._loader(self.train, StepSampler(schedule, start, end, seed)),
                          start, schedule.accum, device, self.num_workers,
                          f"data.train={self.cfg.train.get('_target_')}")

    def eval_batches(self, rank: int, world_size: int, batch_size: int,
                     device: torch.device) -> Iterator[Batch]:
        if self._eval_loader is None:  # kept, so persistent workers serve every evaluation
            mine = torch.arange(len(self.eval)).tensor_split(world_size)[rank]
            keys = [sample_keys(self.seed, b) for b in mine.split(batch_size) if len(b)]
            self._eval_loader = self._loader(self.eval, keys)
        # A worker that dies here is named by the train feed, which the whole loop is in.
        with item_errors(f"data.eval={self.cfg.eval.get('_target_')}", "the evaluation"):
            for batch in self._eval_loader:
                yield to_device(batch, device)

    def describe(self) -> dict[str, Any]:
        """The sizes, and each Dataset's own describe() under its key (data.train, data.eval)."""
        out: dict[str, Any] = {"train_samples": self.num_samples, "eval_samples": len(self.eval),
                               "num_workers": self.num_workers}
        for split in ("train", "eval"):
            about = getattr(getattr(self, split), "describe", None)
            if callable(about):
                out[f"data.{split}"] = about()
        return out

    def summary(self, model: torch.nn.Module) -> dict[str, Any]:
        summarize = getattr(self.train, "summarize", None)
        return summarize(model) if callable(summarize) else {}


def _check_item(dataset: Dataset, key: str, target: Any, rngs: Any) -> None:
    """Item 0 is an (input, target) pair, input a tensor or a dict of tensors, and the first
    items stack into a batch."""
    keys = sample_keys(0, torch.arange(min(8, len(dataset))))
    try:
        items = SeededItems(dataset, rngs).__getitems__(keys)
    except ItemError as e:
        raise ConfigError(key, target, f"{e.where()} at start", "make __getitem__ return "
                          "(input, target) for every index below len()") from e
    item = items[0]
    fix = "return (input, target) from __getitem__: input a tensor or a dict of tensors, " \
          "target a tensor"
    if not (isinstance(item, (tuple, list)) and len(item) == 2):
        what = f"a {len(item)}-tuple" if isinstance(item, (tuple, list)) else shape_of(item)
        raise ConfigError(key, target, f"item 0 is {what}, not an (input, target) pair", fix)
    inputs, y = item
    tensors = inputs.values() if isinstance(inputs, dict) else [inputs]
    if not (all(torch.is_tensor(t) for t in tensors) and torch.is_tensor(y)):
        raise ConfigError(key, target, f"item 0 is ({shape_of(inputs)}, {shape_of(y)})", fix)
    try:
        default_collate(items)
    except RuntimeError as e:
        shapes = ", ".join(f"({shape_of(x)}, {shape_of(t)})" for x, t in items[:3])
        raise ConfigError(key, target, f"its items differ in shape ({shapes}, ...), so they do "
                          "not stack into a batch", "pad or crop every item to one fixed "
                          "shape in __getitem__ (padding to the longest of a batch would make "
                          "an item depend on its batch-mates)") from e
