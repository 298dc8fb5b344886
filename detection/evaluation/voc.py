"""PASCAL VOC evaluation: `VOCEvaluator` (the devkit's AP, voc_metric.py) and, for a test set
without annotations, `VOCSubmissionWriter` (the evaluation server's files).

`VOCEvaluator` evaluates exactly the numbers it writes to the comp4 result files (coords
with one decimal, as Detectron2 writes them), so re-evaluating the files gives the same AP.
It scores every box as given, as the devkit would (also a results folder's unclipped ones).
A results folder (`load_results`, eval.py --results) is scored as its files are, as the devkit
reads them: every number at the precision written, ties in score in the files' line order. The
ground truth is the boxes as annotated (a record's `annotated` objects where training clipped or
dropped some: data/voc.py), not clipped to the image, as the devkit reads the XML files.

A test set without published annotations (voc_2012_test) cannot be scored here:
`VOCSubmissionWriter` writes the same comp4 lines in the layout the evaluation server takes,
`results/<VOC2012>/Main/comp4_det_test_{class}.txt`, and reports no metric. Its boxes are
clipped to the image and those under one pixel wide or high left out, so that the server gets
no inverted line (x1 > x2: a sub-pixel box at the border, once x1 gets the devkit's +1).
"""
from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from detection.evaluation.classes import classes_without_results
from detection.evaluation.inference import compact_floats, order_by_dataset, to_numpy
from detection.evaluation.voc_metric import evaluate_matches, match_detections, to_devkit
from detection.evaluation.voc_results import (COMP4_TEMPLATE, SUBMISSION_FOLDER, comp4_detections, format_comp4_lines,
                                              image_sizes, parsed_comp4_lines, read_comp4_lines, write_comp4_files)

if TYPE_CHECKING:
    from detection.data.dataset_info import DatasetInfo

logger = logging.getLogger(__name__)

# COCO-style AP on VOC: thresholds 0.50, 0.55, ..., 0.95 (exact decimals, as Detectron2's loop)
COCO_IOU_THRESHOLDS = tuple(t / 100 for t in range(50, 100, 5))


