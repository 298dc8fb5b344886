"""The sync-free postprocess (`accel.sync_free_postprocess`, off by default): the RPN's proposal
selection and the box head's detections with fewer host round trips, the same detections.

On CUDA every `nonzero`, boolean index, `.item()` or Python int read from a tensor waits for the
GPU to finish what it was given. The default path does several per image (filtering the boxes,
then per-class NMS image by image). Here:
- the RPN filters by a mask over all images at once: boxes that are not regions (small, empty,
  non-finite) become zero boxes scored -inf, which NMS keeps but which neither suppress nor are
  suppressed by anything (their overlap with every box is 0) and sort last, so they are cut off
  after NMS with the same survivors as before: one read for the batch (how many of each image's
  first m boxes are not regions, for every m) tells where, without reading the mask per image.
  NMS stays per image (its cost grows with the square of its boxes); the prefix rule of
  rpn.first_nms_survivors holds as before.
- the box head takes one `nonzero` over all images, one NMS over all images with an image x class
  group index (groups shifted apart on a 2-D grid, see `grid_batched_nms`) and one host read of the
  per-image counts at the end, instead of a `nonzero` and an NMS per image.
Detections are the default path's as sets: NMS orders equal scores in its own way, and the shifted
coordinates round differently from torchvision's batched_nms (also a coordinate shift), which can
only matter for an overlap within float rounding of the threshold.
Not traceable (export takes the default path, which model.fast_path does not reach).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor
from torchvision.ops import nms

from detection.modeling.rpn import clip_boxes, region_mask


def select_proposals(boxes: Tensor, logits: Tensor, image_sizes: Sequence[tuple[int, int]], *,
                     min_size: float, nms_thresh: float, post_k: int) -> list[Tensor]:
    """Decoded top-k boxes (N, k, 4) and their sorted logits (N, k) -> per image the proposals
    (<= post_k, 4) of RPN.select_proposals."""
    boxes = torch.stack([clip_boxes(b, size) for b, size in zip(boxes, image_sizes)])  # (N, k, 4)
    valid = region_mask(boxes, logits, min_size)  # (N, k)
    boxes = torch.where(valid.unsqueeze(-1), boxes, torch.zeros((), dtype=boxes.dtype, device=boxes.device))
    logits = torch.where(valid, logits, torch.full((), -math.inf, dtype=logits.dtype, device=logits.device))
    prefixes = _prefix_sizes(boxes.shape[1], post_k)
    # the non-regions among each image's first m boxes, for every m NMS may be given: one read
    invalid = (~valid).cumsum(dim=1)[:, [m - 1 for m in prefixes]].tolist() if prefixes else [[]] * len(boxes)
    return [boxes_i[_first_valid_survivors(boxes_i, logits_i, dict(zip(prefixes, invalid_i)), nms_thresh, post_k)]
            for boxes_i, logits_i, invalid_i in zip(boxes, logits, invalid)]


def _prefix_sizes(total: int, k: int) -> list[int]:
    """The numbers of first boxes NMS is given in turn: 2k, 4k, ... up to all `total` (k = 0:
    one box, which gives the empty selection as the default path does)."""
    sizes, m = [], max(2 * k, 1)
    while total > 0:
        sizes.append(min(m, total))
        if m >= total:
            return sizes
        m *= 2
    return sizes


def _first_valid_survivors(boxes: Tensor, scores: Tensor, invalid: dict[int, int], iou_threshold: float,
                           k: int) -> Tensor:
    """The first k survivors of NMS among the valid boxes, NMS run on the first m = 2k, 4k, ...
    boxes until it gives k (rpn.first_nms_survivors). A non-region (a zero box scored -inf)
    neither suppresses nor is suppressed and sorts last, so NMS of the first m boxes keeps all
    `invalid[m]` of them, after the valid survivors: those are the first len(keep) - invalid[m]
    (no read of the mask)."""
    for m, not_regions in invalid.items():
        keep = nms(boxes[:m], scores[:m], iou_threshold)
        survivors = len(keep) - not_regions
        if survivors >= k or m == len(boxes):
            return keep[:min(k, survivors)]
    return torch.empty((0,), dtype=torch.int64, device=boxes.device)  # no boxes at all


def grid_batched_nms(boxes: Tensor, scores: Tensor, groups: Tensor, num_groups: int, iou_threshold: float) -> Tensor:
    """NMS within each group, as one NMS call: group g's boxes shifted by (g % G, g // G) times
    the largest coordinate + 1, G = ceil(sqrt(num_groups)), so boxes of different groups never
    overlap. torchvision's batched_nms shifts along the diagonal by g: on a grid the largest
    shift is sqrt(num_groups) instead of num_groups spans, so coordinates lose fewer bits.
    Boxes must be non-negative (clipped). Indices sorted by score, high to low."""
    if boxes.numel() == 0:
        return torch.empty((0,), dtype=torch.int64, device=boxes.device)
    side = max(1, math.ceil(math.sqrt(num_groups)))
    span = boxes.max() + 1
    shift = torch.stack([groups % side, groups // side], dim=1).to(boxes.dtype) * span  # (B, 2): x, y
    return nms(boxes + shift.repeat(1, 2), scores, iou_threshold)


def detect(boxes: list[Tensor], scores: list[Tensor], *, score_thresh: float, nms_thresh: float,
           detections_per_image: int) -> list[dict[str, Tensor]]:
    """Per image clipped boxes (Ri, K, 4) and scores (Ri, K) -> per image detections, as
    Res5ROIHeads.detect_image gives them image by image: score threshold, per-class NMS, the
    top detections_per_image by score."""
    num_images, num_classes = len(scores), scores[0].shape[1]
    device = scores[0].device
    image_of_row = torch.cat([torch.full((len(s),), i, dtype=torch.int64, device=device)
                              for i, s in enumerate(scores)])  # (R,): fills, no host copy
    all_boxes, all_scores = torch.cat(boxes), torch.cat(scores)  # (R, K, 4), (R, K)
    keep = (all_scores > score_thresh) & torch.isfinite(all_boxes).all(dim=-1)  # (R, K)
    row, class_idx = keep.nonzero(as_tuple=True)  # the one nonzero, for all images
    cand_boxes, cand_scores = all_boxes[row, class_idx], all_scores[row, class_idx]
    image = image_of_row[row]
    kept = grid_batched_nms(cand_boxes, cand_scores, image * num_classes + class_idx,
                            num_images * num_classes, nms_thresh)
    kept = kept[torch.sort(image[kept], stable=True).indices]  # grouped by image, by score within
    # per-image counts by scatter_add (bincount reads its maximum on the host on CUDA)
    counts = torch.zeros(num_images, dtype=torch.int64, device=device).scatter_add_(
        0, image[kept], torch.ones_like(kept)).tolist()  # the one host read
    out = []
    for chunk in kept.split(counts):
        chunk = chunk[:detections_per_image]
        out.append({"boxes": cand_boxes[chunk], "scores": cand_scores[chunk], "labels": class_idx[chunk] + 1})
    return out
