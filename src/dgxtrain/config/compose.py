"""The shipped conf/ composed with overrides, as `python -m dgxtrain` composes it: for tools
and tests that need a run's config without launching one."""

from __future__ import annotations

from collections.abc import Sequence

from hydra import compose as hydra_compose
from hydra import initialize_config_module
from omegaconf import DictConfig

from dgxtrain.config.load import register_configs

CONF_MODULE = "dgxtrain.conf"  # conf/, shipped inside the package (setup.py)


def compose(overrides: Sequence[str] = ()) -> DictConfig:
    """The config `python -m dgxtrain overrides...` would train (the hydra node left out)."""
    register_configs()
    with initialize_config_module(CONF_MODULE, version_base="1.3"):
        return hydra_compose("config", overrides=list(overrides))
