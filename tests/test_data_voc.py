"""VOC reader: 1-based -> 0-based boxes, difficult flags, splits, concatenation, bad input."""
import logging

import cv2
import numpy as np
import pytest

from detection.data import DataError, concat_datasets, get_dataset, get_datasets
from detection.data.loader import build_train_loader, training_records
from detection.data.transforms import build_transforms
from detection.data.voc import VOC_CLASSES, load_voc


def voc_xml(width, height, objects):
    parts = [f"<annotation><filename>x.jpg</filename><size><width>{width}</width><height>{height}</height>"
             "<depth>3</depth></size>"]
    for name, box, difficult in objects:
        parts.append(f"<object><name>{name}</name><difficult>{difficult}</difficult><bndbox>"
                     f"<xmin>{box[0]}</xmin><ymin>{box[1]}</ymin><xmax>{box[2]}</xmax><ymax>{box[3]}</ymax>"
                     "</bndbox></object>")
    return "".join(parts) + "</annotation>"


def make_voc(root, splits, annotations, with_images=False):
    """splits: {split: [ids]}; annotations: {id: (width, height, objects) or raw xml str}."""
    for sub in ("ImageSets/Main", "Annotations", "JPEGImages"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for split, ids in splits.items():
        (root / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(i + "\n" for i in ids))
    for image_id, ann in annotations.items():
        text = ann if isinstance(ann, str) else voc_xml(*ann)
        (root / "Annotations" / f"{image_id}.xml").write_text(text)
        if with_images and not isinstance(ann, str):
            cv2.imwrite(str(root / "JPEGImages" / f"{image_id}.jpg"), np.zeros((ann[1], ann[0], 3), np.uint8))
    return root


ANNS = {
    "000001": (60, 40, [("dog", (1, 1, 10, 20), 0), ("person", (48, 30, 60, 40), 1)]),
    "000002": (50, 70, [("tvmonitor", (5, 6, 7, 8), 0)]),
    "000003": (30, 30, [("aeroplane", (2, 3, 20, 25), 1)]),
}


def test_voc_boxes_are_zero_based_and_difficult_is_kept(tmp_path):
    root = make_voc(tmp_path / "VOC2007", {"trainval": ["000001", "000002"]}, ANNS)
    info = load_voc(str(root), "trainval")
    assert info.kind == "voc" and info.class_names == list(VOC_CLASSES) and info.use_07_metric is True
    assert info.label_to_category_id == {i: i for i in range(1, 21)}
    r1, r2 = info.records
    assert r1["image_id"] == "000001" and (r1["height"], r1["width"]) == (40, 60)
    assert r1["file_name"] == str(root / "JPEGImages" / "000001.jpg")
    # x1 -= 1, y1 -= 1; x2, y2 unchanged (1-based inclusive -> 0-based continuous)
    np.testing.assert_array_equal(r1["boxes"], np.array([[0, 0, 10, 20], [47, 29, 60, 40]], np.float32))
    np.testing.assert_array_equal(r1["labels"], np.array([12, 15], np.int64))  # dog, person
    np.testing.assert_array_equal(r1["difficult"], np.array([False, True]))
    np.testing.assert_array_equal(r2["boxes"], np.array([[4, 5, 7, 8]], np.float32))
    np.testing.assert_array_equal(r2["labels"], np.array([20], np.int64))
    kept = training_records(info.records, filter_empty=True, use_difficult=False)
    np.testing.assert_array_equal(kept[0]["boxes"], np.array([[0, 0, 10, 20]], np.float32))
    assert training_records(info.records, filter_empty=True, use_difficult=True)[0]["boxes"].shape == (2, 4)


def test_boxes_past_the_image_train_clipped_and_are_scored_as_annotated(tmp_path, caplog):
    """A custom set's boxes past its 100x100 image (an annotation tool's export): training gets
    them clipped (the one with nothing inside dropped), the VOC evaluation the numbers written,
    as the devkit reads the XML: detections equal to the annotated boxes score 100."""
    from tests.helpers import evaluate_results_file

    objects = [("cat", (51, 51, 110, 110), 0), ("cat", (0, 0, 50, 50), 0), ("cat", (120, 5, 130, 20), 0),
               ("dog", (10, 10, 20, 20), 0)]
    root = make_voc(tmp_path / "VOCclip", {"test": ["a", "b"]},
                    {"a": (100, 100, objects), "b": (100, 100, [("dog", (10, 10, 20, 20), 0)])}, with_images=True)
    with caplog.at_level(logging.WARNING, logger="detection"):
        info = load_voc(str(root), "test", classes=["cat", "dog"])
    warning = (f"clipped 2 boxes that reach past their image and dropped 1 boxes with no area in their image "
               f"({root / 'Annotations' / 'a.xml'}: object #2: <bndbox> [120.0, 5.0, 130.0, 20.0] lies outside the "
               "100x100 image)")
    assert warning in caplog.text and "scores every box as annotated" in caplog.text
    a, b = info.records
    np.testing.assert_array_equal(a["boxes"], np.array([[50, 50, 100, 100], [0, 0, 50, 50], [9, 9, 20, 20]],
                                                       np.float32))
    np.testing.assert_array_equal(a["annotated"]["boxes"], [[50, 50, 110, 110], [-1, -1, 50, 50],
                                                            [119, 4, 130, 20], [9, 9, 20, 20]])
    np.testing.assert_array_equal(a["annotated"]["labels"], [1, 1, 1, 2])
    assert "annotated" not in b  # nothing clipped: the record alone
    results = tmp_path / "results"
    results.mkdir()
    (results / "comp4_det_test_cat.txt").write_text("".join(f"a 0.9 {x1} {y1} {x2} {y2}\n"
                                                            for _, (x1, y1, x2, y2), _ in objects[:3]))
    (results / "comp4_det_test_dog.txt").write_text("a 0.9 10 10 20 20\nb 0.8 10 10 20 20\n")
    metrics = evaluate_results_file(info, str(results))
    assert metrics["AP-cat"] == pytest.approx(100.0) and metrics["AP-dog"] == pytest.approx(100.0)
    # the cat with nothing inside the image is still a positive (the devkit's npos): the two
    # others found (IoU 0.69 and 0.96 with the annotated boxes) are 2 of 3, not all
    (results / "comp4_det_test_cat.txt").write_text("a 0.9 51 51 100 100\na 0.9 1 1 50 50\n")
    assert evaluate_results_file(info, str(results))["AP-cat"] == pytest.approx(200 / 3)


def test_fractional_coordinates_are_scored_as_written_whatever_else_the_image_holds(tmp_path):
    """An annotation tool's 10.1 held as float32 made an IoU of exactly 0.5 (the devkit's +1
    widths: 50.5 / 101) 0.49999998, a miss, and a match once another box of the image was
    clipped (an evaluation trial): scored in float64, as the devkit, it is a match either way."""
    from tests.helpers import evaluate_results_file

    results = tmp_path / "results"
    results.mkdir()
    (results / "comp4_det_test_a.txt").write_text("img1 0.9 1 1 10.1 5\n")
    for name, others in (("alone", []), ("beside", [("a", (15, 15, 30, 30), 1)])):
        root = make_voc(tmp_path / name, {"test": ["img1"]}, {"img1": (20, 20, [("a", (1, 1, 10.1, 10), 0)] + others)},
                        with_images=True)
        info = load_voc(str(root), "test", classes=["a"], use_07_metric=False)
        assert evaluate_results_file(info, str(results))["AP-a"] == pytest.approx(100.0), name


@pytest.mark.parametrize("bad", ["café/crème", "../../escaped", "..", "a\\b", " "])
def test_a_class_name_that_cannot_name_a_results_file_is_refused(tmp_path, bad):
    """The VOC evaluation writes comp4_det_test_{class}.txt: "café/crème" made a subfolder and
    "../../x" a file outside the results folder (a many-class trial)."""
    root = make_voc(tmp_path / "VOC2007", {"test": ["a"]}, {"a": (20, 20, [("dog", (1, 1, 5, 5), 0)])})
    with pytest.raises(DataError, match=r"class name .* cannot name a file, as a VOC set's results files are named "
                                        r"after its classes"):
        load_voc(str(root), "test", classes=["dog", bad])


def test_bad_values_name_the_element(tmp_path):
    """A missing <xmax> said "float() argument must be ... not 'NoneType'"; the element is named."""
    for text, message in (("<xmin>1</xmin><ymin>1</ymin><ymax>4</ymax>", r"<bndbox>/<xmax> is missing"),
                          ("<xmin>1</xmin><ymin>1</ymin><xmax> </xmax><ymax>4</ymax>", r"<bndbox>/<xmax> is missing"),
                          ("<xmin>1</xmin><ymin>1</ymin><xmax>3</xmax><ymax>4</ymax></bndbox><difficult>true</difficult>"
                           "<bndbox>", r"<difficult> \(0 or 1\) is 'true', not a number")):
        xml = ("<annotation><size><width>9</width><height>9</height></size><object><name>dog</name>"
               f"<bndbox>{text}</bndbox></object></annotation>")
        root = make_voc(tmp_path / "VOC2007", {"train": ["a"]}, {"a": xml})
        with pytest.raises(DataError, match=r"a\.xml: object #0 \(dog\): " + message):
            load_voc(str(root), "train")


def test_repeated_objects_are_said(tmp_path, caplog):
    """An annotation tool's export with a box twice (every annotator's copy): each copy is an
    object the devkit counts as one to find and no detection can match. One warning, naming it."""
    objects = [("cat", (5, 5, 50, 50), 0), ("dog", (5, 5, 50, 50), 0), ("cat", (5, 5, 50, 50), 0)]
    root = make_voc(tmp_path / "VOCrep", {"test": ["a"]}, {"a": (100, 100, objects)}, with_images=True)
    with caplog.at_level(logging.WARNING, logger="detection"):
        load_voc(str(root), "test", classes=["cat", "dog"])
    assert [r.getMessage() for r in caplog.records if "repeat" in r.getMessage()[len(str(root)):]] == [
        f"{root} split test: 1 objects repeat another of their image with the same class and box "
        f"({root / 'Annotations' / 'a.xml'}: object #2 repeats #0): the evaluation counts each copy as one more "
        "object to find, which no detection can match once the first is (AP falls), and training learns the box "
        "twice; remove the copies"]


def test_an_image_listed_twice_in_the_split_is_read_once_with_a_warning(tmp_path, caplog):
    root = make_voc(tmp_path / "VOC2007", {"test": ["000001", "000002", "000001"]}, ANNS)
    with caplog.at_level(logging.WARNING, logger="detection"):
        info = load_voc(str(root), "test")
    assert [r["image_id"] for r in info.records] == ["000001", "000002"]
    assert "lists 1 image ids more than once (000001): each is read once" in caplog.text


def test_only_difficult_image_leaves_training_without_use_difficult(tmp_path):
    root = make_voc(tmp_path / "VOC2007", {"test": ["000003", "000002"]}, ANNS)
    records = load_voc(str(root), "test").records
    assert [r["image_id"] for r in training_records(records, filter_empty=True, use_difficult=False)] == ["000002"]
    assert len(training_records(records, filter_empty=True, use_difficult=True)) == 2
    # a split of difficult objects only: the error names the setting that emptied it, not only filter_empty
    info = load_voc(str(root), "test")
    info.records = [r for r in info.records if r["image_id"] == "000003"]
    make = lambda difficult: build_train_loader(  # noqa: E731
        [info], transform=build_transforms(min_sizes=[30], max_size=100, hflip_prob=0.0), images_per_batch=1,
        num_workers=0, aspect_ratio_grouping=False, filter_empty=True, seed=0, use_difficult=difficult)
    with pytest.raises(DataError, match="once its difficult objects are dropped .dataloader.use_difficult: false"):
        make(False)
    assert make(True) is not None


def test_two_splits_and_two_years_concatenate(tmp_path):
    devkit = tmp_path / "VOCdevkit"
    make_voc(devkit / "VOC2007", {"trainval": ["000001"], "test": ["000002"]}, ANNS, with_images=True)
    make_voc(devkit / "VOC2012", {"trainval": ["000003"]}, ANNS, with_images=True)
    train = get_datasets(["voc_2007_trainval", "voc_2012_trainval"], str(tmp_path))
    assert [d.use_07_metric for d in train] == [True, False]
    both = concat_datasets(train)
    assert both.name == "voc_2007_trainval+voc_2012_trainval"
    assert [r["image_id"] for r in both.records] == ["000001", "000003"]
    test = get_dataset("voc_2007_test", str(tmp_path))
    assert [r["image_id"] for r in test.records] == ["000002"] and test.split == "test"
    # the loader reads the concatenation: one epoch of a 2-image batch holds both years
    loader = build_train_loader(train, transform=build_transforms(min_sizes=[30], max_size=100, hflip_prob=0.0),
                                images_per_batch=2, num_workers=0, aspect_ratio_grouping=False,
                                filter_empty=True, seed=0)
    _, targets = next(iter(loader))
    assert sorted(tuple(t["labels"].tolist()) for t in targets) == [(1,), (12, 15)]


def test_custom_classes_and_explicit_entry(tmp_path):
    anns = {"a": (20, 20, [("cat", (1, 1, 5, 5), 0), ("hat", (2, 2, 6, 6), 0)])}
    make_voc(tmp_path / "mine", {"train": ["a"]}, anns, with_images=True)
    entry = {"type": "voc", "root": "mine", "split": "train", "classes": ["hat", "cat"], "use_07_metric": True}
    info = get_dataset(entry, str(tmp_path))
    assert info.class_names == ["hat", "cat"] and info.use_07_metric is True
    np.testing.assert_array_equal(info.records[0]["labels"], [2, 1])
    assert load_voc(str(tmp_path / "mine"), "train", classes=["hat", "cat"]).use_07_metric is False


def test_unknown_class_names_file_and_object(tmp_path):
    anns = {"a": (20, 20, [("dog", (1, 1, 5, 5), 0), ("unicorn", (2, 2, 6, 6), 0)])}
    root = make_voc(tmp_path / "VOC2007", {"train": ["a"]}, anns)
    with pytest.raises(DataError, match=r"a\.xml: object #1 \(unicorn\).*unknown class name"):
        load_voc(str(root), "train")


def test_malformed_xml_errors_or_is_skipped_and_counted(tmp_path, caplog):
    anns = {**ANNS, "bad": "<annotation><object><name>dog</name>"}
    root = make_voc(tmp_path / "VOC2007", {"train": ["000001", "bad", "missing"]}, anns, with_images=True)
    with pytest.raises(DataError, match=r"malformed XML .*bad\.xml"):
        load_voc(str(root), "train")
    with caplog.at_level(logging.WARNING, logger="detection.data.voc"):
        info = get_dataset({"type": "voc", "root": "VOC2007", "split": "train"}, str(tmp_path), skip_bad_images=True)
    assert [r["image_id"] for r in info.records] == ["000001"] and info.skip_bad_images
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "bad.xml" in messages and "missing.xml" in messages and "skipped 2 images" in messages


def test_bad_box_values_name_the_object(tmp_path):
    anns = {"a": "<annotation><size><width>9</width><height>9</height></size><object><name>dog</name>"
                 "<bndbox><xmin>1</xmin><ymin>x</ymin><xmax>3</xmax><ymax>4</ymax></bndbox></object></annotation>"}
    root = make_voc(tmp_path / "VOC2007", {"train": ["a"]}, anns)
    with pytest.raises(DataError, match=r"a\.xml: object #0 \(dog\): <bndbox>/<ymin> is 'x', not a number"):
        load_voc(str(root), "train")


def test_missing_layout_names_path(tmp_path):
    with pytest.raises(DataError, match=r"VOC folder not found: .*VOCdevkit/VOC2012.*ImageSets/Main"):
        get_dataset("voc_2012_trainval", str(tmp_path))
    make_voc(tmp_path / "VOCdevkit" / "VOC2007", {"trainval": []}, {})
    with pytest.raises(DataError, match=r"split file not found: .*ImageSets/Main/test\.txt"):
        get_dataset("voc_2007_test", str(tmp_path))


def test_a_split_file_id_found_on_disk_in_the_other_unicode_form(tmp_path):
    """The split file says café (NFC, as annotation tools write it); the folder, copied from macOS,
    holds cafe + combining accent (NFD) for the XML and the image: the same name to a user, so
    its boxes are read (the XML was 'not found' and the image skipped or refused before)."""
    import unicodedata

    nfc, nfd = unicodedata.normalize("NFC", "café"), unicodedata.normalize("NFD", "café")
    root = make_voc(tmp_path / "VOC", {"val": ["000001", nfc]}, {"000001": ANNS["000001"], nfd: ANNS["000002"]},
                    with_images=True)
    info = get_dataset({"type": "voc", "root": str(root), "split": "val", "classes": list(VOC_CLASSES)},
                       str(tmp_path))
    record = info.records[1]
    assert record["image_id"] == nfc and record["file_name"] == str(root / "JPEGImages" / f"{nfd}.jpg")
    assert record["labels"].tolist() == [VOC_CLASSES.index("tvmonitor") + 1]
    # a folder named with an accent on Linux (NFC) holding the NFD files: only the name is turned
    moved = tmp_path / nfc / "VOC"
    moved.parent.mkdir()
    root.rename(moved)
    info = get_dataset({"type": "voc", "root": str(moved), "split": "val", "classes": list(VOC_CLASSES)},
                       str(tmp_path))
    assert info.records[1]["file_name"] == str(moved / "JPEGImages" / f"{nfd}.jpg")