class VOCEvaluator:
    """Collects predictions, writes `comp4_det_test_{class}.txt` and reports VOC metrics.

    `evaluate()` returns percentages: "mAP" (IoU 0.5, the data set's metric), "AP"
    (mean over IoU 0.50:0.95 of the mAP at each threshold, as Detectron2 reports it on
    VOC), "AP50" (= "mAP"), "AP75", "use_07_metric" (1.0: VOC2007 11-point, 0.0: VOC2010+
    area) and "AP-<class>" (IoU 0.5; nan for a class without non-difficult ground truth,
    which does not count in the means). After it, `pr_curves[class] = (recall, precision)`
    at IoU 0.5.
    """

    curve_ap_in_metrics = True  # AP-<class> is its curve's (IoU 0.5, the devkit's metric): the PR titles show it

    def __init__(self, dataset: DatasetInfo, output_dir: str | None = None) -> None:
        self.dataset = dataset
        self.output_dir = output_dir
        self.class_names = list(dataset.class_names)
        self.use_07_metric = bool(dataset.use_07_metric)
        self.reset()

    def reset(self) -> None:
        self.predictions: list[dict[str, Any]] = []  # one entry per image; gathered across processes
        self.pr_curves: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.result_lines: dict[int, list[str]] | None = None  # label -> a results folder's lines, as read

    def process(self, records: Sequence[dict], outputs: Sequence[dict]) -> None:
        """Keep each image's ground truth (from its record: the boxes as annotated) and its
        detections (as numpy)."""
        if len(records) != len(outputs):
            raise ValueError(f"process: {len(records)} records but {len(outputs)} outputs")
        for record, output in zip(records, outputs):
            truth = record.get("annotated", record)  # unclipped, as the devkit reads the XML (float64)
            gt_boxes = np.asarray(truth["boxes"], dtype=np.float32 if truth is record else np.float64).reshape(-1, 4)
            difficult = truth.get("difficult")
            self.predictions.append({
                "image_id": record["image_id"],
                "gt_boxes": gt_boxes,
                "gt_labels": np.asarray(truth["labels"], dtype=np.int64).reshape(-1),
                "gt_difficult": (np.zeros(len(gt_boxes), bool) if difficult is None
                                 else np.asarray(difficult, dtype=bool).reshape(-1)),
                "boxes": compact_floats(output["boxes"]).reshape(-1, 4),  # the model's precision: written
                "scores": compact_floats(output["scores"]).reshape(-1),  # as float64, the same numbers
                "labels": to_numpy(output["labels"], np.int64).reshape(-1).astype(np.int32),
            })

    def load_results(self, path: str) -> None:
        """Use a folder of comp4_det_test_{class}.txt files (the devkit's 1-based lines, as
        `evaluate` writes them), or one holding them in results/<VOC2012>/Main/ (as
        `VOCSubmissionWriter` writes them: a submission scored once its annotations are at
        hand), as the detections on every image of the data set; a missing class file means no
        detections of that class. `evaluate` scores their lines as they are (not rounded to the
        precision it writes, ties in their order)."""
        self.result_lines = _process_comp4_dir(self, _comp4_folder(path, self.dataset))

    def evaluate(self) -> dict[str, float]:
        """Write the comp4 files (when there is an output_dir) and score exactly their numbers."""
        predictions = order_by_dataset(self.predictions, self.dataset.records)
        lines = (self.result_lines if self.result_lines is not None
                 else format_comp4_lines(predictions, len(self.class_names)))
        if self.output_dir:
            write_comp4_files(lines, self.class_names, self.output_dir)
        logger.info("%s: %d images, %s", self.dataset.name, len(predictions),
                    "VOC2007 11-point metric" if self.use_07_metric else "VOC2010+ area metric")
        id_of = {str(p["image_id"]): p["image_id"] for p in predictions}
        aps = np.full((len(self.class_names), len(COCO_IOU_THRESHOLDS)), math.nan)  # (K, T) fractions
        self.pr_curves = {}
        for label, name in enumerate(self.class_names, start=1):
            gt_boxes, gt_difficult = _class_ground_truth(predictions, label)
            ids, scores, boxes = parsed_comp4_lines(lines, label, COMP4_TEMPLATE.format(name))
            order = np.argsort(-scores, kind="stable")
            matches = match_detections(gt_boxes, gt_difficult, [id_of[ids[i]] for i in order], boxes[order])
            for t, thresh in enumerate(COCO_IOU_THRESHOLDS):
                result = evaluate_matches(matches, thresh, self.use_07_metric)
                aps[label - 1, t] = result.ap
                if t == 0 and result.num_pos > 0:
                    self.pr_curves[name] = (result.recall, result.precision)
        return _summarize(aps, self.class_names, self.use_07_metric)


class VOCSubmissionWriter:
    """A VOC-type test set without annotations: detections -> the evaluation server's files.

    `evaluate()` writes `<output_dir>/results/<folder>/Main/comp4_det_test_{class}.txt` (one
    file per class, also when empty; <folder>: submission_folder), lines `image_id score x1 y1
    x2 y2` in the devkit's 1-based pixels as `VOCEvaluator` writes them, but clipped to the
    image, without boxes under a pixel wide or high (`format_comp4_lines` with the images'
    sizes), and returns no metrics ({}): there is no ground truth to score against. Zip
    `results/` and upload it to the evaluation server.
    """

    curve_ap_in_metrics = False  # no curves, no metrics

    def __init__(self, dataset: DatasetInfo, output_dir: str | None = None) -> None:
        self.dataset = dataset
        self.output_dir = output_dir
        self.class_names = list(dataset.class_names)
        self.submission_folder = submission_folder(dataset)  # relative to output_dir
        self.reset()

    def reset(self) -> None:
        self.predictions: list[dict[str, Any]] = []
        self.pr_curves: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # none: nothing to score

    @property
    def submission_dir(self) -> str | None:
        """Where evaluate() writes the class files (None without an output_dir)."""
        return os.path.join(self.output_dir, self.submission_folder) if self.output_dir else None

    def process(self, records: Sequence[dict], outputs: Sequence[dict]) -> None:
        if len(records) != len(outputs):
            raise ValueError(f"process: {len(records)} records but {len(outputs)} outputs")
        for record, output in zip(records, outputs):
            self.predictions.append({
                "image_id": record["image_id"],
                "boxes": compact_floats(output["boxes"]).reshape(-1, 4),  # the model's precision: written
                "scores": compact_floats(output["scores"]).reshape(-1),  # as float64, the same numbers
                "labels": to_numpy(output["labels"], np.int64).reshape(-1).astype(np.int32),
            })

    def load_results(self, path: str) -> None:
        """Saved class files: a folder of them, or a folder holding results/<VOC2012>/Main/."""
        _process_comp4_dir(self, _comp4_folder(path, self.dataset))

    def evaluate(self) -> dict[str, float]:
        predictions = order_by_dataset(self.predictions, self.dataset.records)
        lines = format_comp4_lines(predictions, len(self.class_names), image_sizes(self.dataset.records))
        if self.submission_dir:
            write_comp4_files(lines, self.class_names, self.submission_dir)
        logger.info("%s: %d images, %d detections, no annotations: no AP computed", self.dataset.name,
                    len(predictions), sum(len(v) for v in lines.values()))
        return {}

    def upload_hint(self) -> str:
        """What to send the server, once evaluate() has written it."""
        where = Path(self.submission_dir)
        base = where.parents[2]  # the test set's folder, holding results/<VOC2012>/Main
        return (f"detections for the evaluation server written to {where} ({len(self.class_names)} files "
                f"comp4_det_test_<class>.txt): in {base}, zip them with their path ({where.relative_to(base)}/...) "
                "and upload the archive")


