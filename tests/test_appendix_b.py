"""The ResNet paper's Appendix B: box refinement + box voting, global context, multi-scale testing."""
import copy

import pytest
import torch

from detection.config import ConfigError, load_config
from detection.engine.checkpoint import CheckpointError
from detection.engine.loading import DetectorWeights, load_detector_weights
from detection.accel import optimize_for_inference
from detection.modeling.model import build_model
from detection.modeling.multiscale import MultiScaleTest, PyramidFeatures, choose_scales
from detection.modeling.refinement import BoxRefinement, box_voting
from detection.testing import HostReads
from tests.helpers import BLUE, RED, make_model, paint


def _images() -> list[torch.Tensor]:
    torch.manual_seed(0)
    return [paint(80, 120, [((10, 10, 50, 40), RED), ((60, 30, 110, 75), BLUE)], background=90),
            paint(100, 70, [((5, 20, 60, 90), BLUE)], background=160)]


def _same(a: list[dict], b: list[dict], atol: float = 1e-4) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert len(x["boxes"]) == len(y["boxes"]) > 0
        torch.testing.assert_close(x["boxes"], y["boxes"], atol=atol, rtol=0)
        torch.testing.assert_close(x["scores"], y["scores"], atol=atol, rtol=0)
        assert torch.equal(x["labels"], y["labels"])


# ---- box voting and refinement ---------------------------------------------------------------


def test_box_voting_hand_computed():
    # three overlapping class-1 boxes (IoU with A: B 81/119, C 80/120, both >= 0.5), a class-2 box
    # on A and a far class-1 box: only A, B, C vote for A.
    boxes = torch.tensor([[0.0, 0, 10, 10], [1, 1, 11, 11], [2, 0, 12, 10], [0, 0, 10, 10], [50, 50, 60, 60]])
    scores = torch.tensor([0.9, 0.6, 0.3, 0.8, 0.5])
    labels = torch.tensor([1, 1, 1, 2, 1])
    voted = box_voting(boxes[[0, 4]], labels[[0, 4]], boxes, scores, labels, iou_threshold=0.5)
    # x1 = (0.9*0 + 0.6*1 + 0.3*2) / 1.8, y1 = 0.6 / 1.8, x2 = (9 + 6.6 + 3.6) / 1.8, y2 = (9 + 6.6 + 3) / 1.8
    expected = torch.tensor([[1.2 / 1.8, 0.6 / 1.8, 19.2 / 1.8, 18.6 / 1.8], [50.0, 50, 60, 60]])
    torch.testing.assert_close(voted, expected)
    # at a threshold above both overlaps, each box keeps itself
    alone = box_voting(boxes[[0]], labels[[0]], boxes, scores, labels, iou_threshold=0.7)
    torch.testing.assert_close(alone, boxes[[0]])


def test_refinement_nms_and_voting_in_the_head():
    """The head's last step with refinement on: NMS at 0.3 over the candidates, then voting."""
    model = make_model(box_refinement=BoxRefinement(nms_thresh=0.3, voting=True, voting_iou=0.5)).eval()
    heads = model.roi_heads
    # two RoIs x K=2 classes: class 1 has A (0.9) and B (0.6) overlapping at 0.68; class 2 low scores
    boxes = torch.tensor([[[0.0, 0, 10, 10], [0, 0, 10, 10]], [[1, 1, 11, 11], [1, 1, 11, 11]]])
    scores = torch.tensor([[0.9, 0.01], [0.6, 0.02]])
    det = heads.detect_image(boxes, scores, heads.box_refinement.nms_thresh)
    assert det["labels"].tolist() == [1] and det["scores"].tolist() == pytest.approx([0.9])
    torch.testing.assert_close(det["boxes"], torch.tensor([[0.6 / 1.5, 0.6 / 1.5, 15.6 / 1.5, 15.6 / 1.5]]))


