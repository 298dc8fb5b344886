"""ResNet-18/34/50/101/152 as in Table 1 of He et al. 2016, split into the stages
stem, res2, res3, res4, res5 (the paper's conv1, conv2_x .. conv5_x).

Shapes: N images, C channels, H, W. The stem (7x7/2 conv + 3x3/2 max pool) has
stride 4; res3, res4 and res5 each halve the resolution in their first block, so
the stage strides are 4, 4, 8, 16, 32.

Module and attribute names (stem.conv1, res4.0.norm2, res5.0.shortcut, ...) are a
contract: the detector, the weight loaders and later performance passes (BN folding,
hoisting res5's first 1x1 conv) find layers by them.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import FrozenBatchNorm2d

from backbones.weights import load_weights

logger = logging.getLogger(__name__)

STAGE_NAMES = ("stem", "res2", "res3", "res4", "res5")
STAGE_STRIDES = {"stem": 4, "res2": 4, "res3": 8, "res4": 16, "res5": 32}

# depth -> (block type, blocks in res2..res5): the paper's Table 1.
RESNET_SPECS: dict[int, tuple[str, tuple[int, int, int, int]]] = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}
NORM_KINDS = ("frozen_bn", "bn", "gn")
SHORTCUT_KINDS = ("A", "B", "C")
GN_GROUPS = 32


class BackboneError(ValueError):
    """A bad backbone option (names the option and the allowed values)."""


def make_norm(kind: str, channels: int) -> nn.Module:
    """The normalisation layer after every conv: frozen BN (fine-tuning, as in the
    paper), trainable BN, or GroupNorm with 32 groups (training from scratch)."""
    norms = {
        "frozen_bn": lambda c: FrozenBatchNorm2d(c),
        "bn": lambda c: nn.BatchNorm2d(c),
        "gn": lambda c: nn.GroupNorm(GN_GROUPS, c),
    }
    if kind not in norms:
        raise BackboneError(f"norm must be one of {list(norms)}, got {kind!r}")
    return norms[kind](channels)


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    # No bias: every conv is followed by a norm that has its own shift.
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


def conv1x1(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)


class ZeroPadShortcut(nn.Module):
    """The paper's option A: identity, subsampled by `stride`, with the extra output
    channels filled with zeros. It has no parameters."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        if out_channels < in_channels:
            raise BackboneError(f"option A cannot shrink {in_channels} to {out_channels} channels")
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride

    def forward(self, x: Tensor) -> Tensor:
        if self.stride > 1:
            # Same output size as a stride-s conv with "same" padding: ceil(H / s).
            x = x[:, :, :: self.stride, :: self.stride]
        # (N, C_in, H, W) -> (N, C_out, H, W): zeros appended after the input channels.
        return F.pad(x, (0, 0, 0, 0, 0, self.out_channels - self.in_channels))

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, stride={self.stride}"


def make_shortcut(
    kind: str, in_channels: int, out_channels: int, stride: int, norm: str, residual: bool
) -> nn.Module | None:
    """None for an identity shortcut (or no shortcut at all in a plain net), else a
    projection nn.Sequential(conv1x1, norm) or an option-A ZeroPadShortcut."""
    if not residual:
        return None
    shape_changes = in_channels != out_channels or stride != 1
    if kind == "C" or (kind == "B" and shape_changes):
        return nn.Sequential(conv1x1(in_channels, out_channels, stride), make_norm(norm, out_channels))
    if kind == "A" and shape_changes:
        return ZeroPadShortcut(in_channels, out_channels, stride)
    return None


class _Block(nn.Module):
    """What basic and bottleneck blocks share: bookkeeping and the final
    "add the shortcut, then ReLU" step."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, residual: bool) -> None:
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.stride, self.residual = stride, residual
        self.shortcut: nn.Module | None = None

    def shortcut_output(self, x: Tensor) -> Tensor | None:
        """What the block adds to its branch: nothing in a plain net (residual false), else
        its input (identity shortcut) or its shortcut's output."""
        if not self.residual:
            return None
        return x if self.shortcut is None else self.shortcut(x)

    @staticmethod
    def _merge(branch: Tensor, shortcut: Tensor | None) -> Tensor:
        """relu(branch + shortcut) (shortcut_output's result; None adds nothing)."""
        if shortcut is not None:  # in place: the branch is a fresh tensor, and no backward needs it
            branch += shortcut
        return F.relu_(branch)


