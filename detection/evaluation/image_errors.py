"""One image's false positives and missed objects, per class, matched as the set's own metric
matches (the report's tables and galleries count what the metrics count):

- VOC (`voc_image_errors`): the devkit's rule and overlaps (voc_metric's). Predictions in score order take the ground-truth
  box they overlap most; one whose best box is taken is a false positive (a duplicate); one on
  a difficult box is neither; difficult boxes are never missed.
- COCO (`coco_image_errors`): COCOeval.evaluateImg's rule at one IoU threshold (area "all", 100
  predictions per class): a prediction takes the best-overlapping box not yet taken, non-crowd
  boxes first; a crowd region may be taken again, and its overlap is the prediction's share
  inside it; a prediction on a crowd region is neither a match nor a false positive; crowd
  regions are never missed. The ground truth is the json's as COCOeval reads it
  (`read_coco_ground_truth`: boxes as written, `ignore` taken from `iscrowd`), not the training
  records (clipped, zero-area boxes dropped). Overlaps are pycocotools' own (`mask.iou` on the
  XYWH boxes as written): computed from XYXY, an IoU of 0.4999999999999996 there came out 0.5 here.

Boxes are XYXY in pixels (COCO's ground truth XYWH as written); labels 1..K. The evaluation layer:
data in, counts out.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from detection.evaluation.coco import COCO_MAX_DETS  # COCOeval's maxDets: predictions per image and class
from detection.evaluation.voc_metric import devkit_iou, to_devkit
from detection.utils.files import USER_TEXT_ENCODING

IOU_THRESH = 0.5  # a prediction matches a ground-truth box of its class from this IoU


def voc_image_errors(gt_boxes: np.ndarray, gt_labels: np.ndarray, gt_ignored: np.ndarray,
                     detections: Mapping[str, np.ndarray], score_thresh: float,
                     iou_thresh: float = IOU_THRESH, false_positives: list[int] | None = None
                     ) -> tuple[dict[int, int], dict[int, int]]:
    """Per class, one image's false positives and missed objects among the predictions scoring
    >= score_thresh, by the VOC devkit's rule (module docstring); `gt_ignored`: difficult.
    `false_positives`, a list: gets each false positive's index among those predictions."""
    boxes, scores, labels = _kept(detections, score_thresh)
    false_pos: dict[int, int] = {}
    missed: dict[int, int] = {}
    for label in set(labels.tolist()) | set(gt_labels.tolist()):
        gt = gt_labels == label
        g_boxes, g_ignored = gt_boxes[gt].reshape(-1, 4), gt_ignored[gt]
        mine = _by_score(scores, labels == label)
        iou = devkit_iou(to_devkit(boxes[mine]), to_devkit(g_boxes))  # the metric's own float operations
        used = np.zeros(len(g_boxes), bool)
        fp = 0
        for row, index in zip(iou, mine):
            best = int(np.argmax(row)) if row.size else -1
            if best < 0 or row[best] < iou_thresh or (used[best] and not g_ignored[best]):
                fp += 1
                if false_positives is not None:
                    false_positives.append(int(index))
            elif not g_ignored[best]:
                used[best] = True
        false_pos[label], missed[label] = fp, int((~used & ~g_ignored).sum())
    return false_pos, missed


def coco_image_errors(gt_xywh: np.ndarray, gt_labels: np.ndarray, gt_crowd: np.ndarray,
                      detections: Mapping[str, np.ndarray], score_thresh: float,
                      iou_thresh: float = IOU_THRESH, max_dets: int = COCO_MAX_DETS,
                      false_positives: list[int] | None = None) -> tuple[dict[int, int], dict[int, int]]:
    """Per class, one image's false positives and missed objects among the predictions scoring
    >= score_thresh, by COCOeval's rule (module docstring; its `max_dets` highest scoring of each
    class); `gt_xywh`: the json's boxes as written, `gt_crowd`: iscrowd. The predictions' XYWH as
    the results file writes them are `detections["xywh"]` (read_detections), else made from their
    XYXY `boxes`. `false_positives`, a list: gets each false positive's index among the predictions
    scoring >= score_thresh."""
    boxes, scores, labels = _kept(detections, score_thresh, "xywh" if "xywh" in detections else "boxes")
    if "xywh" not in detections:
        boxes = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)
    gt_boxes = gt_xywh
    false_pos: dict[int, int] = {}
    missed: dict[int, int] = {}
    for label in set(labels.tolist()) | set(gt_labels.tolist()):
        gt = np.flatnonzero(gt_labels == label)
        gt = gt[np.argsort(gt_crowd[gt], kind="stable")]  # non-crowd first, as COCOeval sorts them
        g_boxes, crowd = gt_boxes[gt].reshape(-1, 4), gt_crowd[gt]
        mine = _by_score(scores, labels == label)[:max_dets]
        iou = _coco_iou(boxes[mine].reshape(-1, 4), g_boxes, crowd)
        taken = np.zeros(len(g_boxes), bool)
        fp = 0
        for row, index in zip(iou, mine):
            best, match = min(iou_thresh, 1 - 1e-10), -1
            for j in range(len(g_boxes)):
                if taken[j] and not crowd[j]:
                    continue
                if match > -1 and not crowd[match] and crowd[j]:
                    break  # a non-crowd match is never given up for a crowd region
                if row[j] < best:
                    continue
                best, match = row[j], j
            if match < 0:
                fp += 1
                if false_positives is not None:
                    false_positives.append(int(index))
            else:
                taken[match] = True
        false_pos[label], missed[label] = fp, int((~taken & ~crowd).sum())
    return false_pos, missed


