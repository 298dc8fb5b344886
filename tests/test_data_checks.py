"""Image files checked when a data set is built: every missing file
reported at once, naming the annotation file; skip_bad_images leaves them out with one
warning; an unreadable file is reported once, not once per epoch."""
import json
import multiprocessing
import logging
import time

import cv2
import numpy as np
import pytest

from detection.data import DataError, build_test_loader, build_train_loader, build_transforms, get_dataset


def make_coco(root, num_images=8):
    """num_images flat 40x30 PNGs with one box each, listed in root/ann.json."""
    (root / "img").mkdir(parents=True, exist_ok=True)
    images, anns = [], []
    for i in range(1, num_images + 1):
        cv2.imwrite(str(root / "img" / f"{i}.png"), np.full((30, 40, 3), 10 * i, np.uint8))
        images.append({"id": i, "file_name": f"{i}.png", "height": 30, "width": 40})
        anns.append({"id": i, "image_id": i, "category_id": 1, "bbox": [2, 2, 10, 10], "iscrowd": 0})
    (root / "ann.json").write_text(json.dumps({"images": images, "annotations": anns,
                                               "categories": [{"id": 1, "name": "thing"}]}))
    return {"type": "coco", "ann_file": "ann.json", "image_root": "img"}


def test_missing_images_are_one_error_with_count_first_paths_and_annotation_file(tmp_path):
    entry = make_coco(tmp_path)
    for i in (2, 3, 5):
        (tmp_path / "img" / f"{i}.png").unlink()
    (tmp_path / "img" / "7.png").write_bytes(b"")  # an empty file cannot be an image either
    with pytest.raises(DataError) as err:
        get_dataset(entry, str(tmp_path))
    message = str(err.value)
    assert "\n" not in message
    assert f"4 of 8 images listed in {tmp_path / 'ann.json'} are missing or empty" in message
    assert f"{tmp_path / 'img' / '2.png'}, {tmp_path / 'img' / '3.png'}, {tmp_path / 'img' / '5.png'}, ... " \
           "(1 more)" in message
    assert "dataloader.skip_bad_images: true" in message


def test_skip_bad_images_leaves_them_out_with_one_warning(tmp_path, caplog):
    entry = make_coco(tmp_path)
    for i in (2, 5):
        (tmp_path / "img" / f"{i}.png").unlink()
    with caplog.at_level(logging.WARNING, logger="detection.data.catalog"):
        info = get_dataset(entry, str(tmp_path), skip_bad_images=True)
    assert [r["image_id"] for r in info.records] == [1, 3, 4, 6, 7, 8]
    (warning,) = [r.getMessage() for r in caplog.records]
    assert "2 of 8 images" in warning and "2.png" in warning and "5.png" in warning


def test_a_name_in_the_other_unicode_form_is_found(tmp_path, caplog):
    """The json says café.png (NFC, as annotation tools write it), the disk holds cafe + combining
    accent (NFD: a folder copied from macOS): the same name to a user, found."""
    import unicodedata

    entry = make_coco(tmp_path, num_images=2)
    listed = json.loads((tmp_path / "ann.json").read_text())
    listed["images"][1]["file_name"] = unicodedata.normalize("NFC", "café.png")
    (tmp_path / "ann.json").write_text(json.dumps(listed))
    (tmp_path / "img" / "2.png").rename(tmp_path / "img" / unicodedata.normalize("NFD", "café.png"))
    with caplog.at_level(logging.INFO, logger="detection.data.catalog"):
        info = get_dataset(entry, str(tmp_path))
    assert info.records[1]["file_name"] == str(tmp_path / "img" / unicodedata.normalize("NFD", "café.png"))
    assert "1 image file names found on disk in another Unicode form (NFC / NFD)" in caplog.text


@pytest.mark.parametrize("written, why", [
    ("img\\{i}.png", r"\(a '\\' in the name: a Windows path\? folders are separated by '/'\)"),
    ("{i}.PNG", r"\(.*img/2\.png is on disk: file names differ in case here\)"),
    ("/home/alice/cvat_export/images/{i}.png",
     r"\(its folder /home/alice/cvat_export/images does not exist; a file name the annotations give as an absolute "
     r"path is taken as it is, without image_root\)"),
])
def test_a_missing_images_name_says_what_is_wrong_with_it(tmp_path, written, why):
    """An annotation tool's export: Windows separators, another case than the disk's, the paths
    of the machine it ran on (image_root is then not used): each ended in "is the image folder
    right (image_root ...)?", which changing image_root could not fix (an annotation-tool trial)."""
    entry = make_coco(tmp_path)
    listed = json.loads((tmp_path / "ann.json").read_text())
    for image in listed["images"][1:]:
        image["file_name"] = written.format(i=image["id"])
    (tmp_path / "ann.json").write_text(json.dumps(listed))
    if tmp_path.joinpath("img", "2.PNG").exists():  # a case-insensitive file system finds it
        pytest.skip("this file system ignores case")
    with pytest.raises(DataError, match=r"7 of 8 images .* missing or empty: .*" + why):
        get_dataset(entry, str(tmp_path))


def test_no_image_found_is_an_error_even_when_skipping(tmp_path):
    entry = {**make_coco(tmp_path), "image_root": "."}  # the json's folder, not the images'
    with pytest.raises(DataError, match=r"8 of 8 images .* is the image folder right"):
        get_dataset(entry, str(tmp_path), skip_bad_images=True)


