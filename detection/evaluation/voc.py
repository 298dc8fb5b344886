"""PASCAL VOC detection metrics, computed as the official devkit computes them.

The reference is the devkit's MATLAB code (VOCevaldet.m, VOCap.m), matched rule by rule:

- detections of a class are sorted by descending score; ties keep their file order
  (MATLAB's `sort` is stable);
- each detection is compared with every ground-truth box of its image and assigned to
  the one of largest overlap (the first one on ties), whether that box is difficult or
  already taken;
- overlap uses the devkit's pixel convention: its boxes are 1-based inclusive pixel
  indices, so widths are `x2 - x1 + 1`. Our boxes are 0-based continuous
  (x1 - 1, y1 - 1, x2, y2 of the devkit's numbers), so they are converted back to
  (x1 + 1, y1 + 1, x2, y2) first, as Detectron2's voc_eval does;
- a detection matches when `ovmax >= 0.5` (VOCevaldet.m: `if ovmax>=VOCopts.minoverlap`),
  so an overlap of exactly 0.5 is a true positive. (The Python port used by
  py-faster-rcnn and Detectron2 writes `ovmax > ovthresh`; it differs only there.);
- a match on a difficult box is neither a true nor a false positive, a second match on
  the same box is a false positive (a duplicate), no match is a false positive, and
  only non-difficult boxes count as positives;
- AP is the VOC2007 11-point metric or the VOC2010+ area under the interpolated curve.

`VOCEvaluator` evaluates exactly the numbers it writes to the comp4 result files (coords
with one decimal, as Detectron2 writes them), so re-evaluating the files gives the same AP.
It scores every box as given, as the devkit would (also a results folder's unclipped ones).

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
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Union

import numpy as np

from detection.data import DataError
from detection.evaluation.inference import compact_floats, order_by_dataset, to_numpy
from detection.utils.files import atomic_write

if TYPE_CHECKING:
    from detection.data.dataset_info import DatasetInfo

logger = logging.getLogger(__name__)

ImageId = Union[int, str]
COMP4_TEMPLATE = "comp4_det_test_{}.txt"
# the devkit's results folder (VOCopts.detrespath): what the evaluation server expects in the upload
SUBMISSION_FOLDER = os.path.join("results", "{}", "Main")
# COCO-style AP on VOC: thresholds 0.50, 0.55, ..., 0.95 (exact decimals, as Detectron2's loop)
COCO_IOU_THRESHOLDS = tuple(t / 100 for t in range(50, 100, 5))


def voc_ap(recall: np.ndarray, precision: np.ndarray, use_07_metric: bool) -> float:
    """Average precision (a fraction 0..1) of one class from its cumulative recall/precision.

    use_07_metric: VOC2007's 11-point metric, the mean over t = 0, 0.1, ..., 1 of the best
    precision at recall >= t (0 when recall never reaches t). The thresholds are
    `np.arange(0, 1.1, 0.1)` as in the Python devkit port, float artefacts included
    (the fourth is 0.30000000000000004). Otherwise VOC2010+: the area under the precision
    envelope (precision made non-increasing from the right) over the recall steps.
    """
    recall = np.asarray(recall, dtype=np.float64)
    precision = np.asarray(precision, dtype=np.float64)
    if use_07_metric:
        ap = 0.0
        for t in np.arange(0.0, 1.1, 0.1):
            reached = recall >= t
            ap += (np.max(precision[reached]) if reached.any() else 0.0) / 11.0
        return float(ap)
    mrec = np.concatenate(([0.0], recall, [1.0]))
    mpre = np.concatenate(([0.0], precision, [0.0]))
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]  # the envelope: max precision to the right
    steps = np.flatnonzero(mrec[1:] != mrec[:-1])  # recall changes between steps and steps+1
    return float(np.sum((mrec[steps + 1] - mrec[steps]) * mpre[steps + 1]))


@dataclass
class ClassEval:
    """One class at one IoU threshold; arrays follow the detections in descending score order."""

    recall: np.ndarray  # float64[D], cumulative
    precision: np.ndarray  # float64[D], cumulative
    ap: float  # fraction 0..1; nan when the class has no non-difficult ground truth
    num_pos: int  # non-difficult ground-truth boxes


@dataclass
class _Matches:
    """Threshold-independent part of the devkit's matching for one class.

    The devkit picks each detection's best box before looking at any state, so the
    overlaps are computed once and reused for every IoU threshold.
    """

    ovmax: np.ndarray  # float64[D] best overlap, -inf when the image has no overlapping box
    gt_index: np.ndarray  # int64[D] index of that box in the flattened ground truth, -1 if none
    gt_difficult: np.ndarray  # bool[G] flattened over images
    num_pos: int


def eval_class(gt_boxes: Mapping[ImageId, np.ndarray], gt_difficult: Mapping[ImageId, np.ndarray] | None,
               det_image_ids: Sequence[ImageId], det_scores: np.ndarray, det_boxes: np.ndarray, *,
               iou_thresh: float = 0.5, use_07_metric: bool = False) -> ClassEval:
    """The devkit's evaluation of one class.

    gt_boxes: image id -> float[G,4] XYXY 0-based boxes of this class (every evaluated image,
    also those without boxes); gt_difficult: image id -> bool[G] (None: nothing difficult).
    Detections: image id, score and 0-based XYXY box each. A detection on an image missing
    from gt_boxes is a false positive. See the module docstring for the rules.
    """
    gt_dk = {k: _to_devkit(v) for k, v in gt_boxes.items()}
    difficult = {k: np.asarray(gt_difficult[k] if gt_difficult and k in gt_difficult else np.zeros(len(v)), bool)
                 for k, v in gt_dk.items()}
    order = np.argsort(-np.asarray(det_scores, dtype=np.float64), kind="stable")
    matches = _match(gt_dk, difficult, [det_image_ids[i] for i in order], _to_devkit(det_boxes)[order])
    return _evaluate_at(matches, iou_thresh, use_07_metric)


def _to_devkit(boxes: Any) -> np.ndarray:
    """Our 0-based continuous XYXY -> the devkit's 1-based inclusive numbers (x1+1, y1+1, x2, y2)."""
    out = np.asarray(boxes, dtype=np.float64).reshape(-1, 4).copy()
    out[:, :2] += 1.0
    return out


