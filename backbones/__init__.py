"""ResNet backbones of He et al. 2016 (Table 1) and their pretrained weights.

This package knows nothing of the detector: it builds the trunk (stem, res2..res5)
and loads torchvision / Caffe2 weights into it.
"""
from backbones.errors import WeightsError
from backbones.resnet import (
    RESNET_SPECS,
    STAGE_NAMES,
    BackboneError,
    BasicBlock,
    Bottleneck,
    ResNet,
    Stem,
    ZeroPadShortcut,
    build_resnet,
    make_norm,
)
from backbones.weights import WeightsInfo, load_weights

__all__ = [
    "RESNET_SPECS", "STAGE_NAMES", "BackboneError", "BasicBlock", "Bottleneck", "ResNet", "Stem",
    "WeightsError", "WeightsInfo", "ZeroPadShortcut", "build_resnet", "load_weights", "make_norm",
]
