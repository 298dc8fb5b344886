"""One image's false positives and missed objects, per class, matched as the set's own metric
matches (the report's tables and galleries count what the metrics count):

- VOC (`voc_image_errors`): the devkit's rule. Predictions in score order take the ground-truth
  box they overlap most; one whose best box is taken is a false positive (a duplicate); one on
  a difficult box is neither; difficult boxes are never missed.
- COCO (`coco_image_errors`): COCOeval.evaluateImg's rule at one IoU threshold (area "all", 100
  predictions per class): a prediction takes the best-overlapping box not yet taken, non-crowd
  boxes first; a crowd region may be taken again, and its overlap is the prediction's share
  inside it; a prediction on a crowd region is neither a match nor a false positive; crowd
  regions are never missed. The ground truth is the json's as COCOeval reads it
  (`read_coco_ground_truth`: boxes as written, `ignore` taken from `iscrowd`), not the training
  records (clipped, zero-area boxes dropped).

Boxes are XYXY in pixels; labels 1..K. The evaluation layer: data in, counts out.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

IOU_THRESH = 0.5  # a prediction matches a ground-truth box of its class from this IoU
COCO_MAX_DETS = 100  # COCOeval's maxDets for AP: the first 100 predictions per image and class


def voc_image_errors(gt_boxes: np.ndarray, gt_labels: np.ndarray, gt_ignored: np.ndarray,
                     detections: Mapping[str, np.ndarray], score_thresh: float,
                     iou_thresh: float = IOU_THRESH) -> tuple[dict[int, int], dict[int, int]]:
    """Per class, one image's false positives and missed objects among the predictions scoring
    >= score_thresh, by the VOC devkit's rule (module docstring); `gt_ignored`: difficult."""
    boxes, scores, labels = _kept(detections, score_thresh)
    false_pos: dict[int, int] = {}
    missed: dict[int, int] = {}
    for label in set(labels.tolist()) | set(gt_labels.tolist()):
        gt = gt_labels == label
        g_boxes, g_ignored = gt_boxes[gt].reshape(-1, 4), gt_ignored[gt]
        mine = _by_score(scores, labels == label)
        iou = _iou(boxes[mine].reshape(-1, 4), g_boxes)
        used = np.zeros(len(g_boxes), bool)
        fp = 0
        for row in iou:
            best = int(np.argmax(row)) if row.size else -1
            if best < 0 or row[best] < iou_thresh:
                fp += 1
            elif g_ignored[best]:
                continue
            elif used[best]:
                fp += 1
            else:
                used[best] = True
        false_pos[label], missed[label] = fp, int((~used & ~g_ignored).sum())
    return false_pos, missed


def coco_image_errors(gt_boxes: np.ndarray, gt_labels: np.ndarray, gt_crowd: np.ndarray,
                      detections: Mapping[str, np.ndarray], score_thresh: float,
                      iou_thresh: float = IOU_THRESH) -> tuple[dict[int, int], dict[int, int]]:
    """Per class, one image's false positives and missed objects among the predictions scoring
    >= score_thresh, by COCOeval's rule (module docstring); `gt_crowd`: iscrowd."""
    boxes, scores, labels = _kept(detections, score_thresh)
    false_pos: dict[int, int] = {}
    missed: dict[int, int] = {}
    for label in set(labels.tolist()) | set(gt_labels.tolist()):
        gt = np.flatnonzero(gt_labels == label)
        gt = gt[np.argsort(gt_crowd[gt], kind="stable")]  # non-crowd first, as COCOeval sorts them
        g_boxes, crowd = gt_boxes[gt].reshape(-1, 4), gt_crowd[gt]
        mine = _by_score(scores, labels == label)[:COCO_MAX_DETS]
        iou = _iou(boxes[mine].reshape(-1, 4), g_boxes, crowd)
        taken = np.zeros(len(g_boxes), bool)
        fp = 0
        for row in iou:
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
            else:
                taken[match] = True
        false_pos[label], missed[label] = fp, int((~taken & ~crowd).sum())
    return false_pos, missed


def read_coco_ground_truth(ann_file: str | Path, label_to_category_id: Mapping[int, int]
                           ) -> dict[Any, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """image id -> (XYXY boxes as the json writes them, labels 1..K, crowd flags) of a COCO json's
    annotations of the model's categories: what COCOeval scores (its `ignore` is `iscrowd`)."""
    with open(ann_file, encoding="utf-8") as f:
        annotations = json.load(f).get("annotations", [])
    label_of = {int(c): int(label) for label, c in label_to_category_id.items()}
    found: dict[Any, list[tuple[float, float, float, float, int, bool]]] = {}
    for ann in annotations:
        if ann.get("category_id") in label_of:
            x, y, w, h = (float(v) for v in ann["bbox"])  # XYWH -> XYXY
            found.setdefault(ann["image_id"], []).append((x, y, x + w, y + h, label_of[ann["category_id"]],
                                                          bool(ann.get("iscrowd", 0))))
    return {image_id: (np.array([r[:4] for r in rows], np.float64).reshape(-1, 4),
                       np.array([r[4] for r in rows], np.int64), np.array([r[5] for r in rows], bool))
            for image_id, rows in found.items()}


def _kept(detections: Mapping[str, np.ndarray], score_thresh: float) -> tuple[np.ndarray, ...]:
    keep = np.asarray(detections["scores"]) >= score_thresh
    return tuple(np.asarray(detections[k])[keep] for k in ("boxes", "scores", "labels"))


def _by_score(scores: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Indices where `mask`, highest score first (ties in the given order, as a stable sort)."""
    mine = np.flatnonzero(mask)
    return mine[np.argsort(-scores[mine], kind="stable")]


def _iou(a: np.ndarray, b: np.ndarray, crowd: np.ndarray | None = None) -> np.ndarray:
    """(A, 4) x (B, 4) XYXY -> (A, B) IoU, continuous coordinates; against a crowd region of
    `crowd` the intersection over a's own area (pycocotools' iscrowd rule)."""
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)))
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])  # noqa: E731
    union = area(a)[:, None] + area(b)[None, :] - inter
    if crowd is not None:
        union = np.where(crowd[None, :], area(a)[:, None], union)
    return inter / np.maximum(union, 1e-9)
