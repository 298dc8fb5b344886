#!/usr/bin/env python
"""Cut a data set's images into tiles for training (SAHI's slice_coco): large images of small
objects (aerial photos, slides) shrunk to input.min_size_train shrink their objects; tiles keep
them at their size. The tiles are those test.tiles cuts at test time (the same rule), so train on
these with test.tiles.size set to the same size.

    python tools/make_tiles.py --config CFG --dataset NAME --size 800 --overlap 0.25 --output data/aerial_tiles
    # then: datasets.train='[{type: coco, ann_file: data/aerial_tiles/annotations.json,
    #                         image_root: data/aerial_tiles/images}]' and test.tiles.size=800

--dataset is a data set the config can read (a known name, the name of one of its datasets.train
or datasets.test, or an entry as YAML, as visualize.py takes it); default: the first of
datasets.train. OUTPUT, a new or empty folder, gets images/<NNNNNN>_<stem>_x<X>_y<Y>.<ext> (each
tile, upright as training reads the image; NNNNNN the image's place in the set) and
annotations.json (COCO: the set's category ids and names; each image also names its "source" image
and the tile's "offset"). An object is kept in a tile when at least --min-visible (0.5) of its box
is inside, clipped to it; VOC `difficult` objects are objects when dataloader.use_difficult (the
default), else "iscrowd": 1 (neither trained nor scored); a COCO source's crowd and `ignore`
regions go to the tiles they overlap, as they were. --skip-empty leaves out tiles without
objects (dataloader.filter_empty drops them from training anyway; a test set keeps them).
"""
from __future__ import annotations

import argparse
import sys

from detection.cli import add_config_args, config_from_args, dataset_entry, parse_command_line, run_tool


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    parser.add_argument("--dataset", help="the data set to cut (default: the config's first training set)")
    parser.add_argument("--size", type=int, required=True, metavar="PX", help="a tile's side in pixels")
    parser.add_argument("--overlap", type=float, default=0.25, help="neighbouring tiles' overlap, a fraction of a tile")
    parser.add_argument("--min-visible", type=float, default=0.5,
                        help="keep an object in a tile when at least this fraction of its box is inside")
    parser.add_argument("--skip-empty", action="store_true", help="leave out the tiles without objects")
    parser.add_argument("--output", required=True, metavar="DIR", help="folder for images/ and annotations.json")
    args = parse_command_line(parser, argv)
    if not args.config:
        parser.error("--config is required (the config that reads the data set)")
    if args.size <= 0:
        parser.error("--size is a tile's side in pixels: give a positive number")
    if not 0 <= args.overlap < 1:
        parser.error(f"--overlap {args.overlap}: a fraction of a tile in [0, 1)")
    if not 0 < args.min_visible <= 1:
        parser.error(f"--min-visible {args.min_visible}: a fraction of an object's box in (0, 1]")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_tool(lambda: cut(args))


def cut(args: argparse.Namespace) -> None:
    import os
    from pathlib import Path

    from detection.config import ConfigError
    from detection.data.catalog import get_dataset
    from detection.data.image_io import read_image
    from detection.data.tiling import write_tiled_dataset
    from detection.utils.files import OutputFolderError
    from detection.utils.progress import ProgressLines
    from detection.visualization.draw import read_crowd_regions, write_drawing

    cfg = config_from_args(args)
    configured = [*cfg.datasets.train, *cfg.datasets.test]
    if not args.dataset and not cfg.datasets.train:
        raise ConfigError("--dataset is not given and datasets.train is empty: name the data set to cut")
    entry = dataset_entry(args.dataset, configured) if args.dataset else cfg.datasets.train[0]
    dataset = get_dataset(entry, cfg.datasets.root, skip_bad_images=False, check_images=True,
                          exif_orientation=cfg.input.exif_orientation)
    output = Path(args.output).expanduser()
    sources = {os.path.realpath(os.path.dirname(r["file_name"])) for r in dataset.records}
    if os.path.realpath(output / "images") in sources or (
            dataset.ann_file and os.path.realpath(output / "annotations.json") == os.path.realpath(dataset.ann_file)):
        raise OutputFolderError(f"--output {args.output}: it holds the data set's own images or annotations.json, "
                                "which the tiles' would replace: give another folder")
    if (output / "annotations.json").exists() or any((output / "images").glob("*")):
        raise OutputFolderError(f"--output {args.output}: already holds a tiled set (annotations.json, images/): give "
                                "a new or empty folder (an earlier --size's tiles would stay among the new ones)")
    regions = read_crowd_regions(dataset.ann_file, dataset.label_to_category_id) \
        if dataset.kind == "coco" and dataset.ann_file else None
    progress = ProgressLines("make_tiles", len(dataset.records), say=lambda line: print(line, flush=True))
    counts = write_tiled_dataset(dataset, output, args.size, args.overlap, args.min_visible,
                                 read=lambda path: read_image(path, exif_orientation=cfg.input.exif_orientation),
                                 write=write_drawing, skip_empty=args.skip_empty, progress=progress.step,
                                 use_difficult=cfg.dataloader.use_difficult, regions=regions)
    left_out = counts["objects_left_out"]
    images = f"{counts['images']} image{'' if counts['images'] == 1 else 's'}"
    objects = f"{counts['objects']} object{'' if counts['objects'] == 1 else 's'}"
    print(f"wrote {counts['tiles']} tiles of {images} of {dataset.name} to {output / 'images'} and "
          f"{output / 'annotations.json'} ({args.size} px, overlap {args.overlap:g}; {objects}"
          + (f", {left_out} of them in no tile by at least {args.min_visible:g} of their box (larger than a tile's "
             "overlap, or cut on every side: raise --size or --overlap), left out" if left_out else "") + ")")


if __name__ == "__main__":
    sys.exit(main())