def _devkit_iou(det: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """(D,4) x (G,4) devkit boxes -> (D,G) overlaps, -inf where the boxes do not intersect
    (VOCevaldet.m skips those, so they never win the max); same float operations as the devkit."""
    iw = np.minimum(det[:, None, 2], gt[None, :, 2]) - np.maximum(det[:, None, 0], gt[None, :, 0]) + 1.0
    ih = np.minimum(det[:, None, 3], gt[None, :, 3]) - np.maximum(det[:, None, 1], gt[None, :, 1]) + 1.0
    inter = iw * ih
    area_det = (det[:, 2] - det[:, 0] + 1.0) * (det[:, 3] - det[:, 1] + 1.0)
    area_gt = (gt[:, 2] - gt[:, 0] + 1.0) * (gt[:, 3] - gt[:, 1] + 1.0)
    union = area_det[:, None] + area_gt[None, :] - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        ov = inter / union
    return np.where((iw > 0) & (ih > 0), ov, -np.inf)


def _match(gt: Mapping[ImageId, np.ndarray], difficult: Mapping[ImageId, np.ndarray] | None,
           det_image_ids: Sequence[ImageId], det_boxes: np.ndarray) -> _Matches:
    """Best box per detection; detections already sorted, all boxes in devkit numbers."""
    offsets, start = {}, 0
    for image_id, boxes in gt.items():
        offsets[image_id] = (start, len(boxes))
        start += len(boxes)
    flat_difficult = np.zeros(start, dtype=bool)
    if difficult is not None:
        for image_id, (first, count) in offsets.items():
            flat_difficult[first:first + count] = difficult[image_id].reshape(-1)[:count]
    ovmax = np.full(len(det_image_ids), -np.inf)
    gt_index = np.full(len(det_image_ids), -1, dtype=np.int64)
    by_image: dict[ImageId, list[int]] = defaultdict(list)
    for d, image_id in enumerate(det_image_ids):
        by_image[image_id].append(d)
    for image_id, dets in by_image.items():
        first, count = offsets.get(image_id, (0, 0))
        if count == 0:
            continue
        ov = _devkit_iou(det_boxes[dets], gt[image_id])  # (d, G)
        best = ov.argmax(axis=1)  # first maximum, as the devkit's strict `ov > ovmax`
        ovmax[dets] = ov[np.arange(len(dets)), best]
        gt_index[dets] = np.where(np.isfinite(ovmax[dets]), first + best, -1)
    return _Matches(ovmax, gt_index, flat_difficult, int((~flat_difficult).sum()))


def _evaluate_at(m: _Matches, iou_thresh: float, use_07_metric: bool) -> ClassEval:
    """True/false positives at one threshold, then recall, precision and AP."""
    hit = m.ovmax >= iou_thresh  # the devkit's `ovmax >= minoverlap`
    on_difficult = np.zeros_like(hit)
    on_difficult[hit] = m.gt_difficult[m.gt_index[hit]]
    candidates = np.flatnonzero(hit & ~on_difficult)
    # the first hit on a box (in score order) takes it, every later hit is a duplicate
    _, first = np.unique(m.gt_index[candidates], return_index=True)
    tp = np.zeros(len(hit))
    tp[candidates[first]] = 1.0
    fp = (~hit).astype(np.float64)
    fp[candidates] = 1.0 - tp[candidates]
    tp, fp = np.cumsum(tp), np.cumsum(fp)
    precision = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)  # 0 where only difficult hits so far
    if m.num_pos == 0:
        return ClassEval(np.zeros_like(tp), precision, math.nan, 0)
    recall = tp / m.num_pos
    return ClassEval(recall, precision, voc_ap(recall, precision, use_07_metric), m.num_pos)


