"""Every depth matches torchvision's ResNet exactly once its weights are loaded.

torchvision puts the bottleneck stride in the 3x3 conv, so stride_in_1x1=False here.
ResNet-18 is checked on a 224x224 input (ImageNet's size); the deeper nets use 64x64 to
keep the file fast on a shared 2-core machine (every weight still takes part: res5 is
2x2 there, and a wrong mapping changes every output).
"""
import pytest
import torch

from backbones import build_resnet
from tests.helpers import random_torchvision_resnet


# 101 and 152 only add blocks of the bottleneck kind 50 checks: slow, for `make test`
@pytest.mark.parametrize("depth", [18, 34, 50, pytest.param(101, marks=pytest.mark.slow),
                                   pytest.param(152, marks=pytest.mark.slow)])
def test_res4_res5_equal_torchvision_layer3_layer4(depth, tmp_path):
    reference = random_torchvision_resnet(depth)
    path = tmp_path / f"resnet{depth}.pth"
    torch.save(reference.state_dict(), path)
    model = build_resnet(depth, weights=str(path), norm="frozen_bn", out_features=("res4", "res5")).eval()
    assert model.weights_info.missing_keys == [] and model.weights_info.unexpected_keys == []
    size = 224 if depth == 18 else 64
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        outputs = model(x)
        y = reference.maxpool(reference.relu(reference.bn1(reference.conv1(x))))
        layer3 = reference.layer3(reference.layer2(reference.layer1(y)))
        layer4 = reference.layer4(layer3)
    assert outputs["res4"].shape == layer3.shape and outputs["res5"].shape == layer4.shape
    assert (outputs["res4"] - layer3).abs().max() < 1e-4
    assert (outputs["res5"] - layer4).abs().max() < 1e-4
    assert layer4.abs().max() > 0.1  # not vacuous
