"""Write the synthetic shapes data set (COCO json + VOC XML), deterministic per seed.

    python tools/make_shapes.py --output data/shapes --num-train 600 --num-val 100 --num-test 200 --seed 0
    python tools/make_shapes.py --output data/shapes --splits test --seed 0   # add a test split only

The result is what the known names shapes_train / shapes_val / shapes_test expect under
<datasets.root>/shapes, and a VOC-layout folder in <output>/VOC (split files train, val, test).
Each split has its own random stream: the test split (--num-test, 200 by default) does not
change the train and val files of the same seed, and --splits writes only the splits named.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from detection.cli import parse_command_line, run_tool
from detection.data.shapes import generate_shapes

SPLITS = ("train", "val", "test")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True, help="output folder (data/shapes: the shapes configs' datasets.root is data)")
    parser.add_argument("--num-train", type=int, default=800, help="number of training images")
    parser.add_argument("--num-val", type=int, default=200, help="number of validation images")
    parser.add_argument("--num-test", type=int, default=200, help="number of test images (0: no test split)")
    parser.add_argument("--splits", nargs="+", choices=SPLITS, metavar="SPLIT",
                        help="write only these splits (train val test), leaving the others' files alone")
    parser.add_argument("--seed", type=int, default=0, help="random seed; same seed, same files")
    parser.add_argument("--image-size", type=int, nargs="+", default=[128, 192], metavar="PX",
                        help="one size (square images) or MIN MAX for each of height and width")
    parser.add_argument("--max-objects", type=int, default=6, help="objects per image are 1..this")
    args = parse_command_line(parser, argv)
    if len(args.image_size) not in (1, 2):
        parser.error("--image-size takes one value or two (MIN MAX)")
    if args.num_train < 0 or args.num_val < 0 or args.num_test < 0:
        parser.error("--num-train, --num-val and --num-test must be >= 0")
    if args.seed < 0:
        parser.error("--seed must be >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_tool(lambda: write(args))


def write(args: argparse.Namespace) -> None:
    from detection.utils.files import OutputFolderError, WriteError

    size = args.image_size[0] if len(args.image_size) == 1 else tuple(args.image_size)
    try:  # made first: a path through a file (/dev/null/s) was a NotADirectoryError traceback
        os.makedirs(args.output, exist_ok=True)
    except OSError as err:
        raise OutputFolderError(f"--output {args.output}: cannot create the folder ({err.strerror or err})") from None
    try:
        paths = generate_shapes(args.output, args.num_train, args.num_val, args.seed, image_size=size,
                                max_objects=args.max_objects, num_test=args.num_test, splits=args.splits)
    except WriteError:
        raise
    except OSError as err:  # a json or XML file on a full disk: one line (exit 75), not a traceback
        raise WriteError(f"could not write the data set into {args.output}: {err.strerror or err}"
                         + (f" ({err.filename})" if err.filename else ""), err.errno, err.strerror) from None
    counts = {"train": args.num_train, "val": args.num_val, "test": args.num_test}
    written = [s for s in SPLITS if s in paths]
    print(f"wrote {' / '.join(f'{counts[s]} {s}' for s in written)} images to {args.output}")
    print(f"  COCO: {', '.join(paths[s] for s in written)}")
    print(f"  VOC:  {paths['voc']} (classes circle, square, triangle)")
    for split in written:  # an earlier, larger set's images: left, and listed by no annotation file now
        with open(paths[split], encoding="utf-8") as f:
            listed = {image["file_name"] for image in json.load(f)["images"]}
        folder = os.path.join(args.output, split)
        stale = sorted(name for name in os.listdir(folder) if name not in listed)
        if stale:
            print(f"note: {folder} also holds {len(stale)} files of an earlier, larger {split} split "
                  f"({', '.join(stale[:3])}{', ...' if len(stale) > 3 else ''}), which no annotation file lists "
                  "now: delete the folder first for a clean set")


if __name__ == "__main__":
    sys.exit(main())
