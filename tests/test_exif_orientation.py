"""Phone photos: a JPEG stores the sensor's pixels with an EXIF orientation
tag saying how to turn them for viewing; annotation tools show the turned view and their boxes
refer to it. Every reader turns them as PIL's ImageOps.exif_transpose does (Detectron2's
read_image), unless input.exif_orientation: false; sizes that do not match the annotation are
found when the data set is built, all in one error.

The end-to-end runs (training, eval.py, visualize.py, the Predictor) are in
tests/test_exif_orientation_e2e.py."""
import dataclasses
import json
import logging
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from detection.data import DataError, build_test_loader, get_dataset, read_image
from detection.data.orientation import header_size, orientation
from detection.data.voc import load_voc
from tests.helpers import ORIENTATION, STORE, write_photo

RED = (230, 30, 30)


def scene(height: int = 48, width: int = 80, box: tuple = (8, 6, 32, 22)) -> np.ndarray:
    """A viewed RGB image: grey, a red box at `box` (x1, y1, x2, y2), a blue bar along the
    bottom so that every one of the 8 orientations gives another image."""
    img = np.full((height, width, 3), 120, np.uint8)
    x1, y1, x2, y2 = box
    img[y1:y2, x1:x2] = RED
    img[-8:, : width // 2] = (30, 30, 230)
    return img


def coco_set(root, photos: list[tuple[str, int, np.ndarray]], boxes: list[tuple], size_of=None) -> dict:
    """A COCO json listing (file name, tag, viewed pixels) photos with one red box each;
    the annotated size is the viewed one unless size_of(index) gives (width, height)."""
    (root / "img").mkdir(parents=True, exist_ok=True)
    images, anns = [], []
    for i, ((name, tag, viewed), (x1, y1, x2, y2)) in enumerate(zip(photos, boxes), start=1):
        if name.endswith(".png"):
            Image.fromarray(viewed).save(root / "img" / name)
        else:
            write_photo(root / "img" / name, viewed, tag)
        width, height = size_of(i - 1) if size_of else (viewed.shape[1], viewed.shape[0])
        images.append({"id": i, "file_name": name, "width": width, "height": height})
        anns.append({"id": i, "image_id": i, "category_id": 1, "bbox": [x1, y1, x2 - x1, y2 - y1], "iscrowd": 0,
                     "area": (x2 - x1) * (y2 - y1)})
    ann_file = root / "ann.json"
    ann_file.write_text(json.dumps({"images": images, "annotations": anns,
                                    "categories": [{"id": 1, "name": "red"}]}))
    return {"type": "coco", "ann_file": str(ann_file), "image_root": str(root / "img")}


# ---- reading --------------------------------------------------------------------------------


@pytest.mark.parametrize("tag", range(1, 9))
def test_each_orientation_reads_as_the_photo_is_viewed(tmp_path, tag):
    viewed = scene()
    write_photo(tmp_path / "p.jpg", viewed, tag)
    assert orientation(str(tmp_path / "p.jpg")) == tag
    img = read_image(str(tmp_path / "p.jpg"))
    assert img.shape == viewed.shape and img.flags.c_contiguous
    assert np.abs(img.astype(int) - viewed).mean() < 2  # the view, up to JPEG's loss
    # exactly PIL's exif_transpose (Detectron2's read_image) of the stored pixels
    stored = read_image(str(tmp_path / "p.jpg"), exif_orientation=False)
    assert stored.shape[:2] == (viewed.shape[1::-1] if tag >= 5 else viewed.shape[:2])
    np.testing.assert_array_equal(img, _exif_transposed(stored, tag))


def test_the_red_box_is_where_the_viewer_sees_it_in_every_orientation(tmp_path):
    viewed = scene()
    for tag in range(1, 9):
        write_photo(tmp_path / f"{tag}.jpg", viewed, tag)
        img = read_image(str(tmp_path / f"{tag}.jpg")).astype(int)
        inside = img[8:20, 10:30].reshape(-1, 3).mean(0)
        assert np.abs(inside - RED).max() < 12, (tag, inside)
        assert np.abs(img[2, 70] - 120).max() < 12, tag  # the top right stays grey


def _exif_transposed(stored: np.ndarray, tag: int) -> np.ndarray:
    """PIL's exif_transpose (Detectron2's read_image) of `stored` pixels carrying `tag`."""
    carrier = Image.fromarray(stored)
    exif = Image.Exif()
    exif[ORIENTATION] = tag
    carrier.info["exif"] = exif.tobytes()
    return np.asarray(ImageOps.exif_transpose(carrier))


@pytest.mark.parametrize("fmt", ["TIFF", "WEBP"])
def test_tiff_and_webp_tags_are_applied_once_and_undone_when_ignored(tmp_path, fmt):
    """OpenCV's TIFF decoder turns the pixels itself (libtiff): not turned twice, and turned
    back for input.exif_orientation: false."""
    stored = scene()
    for tag in range(1, 9):
        exif = Image.Exif()
        exif[ORIENTATION] = tag
        path = tmp_path / f"{tag}.{fmt.lower()}"
        Image.fromarray(stored).save(path, format=fmt, exif=exif.tobytes(), **({"lossless": True} if fmt == "WEBP"
                                                                               else {}))
        np.testing.assert_array_equal(read_image(str(path)), _exif_transposed(stored, tag), err_msg=str(tag))
        np.testing.assert_array_equal(read_image(str(path), exif_orientation=False), stored, err_msg=str(tag))
        # the header's size (the startup size check, VOC without <size>) is the read one's: Pillow's
        # TIFF reader reports 5-8 already turned, which was turned once more
        for apply_tag in (True, False):
            assert header_size(str(path), apply_tag=apply_tag) == (
                *read_image(str(path), exif_orientation=apply_tag).shape[:2], tag), (tag, apply_tag)


def test_png_tag_is_applied_and_a_broken_exif_block_reads_as_stored(tmp_path):
    viewed = scene()
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    Image.fromarray(viewed).transpose(STORE[6]).save(tmp_path / "p.png", exif=exif.tobytes())
    np.testing.assert_array_equal(read_image(str(tmp_path / "p.png")), viewed)  # lossless: exact
    # a JPEG whose APP1 "Exif" segment is garbage: the pixels still decode, as stored
    good = tmp_path / "g.jpg"
    Image.fromarray(viewed).save(good, quality=95)
    data = good.read_bytes()
    junk = b"Exif\x00\x00MM\x00\x2a\xff\xff\xff\xff" + bytes(range(40))
    broken = tmp_path / "b.jpg"
    broken.write_bytes(data[:2] + b"\xff\xe1" + (len(junk) + 2).to_bytes(2, "big") + junk + data[2:])
    assert orientation(str(broken)) == 1
    np.testing.assert_array_equal(read_image(str(broken)), read_image(str(good)))


def test_a_png_tag_written_after_the_pixels_is_applied(tmp_path):
    """Some writers put a PNG's eXIf chunk after its image data; PIL's exif_transpose finds it
    there. The header-only reader missed it: the photo was read sideways, in silence, where
    cv2.imread (the README's ONNX route) turned it."""
    viewed = scene()
    plain = tmp_path / "plain.png"
    Image.fromarray(viewed).transpose(STORE[6]).save(plain)
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    payload = exif.tobytes()[6:]  # the chunk holds the TIFF block, without the "Exif\0\0" prefix
    chunk = len(payload).to_bytes(4, "big") + b"eXIf" + payload + zlib.crc32(b"eXIf" + payload).to_bytes(4, "big")
    data = plain.read_bytes()
    late = tmp_path / "late.png"
    late.write_bytes(data[:-12] + chunk + data[-12:])  # just before IEND (its 12 bytes), after IDAT
    assert Image.open(late).getexif()[ORIENTATION] == 6  # what PIL sees
    assert orientation(str(late)) == 6 and orientation(late.read_bytes()) == 6
    np.testing.assert_array_equal(read_image(str(late)), viewed)
    assert header_size(str(late), apply_tag=True) == (*viewed.shape[:2], 6)
    assert orientation(str(plain)) == 1


def test_a_photo_over_pils_pixel_limit_keeps_its_tag(tmp_path, monkeypatch):
    """PIL refuses to open an image over twice its pixel limit (179 MP: a 200 MP phone photo),
    header included: the tag was lost and the photo read sideways, in silence (OpenCV decodes
    the pixels). The limit is lowered here to stand for such a photo, and is left as it was."""
    viewed = scene()
    write_photo(tmp_path / "big.jpg", viewed, 6)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 48 x 80 = 3840 pixels: over twice the limit
    with pytest.raises(Image.DecompressionBombError):
        Image.open(tmp_path / "big.jpg")
    assert orientation(str(tmp_path / "big.jpg")) == 6
    assert orientation((tmp_path / "big.jpg").read_bytes()) == 6
    assert header_size(str(tmp_path / "big.jpg"), apply_tag=True) == (*viewed.shape[:2], 6)
    assert np.abs(read_image(str(tmp_path / "big.jpg")).astype(int) - viewed).mean() < 2
    assert Image.MAX_IMAGE_PIXELS == 1000

# ---- the startup check ----------------------------------------------------------------------


def _portrait_photos(tmp_path, size_of=None, tags=(6, 8, 1)):
    """Portrait phone photos (stored landscape, tag 6 or 8) and an upright one."""
    viewed = scene(80, 48, (8, 6, 32, 22))
    photos = [(f"{i}.jpg", tag, viewed) for i, tag in enumerate(tags)]
    return coco_set(tmp_path, photos, [(8, 6, 32, 22)] * len(tags), size_of)


def test_sizes_annotated_as_viewed_load_and_the_tags_are_reported_in_one_line(tmp_path, caplog):
    entry = _portrait_photos(tmp_path)
    with caplog.at_level(logging.INFO, logger="detection.data.orientation"):
        info = get_dataset(entry, str(tmp_path))
    assert len(info.records) == 3
    (line,) = [r.getMessage() for r in caplog.records]
    assert "2 images carry an EXIF orientation tag" in line and "0.jpg" in line and "1.jpg" in line
    images, records = next(iter(build_test_loader(info, num_workers=0, batch_size=3)))
    assert [tuple(i.shape) for i in images] == [(3, 80, 48)] * 3  # all portrait, as annotated


def test_tag_ignored_with_viewed_sizes_is_one_error_before_any_image_is_decoded(tmp_path):
    entry = _portrait_photos(tmp_path)
    with pytest.raises(DataError) as err:
        get_dataset(entry, str(tmp_path), exif_orientation=False)
    message = str(err.value)
    assert "\n" not in message and "2 of 3 images are not the size their annotation" in message
    assert "0.jpg is 80x48 (WxH) (as stored, EXIF orientation 6" in message and "1.jpg" in message
    assert "annotated 48x80" in message and "set input.exif_orientation: true" in message


def test_sizes_annotated_as_stored_name_the_setting_and_every_file(tmp_path):
    """An export from a tool that ignored the tag: every such file in one message."""
    entry = _portrait_photos(tmp_path, size_of=lambda i: (48, 80) if i == 2 else (80, 48))
    with pytest.raises(DataError) as err:
        get_dataset(entry, str(tmp_path))
    message = str(err.value)
    assert "2 of 3 images" in message and "0.jpg is 48x80 (WxH) (as viewed, EXIF orientation 6: rotated 90 " \
                                         "degrees clockwise), annotated 80x48" in message
    assert "1.jpg is 48x80" in message and "2.jpg" not in message
    assert "set input.exif_orientation: false" in message and "skip_bad_images" in message
    info = get_dataset(entry, str(tmp_path), exif_orientation=False)  # what the message offers works
    assert [r["width"] for r in info.records] == [80, 80, 48]


def test_other_size_mismatches_are_found_at_startup_and_skippable(tmp_path, caplog):
    entry = _portrait_photos(tmp_path, size_of=lambda i: (48, 80) if i < 2 else (50, 80))
    with pytest.raises(DataError, match=r"1 of 3 images .*2\.jpg is 48x80 \(WxH\), annotated 50x80; boxes would "
                                        r"be misplaced; fix the annotation's width and height"):
        get_dataset(entry, str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="detection.data.orientation"):
        info = get_dataset(entry, str(tmp_path), skip_bad_images=True)
    assert [r["image_id"] for r in info.records] == [1, 2]
    (line,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert "2.jpg" in line and "left out (dataloader.skip_bad_images)" in line


def test_tags_ignored_by_the_setting_give_a_warning(tmp_path, caplog):
    """180 degrees keeps the size: no check can see it, so ignoring the tag is said aloud."""
    viewed = scene()
    entry = coco_set(tmp_path, [("a.jpg", 3, viewed), ("b.jpg", 1, viewed)], [(8, 6, 32, 22)] * 2)
    with caplog.at_level(logging.WARNING, logger="detection.data.orientation"):
        get_dataset(entry, str(tmp_path), exif_orientation=False)
    (line,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert "1 images carry an EXIF orientation tag that input.exif_orientation: false ignores" in line
    assert "a.jpg" in line and "b.jpg" not in line


def test_voc_sizes_read_from_headers_are_the_viewed_ones(tmp_path, monkeypatch):
    """An XML without <size>, and a split without annotations (voc_2012_test style)."""
    root = tmp_path / "VOC"
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / sub).mkdir(parents=True)
    write_photo(root / "JPEGImages" / "p.jpg", scene(80, 48), 6)
    (root / "ImageSets/Main/test.txt").write_text("p\n")
    (root / "Annotations/p.xml").write_text(
        "<annotation><object><name>red</name><bndbox><xmin>9</xmin><ymin>7</ymin><xmax>32</xmax><ymax>22</ymax>"
        "</bndbox></object></annotation>")
    for annotations in (True, False):
        (record,) = load_voc(str(root), "test", classes=["red"], annotations=annotations).records
        assert (record["height"], record["width"]) == (80, 48)
        (record,) = load_voc(str(root), "test", classes=["red"], annotations=annotations,
                             exif_orientation=False).records
        assert (record["height"], record["width"]) == (48, 80)
    # a format PIL cannot parse: OpenCV decodes the file's bytes (given the name, it crashes the
    # process on one that is not UTF-8), as stored
    import detection.data.voc as voc

    monkeypatch.setattr(voc, "header_size", lambda path, apply_tag: None)
    (record,) = load_voc(str(root), "test", classes=["red"]).records
    assert (record["height"], record["width"]) == (48, 80)


# ---- evaluation: a photo tagged 180 degrees scores as its pre-rotated copy -------------------


class RedFinder(torch.nn.Module):
    """A 'detector' that boxes the red pixels of each image: it sees what the loader gives it."""

    def forward(self, images):
        out = []
        for image in images:
            red = (image[0] > 170) & (image[1] < 90) & (image[2] < 90)
            ys, xs = torch.nonzero(red, as_tuple=True)
            box = [[xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]] if len(xs) else []
            out.append({"boxes": torch.tensor(box, dtype=torch.float32).reshape(-1, 4),
                        "scores": torch.full((len(box),), 0.9), "labels": torch.ones(len(box), dtype=torch.int64)})
        return out


def test_a_photo_tagged_180_degrees_scores_the_ap_of_its_pre_rotated_copy(tmp_path):
    from detection.evaluation import evaluate_test_sets

    boxes = [(6, 4, 30, 20), (50, 26, 74, 42)]  # off centre: turned 180 degrees they land elsewhere
    scenes = [scene(box=b) for b in boxes]
    photo = coco_set(tmp_path / "photo", [(f"{i}.jpg", 3, s) for i, s in enumerate(scenes)], boxes)
    copy = coco_set(tmp_path / "copy", [(f"{i}.png", 1, s) for i, s in enumerate(scenes)], boxes)
    ap = {}
    for name, entry, apply_tag in (("photo", photo, True), ("copy", copy, True), ("ignored", photo, False)):
        dataset = get_dataset({**entry, "name": name}, str(tmp_path), exif_orientation=apply_tag)
        ap[name] = evaluate_test_sets([dataset], model=RedFinder())[name]["AP"]
    assert ap["copy"] > 95 and ap["photo"] == ap["copy"]
    assert ap["ignored"] < 5  # the stored pixels: the boxes miss, as the user's 0.00


def test_report_gallery_shows_the_photo_as_viewed(tmp_path):
    """The HTML report's ground truth | predictions images of a phone photo are those of its
    pre-rotated copy."""
    import base64

    import cv2

    from detection.evaluation.report import section_for_test_set

    box = (6, 4, 30, 20)
    viewed = scene(80, 48, box)
    photo = coco_set(tmp_path / "photo", [("0.jpg", 6, viewed)], [box])
    info = get_dataset(photo, str(tmp_path))
    copy = coco_set(tmp_path / "copy", [("0.png", 1, read_image(info.records[0]["file_name"]))], [box])
    missed = {1: {"boxes": np.zeros((0, 4)), "scores": np.zeros(0), "labels": np.zeros(0, np.int64)}}
    pictures = []
    for dataset in (info, get_dataset(copy, str(tmp_path)), dataclasses.replace(info, exif_orientation=False)):
        (gallery,) = section_for_test_set(dataset, {"AP": 0.0}, missed).most_missed
        pictures.append(cv2.imdecode(np.frombuffer(base64.b64decode(gallery.jpeg), np.uint8), cv2.IMREAD_COLOR))
    np.testing.assert_array_equal(pictures[0], pictures[1])
    assert pictures[0].shape != pictures[2].shape  # stored landscape, not the portrait view
