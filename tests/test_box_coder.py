"""Box <-> delta transform."""
import math

import torch

from detection.modeling.box_coder import BoxCoder


def _random_boxes(n: int) -> torch.Tensor:
    xy = torch.rand(n, 2) * 200
    wh = torch.rand(n, 2) * 150 + 2
    return torch.cat([xy, xy + wh], dim=1)


def test_hand_computed_delta_with_box_head_weights():
    coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
    ref = torch.tensor([[0.0, 0.0, 10.0, 10.0]])  # centre (5, 5), 10 x 10
    gt = torch.tensor([[1.0, 2.0, 11.0, 14.0]])  # centre (6, 8), 10 x 12
    # dx = 10 * 1/10, dy = 10 * 3/10, dw = 5 * log(10/10), dh = 5 * log(12/10)
    expected = torch.tensor([[1.0, 3.0, 0.0, 5.0 * math.log(1.2)]])
    torch.testing.assert_close(coder.encode(gt, ref), expected)
    torch.testing.assert_close(coder.decode(expected, ref), gt)


def test_decode_inverts_encode_for_both_weight_sets():
    ref, gt = _random_boxes(50), _random_boxes(50)
    for weights in ((10.0, 10.0, 5.0, 5.0), (1.0, 1.0, 1.0, 1.0)):
        coder = BoxCoder(weights)
        torch.testing.assert_close(coder.decode(coder.encode(gt, ref), ref), gt, rtol=1e-5, atol=1e-3)


def test_rpn_weights_give_unscaled_deltas():
    coder = BoxCoder((1.0, 1.0, 1.0, 1.0))
    ref = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    gt = torch.tensor([[5.0, 0.0, 15.0, 20.0]])
    torch.testing.assert_close(coder.encode(gt, ref), torch.tensor([[0.5, 0.5, 0.0, math.log(2.0)]]))


def test_class_specific_decode_keeps_4k_layout():
    coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
    ref = _random_boxes(7)
    deltas = torch.randn(7, 3 * 4)
    out = coder.decode(deltas, ref)
    assert out.shape == (7, 12)
    # class 1's columns decode exactly like a single-class call with its deltas
    torch.testing.assert_close(out[:, 4:8], coder.decode(deltas[:, 4:8], ref))


def test_decode_clamps_huge_scale():
    coder = BoxCoder((1.0, 1.0, 1.0, 1.0))
    ref = torch.tensor([[0.0, 0.0, 16.0, 16.0]])
    out = coder.decode(torch.tensor([[0.0, 0.0, 100.0, 100.0]]), ref)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[0, 2] - out[0, 0], torch.tensor(1000.0))
