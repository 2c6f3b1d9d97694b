"""The run configuration: schema (:mod:`.schema`), layout rules (:mod:`.layout`), loading (:mod:`.loading`).

``from megatron_eaopd.config import load_config, Config, ConfigError`` is the usual entry point.
"""

from megatron_eaopd.config.errors import ConfigError, format_validation_error
from megatron_eaopd.config.layout import RuntimeLayout, check_model_split, check_static_layout, resolve_layout
from megatron_eaopd.config.loading import (
    RESOLVED_CONFIG_NAME,
    apply_overrides,
    load_config,
    parse_cli,
    parse_override,
    read_yaml,
    write_resolved_config,
)
from megatron_eaopd.config.schema import (
    PAPER_PROMPT_SUFFIX,
    CheckpointConfig,
    Config,
    DataConfig,
    EvalConfig,
    LoggingConfig,
    OptimizerConfig,
    ParallelConfig,
    StudentConfig,
    TeacherConfig,
    TrainConfig,
)
from megatron_eaopd.loss import EOPDConfig
from megatron_eaopd.rollout.params import RolloutConfig

__all__ = [
    "PAPER_PROMPT_SUFFIX", "RESOLVED_CONFIG_NAME", "ConfigError", "Config", "RuntimeLayout",
    "StudentConfig", "TeacherConfig", "ParallelConfig", "DataConfig", "RolloutConfig", "EOPDConfig",
    "TrainConfig", "OptimizerConfig", "CheckpointConfig", "LoggingConfig", "EvalConfig",
    "load_config", "read_yaml", "apply_overrides", "parse_override", "parse_cli", "format_validation_error",
    "write_resolved_config", "check_static_layout", "resolve_layout", "check_model_split",
]
