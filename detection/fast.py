"""Faster inference (and training) of the C4 detector, with the plain path's results.

Shapes: N images, C4 / C5 channels before / after res5, H x W the C4 map, R RoIs,
S x S the pooler resolution, By x Bx the bins pooled per RoI (S x S, or a strided subset).

    fast = optimize_for_inference(model)   # a copy; `model` is left as it is
    optimize_for_training(model)            # in place; parameter names and checkpoints unchanged

What each step does, and why it gives the same numbers (tools/benchmark.py measures each):
- Frozen BN folded into the conv before it: conv(x) * scale + shift == conv with weight
  w * scale and bias shift. Inference folds once (the copy's norms become Identity);
  training computes w * scale at every call, so gradients reach w through the product
  and the parameters, norms' buffers and state_dict keys stay as they were.
  Trainable BN (BatchNorm2d) is the same affine in eval mode, from its running statistics:
  inference folds it too (`freeze_batchnorm`), training leaves it alone.
- channels_last: oneDNN's convolutions and the gather pooling below prefer NHWC, except
  res5 at float32 inference on small RoI maps (pooler resolution below 14, so res5 runs
  below 7x7): there NCHW was faster (ResNet-18 C4 with 6x6 pooling, 200 RoIs: 0.37 -> 0.26 s
  per image; ResNet-50 at 6x6: 1.46 -> 1.37 s; at 14x14, NHWC: 2.65 against 3.01 s), so that
  res5 keeps NCHW weights and gets NCHW inputs. Under bfloat16 (test.amp) it stays NHWC and
  uses the matmul below.
- 3x3 convs with small outputs as one matmul (taps_conv2d: each output position's 9 taps
  side by side, times the weight): on outputs of at most 4x4 positions oneDNN's conv
  backward took 5x its forward. res5 on the 6x6 RoIs of the demo (3x3 outputs): conv
  forward + backward 2.4x faster in bfloat16, 1.9x in float32; a demo training step 1.48x
  faster (267 -> 177 ms); bfloat16 inference of the demo model 1.5x faster per pass. At 7x7
  outputs oneDNN's conv wins (1.3-1.9x), so larger maps keep it; float32 inference keeps
  NCHW convs (the matmul was 0.83x there). The same sums in another order: equal up to float
  rounding, tested against conv2d forward and backward.
- Hoisting (roi_align only; max pooling is not linear): RoIAlign is linear in its input
  map and a 1x1 conv is linear and pointwise, so conv1x1(RoIAlign(x)) == RoIAlign(conv1x1(x)),
  bin by bin. res5's first bottleneck reads the pooled RoI with two 1x1 convs, conv1 and
  the projection shortcut; both run once on the H x W map instead of on R x S x S RoI
  positions (about 1900 against 58800 at 300 RoIs, 600 x 800 images). A 1x1 conv with
  stride 2 reads only the even bins, so its map is pooled at those bins only.
  Boundary case: only the linear part commutes. A bias (the folded BN shift) would come
  out of RoIAlign multiplied by the sum of the bilinear weights, which is 1 only when every
  sample lies within [-1, H] x [-1, W] (torchvision drops samples outside and clamps
  [-1, 0) to 0). Clipped proposals are always inside; a box reaching more than one cell
  (16 px) past the map would not be. So the hoisted conv runs without bias and the bias
  (and any norm) is applied after pooling: exact for every box.
- Pooling by gather: RoIAlign (aligned, adaptive sampling) is a weighted sum of map
  pixels, with weights separable in y and x. `pool_plan` builds each bin's pixel indices
  and weights; F.embedding_bag sums them over a channels_last map. Unlike
  torchvision.ops.roi_align it can pool a subset of bins (the stride-2 shortcut); on this
  CPU it was about 2x faster forward and 7x faster backward than torchvision's kernel
  (300-512 RoIs, 1024 channels). Tests check it against torchvision.ops.roi_align.
- Fused post-ops (float32 inference on the CPU): each folded conv's bias, its ReLU and the
  residual add run inside oneDNN's convolution (`conv_pointwise`, the op torch.compile
  emits on the CPU), so each output is written once instead of once per elementwise op.
  R50 at 600x800: 1.087x end to end (paired median of 8; 1.48 against 1.60 s), the same
  detections. Under autocast, in training, or for convs that run as taps, the unfused ops.
- Winograd (float32 on the CPU): 3x3 stride-1 convs with at least 256 channels in and out
  run as F(4x4, 3x3) (detection/winograd.py): 36 instead of 144 multiply-adds per 4x4 output
  tile and channel pair. The same convolution rounded differently (about 1e-5 of the
  outputs' scale). Inference: res4, res5 and the RPN's conv, kernels transformed once (R50
  at 600x800 1.08-1.11x end to end). Training: res5's, the output and the input's gradient
  by Winograd, kernels transformed at each step (R50 training step 1.07x); the trunk's and
  the RPN's were no faster once their kernels are transformed at every step.
- Chunks: in eval mode res5 runs over `chunk_size` RoIs at a time, so peak memory does not
  grow with the proposal count (RoIs are independent in eval mode; in training all RoIs
  run at once, as trainable BN needs the batch).

Per device (`device_plan`; docs/ARCHITECTURE.md has the table): the CPU gets every step above.
Elsewhere (CUDA) inference folds BN (trainable BN too) and nothing else: the gather pooling
launched about 3,900 small kernels per image on an H100 (2.8x slower than the plain path),
so torchvision's RoIAlign kernel pools there, res5 runs all RoIs at once as the plain path
does, and the CPU kernels (oneDNN post-ops, Winograd, taps) are never installed. Folding only
removes work, so the default is not slower than `model.fast_path: false` there. Training on
CUDA keeps the measured set (folded BN, hoisting with gather pooling, channels_last: 77 against
83 ms a step on an H100); the taps matmul and Winograd are CPU-only at run time as well.
"""
from __future__ import annotations

