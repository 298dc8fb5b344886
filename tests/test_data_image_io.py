"""read_image: everything becomes uint8 RGB (H, W, 3); bad files name their path."""
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest

from detection.data import DataError, read_image
from tests.helpers import ROOT


def test_color_png_is_returned_as_rgb(tmp_path):
    bgr = np.zeros((4, 5, 3), np.uint8)
    bgr[..., 0], bgr[..., 1], bgr[..., 2] = 10, 20, 30  # B, G, R
    cv2.imwrite(str(tmp_path / "c.png"), bgr)
    img = read_image(str(tmp_path / "c.png"))
    assert img.dtype == np.uint8 and img.shape == (4, 5, 3) and img.flags.c_contiguous
    np.testing.assert_array_equal(img[0, 0], [30, 20, 10])


def test_grayscale_becomes_three_equal_channels(tmp_path):
    gray = np.arange(20, dtype=np.uint8).reshape(4, 5) * 10
    cv2.imwrite(str(tmp_path / "g.png"), gray)
    img = read_image(str(tmp_path / "g.png"))
    assert img.shape == (4, 5, 3)
    for c in range(3):
        np.testing.assert_array_equal(img[..., c], gray)


def test_rgba_drops_alpha(tmp_path):
    bgra = np.zeros((3, 3, 4), np.uint8)
    bgra[...] = (1, 2, 3, 0)  # fully transparent alpha must not change the colour
    cv2.imwrite(str(tmp_path / "a.png"), bgra)
    img = read_image(str(tmp_path / "a.png"))
    assert img.shape == (3, 3, 3)
    np.testing.assert_array_equal(img[1, 1], [3, 2, 1])


def test_16bit_color_and_gray_scale_by_full_range(tmp_path):
    bgr16 = np.zeros((2, 2, 3), np.uint16)
    bgr16[0, 0] = (65535, 257 * 100, 0)
    cv2.imwrite(str(tmp_path / "c16.png"), bgr16)
    img = read_image(str(tmp_path / "c16.png"))
    assert img.dtype == np.uint8 and img.shape == (2, 2, 3)
    np.testing.assert_array_equal(img[0, 0], [0, 100, 255])
    gray16 = np.array([[0, 257 * 7], [65535, 257 * 128]], np.uint16)
    cv2.imwrite(str(tmp_path / "g16.png"), gray16)
    img = read_image(str(tmp_path / "g16.png"))
    np.testing.assert_array_equal(img[..., 0], [[0, 7], [255, 128]])
    np.testing.assert_array_equal(img[..., 2], img[..., 0])


def test_float_images_in_0_1_with_highlights_above_1_and_in_0_255(tmp_path):
    """A float TIFF of 0..1 values (OpenCV's float convention) reads as value * 255; an HDR
    merge's highlights above 1.0 are clipped to white, not taken as a 0..255 image (one such
    pixel read the whole photo near black, and the model found nothing); a float image of
    0..255 values reads as it is."""
    rgb = np.random.default_rng(0).integers(0, 256, (24, 32, 3)).astype(np.uint8)
    unit = rgb.astype(np.float32) / 255
    cv2.imwrite(str(tmp_path / "unit.tif"), unit[:, :, ::-1])
    np.testing.assert_array_equal(read_image(str(tmp_path / "unit.tif")), rgb)
    unit[:3, :3] = 1.2
    cv2.imwrite(str(tmp_path / "hdr.tif"), unit[:, :, ::-1])
    expected = rgb.copy()
    expected[:3, :3] = 255
    np.testing.assert_array_equal(read_image(str(tmp_path / "hdr.tif")), expected)
    cv2.imwrite(str(tmp_path / "full.tif"), rgb[:, :, ::-1].astype(np.float32))
    np.testing.assert_array_equal(read_image(str(tmp_path / "full.tif")), rgb)

