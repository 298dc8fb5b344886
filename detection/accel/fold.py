"""Frozen BN folded into the conv before it, and FastConv2d, the conv class the training
path installs (docs/accel.md).

conv(x) * scale + shift == conv with weight w * scale and bias shift. Inference folds once
(fold_frozen_bn: on a copy, whose norms become Identity); training computes w * scale at
every call (ScaledConv2d), so gradients reach w through the product and the parameters,
the norms' buffers and the state_dict keys stay as they were. Trainable BN (BatchNorm2d) is
the same affine in eval mode, from its running statistics: inference folds it too, on an
eval-mode copy (backbones.resnet.freeze_batchnorm), training leaves it alone.

Shapes: a conv's weight (K, C, kh, kw), K output and C input channels; a norm's scale and
shift (K,), one per output channel, so w * scale is w * scale.view(K, 1, 1, 1).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torchvision.ops import FrozenBatchNorm2d

from detection.accel import winograd
from detection.accel.taps import SMALL_MAP_POSITIONS, taps_conv2d


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
    scale, shift = frozen_affine(norm)  # (K,) each, K = the conv's output channels
    folded = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                       conv.padding, conv.dilation, conv.groups, bias=True,
                       device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        folded.weight.copy_(conv.weight * scale.view(-1, 1, 1, 1))  # (K, C, kh, kw) * (K, 1, 1, 1)
        bias = shift if conv.bias is None else shift + conv.bias * scale
        folded.bias.copy_(bias)
    folded.requires_grad_(False)
    return folded


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


class FastConv2d(nn.Conv2d):
    """What `conv` computes, with the same Parameters (no new state_dict keys). With
    small_maps, outputs of at most SMALL_MAP_POSITIONS positions are computed by taps_conv2d;
    with winograd, float32 channels_last inputs by WinogradConv2d. Both on the CPU only."""

    def __init__(self, conv: nn.Conv2d, small_maps: bool = False) -> None:
        super().__init__(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                         conv.padding, conv.dilation, conv.groups, bias=conv.bias is not None,
                         padding_mode=conv.padding_mode, device="meta")
        self.weight, self.bias = conv.weight, conv.bias  # the same Parameters
        self.small_maps = small_maps
        self.winograd = False

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
    return _set_on_convs(module, lambda m: isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1), "small_maps")


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


def winograd_training_convs(module: nn.Module) -> nn.Module:
    """In place, for training (res5): the 3x3 stride-1 convs with at least
    winograd.MIN_CHANNELS channels in and out run as WinogradConv2d (the output and the
    input's gradient by Winograd, kernels transformed at each call) in float32 on the CPU
    with channels_last inputs, and as before otherwise. Same Parameters. Not the trunk's or
    the RPN's: there the per-step kernel transform cost what Winograd saved (measured)."""
    return _set_on_convs(module, winograd.worthwhile, "winograd")


def _set_on_convs(module: nn.Module, selected: Callable[[nn.Module], bool], flag: str) -> nn.Module:
    """In place: each selected conv of `module` becomes a FastConv2d (the same Parameters)
    with `flag` set."""
    for parent in list(module.modules()):
        for name, child in parent.named_children():
            if selected(child):
                if not isinstance(child, FastConv2d):
                    setattr(parent, name, FastConv2d(child))
                setattr(getattr(parent, name), flag, True)
    return module
