"""Anchors on the C4 feature map (stride 16), Faster R-CNN style.

Shapes: A anchors per cell (sizes x aspect ratios), H x W feature cells.
Order: location-major, i.e. anchor index = (y * W + x) * A + a, matching the RPN head's
(N, A, H, W) -> (N, H*W*A) flattening. Cell anchors are ordered size-major
(for size in sizes: for ratio in ratios), as in Detectron2.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn


def generate_cell_anchors(sizes: Sequence[float], aspect_ratios: Sequence[float]) -> Tensor:
    """(A, 4) XYXY anchors centred on (0, 0): area size**2, aspect ratio = height / width."""
    anchors = []
    for size in sizes:
        area = float(size) ** 2
        for ratio in aspect_ratios:
            w = math.sqrt(area / ratio)
            h = ratio * w
            anchors.append([-w / 2.0, -h / 2.0, w / 2.0, h / 2.0])
    return torch.tensor(anchors, dtype=torch.float32)


class AnchorGenerator(nn.Module):
    """All anchors of one feature map.

    offset: where in a cell the anchor centres sit, in units of stride. 0.0 puts the centre
    of cell (x, y) at pixel (x * stride, y * stride), like Detectron2's default.
    """

    def __init__(self, sizes: Sequence[float], aspect_ratios: Sequence[float],
                 stride: int = 16, offset: float = 0.0) -> None:
        super().__init__()
        if not sizes or not aspect_ratios or min(sizes) <= 0 or min(aspect_ratios) <= 0:
            raise ValueError(f"AnchorGenerator: sizes and aspect_ratios must be positive and "
                             f"non-empty, got {list(sizes)!r} and {list(aspect_ratios)!r}")
        self.stride = int(stride)
        self.offset = float(offset)
        # Not persistent: derived from the config, so it never belongs in a checkpoint.
        self.register_buffer("cell_anchors", generate_cell_anchors(sizes, aspect_ratios),
                             persistent=False)

    @property
    def num_anchors(self) -> int:
        """A, the anchors per feature cell."""
        return self.cell_anchors.shape[0]

    def grid_anchors(self, grid_size: tuple[int, int]) -> Tensor:
        """(H*W*A, 4) anchors in image pixels for an H x W feature map."""
        height, width = grid_size
        device = self.cell_anchors.device
        shift_x = (torch.arange(width, dtype=torch.float32, device=device) + self.offset) * self.stride
        shift_y = (torch.arange(height, dtype=torch.float32, device=device) + self.offset) * self.stride
        yy, xx = torch.meshgrid(shift_y, shift_x, indexing="ij")  # (H, W) each
        shifts = torch.stack([xx, yy, xx, yy], dim=-1).reshape(-1, 1, 4)  # (H*W, 1, 4)
        return (shifts + self.cell_anchors.view(1, -1, 4)).reshape(-1, 4)  # (H*W, A, 4) -> (H*W*A, 4)

    def forward(self, feature_map: Tensor) -> Tensor:
        """(H*W*A, 4) anchors for a (N, C, H, W) feature map (the same for every image)."""
        return self.grid_anchors((feature_map.shape[-2], feature_map.shape[-1]))
