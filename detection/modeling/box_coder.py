"""Box <-> delta transform of R-CNN (Girshick et al.), as in Detectron2 / torchvision.

For a reference box with centre (x, y), width w, height h and a target box (x*, y*, w*, h*):
    dx = wx * (x* - x) / w      dy = wy * (y* - y) / h
    dw = ww * log(w* / w)       dh = wh * log(h* / h)
Widths are x2 - x1 (continuous coordinates, no "+1"). The weights are (10, 10, 5, 5)
for the box head and (1, 1, 1, 1) for the RPN.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

# Largest exp() argument in decoding: a box may grow at most 1000/16 times its reference,
# which keeps random or diverging deltas from overflowing to inf.
DEFAULT_SCALE_CLAMP = math.log(1000.0 / 16)


class BoxCoder:
    """Encode target boxes as deltas w.r.t. reference boxes, and decode them back."""

    def __init__(self, weights: Sequence[float], scale_clamp: float = DEFAULT_SCALE_CLAMP) -> None:
        if len(weights) != 4:
            raise ValueError(f"BoxCoder: weights must be 4 numbers (wx, wy, ww, wh), got {weights!r}")
        self.weights = tuple(float(w) for w in weights)
        self.scale_clamp = float(scale_clamp)

    def encode(self, target_boxes: Tensor, reference_boxes: Tensor) -> Tensor:
        """Deltas (..., 4) that turn each reference box (..., 4) into its target box (..., 4)."""
        target_boxes = target_boxes.float()
        reference_boxes = reference_boxes.float()
        wx, wy, ww, wh = self.weights
        ref_w = reference_boxes[..., 2] - reference_boxes[..., 0]
        ref_h = reference_boxes[..., 3] - reference_boxes[..., 1]
        ref_x = reference_boxes[..., 0] + 0.5 * ref_w
        ref_y = reference_boxes[..., 1] + 0.5 * ref_h
        gt_w = target_boxes[..., 2] - target_boxes[..., 0]
        gt_h = target_boxes[..., 3] - target_boxes[..., 1]
        gt_x = target_boxes[..., 0] + 0.5 * gt_w
        gt_y = target_boxes[..., 1] + 0.5 * gt_h
        return torch.stack([wx * (gt_x - ref_x) / ref_w,
                            wy * (gt_y - ref_y) / ref_h,
                            ww * torch.log(gt_w / ref_w),
                            wh * torch.log(gt_h / ref_h)], dim=-1)

    def decode(self, deltas: Tensor, reference_boxes: Tensor) -> Tensor:
        """Apply deltas (..., 4k) to reference boxes (..., 4); returns boxes (..., 4k).

        k > 1 is the class-specific case: k boxes per reference box, one per class.
        """
        deltas = deltas.float()
        reference_boxes = reference_boxes.to(deltas.dtype)
        wx, wy, ww, wh = self.weights
        ref_w = (reference_boxes[..., 2] - reference_boxes[..., 0]).unsqueeze(-1)  # (..., 1)
        ref_h = (reference_boxes[..., 3] - reference_boxes[..., 1]).unsqueeze(-1)
        ref_x = reference_boxes[..., 0].unsqueeze(-1) + 0.5 * ref_w
        ref_y = reference_boxes[..., 1].unsqueeze(-1) + 0.5 * ref_h
        d = deltas.unflatten(-1, (-1, 4))  # (..., 4k) -> (..., k, 4)
        dw = torch.clamp(d[..., 2] / ww, max=self.scale_clamp)
        dh = torch.clamp(d[..., 3] / wh, max=self.scale_clamp)
        ctr_x = d[..., 0] / wx * ref_w + ref_x
        ctr_y = d[..., 1] / wy * ref_h + ref_y
        half_w = 0.5 * torch.exp(dw) * ref_w
        half_h = 0.5 * torch.exp(dh) * ref_h
        boxes = torch.stack([ctr_x - half_w, ctr_y - half_h, ctr_x + half_w, ctr_y + half_h], dim=-1)
        return boxes.flatten(-2)  # (..., k, 4) -> (..., 4k)
