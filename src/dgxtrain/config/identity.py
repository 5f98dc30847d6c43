"""Which run a launch belongs to: the run dir's name.

The same configuration gets the same name, so the same command launched again (after a
crash, a kill or Ctrl-C) finds its run dir and continues from the newest checkpoint there;
a finished run only says so. "The same configuration" is the composed config as written
(before interpolation) less what only says how or how long it runs: the keys in
HOW_IT_RUNS. docs/checkpoints.md tells users the same.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, OmegaConf

from dgxtrain.distributed import slurm
from dgxtrain.errors import ConfigError

# Where it runs, how often it logs, evaluates and saves, for how many steps, what it logs
# to and what faults it injects: a rerun that changes these continues the same run (raising
# trainer.max_steps trains a finished run on).
HOW_IT_RUNS = ("hydra", "run_name", "device", "dist", "checkpoint", "preemption", "fault",
               "logger", "trainer.max_steps", "trainer.log_every", "trainer.eval_every",
               # The loader's processes: the same bits with any of them (tests/tasks).
               "data.num_workers", "data.prefetch_factor", "data.pin_memory",
               "data.persistent_workers", "data.start_method")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def config_digest(cfg: DictConfig) -> str:
    """A short hash of what the run trains: the same on every rank, for the same config."""
    tree: dict[str, Any] = OmegaConf.to_container(cfg, resolve=False)  # type: ignore[assignment]
    for dotted in HOW_IT_RUNS:
        *parents, leaf = dotted.split(".")
        node = tree
        for key in parents:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(leaf, None)
    text = json.dumps(tree, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def run_name(root: DictConfig, env: Mapping[str, str] = os.environ) -> str:
    """The run dir's name: DGXTRAIN_RUN_ID, else run_name, else the SLURM job's id (stable
    across requeues), else <experiment>-<config digest>."""
    if env.get("DGXTRAIN_RUN_ID"):
        return env["DGXTRAIN_RUN_ID"]
    named = OmegaConf.select(root, "run_name", default=None)
    if named is not None:
        if not _NAME.fullmatch(str(named)):
            raise ConfigError("run_name", named, "not a directory name (letters, digits, '.', "
                              "'_' and '-', starting with a letter or digit)",
                              "run_name=my_run")
        return str(named)
    job = slurm.run_id(env)
    if job:
        return job
    experiment = OmegaConf.select(root, "hydra.runtime.choices.experiment", default=None)
    return f"{experiment or 'run'}-{config_digest(root)}"
