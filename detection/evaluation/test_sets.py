"""The one loop over the test sets: tools/eval.py and evaluation during training both call it.

    metrics = evaluate_test_sets(datasets, model=model)                         # name -> metrics
    metrics = evaluate_test_sets(datasets, results="out/inference")             # saved results
    flat = flatten_metrics(metrics)                                              # metrics.jsonl keys

With a model, each process runs its share of every test set (torch.distributed: every
world_size-th image) and rank 0 gathers and scores them; the other ranks get {} per set.
With `results`, saved detections are scored instead (no model, no images read).
With `output_dir`, each test set's files go to output_dir/<test set folder>/
(detection/evaluation/outputs.py): the evaluator's results files, metrics.json and, when
matplotlib is installed, pr_curves.png. A test set without annotations (voc_2012_test) has
no metrics: its folder gets the evaluation server's files instead (results/VOC2012/Main/
comp4_det_test_{class}.txt, `VOCSubmissionWriter`), its metrics are {}, and `echo` is told
where they are.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from detection.data import DataError
from detection.evaluation.classes import label_map_for_test_set
from detection.evaluation.coco import COCO_MAX_DETS, COCOEvaluator, COCOSubmissionWriter, summary_keys
from detection.evaluation.inference import Evaluator, format_metrics_table, inference_on_dataset, save_metrics_json
from detection.evaluation.outputs import (SKIPPED_FILE, read_skipped_images, results_for_test_set,
                                         results_subfolder, results_subfolders, write_skipped_images)
from detection.evaluation.voc import VOCEvaluator, VOCSubmissionWriter
from detection.utils import comm

if TYPE_CHECKING:
    from detection.data.dataset_info import DatasetInfo

logger = logging.getLogger(__name__)

# DatasetInfo.kind -> evaluator class (for a data set with annotations)
EVALUATORS = {"coco": COCOEvaluator, "voc": VOCEvaluator}
# DatasetInfo.kind -> what writes a set without annotations for its evaluation server
SUBMISSION_WRITERS = {"voc": VOCSubmissionWriter, "coco": COCOSubmissionWriter}


def evaluate_test_sets(datasets: Sequence[DatasetInfo], *, model: torch.nn.Module | None = None,
                       num_workers: int = 0, results: str | None = None,
                       output_dir: str | Path | None = None, echo: Callable[[str], None] | None = None,
                       model_classes: Sequence[str] | None = None,
                       between_batches: Callable[[], None] | None = None,
                       coco_max_dets: int = COCO_MAX_DETS) -> dict[str, dict[str, float]]:
    """Each test set's metrics, by data set name, from `model` or from saved `results` (a
    results folder as this function writes it, a coco_results.json or a folder of comp4
    files). `echo` (e.g. print) receives each set's metrics table and where it was written.
    `model_classes`: the model's class names (default: its `class_names` attribute, which the
    tools' models, the Predictor's and a training's carry); a test set listing them in another
    order, or a subset of them, is scored by name (classes.label_map_for_test_set; a set that fits
    no way is refused). With no names known, label k is scored as the set's k-th class: a warning
    says so.
    `between_batches`: called before each batch of the model's images (inference_on_dataset).
    `coco_max_dets`: the detections per image and class COCOeval counts (test.coco_max_dets)."""
    if (model is None) == (results is None):
        raise ValueError("evaluate_test_sets: give a model or saved results, not both or neither")
    if model is not None and not model_classes:
        # a Python caller's model scored by label number against a set listing the classes in
        # another order was a wrong AP in silence (the tools pass the names they check)
        model_classes = getattr(model, "class_names", None) or None
        if model_classes is None:
            logger.warning("the model's class names are not known (the model has no class_names, nor were they "
                           "given): each test set is scored by label number, label k as its k-th class (%s); "
                           "give them (the checkpoint's class_names, or set model.class_names) to score by name",
                           "; ".join(f"{d.name}: {', '.join(d.class_names)}" for d in datasets))
    names = [d.name for d in datasets]
    # two test sets sharing a folder would overwrite each other's files: checked when writing
    folders = results_subfolders(names) if output_dir is not None else [results_subfolder(n) for n in names]
    out: dict[str, dict[str, float]] = {}
    for dataset, folder in zip(datasets, folders):
        where = Path(output_dir) / folder if output_dir is not None else None
        if where is not None and comm.is_main_process():
            where.mkdir(parents=True, exist_ok=True)
        if results is not None:  # saved results are re-scored, not rewritten; a submission has only its files
            evaluator = build_evaluator(dataset, None if dataset.has_annotations or where is None else str(where),
                                        coco_max_dets)
            _say_crowded(dataset, None, coco_max_dets)
            path = results_for_test_set(results, folder, dataset.kind)
            evaluator.load_results(path)
            skipped = read_skipped_images(path)  # as the run that wrote them: without its unreadable images
            if skipped:
                evaluator.predictions = [p for p in evaluator.predictions if p["image_id"] not in skipped]
            _say_uncovered(dataset, evaluator, path)
            metrics = evaluator.evaluate()
        else:
            evaluator = build_evaluator(dataset, str(where) if where is not None else None, coco_max_dets)
            label_map = label_map_for_test_set(dataset.name, dataset.class_names, model_classes, len(model_classes)) \
                if model_classes else None
            _say_crowded(dataset, model, coco_max_dets)
            metrics = _run_model(model, dataset, evaluator, num_workers, label_map, between_batches)
        out[dataset.name] = metrics
        if comm.is_main_process():
            _report(dataset, metrics, evaluator, where, echo)
    return out


def metric_names(dataset: DatasetInfo, coco_max_dets: int = COCO_MAX_DETS) -> list[str]:
    """The keys an evaluation of `dataset` gives (a set's own, before flatten_metrics prefixes them)."""
    if dataset.kind == "coco":
        return [*summary_keys(coco_max_dets),
                *(f"{key}-{name}" for key in ("AP", "AP50") for name in dataset.class_names)]
    return ["mAP", "AP", "AP50", "AP75", "use_07_metric", *(f"AP-{name}" for name in dataset.class_names)]


_TOLD_CROWDED: set[tuple] = set()  # once per process and cap: training evaluates every eval_period


def _say_crowded(dataset: DatasetInfo, model: torch.nn.Module | None, coco_max_dets: int = COCO_MAX_DETS) -> None:
    """Warnings when images of the set hold more objects than can be found or counted, where
    recall and AP are capped in silence: the model keeps model.roi_heads.detections_per_image
    detections, from model.rpn.post_nms_topk_test proposals (the smaller of the two bites: a
    many-class trial's AP 11.1 against 23.3 uncapped on images of 150-500 objects; a dense-scene
    trial's 31.3 at 200 proposals against 37.4 at 1000); and a COCO-type set's COCOeval counts
    `coco_max_dets` detections per image and class (perfect detections of 200 circles an image
    scored AP 49.5). `model` None (saved results): the last only."""
    if not comm.is_main_process():
        return
    counts = [len(record.get("boxes", ())) for record in dataset.records]
    from detection.modeling.tiles import inner_detector

    inner = inner_detector(model) if model is not None else None  # inside tiles and test-time augmentation
    heads, rpn = getattr(inner, "roi_heads", None), getattr(inner, "rpn", None)
    caps = [(value, key) for value, key in (
        (getattr(heads, "detections_per_image", None), "model.roi_heads.detections_per_image"),
        (getattr(rpn, "post_nms_topk", {}).get(False) if isinstance(getattr(rpn, "post_nms_topk", None), dict)
         else None, "model.rpn.post_nms_topk_test")) if isinstance(value, int)]
    if caps and counts:
        cap, key = min(caps)
        over = sum(count > cap for count in counts)
        if over and (dataset.name, key, cap) not in _TOLD_CROWDED:
            _TOLD_CROWDED.add((dataset.name, key, cap))
            what, usual = ("keeps detections", "Detectron2's LVIS configs use 300 detections") \
                if key.endswith("detections_per_image") else \
                ("takes proposals (each image's detections come from them)", "Detectron2 tests with 1000 proposals")
            logger.warning("test set %s: %d of its %d images hold more objects than the model %s (%s=%d; up to %d "
                           "objects): recall and AP are capped there; raise it for such images (%s)", dataset.name,
                           over, len(counts), what, key, cap, max(counts), usual)
    if dataset.kind != "coco" or not dataset.has_annotations:
        return
    most = [int(np.bincount(np.asarray(record.get("labels", ()), np.int64)).max(initial=0))
            if len(record.get("labels", ())) else 0 for record in dataset.records]
    over = sum(count > coco_max_dets for count in most)
    if over and (dataset.name, "coco_max_dets", coco_max_dets) not in _TOLD_CROWDED:
        _TOLD_CROWDED.add((dataset.name, "coco_max_dets", coco_max_dets))
        logger.warning("test set %s: %d of its %d images hold more than %d objects of one class (up to %d), and "
                       "COCOeval counts %d detections per image and class (test.coco_max_dets): AP and AR are capped "
                       "there, even for perfect detections; raise test.coco_max_dets (Detectron2's COCOEvaluator "
                       "max_dets_per_image) to score them all", dataset.name, over, len(most), coco_max_dets,
                       max(most), coco_max_dets)


def _say_uncovered(dataset: DatasetInfo, evaluator: Evaluator, path: str) -> None:
    """Saved results without a detection on some of the set's images score them as all missed:
    right for a model that found nothing there, a wrong average for results made on a subset of
    the images (a trial: 10 images' COCO results scored on their 40-image set gave AP 0.79 where
    they score 2.55 on their own 10, exit 0). Said, with the count. (COCO: load_results' entries
    hold "instances"; VOC's comp4 lines become "scores" per image.)"""
    loaded = [p for p in evaluator.predictions if "instances" in p or "scores" in p]
    empty = sum(1 for p in loaded if not len(p["instances"] if "instances" in p else p["scores"]))
    if loaded and empty and comm.is_main_process():
        logger.warning("%s: the results have no detection on %d of the %d images of %s: they are scored as "
                       "finding nothing there (right if the model found nothing; results made on a subset of "
                       "the images are scored on that subset alone, as its own test set)", path, empty,
                       len(loaded), dataset.name)


def flatten_metrics(per_set: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """One flat dict: a single test set's keys as they are, several prefixed "<name>/"."""
    if len(per_set) == 1:
        return dict(next(iter(per_set.values())))
    return {f"{name}/{key}": value for name, metrics in per_set.items() for key, value in metrics.items()}


def build_evaluator(dataset: DatasetInfo, output_dir: str | None = None,
                    coco_max_dets: int = COCO_MAX_DETS) -> Evaluator:
    """The evaluator for `dataset.kind`; results files go to `output_dir` (None: not written).
    A data set without annotations gets its kind's submission writer (no metrics). A COCO-type
    set's COCOeval counts `coco_max_dets` detections per image and class (test.coco_max_dets)."""
    cls = evaluator_class(dataset)
    return cls(dataset, output_dir, coco_max_dets) if dataset.kind == "coco" else cls(dataset, output_dir)


def evaluator_class(dataset: DatasetInfo) -> type:
    """What build_evaluator builds for `dataset`, or the DataError it would raise: training
    asks at its start, so a set that cannot be scored stops the run before its first iteration."""
    if not dataset.has_annotations:
        if dataset.kind not in SUBMISSION_WRITERS:
            raise DataError(f"data set {dataset.name}: has no annotations and a {dataset.kind} set cannot be "
                            f"written for an evaluation server (only {', '.join(sorted(SUBMISSION_WRITERS))})")
        return SUBMISSION_WRITERS[dataset.kind]
    if dataset.kind not in EVALUATORS:
        raise DataError(f"data set {dataset.name}: unknown kind {dataset.kind!r}, "
                        f"expected one of {sorted(EVALUATORS)}")
    return EVALUATORS[dataset.kind]


def _run_model(model: torch.nn.Module, dataset: DatasetInfo, evaluator: Evaluator, num_workers: int,
               label_map: Sequence[int] | None = None,
               between_batches: Callable[[], None] | None = None) -> dict[str, float]:
    """This process's share of the images through the model; the evaluator keeps the whole
    data set, since rank 0 scores everyone's detections against all of it."""
    from detection.data.loader import build_test_loader

    loader = build_test_loader(comm.shard_dataset(dataset), num_workers=num_workers)
    return inference_on_dataset(model, loader, evaluator, label_map=label_map, between_batches=between_batches)


def _report(dataset: DatasetInfo, metrics: dict[str, float], evaluator: Evaluator, where: Path | None,
            echo: Callable[[str], None] | None) -> None:
    """The table to `echo`; metrics.json and the PR plot into `where` (when given); the images
    left out as unreadable in skipped_images.json, a submission's too (absent from its files)."""
    if where is not None:
        scored_ids = {p["image_id"] for p in getattr(evaluator, "predictions", dataset.records)}
        write_skipped_images(where, [r for r in dataset.records if r["image_id"] not in scored_ids])
    if not dataset.has_annotations:
        _report_submission(dataset, evaluator, echo)
        return
    if echo is not None:
        scored, listed = len(getattr(evaluator, "predictions", dataset.records)), len(dataset.records)
        count = f"{listed} images" if scored == listed else \
            f"{scored} of its {listed} images: {listed - scored} unreadable, skipped (dataloader.skip_bad_images)"
        read_from = dataset.ann_file or dataset.root  # which data: a relative datasets.root depends on the directory
        echo(f"\n{dataset.name} ({count}{f', {os.path.abspath(read_from)}' if read_from else ''})")
        echo(format_metrics_table(metrics))
    if where is None:
        return
    save_metrics_json(metrics, where / "metrics.json")
    # titled with the table's AP-<class> where it is the curve's own (VOC's: IoU 0.5, the devkit's
    # 11-point or area metric); COCO's is over IoU .5:.95, so its panels show their curve's AP50
    _plot_pr(evaluator, where, echo, metrics if getattr(evaluator, "curve_ap_in_metrics", False) else None)
    if echo is not None:
        echo(f"metrics written to {where / 'metrics.json'}")


def _report_submission(dataset: DatasetInfo, evaluator: Evaluator, echo: Callable[[str], None] | None) -> None:
    """No table and no metrics.json for a set without annotations: where its files are."""
    run = len(getattr(evaluator, "predictions", dataset.records))
    skipped = len(dataset.records) - run
    head = (f"{dataset.name} ({len(dataset.records)} images"
            + (f", {skipped} of them unreadable, skipped (dataloader.skip_bad_images): named in "
               f"{SKIPPED_FILE}" if skipped else "") + "): no annotations, so no AP is computed here")
    if evaluator.output_dir is None:
        logger.warning("%s; tools/eval.py writes the files for its evaluation server", head)
        return
    (echo or logger.info)(("\n" if echo else "") + f"{head}; {evaluator.upload_hint()}")


def _plot_pr(evaluator: Evaluator, where: Path, echo: Callable[[str], None] | None,
             metrics: dict[str, float] | None = None) -> None:
    """Per-class precision-recall curves, when matplotlib (the `plots` extra) is installed;
    titled with `metrics`' AP-<class> when given."""
    curves = getattr(evaluator, "pr_curves", None)
    if not curves:
        return
    try:
        from detection.visualization.plots import plot_pr_curves

        plot_pr_curves(curves, where / "pr_curves.png", metrics=metrics)
    except ImportError as err:
        (echo or logger.warning)(f"note: no PR plot ({err})")
