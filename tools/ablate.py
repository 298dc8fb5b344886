#!/usr/bin/env python
"""The paper's Table 9 for your checkpoint: each Appendix B improvement off and on.

    python tools/ablate.py --config configs/shapes_r18.yaml --weights output/shapes_r18/model_final.pth \\
        --context-weights output/shapes_r18_context/model_final.pth

Evaluates the same checkpoint on the config's test sets (the first one is tabulated) with:
baseline; + box refinement (test.box_refinement); + global context (a second checkpoint,
trained with model.roi_heads.global_context, --context-weights); + multi-scale testing
(test.multi_scale); the two test-time switches together; and all three. Rows that need the
context checkpoint are left out without it. Test-time augmentation (test.aug, Detectron2's)
is off in every row unless --tta: the paper's rows have none.

Prints and writes DIR/ablation.md and DIR/ablation.json (AP, AP50, AP75 and the model's median
seconds per image: the forward pass only, not reading images or scoring), with each row's
evaluation files in DIR/<row>/. DIR defaults to <folder of --weights>/ablation; a folder
holding another checkpoint's ablation is not overwritten without --overwrite.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from detection.cli import add_config_args, config_from_args, fail, override_keys

if TYPE_CHECKING:
    import torch

    from detection.config import Config

# name, box refinement, global context (the --context-weights checkpoint), multi-scale testing
ROWS = (("baseline", False, False, False),
        ("+ box refinement", True, False, False),
        ("+ global context", False, True, False),
        ("+ multi-scale testing", False, False, True),
        ("+ box refinement + multi-scale testing", True, False, True),
        ("all three", True, True, True))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    parser.add_argument("--weights", required=True, metavar="CKPT", help="the baseline detector")
    parser.add_argument("--context-weights", metavar="CKPT",
                        help="the same recipe trained with model.roi_heads.global_context=true")
    parser.add_argument("--output-dir", metavar="DIR", help="default: <folder of --weights>/ablation")
    parser.add_argument("--tta", action="store_true", help="keep the config's test.aug in every row")
    parser.add_argument("--overwrite", action="store_true", help="replace another checkpoint's ablation in DIR")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = config_from_args(args)
    try:
        return run(cfg, args)
    except ValueError as err:  # bad weights, data or folder: one clear line
        fail(str(err))


def run(cfg: Config, args: argparse.Namespace) -> int:
    from detection.data.catalog import get_datasets
    from detection.utils.comm import select_device

    out = Path(args.output_dir) if args.output_dir else Path(args.weights).expanduser().parent / "ablation"
    sources = {"weights": _resolved(args.weights), "context_weights": _resolved(args.context_weights)}
    _check_folder(out, sources, args.overwrite)
    device = select_device(cfg.device)
    datasets = get_datasets(cfg.datasets.test, cfg.datasets.root, skip_bad_images=cfg.dataloader.skip_bad_images,
                            exif_orientation=cfg.input.exif_orientation)
    print(f"ablation of {args.weights} on {datasets[0].name} ({len(datasets[0].records)} images); "
          f"results go to {out}")
    rows = []
    for name, refine, context, multi in select_rows(bool(args.context_weights)):
        row_cfg = _row_config(cfg, refine, context, multi, args.tta)
        weights = args.context_weights if context else args.weights
        rows.append({"row": name, "box_refinement": refine, "global_context": context, "multi_scale": multi,
                     "weights": weights, **_evaluate(row_cfg, weights, datasets, device, out / _slug(name),
                                                      override_keys(args))})
        print(f"{name}: " + ", ".join(f"{k} {rows[-1][k]:.2f}" for k in ("AP", "AP50", "AP75"))
              + f", {rows[-1]['seconds_per_image']:.3f} s/image")
    table = format_table(rows, cfg, datasets[0].name, args.tta)
    print("\n" + table)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ablation.md").write_text(table + "\n")
    (out / "ablation.json").write_text(json.dumps({"sources": sources, "test_set": datasets[0].name,
                                                   "tta": args.tta, "rows": rows}, indent=2) + "\n")
    print(f"written: {out / 'ablation.md'}, {out / 'ablation.json'}")
    return 0


def select_rows(have_context_weights: bool) -> list[tuple[str, bool, bool, bool]]:
    """The rows to evaluate: those with global context only with its checkpoint."""
    return [row for row in ROWS if have_context_weights or not row[2]]


def _resolved(path: str | None) -> str | None:
    if path is None:
        return None
    resolved = Path(path).expanduser()
    if not resolved.is_file():
        raise ValueError(f"{path}: weights file not found")
    return str(resolved.resolve())


def _check_folder(out: Path, sources: dict, overwrite: bool) -> None:
    saved = out / "ablation.json"
    if not saved.is_file() or overwrite:
        return
    try:
        theirs = json.loads(saved.read_text()).get("sources")
    except (json.JSONDecodeError, AttributeError):
        theirs = None
    if theirs != sources:
        raise ValueError(f"{out}: holds the ablation of {theirs or 'an unreadable ablation.json'}; pass "
                         "--output-dir for a new folder or --overwrite to replace it")


def _row_config(cfg: Config, refine: bool, context: bool, multi: bool, tta: bool) -> Config:
    row = copy.deepcopy(cfg)
    row.test.box_refinement.enabled = refine
    row.test.multi_scale.enabled = multi
    row.model.roi_heads.global_context = context
    if not tta:
        row.test.aug.enabled = False
    return row


def _evaluate(cfg: Config, weights: str, datasets: list, device: torch.device, where: Path,
              explicit: list[str]) -> dict:
    from detection.benchmarking.models import TimedModel
    from detection.engine.loading import build_inference_model
    from detection.evaluation import evaluate_test_sets

    model, _ = build_inference_model(cfg, weights, device, explicit)
    timed = TimedModel(model)
    metrics = evaluate_test_sets(datasets, model=timed, device=device, num_workers=cfg.dataloader.num_workers,
                                 output_dir=where)
    first = metrics[datasets[0].name]
    return {"AP": first.get("AP", float("nan")), "AP50": first.get("AP50", float("nan")),
            "AP75": first.get("AP75", float("nan")), "seconds_per_image": timed.median_seconds_per_image()}


def _slug(name: str) -> str:
    return "_".join(part for part in "".join(c if c.isalnum() else " " for c in name).split()) or "row"


def format_table(rows: list[dict], cfg: Config, test_set: str, tta: bool) -> str:
    """A markdown table like the paper's Table 9, with the settings that produced it."""
    lines = [f"Test set: {test_set}. Box refinement: NMS {cfg.test.box_refinement.nms_thresh}, voting "
             f"{'at IoU ' + str(cfg.test.box_refinement.voting_iou) if cfg.test.box_refinement.voting else 'off'}. "
             f"Multi-scale: sizes {cfg.test.multi_scale.sizes} (max {cfg.test.multi_scale.max_size}). "
             f"Test-time augmentation: {'as in the config' if tta else 'off'}.",
             "",
             "| | AP | AP50 | AP75 | s / image |",
             "|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['row']} | {row['AP']:.1f} | {row['AP50']:.1f} | {row['AP75']:.1f} | "
                     f"{row['seconds_per_image']:.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