def test_refinement_with_zero_regression_gives_exact_duplicates():
    model = make_model(box_refinement=BoxRefinement()).eval()
    heads = model.roi_heads
    torch.nn.init.zeros_(heads.predictor.bbox_pred.weight)
    torch.nn.init.zeros_(heads.predictor.bbox_pred.bias)
    images = _images()
    with torch.no_grad():
        batch = model.preprocess(images, resize=True)
        features = model.trunk(batch.tensor)
        proposals, _ = model.rpn(features, batch.image_sizes)
        roi_features = lambda b: heads.box_features(features, b)  # noqa: E731
        scores, boxes = heads.predict(roi_features, list(proposals), batch.image_sizes, None)
        union_scores, union_boxes = heads.refine(roi_features, scores, boxes, batch.image_sizes, None)
    for props, s, b, us, ub in zip(proposals, scores, boxes, union_scores, union_boxes):
        n = len(props)
        assert n > 0 and us.shape == (2 * n, 2) and ub.shape == (2 * n, 2, 4)
        # zero deltas: every class's box is the proposal itself, and so is the refined box
        torch.testing.assert_close(b, props[:, None, :].expand(-1, 2, -1), atol=1e-4, rtol=0)
        assert torch.equal(us[:n], s) and torch.equal(ub[:n], b)
        torch.testing.assert_close(us[n:], us[:n], atol=1e-6, rtol=0)
        torch.testing.assert_close(ub[n:], ub[:n], atol=1e-4, rtol=0)  # decoding rounds (float32)


# ---- global context --------------------------------------------------------------------------


def test_global_context_doubles_the_predictor_and_zero_context_equals_the_plain_model():
    torch.manual_seed(0)
    plain = make_model().eval()
    context = make_model(global_context=True).eval()
    c5 = plain.roi_heads.predictor.cls_score.in_features
    assert context.roi_heads.predictor.cls_score.in_features == 2 * c5
    assert context.roi_heads.predictor.bbox_pred.in_features == 2 * c5
    state = plain.state_dict()
    for name in ("cls_score", "bbox_pred"):
        key = f"roi_heads.predictor.{name}.weight"
        state[key] = torch.cat([state[key], torch.zeros_like(state[key])], dim=1)  # context half zeroed
    context.load_state_dict(state)
    with torch.no_grad():
        _same(context(_images()), plain(_images()))
        # the context half matters once it is not zero
        context.roi_heads.predictor.cls_score.weight[:, c5:].normal_(std=0.05)
        changed = context(_images())
    assert not torch.allclose(changed[0]["scores"][:5], plain(_images())[0]["scores"][:5])


def test_global_context_pools_each_images_own_region():
    model = make_model(global_context=True).eval()
    seen = []
    heads = model.roi_heads
    original = heads.box_features
    heads.box_features = lambda f, boxes: seen.append([b.clone() for b in boxes]) or original(f, boxes)
    with torch.no_grad():
        model(_images())
    whole = seen[0]  # the context boxes are pooled first
    # 80x120 -> 96x144 and 100x70 -> 137x96 (shorter side 96): not the padded batch's size
    assert [b.tolist() for b in whole] == [[[0.0, 0.0, 144.0, 96.0]], [[0.0, 0.0, 96.0, 137.0]]]


def test_global_context_trains_end_to_end():
    torch.manual_seed(0)
    model = make_model(global_context=True).train()
    images = _images()
    targets = [{"boxes": torch.tensor([[10.0, 10, 50, 40], [60, 30, 110, 75]]), "labels": torch.tensor([1, 2])},
               {"boxes": torch.tensor([[5.0, 20, 60, 90]]), "labels": torch.tensor([2])}]
    losses = model(images, targets)
    sum(losses.values()).backward()
    grad = model.roi_heads.predictor.cls_score.weight.grad
    c5 = grad.shape[1] // 2
    assert grad[:, c5:].abs().sum() > 0  # the context half learns
    assert model.roi_heads.res5[0].conv1.weight.grad.abs().sum() > 0


