"""Small convolutions as one matmul: every output position's kernel taps side by side,
times the weight. On outputs of at most SMALL_MAP_POSITIONS positions (res5 on small RoI
maps) this beats oneDNN's convolution, chiefly its backward (docs/accel.md). The same sums
in another order: equal to conv2d up to float rounding (tests/test_fast.py)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# Output maps of at most this many positions (4x4) run as taps_conv2d where the fast path
# asks for it (res5's 3x3 convs in training and bfloat16 inference on the CPU)
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
    each tap's gradient into one zeroed map, where autograd's slicing would give each tap its
    own zeroed copy of the map and sum the copies."""

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

