"""Winograd F(4x4, 3x3) convolutions (detection/accel/winograd.py) and where the fast path uses them."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from detection.accel import onednn, optimize_for_inference, optimize_for_training
from detection.accel.onednn import conv_pointwise
from detection.accel.winograd import WinogradConv2d, suitable, transform_weight, winograd_conv2d
from detection.config import load_config
from detection.modeling.model import build_model
from detection.testing import make_sane


def _reference(x, weight, bias, residual=None, relu=False):
    out = F.conv2d(x.double(), weight.double(), bias.double(), padding=1)
    if residual is not None:
        out = out + residual.double()
    return F.relu(out) if relu else out


def test_one_tile_by_hand():
    """A 4x4 map is one tile: a kernel with a single 1 at the centre copies the map, one at
    the top-left corner shifts it down-right (the zero padding comes in), and the bias adds."""
    x = torch.arange(16.0).view(1, 1, 4, 4)
    centre, corner = torch.zeros(1, 1, 3, 3), torch.zeros(1, 1, 3, 3)
    centre[0, 0, 1, 1] = corner[0, 0, 0, 0] = 1
    bias = torch.tensor([0.5])
    torch.testing.assert_close(winograd_conv2d(x, transform_weight(centre), bias), x + 0.5, rtol=0, atol=1e-5)
    shifted = torch.tensor([[0, 0, 0, 0], [0, 0, 1, 2], [0, 4, 5, 6], [0, 8, 9, 10]], dtype=torch.float32)
    torch.testing.assert_close(winograd_conv2d(x, transform_weight(corner), None)[0, 0], shifted, rtol=0, atol=1e-5)


@pytest.mark.parametrize("n,c,k,h,w", [(3, 16, 8, 7, 7), (2, 8, 12, 5, 9), (1, 4, 4, 1, 1), (2, 6, 5, 8, 4),
                                       (1, 3, 2, 13, 2)])
@pytest.mark.parametrize("tiles_per_chunk", [1, 3, None])
def test_equals_the_direct_convolution(n, c, k, h, w, tiles_per_chunk):
    """Map sizes that are and are not multiples of the tile, chunks that end inside and across
    images; bias, residual and ReLU applied to every output once."""
    torch.manual_seed(0)
    x = torch.randn(n, c, h, w).contiguous(memory_format=torch.channels_last)
    weight, bias = torch.randn(k, c, 3, 3) / (3 * c ** 0.5), torch.randn(k)
    residual = torch.randn(n, k, h, w).contiguous(memory_format=torch.channels_last)
    u = transform_weight(weight)
    got = winograd_conv2d(x, u, bias, relu=True, residual=residual, tiles_per_chunk=tiles_per_chunk)
    assert got.shape == (n, k, h, w) and got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got.double(), _reference(x, weight, bias, residual, relu=True), rtol=1e-5, atol=1e-5)
    plain = winograd_conv2d(x.contiguous(), u, bias, tiles_per_chunk=tiles_per_chunk)  # NCHW input too
    torch.testing.assert_close(plain.double(), _reference(x, weight, bias), rtol=1e-5, atol=1e-5)


def test_rounding_at_res5_width():
    """512 channels in and out, as res5's 3x3 convs: within 1e-4 of the outputs' scale (the
    direct float32 convolution is within about 1e-6)."""
    torch.manual_seed(0)
    x = torch.randn(2, 512, 7, 7).contiguous(memory_format=torch.channels_last)
    weight, bias = torch.randn(512, 512, 3, 3) / (3 * 512 ** 0.5), torch.randn(512)
    expected = _reference(x, weight, bias)
    error = (winograd_conv2d(x, transform_weight(weight), bias).double() - expected).abs().max()
    assert error < 1e-4 * expected.abs().max()


def test_which_convolutions_it_computes():
    assert suitable(nn.Conv2d(4, 4, 3, padding=1))
    for conv in (nn.Conv2d(4, 4, 3, padding=1, stride=2), nn.Conv2d(4, 4, 3, padding=2, dilation=2),
                 nn.Conv2d(4, 4, 3, padding=1, groups=2), nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 3),
                 nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect")):
        assert not suitable(conv)


def _model(depth=18, extra=()):
    cfg = load_config(None, ["model.backbone.weights=null", f"model.backbone.depth={depth}", "model.num_classes=3",
                             "model.rpn.pre_nms_topk_test=200", "model.rpn.post_nms_topk_test=24",
                             "model.roi_heads.score_thresh_test=0.0", "model.roi_heads.pooler_resolution=14",
                             *extra])
    torch.manual_seed(0)
    return make_sane(build_model(cfg)).eval()


def test_the_fast_path_uses_it_from_256_channels(monkeypatch):
    """ResNet-18 C4: layer3's 256-channel 3x3 convs (not the strided one), res5's 512-channel
    ones and the RPN's conv get transformed kernels, outside the state_dict; layers 1-2 (64,
    128 channels) do not. The detections equal those of the direct convolutions; under
    bfloat16 autocast no Winograd convolution runs."""
    model = _model()
    quick = optimize_for_inference(model)
    direct = optimize_for_inference(model, winograd=False)
    have = {name for name, m in quick.named_modules() if hasattr(m, "winograd_weight")}
    assert "rpn.head.conv" in have and "roi_heads.res5.1.conv1" in have and "roi_heads.res5.0.conv1" not in have
    assert {n for n in have if n.startswith("trunk.")} == {"trunk.res4.0.conv2", "trunk.res4.1.conv1",
                                                           "trunk.res4.1.conv2"}
    assert set(quick.state_dict()) == set(direct.state_dict())
    calls = []
    monkeypatch.setattr(onednn, "winograd_conv2d", lambda *a, **k: calls.append(a[0].shape) or winograd_conv2d(*a, **k))
    images = [torch.randint(0, 256, (3, 120, 160), dtype=torch.uint8)]
    with torch.inference_mode():
        expected, got = direct(images)[0], quick(images)[0]
        assert len(calls) == len(have)  # each once: 24 RoIs are one chunk
        calls.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            quick(images)
        assert calls == []
    assert len(got["boxes"]) == len(expected["boxes"]) > 0
    torch.testing.assert_close(got["boxes"], expected["boxes"], rtol=0, atol=1e-3)
    torch.testing.assert_close(got["scores"], expected["scores"], rtol=0, atol=1e-5)
    assert torch.equal(got["labels"], expected["labels"])


def test_fused_rpn_head_equals_the_rpn_head():
    model = _model()
    head = copy.deepcopy(model.rpn.head)
    quick = optimize_for_inference(model).rpn.head
    x = torch.randn(1, 256, 9, 11).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        for got, expected in zip(quick(x), head(x)):
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_conv_pointwise_dispatches_on_layout():
    """A conv with transformed kernels runs Winograd on channels_last inputs; NCHW inputs (res5
    on small RoI maps) keep oneDNN's convolution."""
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 8, 3, padding=1).requires_grad_(False)
    conv.register_buffer("winograd_weight", transform_weight(conv.weight), persistent=False)
    x = torch.randn(2, 8, 6, 6)
    with torch.inference_mode():
        nhwc = conv_pointwise(x.contiguous(memory_format=torch.channels_last), conv, relu=True)
        nchw = conv_pointwise(x, conv, relu=True)
    torch.testing.assert_close(nhwc, nchw, rtol=1e-5, atol=1e-5)


