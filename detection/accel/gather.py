"""RoIAlign as a gather: aligned RoIAlign with adaptive sampling is a weighted sum of map
pixels, with weights separable in y and x. pool_plan builds each bin's pixel indices and
weights; pool sums them with F.embedding_bag over a channels_last map. Unlike
torchvision.ops.roi_align it can pool a subset of bins (every stride-th, for a strided 1x1
conv hoisted before the pooling: res5.py). tests/test_fast.py checks it against
torchvision.ops.roi_align, values and gradients."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


def to_rois(boxes: list[Tensor]) -> Tensor:
    """Per-image (Ri, 4) boxes -> (R, 5) rows (image index, x1, y1, x2, y2)."""
    index = torch.cat([torch.full((len(b), 1), float(i), dtype=b.dtype, device=b.device)
                       for i, b in enumerate(boxes)])
    return torch.cat([index, torch.cat(list(boxes))], dim=1)


def _axis_weights(start: Tensor, length: Tensor, bins: Tensor, resolution: int, size: int
                  ) -> tuple[Tensor, Tensor]:
    """One axis of aligned RoIAlign with adaptive sampling, as torchvision computes it.

    start, length (R,) in map cells; bins (B,) bin numbers. Returns the first map row of
    each bin's window (R, B) and the weights of the window's K rows (R, B, K): each of the
    bin's ceil(length / S) samples spreads 1/samples over its two neighbouring rows."""
    count = torch.ceil(length / resolution)  # (R,) samples per bin; 0 for an empty box
    samples = count.clamp(min=1)
    step = length / resolution  # bin size
    k = torch.arange(int(samples.max()), dtype=start.dtype, device=start.device)
    pos = (start[:, None, None] + bins.to(start.dtype)[None, :, None] * step[:, None, None]
           + (k + 0.5) * (step / samples)[:, None, None])  # (R, B, G) sample positions
    valid = (k < count[:, None, None]) & (pos >= -1.0) & (pos <= size)
    pos = pos.clamp(min=0)
    low = pos.floor().clamp(max=size - 1)
    frac = torch.where(low >= size - 1, torch.zeros_like(pos), pos - low)  # at the edge: one row
    weight = valid.to(pos.dtype) / samples[:, None, None]
    low = low.long()
    first = low.amin(dim=2)  # (R, B)
    rel = low - first[:, :, None]
    window = int(rel.max()) + 2 if rel.numel() else 1
    out = pos.new_zeros(*first.shape, window)
    out.scatter_add_(2, rel, (1 - frac) * weight)
    out.scatter_add_(2, rel + 1, frac * weight)
    return first, out


@dataclass
class PoolPlan:
    """Bags for F.embedding_bag: (R*By*Bx, E) map-pixel indices and weights."""
    indices: Tensor
    weights: Tensor
    shape: tuple[int, int, int]  # (R, By, Bx)


def pool_plan(rois: Tensor, map_size: tuple[int, int], resolution: int, spatial_scale: float,
              stride: int = 1) -> PoolPlan:
    """The plan for aligned RoIAlign (sampling ratio 0) of (R, 5) `rois` on an H x W map,
    keeping bins 0, stride, 2*stride, ... of the S x S grid on each axis."""
    height, width = map_size
    bins = torch.arange(0, resolution, stride, device=rois.device)
    x1, y1 = rois[:, 1] * spatial_scale - 0.5, rois[:, 2] * spatial_scale - 0.5
    x2, y2 = rois[:, 3] * spatial_scale - 0.5, rois[:, 4] * spatial_scale - 0.5
    row0, wy = _axis_weights(y1, y2 - y1, bins, resolution, height)  # (R, By), (R, By, Ky)
    col0, wx = _axis_weights(x1, x2 - x1, bins, resolution, width)  # (R, Bx), (R, Bx, Kx)
    rows = (row0[:, :, None] + torch.arange(wy.shape[2], device=rois.device)).clamp(max=height - 1)
    cols = (col0[:, :, None] + torch.arange(wx.shape[2], device=rois.device)).clamp(max=width - 1)
    image = rois[:, 0].long()[:, None, None, None, None]
    # (R, By, 1, Ky, 1) x (R, 1, Bx, 1, Kx) -> (R, By, Bx, Ky, Kx): pixel index in the (N*H*W) table
    indices = (image * height + rows[:, :, None, :, None]) * width + cols[:, None, :, None, :]
    weights = wy[:, :, None, :, None] * wx[:, None, :, None, :]
    num, by, bx = len(rois), len(bins), len(bins)
    return PoolPlan(indices.reshape(num * by * bx, -1), weights.reshape(num * by * bx, -1), (num, by, bx))


def pool(features: Tensor, plan: PoolPlan) -> Tensor:
    """(N, C, H, W) map (channels_last avoids a copy) -> (R, C, By, Bx), channels_last."""
    n, c, h, w = features.shape
    table = features.permute(0, 2, 3, 1).reshape(n * h * w, c)  # (N, C, H, W) -> (N*H*W, C)
    out = F.embedding_bag(plan.indices, table, mode="sum", per_sample_weights=plan.weights.to(table.dtype))
    return out.view(*plan.shape, c).permute(0, 3, 1, 2)  # (R*By*Bx, C) -> (R, C, By, Bx)

