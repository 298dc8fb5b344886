"""`accel.cuda_fused_relu` (off until measured): on CUDA each folded conv's bias, its ReLU and
the residual add run inside cuDNN's convolution (conv-bias-activation: aten's
cudnn_convolution_relu and cudnn_convolution_add_relu, the ops TorchScript's frozen-graph
fusion emits on CUDA), so each output is written once instead of once per elementwise op. The
onednn.Fused* modules (stem, blocks, RPN head) call it through onednn.conv_pointwise for CUDA
inputs, as they call oneDNN's post-ops for CPU ones.

Under autocast (test.amp) the op has no autocast rule, so the input, weight, bias and residual
are cast here to the autocast dtype (the weight and bias once per dtype, then kept), as
autocast would cast them for a convolution. These ops have no meta kernel, so inside a
torch.compile'd module (accel.compile) the blocks run their unfused ops and the compiler fuses.

Shapes as in onednn.py: x (N, C, H, W), weight (K, C, kh, kw), bias (K,), the output and the
residual (N, K, H', W').
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor, nn

logger = logging.getLogger(__name__)

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DEVICES = ("cuda",)  # where conv_pointwise calls cuDNN (a test adds "cpu", with stand-in OPS)


def runs(x: Tensor) -> bool:
    """Whether onednn.conv_pointwise hands `x` to cuDNN (x's device is one of DEVICES)."""
    return x.device.type in DEVICES


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype a convolution of `x` computes in: autocast's for x's device where it is on, else x's."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def fusable(x: Tensor, conv: nn.Conv2d) -> bool:
    """For a folded conv (onednn.fusable checked the rest): `x` on CUDA, a float dtype the
    conv computes in (x's own, the weight's, or autocast's), and not being traced by torch.compile."""
    return (runs(x) and compute_dtype(x) in DTYPES
            and (x.dtype == conv.weight.dtype or torch.is_autocast_enabled(x.device.type))
            and not torch.compiler.is_compiling())


def cast_parameters(conv: nn.Conv2d, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """conv's weight and bias in `dtype`, cast once and kept on the conv (inference: the folded
    weights do not change; a weight replaced or changed in place is cast again)."""
    w, b = conv.weight, conv.bias
    key = (dtype, w.device, w.data_ptr(), _version(w), b.data_ptr(), _version(b))
    cached = getattr(conv, "_cudnn_cast", None)
    if cached is None or cached[0] != key:
        cached = (key, w.detach().to(dtype), b.detach().to(dtype))
        conv._cudnn_cast = cached
    return cached[1], cached[2]


def _version(t: Tensor) -> int:
    """t's version counter; -1 for an inference tensor (a model folded under inference_mode),
    which keeps none."""
    return -1 if t.is_inference() else t._version


def conv_bias_relu(x: Tensor, conv: nn.Conv2d, *, relu: bool, residual: Tensor | None = None) -> Tensor:
    """relu(conv(x) + bias [+ residual]) in one cuDNN call (y = act(conv(x) + alpha * z + bias));
    without relu the plain convolution and add. Where cuDNN has no fused kernel for a conv (a
    RuntimeError from the op) that conv runs unfused from then on, with one warning per dtype and
    reason. Equal to the unfused ops up to rounding (tests/test_cuda.py; on the CPU
    tests/test_gpu_levers.py checks the arithmetic with stand-in ops and that the calls bind to
    aten's schemas)."""
    dtype = compute_dtype(x)
    weight, bias = cast_parameters(conv, dtype)
    x, z = x.to(dtype), None if residual is None else residual.to(dtype)
    if relu and not getattr(conv, "_cudnn_unfused", False):
        geometry = {"stride": list(conv.stride), "padding": list(conv.padding), "dilation": list(conv.dilation),
                    "groups": conv.groups}
        try:
            if z is None:
                return OPS["relu"](x, weight=weight, bias=bias, **geometry)
            return OPS["add_relu"](x, weight=weight, z=z, alpha=1.0, bias=bias, **geometry)
        except (NotImplementedError, torch.cuda.OutOfMemoryError):
            raise  # no kernel for the device (a bug), or out of memory: not cuDNN's limits
        except RuntimeError as error:  # e.g. no cuDNN engine for this fusion, shape and dtype
            conv._cudnn_unfused = True
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            if (dtype, reason) not in FALLBACKS_WARNED:  # once per dtype and reason, not once per conv
                FALLBACKS_WARNED.add((dtype, reason))
                logger.warning("accel.cuda_fused_relu: cuDNN could not fuse the ReLU into a %s conv on %s %s "
                               "input (%s); such convs run unfused from now on (this is said once per dtype and "
                               "reason)", tuple(weight.shape), tuple(x.shape), dtype, reason)
    out = F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)
    if z is not None:
        out = out + z
    return out.relu_() if relu else out


FALLBACKS_WARNED: set[tuple[torch.dtype, str]] = set()  # (dtype, reason) of the fallbacks already logged

# the fused ops, by name: a test replaces them with CPU stand-ins of the same signature
OPS = {"relu": torch.ops.aten.cudnn_convolution_relu, "add_relu": torch.ops.aten.cudnn_convolution_add_relu}
