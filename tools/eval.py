#!/usr/bin/env python
"""Evaluate a trained detector on the config's test data sets.

    python tools/eval.py --config configs/voc_r101.yaml --weights output/voc_r101/model_final.pth
    python tools/eval.py --config configs/coco_r101.yaml --results coco_results.json

COCO-type data sets (COCO, custom COCO json, shapes) are scored with pycocotools'
COCOeval; VOC-type data sets exactly as the official devkit (11-point metric for
VOC2007, area under the curve for VOC2010+), plus COCO-style AP@[.5:.95].
Writes metrics.json (and the results files) to OUTPUT_DIR/inference/<data set>.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from detection.cli import add_config_args, config_from_args, fail


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    parser.add_argument("--weights", metavar="CKPT", help="detector checkpoint (model_final.pth or last.pth)")
    parser.add_argument("--results", metavar="PATH",
                        help="evaluate saved results instead of running a model: a coco_results.json "
                             "(COCO-type) or a folder of comp4_det_test_*.txt files (VOC-type)")
    parser.add_argument("--output-dir", help="default: <output_dir>/inference")
    args = parser.parse_args(argv)
    if not args.weights and not args.results:
        parser.error("one of --weights or --results is required")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = config_from_args(args)
    try:
        return run(cfg, args)
    except ValueError as err:  # bad data, weights or results file: one clear line
        fail(str(err))


def run(cfg, args: argparse.Namespace) -> int:
    from detection.data.catalog import get_dataset
    from detection.evaluation import build_evaluator, format_metrics_table
    from detection.evaluation import inference_on_dataset, save_metrics_json
    from detection.data.loader import build_test_loader
    from detection.engine.loading import build_inference_model
    from detection.engine.distributed import select_device

    out_root = Path(args.output_dir or Path(cfg.output_dir) / "inference")
    device = select_device(cfg.device)
    model = None if args.results else build_inference_model(cfg, args.weights, device)[0]
    if model is not None and cfg.test.aug.enabled:
        aug = cfg.test.aug
        print(f"test-time augmentation (test.aug): sizes {aug.min_sizes}, max {aug.max_size}"
              f"{', each also mirrored' if aug.flip else ''}")
    for entry in cfg.datasets.test:
        dataset = get_dataset(entry, cfg.datasets.root, skip_bad_images=cfg.dataloader.skip_bad_images)
        out_dir = out_root / dataset.name if len(cfg.datasets.test) > 1 else out_root
        out_dir.mkdir(parents=True, exist_ok=True)
        if args.results:
            evaluator = build_evaluator(dataset, None)
            evaluator.load_results(args.results)
            metrics = evaluator.evaluate()
        else:
            evaluator = build_evaluator(dataset, str(out_dir))
            loader = build_test_loader(dataset, num_workers=cfg.dataloader.num_workers)
            metrics = inference_on_dataset(model, loader, evaluator, device=device)
        print(f"\n{dataset.name} ({len(dataset.records)} images)")
        print(format_metrics_table(metrics))
        save_metrics_json(metrics, out_dir / "metrics.json")
        _plot_pr(evaluator, out_dir)
        print(f"metrics written to {out_dir / 'metrics.json'}")
    return 0


def _plot_pr(evaluator, out_dir: Path) -> None:
    """Per-class precision-recall curves, when matplotlib (the `plots` extra) is installed."""
    curves = getattr(evaluator, "pr_curves", None)
    if not curves:
        return
    try:
        from detection.plots import plot_pr_curves

        plot_pr_curves(curves, out_dir / "pr_curves.png")
    except ImportError as err:
        print(f"note: no PR plot ({err})")


if __name__ == "__main__":
    sys.exit(main())