def confusion_counts(kind: str, gt_boxes: np.ndarray, gt_labels: np.ndarray, gt_ignored: np.ndarray,
                     detections: Mapping[str, np.ndarray], score_thresh: float, num_classes: int,
                     iou_thresh: float = IOU_THRESH, max_dets: int = COCO_MAX_DETS) -> np.ndarray:
    """One image's (K+1, K+1) confusion counts, rows the objects' classes 1..K then "no object",
    columns the predictions' classes 1..K then "missed", from the set's own matching (`kind`
    "voc": voc_image_errors, "coco": coco_image_errors, their boxes): [g-1, g-1] class g's objects
    found; [g-1, c-1] (g != c) false positives of class c on an object of class g (IoU >= iou_thresh
    with it: the most overlapped object of another class, ignored ones left out); [K, c-1] class
    c's other false positives (on no object of another class: background, or a second detection
    of a found object); [g-1, K] class g's objects missed. A column's off-diagonal entries add to
    its class's false positives, the last column is the missed objects (MMDetection's
    confusion_matrix.py counts a prediction on several objects several times; here once)."""
    fps: list[int] = []
    if kind == "coco":
        _, missed = coco_image_errors(gt_boxes, gt_labels, gt_ignored, detections, score_thresh, iou_thresh,
                                      max_dets, false_positives=fps)
        boxes, _, labels = _kept(detections, score_thresh, "xywh" if "xywh" in detections else "boxes")
        if "xywh" not in detections:
            boxes = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)
    else:
        _, missed = voc_image_errors(gt_boxes, gt_labels, gt_ignored, detections, score_thresh, iou_thresh,
                                     false_positives=fps)
        boxes, _, labels = _kept(detections, score_thresh)
    k = num_classes
    counts = np.zeros((k + 1, k + 1), np.int64)
    objects = ~gt_ignored
    for label in set(gt_labels[objects].tolist()):
        total = int((gt_labels[objects] == label).sum())
        counts[label - 1, label - 1] = total - missed.get(label, 0)
        counts[label - 1, k] = missed.get(label, 0)
    for index in fps:
        label = int(labels[index])
        others = np.flatnonzero(objects & (gt_labels != label))
        row = k
        if len(others):
            if kind == "coco":
                iou = _coco_iou(boxes[index:index + 1], gt_boxes[others], np.zeros(len(others), bool))[0]
            else:
                iou = devkit_iou(to_devkit(boxes[index:index + 1]), to_devkit(gt_boxes[others]))[0]
            best = int(np.argmax(iou))
            if iou[best] >= iou_thresh:
                row = int(gt_labels[others[best]]) - 1
        counts[row, label - 1] += 1
    return counts


def read_coco_ground_truth(ann_file: str | Path, label_to_category_id: Mapping[int, int]
                           ) -> dict[Any, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """image id -> (XYWH boxes as the json writes them, labels 1..K, crowd flags) of a COCO json's
    annotations of the model's categories: what COCOeval scores (its `ignore` is `iscrowd`)."""
    with open(ann_file, encoding=USER_TEXT_ENCODING) as f:  # as the reader took it
        annotations = json.load(f).get("annotations", [])
    label_of = {int(c): int(label) for label, c in label_to_category_id.items()}
    found: dict[Any, list[tuple[float, float, float, float, int, bool]]] = {}
    for ann in annotations:
        if ann.get("category_id") in label_of:
            x, y, w, h = (float(v) for v in ann["bbox"])
            found.setdefault(ann["image_id"], []).append((x, y, w, h, label_of[ann["category_id"]],
                                                          bool(ann.get("iscrowd", 0))))
    return {image_id: (np.array([r[:4] for r in rows], np.float64).reshape(-1, 4),
                       np.array([r[4] for r in rows], np.int64), np.array([r[5] for r in rows], bool))
            for image_id, rows in found.items()}


def _kept(detections: Mapping[str, np.ndarray], score_thresh: float, boxes: str = "boxes") -> tuple[np.ndarray, ...]:
    """(boxes (N, 4) float64 from detections[boxes], scores, labels) of the predictions >= score_thresh."""
    keep = np.asarray(detections["scores"]) >= score_thresh
    return (np.asarray(detections[boxes], np.float64).reshape(-1, 4)[keep], np.asarray(detections["scores"])[keep],
            np.asarray(detections["labels"])[keep])


def _by_score(scores: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Indices where `mask`, highest score first (ties in the given order, as a stable sort)."""
    mine = np.flatnonzero(mask)
    return mine[np.argsort(-scores[mine], kind="stable")]


def _coco_iou(a: np.ndarray, b: np.ndarray, crowd: np.ndarray) -> np.ndarray:
    """(A, 4) x (B, 4) XYWH -> (A, B) IoU by pycocotools itself (against a crowd region of `crowd`
    the intersection over a's own area), so its rounding is COCOeval's."""
    from pycocotools import mask as mask_utils

    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)))
    return np.asarray(mask_utils.iou(np.ascontiguousarray(a, np.float64), np.ascontiguousarray(b, np.float64),
                                     [int(c) for c in crowd]), np.float64).reshape(len(a), len(b))
