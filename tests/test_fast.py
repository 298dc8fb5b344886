"""detection.accel: the optimized paths give the plain path's numbers (seeded, random but
sane weights, tiny models)."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import FrozenBatchNorm2d, box_iou, roi_align

from backbones import build_resnet
from backbones.resnet import Stem, freeze_batchnorm, make_stage
from detection.accel import chunk_rois, fold, onednn, optimize_for_inference, optimize_for_training
from detection.accel.fold import AppliedFrozenBN, FastConv2d, ScaledConv2d, fold_frozen_bn, fold_frozen_bn_for_training
from detection.accel.gather import pool, pool_plan, to_rois
from detection.accel.onednn import FusedBottleneck, FusedStem, conv_pointwise, fusable, fuse_blocks
from detection.accel.res5 import Res5Runner
from detection.accel.taps import taps_conv2d
from detection.modeling.model import FasterRCNN
from detection.testing import make_sane
from tests.helpers import C4_IMAGE, randomize_frozen_bn, tiny_c4

IMAGE = C4_IMAGE


def _images(n: int = 2) -> list:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 256, (3, *IMAGE), generator=g).float() for _ in range(n)]


def _targets() -> list:
    return [{"boxes": torch.tensor([[10.0, 12.0, 60.0, 70.0], [64.0, 20.0, 120.0, 90.0]]),
             "labels": torch.tensor([1, 3])},
            {"boxes": torch.tensor([[30.0, 5.0, 90.0, 50.0]]), "labels": torch.tensor([2])}]


def _boxes() -> list:
    # inside the 96 x 128 image, one reaching past every edge, a tiny one, one wider than a cell
    return [torch.tensor([[4.0, 6.0, 60.0, 50.0], [-40.0, -30.0, 170.0, 140.0], [50.0, 40.0, 51.0, 42.0]]),
            torch.tensor([[0.0, 0.0, 128.0, 96.0], [70.0, 10.0, 127.0, 95.0]])]


@pytest.mark.parametrize("resolution", [14, 7])
@pytest.mark.parametrize("stride", [1, 2])
def test_gather_pooling_equals_torchvision_roi_align(resolution, stride):
    features = torch.randn(2, 8, 6, 8, requires_grad=True)
    rois = to_rois(_boxes())
    expected = roi_align(features, rois, resolution, 1 / 16, sampling_ratio=0, aligned=True)
    expected = expected[:, :, ::stride, ::stride]
    got = pool(features, pool_plan(rois, (6, 8), resolution, 1 / 16, stride))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    weights = torch.randn_like(expected)
    (grad_expected,) = torch.autograd.grad((expected * weights).sum(), features)
    (grad_got,) = torch.autograd.grad((got * weights).sum(), features)
    torch.testing.assert_close(grad_got, grad_expected, rtol=1e-5, atol=1e-6)


def test_folding_frozen_bn_gives_the_same_outputs():
    resnet = make_sane(build_resnet(18, out_features=("res4",)))
    with torch.no_grad():
        randomize_frozen_bn(resnet)
    x = torch.randn(1, 3, 64, 80)
    expected = resnet(x)["res4"]
    folded = fold_frozen_bn(copy.deepcopy(resnet))
    assert not any(type(m) is FrozenBatchNorm2d for m in folded.modules())
    torch.testing.assert_close(folded(x)["res4"], expected, rtol=1e-4, atol=1e-5)


def test_inference_folds_trainable_bn_and_training_keeps_it():
    """A from-scratch model (norm: bn) in eval mode: its BatchNorm2d is folded into the convs
    with the running statistics (the same outputs); the training path keeps BatchNorm2d."""
    resnet = make_sane(build_resnet(18, norm="bn", freeze_at=0, out_features=("res4",)))
    with torch.no_grad():
        for m in resnet.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.2, 0.2), m.running_var.uniform_(0.5, 2.0)
    resnet.eval()
    x = torch.randn(1, 3, 64, 80)
    expected = resnet(x)["res4"]
    folded = fold_frozen_bn(freeze_batchnorm(copy.deepcopy(resnet)))
    assert not any(isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d)) for m in folded.modules())
    torch.testing.assert_close(folded(x)["res4"], expected, rtol=1e-4, atol=1e-5)
    trained = fold_frozen_bn_for_training(copy.deepcopy(resnet).train())
    assert sum(isinstance(m, nn.BatchNorm2d) for m in trained.modules()) == \
        sum(isinstance(m, nn.BatchNorm2d) for m in resnet.modules()) > 0


def test_training_fold_keeps_parameters_keys_and_outputs():
    model = tiny_c4()
    keys, params = list(model.state_dict()), dict(model.named_parameters())
    images = _images()
    with torch.no_grad():
        expected = model.trunk(model.preprocess(images, resize=False).tensor)
    optimize_for_training(model)
    assert list(model.state_dict()) == keys
    assert all(p is params[name] for name, p in model.named_parameters())
    assert any(isinstance(m, ScaledConv2d) for m in model.modules())
    assert any(isinstance(m, AppliedFrozenBN) for m in model.modules())
    with torch.no_grad():
        got = model.trunk(model.preprocess(images, resize=False).tensor)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def _res5_plain(res5: nn.Module, features: torch.Tensor, boxes: list, resolution: int = 14) -> torch.Tensor:
    pooled = roi_align(features, boxes, resolution, 1 / 16, sampling_ratio=0, aligned=True)
    return res5(pooled).mean(dim=(2, 3))


@pytest.mark.parametrize("stride_in_1x1", [False, True])
def test_hoisting_is_exact_for_every_box(stride_in_1x1):
    res5 = tiny_c4(stride_in_1x1).roi_heads.res5
    features = torch.randn(2, 64, 6, 8)
    with torch.no_grad():
        expected = _res5_plain(res5, features, _boxes())
        for folded in (False, True):
            module = fold_frozen_bn(copy.deepcopy(res5)) if folded else res5
            runner = Res5Runner(module, pooler="roi_align", resolution=14, spatial_scale=1 / 16, hoist=True)
            assert runner.hoist
            torch.testing.assert_close(runner(features, _boxes()), expected, rtol=1e-4, atol=1e-5)


def test_hoisting_a_bias_is_exact_only_inside_the_map():
    """The boundary case of the module docstring: a bias commutes with RoIAlign only where its
    bilinear weights sum to 1; the fast path therefore adds biases after pooling."""
    conv = nn.Conv2d(8, 4, 1, bias=True)
    features = torch.randn(1, 8, 6, 8)
    inside = [torch.tensor([[2.0, 3.0, 100.0, 90.0]])]  # within the 96 x 128 map area
    outside = [torch.tensor([[-60.0, -50.0, 60.0, 40.0]])]  # starts > 1 cell (16 px) past the map
    with torch.no_grad():
        for boxes, exact in ((inside, True), (outside, False)):
            pooled_first = conv(roi_align(features, boxes, 7, 1 / 16, 0, True))
            conv_first = roi_align(conv(features), boxes, 7, 1 / 16, 0, True)
            bias_after = roi_align(F.conv2d(features, conv.weight), boxes, 7, 1 / 16, 0, True) \
                + conv.bias.view(1, -1, 1, 1)
            assert torch.allclose(conv_first, pooled_first, atol=1e-5) == exact
            torch.testing.assert_close(bias_after, pooled_first, rtol=1e-5, atol=1e-5)


def test_chunked_res5_equals_unchunked():
    res5 = tiny_c4().roi_heads.res5
    features = torch.randn(2, 64, 6, 8)
    boxes = [torch.rand(13, 4).sort(dim=1).values * 90 for _ in range(2)]
    boxes = [torch.stack([b[:, 0], b[:, 1], b[:, 2] + 4, b[:, 3] + 4], 1) for b in boxes]
    with torch.no_grad():
        whole = Res5Runner(res5, pooler="roi_align", resolution=14, spatial_scale=1 / 16, chunk_size=None)
        chunked = Res5Runner(res5, pooler="roi_align", resolution=14, spatial_scale=1 / 16, chunk_size=5)
        assert len(chunked.chunks(to_rois(boxes))) == 6
        torch.testing.assert_close(chunked(features, boxes), whole(features, boxes), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(whole(features, boxes), _res5_plain(res5, features, boxes),
                                   rtol=1e-4, atol=1e-5)


def _assert_same_detections(got: list, expected: list) -> None:
    for g, e in zip(got, expected):
        assert len(e["boxes"]) > 0 and len(g["boxes"]) == len(e["boxes"])
        assert torch.equal(g["labels"], e["labels"])
        torch.testing.assert_close(g["boxes"], e["boxes"], rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(g["scores"], e["scores"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("stride_in_1x1", [False, True])
def test_fast_inference_gives_the_plain_detections(stride_in_1x1):
    model = tiny_c4(stride_in_1x1)
    images = _images()
    with torch.inference_mode():
        expected = model(images)
        fast = optimize_for_inference(model, chunk_size=7)
        assert model.roi_heads.res5_runner is None  # the original keeps the plain path
        assert fast.roi_heads.res5_runner.hoist
        _assert_same_detections(fast(images), expected)


def test_fast_inference_without_hoisting_resnet18():
    from detection.config import load_config
    from detection.modeling.model import build_model

    cfg = load_config(None, ["model.backbone.depth=18", "model.backbone.weights=null", "model.num_classes=3",
                             "input.min_size_test=64", "input.max_size_test=96",
                             "model.rpn.post_nms_topk_test=30", "model.roi_heads.score_thresh_test=0.0"])
    torch.manual_seed(0)
    model = make_sane(build_model(cfg)).eval()
    nn.init.normal_(model.roi_heads.predictor.cls_score.weight, std=0.5)
    images = [torch.randint(0, 256, (3, 64, 80)).float()]
    with torch.inference_mode():
        expected = model(images)
        fast = optimize_for_inference(model)
        assert not fast.roi_heads.res5_runner.hoist  # basic blocks: 3x3 conv first
        _assert_same_detections(fast(images), expected)


@pytest.mark.parametrize("resolution,amp,res5_nhwc", [(6, False, False), (14, False, True), (6, True, True),
                                                      (14, True, True)])
def test_res5_layout_follows_the_roi_map_size(resolution, amp, res5_nhwc, monkeypatch):
    # NHWC everywhere but res5 on small RoI maps (below 7x7) in float32, where NCHW was faster;
    # under bfloat16 small maps stay NHWC and their 3x3 convs run as taps_conv2d. The
    # detections are the plain path's (float32) or the plain path's under the same autocast.
    model = tiny_c4()
    model.roi_heads.pooler_resolution = resolution
    model.amp = amp
    seen, taps_calls = [], []
    monkeypatch.setattr(fold, "taps_conv2d",
                        lambda *args: taps_calls.append(args[0].shape) or taps_conv2d(*args))
    images = _images()
    with torch.inference_mode():
        expected = model(images)
        fast = optimize_for_inference(model, chunk_size=7)
        conv = fast.roi_heads.res5[1].conv2  # a 3x3 conv on the RoI maps (1x1 weights fit both layouts)
        conv.register_forward_pre_hook(lambda m, args: seen.append(args[0].is_contiguous()))
        fused = conv_pointwise  # float32 runs the conv fused, without its forward
        monkeypatch.setattr(onednn, "conv_pointwise", lambda x, c, **kw: (
            seen.append(x.is_contiguous()) if c is conv else None) or fused(x, c, **kw))
        detections = fast(images)
    nhwc = torch.channels_last
    assert fast.trunk.res4[0].conv2.weight.is_contiguous(memory_format=nhwc)
    assert conv.weight.is_contiguous(memory_format=nhwc) == res5_nhwc
    assert seen and all(contiguous == (not res5_nhwc) for contiguous in seen)
    assert bool(taps_calls) == (amp and resolution == 6)
    if amp:  # bfloat16 rounds differently in conv and matmul: the top detections found again
        for got, ref in zip(detections, expected):
            top = ref["scores"].argsort(descending=True)[:10]
            iou = box_iou(ref["boxes"][top], got["boxes"])
            iou[ref["labels"][top, None] != got["labels"][None]] = 0
            assert len(top) > 0 and float(iou.max(dim=1).values.min()) >= 0.9
    else:
        _assert_same_detections(detections, expected)


def _losses_and_grads(model: FasterRCNN) -> tuple[dict, dict]:
    torch.manual_seed(3)
    losses = model(_images(), _targets())
    sum(losses.values()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return {k: v.detach() for k, v in losses.items()}, grads


def test_training_graph_has_no_in_place_op_on_a_view():
    """The hoisted convs' bias is added to the pooled views out of place in training: in place,
    autograd would clone the whole pooled tensor in the backward (CopySlices), about 8% of an
    R50 training step. The graph of a fast training step holds no such node."""
    model = optimize_for_training(tiny_c4().train(), channels_last=True)
    assert model.roi_heads.res5_runner.hoist
    torch.manual_seed(3)
    losses = model(_images(), _targets())
    seen, todo, names = set(), [sum(losses.values()).grad_fn], set()
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        todo.extend(next_fn for next_fn, _ in node.next_functions)
    assert "ConvolutionBackward0" in names and "CopySlices" not in names


@pytest.mark.parametrize("stride,bias,size", [(1, False, (3, 3)), (2, True, (6, 6)), (1, True, (4, 3)),
                                               (2, False, (5, 7))])
def test_taps_conv_equals_conv2d_forward_and_backward(stride, bias, size):
    torch.manual_seed(0)
    x = torch.randn(3, 8, *size, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(5, 8, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, requires_grad=True) if bias else None
    grad_out = torch.randn_like(F.conv2d(x, weight, b, stride, 1))
    results = []
    for conv in (F.conv2d, taps_conv2d):
        out = conv(x, weight, b, (stride, stride), (1, 1))
        grads = torch.autograd.grad(out, [x, weight] + ([b] if bias else []), grad_out)
        results.append((out, *grads))
    assert results[1][0].is_contiguous(memory_format=torch.channels_last)
    for got, expected in zip(*reversed(results)):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("channels_last,resolution", [(False, 14), (True, 14), (True, 6)])
def test_training_step_gradients_match_the_plain_path(channels_last, resolution, monkeypatch):
    """At pooler resolution 6, res5's 3x3 convs have 3x3 outputs and run as taps_conv2d."""
    plain = tiny_c4().train()
    plain.roi_heads.pooler_resolution = resolution
    fast = optimize_for_training(copy.deepcopy(plain), channels_last=channels_last)
    assert fast.roi_heads.res5_runner.hoist
    assert all(isinstance(m, FastConv2d) and m.small_maps
               for m in fast.roi_heads.res5.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3))
    taps_calls = []
    monkeypatch.setattr(fold, "taps_conv2d",
                        lambda *args: taps_calls.append(args[0].shape) or taps_conv2d(*args))
    expected_losses, expected_grads = _losses_and_grads(plain)
    losses, grads = _losses_and_grads(fast)
    for key, value in expected_losses.items():
        torch.testing.assert_close(losses[key], value, rtol=1e-4, atol=1e-6)
    assert grads.keys() == expected_grads.keys() and len(grads) > 10
    for name, expected in expected_grads.items():
        tolerance = 1e-4 * float(expected.abs().max()) + 1e-7
        assert float((grads[name] - expected).abs().max()) <= tolerance, name
    # the res5 blocks' two 3x3 convs: on the 3x3 outputs only
    assert len(taps_calls) == (2 if resolution == 6 else 0)


