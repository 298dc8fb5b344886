#!/usr/bin/env python
"""Evaluate a trained detector on the config's test data sets.

    python tools/eval.py --config configs/voc_r101.yaml --weights output/voc_r101/model_final.pth
    python tools/eval.py --config configs/coco_r101.yaml --results output/coco_r101/inference
    torchrun --nproc_per_node 8 tools/eval.py --weights output/coco_r101/model_final.pth   # 8 GPUs

Under torchrun each process runs its share of the images and the first scores them all and
writes the results (--results runs in one process).

COCO-type data sets (COCO, custom COCO json, shapes) are scored with pycocotools'
COCOeval; VOC-type data sets exactly as the official devkit (11-point metric for
VOC2007, area under the curve for VOC2010+), plus COCO-style AP@[.5:.95].

Where results go (printed at the start): with --weights, <folder of the checkpoint>/inference;
with --results, <output_dir>/inference; --output-dir DIR replaces either. The layout is the
same for one test set or several:

    DIR/source.json          the checkpoint (or results) evaluated: absolute path, size, mtime
    DIR/<test set>/          one folder per test set, named after the data set with every
                             character other than letters and digits (of any script) and ._-
                             replaced by "_" (shapes_val, voc_MyVOC_val for voc:MyVOC_val):
        metrics.json, pr_curves.png, coco_results.json and coco_categories.json (COCO-type: its
                             ids' names, so that --results scores by name) or comp4_det_test_*.txt (VOC-type),
        environment.json (the command, versions, processor, code, precision and checkpoint that made them)
    DIR/report.html          one self-contained page (the `report` extra: jinja2, matplotlib): per test
                             set the metrics and per-class tables, PR curves, the images with the most
                             false positives and missed objects (ground truth | predictions); the
                             training curves when metrics.jsonl is beside --weights; config, command.
                             It shows every test set the folder holds: a second run into DIR for
                             another test set adds that set's part (each set keeps it in
                             DIR/<test set>/report_section.json) and source.json lists both

A test set without published annotations cannot be scored: its folder gets the files of its
evaluation server instead, no metrics.json, and the run prints where they are and what to
upload: voc_2012_test, results/VOC2012/Main/comp4_det_test_<class>.txt (the devkit's 1-based
lines, the PASCAL server's layout); coco_2017_test-dev (any COCO json without an "annotations"
list), coco_results.json (renamed detections_test-dev2017_<name>_results.json and zipped).

One evaluation at a time writes into DIR (eval.lock there holds its pid and host): a second one
started into it, e.g. a job array evaluating a run's checkpoints into <run>/inference at once, is
refused naming the first (their files mixed, and source.json named one checkpoint for the
other's numbers); give each its --output-dir.

A folder holding the results of another checkpoint (or of an earlier version of the same
file, e.g. before more training) is not overwritten: the run stops and says so; pass
--output-dir for a new folder or --overwrite to replace them (their files are removed
first). The same checkpoint evaluated again into DIR (say with other test settings) replaces
its results there, one line per test set saying so (the set's old files are removed first). Re-scoring a folder's own results
(--results DIR into DIR) is allowed. The test sets' class names are compared with the model's
(the checkpoint's names, else model.class_names; else only their number is checked against
model.num_classes): the model's names in another order, or a subset of them, are scored by name
(the run says so; a subset without the detections of the other classes). A renamed or extra
class is refused.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from detection.cli import (add_config_args, config_from_args, override_keys, parse_command_line,
                           resolve_config_beside_weights, run_tool)

EXIT_TARGET_MISSED = 3  # --fail-below (as demo.py --strict)

if TYPE_CHECKING:  # annotations only: torch is imported after the arguments are parsed
    import torch

    from detection.config import Config
    from detection.data.dataset_info import DatasetInfo
    from detection.engine.loading import DetectorWeights
    from detection.evaluation.outputs import ResultsSource

logger = logging.getLogger("eval")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser, beside_weights=True)
    parser.add_argument("--weights", metavar="CKPT", help="detector checkpoint (model_final.pth or last.pth)")
    parser.add_argument("--results", metavar="PATH",
                        help="evaluate saved results instead of running a model: a results folder as eval.py "
                             "writes it (one subfolder per test set), a coco_results.json (COCO-type) or a "
                             "folder of comp4_det_test_*.txt files (VOC-type)")
    parser.add_argument("--output-dir", metavar="DIR",
                        help="results folder (default: <folder of --weights>/inference; with --results, "
                             "<output_dir>/inference)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the results of another checkpoint in the results folder")
    parser.add_argument("--fail-below", action="append", default=[], metavar="KEY=VALUE",
                        help=f"exit with status {EXIT_TARGET_MISSED} (once every file is written) when a test set's "
                             "metric KEY of metrics.json is below VALUE or not defined, e.g. AP=68 (every test set) or "
                             "shapes_val/AP50=92 (one); repeatable: a CI gate")
    parser.add_argument("--report-images", type=int, metavar="N",
                        help="images in each of report.html's galleries (most false positives, most missed "
                             "objects); default 4")
    args = parse_command_line(parser, argv, torchrun_tool="tools/eval.py")
    if args.report_images is not None and args.report_images < 0:
        parser.error("--report-images is a number of images, 0 for none")
    args.targets = [_target(parser, given) for given in args.fail_below]
    if not args.weights and not args.results:
        parser.error("one of --weights or --results is required")
    if args.weights and args.results:  # --weights was ignored without a word
        parser.error("--weights runs a checkpoint and --results scores saved results: give one of them")
    resolve_config_beside_weights(parser, args)
    from detection.utils.environment import command_line

    args.command = command_line(["tools/eval.py", *(sys.argv[1:] if argv is None else argv)])
    return args


def results_folder(cfg: Config, args: argparse.Namespace) -> Path:
    """--output-dir; else beside the checkpoint evaluated (the config's output_dir may be
    another run's folder); else, for saved results, <output_dir>/inference."""
    if args.output_dir:
        return Path(args.output_dir)
    if args.results:
        return Path(cfg.output_dir) / "inference"
    return Path(args.weights).expanduser().parent / "inference"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # under torchrun every process scores its share of the images and the first writes the results
    return run_tool(lambda: run(config_from_args(args), args), processes="one" if args.results else "many")


def run(cfg: Config, args: argparse.Namespace) -> int:
    from backbones.errors import WeightsError
    from detection.config import ConfigError
    from detection.data import DataError
    from detection.evaluation.outputs import ResultsSource
    from detection.engine.distributed import init_distributed, is_main_process, select_device
    from detection.engine.run_folder import EVAL_LOCK_FILE, lock_for_every_process
    from detection.engine.run_config import check_same_config_everywhere
    from detection.utils.files import dangling_link

    if not cfg.datasets.test:  # it exited 0 having written a report of no test set
        raise ConfigError("datasets.test is empty: nothing to evaluate; give the test sets, e.g. "
                          "'datasets.test=[shapes_val]' or 'datasets.test=[{type: coco, ann_file: A.json, "
                          "image_root: DIR}]'")
    out_root = results_folder(cfg, args)
    given = args.results or args.weights
    if not Path(given).expanduser().exists():  # before the results folder is judged by it
        error = DataError if args.results else WeightsError
        raise error(f"{given}: {'--results' if args.results else '--weights'} file not found"
                    f"{dangling_link(Path(given).expanduser())}")
    source = ResultsSource.of("results" if args.results else "weights", given)
    device = select_device(cfg.device, cfg.tf32)
    init_distributed(device)  # under torchrun: one process group; the first process (rank 0) writes
    check_same_config_everywhere(cfg, [f"weights={args.weights}", f"overwrite={args.overwrite}"])
    say = print if is_main_process() else _silent
    say(f"results go to {out_root}")
    # one evaluation at a time per results folder (job arrays of a run's checkpoints share <run>/inference)
    lock = lock_for_every_process(out_root, EVAL_LOCK_FILE, "evaluation")
    try:
        return _evaluate(cfg, args, out_root, source, device, say)
    finally:
        if lock is not None:
            lock.release(remove_empty_dir=True)


def _evaluate(cfg: Config, args: argparse.Namespace, out_root: Path, source: ResultsSource, device: torch.device,
              say: Callable[..., None]) -> int:
    from detection.data.catalog import get_datasets
    from detection.evaluation import evaluate_test_sets
    from detection.evaluation.outputs import check_results_folder, claim_for_every_process
    from detection.engine.distributed import is_main_process

    check_results_folder(out_root, source, overwrite=args.overwrite)  # before any slow work (every process)
    model, weights = (None, None) if args.results else _model(cfg, args.weights, device, override_keys(args), say)
    iteration = weights.iteration if weights is not None else None
    # scoring saved results reads the annotations only, not the images
    datasets = get_datasets(cfg.datasets.test, cfg.datasets.root, skip_bad_images=cfg.dataloader.skip_bad_images,
                            check_images=not args.results, exif_orientation=cfg.input.exif_orientation)
    folders, model_classes = _checked_folders(cfg, datasets, model, weights, say)
    if args.targets:  # a --fail-below metric the sets will not give: said before the work, not after it
        from detection.evaluation.test_sets import metric_names

        _check_targets(args.targets, {d.name: dict.fromkeys(metric_names(d, cfg.test.coco_max_dets), 0.0)
                                      if d.has_annotations else {} for d in datasets})
    if model is not None and is_main_process():  # objects the model sees too small to be proposed
        from detection.engine.startup import small_objects_warnings

        for line in small_objects_warnings(cfg, [], datasets):
            logger.warning("%s", line)
    claim_for_every_process(out_root, source, folders, overwrite=args.overwrite, echo=say)
    per_set = evaluate_test_sets(datasets, model=model, num_workers=cfg.dataloader.num_workers,
                                 results=args.results, output_dir=out_root, echo=say, model_classes=model_classes,
                                 coco_max_dets=cfg.test.coco_max_dets)
    if is_main_process() and args.weights:  # re-scored results keep the environment.json of the run that made them
        _write_environment(cfg, args, device, [out_root / folder for folder in folders], iteration)
    _write_report(cfg, args, datasets, folders, out_root, per_set)
    return _targets_missed(args.targets, per_set) if is_main_process() else 0



def _target(parser: argparse.ArgumentParser, given: str) -> tuple[str | None, str, float]:
    """--fail-below [SET/]KEY=VALUE -> (the test set or None for every one, the metric, the value)."""
    import math

    key, _, value = given.partition("=")
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not key or not math.isfinite(number):
        parser.error(f"--fail-below {given!r}: expected KEY=VALUE, a metric of metrics.json and a number (AP=68)")
    test_set, _, metric = key.rpartition("/")
    return test_set or None, metric, number


def _check_targets(targets: list[tuple[str | None, str, float]], per_set: dict[str, dict[str, float]]) -> None:
    """ConfigError for a --fail-below target naming a set not evaluated or a metric its set has not
    (`per_set`: each set's metrics, or the keys its evaluation will give: checked before the work)."""
    from detection.config import ConfigError
    from detection.evaluation.inference import is_per_class_key

    for test_set, metric, _ in targets:
        if test_set is not None and test_set not in per_set:
            raise ConfigError(f"--fail-below {test_set}/{metric}: no test set {test_set!r} was evaluated "
                              f"({', '.join(per_set)})")
        for name, metrics in per_set.items():
            if test_set not in (None, name) or not metrics:  # {}: no annotations, nothing scored
                continue
            if metric not in metrics:
                per_class = sorted({k.split("-", 1)[0] + "-<class>" for k in metrics if is_per_class_key(k)})
                raise ConfigError(f"--fail-below {metric}: test set {name} has no metric {metric!r} (its metrics: "
                                  f"{', '.join([*(k for k in metrics if not is_per_class_key(k)), *per_class])})")


def _targets_missed(targets: list[tuple[str | None, str, float]], per_set: dict[str, dict[str, float]]) -> int:
    """EXIT_TARGET_MISSED when a --fail-below target is missed (each said on stderr), else 0. A
    metric not defined (nan: no object of that size or class) misses it; one the set does not
    have, or a set not evaluated, is an error of the command."""
    import math

    missed = []
    _check_targets(targets, per_set)
    for test_set, metric, value in targets:
        for name, metrics in per_set.items():
            if test_set not in (None, name) or not metrics:  # {}: no annotations, nothing scored
                continue
            got = metrics[metric]
            if not got >= value:  # nan too
                missed.append(f"{name} {metric} {'not defined' if math.isnan(got) else f'{got:.2f}'} < {value:g}")
    for line in missed:
        print(f"error: target missed (--fail-below): {line}", file=sys.stderr)
    return EXIT_TARGET_MISSED if missed else 0


def _write_environment(cfg: Config, args: argparse.Namespace, device: torch.device, folders: list[Path],
                       iteration: int | None = None) -> None:
    """environment.json in each test set's folder (an evaluation of another set into the same
    results folder, with other settings, leaves this one's as it is): the command, the versions,
    the machine and the code's version the numbers come from, the precision inference really ran
    in (test.amp falls back to float32 on a CPU without bfloat16 instructions: the same command
    gives other numbers on one with them), the checkpoint's sha256 (its path, size and date in
    source.json name no content) and the training iteration it was saved at."""
    import hashlib
    import json

    import torch

    from detection.modeling.precision import amp_dtype, inference_amp
    from detection.utils.environment import environment
    from detection.utils.files import atomic_write

    amp = inference_amp(cfg.test.amp, device)
    digest = hashlib.sha256()
    with open(Path(args.weights).expanduser(), "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    info = {"command": args.command, "environment": environment(device),
            "inference precision": (str(amp_dtype(device)).removeprefix("torch.") if amp else "float32")
            + f" (test.amp: {str(cfg.test.amp).lower()})", "checkpoint sha256": digest.hexdigest(),
            "checkpoint iteration": iteration,  # the training iteration it was saved at (null: not said)
            "torch threads": torch.get_num_threads()}  # the CPU's sums: another count moves the last digits
    for folder in folders:
        with atomic_write(folder / "environment.json") as f:
            f.write(json.dumps(info, indent=1) + "\n")


def _write_report(cfg: Config, args: argparse.Namespace, datasets: list[DatasetInfo], folders: list[str],
                  out_root: Path, per_set: dict[str, dict[str, float]]) -> None:
    """out_root/report.html (detection/evaluation/report.py, the `report` extra): read back
    from the files evaluation just wrote; evaluation stands without it."""
    from detection.utils.comm import is_main_process

    if not is_main_process():
        return
    try:
        import jinja2  # noqa: F401
        import matplotlib  # noqa: F401

        from detection.evaluation.report import (GALLERY_SIZE, read_detections, save_section, section_for_test_set,
                                                 write_folder_report)
    except ImportError as err:
        print(f"note: no report.html ({err.name} is not installed: pip install -e '.[report]')")
        return
    from detection.config import dump_config
    from detection.evaluation.outputs import SECTION_FILE, read_skipped_images, results_for_test_set
    from detection.evaluation.coco import COCO_MAX_DETS
    from detection.visualization.draw import read_crowd_regions

    config_text = dump_config(cfg)
    source, metrics_jsonl = _source_of_the_detections(args)
    for dataset, folder in zip(datasets, folders):
        detections, crowd = {}, {}
        if dataset.has_annotations:
            detections = read_detections(dataset, results_for_test_set(args.results or out_root, folder, dataset.kind))
            if dataset.kind == "coco" and dataset.ann_file:
                crowd = read_crowd_regions(dataset.ann_file, dataset.label_to_category_id)
        section = section_for_test_set(dataset, per_set.get(dataset.name, {}), detections,
                                       out_root / folder / "pr_curves.png", crowd,
                                       skipped=read_skipped_images(out_root / folder),
                                       coco_max_dets=cfg.test.coco_max_dets,
                                       gallery_size=GALLERY_SIZE if args.report_images is None
                                       else args.report_images)
        # re-scored results keep the command and config that made them, when saved beside them
        made_in = _results_folder(args, out_root, folder)
        made_by = _made_by(made_in) if args.results else None
        section.command, section.config_text = made_by or (args.command, config_text)
        scored_at = cfg.test.coco_max_dets if dataset.kind == "coco" else None  # this command's scoring
        section.settings = _settings(section.config_text, made_in, scored_at) if made_by or not args.results else (
            f"test settings not known: the results read from {made_in} have no {SECTION_FILE} of the evaluation "
            "that made them (this command's config says nothing of how they were made)" + (
                f"; COCOeval counting {scored_at} detections per image and class (test.coco_max_dets)"
                if scored_at not in (None, COCO_MAX_DETS) else ""))
        save_section(section, out_root / folder)
    path, names = write_folder_report(out_root, source=source, command=args.command, config_text=config_text,
                                      metrics_jsonl=metrics_jsonl)
    print(f"report written to {path} ({len(names)} test set{'s' if len(names) != 1 else ''}: {', '.join(names)})")


def _source_of_the_detections(args: argparse.Namespace) -> tuple[Path, Path | None]:
    """The checkpoint the page's detections came from (for --results, the one the results
    folder's source.json names, when it names one) and its training's metrics.jsonl."""
    from detection.evaluation.outputs import read_source

    weights = args.weights
    if args.results and Path(args.results).is_dir():
        try:
            recorded = read_source(args.results)
        except ValueError:  # an unreadable source.json: the results themselves are the source
            recorded = None
        weights = recorded.path if recorded is not None and recorded.kind == "weights" else None
    if weights is None:
        return Path(args.results).resolve(), None
    return Path(weights).expanduser().resolve(), Path(weights).expanduser().parent / "metrics.jsonl"


def _results_folder(args: argparse.Namespace, out_root: Path, folder: str) -> Path:
    """The folder holding a set's results: its folder under the output (or --results folder), or
    for --results naming the set's own folder or a results file, that folder or the file's."""
    if not args.results:
        return out_root / folder
    given = Path(args.results)
    if given.is_file():
        return given.parent
    return given / folder if (given / folder).is_dir() else given


def _made_by(results_folder: Path) -> tuple[str, str] | None:
    """For --results: the (command, config) the set's results were made with, from the report
    section saved beside them by the evaluation that wrote them; None when there is none."""
    import json

    from detection.evaluation.outputs import SECTION_FILE

    saved = results_folder / SECTION_FILE
    if not saved.is_file():
        return None
    try:
        data = json.loads(saved.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return (data["command"], data["config_text"]) if data.get("command") else None


def _settings(config_text: str, results_folder: Path, scored_at: int | None = None) -> str:
    """The section's test-settings line: from the config that made the results, with the
    precision inference ran in as its environment.json says (none: test.amp as asked), and the
    COCOeval maxDets this command scored them at (`scored_at`)."""
    import json

    import yaml

    from detection.evaluation.report import evaluated_with

    try:
        precision = json.loads((results_folder / "environment.json").read_text(encoding="utf-8"))["inference precision"]
    except (OSError, ValueError, KeyError, TypeError):
        precision = None
    try:
        config = yaml.safe_load(config_text)
    except yaml.YAMLError:
        return ""
    return evaluated_with(config, precision, scored_at) if isinstance(config, dict) else ""


def checkpoint_iteration(weights: DetectorWeights) -> str:
    """"iteration 30 of its run's 40" (the run's solver.max_iter when the checkpoint keeps its
    config), or "iteration 30"."""
    solver = (weights.config or {}).get("solver")
    max_iter = solver.get("max_iter") if isinstance(solver, dict) else None
    return f"iteration {weights.iteration}" + (f" of its run's {max_iter}" if isinstance(max_iter, int) else "")


def _silent(*args, **kwargs) -> None:
    """print for the processes other than the first under torchrun: the first one speaks."""


def _model(cfg: Config, weights_path: str, device: torch.device, explicit: list[str], say=print
           ) -> tuple[torch.nn.Module, DetectorWeights]:
    from detection.engine.inference_model import build_inference_model

    model, weights = build_inference_model(cfg, weights_path, device, explicit)
    if weights.iteration is not None:  # last.pth, model_final.pth: their names do not say which
        say(f"checkpoint {weights_path}: {checkpoint_iteration(weights)}")
    if cfg.test.aug.enabled:
        aug = cfg.test.aug
        say(f"test-time augmentation (test.aug): sizes {aug.min_sizes}, max {aug.max_size}"
            f"{', each also mirrored' if aug.flip else ''}")
    if cfg.test.tiles.size:
        tiles = cfg.test.tiles
        say(f"tiles (test.tiles): images over {tiles.size} px cut into {tiles.size} px tiles overlapping by "
            f"{tiles.overlap:g}{', and the whole image' if tiles.full_image else ''}")
    return model, weights


def _checked_folders(cfg: Config, datasets: list[DatasetInfo], model: torch.nn.Module | None,
                     weights: DetectorWeights | None, say=print) -> tuple[list[str], list[str] | None]:
    """Each test set's results folder name, after checking its classes are the model's (or a
    subset of them, scored by name: said here); and the model's class names when known."""
    from detection.evaluation.classes import model_class_names, subset_note, label_map_for_test_set
    from detection.evaluation.outputs import results_subfolders

    names = None
    if model is not None:
        names, source = model_class_names(weights, cfg.model.class_names)
        for dataset in datasets:
            if label_map_for_test_set(dataset.name, dataset.class_names, names, cfg.model.num_classes, source):
                say(subset_note(dataset.name, dataset.class_names, names))
    return results_subfolders([d.name for d in datasets]), names


if __name__ == "__main__":
    sys.exit(main())
