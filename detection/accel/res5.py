"""res5 on RoIs for the C4 head, faster (Res5Runner, set as roi_heads.res5_runner):

- Hoisting (roi_align only; max pooling is not linear): RoIAlign is linear in its map and a
  1x1 conv is linear and pointwise, so conv1x1(RoIAlign(x)) == RoIAlign(conv1x1(x)) bin by
  bin. res5's first block reads the pooled RoI with two 1x1 convs, conv1 and the projection
  shortcut; both run once on the H x W map instead of on every RoI's S x S bins. A 1x1 conv
  with stride 2 reads only the even bins, so its map is pooled at those bins only.
  Only the linear part commutes: a bias (a folded BN shift) would come out of RoIAlign
  multiplied by the sum of the bilinear weights, which is 1 only when every sample lies in
  [-1, H] x [-1, W] (torchvision drops samples outside). So the hoisted conv runs without
  bias and the bias (and any norm) is applied after pooling: exact for every box.
- Pooling by gather (gather.py), of the bins each map's conv reads.
- Chunks: in eval mode res5 runs over chunk_size RoIs at a time, so peak memory does not
  grow with the proposal count (RoIs are independent in eval mode; in training all RoIs run
  at once, as trainable BN needs the batch).

Shapes: C4 / C5 channels before / after res5, H x W the C4 map, R RoIs, S x S the pooler
resolution, By x Bx the bins pooled per RoI (S x S, or a strided subset).
"""
from __future__ import annotations

import copy
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.profiler import record_function
from torchvision.ops import roi_pool

from detection.accel.fold import effective_conv
from detection.accel.gather import PoolPlan, pool, pool_plan, to_rois


def _pointwise(conv: nn.Module) -> bool:
    return (isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1) and conv.padding == (0, 0)
            and conv.dilation == (1, 1) and conv.groups == 1)


# chunk_size="auto": res5 runs on RoIs of at most this many pooled bins at a time at inference,
# CHUNK_BINS // S^2 RoIs: 64 at 14x14 pooling, 348 at 6x6 (the measured trade-off of peak
# memory and speed: docs/accel.md)
CHUNK_BINS = 64 * 14 * 14
AUTO = "auto"


def chunk_rois(chunk_size: int | str | None, resolution: int) -> int | None:
    """RoIs per res5 call: chunk_size, or for "auto" CHUNK_BINS // resolution^2 (None: all)."""
    if chunk_size == AUTO:
        return max(1, CHUNK_BINS // resolution ** 2)
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f'chunk_size: "auto", None or a positive number of RoIs, not {chunk_size!r}')
    return chunk_size