class VOCEvaluator:
    """Collects predictions, writes `comp4_det_test_{class}.txt` and reports VOC metrics.

    `evaluate()` returns percentages: "mAP" (IoU 0.5, the data set's metric), "AP"
    (mean over IoU 0.50:0.95 of the mAP at each threshold, as Detectron2 reports it on
    VOC), "AP50" (= "mAP"), "AP75", "use_07_metric" (1.0: VOC2007 11-point, 0.0: VOC2010+
    area) and "AP-<class>" (IoU 0.5; nan for a class without non-difficult ground truth,
    which does not count in the means). After it, `pr_curves[class] = (recall, precision)`
    at IoU 0.5.
    """

    def __init__(self, dataset: DatasetInfo, output_dir: str | None = None) -> None:
        self.dataset = dataset
        self.output_dir = output_dir
        self.class_names = list(dataset.class_names)
        self.use_07_metric = bool(dataset.use_07_metric)
        self.reset()

    def reset(self) -> None:
        self.predictions: list[dict[str, Any]] = []  # one entry per image; gathered across processes
        self.pr_curves: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def process(self, records: Sequence[dict], outputs: Sequence[dict]) -> None:
        """Keep each image's ground truth (from its record) and its detections (as numpy)."""
        if len(records) != len(outputs):
            raise ValueError(f"process: {len(records)} records but {len(outputs)} outputs")
        for record, output in zip(records, outputs):
            gt_boxes = np.asarray(record["boxes"], dtype=np.float32).reshape(-1, 4)
            difficult = record.get("difficult")
            self.predictions.append({
                "image_id": record["image_id"],
                "gt_boxes": gt_boxes,
                "gt_labels": np.asarray(record["labels"], dtype=np.int64).reshape(-1),
                "gt_difficult": (np.zeros(len(gt_boxes), bool) if difficult is None
                                 else np.asarray(difficult, dtype=bool).reshape(-1)),
                "boxes": compact_floats(output["boxes"]).reshape(-1, 4),  # the model's precision: written
                "scores": compact_floats(output["scores"]).reshape(-1),  # as float64, the same numbers
                "labels": to_numpy(output["labels"], np.int64).reshape(-1).astype(np.int32),
            })

    def load_results(self, path: str) -> None:
        """Use a folder of comp4_det_test_{class}.txt files (the devkit's 1-based lines, as
        `evaluate` writes them) as the detections on every image of the data set; a missing
        class file means no detections of that class."""
        _process_comp4_dir(self, path)

    def evaluate(self) -> dict[str, float]:
        """Write the comp4 files (when there is an output_dir) and score exactly their numbers."""
        predictions = order_by_dataset(self.predictions, self.dataset.records)
        lines = format_comp4_lines(predictions, len(self.class_names))
        if self.output_dir:
            write_comp4_files(lines, self.class_names, self.output_dir)
        logger.info("%s: %d images, %s", self.dataset.name, len(predictions),
                    "VOC2007 11-point metric" if self.use_07_metric else "VOC2010+ area metric")
        id_of = {str(p["image_id"]): p["image_id"] for p in predictions}
        aps = np.full((len(self.class_names), len(COCO_IOU_THRESHOLDS)), math.nan)  # (K, T) fractions
        self.pr_curves = {}
        for label, name in enumerate(self.class_names, start=1):
            gt_boxes, gt_difficult = _class_ground_truth(predictions, label)
            ids, scores, boxes = parse_comp4_lines(lines[label], COMP4_TEMPLATE.format(name))
            order = np.argsort(-scores, kind="stable")
            matches = _match(gt_boxes, gt_difficult, [id_of[ids[i]] for i in order], boxes[order])
            for t, thresh in enumerate(COCO_IOU_THRESHOLDS):
                result = _evaluate_at(matches, thresh, self.use_07_metric)
                aps[label - 1, t] = result.ap
                if t == 0 and result.num_pos > 0:
                    self.pr_curves[name] = (result.recall, result.precision)
        return _summarize(aps, self.class_names, self.use_07_metric)