def submission_folder(dataset: DatasetInfo) -> str:
    """results/<year folder>/Main, where the PASCAL server looks: the data set's folder name when it
    is one (VOC2012 for voc_2012_test), else VOC2012, the server's test set (a folder renamed
    VOC2012test gave results/VOC2012test/Main, which the server does not read)."""
    folder = os.path.basename(os.path.normpath(dataset.root)) if dataset.root else ""
    return SUBMISSION_FOLDER.format(folder if re.fullmatch(r"VOC20\d\d", folder) else "VOC2012")


def _comp4_folder(path: str, dataset: DatasetInfo) -> str:
    """`path`'s results/<VOC2012>/Main when it holds one (a submission's layout), else `path`."""
    nested = os.path.join(path, submission_folder(dataset))
    return nested if os.path.isdir(nested) else path


def _class_ground_truth(predictions: Sequence[dict], label: int) -> tuple[dict, dict]:
    """image id -> devkit boxes / difficult flags of one class, for every evaluated image."""
    boxes, difficult = {}, {}
    for p in predictions:
        keep = p["gt_labels"] == label
        boxes[p["image_id"]] = to_devkit(p["gt_boxes"][keep])
        difficult[p["image_id"]] = p["gt_difficult"][keep]
    return boxes, difficult


def _summarize(aps: np.ndarray, class_names: Sequence[str], use_07_metric: bool) -> dict[str, float]:
    """(K, T) per-class APs (fractions) -> the flat metrics dict in percent."""
    aps = aps * 100.0
    valid = ~np.isnan(aps[:, 0])  # classes without positives have no AP and do not count
    means = aps[valid].mean(axis=0) if valid.any() else np.full(aps.shape[1], math.nan)  # (T,)
    metrics = {
        "mAP": float(means[0]),
        "AP": float(means.mean()),
        "AP50": float(means[0]),
        "AP75": float(means[COCO_IOU_THRESHOLDS.index(0.75)]),
        "use_07_metric": 1.0 if use_07_metric else 0.0,
    }
    metrics.update({f"AP-{name}": float(aps[k, 0]) for k, name in enumerate(class_names)})
    return metrics


def _process_comp4_dir(evaluator, folder: str) -> dict[int, list[str]]:
    """Reset `evaluator` and feed it a folder of comp4 files as the detections of every image
    of its data set (an image without lines has none); the files' lines per label, as read."""
    evaluator.reset()
    records = evaluator.dataset.records
    lines = read_comp4_lines(folder, evaluator.class_names, [r["image_id"] for r in records])
    detections = comp4_detections(lines, [r["image_id"] for r in records])
    empty = {"boxes": np.zeros((0, 4)), "scores": np.zeros(0), "labels": np.zeros(0)}
    for record in records:
        evaluator.process([record], [detections.get(record["image_id"], empty)])
    found = {int(label) for found in detections.values() for label in found["labels"]}  # (parsed once, above)
    missing = classes_without_results(evaluator.dataset.name, evaluator.class_names, records, found, folder)
    if missing:
        logger.warning("%s", missing)
    return lines