def test_training_gradients_equal_the_direct_convolution():
    """WinogradConv2d: the output and the input's gradient by Winograd (the transposed kernels),
    the kernels' and the bias's gradients as conv2d's; against float64 conv2d."""
    torch.manual_seed(0)
    x = torch.randn(3, 8, 7, 5).contiguous(memory_format=torch.channels_last).requires_grad_()
    weight = (torch.randn(6, 8, 3, 3) / 8).requires_grad_()
    bias = torch.randn(6).requires_grad_()
    grad_out = torch.randn(3, 6, 7, 5)
    out = WinogradConv2d.apply(x, weight, bias)
    got = torch.autograd.grad(out, (x, weight, bias), grad_out)
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, weight, bias))
    ref = F.conv2d(x64, w64, b64, padding=1)
    expected = torch.autograd.grad(ref, (x64, w64, b64), grad_out.double())
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g.double(), e, rtol=1e-5, atol=1e-5)
    frozen_input = WinogradConv2d.apply(x.detach(), weight, None)  # no gradient asked for x
    assert torch.autograd.grad(frozen_input.sum(), weight)[0].shape == weight.shape


def _losses_and_grads(model, images, targets):
    torch.manual_seed(0)  # the same RPN / RoI samples
    losses = model(images, targets)
    sum(losses.values()).backward()
    return ({k: v.detach() for k, v in losses.items()},
            {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})


def test_training_step_with_winograd_equals_without(monkeypatch):
    """ResNet-18 C4 at 14x14 pooling: res5's 3x3 stride-1 convs (512 channels, 7x7 RoI maps)
    train by Winograd on channels_last inputs; the losses and every gradient equal those of the
    direct convolutions within 1e-4 of their scale. Under bfloat16 autocast it is not used."""
    from detection.benchmarking.models import synthetic_batch

    # 16 sampled RoIs per image (base.yaml: up to 512; these images give 90): the check is per
    # RoI map, 16 are as good a test as 90, and the step runs about 5x faster
    base = _model(extra=["model.roi_heads.batch_size_per_image=16"]).train()
    images, targets = synthetic_batch(2, (96, 128), 3)
    direct = optimize_for_training(copy.deepcopy(base), channels_last=True, winograd=False)
    quick = optimize_for_training(copy.deepcopy(base), channels_last=True)
    flagged = {n for n, m in quick.named_modules() if getattr(m, "winograd", False)}
    assert flagged == {"roi_heads.res5.0.conv2", "roi_heads.res5.1.conv1", "roi_heads.res5.1.conv2"}
    calls = []
    apply = WinogradConv2d.apply
    monkeypatch.setattr(WinogradConv2d, "apply", lambda *args: calls.append(args[0].shape) or apply(*args))
    expected_losses, expected_grads = _losses_and_grads(direct, images, targets)
    assert calls == []
    losses, grads = _losses_and_grads(quick, images, targets)
    assert len(calls) == 3
    for key, value in expected_losses.items():
        torch.testing.assert_close(losses[key], value, rtol=1e-4, atol=1e-6)
    assert grads.keys() == expected_grads.keys()
    for name, expected in expected_grads.items():
        assert float((grads[name] - expected).abs().max()) <= 1e-4 * float(expected.abs().max()) + 1e-7, name
    calls.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        quick(images, targets)
    assert calls == []


def test_no_transformed_kernels_under_test_amp():
    """With test.amp (bfloat16 autocast on the CPU) every conv runs in bfloat16: the fast copy
    keeps no transformed kernels (270 MB for R50-C4)."""
    model = _model()
    model.amp = True
    assert not any(hasattr(m, "winograd_weight") for m in optimize_for_inference(model).modules())