import copy
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.profiler import record_function
from torchvision.ops import FrozenBatchNorm2d, roi_pool

from backbones.resnet import BasicBlock, Bottleneck, Stem, frozen_batchnorm
from detection import winograd
from detection.rpn import RPNHead
from detection.winograd import winograd_conv2d


def frozen_affine(norm: FrozenBatchNorm2d) -> tuple[Tensor, Tensor]:
    """(scale, shift) with norm(x) == x * scale + shift, as FrozenBatchNorm2d computes them."""
    scale = norm.weight * (norm.running_var + norm.eps).rsqrt()
    return scale, norm.bias - norm.running_mean * scale


def conv_norm_pairs(module: nn.Module) -> list[tuple[nn.Module, str, str]]:
    """(parent, conv name, norm name) for every conv directly followed by a frozen BN:
    the backbone's conv{i}/norm{i} and projection shortcuts nn.Sequential(conv, norm)."""
    pairs = []
    for parent in module.modules():
        for i in (1, 2, 3):
            conv, norm = getattr(parent, f"conv{i}", None), getattr(parent, f"norm{i}", None)
            if isinstance(conv, nn.Conv2d) and type(norm) is FrozenBatchNorm2d:
                pairs.append((parent, f"conv{i}", f"norm{i}"))
        if isinstance(parent, nn.Sequential) and len(parent) == 2 and isinstance(parent[0], nn.Conv2d) \
                and type(parent[1]) is FrozenBatchNorm2d:
            pairs.append((parent, "0", "1"))
    return pairs


def _folded_conv(conv: nn.Conv2d, norm: FrozenBatchNorm2d) -> nn.Conv2d:
    scale, shift = frozen_affine(norm)
    folded = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                       conv.padding, conv.dilation, conv.groups, bias=True,
                       device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        folded.weight.copy_(conv.weight * scale.view(-1, 1, 1, 1))
        bias = shift if conv.bias is None else shift + conv.bias * scale
        folded.bias.copy_(bias)
    folded.requires_grad_(False)
    return folded


