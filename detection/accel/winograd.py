"""3x3 stride-1 convolutions by Winograd's minimal filtering F(4x4, 3x3) (Lavin and Gray,
"Fast Algorithms for Convolutional Neural Networks", 2016), for float32 on the CPU: inference
(winograd_conv2d with kernels transformed once) and training (WinogradConv2d).

Each 4x4 output tile is computed from its 6x6 input tile d as A^T [(G g G^T) * (B^T d B)] A:
the 3x3 kernel g and the tile are taken to a 6x6 domain where the convolution is an
elementwise product, summed over input channels. So a tile costs 36 multiply-adds per
input/output channel pair instead of 16 x 9 = 144, and the 36 sums over channels are 36
matrix products (tiles x C) @ (C x K). The transforms are matrix products with the
Kronecker products of B^T and A^T. The same convolution, rounded differently: outputs
within about 1e-5 of their scale of the direct convolution's (tests/test_winograd.py).

The tiles are processed in chunks (tile rows, about TILES_PER_CHUNK tiles) so that each
chunk's gathered input, its transform and the products stay in the cache; each chunk's
outputs get the bias, the residual and the ReLU while they are there.

Where the fast path uses it (winograd_convs here for inference, fold.winograd_training_convs
for training) and what it measured: docs/accel.md.

Shapes: N images, C input and K output channels, an H x W map; P = N * ceil(H/4) * ceil(W/4)
tiles, T of them in a chunk; 36 = the 6x6 input window's positions, 16 = the 4x4 output tile's.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.profiler import record_function

# Lavin and Gray's F(4x4, 3x3) matrices, on the CPU: Winograd runs only there (accel.plan)
_BT = torch.tensor([[4, 0, -5, 0, 1, 0],
                    [0, -4, -4, 1, 1, 0],
                    [0, 4, -4, -1, 1, 0],
                    [0, -2, -1, 2, 1, 0],
                    [0, 2, -1, -2, 1, 0],
                    [0, 4, 0, -5, 0, 1]], dtype=torch.float64, device="cpu")
_G = torch.tensor([[1 / 4, 0, 0],
                   [-1 / 6, -1 / 6, -1 / 6],
                   [-1 / 6, 1 / 6, -1 / 6],
                   [1 / 24, 1 / 12, 1 / 6],
                   [1 / 24, -1 / 12, 1 / 6],
                   [0, 0, 1]], dtype=torch.float64, device="cpu")
_AT = torch.tensor([[1, 1, 1, 1, 1, 0],
                    [0, 1, -1, 2, -2, 0],
                    [0, 1, 1, 4, 4, 0],
                    [0, 1, -1, 8, -8, 1]], dtype=torch.float64, device="cpu")
# vec(B^T d B) = (B^T kron B^T) vec(d) for a row-major 6x6 d; likewise for A^T m A
_IN = torch.kron(_BT, _BT).float()    # (36, 36)
_OUT = torch.kron(_AT, _AT).float()   # (16, 36)
_KERNEL = torch.kron(_G, _G).float()  # (36, 9)

TILE, WINDOW = 4, 6
# tiles per chunk for 512 x 512 kernels; the transformed kernels are read once per chunk, so
# larger kernels get proportionally larger chunks (the measured best: docs/accel.md)
TILES_PER_CHUNK = 128
# Winograd pays from this many channels in and out; below it the transforms cost more than
# the products save (docs/accel.md)
MIN_CHANNELS = 256
# each call runs inside record_function(PROFILER_LABEL + its direct convolution's FLOPs): the
# benchmark counts those (2 x multiply-adds, as torch.utils.flop_counter counts a conv2d)
# instead of the products inside, so the work compared stays the convolution's
PROFILER_LABEL = "winograd_conv3x3 flops="


def suitable(conv: nn.Module) -> bool:
    """A 3x3, stride-1, 'same'-padded, dense convolution: what F(4x4, 3x3) computes."""
    return (isinstance(conv, nn.Conv2d) and conv.kernel_size == (3, 3) and conv.stride == (1, 1)
            and conv.padding == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1
            and conv.padding_mode == "zeros")


def worthwhile(conv: nn.Module) -> bool:
    """suitable, with at least MIN_CHANNELS channels in and out."""
    return suitable(conv) and min(conv.in_channels, conv.out_channels) >= MIN_CHANNELS


def transform_weight(weight: Tensor, *, transposed: bool = False) -> Tensor:
    """(K, C, 3, 3) kernels -> (36, C, K): G g G^T for each pair, as one matrix product with
    G kron G (nothing larger than the result is allocated). transposed: (36, K, C) for the
    transposed convolution (the input's gradient): each kernel flipped, K and C swapped."""
    k, c = weight.shape[:2]
    kernel = _KERNEL.to(weight.device, weight.dtype)
    if transposed:
        return torch.mm(kernel.flip(1), weight.detach().reshape(k * c, 9).t()).view(WINDOW * WINDOW, k, c)
    taps = weight.detach().permute(1, 0, 2, 3).reshape(c * k, 9)
    return torch.mm(kernel, taps.t()).view(WINDOW * WINDOW, c, k)


class WinogradConv2d(torch.autograd.Function):
    """conv2d(x, weight, bias, padding=1) for training: the output and the input's gradient
    (the transposed convolution, itself a 3x3 'same' convolution) by Winograd, the kernels'
    gradient by the direct convolution's backward. The kernels are transformed at each call
    (they change at every step)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return winograd_conv2d(x, transform_weight(weight), bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        x, weight = ctx.saved_tensors
        grad = grad.contiguous(memory_format=torch.channels_last)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = winograd_conv2d(grad, transform_weight(weight, transposed=True), None)
        if ctx.needs_input_grad[1]:
            grad_w = torch.ops.aten.convolution_backward(grad, x, weight, None, [1, 1], [1, 1], [1, 1], False,
                                                         [0, 0], 1, [False, True, False])[1]
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.sum((0, 2, 3))
        return grad_x, grad_w, grad_b


def _indices(n: int, h: int, w: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Gather rows (36, P) into the (N*H*W, C) input rows and scatter rows (16, P) into the
    (N*H*W, K) output rows, -1 where a tile reaches past the map (the zero padding; outputs
    that are cropped). P = N * ceil(H/4) * ceil(W/4) tiles in (image, tile row, tile column)
    order."""
    th, tw = -(-h // TILE), -(-w // TILE)
    image = torch.arange(n, device=device).view(n, 1, 1, 1, 1)
    ti = torch.arange(th, device=device).view(1, th, 1, 1, 1)
    tj = torch.arange(tw, device=device).view(1, 1, tw, 1, 1)

    def rows(size: int, offset: int) -> Tensor:
        a = torch.arange(size, device=device)
        r = TILE * ti + a.view(1, 1, 1, size, 1) + offset
        c = TILE * tj + a.view(1, 1, 1, 1, size) + offset
        index = (image * h + r) * w + c
        inside = ((r >= 0) & (r < h) & (c >= 0) & (c < w)).expand_as(index)
        return torch.where(inside, index, -1).permute(3, 4, 0, 1, 2).reshape(size * size, -1)

    return rows(WINDOW, -1), rows(TILE, 0)


def winograd_conv2d(x: Tensor, u: Tensor, bias: Tensor | None, *, relu: bool = False,
                    residual: Tensor | None = None, tiles_per_chunk: int | None = None) -> Tensor:
    """relu(conv3x3(x, g, bias, padding=1) [+ residual]) with u = transform_weight(g).
    x: (N, C, H, W), float, best channels_last; returns (N, K, H, W) channels_last."""
    n, c, h, w = x.shape
    k = u.shape[2]
    if tiles_per_chunk is None:
        tiles_per_chunk = TILES_PER_CHUNK * max(1, c * k // 512 ** 2)
    with record_function(f"{PROFILER_LABEL}{2 * n * h * w * c * k * 9}"):
        return _winograd(x, u, bias, relu, residual, tiles_per_chunk)


def _winograd(x: Tensor, u: Tensor, bias: Tensor | None, relu: bool, residual: Tensor | None,
              tiles_per_chunk: int) -> Tensor:
    n, c, h, w = x.shape
    k = u.shape[2]
    th, tw = -(-h // TILE), -(-w // TILE)
    gather, scatter = _indices(n, h, w, x.device)
    padding = gather < 0
    gather = gather.clamp(min=0)
    # `out` itself is returned, not a view of a larger buffer (a custom autograd Function's
    # output must not be a view); `rows` are its NHWC rows, written chunk by chunk
    out = torch.empty((n, k, h, w), dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
    rows = out.permute(0, 2, 3, 1).view(-1, k)
    source = x.permute(0, 2, 3, 1).reshape(-1, c)   # a view of a channels_last x
    extra = None if residual is None else residual.permute(0, 2, 3, 1).reshape(-1, k)
    kin, kout = _IN.to(x.device, x.dtype), _OUT.to(x.device, x.dtype)
    step = max(1, tiles_per_chunk // tw)   # tile rows per chunk
    for first in range(0, n * th, step):
        last = min(n * th, first + step)
        tiles = slice(first * tw, last * tw)
        d = source.index_select(0, gather[:, tiles].reshape(-1))  # (36*T, C): the chunk's T input windows
        d.masked_fill_(padding[:, tiles].reshape(-1, 1), 0)
        # B^T d B for every tile and channel: (36, 36) @ (36, T*C) -> (36, T, C); then the 36 sums
        # over channels: (36, T, C) @ (36, C, K) -> (36, T, K)
        m = torch.bmm(torch.mm(kin, d.view(WINDOW * WINDOW, -1)).view(WINDOW * WINDOW, -1, c), u)
        y = torch.mm(kout, m.view(WINDOW * WINDOW, -1)).view(-1, k)  # A^T m A: (16, T*K) -> (16*T, K)
        target = scatter[:, tiles].reshape(-1)
        kept = target >= 0
        if not bool(kept.all()):   # tiles reaching past the map: drop those outputs
            kept = kept.nonzero().squeeze(1)
            y, target = y.index_select(0, kept), target.index_select(0, kept)
        rows.index_copy_(0, target, y)
        # the output rows of tile rows first..last-1: contiguous in (image, row, column) order
        start, stop = (_first_row(t, th, h, w) for t in (first, last))
        part = rows[start:stop]
        if bias is not None:
            part += bias
        if extra is not None:
            part += extra[start:stop]
        if relu:
            part.relu_()
    return out


def _first_row(tile_row: int, th: int, h: int, w: int) -> int:
    """The first output row (in (image, row, column) order) of a tile row."""
    image, i = divmod(tile_row, th)
    return (image * h + min(TILE * i, h)) * w


def winograd_convs(module: nn.Module) -> nn.Module:
    """In place, for inference after onednn.fuse_blocks: each folded 3x3 stride-1 conv with
    at least MIN_CHANNELS channels in and out keeps its transformed kernels (a buffer outside
    the state_dict, 4x the kernel's size: 270 MB for R50-C4) and runs as F(4x4, 3x3) in
    onednn.conv_pointwise. Transformed once: at each call they would cost more than Winograd
    saves."""
    for conv in module.modules():
        if type(conv) is nn.Conv2d and conv.bias is not None and worthwhile(conv):
            conv.register_buffer("winograd_weight", transform_weight(conv.weight), persistent=False)
    return module
