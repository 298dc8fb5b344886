#!/usr/bin/env python
"""Export a trained detector to ONNX and check it with ONNX Runtime.

    python tools/export.py --config CFG --weights CKPT --output model.onnx [--check-images IMG ...]
                           [--no-check] [KEY=VALUE ...]

Needs the `export` extra (pip install -e '.[export]': onnx, onnxruntime). The file holds the
whole inference but the resize: inputs `image`, uint8 (1, 3, H, W) RGB already resized as the
model resizes (shorter side input.min_size_test, longer at most input.max_size_test, with
detection.modeling.resize; detection.export.preprocess.preprocess does it), and `original_size`, int64 (2,),
the (height, width) before resizing; outputs `boxes` (D, 4) XYXY in the original image's
pixels, `scores` (D,), `labels` (D,) in 1..K. Height and width are dynamic. The file's
metadata_props carry what a runtime needs (test sizes, resize mode, channel order, mean / std,
size divisibility, class names, thresholds); detection.export.preprocess.preprocess reads them.

The plain path is exported (model.fast_path's gather pooling has no ONNX op; RoIAlign is
ONNX's RoiAlign, NMS its NonMaxSuppression, as torchvision exports its Faster R-CNN), in
float32, without test-time augmentation (test.aug). Box refinement and multi-scale testing
cannot be exported.

Unless --no-check, ONNX Runtime then runs the file, fed from its own metadata, on the
--check-images (default: two synthetic images whose resized sizes differ from the traced one),
and its detections are compared with PyTorch's (boxes within 0.01 px, scores within 1e-4, the
same labels); a difference exits with status 1, and so does a check that compared nothing (no
detection on any image: a trained model finds none on noise; give photos with objects). The file
is checked under a temporary name beside --output and put in place only when the check passed: a
failed or interrupted check leaves the previous file as it was.
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from detection.cli import add_config_args, config_from_args, fail, override_keys, parse_command_line, run_tool

if TYPE_CHECKING:
    from detection.modeling.model import FasterRCNN


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    parser.add_argument("--weights", required=True, metavar="CKPT", help="detector checkpoint")
    parser.add_argument("--output", required=True, metavar="FILE", help="the ONNX file to write (model.onnx)")
    parser.add_argument("--check-images", nargs="+", metavar="IMG",
                        help="image files to compare ONNX Runtime with PyTorch on (photos with objects; "
                             "default: two synthetic images)")
    parser.add_argument("--no-check", action="store_true", help="skip the comparison with ONNX Runtime")
    args = parse_command_line(parser, argv)
    if args.check_images:  # KEY=VALUE overrides typed after the images: --check-images took them too
        moved = [item for item in args.check_images if "=" in item and not Path(item).is_file()]
        args.check_images = [item for item in args.check_images if item not in moved]
        args.overrides = [*args.overrides, *moved]
        if not args.check_images:
            parser.error("--check-images: give at least one image file")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_tool(lambda: export(args))


def export(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    try:
        return run(cfg, args)
    except ImportError as err:
        fail(f"{err.name or err}: not installed; ONNX export needs the export extra: pip install -e '.[export]'")


def run(cfg, args: argparse.Namespace) -> int:
    import onnx  # noqa: F401  (the export extra: fail before the slow work)
    import torch

    from backbones.errors import WeightsError
    from detection.engine.inference_model import build_inference_model
    from detection.export.onnx import export_onnx
    from detection.utils.files import WriteError

    if not Path(args.weights).expanduser().exists():
        raise WeightsError(f"{args.weights}: --weights file not found")
    if Path(args.output).expanduser().resolve() == Path(args.weights).expanduser().resolve():
        raise WeightsError(f"--output {args.output} is the --weights file: the ONNX file would replace the "
                           "checkpoint; give another --output (model.onnx)")
    # the images to check with are read first: a typo in one is said before the minutes of export
    images = _read_images(args.check_images, cfg.input.exif_orientation) if args.check_images and \
        not args.no_check else None
    cfg = copy.deepcopy(cfg)
    if cfg.model.fast_path or cfg.test.aug.enabled:
        print("exporting the plain path (model.fast_path: gather pooling has no ONNX op; same detections)"
              f"{' without test-time augmentation (test.aug)' if cfg.test.aug.enabled else ''}")
    cfg.model.fast_path, cfg.test.aug.enabled = False, False
    if cfg.test.tiles.size:
        print(f"exporting the detector without tiles (test.tiles.size {cfg.test.tiles.size}): the file runs on a whole "
              "image; cut large images into tiles yourself (detection.utils.tiling.tile_windows says where)")
        cfg.test.tiles.size = 0
    model, _ = build_inference_model(cfg, args.weights, torch.device("cpu"), override_keys(args))
    if getattr(model, "amp", False):
        print("exporting in float32 (test.amp is a PyTorch autocast setting)")
        model.amp = False
    target = Path(args.output).expanduser()
    # checked under a temporary name beside it, put in place only once the check passed: a failed
    # or interrupted check left an unchecked file where the previous (checked) one was
    staged = target if args.no_check else target.with_name(f".{target.name}.unchecked")
    try:
        export_onnx(model, staged, exif_orientation=cfg.input.exif_orientation)
        if not args.no_check and not check(model, staged, images):
            # on stderr as every tool's error (a script reading it saw no reason: the lines were on stdout)
            print(f"error: {target} not written: the check above failed (--no-check writes the file without it)",
                  file=sys.stderr)
            return 1
        try:
            staged.replace(target)
        except OSError as err:  # e.g. --output names a folder: one line, as atomic_write's errors
            raise WriteError(f"could not write {target} ({err.strerror or err}); the checked file is not kept",
                             err.errno, err.strerror) from None
    finally:
        if staged != target:
            staged.unlink(missing_ok=True)
    print(f"wrote {target} (inputs: image uint8 (1, 3, H, W) RGB resized to shorter side {model.min_size_test}, "
          f"longer at most {model.max_size_test}, resize_mode {model.resize_mode}; original_size int64 (2,); "
          "all in the file's metadata_props: detection.export.preprocess.preprocess reads them)")
    return 0


def _read_images(paths: list[str], exif_orientation: bool) -> list:
    """--check-images as uint8 RGB (3, H, W) tensors, turned as the config's tools turn photos."""
    import torch

    from detection.data import DataError
    from detection.data.image_io import read_image

    for name in paths:
        if not Path(name).is_file():
            raise DataError(f"--check-images {name}: not an image file")
    return [torch.from_numpy(read_image(name, exif_orientation=exif_orientation)).permute(2, 0, 1)
            for name in paths]  # (H, W, 3) -> (3, H, W)