def freeze_batchnorm(module: nn.Module) -> nn.Module:
    """In place, for inference: every BatchNorm2d (trainable BN, e.g. `norm: bn` from scratch)
    becomes the FrozenBatchNorm2d of its running statistics, which is what it computes in eval
    mode, so fold_frozen_bn folds it too. Only for an eval-mode copy: training would no
    longer update the statistics."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d) and child.affine and child.running_mean is not None:
            setattr(module, name, frozen_batchnorm(child))
        else:
            freeze_batchnorm(child)
    return module


def fold_frozen_bn(module: nn.Module) -> nn.Module:
    """In place, for inference: every conv + frozen BN becomes one conv with a bias, the
    norm an Identity (state_dict keys change; use it on a copy)."""
    for parent, conv_name, norm_name in conv_norm_pairs(module):
        setattr(parent, conv_name, _folded_conv(getattr(parent, conv_name), getattr(parent, norm_name)))
        setattr(parent, norm_name, nn.Identity())
    return module


class AppliedFrozenBN(FrozenBatchNorm2d):
    """A frozen BN whose affine the ScaledConv2d before it applies: the identity here. It
    keeps the original buffers (the same tensors), so checkpoints keep their keys."""

    def __init__(self, norm: FrozenBatchNorm2d) -> None:
        super().__init__(norm.weight.shape[0], eps=norm.eps)
        for name in ("weight", "bias", "running_mean", "running_var"):
            setattr(self, name, getattr(norm, name))

    def forward(self, x: Tensor) -> Tensor:
        return x


# Output maps of at most this many positions (4x4) run res5's 3x3 convs as one matmul in
# training and bfloat16 inference on the CPU (taps_conv2d; see the module docstring).
SMALL_MAP_POSITIONS = 16


def taps_conv2d(x: Tensor, weight: Tensor, bias: Tensor | None, stride: tuple[int, int],
                padding: tuple[int, int]) -> Tensor:
    """conv2d (groups 1, dilation 1, zero padding) as one matmul: every output position's
    kernel taps side by side, (N*Ho*Wo, kh*kw*C), times the weight as (kh*kw*C, K). Returns
    (N, K, Ho, Wo) in NHWC memory, as a channels_last conv does."""
    n, c, h, w = x.shape
    k, _, kh, kw = weight.shape
    (sh, sw), (ph, pw) = stride, padding
    ho, wo = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
    padded = F.pad(x, (pw, pw, ph, ph)).permute(0, 2, 3, 1)  # (N, H + 2ph, W + 2pw, C)
    cols = _Taps.apply(padded, (kh, kw), (sh, sw), (ho, wo)).reshape(n * ho * wo, kh * kw * c)
    weight = weight.permute(0, 2, 3, 1).reshape(k, kh * kw * c).t()  # rows in the taps' order
    out = cols @ weight if bias is None else torch.addmm(bias, cols, weight)
    return out.view(n, ho, wo, k).permute(0, 3, 1, 2)


class _Taps(torch.autograd.Function):
    """(N, H, W, C) map -> its kernel taps side by side, (N, Ho, Wo, kh*kw, C). The backward adds
    each tap's gradient into one zeroed map; as autograd's slices, each tap made its own zeroed
    copy of the map and the copies were summed (res5 on the demo's RoIs: 10-30% of the conv's
    forward and backward time)."""

    @staticmethod
    def forward(ctx, x: Tensor, kernel: tuple[int, int], stride: tuple[int, int], out: tuple[int, int]) -> Tensor:
        ctx.shape, ctx.windows = x.shape, _tap_windows(kernel, stride, out)
        return torch.stack([x[:, rows, cols] for rows, cols in ctx.windows], dim=3)

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad_x = grad.new_zeros(ctx.shape)
        for t, (rows, cols) in enumerate(ctx.windows):
            grad_x[:, rows, cols] += grad[:, :, :, t]
        return grad_x, None, None, None


def _tap_windows(kernel: tuple[int, int], stride: tuple[int, int], out: tuple[int, int]) -> list[tuple[slice, slice]]:
    """The rows and columns each kernel tap reads, row-major over the kernel."""
    (kh, kw), (sh, sw), (ho, wo) = kernel, stride, out
    return [(slice(i, i + sh * (ho - 1) + 1, sh), slice(j, j + sw * (wo - 1) + 1, sw))
            for i in range(kh) for j in range(kw)]


class FastConv2d(nn.Conv2d):
    """What `conv` computes, with the same Parameters (no new state_dict keys). With
    small_maps, outputs of at most SMALL_MAP_POSITIONS positions are computed by taps_conv2d."""

    def __init__(self, conv: nn.Conv2d, small_maps: bool = False) -> None:
        super().__init__(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                         conv.padding, conv.dilation, conv.groups, bias=conv.bias is not None,
                         padding_mode=conv.padding_mode, device="meta")
        self.weight, self.bias = conv.weight, conv.bias  # the same Parameters
        self.small_maps = small_maps
        self.winograd = False  # winograd_training_convs

    def effective(self) -> tuple[Tensor, Tensor | None]:
        return self.weight, self.bias

    def _small(self, x: Tensor) -> bool:
        if not (self.small_maps and x.device.type == "cpu" and self.groups == 1 and self.dilation == (1, 1)
                and self.padding_mode == "zeros" and isinstance(self.padding, tuple)):
            return False
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        ho, wo = (x.shape[-2] + 2 * ph - kh) // sh + 1, (x.shape[-1] + 2 * pw - kw) // sw + 1
        return ho * wo <= SMALL_MAP_POSITIONS

    def forward(self, x: Tensor) -> Tensor:
        weight, bias = self.effective()
        if self._small(x):
            return taps_conv2d(x, weight, bias, self.stride, self.padding)
        if (self.winograd and x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32
                and not torch.is_autocast_enabled("cpu") and x.is_contiguous(memory_format=torch.channels_last)):
            return winograd.WinogradConv2d.apply(x, weight, bias)
        return self._conv_forward(x, weight, bias)


class ScaledConv2d(FastConv2d):
    """conv + frozen BN as one conv with weight w * scale and bias shift, computed at each
    call from the original Parameter w (gradients stay exact) and the norm's buffers."""

    def __init__(self, conv: nn.Conv2d, norm: AppliedFrozenBN) -> None:
        super().__init__(conv)
        object.__setattr__(self, "norm", norm)  # a reference, not a submodule: no new keys

    def effective(self) -> tuple[Tensor, Tensor]:
        scale, shift = frozen_affine(self.norm)
        bias = shift if self.bias is None else shift + self.bias * scale
        return self.weight * scale.view(-1, 1, 1, 1), bias