@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("stride,residual", [(1, False), (1, True), (2, False)])
def test_conv_pointwise_equals_the_unfused_ops(channels_last, stride, residual):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 24, 3, stride=stride, padding=1).eval().requires_grad_(False).to(memory_format=fmt)
    x = torch.randn(2, 16, 11, 13).contiguous(memory_format=fmt)
    with torch.inference_mode():
        expected = conv(x)
        other = torch.randn_like(expected).contiguous(memory_format=fmt) if residual else None
        if residual:
            expected = expected + other
        assert fusable(x, conv)
        kept = None if other is None else other.clone()
        got = conv_pointwise(x, conv, relu=True, residual=other)
        torch.testing.assert_close(got, F.relu(expected), rtol=1e-5, atol=1e-5)
        assert (got < 0).sum() == 0 and (got == 0).any()
        no_relu = conv_pointwise(x, conv, relu=False, residual=kept)
        torch.testing.assert_close(no_relu, expected, rtol=1e-5, atol=1e-5)
        if residual:
            assert got.data_ptr() == other.data_ptr()  # the residual's memory holds the result


def test_fused_blocks_run_only_in_float32_inference():
    model = tiny_c4()
    conv = model.trunk.stem.conv1
    with torch.inference_mode():
        fast = optimize_for_inference(model)
        x = torch.randn(1, 3, 32, 32)
        assert type(fast.trunk.stem) is FusedStem
        assert all(type(b) is FusedBottleneck for b in [*fast.trunk.res3, *fast.roi_heads.res5])
        folded = fast.trunk.stem.conv1
        assert fusable(x, folded)
        assert not fusable(x.bfloat16(), folded)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not fusable(x, folded)
    assert not fusable(x, conv)  # no bias: not folded
    assert type(model.trunk.stem) is Stem  # the original model is left as it was


