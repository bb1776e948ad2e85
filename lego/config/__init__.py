"""The typed schema of a LEGO run: `ASHEMConfig` and its groups, the allowed values, the checks.

The dataclasses are registered in Hydra's ConfigStore as the schema of `conf/config.yaml`, so a
mistyped key or a wrong type fails at compose time; the YAML files under `conf/` only hold
values. `validate(cfg)` checks what types cannot (ranges, choices, cross-group constraints) and
raises `ConfigError` with one line naming the key. This module imports nothing from `lego`:
the schema does not depend on the code it configures.

The original specification's flat names (`phase1_layers`, `phase1_lr`, `phase1_patience`,
`hard_example_ratio`, `phase2_layers`, `phase2_lr`, `phase2_patience`) are properties of
`ASHEMConfig`, and `lego-run` accepts them on the command line as aliases of the group keys
(`phase2_lr=3e-4` means `phase2.lr=3e-4`). `hard_example_ratio` is itself a top-level key.
"""

from __future__ import annotations

from lego.config.checks import block_layers, check_variants, exit_ratios, resolve, to_dict, validate
from lego.config.data import ChainsConfig, DataConfig, ShardsConfig, validate_data_config
from lego.config.groups import (FLAT_ALIASES, ASHEMConfig, EvalConfig, GenerateConfig, HardExamplesConfig, LoggerConfig,
                                ModelConfig, OptimizerConfig, Phase1Config, Phase2Config, check_logger, check_model,
                                check_optimizer, check_tracker_kinds, rewrite_alias_overrides, validate_generate)
from lego.config.library import Routing, StageConfig, TrainingConfig, create_standard_config
from lego.config.values import (BASELINE_BUDGETS, CALIBRATION_SPLITS, CONFIDENCE_MEASURES, DATA_NAMES, DECODERS,
                                DEFAULT_CACHE_DIR, EXIT_HEADS, FFNS, FILE_BUILDERS, HF_PRESETS, IGNORE_INDEX,
                                LOSS_TOKENS, LOWERS, NORMS, OBJECTIVES, PHASE2_INITS, POSITIONS, PRECISIONS, SCHEDULES,
                                SHARD_DTYPES, SHARD_FORMATS, SPLITS, STAGES, STORE_DTYPES, STORES, TOKENIZERS,
                                TRACKER_KINDS,
                                UPPER_CONTEXTS, WANDB_MODES, ConfigError, check_choice, check_non_negative,
                                check_positive, check_ratio, check_schedule)
from lego.config.values import _fail  # noqa: F401  (the data group's one-line errors: data.py, batches.py, shards.py)

__all__ = [
    "ASHEMConfig", "BASELINE_BUDGETS", "CALIBRATION_SPLITS", "CONFIDENCE_MEASURES", "ChainsConfig", "ConfigError",
    "DATA_NAMES", "DECODERS", "DEFAULT_CACHE_DIR", "DataConfig", "EXIT_HEADS", "EvalConfig", "FFNS", "FILE_BUILDERS",
    "FLAT_ALIASES", "GenerateConfig", "HF_PRESETS", "HardExamplesConfig", "IGNORE_INDEX", "LOSS_TOKENS", "LOWERS",
    "LoggerConfig", "ModelConfig", "NORMS", "OBJECTIVES", "OptimizerConfig", "PHASE2_INITS", "POSITIONS",
    "PRECISIONS", "Phase1Config", "Phase2Config", "Routing", "SCHEDULES", "SHARD_DTYPES", "SHARD_FORMATS", "SPLITS",
    "STAGES", "STORE_DTYPES", "STORES", "ShardsConfig", "StageConfig", "TOKENIZERS", "TRACKER_KINDS", "TrainingConfig",
    "UPPER_CONTEXTS",
    "WANDB_MODES", "block_layers", "check_choice", "check_logger", "check_model", "check_non_negative",
    "check_optimizer", "check_positive", "check_ratio", "check_schedule", "check_tracker_kinds", "check_variants",
    "create_standard_config", "exit_ratios", "register_configs", "resolve", "rewrite_alias_overrides", "to_dict",
    "validate", "validate_data_config", "validate_generate",
]


def register_configs() -> None:
    """Register the schema that conf/config.yaml extends: every group option is merged into a typed node."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="ashem_schema", node=ASHEMConfig)