def check(model: FasterRCNN, path: Path, images: list | None = None) -> bool:
    """ONNX Runtime against PyTorch on `images` (default: two synthetic images of sizes other
    than the traced one). False if any differs, or if no image gave a detection to compare."""
    import torch

    from detection.export.onnx import check_with_onnxruntime

    if images is None:
        side = model.min_size_test
        generator = torch.Generator().manual_seed(0)
        images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=generator)
                  for h, w in ((side, side * 3 // 2), (side * 5 // 4, side))]
    results = check_with_onnxruntime(model, path, images)
    ok = _print_check(results)
    if not any(r["detections"] or r["other_detections"] for r in results):
        print(f"the check compared nothing: neither PyTorch nor ONNX Runtime found a detection (score above "
              f"{model.roi_heads.score_thresh_test}) on the {len(images)} check images; "
              "give photos with objects: --check-images IMG [IMG ...]", file=sys.stderr)
        return False
    return ok


def _print_check(results: list[dict]) -> bool:
    ok = True
    for result in results:
        ok &= result["equal"]
        where = f"onnxruntime vs pytorch at {result['model_size'][0]}x{result['model_size'][1]}: "
        if not result["detections"] and not result["other_detections"]:
            print(f"{where}0 / 0 detections: nothing compared")
            continue
        print(f"{where}{result['other_detections']} / {result['detections']} detections, "
              + (f"labels equal, max box diff {result['max_box_diff_px']:.2e} px, max score diff "
                 f"{result['max_score_diff']:.2e}" if result["same_labels"] else "counts or labels DIFFER")
              + f": {'equal' if result['equal'] else 'NOT EQUAL'}")
    return ok


if __name__ == "__main__":
    sys.exit(main())