class Res5Runner:
    """Computes Res5ROIHeads.box_features(features, boxes) -> (R, C5) faster: set as
    `roi_heads.res5_runner`. Not an nn.Module: it owns no weights, it runs roi_heads.res5's.

    hoist: run the first block's 1x1 conv1 and projection shortcut on the map (roi_align
    only). chunk_size: RoIs per res5 call in eval mode (None: all at once; "auto": see
    CHUNK_BINS). channels_last:
    False gives res5 NCHW inputs (the pooling returns NHWC). head_fn, when set, is called in
    place of `head`: `accel.cuda_graphs`' graphs.PaddedRes5 over it, or `accel.compile`'s
    torch.compile of it (levers.compile_runner_head)."""

    def __init__(self, res5: nn.Sequential, *, pooler: str, resolution: int, spatial_scale: float,
                 hoist: bool = True, chunk_size: int | str | None = AUTO, channels_last: bool = True) -> None:
        self.res5, self.pooler = res5, pooler
        self.resolution, self.spatial_scale = resolution, spatial_scale
        self.chunk_size, self.channels_last = chunk_rois(chunk_size, resolution), channels_last
        first = res5[0]
        shortcut = getattr(first, "shortcut", None)
        self.hoist = bool(hoist and pooler == "roi_align" and hasattr(first, "conv3")
                          and _pointwise(first.conv1)
                          and ((shortcut is None and not first.residual)
                               or (isinstance(shortcut, nn.Sequential) and _pointwise(shortcut[0]))))
        self.out_channels = res5[-1].out_channels
        self.head_fn: Callable[[dict[str, Tensor]], Tensor] | None = None

    def __deepcopy__(self, memo: dict) -> "Res5Runner":
        """A copy runs its own res5 eagerly: head_fn is left out (a compiled head_fn would still
        call this runner's head, the original model's res5; CUDA graphs cannot be copied); apply
        the levers to the copy again."""
        clone = Res5Runner.__new__(Res5Runner)
        memo[id(self)] = clone
        for name, value in self.__dict__.items():
            setattr(clone, name, None if name == "head_fn" else copy.deepcopy(value, memo))
        return clone

    def __call__(self, features: Tensor, boxes: list[Tensor]) -> Tensor:
        rois = to_rois(list(boxes))  # (R, 5)
        if len(rois) == 0:
            return features.new_zeros((0, self.out_channels))
        with record_function("c4det.hoisted_convs"):
            maps = self.prepare(features)
        out = []
        head = self.head if self.head_fn is None else self.head_fn
        for chunk in self.chunks(rois):
            with record_function("c4det.pool"):
                pooled = self.pool(maps, chunk)
            with record_function("c4det.res5"):
                out.append(head(pooled))
        return torch.cat(out)

    def chunks(self, rois: Tensor) -> list[Tensor]:
        """RoIs in equal chunks of at most chunk_size in eval mode; all at once in training."""
        if not self.chunk_size or self.res5.training:
            return [rois]
        count = -(-len(rois) // self.chunk_size)
        return list(rois.split(-(-len(rois) // count)))

    def _hoisted(self) -> dict[str, nn.Conv2d]:
        first = self.res5[0]
        convs = {"conv1": first.conv1}
        if first.shortcut is not None:
            convs["shortcut"] = first.shortcut[0]
        return convs

    def prepare(self, features: Tensor) -> dict[str, Tensor]:
        """The maps to pool from: the C4 map, or the hoisted 1x1 convs' outputs (no bias,
        stride 1: a strided 1x1 conv becomes strided pooling)."""
        if not self.hoist:
            return {"x": features}
        return {name: F.conv2d(features, effective_conv(conv)[0]).contiguous(memory_format=torch.channels_last)
                for name, conv in self._hoisted().items()}

    def pool(self, maps: dict[str, Tensor], rois: Tensor) -> dict[str, Tensor]:
        """Pooled inputs of res5 for these (r, 5) RoIs: {name: (r, C, By, Bx)}."""
        if self.pooler == "roi_pool":
            size = (self.resolution, self.resolution)
            return {"x": roi_pool(maps["x"], rois, size, spatial_scale=self.spatial_scale)}
        if not self.hoist:
            return {"x": pool(maps["x"], self._plan(rois, maps["x"], 1, {}))}
        plans: dict[int, PoolPlan] = {}
        return {name: pool(maps[name], self._plan(rois, maps[name], conv.stride[0], plans))
                for name, conv in self._hoisted().items()}

    def _plan(self, rois: Tensor, features: Tensor, stride: int, cache: dict[int, PoolPlan]) -> PoolPlan:
        if stride not in cache:
            cache[stride] = pool_plan(rois, tuple(features.shape[-2:]), self.resolution,
                                      self.spatial_scale, stride)
        return cache[stride]

    def head(self, pooled: dict[str, Tensor]) -> Tensor:
        """res5 + global average pool on pooled inputs -> (r, C5)."""
        if not self.channels_last:
            pooled = {name: t.contiguous() for name, t in pooled.items()}
        if "x" in pooled:
            return self.res5(pooled["x"]).mean(dim=(2, 3))
        first = self.res5[0]
        out = F.relu_(first.norm1(_add_bias(pooled["conv1"], first.conv1)))
        shortcut = None if first.shortcut is None else \
            first.shortcut[1:](_add_bias(pooled["shortcut"], first.shortcut[0]))  # a fresh tensor
        out = first.tail(out, shortcut)
        for block in self.res5[1:]:
            out = block(out)
        return out.mean(dim=(2, 3))


def _add_bias(pooled: Tensor, conv: nn.Conv2d) -> Tensor:
    """The hoisted conv's bias (e.g. a folded BN shift), added after pooling (see above). At
    inference in place: the pooled tensor is fresh, and a new one per add costs memory
    traffic. In training out of place: the pooled tensor is a view of the pooling's output,
    and autograd undoes an in-place op on a view by cloning the whole base in the backward
    (CopySlices)."""
    bias = effective_conv(conv)[1]
    if bias is None:
        return pooled
    bias = bias.view(1, -1, 1, 1)
    return pooled + bias if pooled.requires_grad else pooled.add_(bias)

