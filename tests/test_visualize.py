"""Drawing detections with OpenCV: pixels change where boxes are, sizes and inputs do not."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from detection.visualize import PALETTE, color_for_label, draw_detections, side_by_side, text_color_for

NAMES = ["circle", "square", "triangle"]


def _image(h: int = 120, w: int = 160) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_draws_inside_the_box_and_keeps_size_and_input():
    image = _image()
    before = image.copy()
    boxes = torch.tensor([[40.0, 50.0, 100.0, 110.0]])
    out = draw_detections(image, boxes, torch.tensor([2]), torch.tensor([0.93]), NAMES, score_thresh=0.5)
    assert out.shape == image.shape and out.dtype == np.uint8
    np.testing.assert_array_equal(image, before)  # drawn on a copy
    changed = (out != image).any(axis=2)
    assert changed[50:110, 40:100].any()
    assert changed[50, 40:100].mean() > 0.9 and changed[50:110, 40].mean() > 0.9  # its top and left edges
    assert not changed[115:, :].any() and not changed[:, 110:].any()  # nothing far from it
    assert tuple(out[80, 40]) == PALETTE[1]  # class 2's colour on the left edge


def test_score_threshold_and_class_colours():
    image = np.zeros((100, 200, 3), np.uint8)
    boxes = np.array([[10, 30, 60, 90], [110, 30, 190, 90]], dtype=np.float32)
    out = draw_detections(image, boxes, np.array([1, 3]), np.array([0.9, 0.2]), NAMES, score_thresh=0.5)
    assert (out[:, :100] != 0).any() and not (out[:, 100:] != 0).any()  # 0.2 < 0.5: not drawn
    out = draw_detections(image, boxes, np.array([1, 3]), np.array([0.9, 0.2]), NAMES, score_thresh=0.1)
    assert tuple(out[60, 10]) == color_for_label(1) != tuple(out[60, 110]) == color_for_label(3)
    assert len({color_for_label(k) for k in range(1, 91)}) == 90  # COCO-sized label sets stay distinct


def test_labels_stay_inside_the_image_and_ground_truth_needs_no_scores():
    image = np.zeros((60, 80, 3), np.uint8)
    # a box touching the top and right edges: its label must go inside the box, not off the image
    out = draw_detections(image, [[50, 0, 80, 40]], [3], None, NAMES)
    label_rows = (out[:, 50:80] == color_for_label(3)).all(axis=2).sum(axis=1)
    assert label_rows[1:8].max() > 20  # a filled label bar near the top, inside the image
    assert out.shape == image.shape


def test_label_text_contrasts_with_every_class_colour():
    def luminance(rgb):
        c = np.asarray(rgb) / 255.0
        c = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
        return 0.2126 * c[0] + 0.7152 * c[1] + 0.0722 * c[2]

    for label in range(1, 91):
        bg, fg = color_for_label(label), text_color_for(color_for_label(label))
        hi, lo = sorted((luminance(bg), luminance(fg)), reverse=True)
        assert (hi + 0.05) / (lo + 0.05) >= 4.5, (label, bg, fg)  # WCAG AA for text
    assert text_color_for((255, 255, 0)) == (0, 0, 0) and text_color_for((0, 0, 128)) == (255, 255, 255)


def test_side_by_side_puts_both_images_under_their_titles():
    left, right = _image(50, 60), _image(80, 40)
    out = side_by_side(left, right, ("ground truth", "predictions"))
    bar = out.shape[0] - 80
    assert bar > 0 and out.shape[1] == 60 + 8 + 40
    np.testing.assert_array_equal(out[bar:bar + 50, :60], left)
    np.testing.assert_array_equal(out[bar:, 68:], right)
    assert (out[:bar, :60] != 40).any()  # title text on the bar
    assert side_by_side(left, right).shape == (80, 108, 3)


def test_rejects_non_rgb_uint8_images():
    with pytest.raises(ValueError, match="uint8"):
        draw_detections(np.zeros((10, 10), np.uint8), [], [], None, NAMES)


def test_tagged_boxes_are_dashed_and_their_label_names_the_tag():
    """VOC difficult objects and COCO crowd regions must not look like ordinary ground truth."""
    image = np.zeros((100, 200, 3), np.uint8)
    box = [[10, 40, 150, 90]]
    solid = draw_detections(image, box, [1], None, NAMES)
    dashed = draw_detections(image, box, [1], None, NAMES, tags=["difficult"])

    def on_colour(row):  # fraction of a box edge's pixels in the class colour
        return (row == color_for_label(1)).all(axis=-1).mean()

    assert on_colour(solid[89, 10:150]) == 1.0 and on_colour(solid[40:90, 149]) == 1.0
    assert 0.3 < on_colour(dashed[89, 10:150]) < 0.7 and 0.3 < on_colour(dashed[40:90, 149]) < 0.7
    # the label bar above the box is wider: "circle difficult" instead of "circle"
    def label_end(image):
        return np.flatnonzero((image[30] == color_for_label(1)).all(axis=-1)).max()

    assert label_end(dashed) > label_end(solid) + 20
    with pytest.raises(ValueError, match="1 tags"):
        draw_detections(image, box + box, [1, 1], None, NAMES, tags=["crowd"])
