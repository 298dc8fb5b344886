"""Typed configuration: dataclasses <- YAML (with `_base_` inheritance) <- `key=value` overrides.

The package's public names are imported from here (`from detection.config import load_config`):
schema.py (the dataclasses), reading.py (YAML: `yaml_load` / `yaml_dump`, `_base_`, overrides, typed building),
checks.py (the value checks, the num_workers cap), saving.py (dict, YAML text, file),
errors.py (ConfigError).
"""
from detection.config.errors import ConfigError
from detection.config.schema import (AccelConfig, AnchorConfig, BackboneConfig, BoxRefinementConfig, Config,
                                     DataLoaderConfig, DatasetsConfig, InputConfig, LogConfig, ModelConfig,
                                     MultiScaleConfig, ROIHeadsConfig, RPNConfig, SolverConfig, TestAugConfig,
                                     TestConfig)
from detection.config.checks import usable_cpus, validate
from detection.config.reading import (checked_config, config_from_dict, load_config, override_keys_of, yaml_dump,
                                     yaml_load)
from detection.config.saving import config_to_dict, dump_config, save_config

__all__ = ["AccelConfig", "AnchorConfig", "BackboneConfig", "BoxRefinementConfig", "Config", "ConfigError",
           "DataLoaderConfig", "DatasetsConfig", "InputConfig", "LogConfig", "ModelConfig", "MultiScaleConfig",
           "ROIHeadsConfig", "RPNConfig", "SolverConfig", "TestAugConfig", "TestConfig", "checked_config",
           "config_from_dict",
           "config_to_dict", "dump_config", "load_config", "override_keys_of", "save_config", "usable_cpus", "validate",
           "yaml_dump", "yaml_load"]