class VOCSubmissionWriter:
    """A VOC-type test set without annotations: detections -> the evaluation server's files.

    `evaluate()` writes `<output_dir>/results/<folder>/Main/comp4_det_test_{class}.txt` (one
    file per class, also when empty; <folder> is the data set's folder name, VOC2012 for
    voc_2012_test), lines `image_id score x1 y1 x2 y2` in the devkit's 1-based pixels as
    `VOCEvaluator` writes them, but clipped to the image, without boxes under a pixel wide or
    high (`format_comp4_lines` with the images' sizes), and returns no metrics ({}): there is
    no ground truth to score against. Zip `results/` and upload it to the evaluation server.
    """

    def __init__(self, dataset: DatasetInfo, output_dir: str | None = None) -> None:
        self.dataset = dataset
        self.output_dir = output_dir
        self.class_names = list(dataset.class_names)
        folder = os.path.basename(os.path.normpath(dataset.root)) if dataset.root else "VOC2012"
        self.submission_folder = SUBMISSION_FOLDER.format(folder)  # relative to output_dir
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
        """Saved class files: a folder of them, or a folder holding results/<folder>/Main/."""
        nested = os.path.join(path, self.submission_folder)
        _process_comp4_dir(self, nested if os.path.isdir(nested) else path)

    def evaluate(self) -> dict[str, float]:
        predictions = order_by_dataset(self.predictions, self.dataset.records)
        lines = format_comp4_lines(predictions, len(self.class_names), image_sizes(self.dataset.records))
        if self.submission_dir:
            write_comp4_files(lines, self.class_names, self.submission_dir)
        logger.info("%s: %d images, %d detections, no annotations: no AP computed%s", self.dataset.name,
                    len(predictions), sum(len(v) for v in lines.values()),
                    f"; submission files in {self.submission_dir}" if self.submission_dir else "")
        return {}


def format_comp4_lines(predictions: Sequence[dict], num_classes: int,
                       sizes: Mapping[ImageId, tuple[int, int]] | None = None) -> dict[int, list[str]]:
    """label -> devkit result lines `image_id score x1 y1 x2 y2` (1-based: x1+1, y1+1, x2, y2;
    one decimal like Detectron2, scores with 6 so that rounding adds few ties); every box as
    given. With `sizes` (image id -> (width, height); for the evaluation server), boxes are
    first clipped to the image (0..width, 0..height), as the model's postprocess clips, and a
    box less than one pixel wide or high is then left out, as the model drops empty boxes: its
    devkit numbers would be inverted (x1 + 1 > x2; e.g. a 0.2 px box at the border)."""
    lines: dict[int, list[str]] = {label: [] for label in range(1, num_classes + 1)}
    for p in predictions:
        size = None if sizes is None else sizes.get(p["image_id"], (0, 0))
        for box, score, label in zip(p["boxes"].tolist(), p["scores"].tolist(), p["labels"].tolist()):
            if label not in lines:
                raise ValueError(f"image {p['image_id']}: predicted label {label} is not in 1..{num_classes}")
            coords = _devkit_coords(box, size)
            if coords is not None:
                lines[label].append(f"{p['image_id']} {score:.6f} {coords}")
    return lines


def _devkit_coords(box: Sequence[float], size: tuple[int, int] | None) -> str | None:
    """A 0-based continuous box as the devkit's 1-based numbers with one decimal. With a size:
    clipped to the image first (unless the size is unknown, 0), and None when the written
    numbers would be inverted (the box is less than one pixel wide or high)."""
    x1, y1, x2, y2 = box
    if size and min(size) > 0:  # 0: a record whose size was not read
        width, height = size
        x1, x2 = (min(max(x, 0.0), width) for x in (x1, x2))
        y1, y2 = (min(max(y, 0.0), height) for y in (y1, y2))
    text = [f"{v:.1f}" for v in (x1 + 1, y1 + 1, x2, y2)]
    if size is None:
        return " ".join(text)
    values = [float(t) for t in text]  # compare what is written, after rounding
    return None if values[2] < values[0] or values[3] < values[1] else " ".join(text)


