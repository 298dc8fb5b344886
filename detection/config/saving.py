"""A config written back: as a plain dict, as YAML text, and as a file that `load_config` reads
back into an equal Config."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Union

from detection.config.reading import yaml_dump
from detection.config.schema import Config


def config_to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def dump_config(cfg: Config) -> str:
    # allow_unicode: a path or class name in another script stays readable (not "\u65E5")
    return yaml_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=None, allow_unicode=True)


def save_config(cfg: Config, path: Union[str, Path]) -> None:
    """Write the fully resolved config; `load_config(path)` gives back an equal object."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(dump_config(cfg), encoding="utf-8")
    tmp.replace(path)
