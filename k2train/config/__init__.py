"""Job configuration: frozen dataclasses per concern, strict YAML loading, cross-field checks."""

from k2train.config.checks import (
    ConfigError,
    check_batch,
    micro_batches_per_step,
    resolve_dp,
    sequence_ranks,
    tokens_per_micro_batch_round,
    validate,
    validate_world,
)
from k2train.config.load import config_from_dict, config_to_dict, dump_config, load_config, save_config
from k2train.config.schema import (
    CheckpointConfig,
    DataConfig,
    JobConfig,
    LoggingConfig,
    MemoryConfig,
    MixtureEntry,
    ModelConfig,
    OptimizerConfig,
    ParallelConfig,
    TrainConfig,
    YarnConfig,
)

__all__ = [
    "CheckpointConfig",
    "ConfigError",
    "DataConfig",
    "JobConfig",
    "LoggingConfig",
    "MemoryConfig",
    "MixtureEntry",
    "ModelConfig",
    "OptimizerConfig",
    "ParallelConfig",
    "TrainConfig",
    "YarnConfig",
    "check_batch",
    "config_from_dict",
    "config_to_dict",
    "dump_config",
    "load_config",
    "micro_batches_per_step",
    "resolve_dp",
    "save_config",
    "sequence_ranks",
    "tokens_per_micro_batch_round",
    "validate",
    "validate_world",
]