def image_sizes(records: Sequence[dict]) -> dict[ImageId, tuple[int, int]]:
    """image id -> (width, height) of a data set's records (0 where a size was not read)."""
    return {r["image_id"]: (int(r.get("width") or 0), int(r.get("height") or 0)) for r in records}


def parse_comp4_lines(lines: Sequence[str], source: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Devkit lines -> (image ids, float64[D] scores, float64[D,4] boxes in the devkit's numbers)."""
    ids, values = [], []
    for number, line in enumerate(lines, start=1):
        fields = line.split()
        if not fields:
            continue
        try:
            if len(fields) != 6:
                raise ValueError("wrong number of fields")
            row = [float(v) for v in fields[1:]]
        except ValueError:
            raise DataError(f"{source}:{number}: expected 'image_id score x1 y1 x2 y2', "
                            f"got {line.strip()!r}") from None
        if not all(math.isfinite(v) for v in row):
            raise DataError(f"{source}:{number}: a score or coordinate that is not a finite number: {line.strip()!r}")
        values.append(row)
        ids.append(fields[0])
    array = np.asarray(values, dtype=np.float64).reshape(-1, 5)
    return ids, array[:, 0], array[:, 1:]


def write_comp4_files(lines: Mapping[int, Sequence[str]], class_names: Sequence[str], output_dir: str) -> None:
    """One file per class, each written whole or not at all (a full disk leaves the old file)."""
    for label, name in enumerate(class_names, start=1):
        with atomic_write(os.path.join(output_dir, COMP4_TEMPLATE.format(name))) as f:
            f.writelines(line + "\n" for line in lines[label])


def read_comp4_dir(path: str, class_names: Sequence[str], image_ids: Sequence[ImageId]) -> dict[ImageId, dict]:
    """A folder of comp4 files -> image id -> {"boxes" (0-based), "scores", "labels"} as numpy."""
    if not os.path.isdir(path):
        raise DataError(f"{path}: not a folder; VOC-type results are a folder of "
                        f"{COMP4_TEMPLATE.format('<class>')} files")
    id_of = {str(i): i for i in image_ids}
    per_image: dict[ImageId, list] = defaultdict(list)  # image id -> [(score, x1, y1, x2, y2, label)]
    found = 0
    for label, name in enumerate(class_names, start=1):
        file = os.path.join(path, COMP4_TEMPLATE.format(name))
        if os.path.isdir(file):
            raise DataError(f"{file}: is a folder, not a results file")
        if not os.path.isfile(file):
            logger.warning("%s: missing, no detections of class %s", file, name)
            continue
        found += 1
        try:
            with open(file, encoding="utf-8") as f:
                lines = f.readlines()
        except UnicodeDecodeError as err:
            raise DataError(f"{file}: not UTF-8 text (byte {err.start}); results files hold "
                            "'image_id score x1 y1 x2 y2' lines") from None
        ids, scores, boxes = parse_comp4_lines(lines, file)
        for image_id, score, (x1, y1, x2, y2) in zip(ids, scores.tolist(), boxes.tolist()):
            if image_id not in id_of:
                raise DataError(f"{file}: image {image_id!r} is not in the data set")
            per_image[id_of[image_id]].append((score, x1 - 1.0, y1 - 1.0, x2, y2, label))
    if not found:
        raise DataError(f"{path}: no {COMP4_TEMPLATE.format('<class>')} file for any of the data set's classes")
    out = {}
    for image_id, rows in per_image.items():
        array = np.asarray(rows, dtype=np.float64)  # (D, 6)
        out[image_id] = {"boxes": array[:, 1:5], "scores": array[:, 0], "labels": array[:, 5].astype(np.int64)}
    return out


def _class_ground_truth(predictions: Sequence[dict], label: int) -> tuple[dict, dict]:
    """image id -> devkit boxes / difficult flags of one class, for every evaluated image."""
    boxes, difficult = {}, {}
    for p in predictions:
        keep = p["gt_labels"] == label
        boxes[p["image_id"]] = _to_devkit(p["gt_boxes"][keep])
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


def _process_comp4_dir(evaluator, folder: str) -> None:
    """Reset `evaluator` and feed it a folder of comp4 files as the detections of every image
    of its data set (an image without lines has none)."""
    evaluator.reset()
    records = evaluator.dataset.records
    detections = read_comp4_dir(folder, evaluator.class_names, [r["image_id"] for r in records])
    empty = {"boxes": np.zeros((0, 4)), "scores": np.zeros(0), "labels": np.zeros(0)}
    for record in records:
        evaluator.process([record], [detections.get(record["image_id"], empty)])