def test_fast_inference_fuses_convs_with_the_plain_detections(monkeypatch):
    calls = []
    real = conv_pointwise
    monkeypatch.setattr(onednn, "conv_pointwise", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = tiny_c4()
    images = _images()
    with torch.inference_mode():
        expected = model(images)
        got = optimize_for_inference(model, chunk_size=7)(images)
    # stem 1, res3 and res4 3 each, res5's first block 2 and second 3 per chunk of RoIs
    assert len(calls) >= 1 + 3 + 3 + 5
    _assert_same_detections(got, expected)


@pytest.mark.parametrize("block,residual", [("basic", True), ("basic", False), ("bottleneck", True),
                                            ("bottleneck", False)])
def test_fused_stage_equals_the_folded_stage(block, residual):
    # two blocks: the first with a projection shortcut, the second with the identity (in place on
    # its input) or, in a plain net, none
    torch.manual_seed(0)
    width = 8 if block == "bottleneck" else 32
    stage = make_stage(block, 2, 16, width, stride=2, norm="frozen_bn", stride_in_1x1=False, shortcut="B",
                       residual=residual)
    with torch.no_grad():
        randomize_frozen_bn(stage)
    folded = fold_frozen_bn(copy.deepcopy(stage)).eval()
    fused = fuse_blocks(copy.deepcopy(folded))
    assert all(type(b).__name__.startswith("Fused") for b in fused)
    x = torch.randn(2, 16, 12, 10).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        expected = folded(x)
        got = fused(x.clone())
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stage.eval()(x), expected, rtol=1e-4, atol=1e-4)


def test_auto_chunks_hold_the_pooled_bins_per_res5_call():
    """"auto": 64 RoIs at 14x14 pooling (the Winograd kernels take memory: 1400 against 1550 MB
    at 1000 proposals with 128), the demo's 200 RoIs at once at 6x6 (1.4x faster in bfloat16
    than two chunks); numbers pass through, None is all at once."""
    assert chunk_rois("auto", 14) == 64 and chunk_rois("auto", 7) == 256 and chunk_rois("auto", 6) == 348
    assert chunk_rois(7, 14) == 7 and chunk_rois(None, 14) is None
    with pytest.raises(ValueError, match="chunk_size"):
        chunk_rois(0, 14)
    model = tiny_c4()
    model.roi_heads.pooler_resolution = 14
    assert optimize_for_inference(model).roi_heads.res5_runner.chunk_size == 64
