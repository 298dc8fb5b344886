"""Multi-scale testing, the ResNet paper's Appendix B (config `test.multi_scale`).

Shapes: N images, R RoIs (all images), S pyramid scales, C5 channels after res5.

The paper follows "Object detection networks on convolutional feature maps" (Ren et al.,
NoC): the trunk's C4 map is computed on an image pyramid (shorter sides `sizes`, default
200..1000); the proposals still come from the RPN at the single test scale. Each proposal
is pooled at two adjacent scales of the pyramid, the pair around the scale at which the
rescaled proposal is closest to the pooled window's area (pooler_resolution x stride
squared: 224 x 224 input pixels for the paper's 14 x 14 at stride 16); res5 runs at both
and the two feature vectors are merged by element-wise max (maxout) before the predictor.

This is not `test.aug` (Detectron2's test-time augmentation, detection/modeling/tta.py), which runs
the whole detector per size and merges final detections by NMS. `test.multi_scale` is the
paper's; both can be on together.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

from detection.modeling.structures import host_to_device


@dataclass(frozen=True)
class MultiScaleTest:
    """The pyramid's shorter sides (increasing) and the cap on its longer sides."""

    sizes: tuple[int, ...] = (200, 400, 600, 800, 1000)
    max_size: int = 2000

    def __post_init__(self) -> None:
        if not self.sizes or list(self.sizes) != sorted(set(self.sizes)) or min(self.sizes) <= 0:
            raise ValueError(f"MultiScaleTest: sizes must be increasing positive sizes, got {list(self.sizes)}")


def choose_scales(scaled_areas: Tensor, canonical_area: float) -> tuple[Tensor, Tensor]:
    """(R, S) areas of each RoI rescaled to each pyramid scale (scales in increasing order) ->
    the two adjacent scale indices (lo, hi), each (R,), with lo + 1 == hi (or lo == hi with
    one scale).

    The nearest scale j (in log area, so 2x too large and 2x too small are equally far) and
    its neighbour on the side of the canonical area: j + 1 if the RoI is still smaller than
    the window at j, else j - 1; at the ends of the pyramid the pair is the two end scales."""
    num_scales = scaled_areas.shape[1]
    if num_scales == 1:
        zeros = torch.zeros(len(scaled_areas), dtype=torch.long, device=scaled_areas.device)
        return zeros, zeros
    distance = (scaled_areas.clamp(min=1e-6) / canonical_area).log().abs()  # (R, S)
    nearest = distance.argmin(dim=1)  # (R,)
    at_nearest = scaled_areas.gather(1, nearest[:, None]).squeeze(1)
    other = torch.where(at_nearest < canonical_area, nearest + 1, nearest - 1)
    lo = torch.minimum(nearest, other).clamp(0, num_scales - 2)
    return lo, lo + 1


class PyramidFeatures:
    """RoI features (R, C5) by multi-scale maxout, a drop-in for Res5ROIHeads.box_features.

    levels: per scale, a function giving that scale's C4 map (computed on first use) and the
    per-image (sx, sy) factors from the test-scale image to that scale's image.
    box_features(map, per-image boxes) -> (R, C5) is the head's own (plain or fast path)."""

    def __init__(self, levels: Sequence[tuple[Callable[[], Tensor], list[tuple[float, float]]]],
                 box_features: Callable[[Tensor, list[Tensor]], Tensor], canonical_area: float) -> None:
        self.levels = list(levels)
        self.box_features = box_features
        self.canonical_area = canonical_area
        self._maps: dict[int, Tensor] = {}

    def level_map(self, index: int) -> Tensor:
        if index not in self._maps:
            self._maps[index] = self.levels[index][0]()
        return self._maps[index]

    def __call__(self, boxes: list[Tensor]) -> Tensor:
        """Per-image (Ri, 4) boxes in the test-scale images' pixels -> (R, C5). One host read
        for the batch (how many RoIs each scale takes from each image); each scale's RoIs are
        gathered by index, not by mask (a read each on CUDA)."""
        counts = [len(b) for b in boxes]
        all_boxes = torch.cat(boxes)  # (R, 4)
        device, num_images, num_scales = all_boxes.device, len(boxes), len(self.levels)
        image_of = torch.repeat_interleave(torch.arange(num_images, device=device),
                                           host_to_device(torch.tensor(counts, device="cpu"), device),
                                           output_size=len(all_boxes))  # (R,), sorted
        factors = host_to_device(torch.tensor([level[1] for level in self.levels], dtype=all_boxes.dtype,
                                              device="cpu"), device)  # (S, N, 2)
        factors = factors[:, image_of].permute(1, 0, 2)  # (S, N, 2) -> (R, S, 2)
        areas = (all_boxes[:, 2] - all_boxes[:, 0]) * (all_boxes[:, 3] - all_boxes[:, 1])  # (R,)
        lo, hi = choose_scales(areas[:, None] * factors[..., 0] * factors[..., 1], self.canonical_area)
        scales = torch.arange(num_scales, device=device)
        takes = (lo[:, None] == scales) | (hi[:, None] == scales)  # (R, S): RoI r is pooled at scale s
        of_image = image_of[:, None] == torch.arange(num_images, device=device)  # (R, N)
        table = (takes[:, :, None] & of_image[:, None, :]).sum(dim=0).tolist()  # (S, N) counts: the read
        merged: Tensor | None = None
        for scale, per_image_counts in enumerate(table):
            taken = sum(per_image_counts)
            if taken == 0:
                continue
            # the rows that take this scale, in order (a stable sort puts them first): by image
            rows = torch.sort((~takes[:, scale]).to(torch.uint8), stable=True).indices[:taken]  # (r,)
            scaled = all_boxes[rows] * factors[rows, scale].repeat(1, 2)  # (r, 4): x1 * sx, y1 * sy, ...
            features = self.box_features(self.level_map(scale), list(scaled.split(per_image_counts)))  # (r, C5)
            if merged is None:
                merged = features.new_full((len(all_boxes), features.shape[1]), float("-inf"))
            merged[rows] = torch.maximum(merged[rows], features)
        if merged is None:  # no RoIs
            return self.box_features(self.level_map(0), boxes)
        return merged