def small_map_convs(module: nn.Module) -> nn.Module:
    """In place: the k x k convs (k > 1) of `module` (res5) run small outputs as one matmul."""
    for parent in list(module.modules()):
        for name, child in parent.named_children():
            if isinstance(child, nn.Conv2d) and child.kernel_size != (1, 1):
                if not isinstance(child, FastConv2d):
                    setattr(parent, name, FastConv2d(child))
                getattr(parent, name).small_maps = True
    return module


def fold_frozen_bn_for_training(module: nn.Module) -> nn.Module:
    """In place: every conv + frozen BN runs as a ScaledConv2d, with the same parameters."""
    for parent, conv_name, norm_name in conv_norm_pairs(module):
        norm = AppliedFrozenBN(getattr(parent, norm_name))
        setattr(parent, conv_name, ScaledConv2d(getattr(parent, conv_name), norm))
        setattr(parent, norm_name, norm)
    return module


def effective_conv(conv: nn.Conv2d) -> tuple[Tensor, Tensor | None]:
    """(weight, bias) of what `conv` computes, including a folded norm."""
    return conv.effective() if isinstance(conv, FastConv2d) else (conv.weight, conv.bias)


class ToChannelsLast(nn.Module):
    """First module of the trunk on the fast path: NCHW input -> NHWC memory layout."""

    def forward(self, x: Tensor) -> Tensor:
        return x.contiguous(memory_format=torch.channels_last)


