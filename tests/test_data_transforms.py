"""Transforms: the shorter-side / longer-cap resize rule, flip, jitter; boxes follow exactly."""
import numpy as np
import pytest

from detection.data import DataError
from detection.data.transforms import build_transforms, resize_shorter_side, resized_shape


def gradient_image(height, width):
    """Every pixel distinct along x, so a flip or a resize is visible in the pixels."""
    x = np.tile(np.arange(width, dtype=np.uint8), (height, 1))
    return np.stack([x, x[:, ::-1], np.full_like(x, 7)], axis=2)


def test_resize_shorter_side_to_min_size():
    img = gradient_image(300, 400)
    out, boxes = resize_shorter_side(img, np.array([[10, 20, 30, 40]], np.float32), 600, 1000)
    assert out.shape == (600, 800, 3)
    np.testing.assert_allclose(boxes, [[20, 40, 60, 80]])


def test_resize_longer_side_cap_wins():
    img = gradient_image(50, 100)  # 600 / 50 = 12 would make the long side 1200 > 1000
    out, boxes = resize_shorter_side(img, np.array([[10, 5, 30, 25]], np.float32), 600, 1000)
    assert out.shape == (500, 1000, 3)
    np.testing.assert_allclose(boxes, [[100, 50, 300, 250]])


def test_resize_box_scales_use_the_rounded_size():
    img = gradient_image(333, 500)  # scale 600/333: width 900.9 rounds to 901
    out, boxes = resize_shorter_side(img, np.array([[100, 33.3, 500, 333]], np.float32), 600, 1000)
    assert out.shape == (600, 901, 3)
    sx, sy = 901 / 500, 600 / 333
    np.testing.assert_allclose(boxes, [[100 * sx, 33.3 * sy, 500 * sx, 333 * sy]], rtol=1e-6)
    np.testing.assert_allclose(boxes, [[180.2, 60.0, 901.0, 600.0]], rtol=1e-6)


def test_small_image_is_not_upscaled_past_the_cap():
    # LongestMaxSize would take the long side to 1000 regardless; SmallestMaxSize would make it 12000
    img = gradient_image(10, 200)
    out, boxes = resize_shorter_side(img, np.array([[0, 0, 200, 10]], np.float32), 600, 1000)
    assert out.shape == (50, 1000, 3)
    np.testing.assert_allclose(boxes, [[0, 0, 1000, 50]])
    tiny = gradient_image(20, 30)  # shorter side -> 100, long side 150 < cap 1000: not pushed to the cap
    assert resize_shorter_side(tiny, np.zeros((0, 4)), 100, 1000)[0].shape == (100, 150, 3)


@pytest.mark.parametrize("min_size,max_size", [(600, 1000), (800, 1333), (160, 256)])
def test_resize_rule_holds_for_many_shapes(min_size, max_size):
    rng = np.random.default_rng(0)
    for height, width in rng.integers(5, 3000, size=(200, 2)):
        new_h, new_w = resized_shape(int(height), int(width), min_size, max_size)
        assert max(new_h, new_w) <= max_size
        # either the shorter side hits min_size, or the cap is what stopped it
        assert min(new_h, new_w) == min_size or max(new_h, new_w) >= max_size - 1
        assert min(new_h, new_w) <= min_size


def test_hflip_box_and_pixels():
    img = gradient_image(40, 100)
    flip = build_transforms(min_sizes=[40], max_size=1000, hflip_prob=1.0)
    out, boxes, labels = flip(img, np.array([[10, 20, 30, 40], [0, 0, 100, 5]], np.float32), np.array([4, 2]))
    np.testing.assert_array_equal(out, img[:, ::-1])
    np.testing.assert_allclose(boxes, [[70, 20, 90, 40], [0, 0, 100, 5]], atol=1e-3)  # x1' = W - x2
    assert boxes.dtype == np.float32 and labels.dtype == np.int64
    np.testing.assert_array_equal(labels, [4, 2])


def test_resize_then_flip_matches_hand_computation():
    t = build_transforms(min_sizes=[100], max_size=1000, hflip_prob=1.0)
    out, boxes, labels = t(gradient_image(50, 100), np.array([[10, 5, 30, 25]], np.float32), np.array([1]))
    assert out.shape == (100, 200, 3)
    np.testing.assert_allclose(boxes, [[200 - 60, 10, 200 - 20, 50]], atol=1e-3)


def test_no_flip_keeps_everything():
    img = gradient_image(40, 100)
    boxes_in = np.array([[10.5, 20, 30, 40]], np.float32)
    out, boxes, labels = build_transforms(min_sizes=[40], max_size=1000, hflip_prob=0.0)(img, boxes_in, [3])
    np.testing.assert_array_equal(out, img)
    np.testing.assert_allclose(boxes, boxes_in, atol=1e-4)


def test_multiscale_picks_each_size_reproducibly():
    img = gradient_image(30, 60)
    sizes_a = [build_transforms(min_sizes=[20, 40], max_size=1000, hflip_prob=0.5, seed=3) for _ in range(2)]
    runs = [[t(img, np.zeros((0, 4)), np.zeros(0))[0].shape[0] for _ in range(30)] for t in sizes_a]
    assert runs[0] == runs[1]  # same seed, same choices
    assert set(runs[0]) == {20, 40}


