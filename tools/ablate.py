#!/usr/bin/env python
"""The paper's Table 9 for your checkpoint: the Appendix B improvements added one by one.

    python tools/ablate.py --config configs/shapes_r18.yaml --weights output/shapes_r18/model_final.pth \\
        --context-weights output/shapes_r18_context/model_final.pth

Evaluates on the config's test sets (the first one is tabulated) Table 9's cumulative rows, in
the paper's order, each adding one improvement to the row above: baseline; + box refinement
(test.box_refinement); + context (a second checkpoint, trained with
model.roi_heads.global_context, --context-weights; box refinement still on); + multi-scale
testing (test.multi_scale; all three on). The paper's numbers (COCO 2014 val, ResNet-101) are
printed beside them. Then, apart and labelled as not in Table 9: context alone, multi-scale
testing alone, and box refinement + multi-scale testing without context. Rows that need the
context checkpoint are left out without it. Test-time augmentation (test.aug, Detectron2's) is
off in every row unless --tta: the paper's rows have none.

Prints and writes DIR/ablation.md and DIR/ablation.json (AP, AP50, AP75 and the model's median
seconds per image: the forward pass only, not reading images or scoring), with each row's
evaluation files in DIR/<row>/. DIR defaults to <folder of --weights>/ablation; a folder
holding another checkpoint's ablation is not overwritten without --overwrite.

ablation.json is written after each row, and a run into a folder that holds rows of the same
checkpoint (the same file, size and modification time) with the same settings (each row's whole
config and --tta) and the same code (this toolkit's sources, torch's and torchvision's versions) keeps them instead of evaluating them again: an interrupted ablation goes on
where it stopped, and --context-weights added to a finished one evaluates only the context rows
(a kept row's seconds per image are from the run that measured it). --overwrite evaluates every
row again.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from detection.cli import add_config_args, config_from_args, override_keys, parse_command_line, run_tool
from detection.config import ConfigError
from detection.study.ablation import METRICS, AblationRow, format_table, row_config, run_ablation, select_rows
from detection.utils.environment import code_version
from detection.utils.files import OutputFolderError, atomic_write

if TYPE_CHECKING:
    import torch

    from detection.config import Config


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    parser.add_argument("--weights", required=True, metavar="CKPT", help="the baseline detector")
    parser.add_argument("--context-weights", metavar="CKPT",
                        help="the same recipe trained with model.roi_heads.global_context=true")
    parser.add_argument("--output-dir", metavar="DIR", help="default: <folder of --weights>/ablation")
    parser.add_argument("--tta", action="store_true", help="keep the config's test.aug in every row")
    parser.add_argument("--overwrite", action="store_true", help="replace another checkpoint's ablation in DIR")
    return parse_command_line(parser, argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_tool(lambda: run(config_from_args(args), args),
                    interrupted="interrupted: the rows done are in the folder's ablation.json; the same command "
                                "goes on from there")


def run(cfg: Config, args: argparse.Namespace) -> int:
    from detection.data.catalog import get_datasets
    from detection.utils.comm import select_device

    if not cfg.datasets.test:  # an IndexError after the folder was made
        raise ConfigError("datasets.test is empty: nothing to ablate on; give the test set, e.g. "
                          "'datasets.test=[shapes_val]'")
    out = Path(args.output_dir) if args.output_dir else Path(args.weights).expanduser().parent / "ablation"
    sources = {"weights": _resolved(args.weights), "context_weights": _resolved(args.context_weights)}
    earlier = _check_folder(out, sources, args.overwrite)
    check_context(args.weights, args.context_weights)  # before hours of rows, not at the first context row
    if args.tta and not cfg.test.aug.enabled:
        print("--tta: the config has no test-time augmentation (test.aug.enabled: false): the rows run without it")
        args.tta = False
    rows = select_rows(bool(args.context_weights))
    device = select_device(cfg.device, cfg.tf32)
    keys = {row.name: row_key(row_config(cfg, row, args.tta), args.context_weights if row.global_context
                              else args.weights, args.tta, str(device)) for row in rows}
    kept = {r["row"]: r for r in earlier if isinstance(r, dict) and r.get("row") in keys
            and r.get("key") == keys[r["row"]]}
    _prepare_folder(out, keep=[_slug(name) for name in kept])
    datasets = get_datasets(cfg.datasets.test, cfg.datasets.root, skip_bad_images=cfg.dataloader.skip_bad_images,
                            exif_orientation=cfg.input.exif_orientation)
    print(f"ablation of {args.weights} on {datasets[0].name} ({len(datasets[0].records)} images); "
          f"results go to {out}")
    explicit = override_keys(args)

    if kept:
        print(f"kept from the earlier run in {out} (the same checkpoint and settings; --overwrite evaluates them "
              f"again): {', '.join(kept)}")
    done: list[dict] = []

    def evaluate(row: AblationRow) -> dict:
        if row.name in kept:
            return {key: value for key, value in kept[row.name].items() if key in KEPT_FIELDS}
        weights = args.context_weights if row.global_context else args.weights
        return {"weights": weights, "key": keys[row.name],
                **evaluate_row(row_config(cfg, row, args.tta), weights, datasets, device, out / _slug(row.name),
                               explicit)}

    def finished(result: dict) -> None:
        _print_row(result, kept=result["row"] in kept)
        done.append(result)
        _save_rows(out, sources, datasets[0].name, args.tta, done, complete=len(done) == len(rows))

    results = run_ablation(rows, evaluate, finished)
    table = format_table(results, cfg, datasets[0].name, args.tta)
    if kept:
        table += (f"\n\nKept from an earlier run into this folder (the same checkpoint and settings; their s / image "
                  f"were measured then): {', '.join(kept)}.")
    print("\n" + table)
    with atomic_write(out / "ablation.md") as f:  # a kill while writing leaves the previous table
        f.write(table + "\n")
    print(f"written: {out / 'ablation.md'}, {out / 'ablation.json'}")
    return 0


# what a row keeps from an earlier run: its measurement, the checkpoint and the key it was made with
KEPT_FIELDS = ("weights", "key", *METRICS, "seconds_per_image")


def row_key(cfg: Config, weights: str, tta: bool, device: str) -> str:
    """What a row's numbers depend on, as one hash: the row's whole config (its switches, the
    test sets, every test setting), the device it runs on (the config's `auto` resolved), the
    checkpoint file (absolute path, size, modification time), --tta, this toolkit's code
    (`code_version`) and the torch and torchvision versions. A saved row with the same key is
    kept (the images and annotations are not in it: --overwrite after changing them)."""
    import hashlib

    import torch
    import torchvision

    from detection.config import dump_config

    stat = Path(weights).expanduser().stat()
    identity = {"config": dump_config(cfg), "tta": tta, "device": device,
                "weights": str(Path(weights).expanduser().resolve()),
                "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "code": code_version(),
                "torch": torch.__version__, "torchvision": torchvision.__version__}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode("utf-8")).hexdigest()


def _save_rows(out: Path, sources: dict, test_set: str, tta: bool, rows: list[dict], complete: bool) -> None:
    """ablation.json after each row (`complete` once the last is in): a later run keeps them."""
    with atomic_write(out / "ablation.json") as f:
        f.write(json.dumps({"sources": sources, "test_set": test_set, "tta": tta, "complete": complete,
                            "rows": rows}, indent=2) + "\n")


def check_context(weights: str, context_weights: str | None) -> None:
    """--weights must be a checkpoint trained without global context (the baseline and the
    rows without it) and --context-weights one trained with it: each the wrong way round is one
    error saying which file goes where (the loader's own advice, to set
    model.roi_heads.global_context, cannot help here: each row sets it)."""
    from detection.engine.loading import trained_with_global_context

    if trained_with_global_context(weights):
        raise ConfigError(f"--weights {weights} was trained with global context; the table's baseline is the model "
                          "without it: give a checkpoint trained without global context as --weights (and this "
                          "one as --context-weights)")
    if context_weights and trained_with_global_context(context_weights) is False:
        raise ConfigError(f"--context-weights {context_weights} was trained without global context: give a "
                          "checkpoint trained with model.roi_heads.global_context=true")


def _print_row(row: dict, kept: bool = False) -> None:
    print(f"{row['row']} ({row['group']}): " + ", ".join(f"{k} {row[k]:.2f}" for k in METRICS)
          + f", {row['seconds_per_image']:.3f} s/image" + (" (kept)" if kept else ""))


def _resolved(path: str | None) -> str | None:
    from backbones.errors import WeightsError

    if path is None:
        return None
    resolved = Path(path).expanduser()
    if not resolved.is_file():
        raise WeightsError(f"{path}: weights file not found")
    return str(resolved.resolve())


def _check_folder(out: Path, sources: dict, overwrite: bool) -> list:
    """The rows an earlier run saved in `out` (none with --overwrite). A folder holding another
    checkpoint's ablation, or the context rows of another context checkpoint than this run's
    (or than none), is refused: this run would replace rows it cannot make again."""
    saved = out / "ablation.json"
    if not saved.is_file() or overwrite:
        return []
    try:
        data = json.loads(saved.read_text(encoding="utf-8"))
        theirs = data.get("sources")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        data, theirs = {}, None
    if not isinstance(theirs, dict) or theirs.get("weights") != sources["weights"] or \
            theirs.get("context_weights") not in (None, sources["context_weights"]):
        raise OutputFolderError(f"{out}: holds the ablation of {_describe(theirs)}; pass --output-dir for a new "
                                "folder or --overwrite to replace it (it is run again whole)")
    rows = data.get("rows")
    return rows if isinstance(rows, list) else []


def _describe(sources: dict | None) -> str:
    """ablation.json's sources as a user gave them: the checkpoints, and the context model or none."""
    if not isinstance(sources, dict):
        return "an unreadable ablation.json"
    context = sources.get("context_weights")
    return f"{sources.get('weights')} " + (f"with --context-weights {context}" if context else
                                           "without --context-weights")


def _prepare_folder(out: Path, keep: list[str]) -> None:
    """Create `out`; a folder holding an earlier ablation (the same sources, or replaced with
    --overwrite) loses its row folders first but those of the rows kept (`keep`, folder names),
    so none of another run's rows stays beside the table."""
    import shutil

    from detection.study.ablation import ROWS

    if (out / "ablation.json").is_file():
        for row in ROWS:
            if _slug(row.name) not in keep and (out / _slug(row.name)).is_dir():
                shutil.rmtree(out / _slug(row.name))
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # a file in the way, read-only, a name too long
        raise OutputFolderError(f"{out}: cannot create the ablation's folder ({err.strerror or err}); "
                                "--output-dir DIR gives another") from None


def evaluate_row(cfg: Config, weights: str, datasets: list, device: torch.device, where: Path,
                 explicit: list[str]) -> dict:
    """One row of the table: the model of `cfg` (the row's switches set) with `weights`,
    evaluated on the test sets (results under `where`) -> the first set's AP, AP50, AP75 and
    the median seconds per image."""
    from detection.benchmarking.models import TimedModel
    from detection.engine.inference_model import build_inference_model
    from detection.evaluation import evaluate_test_sets
    from detection.evaluation.classes import model_class_names

    model, loaded = build_inference_model(cfg, weights, device, explicit)
    timed = TimedModel(model)
    # scored by class name, as eval.py scores (a test set listing the classes in another order)
    names, _ = model_class_names(loaded, cfg.model.class_names)
    metrics = evaluate_test_sets(datasets, model=timed, num_workers=cfg.dataloader.num_workers,
                                 output_dir=where, model_classes=names, coco_max_dets=cfg.test.coco_max_dets)
    first = metrics[datasets[0].name]
    return {**{key: first.get(key, float("nan")) for key in METRICS},
            "seconds_per_image": timed.median_seconds_per_image()}


def _slug(name: str) -> str:
    return "_".join(part for part in "".join(c if c.isalnum() else " " for c in name).split()) or "row"


if __name__ == "__main__":
    sys.exit(main())