def to_channels_last(model: nn.Module) -> nn.Module:
    """Conv weights and the trunk's input in channels_last (no new parameters or keys)."""
    model.to(memory_format=torch.channels_last)
    if not isinstance(model.trunk[0], ToChannelsLast):
        model.trunk = nn.Sequential(OrderedDict([("to_channels_last", ToChannelsLast()),
                                                 *model.trunk.named_children()]))
    return model


# ---- RoIAlign as a gather ---------------------------------------------------------


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


# ---- res5 on RoIs: hoisted 1x1 convs, gather pooling, chunks -------------------------


def _pointwise(conv: nn.Module) -> bool:
    return (isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1) and conv.padding == (0, 0)
            and conv.dilation == (1, 1) and conv.groups == 1)


# chunk_size="auto": res5 runs on RoIs of at most this many pooled bins at a time at inference,
# CHUNK_BINS // S^2 RoIs. At 14x14 pooling (R50, 600x800) 64 RoIs: peak memory at 1000
# proposals 1400 MB against 1550 at 128 RoIs and 1668 at 256 (the Winograd kernels take room),
# speed within 3% either way (paired medians; bfloat16 5% faster). At the demo's 6x6 pooling
# 348 RoIs, all 200 at once: 1.4x faster under bfloat16 than in chunks of 100.
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
    False gives res5 NCHW inputs (the pooling returns NHWC)."""

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

    def __call__(self, features: Tensor, boxes: list[Tensor]) -> Tensor:
        rois = to_rois(list(boxes))  # (R, 5)
        if len(rois) == 0:
            return features.new_zeros((0, self.out_channels))
        with record_function("c4det.hoisted_convs"):
            maps = self.prepare(features)
        out = []
        for chunk in self.chunks(rois):
            with record_function("c4det.pool"):
                pooled = self.pool(maps, chunk)
            with record_function("c4det.res5"):
                out.append(self.head(pooled))
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
        if isinstance(first, FusedBottleneck) and _fusable(out, first.conv2) and _fusable(out, first.conv3):
            out = conv_pointwise(out, first.conv2, relu=True)
            out = conv_pointwise(out, first.conv3, relu=True, residual=shortcut)
        else:
            out = F.relu_(first.norm2(first.conv2(out)))
            out = first.norm3(first.conv3(out))
            if shortcut is not None:
                out += shortcut
            out = F.relu_(out)
        for block in self.res5[1:]:
            out = block(out)
        return out.mean(dim=(2, 3))


def _add_bias(pooled: Tensor, conv: nn.Conv2d) -> Tensor:
    """The hoisted conv's bias (e.g. a folded BN shift), added after pooling (see above). At
    inference in place: the pooled tensor is fresh (a new 60 MB tensor per add cost 8% of R50
    inference). In training out of place: the pooled tensor is a view of the pooling's
    output, and autograd undoes an in-place op on a view by cloning the whole base in the
    backward (CopySlices; with the in-place ReLU after it about 8% of an R50 training step)."""
    bias = effective_conv(conv)[1]
    if bias is None:
        return pooled
    bias = bias.view(1, -1, 1, 1)
    return pooled + bias if pooled.requires_grad else pooled.add_(bias)


# ---- conv + bias + ReLU (+ residual) as one oneDNN call, float32 inference -----------


# oneDNN's fused convolution: in PyTorch builds with oneDNN (every x86 CPU wheel)
_FUSED_CONV = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")


def _fusable(x: Tensor, conv: nn.Module) -> bool:
    """Whether conv_pointwise can run `conv` on `x`: a folded float32 conv (bias, zero
    padding) on the CPU, no autocast (the op has no autocast rule) and no autograd (no
    backward). Anything else runs the unfused ops."""
    return (_FUSED_CONV and type(conv) is nn.Conv2d and conv.bias is not None
            and conv.padding_mode == "zeros" and isinstance(conv.padding, tuple)
            and x.device.type == "cpu" and x.dtype == conv.weight.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu") and not (x.requires_grad or conv.weight.requires_grad))


def conv_pointwise(x: Tensor, conv: nn.Conv2d, *, relu: bool, residual: Tensor | None = None) -> Tensor:
    """relu(conv(x) [+ residual]) with the bias, the add and the ReLU as post-ops of oneDNN's
    convolution (the kernels torch.compile uses on the CPU): the output is written once
    instead of once per elementwise op. The residual is overwritten with the result: pass
    only a tensor nobody reads afterwards (or don't read it: a Winograd conv writes a new
    tensor). Equal to the unfused ops (tests/test_fast.py). A conv given a `winograd_weight`
    (winograd_convs) runs as F(4x4, 3x3) on channels_last inputs."""
    u = getattr(conv, "winograd_weight", None)
    if u is not None and x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return winograd_conv2d(x, u, conv.bias, relu=relu, residual=residual)
    args = (list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups)
    if residual is None:
        return torch.ops.mkldnn._convolution_pointwise(x, conv.weight, conv.bias, *args,
                                                       "relu" if relu else "none", [], "")
    return torch.ops.mkldnn._convolution_pointwise_.binary(residual, x, conv.weight, conv.bias, *args, "add",
                                                           None, "relu" if relu else None, [], None)


class FusedStem(Stem):
    """Stem with conv1 + ReLU fused (after fold_frozen_bn: norm1 is an Identity)."""

    def forward(self, x: Tensor) -> Tensor:
        if not _fusable(x, self.conv1):
            return super().forward(x)
        return F.max_pool2d(conv_pointwise(x, self.conv1, relu=True), kernel_size=3, stride=2, padding=1)


class FusedBasicBlock(BasicBlock):
    """BasicBlock with each conv's ReLU, and the shortcut's add, fused into the conv. In place
    on the block's input when the shortcut is the identity: in a Sequential of blocks
    nothing else reads it (fuse_blocks installs it only there)."""

    def forward(self, x: Tensor) -> Tensor:
        if not _fusable(x, self.conv1) or not _fusable(x, self.conv2):
            return super().forward(x)
        out = conv_pointwise(x, self.conv1, relu=True)
        return conv_pointwise(out, self.conv2, relu=True, residual=_block_residual(self, x))


def _block_residual(block: BasicBlock | Bottleneck, x: Tensor) -> Tensor | None:
    """What a fused block adds to its last conv: nothing in a plain net, else its input or its
    shortcut's (fresh) output."""
    if not block.residual:
        return None
    return x if block.shortcut is None else block.shortcut(x)