def test_missing_and_corrupt_files_name_the_path(tmp_path):
    with pytest.raises(DataError, match=r"image file not found: .*nothere\.jpg"):
        read_image(str(tmp_path / "nothere.jpg"))
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"this is not a jpeg")
    with pytest.raises(DataError, match=r"could not read image .*broken\.jpg"):
        read_image(str(bad))


def _jpeg(rgb: np.ndarray) -> bytes:
    ok, encoded = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    assert ok
    return encoded.tobytes()


def test_a_jpeg_with_data_after_its_end_is_read_as_the_image(tmp_path):
    """Phones' motion photos append a video of megabytes after the JPEG's end-of-image marker;
    the photo is the JPEG, read as if alone (it was refused as truncated when no FF D9 was in
    the file's last 4 KiB)."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    alone, motion = tmp_path / "alone.jpg", tmp_path / "motion.jpg"
    alone.write_bytes(_jpeg(rgb))
    trailer = b"\0\0\0\x18ftypmp42" + bytes(rng.integers(0, 0xFF, 20000, dtype=np.uint8))  # no FF D9 in it
    assert b"\xff\xd9" not in trailer
    motion.write_bytes(_jpeg(rgb) + trailer)
    assert np.array_equal(read_image(str(motion)), read_image(str(alone)))


def test_a_cut_jpeg_is_refused_even_when_its_exif_thumbnail_ends_near_the_cut(tmp_path):
    """The end-of-image marker of a thumbnail inside an APP1 segment is not the image's."""
    rgb = np.random.default_rng(1).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    full = _jpeg(rgb)
    thumbnail = _jpeg(rgb[:8, :8])
    app1 = b"Exif\0\0" + thumbnail
    with_thumbnail = full[:2] + b"\xff\xe1" + (len(app1) + 2).to_bytes(2, "big") + app1 + full[2:]
    whole, cut = tmp_path / "whole.jpg", tmp_path / "cut.jpg"
    whole.write_bytes(with_thumbnail)
    cut.write_bytes(with_thumbnail[:len(with_thumbnail) - 200])
    (tmp_path / "plain.jpg").write_bytes(full)
    assert np.array_equal(read_image(str(whole)), read_image(str(tmp_path / "plain.jpg")))
    with pytest.raises(DataError, match=r"cut\.jpg is a truncated JPEG"):
        read_image(str(cut))
    for at in (3, 20, len(app1) // 2):  # cut inside the headers
        cut.write_bytes(with_thumbnail[:at])
        with pytest.raises(DataError, match=r"cut\.jpg"):
            read_image(str(cut))


def test_a_mostly_black_float_image_of_0_255_values_is_not_read_as_0_1(tmp_path):
    """A fluorescence or night frame: more than half its pixels 0 (background) and its objects at
    40..200 as float 0..255. The median rule read it as 0..1 and every object came out white."""
    rgb = np.zeros((40, 48, 3), np.uint8)
    rgb[5:15, 5:15], rgb[20:30, 25:40] = (40, 120, 200), 90
    cv2.imwrite(str(tmp_path / "dark.tif"), rgb[:, :, ::-1].astype(np.float32))
    np.testing.assert_array_equal(read_image(str(tmp_path / "dark.tif")), rgb)
    sparse = np.zeros((300, 300, 3), np.uint8)  # objects on under 1% of a black frame (stars, sparse cells)
    sparse[10:20, 10:20], sparse[100:110, 50:60] = 60, (20, 120, 200)
    cv2.imwrite(str(tmp_path / "sparse.tif"), sparse[:, :, ::-1].astype(np.float32))
    np.testing.assert_array_equal(read_image(str(tmp_path / "sparse.tif")), sparse)
    from detection.utils.images import float_image_scale  # the Predictor's hint for float arrays: the same rule
    assert float_image_scale(rgb.astype(np.float32)) == 1.0 and float_image_scale(rgb / 255.0) == 255.0


def test_12_bit_data_in_a_16_bit_file_is_said_once(tmp_path, caplog):
    """Mono12/RGB12 from a camera stored in 16 bits reads almost black by the full range: said."""
    rgb = np.full((6, 8, 3), 100, np.uint8)
    for name in ("a.png", "b.png"):
        cv2.imwrite(str(tmp_path / name), rgb.astype(np.uint16) * 16)  # 0..4080
    import detection.data.image_io as image_io
    image_io.LOW_BIT_DEPTH_SAID.clear()  # once per process: a test before may have been told
    with caplog.at_level("WARNING"):
        assert read_image(str(tmp_path / "a.png")).max() == 6  # as the file's depth says, not guessed
        read_image(str(tmp_path / "b.png"))
    told = [r.getMessage() for r in caplog.records if "12-bit" in r.getMessage()]
    assert len(told) == 1 and "a.png is 16-bit with no value above 1600" in told[0] and "x16" in told[0], told
    cv2.imwrite(str(tmp_path / "full.png"), rgb.astype(np.uint16) * 257)  # full range: nothing said
    image_io.LOW_BIT_DEPTH_SAID.clear()
    caplog.clear()
    read_image(str(tmp_path / "full.png"))
    assert not [r for r in caplog.records if "12-bit" in r.getMessage()]


def test_an_image_past_opencvs_pixel_limit_is_one_data_error(tmp_path):
    """cv2.imdecode raises (not returns None) for an image over OPENCV_IO_MAX_IMAGE_PIXELS: it was
    a cv2.error traceback in every tool, past dataloader.skip_bad_images (a 40000x30000 1-bit PNG)."""
    cv2.imwrite(str(tmp_path / "big.png"), np.zeros((30, 40, 3), np.uint8))
    script = ("from detection.data import DataError, read_image\n"
              "try:\n    read_image(r'%s')\nexcept DataError as err:\n    print(err)\n") % (tmp_path / "big.png")
    # the limit is OpenCV's, read from the environment when it starts: 1000 pixels stands for 2^30
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OPENCV_IO_MAX_IMAGE_PIXELS": "1000"}, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"could not read image {tmp_path / 'big.png'}: pixels <= CV_IO_MAX_IMAGE_PIXELS")
    assert done.stdout.rstrip().endswith("(the image is larger than this process decodes: "
                                         "OPENCV_IO_MAX_IMAGE_PIXELS=1000)")  # a service's own cap, named


def test_transparent_pixels_are_said_once(tmp_path, caplog):
    """Alpha is dropped as Detectron2 drops it: a transparent pixel reads as the colour stored under
    it (black here), not a viewer's background; that is said, once, naming the file and the share."""
    bgra = np.zeros((10, 10, 4), np.uint8)
    bgra[2:6, 2:6] = (255, 0, 0, 255)  # an opaque blue square on 84 transparent black pixels
    bgra[2, 2, 3] = 128  # and a half-transparent one at its corner (an anti-aliased edge; a review)
    for name in ("a.png", "b.png"):
        cv2.imwrite(str(tmp_path / name), bgra)
    import detection.data.image_io as image_io
    image_io.TRANSPARENCY_SAID.clear()  # once per process: a test before may have been told
    with caplog.at_level("WARNING"):
        img = read_image(str(tmp_path / "a.png"))
        read_image(str(tmp_path / "b.png"))
    np.testing.assert_array_equal(img[0, 0], [0, 0, 0])
    np.testing.assert_array_equal(img[3, 3], [0, 0, 255])
    told = [r.getMessage() for r in caplog.records if "transparent" in r.getMessage()]
    assert len(told) == 1 and "a.png has transparent pixels (85% of it" in told[0], told
    bgra[..., 3] = 255  # opaque everywhere: nothing said
    cv2.imwrite(str(tmp_path / "opaque.png"), bgra)
    image_io.TRANSPARENCY_SAID.clear()
    caplog.clear()
    read_image(str(tmp_path / "opaque.png"))
    assert not [r for r in caplog.records if "transparent" in r.getMessage()]
