"""PASCAL VOC average precision, computed as the official devkit computes it.

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
- AP is the VOC2007 11-point metric (at MATLAB's thresholds `0:0.1:1`, which differ from the
  Python port's `np.arange(0, 1.1, 0.1)` at 0.6 and 0.7) or the VOC2010+ area under the
  interpolated curve.

`eval_class` scores one class's boxes as given; `VOCEvaluator` (voc.py) calls `match_detections`
once per class and `evaluate_matches` at each IoU threshold, on the numbers it writes to the comp4
files (one decimal), so the two differ for unrounded boxes near a threshold (a box 4.96 wide on a
10-wide ground truth: IoU 0.496 here, 0.5 once written as 5.0).
"""
from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union

import numpy as np

ImageId = Union[int, str]


# VOCevaldet.m's 11 recall thresholds, `t=0:0.1:1` as MATLAB computes that range: from both ends
# (the first half a + k*d, the second b - k*d: MathWorks' colon algorithm), so its 0.6 and 0.7 are
# the doubles nearest 0.6 and 0.7, and its 0.3 is 3 * 0.1 = 0.30000000000000004. The Python port
# (voc_eval.py, as in py-faster-rcnn and Detectron2) takes np.arange(0, 1.1, 0.1), whose 0.6 and 0.7
# are 0.6000000000000001 and 0.7000000000000001: a recall of exactly 3/5 or 7/10 (any class whose
# positives are a multiple of 5 or 10 passes through it) reaches MATLAB's threshold, not the port's.
DEVKIT_07_THRESHOLDS = tuple(k * 0.1 for k in range(5)) + tuple(1.0 - k * 0.1 for k in range(5, -1, -1))


def voc_ap(recall: np.ndarray, precision: np.ndarray, use_07_metric: bool) -> float:
    """Average precision (a fraction 0..1) of one class from its cumulative recall/precision.

    use_07_metric: VOC2007's 11-point metric, the mean over t = 0, 0.1, ..., 1 of the best
    precision at recall >= t (0 when recall never reaches t), at the devkit's own thresholds
    (`DEVKIT_07_THRESHOLDS`: MATLAB's, float artefacts included). Otherwise VOC2010+: the area
    under the precision envelope (precision made non-increasing from the right) over the recall
    steps.
    """
    recall = np.asarray(recall, dtype=np.float64)
    precision = np.asarray(precision, dtype=np.float64)
    if use_07_metric:
        ap = 0.0
        for t in DEVKIT_07_THRESHOLDS:
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
class Matches:
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
    """The devkit's evaluation of one class, on the boxes as given (VOCEvaluator scores them as
    its comp4 files write them, to one decimal: see the module docstring).

    gt_boxes: image id -> float[G,4] XYXY 0-based boxes of this class (every evaluated image,
    also those without boxes); gt_difficult: image id -> bool[G] (None: nothing difficult).
    Detections: image id, score and 0-based XYXY box each. A detection on an image missing
    from gt_boxes is a false positive. See the module docstring for the rules.
    """
    gt_dk = {k: to_devkit(v) for k, v in gt_boxes.items()}
    difficult = {k: np.asarray(gt_difficult[k] if gt_difficult and k in gt_difficult else np.zeros(len(v)), bool)
                 for k, v in gt_dk.items()}
    order = np.argsort(-np.asarray(det_scores, dtype=np.float64), kind="stable")
    matches = match_detections(gt_dk, difficult, [det_image_ids[i] for i in order], to_devkit(det_boxes)[order])
    return evaluate_matches(matches, iou_thresh, use_07_metric)


def to_devkit(boxes: Any) -> np.ndarray:
    """Our 0-based continuous XYXY -> the devkit's 1-based inclusive numbers (x1+1, y1+1, x2, y2)."""
    out = np.asarray(boxes, dtype=np.float64).reshape(-1, 4).copy()
    out[:, :2] += 1.0
    return out


def devkit_iou(det: np.ndarray, gt: np.ndarray) -> np.ndarray:
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


def match_detections(gt: Mapping[ImageId, np.ndarray], difficult: Mapping[ImageId, np.ndarray] | None,
                     det_image_ids: Sequence[ImageId], det_boxes: np.ndarray) -> Matches:
    """Best box per detection (score it at any IoU threshold with `evaluate_matches`);
    detections already sorted by descending score, all boxes in devkit numbers (`to_devkit`)."""
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
        ov = devkit_iou(det_boxes[dets], gt[image_id])  # (d, G)
        best = ov.argmax(axis=1)  # first maximum, as the devkit's strict `ov > ovmax`
        ovmax[dets] = ov[np.arange(len(dets)), best]
        gt_index[dets] = np.where(np.isfinite(ovmax[dets]), first + best, -1)
    return Matches(ovmax, gt_index, flat_difficult, int((~flat_difficult).sum()))


def evaluate_matches(m: Matches, iou_thresh: float, use_07_metric: bool) -> ClassEval:
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