def test_missing_voc_image_names_the_split_file(tmp_path):
    root = tmp_path / "VOC2007"
    for sub in ("ImageSets/Main", "Annotations", "JPEGImages"):
        (root / sub).mkdir(parents=True)
    (root / "ImageSets" / "Main" / "test.txt").write_text("a\nb\n")
    for stem in ("a", "b"):
        (root / "Annotations" / f"{stem}.xml").write_text(
            "<annotation><size><width>20</width><height>10</height></size><object><name>dog</name>"
            "<bndbox><xmin>1</xmin><ymin>1</ymin><xmax>5</xmax><ymax>5</ymax></bndbox></object></annotation>")
    cv2.imwrite(str(root / "JPEGImages" / "a.jpg"), np.zeros((10, 20, 3), np.uint8))
    with pytest.raises(DataError, match=r"1 of 2 images listed in .*ImageSets/Main/test\.txt are missing or "
                                        r"empty: .*JPEGImages/b\.jpg"):
        get_dataset({"type": "voc", "root": "VOC2007", "split": "test"}, str(tmp_path))


def test_annotations_only_callers_can_skip_the_check(tmp_path):
    entry = make_coco(tmp_path)
    (tmp_path / "img" / "1.png").unlink()
    assert len(get_dataset(entry, str(tmp_path), check_images=False).records) == 8


def _corrupt_image_set(tmp_path):
    entry = make_coco(tmp_path)
    (tmp_path / "img" / "4.png").write_bytes(b"not a png")  # exists and is not empty: found only when read
    return get_dataset(entry, str(tmp_path), skip_bad_images=True)


def _warnings_about(caplog, name):
    return [r for r in caplog.records if r.name == "detection.data.loader" and name in r.getMessage()]


def test_unreadable_image_is_reported_once_not_once_per_epoch(tmp_path, caplog):
    info = _corrupt_image_set(tmp_path)
    transform = build_transforms(min_sizes=[30], max_size=100, hflip_prob=0.0)
    loader = build_train_loader([info], transform=transform, images_per_batch=4, num_workers=0,
                                aspect_ratio_grouping=False, filter_empty=True, seed=0)
    with caplog.at_level(logging.WARNING, logger="detection.data.loader"):
        for number, (images, _) in enumerate(loader):  # 8 images, 4 per batch: 5 epochs
            assert len(images) == 4
            if number == 9:
                break
        test_loader = build_test_loader(info, num_workers=0)
        for _ in range(3):  # three evaluations with one loader
            assert sum(len(images) for images, _ in test_loader) == 7
    assert len(_warnings_about(caplog, "4.png")) == 2  # once in training, once in the test loader


def test_workers_share_what_they_found_bad(tmp_path):
    """The flag a worker process sets is seen by the others (and the parent): shared memory."""
    info = _corrupt_image_set(tmp_path)
    loader = build_test_loader(info, num_workers=2)
    assert sum(len(images) for images, _ in loader) == 7
    assert loader.dataset.bad.tolist() == [0, 0, 0, 1, 0, 0, 0, 0]


def test_training_with_a_missing_image_stops_before_the_first_iteration(tmp_path):
    """The user's case: an image deleted from a COCO-json set used to fail at iteration 11
    as a DataLoader traceback; now the run stops when the data set is built."""
    from detection.config import load_config
    from detection.data.shapes import generate_shapes
    from detection.engine.trainer import train

    generate_shapes(tmp_path / "shapes", num_train=6, num_val=2, seed=0, image_size=(64, 80))
    missing = sorted((tmp_path / "shapes" / "train").iterdir())[3]
    missing.unlink()
    cfg = load_config(None, [
        "model.num_classes=3", "model.backbone.depth=18", "model.backbone.norm=gn", "model.backbone.weights=null",
        "model.backbone.freeze_at=0", f"datasets.root={tmp_path}", "datasets.train=[shapes_train]",
        "datasets.test=[shapes_val]",
        "dataloader.num_workers=0", "solver.ims_per_batch=2", "solver.max_iter=20", "solver.steps=[100]",
        f"output_dir={tmp_path / 'out'}", "device=cpu"])
    with pytest.raises(DataError, match=rf"1 of 6 images listed in .*instances_train\.json are missing or "
                                        rf"empty: .*{missing.name}"):
        train(cfg)
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


def test_an_unreadable_image_in_a_worker_is_one_line(tmp_path):
    """Not torch's "Caught DataError in DataLoader worker process 0. Original Traceback ..."."""
    entry = make_coco(tmp_path)
    (tmp_path / "img" / "4.png").write_bytes(b"not a png")
    info = get_dataset(entry, str(tmp_path))
    with pytest.raises(DataError) as err:
        list(build_test_loader(info, num_workers=1))
    message = str(err.value)
    assert "\n" not in message and "Traceback" not in message
    assert message.startswith(f"could not read image {tmp_path / 'img' / '4.png'}: ")


def test_a_worker_error_stops_the_workers_at_once(tmp_path):
    """The loader's workers end when the one-line error is raised, not when the garbage collector
    gets to torch's iterator (which then waited 5 s on a worker: every failing command paid it)."""
    entry = make_coco(tmp_path)
    (tmp_path / "img" / "4.png").write_bytes(b"not a png")
    before = set(multiprocessing.active_children())  # other tests' processes are not this loader's
    with pytest.raises(DataError):
        list(build_test_loader(get_dataset(entry, str(tmp_path)), num_workers=1))
    deadline = time.monotonic() + 2.0
    while set(multiprocessing.active_children()) - before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not set(multiprocessing.active_children()) - before
