"""RPN: head layout, losses, proposals."""
import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import box_iou

from detection.modeling.anchors import AnchorGenerator
from detection.modeling.rpn import RPN

IMAGE_SIZES = [(128, 160), (100, 120)]  # inside a padded 128 x 160 batch -> 8 x 10 map


def _rpn(**kwargs) -> RPN:
    defaults = dict(in_channels=16, anchor_generator=AnchorGenerator([16, 32, 64], [0.5, 1.0, 2.0]),
                    pre_nms_topk_train=500, post_nms_topk_train=50,
                    pre_nms_topk_test=300, post_nms_topk_test=20)
    return RPN(**{**defaults, **kwargs})


def _gt() -> list:
    return [torch.tensor([[10.0, 20.0, 60.0, 70.0], [80.0, 30.0, 150.0, 120.0]]),
            torch.tensor([[5.0, 5.0, 40.0, 90.0]])]


def test_head_order_matches_anchor_order():
    rpn = _rpn()
    features = torch.randn(2, 16, 8, 10)
    logits, deltas = rpn.head(features)
    assert logits.shape == (2, 8 * 10 * 9) and deltas.shape == (2, 8 * 10 * 9, 4)
    x = F.relu(rpn.head.conv(features))
    raw_logits = rpn.head.objectness_logits(x)  # (N, A, H, W)
    raw_deltas = rpn.head.anchor_deltas(x).view(2, 9, 4, 8, 10)
    n, y, xx, a = 1, 3, 7, 5
    idx = (y * 10 + xx) * 9 + a
    torch.testing.assert_close(logits[n, idx], raw_logits[n, a, y, xx])
    torch.testing.assert_close(deltas[n, idx], raw_deltas[n, a, :, y, xx])


def test_training_losses_are_finite_and_give_gradients():
    rpn = _rpn().train()
    features = torch.randn(2, 16, 8, 10, requires_grad=True)
    proposals, losses = rpn(features, IMAGE_SIZES, _gt())
    assert set(losses) == {"loss_rpn_cls", "loss_rpn_box"}
    assert all(torch.isfinite(v) and v.dim() == 0 for v in losses.values())
    assert losses["loss_rpn_box"] > 0
    (losses["loss_rpn_cls"] + losses["loss_rpn_box"]).backward()
    for p in rpn.head.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert all(not p.requires_grad for p in proposals)  # detached


def test_loss_normalization_is_by_sampled_anchor_budget():
    rpn = _rpn(batch_size_per_image=64).train()
    features = torch.randn(2, 16, 8, 10)
    anchors = rpn.anchor_generator(features)
    torch.manual_seed(1)  # the sampling draws from the global generator
    labels, matched = rpn.label_anchors(anchors, _gt())
    assert ((labels >= 0).sum(dim=1) == 64).all()  # plenty of negatives: exactly the budget
    assert (labels == 1).sum(dim=1).le(32).all() and (labels == 1).any(dim=1).all()
    logits, deltas = rpn.head(features)
    losses = rpn.losses(anchors, logits, deltas, labels, matched)
    valid = labels >= 0
    expected = F.binary_cross_entropy_with_logits(logits[valid], labels[valid].float(),
                                                  reduction="sum") / (64 * 2)
    torch.testing.assert_close(losses["loss_rpn_cls"], expected)


def test_an_exactly_matching_anchor_is_positive_with_zero_target():
    rpn = _rpn()
    anchors = rpn.anchor_generator.grid_anchors((8, 10))
    gt = anchors[123:124].clone()
    labels, matched = rpn.label_anchors(anchors, [gt])
    assert labels[0, 123] == 1
    torch.testing.assert_close(matched[0, 123], gt[0])


