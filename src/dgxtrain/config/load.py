"""From the composed config to the typed one: every range checked once, before any process
group or GPU work, and what follows from it for this world (RunSpec)."""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from dgxtrain.config.groups import (
    AdamWConfig,
    DatasetDataConfig,
    LinearModelConfig,
    MLPModelConfig,
    SGDConfig,
    SyntheticDataConfig,
)
from dgxtrain.config.identity import run_name
from dgxtrain.config.schemas import SECTIONS, TARGET_GROUPS, Config, LoggerConfig, TrainerConfig
from dgxtrain.errors import ConfigError

# The schemas a group file extends through its defaults list (`defaults: [mlp_schema]`),
# by (group, name); the root config extends config_schema.
GROUP_SCHEMAS = {
    ("model", "linear_schema"): LinearModelConfig,
    ("model", "mlp_schema"): MLPModelConfig,
    ("data", "synthetic_schema"): SyntheticDataConfig,
    ("data", "dataset_schema"): DatasetDataConfig,
    ("optim", "adamw_schema"): AdamWConfig,
    ("optim", "sgd_schema"): SGDConfig,
    ("logger", "logger_schema"): LoggerConfig,
}


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)
    for (group, name), node in GROUP_SCHEMAS.items():
        cs.store(group=group, name=name, node=node)
    # The run dir's name (conf/config.yaml): the same for the same config, so a rerun
    # continues its run.
    OmegaConf.register_new_resolver("dgx_run_name", lambda *, _root_: run_name(_root_),
                                    replace=True)


# --- loading ------------------------------------------------------------------------


@dataclass(frozen=True)
class RunSpec:
    """Values derived once from the config and the world, logged at start."""

    world_size: int
    global_batch_size: int
    micro_batch_size: int
    grad_accum_steps: int

    @classmethod
    def derive(cls, t: TrainerConfig, world_size: int) -> RunSpec:
        gbs = t.global_batch_size
        if gbs % world_size:
            raise ConfigError("trainer.global_batch_size", gbs,
                              f"not divisible by world_size={world_size}",
                              f"use a multiple of {world_size}, e.g. "
                              f"{world_size * max(1, gbs // world_size)}")
        micro = t.micro_batch_size if t.micro_batch_size is not None else gbs // world_size
        per_step = micro * world_size
        if gbs % per_step:
            raise ConfigError(
                "trainer.global_batch_size", gbs,
                f"not divisible by trainer.micro_batch_size * world_size = {micro} * "
                f"{world_size} = {per_step}", f"use a multiple of {per_step} (e.g. "
                f"{per_step * max(1, gbs // per_step)}), or change trainer.micro_batch_size")
        return cls(world_size, gbs, micro, gbs // per_step)


def _check_target(cfg: DictConfig, key: str) -> None:
    target = OmegaConf.select(cfg, key)
    module, _, name = str(target).rpartition(".")
    try:
        getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as e:
        raise ConfigError(key, target, f"cannot import it ({e})",
                          "give the full dotted path of a class on PYTHONPATH") from e


def _check_datasets(cfg: DictConfig) -> None:
    """A data file of one's own that names Datasets: with the loader settings, and both."""
    if "train" not in cfg.data:
        return
    if "start_method" not in cfg.data:
        raise ConfigError("data", "<your data file>", "names data.train but has none of the "
                          "loader settings (data.num_workers, ...)", "put `defaults: "
                          "[dataset]` at the top of your data file (conf/data/dataset.yaml)")
    if OmegaConf.is_missing(cfg.data, "eval") or OmegaConf.select(cfg, "data.eval._target_") \
            is None:
        raise ConfigError("data.eval", None, "is not set: a run evaluates on held-out "
                          "samples", "add eval: {_target_: <your Dataset>, ...} to your data "
                          "file (the held-out split, or a few thousand training items)")


def load(cfg: DictConfig, world_size: int, cuda_available: bool) -> tuple[Config, RunSpec]:
    """The composed config as typed dataclasses, every range checked, and what follows from
    it for this world; raises ConfigError naming the key and the fix."""
    _check_datasets(cfg)
    for group in TARGET_GROUPS:
        # data=dataset names its two Datasets, not a data source of its own.
        for node in ("data.train", "data.eval") if group == "data" and "train" in cfg.data \
                else (group,):
            _check_target(cfg, f"{node}._target_")
        # A group file that extends a schema gets that schema's checks; a user's bare
        # `_target_` node has none. The DictConfig itself is kept for instantiate.
        if OmegaConf.get_type(cfg[group]) not in (dict, None):
            OmegaConf.to_object(cfg[group])
    typed = {name: OmegaConf.to_object(cfg[name]) for name in SECTIONS}
    config = Config(seed=cfg.seed, device=cfg.device, model=cfg.model, data=cfg.data,
                    loss=cfg.loss, metrics=cfg.metrics, optim=cfg.optim, **typed)
    # Measured on torch 2.13: compiled DDP's reducer then all-reduces undefined gradients.
    config.dist.require("find_unused_parameters", not (config.dist.find_unused_parameters
                                                       and config.trainer.compile),
                        "torch.compile's DDP cannot leave parameters unused in a step",
                        "set trainer.compile=false for a model whose used parameters change "
                        "between steps")
    config.require("device", config.device != "cuda" or cuda_available,
                   "no CUDA GPU is visible (torch.cuda.is_available() is False)",
                   "use device=auto or device=cpu, or run on a GPU node")
    return config, RunSpec.derive(config.trainer, world_size)
