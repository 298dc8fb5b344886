#!/usr/bin/env python
"""Train the Faster R-CNN C4 detector described by a config.

    python tools/train_det.py --config configs/coco_r101.yaml [--output-dir DIR] [--resume] [KEY=VALUE ...]
    torchrun --nproc_per_node=8 tools/train_det.py --config configs/coco_r101.yaml

--resume continues the run in the output directory from its last.pth with everything
restored (weights, optimizer, lr schedule, iteration, random states): the same result as
an uninterrupted run. model.weights=PATH instead starts a NEW run at iteration 0 from a
detector checkpoint's or a backbone's weights.
"""
from __future__ import annotations

import argparse
import sys

from detection.cli import add_config_args, config_from_args, fail
from detection.config import dump_config


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    parser.add_argument("--output-dir", help="where checkpoints and logs go (default: the config's output_dir)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from OUTPUT_DIR/last.pth with optimizer, schedule, iteration and RNG "
                             "restored (unlike model.weights=PATH, which starts a new run at iteration 0)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    extra = [f"output_dir={args.output_dir}"] if args.output_dir else []
    cfg = config_from_args(args, extra)
    if args.print_config:
        sys.stdout.write(dump_config(cfg))
        return 0
    from detection.engine.trainer import TrainingError, train  # heavy imports only when training

    try:
        train(cfg, resume=args.resume)
    except TrainingError as err:
        fail(str(err), code=1)
    except ValueError as err:  # bad data / weights / config found at run time: one clear line
        fail(str(err), code=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
