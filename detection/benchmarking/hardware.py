"""The machine's measured peak: matrix-product and 3x3-convolution throughput, the reference
against which the report rates each inference stage (report.conv_peak_gflops)."""
from __future__ import annotations

import torch

from detection.benchmarking.meters import median_time
from detection.utils.comm import tf32_set


def hardware_throughput(quick: bool = False, device: str = "cpu") -> dict[str, float]:
    """GFLOP/s of an n^3 fp32 matmul (n = 2048) and of a res5-like 3x3 conv (16 x 512 x 14 x 14
    -> 512); `quick` shrinks both 8x (smoke tests). On CUDA (n = 8192, 128 RoI maps) float32
    without TF32, then TF32, float16 and bfloat16 (`*_tf32_gflops`, ...), the TF32 flags put
    back as they were."""
    cuda = device == "cuda"
    n, batch = (1024, 2) if quick else ((8192, 128) if cuda else (2048, 16))
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    x, w = torch.randn(batch, 512, 14, 14, device=device), torch.randn(512, 512, 3, 3, device=device)
    conv_flops = 2 * batch * 14 * 14 * 512 * 512 * 9
    if not cuda:
        return _throughputs(a, b, x, w, conv_flops, "")
    with tf32_set(False):
        out = _throughputs(a, b, x, w, conv_flops, "")
    with tf32_set(True):
        out.update(_throughputs(a, b, x, w, conv_flops, "_tf32"))
    for dtype, name in ((torch.float16, "_fp16"), (torch.bfloat16, "_bf16")):
        out.update(_throughputs(a.to(dtype), b.to(dtype), x.to(dtype), w.to(dtype), conv_flops, name))
    return out


def _throughputs(a: torch.Tensor, b: torch.Tensor, x: torch.Tensor, w: torch.Tensor, conv_flops: float,
                 suffix: str) -> dict[str, float]:
    """matmul{suffix}_gflops, conv3x3{suffix}_gflops and conv3x3_channels_last{suffix}_gflops."""
    n = a.shape[0]
    out = {f"matmul{suffix}_gflops": 2 * n**3 / median_time(lambda: a @ b) / 1e9,
           f"conv3x3{suffix}_gflops": conv_flops / median_time(lambda: torch.conv2d(x, w, padding=1)) / 1e9}
    x, w = (t.contiguous(memory_format=torch.channels_last) for t in (x, w))
    out[f"conv3x3_channels_last{suffix}_gflops"] = conv_flops / median_time(lambda: torch.conv2d(x, w, padding=1)) / 1e9
    return out