def test_loading_across_global_context_is_a_clear_error():
    plain, context = make_model(), make_model(global_context=True)
    for source, target, word in ((plain, context, "without"), (context, plain, "with")):
        weights = DetectorWeights("run/model_final.pth", "c4det", source.state_dict())
        for allow_new_classes in (False, True):
            with pytest.raises(CheckpointError, match=f"run/model_final.pth: was trained {word} global context"):
                load_detector_weights(target, weights, allow_new_classes=allow_new_classes)


# ---- multi-scale testing ---------------------------------------------------------------------


def test_scale_choice_hand_computed():
    # the paper's pyramid 200..1000 around a 600 px test scale: factors 1/3 .. 5/3 of the side
    factors = torch.tensor([1 / 3, 2 / 3, 1.0, 4 / 3, 5 / 3])
    sides = torch.tensor([100.0, 300.0, 400.0, 224.0 * 3])
    lo, hi = choose_scales((sides[:, None] * factors[None, :]) ** 2, 224.0 ** 2)
    # 100 px -> 33 / 67 / 100 / 133 / 167 px: nearest 167 (at 1000), still small -> the two largest
    # 300 px -> 100 / 200 / 300 / ...: nearest 200 (at 400), smaller than 224 -> with 600: (1, 2)
    # 400 px -> 133 / 267 / ...: nearest 267 (at 400), larger than 224 -> with 200: (0, 1)
    # 672 px -> 224 exactly at 200 (not smaller) -> towards the smaller scales, clamped: (0, 1)
    assert lo.tolist() == [3, 1, 0, 0] and hi.tolist() == [4, 2, 1, 1]
    one_lo, one_hi = choose_scales(torch.tensor([[10.0], [1e6]]), 224.0 ** 2)
    assert one_lo.tolist() == one_hi.tolist() == [0, 0]


def test_pyramid_features_maxout_over_the_chosen_scales():
    """Each level's map is a constant; the fake res5 returns it and records the boxes it got."""
    calls = []

    def box_features(level_map, boxes):
        calls.append((float(level_map[0, 0, 0, 0]), [b.clone() for b in boxes]))
        return level_map[0, :, 0, 0].expand(sum(len(b) for b in boxes), -1).clone()

    values = [torch.full((1, 3, 4, 4), v) for v in (5.0, 1.0, 3.0)]  # scales 0, 1, 2
    levels = [((lambda v=v: v), [(f, f)]) for v, f in zip(values, (0.5, 1.0, 2.0))]
    pyramid = PyramidFeatures(levels, box_features, canonical_area=64.0 ** 2)
    boxes = [torch.tensor([[0.0, 0, 200, 200], [0, 0, 32, 32], [0, 0, 64, 64]])]
    out = pyramid(boxes)
    # 200 px -> pair (0, 1): max(5, 1) = 5; 32 px -> (1, 2): max(1, 3) = 3; 64 px -> exactly at
    # scale 1, not smaller -> (0, 1): 5
    assert out[:, 0].tolist() == [5.0, 3.0, 5.0]
    scaled = {value: b[0].tolist() for value, b in calls}
    assert scaled[5.0] == [[0, 0, 100, 100], [0, 0, 32, 32]]  # scale 0: sides x 0.5
    assert scaled[3.0] == [[0, 0, 64, 64]]  # scale 2: sides x 2


