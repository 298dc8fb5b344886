"""Box refinement with box voting, the ResNet paper's Appendix B (config `test.box_refinement`).

Shapes: R RoIs of one image, K foreground classes, M candidate detections, D kept ones.

The head's regressed box (of each RoI's top-scoring class) is pooled again and classified
and regressed a second time (`Res5ROIHeads.refine`); the R new and the R original
predictions are pooled, per-class NMS runs on the union at `nms_thresh` (the paper: 0.3),
and then box voting (Gidaris & Komodakis, "Object detection via a multi-region & semantic
segmentation-aware CNN model", 2015): each kept box becomes the score-weighted mean of all
candidate boxes of its class that overlap it at IoU >= `voting_iou`; its score is kept.
The candidates are those that entered the NMS (score above the head's score threshold).
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor
from torchvision.ops import box_iou


@dataclass(frozen=True)
class BoxRefinement:
    """Settings of the refinement step (`test.box_refinement` without `enabled`)."""

    nms_thresh: float = 0.3
    voting: bool = True
    voting_iou: float = 0.5


def box_voting(kept_boxes: Tensor, kept_labels: Tensor, boxes: Tensor, scores: Tensor, labels: Tensor,
               iou_threshold: float) -> Tensor:
    """Kept boxes (D, 4) with labels (D,) -> (D, 4): each the score-weighted mean of the
    candidates (M, 4) (scores (M,), labels (M,)) of its label at IoU >= iou_threshold with it.

    A kept box is one of the candidates, so its own weight is always there (no empty mean)."""
    if kept_boxes.numel() == 0:
        return kept_boxes
    overlap = box_iou(kept_boxes, boxes) >= iou_threshold  # (D, M)
    same_class = kept_labels[:, None] == labels[None, :]  # (D, M)
    weights = (overlap & same_class).to(scores.dtype) * scores[None, :]  # (D, M)
    return (weights @ boxes) / weights.sum(dim=1, keepdim=True)  # (D, M) x (M, 4) -> (D, 4)
