#!/usr/bin/env python
"""A model's detections on unlabelled images as a COCO training json (self-training: a teacher's
confident detections become boxes a student trains on beside the labelled set).

    python tools/visualize.py --weights teacher/model_final.pth --input unlabelled/ --output pl/ --no-draw \\
        --score-thresh 0.5
    python tools/pseudo_labels.py pl/detections.jsonl --output pseudo.json --score-thresh 0.7
    # then the entry it prints (absolute paths: relative ones are read under datasets.root):
    # datasets.train='[<your set>, {type: coco, name: pseudo, ann_file: /abs/pseudo.json,
    #                                image_root: /abs/unlabelled}]'

DETECTIONS is visualize.py's detections.jsonl, or the folder that holds it (with its
detections.source.json beside it, which names the model's classes). OUTPUT, a new file, gets
every class of the model as a category (they match the labelled set's by name), each image read
(file names relative to --image-root, default the images' common folder; sizes as viewed) and a
box per detection at --score-thresh or above
(default: every detection the list holds, which visualize.py's own --score-thresh chose), with its
"score" (a field training ignores). Images without a box are kept; training drops them unless
dataloader.filter_empty is false. Keep the unlabelled images apart from the labelled and test
images: training warns when two sets share an image file.
"""
from __future__ import annotations

import argparse
import sys

from detection.cli import parse_command_line, run_tool


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("detections", metavar="DETECTIONS",
                        help="visualize.py's detections.jsonl, or the --output folder that holds it")
    parser.add_argument("--output", required=True, metavar="JSON", help="the COCO json to write (a new file)")
    parser.add_argument("--score-thresh", type=float,
                        help="keep the detections scoring at least this (default 0: all the list holds)")
    parser.add_argument("--image-root", metavar="DIR",
                        help="the folder the json's file names are relative to (default: the images' common folder)")
    args = parse_command_line(parser, argv)
    if args.score_thresh is not None and not 0 <= args.score_thresh <= 1:
        parser.error(f"--score-thresh {args.score_thresh}: a score in [0, 1]")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_tool(lambda: write(args))


def write(args: argparse.Namespace) -> None:
    from detection.data.pseudo_labels import summary, write_pseudo_labels

    asked = args.score_thresh
    counts = write_pseudo_labels(args.detections, args.output, asked or 0.0, args.image_root)
    for line in summary(counts, args.output, asked):
        print(line)


if __name__ == "__main__":
    sys.exit(main())