def test_pyramid_features_split_each_scales_rois_by_image_with_one_host_read():
    """Three images, the middle one without RoIs, the last with its own scale factors: each
    scale gets each image's RoIs in order, scaled by that image's factors, and empty lists for
    images with none at that scale; one read of the device for the whole batch."""
    calls = []

    def box_features(level_map, boxes):
        calls.append((level_map, boxes))  # read after the count
        return level_map[0, :, 0, 0].expand(sum(len(b) for b in boxes), -1).clone()

    values = [torch.full((1, 3, 4, 4), v) for v in (5.0, 1.0, 3.0)]  # scales 0, 1, 2
    factors = [[(f, f), (f, f), (2 * f, 2 * f)] for f in (0.5, 1.0, 2.0)]  # image 2 was shrunk 2x more
    pyramid = PyramidFeatures([((lambda v=v: v), f) for v, f in zip(values, factors)], box_features,
                              canonical_area=64.0 ** 2)
    boxes = [torch.tensor([[0.0, 0, 200, 200], [0, 0, 32, 32]]), torch.zeros(0, 4), torch.tensor([[0.0, 0, 16, 16]])]
    with HostReads() as reads:
        out = pyramid(boxes)
    assert reads.count == 1
    # image 0: 200 px -> (0, 1), 32 px -> (1, 2); image 2: 16 px, 64 px at scale 2 -> (1, 2)
    assert out[:, 0].tolist() == [5.0, 3.0, 3.0]
    by_scale = {float(m[0, 0, 0, 0]): [b.tolist() for b in per_image] for m, per_image in calls}
    assert by_scale == {5.0: [[[0, 0, 100, 100]], [], []],
                        1.0: [[[0, 0, 200, 200], [0, 0, 32, 32]], [], [[0, 0, 32, 32]]],
                        3.0: [[[0, 0, 64, 64]], [], [[0, 0, 64, 64]]]}


def test_multi_scale_with_the_test_size_alone_equals_single_scale():
    model = make_model(min_size_test=96, max_size_test=256).eval()
    with torch.no_grad():
        single = model(_images())
        model.multi_scale = MultiScaleTest((96,), 256)
        multi = model(_images())
    _same(multi, single, atol=0)


def test_multi_scale_pyramid_runs_other_sizes():
    model = make_model(min_size_test=96, max_size_test=256).eval()
    with torch.no_grad():
        single = model(_images())
        model.multi_scale = MultiScaleTest((48, 96, 160), 400)
        out = model(_images())
    assert all(len(d["boxes"]) for d in out)
    assert not torch.allclose(out[0]["scores"][:3], single[0]["scores"][:3])


# ---- all switches: config, fast path ---------------------------------------------------------


def _switched_config(tmp_path):
    return load_config(None, [
        "model.num_classes=2", "model.backbone.depth=18", "model.backbone.norm=gn", "model.backbone.freeze_at=0",
        "model.backbone.weights=null", "model.anchors.sizes=[16,32,64]", "model.rpn.pre_nms_topk_test=300",
        "model.rpn.post_nms_topk_test=50", "model.roi_heads.pooler_resolution=6",
        "input.min_size_test=96", "input.max_size_test=256", "model.roi_heads.global_context=true",
        "test.box_refinement.enabled=true", "test.multi_scale.enabled=true",
        "test.multi_scale.sizes=[64,96,128]", "test.multi_scale.max_size=400"])


def test_config_switches_build_the_model_and_fast_path_gives_the_same_detections(tmp_path):
    torch.manual_seed(0)
    model = build_model(_switched_config(tmp_path)).eval()
    assert model.multi_scale == MultiScaleTest((64, 96, 128), 400)
    assert model.roi_heads.box_refinement == BoxRefinement(0.3, True, 0.5)
    assert model.roi_heads.global_context
    with torch.no_grad():
        plain = model(_images())
        fast = optimize_for_inference(copy.deepcopy(model))(_images())
    _same(fast, plain, atol=2e-3)


@pytest.mark.parametrize("override, message", [
    ("test.multi_scale.sizes=[400,200]", "test.multi_scale.sizes"),
    ("test.multi_scale.sizes=[]", "test.multi_scale.sizes"),
    ("test.multi_scale.max_size=0", "test.multi_scale.max_size"),
    ("test.box_refinement.nms_thresh=1.5", "test.box_refinement.nms_thresh"),
    ("test.box_refinement.voting_iou=-0.1", "test.box_refinement.voting_iou"),
    ("test.box_refinement.voting=maybe", "test.box_refinement.voting"),
    ("model.roi_heads.global_context=2", "model.roi_heads.global_context"),
    ("test.multi_scale.size=[200]", "unknown key test.multi_scale.size; did you mean sizes"),
])
def test_bad_switch_values_are_clear_errors(override, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("[", r"\[")):
        load_config(None, [override])
