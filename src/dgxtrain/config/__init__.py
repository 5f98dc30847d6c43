"""The one typed config: the schemas (schemas.py, groups.py), their range checks (checks.py),
the load into typed dataclasses (load.py) and the packaged conf/ composed (compose.py)."""

from dgxtrain.config.compose import compose
from dgxtrain.config.load import RunSpec, load, register_configs
from dgxtrain.config.schemas import (
    CheckpointConfig,
    Config,
    DistConfig,
    FaultConfig,
    LoggerConfig,
    PreemptionConfig,
    TrainerConfig,
)

__all__ = ["CheckpointConfig", "Config", "DistConfig", "FaultConfig", "LoggerConfig",
           "PreemptionConfig", "RunSpec", "TrainerConfig", "compose", "load", "register_configs"]