class BasicBlock(_Block):
    """Two 3x3 convs (ResNet-18/34); the stride sits in the first."""

    expansion = 1

    def __init__(
        self, in_channels: int, out_channels: int, *, stride: int = 1, norm: str = "frozen_bn",
        shortcut: str = "B", residual: bool = True,
    ) -> None:
        super().__init__(in_channels, out_channels, stride, residual)
        self.conv1 = conv3x3(in_channels, out_channels, stride)
        self.norm1 = make_norm(norm, out_channels)
        self.conv2 = conv3x3(out_channels, out_channels)
        self.norm2 = make_norm(norm, out_channels)
        self.shortcut = make_shortcut(shortcut, in_channels, out_channels, stride, norm, residual)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu_(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return self._merge(out, self.shortcut_output(x))


class Bottleneck(_Block):
    """1x1 reduce, 3x3, 1x1 expand (ResNet-50/101/152). The stride sits in the first
    1x1 conv (MSRA/Caffe models, the paper's FLOP counts) or in the 3x3 (torchvision)."""

    expansion = 4

    def __init__(
        self, in_channels: int, bottleneck_channels: int, out_channels: int, *, stride: int = 1,
        norm: str = "frozen_bn", stride_in_1x1: bool = False, shortcut: str = "B", residual: bool = True,
    ) -> None:
        super().__init__(in_channels, out_channels, stride, residual)
        stride_1x1, stride_3x3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.conv1 = conv1x1(in_channels, bottleneck_channels, stride_1x1)
        self.norm1 = make_norm(norm, bottleneck_channels)
        self.conv2 = conv3x3(bottleneck_channels, bottleneck_channels, stride_3x3)
        self.norm2 = make_norm(norm, bottleneck_channels)
        self.conv3 = conv1x1(bottleneck_channels, out_channels)
        self.norm3 = make_norm(norm, out_channels)
        self.shortcut = make_shortcut(shortcut, in_channels, out_channels, stride, norm, residual)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu_(self.norm1(self.conv1(x)))
        return self.tail(out, self.shortcut_output(x))

    def tail(self, out: Tensor, shortcut: Tensor | None) -> Tensor:
        """The block from conv2 on: relu(norm3(conv3(relu(norm2(conv2(out))))) + shortcut),
        given conv1's output after its norm and ReLU and shortcut_output's result (None adds
        nothing). The one copy of this arithmetic: the fast path's res5 computes conv1 and
        the shortcut its own way and continues here (detection/accel/res5.py)."""
        out = F.relu_(self.norm2(self.conv2(out)))
        return self._merge(self.norm3(self.conv3(out)), shortcut)


class Stem(nn.Module):
    """conv1 of Table 1: 7x7/2 conv with 64 channels, norm, ReLU, 3x3/2 max pool."""

    def __init__(self, norm: str = "frozen_bn", in_channels: int = 3, out_channels: int = 64) -> None:
        super().__init__()
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, 4
        self.conv1 = nn.Conv2d(in_channels, out_channels, 7, stride=2, padding=3, bias=False)
        self.norm1 = make_norm(norm, out_channels)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu_(self.norm1(self.conv1(x)))
        return F.max_pool2d(x, kernel_size=3, stride=2, padding=1)


def make_stage(
    block: str, num_blocks: int, in_channels: int, width: int, *, stride: int, norm: str,
    stride_in_1x1: bool, shortcut: str, residual: bool,
) -> nn.Sequential:
    """One of res2..res5: `num_blocks` blocks, only the first changes stride/channels."""
    blocks = []
    for index in range(num_blocks):
        block_stride = stride if index == 0 else 1
        if block == "basic":
            blocks.append(BasicBlock(in_channels, width, stride=block_stride, norm=norm,
                                     shortcut=shortcut, residual=residual))
        else:
            blocks.append(Bottleneck(in_channels, width, width * Bottleneck.expansion,
                                     stride=block_stride, norm=norm, stride_in_1x1=stride_in_1x1,
                                     shortcut=shortcut, residual=residual))
        in_channels = blocks[-1].out_channels
    return nn.Sequential(*blocks)


def frozen_batchnorm(bn: nn.BatchNorm2d) -> FrozenBatchNorm2d:
    """A FrozenBatchNorm2d holding `bn`'s current statistics and affine parameters."""
    with torch.device(bn.running_mean.device):  # where bn is: a CUDA model's norms stay on CUDA
        frozen = FrozenBatchNorm2d(bn.num_features, eps=bn.eps)
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(frozen, name).copy_(getattr(bn, name))
    return frozen


def freeze_batchnorm(module: nn.Module) -> nn.Module:
    """In place: every BatchNorm2d in `module` (affine, with running statistics) becomes the
    FrozenBatchNorm2d of its statistics, which is what it computes in eval mode. A frozen stage
    must not update BN statistics in train mode either (as in Detectron2; GN has none); the fast
    path's inference copies then fold them into the convs (detection.accel.fold)."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d) and child.affine and child.running_mean is not None:
            setattr(module, name, frozen_batchnorm(child))
        else:
            freeze_batchnorm(child)
    return module


def _check_options(depth: int, norm: str, freeze_at: int, shortcut: str, residual: bool,
                   stride_in_1x1: bool) -> None:
    if depth not in RESNET_SPECS:
        raise BackboneError(f"depth must be one of {sorted(RESNET_SPECS)}, got {depth!r}")
    if norm not in NORM_KINDS:
        raise BackboneError(f"norm must be one of {list(NORM_KINDS)}, got {norm!r}")
    if not isinstance(freeze_at, int) or not 0 <= freeze_at <= len(STAGE_NAMES):
        raise BackboneError(f"freeze_at must be an int in 0..{len(STAGE_NAMES)}, got {freeze_at!r}")
    if shortcut not in SHORTCUT_KINDS:
        raise BackboneError(f"shortcut must be one of {list(SHORTCUT_KINDS)}, got {shortcut!r}")
    for option, value in (("residual", residual), ("stride_in_1x1", stride_in_1x1)):
        if not isinstance(value, bool):
            raise BackboneError(f"{option} must be true or false, got {value!r}")


def _check_out_features(out_features: Sequence[str]) -> tuple[str, ...]:
    names = (out_features,) if isinstance(out_features, str) else tuple(out_features)
    unknown = [name for name in names if name not in STAGE_NAMES]
    if not names or unknown or len(set(names)) != len(names):
        raise BackboneError(f"out_features must be distinct names from {list(STAGE_NAMES)}, "
                            f"got {out_features!r}")
    return names


class ResNet(nn.Module):
    """The ResNet trunk of Table 1 without its classifier. forward(x) returns
    {stage name: features} for the `out_features` stages and skips every stage after
    the last requested one (the C4 detector runs res5 itself, per RoI)."""

    def __init__(
        self, depth: int, *, out_features: Sequence[str] = ("res4",), norm: str = "frozen_bn",
        freeze_at: int = 2, stride_in_1x1: bool = False, shortcut: str = "B", residual: bool = True,
    ) -> None:
        super().__init__()
        _check_options(depth, norm, freeze_at, shortcut, residual, stride_in_1x1)
        if stride_in_1x1 and RESNET_SPECS[depth][0] == "basic":  # as Detectron2, ignored; but said, not silent
            logger.warning("stride_in_1x1 has no effect on ResNet-%d: its basic blocks have no 1x1 convolution "
                           "(the stride is in the first 3x3)", depth)
        self.depth, self.norm, self.stride_in_1x1 = depth, norm, stride_in_1x1
        self.shortcut_option, self.residual, self.freeze_at = shortcut, residual, 0
        self.out_features = out_features
        self.weights_info = None  # a backbones.weights.WeightsInfo once weights are loaded
        block, counts = RESNET_SPECS[depth]
        self.stem = Stem(norm)
        self.out_channels: dict[str, int] = {"stem": self.stem.out_channels}
        self.out_strides: dict[str, int] = dict(STAGE_STRIDES)
        in_channels = self.stem.out_channels
        for index, (name, num_blocks) in enumerate(zip(STAGE_NAMES[1:], counts)):
            stage = make_stage(block, num_blocks, in_channels, 64 * 2**index, stride=1 if index == 0 else 2,
                               norm=norm, stride_in_1x1=stride_in_1x1, shortcut=shortcut, residual=residual)
            setattr(self, name, stage)
            in_channels = self.out_channels[name] = stage[-1].out_channels
        self._init_weights()
        self.freeze(freeze_at)

    @property
    def out_features(self) -> tuple[str, ...]:
        return self._out_features

    @out_features.setter
    def out_features(self, names: Sequence[str]) -> None:
        self._out_features = _check_out_features(names)
        last = max(STAGE_NAMES.index(name) for name in self._out_features)
        self._stages_to_run = STAGE_NAMES[: last + 1]

    def _init_weights(self) -> None:
        # He initialisation (the paper's ref. [13]), as torchvision does; norms start at 1/0.
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def freeze(self, freeze_at: int) -> None:
        """Freeze the first `freeze_at` stages (1 = stem, 2 = stem + res2, ...):
        requires_grad=False, and trainable BN there becomes FrozenBatchNorm2d."""
        for name in STAGE_NAMES[:freeze_at]:
            stage = getattr(self, name)
            for parameter in stage.parameters():
                parameter.requires_grad_(False)
            freeze_batchnorm(stage)
        self.freeze_at = max(self.freeze_at, freeze_at)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """x: (N, 3, H, W) normalised images -> {name: (N, out_channels[name], H/s, W/s)}."""
        outputs: dict[str, Tensor] = {}
        for name in self._stages_to_run:
            x = getattr(self, name)(x)
            if name in self._out_features:
                outputs[name] = x
        return outputs


def build_resnet(
    depth: int, *, out_features: Sequence[str] = ("res4",), weights: str | None = None,
    norm: str = "frozen_bn", freeze_at: int = 2, stride_in_1x1: bool = False, shortcut: str = "B",
    residual: bool = True, allow_partial_weights: bool = False,
) -> ResNet:
    """Build a ResNet and, if `weights` is given ("torchvision:IMAGENET1K_V1", a local
    torchvision-format .pth or a Caffe2 .pkl), load it; the loader's WeightsInfo
    (preprocessing, missing/unexpected keys) is kept as `model.weights_info`. Weights that
    cover the model only in part are a WeightsError unless `allow_partial_weights`."""
    model = ResNet(depth, out_features=out_features, norm=norm, freeze_at=freeze_at,
                   stride_in_1x1=stride_in_1x1, shortcut=shortcut, residual=residual)
    if weights is not None:
        model.weights_info = load_weights(model, weights, allow_partial=allow_partial_weights)
    return model
