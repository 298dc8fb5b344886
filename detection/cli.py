"""The command-line plumbing every tool shares: `--config CFG` plus `KEY=VALUE` overrides."""
from __future__ import annotations

import argparse
import os
import sys
from typing import NoReturn, Sequence

from detection.config import Config, ConfigError, load_config

DATASETS_ENV = "DETECTION_DATASETS"


def add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, metavar="CFG", help="YAML config file (configs/*.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="config overrides, e.g. solver.base_lr=0.01 model.rpn.nms_thresh=0.6")


def config_from_args(args: argparse.Namespace, extra: Sequence[str] = ()) -> Config:
    """Load the config; a bad one exits with status 2 and the ConfigError message, no traceback.

    The environment variable DETECTION_DATASETS sets `datasets.root` unless an explicit
    `datasets.root=...` override is given on the command line.
    """
    overrides = list(args.overrides) + list(extra)
    explicit_root = any(o.split("=", 1)[0].strip() == "datasets.root" for o in overrides)
    if os.environ.get(DATASETS_ENV) and not explicit_root:
        overrides.insert(0, f"datasets.root={os.environ[DATASETS_ENV]}")
    try:
        return load_config(args.config, overrides)
    except ConfigError as err:
        fail(str(err))


def fail(message: str, code: int = 2) -> NoReturn:
    """Print one clear line to stderr and exit (2: bad input, 1: failure at run time)."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)