def test_range_sampling_draws_every_size_between_the_two_both_included():
    """input.min_size_train_sampling: range (Detectron2's ResizeShortestEdge "range"): each image's
    shorter side is drawn from [smallest, largest], both ends included, and its boxes follow."""
    img = gradient_image(30, 60)
    box = np.array([[6, 3, 30, 27]], np.float32)
    transform = build_transforms(min_sizes=[20, 24], max_size=1000, hflip_prob=0.0, seed=1, sampling="range")
    seen = set()
    for _ in range(200):
        out, boxes, _ = transform(img, box, [1])
        size = out.shape[0]
        seen.add(size)
        assert out.shape[1] == round(size * 2)  # the 1:2 image keeps its shape
        np.testing.assert_allclose(boxes, box * size / 30, rtol=1e-5)
    assert seen == {20, 21, 22, 23, 24}
    again = build_transforms(min_sizes=[20, 24], max_size=1000, hflip_prob=0.0, seed=1, sampling="range")
    first = build_transforms(min_sizes=[20, 24], max_size=1000, hflip_prob=0.0, seed=1, sampling="range")
    assert [again.min_size() for _ in range(20)] == [first.min_size() for _ in range(20)]
    # "choice" (the default) takes only the sizes listed
    choice = build_transforms(min_sizes=[20, 24], max_size=1000, hflip_prob=0.0, seed=1)
    assert {choice.min_size() for _ in range(50)} == {20, 24}
    # the config's setting reaches the training transform
    from detection.config import load_config
    from detection.data.transforms import build_train_transform

    cfg = load_config(None, ["input.min_size_train_sampling=range", "input.min_size_train=[20, 24]"])
    assert {build_train_transform(cfg).min_size() for _ in range(100)} == {20, 21, 22, 23, 24}
    with pytest.raises(DataError, match=r"range needs input.min_size_train as two sizes \[smallest, largest\], "
                                        r"got \[20, 22, 24\]"):
        build_transforms(min_sizes=[20, 22, 24], max_size=1000, hflip_prob=0.0, sampling="range")
    with pytest.raises(DataError, match="must be choice or range, got 'uniform'"):
        build_transforms(min_sizes=[20], max_size=1000, hflip_prob=0.0, sampling="uniform")


def test_jitter_changes_pixels_not_boxes():
    img = gradient_image(40, 100)
    boxes_in = np.array([[10, 20, 30, 40]], np.float32)
    t = build_transforms(min_sizes=[40], max_size=1000, hflip_prob=0.0, jitter=True, seed=0)
    results = [t(img, boxes_in, [1]) for _ in range(5)]
    assert any(not np.array_equal(out, img) for out, _, _ in results)
    for out, boxes, _ in results:
        assert out.dtype == np.uint8 and out.shape == img.shape
        np.testing.assert_allclose(boxes, boxes_in, atol=1e-3)


def test_empty_and_degenerate_boxes():
    t = build_transforms(min_sizes=[80], max_size=1000, hflip_prob=1.0)
    out, boxes, labels = t(gradient_image(40, 100), np.zeros((0, 4), np.float32), np.zeros(0, np.int64))
    assert out.shape == (80, 200, 3) and boxes.shape == (0, 4) and labels.shape == (0,)
    # a zero-width box is dropped together with its label; the others keep their order
    boxes_in = np.array([[1, 1, 5, 5], [3, 3, 3, 9], [10, 10, 20, 20]], np.float32)
    _, boxes, labels = t(gradient_image(40, 100), boxes_in, np.array([1, 2, 3]))
    np.testing.assert_array_equal(labels, [1, 3])
    np.testing.assert_allclose(boxes, [[190, 2, 198, 10], [160, 20, 180, 40]], atol=1e-3)


def test_bad_settings_raise():
    with pytest.raises(DataError, match="hflip_prob"):
        build_transforms(min_sizes=[600], max_size=1000, hflip_prob=1.5)
    with pytest.raises(DataError, match="min_size_train"):
        build_transforms(min_sizes=[], max_size=1000, hflip_prob=0.5)


def test_detectron2_resize_mode_resizes_like_detectron2_in_training():
    """input.resize_mode detectron2 reaches the training transform: PIL bilinear on the uint8
    image to Detectron2's rounded size (as its ResizeShortestEdge), boxes scaled alike."""
    from PIL import Image

    from detection.config import load_config
    from detection.data.transforms import build_train_transform

    img = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    boxes = np.array([[8, 8, 40, 30]], np.float32)
    cfg = load_config(None, ["input.resize_mode=detectron2", "input.min_size_train=[30]",
                             "input.max_size_train=1000", "input.hflip_prob=0"])
    out, out_boxes, _ = build_train_transform(cfg)(img, boxes, np.array([1]))
    expected = np.asarray(Image.fromarray(img).resize((40, 30), Image.BILINEAR))  # 48x64 -> 30x40
    assert np.array_equal(out, expected)
    np.testing.assert_allclose(out_boxes, boxes * 30 / 48)
    default = build_train_transform(load_config(None, ["input.min_size_train=[30]", "input.hflip_prob=0"]))
    assert not np.array_equal(default(img, boxes, np.array([1]))[0], expected)  # OpenCV's INTER_AREA
