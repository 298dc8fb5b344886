#!/usr/bin/env python
"""Train the Faster R-CNN C4 detector described by a config.

    python tools/train_det.py --config CFG [--output-dir DIR] [--resume | --overwrite] [KEY=VALUE ...]
    torchrun --nproc_per_node=8 tools/train_det.py --config configs/coco_r101.yaml

An output folder that already holds a run (last.pth, model_final.pth or metrics.jsonl) is
refused unless --resume continues it or --overwrite replaces it. --resume continues from
its last.pth with everything restored (weights, optimizer, lr schedule, iteration, random
states): the same result as an uninterrupted run; a finished run says so and exits 0.
The run's config.yaml is the run's: a config that differs from it is refused, naming the
keys, unless they are given on the command line (solver.max_iter=N to extend a run); the
changes are kept in config_resumed_<iter>.yaml. Every message also goes to OUTPUT_DIR/log.txt.
model.weights=PATH instead starts a NEW run at iteration 0 from a detector checkpoint's or
a backbone's weights.

datasets.root, first found: datasets.root=... on the command line, the config file (or its
_base_ chain) when it sets a root other than the default, the environment variable
DETECTION_DATASETS, the default `datasets`. Relative datasets.root and output_dir are taken
from the working directory; `_base_` paths from the folder of the config file naming them.

Exit codes: 0 done (or the run was already finished), 1 training failed (e.g. a non-finite
loss), 2 bad config, output folder or data (the config, the folder, the training and the test
sets are checked before anything is written), 75 try again later (a full disk or quota, the
output folder in use by a live run: the same command may succeed), 130 interrupted (Ctrl-C,
SIGINT), 143 stopped by SIGTERM (138 by SIGUSR1).

SIGTERM, SIGINT or SIGUSR1 (a scheduler's pre-emption or its warning, Ctrl-C) lets the current
iteration finish, saves last.pth there and exits with one line saying so; --resume continues exactly. A second signal
during that save does not interrupt it; at any other moment it stops at once. One trainer per
output folder: a second run on a folder a live run uses is refused, naming its pid (train.lock).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from detection.cli import add_config_args, config_from_args, override_keys, parse_command_line, run_tool
from detection.config import dump_config


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    parser.add_argument("--output-dir", help="where checkpoints and logs go (default: the config's output_dir)")
    run = parser.add_mutually_exclusive_group()
    run.add_argument("--resume", action="store_true",
                     help="continue from OUTPUT_DIR/last.pth with optimizer, schedule, iteration and RNG "
                          "restored (unlike model.weights=PATH, which starts a new run at iteration 0); "
                          "keys that differ from the run's config.yaml must be given as KEY=VALUE")
    run.add_argument("--overwrite", action="store_true",
                     help="replace the run in OUTPUT_DIR: its last.pth, model_final.pth, model_*.pth, "
                          "metrics.jsonl, config.yaml, config_resumed_*.yaml, log.txt, TensorBoard event files "
                          "and inference/ are removed once the data have been checked")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return parse_command_line(parser, argv, torchrun_tool="tools/train_det.py")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_tool(lambda: run(args), interrupted="interrupted before training started", processes="many")


def run(args: argparse.Namespace) -> None:
    # the folder as given, quoted: read as YAML, "runs/lr0.01 #2" lost its " #2" (a comment) and
    # "2024-01-05" became a date
    extra = [f"output_dir={json.dumps(args.output_dir)}"] if args.output_dir else []
    cfg = config_from_args(args, extra)
    if args.resume and not args.output_dir:
        _check_run_folder(args.config, cfg.output_dir)
    if args.print_config:
        sys.stdout.write(dump_config(cfg))
        return
    from detection.engine.trainer import train  # heavy imports

    train(cfg, resume=args.resume, overwrite=args.overwrite, explicit=override_keys(args))


def _check_run_folder(config: str | None, output_dir: str) -> None:
    """--resume --config RUN/config.yaml of a run folder moved or copied since (its config.yaml
    names the folder it was made in): it resumed, or started over, in the old place. Refused,
    with the --output-dir that resumes the run the config sits in."""
    from detection.config import ConfigError

    if not config:
        return
    folder = Path(config).expanduser().resolve().parent
    if (folder / "last.pth").is_file() and folder != Path(output_dir).expanduser().resolve():
        raise ConfigError(f"--resume: {config} sits in a run folder ({folder}, with its last.pth) but names "
                          f"output_dir {output_dir} (moved or copied since?): give --output-dir {folder} to resume "
                          f"the run it sits in, or --output-dir {output_dir} for that one")


if __name__ == "__main__":
    sys.exit(main())