def test_proposals_are_capped_and_inside_each_image():
    for training in (True, False):
        rpn = _rpn().train(training)
        features = torch.randn(2, 16, 8, 10) * 5
        with torch.no_grad():
            rpn.head.anchor_deltas.bias.normal_(std=1.0)  # make boxes wander off the image
        proposals, _ = rpn(features, IMAGE_SIZES, _gt() if training else None)
        cap = 50 if training else 20
        for boxes, (h, w) in zip(proposals, IMAGE_SIZES):
            assert 0 < len(boxes) <= cap
            assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
            assert (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all()
            assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
            overlap = box_iou(boxes, boxes).fill_diagonal_(0)
            assert overlap.max() <= 0.7 + 1e-6  # NMS applied


def test_min_size_removes_small_proposals():
    rpn = _rpn().eval()
    features = torch.randn(2, 16, 8, 10)
    with torch.no_grad():
        unfiltered, _ = rpn(features, IMAGE_SIZES)
        rpn.min_size = 20.0  # the same weights, now with a minimum size
        filtered, _ = rpn(features, IMAGE_SIZES)

    def small(boxes):
        return ((boxes[:, 2] - boxes[:, 0]) < 20) | ((boxes[:, 3] - boxes[:, 1]) < 20)

    for before, after in zip(unfiltered, filtered):
        assert small(before).any()        # without min_size there are small proposals to remove
        assert len(after) > 0 and not small(after).any()  # all of them removed, the large ones kept
        # each large proposal ranked above the first small one is kept, in the same order
        large_first = before[:int(small(before).nonzero()[0])]
        torch.testing.assert_close(after[:len(large_first)], large_first)


def test_image_without_ground_truth_has_zero_box_loss():
    rpn = _rpn().train()
    features = torch.randn(1, 16, 8, 10, requires_grad=True)
    _, losses = rpn(features, IMAGE_SIZES[:1], [torch.zeros(0, 4)])
    assert losses["loss_rpn_box"] == 0
    assert torch.isfinite(losses["loss_rpn_cls"]) and losses["loss_rpn_cls"] > 0
    (losses["loss_rpn_cls"] + losses["loss_rpn_box"]).backward()
    assert torch.isfinite(features.grad).all()


def test_first_nms_survivors_are_nms_of_all_boxes_cut_to_k(monkeypatch):
    """Proposals come from NMS over as few of the top-scored boxes as give k survivors: the
    same boxes as NMS over all of them, first k (greedy NMS decides each box by the boxes
    above it); it falls back to more boxes when too few survive (crowded boxes)."""
    from torchvision.ops import nms

    from detection.modeling import rpn as rpn_module

    sizes = []
    monkeypatch.setattr(rpn_module, "nms", lambda b, s, t: sizes.append(len(b)) or nms(b, s, t))
    generator = torch.Generator().manual_seed(0)
    for n, k, spread in [(3000, 200, 600.0), (500, 50, 600.0), (400, 100, 4.0), (30, 100, 600.0)]:
        xy = torch.rand(n, 2, generator=generator) * spread
        side = 5 + torch.rand(n, 2, generator=generator) * 60 if spread > 4 else 40 + torch.rand(n, 2, generator=generator)
        boxes = torch.cat([xy, xy + side], dim=1)
        scores = torch.rand(n, generator=generator).sort(descending=True).values
        sizes.clear()
        got = rpn_module.first_nms_survivors(boxes, scores, 0.7, k)
        assert torch.equal(got, nms(boxes, scores, 0.7)[:k])
        if spread == 600.0 and n >= 4 * k:
            assert sizes == [2 * k]  # spread-out boxes: the first 2k already give k survivors
        if spread == 4.0:  # crowded: the first 200 gave fewer than 100 survivors, so all 400
            assert sizes == [200, 400] and len(got) < k


def _identical_anchors(**kwargs) -> RPN:
    """One 1x1 cell with 4 anchors of the same 16 px box and zero deltas: 4 identical proposals."""
    rpn = RPN(in_channels=4, anchor_generator=AnchorGenerator([16, 16, 16, 16], [1.0], offset=1.0), **kwargs)
    torch.nn.init.zeros_(rpn.head.anchor_deltas.weight)
    torch.nn.init.zeros_(rpn.head.anchor_deltas.bias)
    return rpn


@pytest.mark.parametrize("sync_free", [False, True])  # the loop, and accel.sync_free_postprocess's masks
def test_proposals_use_the_configured_nms_threshold_and_each_modes_pre_nms_topk(sync_free):
    """A mutation audit: NMS at a hard-coded 0.7 and the train/test pre-NMS top-k swapped passed
    every test, the slow Detectron2 ones too (invisible at the defaults)."""
    rpn = _identical_anchors(pre_nms_topk_train=3, pre_nms_topk_test=2, post_nms_topk_train=10,
                             post_nms_topk_test=10, nms_thresh=1.0)
    rpn.sync_free = sync_free
    features = torch.randn(1, 4, 1, 1)

    def count() -> int:
        return len(rpn.select_proposals(rpn.anchor_generator(features), *rpn.head(features), [(32, 32)])[0])
    with torch.no_grad():
        rpn.eval()
        assert count() == 2  # NMS at 1.0 keeps identical boxes: pre_nms_topk_test of them
        rpn.train()
        assert count() == 3
        rpn.nms_thresh = 0.7
        assert count() == 1


def test_objectness_loss_is_divided_by_the_anchor_budget_even_with_fewer_anchors():
    """Detectron2 divides by batch_size_per_image * images, not by the anchors sampled: they differ
    on an image with fewer anchors than the budget (a mutation audit: caught by a slow test only).
    4 foreground anchors at logit 0: 4 ln 2 / 256."""
    rpn = _identical_anchors(batch_size_per_image=256).train()
    torch.nn.init.zeros_(rpn.head.objectness_logits.weight)
    torch.nn.init.zeros_(rpn.head.objectness_logits.bias)
    _, losses = rpn(torch.randn(1, 4, 1, 1), [(32, 32)], [torch.tensor([[8.0, 8.0, 24.0, 24.0]])])
    assert losses["loss_rpn_cls"].item() == pytest.approx(4 * math.log(2) / 256, rel=1e-6)
