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


def _axis_samples(start: Tensor, length: Tensor, bins: Tensor, resolution: int, size: int, most: int
                  ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One axis of aligned RoIAlign with adaptive sampling, as torchvision computes it, up to
    its window's size: each bin's ceil(length / S) samples (at most `most`) spread 1/samples
    over their two neighbouring rows.

    start, length (R,) in map cells; bins (B,) bin numbers. Returns the first map row of each
    bin's window (R, B), each sample's row relative to it (R, B, G), its fraction towards the
    next row and its weight (R, B, G)."""
    count = torch.ceil(length / resolution)  # (R,) samples per bin; 0 for an empty box
    samples = count.clamp(min=1)
    step = length / resolution  # bin size
    k = torch.arange(most, dtype=start.dtype, device=start.device)
    pos = (start[:, None, None] + bins.to(start.dtype)[None, :, None] * step[:, None, None]
           + (k + 0.5) * (step / samples)[:, None, None])  # (R, B, G) sample positions
    valid = (k < count[:, None, None]) & (pos >= -1.0) & (pos <= size)
    pos = pos.clamp(min=0)
    low = pos.floor().clamp(max=size - 1)
    frac = torch.where(low >= size - 1, torch.zeros_like(pos), pos - low)  # at the edge: one row
    weight = valid.to(pos.dtype) / samples[:, None, None]
    low = low.long()
    first = low.amin(dim=2)  # (R, B)
    return first, low - first[:, :, None], frac, weight


def _axis_window(rel: Tensor, frac: Tensor, weight: Tensor, window: int) -> Tensor:
    """The weights of each bin's `window` rows (R, B, K) from _axis_samples' samples."""
    out = weight.new_zeros(*rel.shape[:2], window)
    out.scatter_add_(2, rel, (1 - frac) * weight)
    out.scatter_add_(2, rel + 1, frac * weight)
    return out


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
    # Two host reads for both axes (each a synchronisation on CUDA): the most samples a bin
    # takes, then the widest window its samples touch (up to the row after the farthest sample's).
    most_y, most_x = torch.stack([torch.ceil(length / resolution).clamp(min=1).max()
                                  for length in (y2 - y1, x2 - x1)]).tolist()
    y_samples = _axis_samples(y1, y2 - y1, bins, resolution, height, int(most_y))
    x_samples = _axis_samples(x1, x2 - x1, bins, resolution, width, int(most_x))
    rel_y, rel_x = y_samples[1], x_samples[1]
    widest = torch.stack([rel_y.max(), rel_x.max()]).tolist() if rel_y.numel() else [-1, -1]
    row0, wy = y_samples[0], _axis_window(*y_samples[1:], int(widest[0]) + 2)  # (R, By), (R, By, Ky)
    col0, wx = x_samples[0], _axis_window(*x_samples[1:], int(widest[1]) + 2)  # (R, Bx), (R, Bx, Kx)
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