class FusedBottleneck(Bottleneck):
    """Bottleneck with each conv's ReLU, and the shortcut's add, fused into the conv (see
    FusedBasicBlock)."""

    def forward(self, x: Tensor) -> Tensor:
        if not all(_fusable(x, conv) for conv in (self.conv1, self.conv2, self.conv3)):
            return super().forward(x)
        out = conv_pointwise(x, self.conv1, relu=True)
        out = conv_pointwise(out, self.conv2, relu=True)
        return conv_pointwise(out, self.conv3, relu=True, residual=_block_residual(self, x))


class FusedRPNHead(RPNHead):
    """RPNHead with its 3x3 conv's ReLU fused into the conv (float32 inference, see above)."""

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor]:
        if not _fusable(features, self.conv):
            return super().forward(features)
        return self.outputs(conv_pointwise(features, self.conv, relu=True))


_FUSED = {Stem: FusedStem, BasicBlock: FusedBasicBlock, Bottleneck: FusedBottleneck}


def fuse_blocks(sequential: nn.Sequential) -> nn.Sequential:
    """In place, after fold_frozen_bn: the stem and blocks of `sequential` (and of Sequentials
    in it, the stages) whose norms are folded run fused (conv_pointwise) in float32 on the
    CPU and as before otherwise. Same modules and state_dict; only the class changes."""
    for child in sequential.children():
        if isinstance(child, nn.Sequential):
            fuse_blocks(child)
        elif type(child) in _FUSED and all(isinstance(m, nn.Identity) for name, m in child.named_children()
                                            if name.startswith("norm")):
            child.__class__ = _FUSED[type(child)]
    return sequential


