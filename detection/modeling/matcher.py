"""Assign each prediction (anchor / proposal) to a ground-truth box by IoU.

Labels: -1 ignore, 0 background, 1 foreground. Shapes: G ground-truth boxes, P predictions.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

IGNORE, BACKGROUND, FOREGROUND = -1, 0, 1


class Matcher:
    """IoU thresholds -> fg / bg / ignore.

    thresholds = [t]: IoU < t is background, IoU >= t foreground (the RoI head, 0.5).
    thresholds = [low, high]: IoU < low background, [low, high) ignored, >= high foreground
    (the RPN, 0.3 / 0.7).
    allow_low_quality_matches: the Faster R-CNN rule that every ground-truth box's
    best-overlapping predictions (all of them when tied) are foreground even below `high`,
    so no ground-truth box is left without a positive. A box whose best IoU is 0 overlaps
    nothing and promotes nothing (torchvision / Detectron2 would promote every prediction).
    """

    def __init__(self, thresholds: Sequence[float], allow_low_quality_matches: bool = False) -> None:
        thresholds = [float(t) for t in thresholds]
        if len(thresholds) not in (1, 2) or thresholds != sorted(thresholds):
            raise ValueError(f"Matcher: thresholds must be [t] or [low, high] with low <= high, "
                             f"got {thresholds!r}")
        self.low, self.high = thresholds[0], thresholds[-1]
        self.allow_low_quality_matches = allow_low_quality_matches

    def __call__(self, match_quality_matrix: Tensor) -> tuple[Tensor, Tensor]:
        """IoU matrix (G, P) -> (matched gt index (P,) int64, label (P,) int8).

        With no ground truth (G == 0) every prediction is background, matched to index 0
        (callers must not use the index then).
        """
        num_gt, num_pred = match_quality_matrix.shape
        device = match_quality_matrix.device
        if num_gt == 0:
            return (torch.zeros(num_pred, dtype=torch.int64, device=device),
                    torch.full((num_pred,), BACKGROUND, dtype=torch.int8, device=device))
        if num_pred == 0:
            return (torch.zeros(0, dtype=torch.int64, device=device),
                    torch.zeros(0, dtype=torch.int8, device=device))
        best_iou, matched = match_quality_matrix.max(dim=0)  # (P,)
        labels = torch.full((num_pred,), IGNORE, dtype=torch.int8, device=device)
        labels[best_iou < self.low] = BACKGROUND
        labels[best_iou >= self.high] = FOREGROUND
        if self.allow_low_quality_matches:
            self._promote_best(match_quality_matrix, labels)
        return matched, labels

    @staticmethod
    def _promote_best(match_quality_matrix: Tensor, labels: Tensor) -> None:
        best_per_gt = match_quality_matrix.max(dim=1, keepdim=True).values  # (G, 1)
        is_best = (match_quality_matrix == best_per_gt) & (best_per_gt > 0)  # (G, P), ties kept
        labels[is_best.any(dim=0)] = FOREGROUND
