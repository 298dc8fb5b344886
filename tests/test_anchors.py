"""Anchors at stride 16: exact values, count and order."""
import math

import pytest
import torch

from detection.modeling.anchors import AnchorGenerator, generate_cell_anchors


def test_anchors_of_a_1x2_map_match_hand_written_tensor():
    # sizes 16, 32 x ratios (h/w) 0.25, 1, 4 -> integer widths/heights; cells at x = 0 and 16.
    gen = AnchorGenerator(sizes=[16, 32], aspect_ratios=[0.25, 1.0, 4.0], stride=16)
    expected = torch.tensor([
        # cell (y=0, x=0)
        [-16.0, -4.0, 16.0, 4.0], [-8.0, -8.0, 8.0, 8.0], [-4.0, -16.0, 4.0, 16.0],
        [-32.0, -8.0, 32.0, 8.0], [-16.0, -16.0, 16.0, 16.0], [-8.0, -32.0, 8.0, 32.0],
        # cell (y=0, x=1): shifted by 16 in x
        [0.0, -4.0, 32.0, 4.0], [8.0, -8.0, 24.0, 8.0], [12.0, -16.0, 20.0, 16.0],
        [-16.0, -8.0, 48.0, 8.0], [0.0, -16.0, 32.0, 16.0], [8.0, -32.0, 24.0, 32.0],
    ])
    anchors = gen(torch.zeros(1, 8, 1, 2))
    torch.testing.assert_close(anchors, expected)


def test_anchor_count_is_h_w_a_and_order_is_location_major():
    gen = AnchorGenerator(sizes=[64, 128, 256, 512], aspect_ratios=[0.5, 1.0, 2.0], stride=16)
    assert gen.num_anchors == 12
    anchors = gen(torch.zeros(2, 4, 3, 5))
    assert anchors.shape == (3 * 5 * 12, 4)
    centres = ((anchors[:, :2] + anchors[:, 2:]) / 2).view(3, 5, 12, 2)  # (H*W*A, 2) -> (H, W, A, 2)
    # anchor index (y*W + x)*A + a is centred at (16x, 16y)
    ys, xs = torch.meshgrid(torch.arange(3.0), torch.arange(5.0), indexing="ij")
    expected = torch.stack([xs, ys], dim=-1)[:, :, None, :].expand(3, 5, 12, 2) * 16
    torch.testing.assert_close(centres, expected)
    torch.testing.assert_close(centres.reshape(-1, 2)[(1 * 5 + 3) * 12 + 7], torch.tensor([48.0, 16.0]))


def test_cell_anchor_area_and_ratio():
    cell = generate_cell_anchors([64, 128], [0.5, 1.0, 2.0])
    w = cell[:, 2] - cell[:, 0]
    h = cell[:, 3] - cell[:, 1]
    torch.testing.assert_close(w * h, torch.tensor([64.0**2] * 3 + [128.0**2] * 3))
    torch.testing.assert_close(h / w, torch.tensor([0.5, 1.0, 2.0] * 2))
    assert math.isclose(float(w[0]), math.sqrt(64**2 / 0.5), rel_tol=1e-6)


def test_offset_moves_centres_by_half_a_cell():
    gen = AnchorGenerator(sizes=[32], aspect_ratios=[1.0], stride=16, offset=0.5)
    torch.testing.assert_close(gen.grid_anchors((1, 1)), torch.tensor([[-8.0, -8.0, 24.0, 24.0]]))


def test_bad_sizes_raise():
    with pytest.raises(ValueError, match="sizes"):
        AnchorGenerator(sizes=[], aspect_ratios=[1.0])
