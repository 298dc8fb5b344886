"""Fused post-ops for float32 inference on the CPU: each folded conv's bias, its ReLU and
the residual add run inside oneDNN's convolution (conv_pointwise, the op torch.compile emits
on the CPU), so each output is written once instead of once per elementwise op. The Fused*
classes are the stem, blocks and RPN head with their convs run so; fuse_blocks installs
them by changing the class of modules whose norms are folded. On the CPU under autocast or
with autograd they run the unfused ops. On CUDA (installed there by the `accel.cuda_fused_relu`
lever only) conv_pointwise runs cuDNN's conv-bias-ReLU instead (cudnn.py), in float32 or
under autocast.

Shapes: x (N, C, H, W), a conv's weight (K, C, kh, kw) and bias (K,), its output and the
residual (N, K, H', W'), H' x W' the map after the conv's stride.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from backbones.resnet import BasicBlock, Bottleneck, Stem
from detection.accel import cudnn
from detection.accel.winograd import winograd_conv2d
from detection.modeling.rpn import RPNHead

# oneDNN's fused convolution: in PyTorch builds with oneDNN (every x86 CPU wheel)
FUSED_CONV = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")


def fusable(x: Tensor, conv: nn.Module) -> bool:
    """Whether conv_pointwise can run `conv` on `x`: a folded conv (bias, zero padding), no
    autograd (no backward); on the CPU float32 without autocast (oneDNN's op has no autocast
    rule), on CUDA what cudnn.fusable allows. Anything else runs the unfused ops."""
    if not (type(conv) is nn.Conv2d and conv.bias is not None and conv.padding_mode == "zeros"
            and isinstance(conv.padding, tuple) and not (x.requires_grad or conv.weight.requires_grad)):
        return False
    if cudnn.runs(x):
        return cudnn.fusable(x, conv)
    return (FUSED_CONV and x.device.type == "cpu" and x.dtype == conv.weight.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu"))


def conv_pointwise(x: Tensor, conv: nn.Conv2d, *, relu: bool, residual: Tensor | None = None) -> Tensor:
    """relu(conv(x) [+ residual]) with the bias, the add and the ReLU as post-ops of oneDNN's
    convolution (the kernels torch.compile uses on the CPU): the output is written once
    instead of once per elementwise op. The residual is overwritten with the result: pass
    only a tensor nobody reads afterwards (or don't read it: a Winograd conv writes a new
    tensor). Equal to the unfused ops (tests/test_fast.py). A conv given a `winograd_weight`
    (winograd_convs) runs as F(4x4, 3x3) on channels_last inputs. On CUDA: cuDNN's fused
    convolution (cudnn.conv_bias_relu), which returns a new tensor."""
    if cudnn.runs(x):
        return cudnn.conv_bias_relu(x, conv, relu=relu, residual=residual)
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
        if not fusable(x, self.conv1):
            return super().forward(x)
        return F.max_pool2d(conv_pointwise(x, self.conv1, relu=True), kernel_size=3, stride=2, padding=1)


class FusedBasicBlock(BasicBlock):
    """BasicBlock with each conv's ReLU, and the shortcut's add, fused into the conv. In place
    on the block's input when the shortcut is the identity: in a Sequential of blocks
    nothing else reads it (fuse_blocks installs it only there)."""

    def forward(self, x: Tensor) -> Tensor:
        if not fusable(x, self.conv1) or not fusable(x, self.conv2):
            return super().forward(x)
        out = conv_pointwise(x, self.conv1, relu=True)
        return conv_pointwise(out, self.conv2, relu=True, residual=self.shortcut_output(x))


class FusedBottleneck(Bottleneck):
    """Bottleneck with each conv's ReLU, and the shortcut's add, fused into the conv (see
    FusedBasicBlock). Its tail is fused too where the fast path's res5 calls it directly."""

    def forward(self, x: Tensor) -> Tensor:
        if not fusable(x, self.conv1):
            return super().forward(x)
        return self.tail(conv_pointwise(x, self.conv1, relu=True), self.shortcut_output(x))

    def tail(self, out: Tensor, shortcut: Tensor | None) -> Tensor:
        if not (fusable(out, self.conv2) and fusable(out, self.conv3)):
            return super().tail(out, shortcut)
        out = conv_pointwise(out, self.conv2, relu=True)
        return conv_pointwise(out, self.conv3, relu=True, residual=shortcut)


class FusedRPNHead(RPNHead):
    """RPNHead with its 3x3 conv's ReLU fused into the conv (float32 inference, see above)."""

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor]:
        if not fusable(features, self.conv):
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