# Winograd F(4x4, 3x3) pays from 256 channels in and out (R50 at 600x800, float32, 2 threads:
# 1.4-1.6x at 256, 2.0x on res5's 512-channel 7x7 RoI maps, 1.9x for the RPN's 1024; 1.0x at
# 128 and 0.5x at 64 channels, where the transforms cost more than the products save)
WINOGRAD_MIN_CHANNELS = 256


def winograd_convs(module: nn.Module) -> nn.Module:
    """In place, after fuse_blocks: each folded 3x3 stride-1 conv with at least
    WINOGRAD_MIN_CHANNELS channels in and out keeps its transformed kernels (a buffer
    outside the state_dict, 4x the kernel's size: 270 MB for R50-C4) and runs as F(4x4, 3x3)
    in conv_pointwise. Transforming them at each call instead cost more than Winograd saved."""
    for conv in module.modules():
        if (type(conv) is nn.Conv2d and winograd.suitable(conv) and conv.bias is not None
                and min(conv.in_channels, conv.out_channels) >= WINOGRAD_MIN_CHANNELS):
            conv.register_buffer("winograd_weight", winograd.transform_weight(conv.weight), persistent=False)
    return module


def winograd_training_convs(module: nn.Module) -> nn.Module:
    """In place, for training (res5): the 3x3 stride-1 convs with at least
    WINOGRAD_MIN_CHANNELS channels in and out run as WinogradConv2d (the output and the
    input's gradient by Winograd, kernels transformed at each call) in float32 on the CPU
    with channels_last inputs, and as before otherwise. Same Parameters. Not the trunk's or
    the RPN's: there the per-step kernel transform cost what Winograd saved (measured)."""
    for parent in list(module.modules()):
        for name, child in parent.named_children():
            if winograd.suitable(child) and min(child.in_channels, child.out_channels) >= WINOGRAD_MIN_CHANNELS:
                if not isinstance(child, FastConv2d):
                    setattr(parent, name, FastConv2d(child))
                getattr(parent, name).winograd = True
    return module


# ---- entry points -----------------------------------------------------------------------


# res5 at inference runs NCHW below this pooler resolution (maps under 7x7; see the module docstring)
NCHW_RES5_BELOW = 14


def install_runner(model: nn.Module, *, hoist: bool = True, chunk_size: int | str | None = AUTO,
                   channels_last: bool = True) -> nn.Module:
    heads = model.roi_heads
    heads.res5_runner = Res5Runner(heads.res5, pooler=heads.pooler, resolution=heads.pooler_resolution,
                                   spatial_scale=heads.spatial_scale, hoist=hoist, chunk_size=chunk_size,
                                   channels_last=channels_last)
    return model


@dataclass(frozen=True)
class InferencePlan:
    """Which inference steps of the fast path run on a device (see the module docstring)."""
    fold_bn: bool  # BN folded into the convs (device-neutral: it only removes work)
    channels_last: bool  # the trunk's (and the RPN's) convs in NHWC
    res5_channels_last: bool  # res5 in NHWC too
    small_map_taps: bool  # res5's 3x3 convs with small outputs as one matmul
    fuse: bool  # bias, ReLU and residual as oneDNN post-ops
    winograd: bool  # 3x3 stride-1 convs of 256+ channels as F(4x4, 3x3)
    runner: bool  # Res5Runner: gather pooling, hoisted 1x1 convs, res5 in chunks


