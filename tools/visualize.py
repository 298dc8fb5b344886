#!/usr/bin/env python
"""Draw detections (or a data set's annotations) on images.

    python tools/visualize.py --config CFG --weights CKPT --input PATH --output DIR [--score-thresh 0.5]
    python tools/visualize.py --config CFG --gt --output DIR [--limit 20]          # inspect a data set
    python tools/visualize.py --config CFG --weights CKPT --compare --output DIR    # ground truth | predictions

PATH is an image, a folder of images or a glob ("imgs/*.jpg"). With --gt / --compare the
images come from the config's first test data set (or --dataset NAME).
"""
from __future__ import annotations

import argparse
import glob
import sys
from pathlib import Path

from detection.cli import add_config_args, config_from_args, fail

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    parser.add_argument("--weights", metavar="CKPT", help="detector checkpoint")
    parser.add_argument("--input", metavar="PATH", help="image, folder or glob")
    parser.add_argument("--output", required=True, metavar="DIR", help="folder for the drawn images")
    parser.add_argument("--score-thresh", type=float, default=0.5, help="draw detections at least this score")
    parser.add_argument("--gt", action="store_true", help="draw a data set's annotations, no model")
    parser.add_argument("--compare", action="store_true", help="ground truth and predictions side by side")
    parser.add_argument("--dataset", help="data set for --gt/--compare (default: the first test set)")
    parser.add_argument("--limit", type=int, default=0, help="at most this many images (0 = all)")
    args = parser.parse_args(argv)
    if not args.gt and not args.weights:
        parser.error("--weights is required unless --gt is given")
    if not (args.gt or args.compare) and not args.input:
        parser.error("--input is required unless --gt or --compare is given")
    return args


def find_images(pattern: str) -> list[Path]:
    """An image file, every image in a folder (sorted), or the images a glob matches."""
    path = Path(pattern)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTS)
    elif path.is_file():
        files = [path]
    else:
        files = sorted(Path(p) for p in glob.glob(pattern) if Path(p).suffix.lower() in IMAGE_EXTS)
    if not files:
        raise ValueError(f"--input {pattern}: no images found (expected an image, a folder or a glob)")
    return files


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = config_from_args(args)
    try:
        count = run(cfg, args)
    except ValueError as err:
        fail(str(err))
    print(f"wrote {count} images to {args.output}")
    return 0


def run(cfg, args: argparse.Namespace) -> int:
    import cv2
    import torch

    from detection.data.image_io import read_image
    from detection.engine.distributed import select_device
    from detection.visualize import draw_detections, side_by_side

    device = select_device(cfg.device)
    model, weights = None, None
    if args.weights:  # read once: the weights and the class names training saved with them
        from detection.engine.loading import build_inference_model

        model, weights = build_inference_model(cfg, args.weights, device)
    items, class_names = _inputs(cfg, args, weights)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    for i, (path, record) in enumerate(items):
        image = read_image(path)
        panels = []
        if record is not None and (args.gt or args.compare):
            panels.append(draw_detections(image, record["boxes"], record["labels"], None, class_names, 0.0))
        if model is not None and not args.gt:
            with torch.inference_mode():
                pred = model([torch.from_numpy(image).permute(2, 0, 1).to(device)])[0]
            panels.append(draw_detections(image, pred["boxes"].cpu().numpy(), pred["labels"].cpu().numpy(),
                                          pred["scores"].cpu().numpy(), class_names, args.score_thresh))
        canvas = panels[0] if len(panels) == 1 else side_by_side(panels[0], panels[1],
                                                                  ("ground truth", "predictions"))
        name = f"{i:05d}_{Path(path).stem}.jpg" if args.gt or args.compare else f"{Path(path).stem}.jpg"
        cv2.imwrite(str(out / name), cv2.cvtColor(canvas, cv2.COLOR_RGB2BGR))
    return len(items)


def _inputs(cfg, args: argparse.Namespace, weights):
    """(image path, record or None) pairs and the class names to print."""
    from detection.data.catalog import get_dataset

    if args.gt or args.compare:
        entry = args.dataset or cfg.datasets.test[0]
        dataset = get_dataset(entry, cfg.datasets.root, skip_bad_images=cfg.dataloader.skip_bad_images)
        records = dataset.records[: args.limit or None]
        return [(r["file_name"], r) for r in records], dataset.class_names
    files = find_images(args.input)[: args.limit or None]
    return [(str(f), None) for f in files], _class_names(cfg, weights)


def _class_names(cfg, weights) -> list[str]:
    """Names saved in the checkpoint by training, else the config's model.class_names, else
    those of the first test data set when it can be read, else "class 1".."class K"."""
    from detection.data.catalog import get_dataset

    names = (weights.class_names if weights is not None else None) or cfg.model.class_names
    if names:
        return list(names)
    try:
        return get_dataset(cfg.datasets.test[0], cfg.datasets.root).class_names
    except (ValueError, IndexError, OSError):
        return [f"class {i}" for i in range(1, cfg.model.num_classes + 1)]


if __name__ == "__main__":
    sys.exit(main())
