"""IoU matcher: thresholds and the Faster R-CNN best-match rule."""
import torch

from detection.modeling.matcher import Matcher

# 3 ground-truth boxes (rows) x 4 anchors (columns)
IOU = torch.tensor([
    [0.90, 0.10, 0.00, 0.20],
    [0.10, 0.50, 0.20, 0.00],
    [0.00, 0.20, 0.25, 0.60],
])


def test_rpn_thresholds_without_low_quality_matches():
    matched, labels = Matcher([0.3, 0.7], allow_low_quality_matches=False)(IOU)
    # anchor 0: 0.9 >= 0.7 fg; 1: 0.5 ignore; 2: 0.25 < 0.3 bg; 3: 0.6 ignore
    assert labels.tolist() == [1, -1, 0, -1]
    assert matched.tolist() == [0, 1, 2, 2]


def test_low_quality_best_match_is_promoted_to_foreground():
    matched, labels = Matcher([0.3, 0.7], allow_low_quality_matches=True)(IOU)
    # gt 1's best anchor (1, IoU 0.5) and gt 2's best anchor (3, IoU 0.6) become fg
    assert labels.tolist() == [1, 1, 0, 1]
    assert matched.tolist() == [0, 1, 2, 2]


def test_ties_for_best_match_are_all_promoted():
    iou = torch.tensor([[0.4, 0.4, 0.1], [0.0, 0.0, 0.0]])  # second gt overlaps nothing
    _, labels = Matcher([0.3, 0.7], allow_low_quality_matches=True)(iou)
    assert labels.tolist() == [1, 1, 0]


def test_single_threshold_splits_at_the_threshold():
    iou = torch.tensor([[0.5, 0.4999, 0.0, 1.0]])
    _, labels = Matcher([0.5])(iou)
    assert labels.tolist() == [1, 0, 0, 1]


def test_no_ground_truth_means_all_background():
    matched, labels = Matcher([0.3, 0.7], allow_low_quality_matches=True)(torch.zeros(0, 5))
    assert labels.tolist() == [0] * 5
    assert matched.shape == (5,)