def inference_plan(device: torch.device | str, *, bf16: bool = False, small_maps: bool = False,
                   fold_bn: bool = True, channels_last: bool = True, fuse: bool = True,
                   winograd: bool = True) -> InferencePlan:
    """The steps for a model on `device`: on the CPU all of them (bf16: under bfloat16
    autocast; small_maps: pooler resolution below NCHW_RES5_BELOW); elsewhere only folding,
    since the others are CPU kernels or were measured slower on CUDA."""
    cpu = torch.device(device).type == "cpu"
    fused = cpu and fold_bn and fuse
    return InferencePlan(fold_bn=fold_bn, channels_last=cpu and channels_last,
                         res5_channels_last=cpu and channels_last and (not small_maps or bf16),
                         small_map_taps=cpu and small_maps and bf16, fuse=fused,
                         winograd=fused and winograd and not bf16, runner=cpu)


def optimize_for_inference(model: nn.Module, *, fold_bn: bool = True, channels_last: bool = True,
                           hoist: bool = True, chunk_size: int | str | None = AUTO, fuse: bool = True,
                           winograd: bool = True) -> nn.Module:
    """An eval-mode copy of a FasterRCNN that gives the same detections faster, with the steps
    of `inference_plan` for the model's device (move the model first). Run it under
    torch.inference_mode(), as evaluation does. Its state_dict differs (folded norms); save
    checkpoints from the original model."""
    chunk_rois(chunk_size, model.roi_heads.pooler_resolution)  # a wrong chunk_size fails on every device
    fast = copy.deepcopy(model).eval().requires_grad_(False)
    # Small RoI maps: NCHW convs in float32; with bfloat16 autocast on the CPU (model.amp,
    # test.amp), NHWC and the 3x3 convs with small outputs as one matmul (taps_conv2d)
    plan = inference_plan(fast.device, bf16=bool(getattr(fast, "amp", False)), fold_bn=fold_bn,
                          small_maps=fast.roi_heads.pooler_resolution < NCHW_RES5_BELOW,
                          channels_last=channels_last, fuse=fuse, winograd=winograd)
    if plan.fold_bn:
        fold_frozen_bn(freeze_batchnorm(fast))
    if plan.channels_last:
        to_channels_last(fast)
        if not plan.res5_channels_last:
            fast.roi_heads.res5.to(memory_format=torch.contiguous_format)
    if plan.small_map_taps:
        small_map_convs(fast.roi_heads.res5)
    if plan.fuse:
        fuse_blocks(fast.trunk)
        fuse_blocks(fast.roi_heads.res5)
        if type(fast.rpn.head) is RPNHead:
            fast.rpn.head.__class__ = FusedRPNHead
    if plan.winograd:
        winograd_convs(fast)
    if not plan.runner:
        return fast
    return install_runner(fast, hoist=hoist, chunk_size=chunk_size, channels_last=plan.res5_channels_last)


def optimize_for_training(model: nn.Module, *, fold_bn: bool = True, channels_last: bool = False,
                          hoist: bool = True, chunk_size: int | str | None = AUTO, small_maps: bool = True,
                          winograd: bool = True) -> nn.Module:
    """In place: the same parameters (objects, names, values) and gradients, computed faster:
    frozen BN applied through the conv weights, res5's 1x1 convs hoisted, res5's 3x3 convs
    with small outputs as one matmul (small_maps). An optimizer built before or after this
    sees the same parameters; checkpoints load either way."""
    if fold_bn:
        fold_frozen_bn_for_training(model)
    if channels_last:
        to_channels_last(model)
    if small_maps:
        small_map_convs(model.roi_heads.res5)
    if winograd:
        winograd_training_convs(model.roi_heads.res5)
    return install_runner(model, hoist=hoist, chunk_size=chunk_size)
