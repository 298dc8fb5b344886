"""Typed configuration: dataclasses <- YAML (with `_base_` inheritance) <- `key=value` overrides.

The package's public names are imported from here (`from detection.config import load_config`).
"""
from detection.config.schema import (AnchorConfig, BackboneConfig, BoxRefinementConfig, Config, ConfigError,
                                     DataLoaderConfig, DatasetsConfig, InputConfig, LogConfig, ModelConfig,
                                     MultiScaleConfig, ROIHeadsConfig, RPNConfig, SolverConfig, TestAugConfig,
                                     TestConfig, config_from_dict, config_to_dict, dump_config, load_config,
                                     save_config, usable_cpus, validate)
