#!/usr/bin/env python
"""Export a trained detector to ONNX and check it with ONNX Runtime.

    python tools/export.py --config CFG --weights CKPT --output model.onnx [--no-check] [KEY=VALUE ...]

Needs the `export` extra (pip install -e '.[export]': onnx, onnxruntime). The file holds the
whole inference but the resize: inputs `image`, uint8 (1, 3, H, W) RGB already resized as the
model resizes (shorter side input.min_size_test, longer at most input.max_size_test, with
detection.resize; detection.export.prepare_image does it), and `original_size`, int64 (2,),
the (height, width) before resizing; outputs `boxes` (D, 4) XYXY in the original image's
pixels, `scores` (D,), `labels` (D,) in 1..K. Height and width are dynamic.

The plain path is exported (model.fast_path's gather pooling has no ONNX op; RoIAlign is
ONNX's RoiAlign, NMS its NonMaxSuppression, as torchvision exports its Faster R-CNN), in
float32, without test-time augmentation (test.aug). Box refinement and multi-scale testing
cannot be exported.

Unless --no-check, ONNX Runtime then runs the file on two synthetic images whose resized sizes
differ from the traced one, and its detections are compared with PyTorch's (boxes within
0.01 px, scores within 1e-4, the same labels); a difference exits with status 1.
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

from detection.cli import add_config_args, config_from_args, fail, override_keys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    parser.add_argument("--weights", required=True, metavar="CKPT", help="detector checkpoint")
    parser.add_argument("--output", required=True, metavar="FILE", help="the ONNX file to write (model.onnx)")
    parser.add_argument("--no-check", action="store_true", help="skip the comparison with ONNX Runtime")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = config_from_args(args)
    try:
        return run(cfg, args)
    except ImportError as err:
        fail(f"{err.name or err}: not installed; ONNX export needs the export extra: pip install -e '.[export]'")
    except ValueError as err:  # bad weights or a setting that cannot be exported: one clear line
        fail(str(err))


def run(cfg, args: argparse.Namespace) -> int:
    import onnx  # noqa: F401  (the export extra: fail before the slow work)
    import torch

    from detection.engine.loading import build_inference_model
    from detection.export import export_onnx

    if not Path(args.weights).expanduser().exists():
        raise ValueError(f"{args.weights}: --weights file not found")
    cfg = copy.deepcopy(cfg)
    if cfg.model.fast_path or cfg.test.aug.enabled:
        print("exporting the plain path (model.fast_path: gather pooling has no ONNX op; same detections)"
              f"{' without test-time augmentation (test.aug)' if cfg.test.aug.enabled else ''}")
    cfg.model.fast_path, cfg.test.aug.enabled = False, False
    model, _ = build_inference_model(cfg, args.weights, torch.device("cpu"), override_keys(args))
    if getattr(model, "amp", False):
        print("exporting in float32 (test.amp is a PyTorch autocast setting)")
        model.amp = False
    path = export_onnx(model, args.output)
    print(f"wrote {path} (inputs: image uint8 (1, 3, H, W) resized to shorter side {model.min_size_test}, "
          f"longer at most {model.max_size_test}; original_size int64 (2,))")
    if args.no_check:
        return 0
    return 0 if _check(model, path) else 1


def _check(model, path: Path) -> bool:
    """ONNX Runtime against PyTorch on two synthetic images of sizes other than the traced one."""
    import torch

    from detection.export import check_with_onnxruntime

    side = model.min_size_test
    generator = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=generator)
              for h, w in ((side, side * 3 // 2), (side * 5 // 4, side))]
    ok = True
    for result in check_with_onnxruntime(model, path, images):
        ok &= result["equal"]
        print(f"onnxruntime vs pytorch at {result['model_size'][0]}x{result['model_size'][1]}: "
              f"{result['other_detections']} / {result['detections']} detections, "
              + (f"labels equal, max box diff {result['max_box_diff_px']:.2e} px, max score diff "
                 f"{result['max_score_diff']:.2e}" if result["same_labels"] else "counts or labels DIFFER")
              + f": {'equal' if result['equal'] else 'NOT EQUAL'}")
    return ok


if __name__ == "__main__":
    sys.exit(main())
