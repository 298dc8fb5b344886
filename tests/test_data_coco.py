"""COCO reader: id mapping, crowd / out-of-bounds / zero-area boxes, empty images, bad input."""
import json
import logging
import os

import cv2
import numpy as np
import pytest

from detection.data import DataError, get_dataset
from detection.data.coco import load_coco_json
from detection.data.loader import build_test_loader, training_records

CATEGORIES = [  # non-contiguous ids, names deliberately not in id order
    {"id": 42, "name": "mug"},
    {"id": 3, "name": "zebra"},
    {"id": 7, "name": "apple"},
]
IMAGES = [
    {"id": 9, "file_name": "b.png", "height": 30, "width": 40},  # only a crowd box
    {"id": 1, "file_name": "a.png", "height": 80, "width": 100},
    {"id": 4, "file_name": "c.png", "height": 50, "width": 20},  # no annotations at all
]
ANNOTATIONS = [
    {"id": 100, "image_id": 1, "category_id": 42, "bbox": [10, 20, 30, 40], "iscrowd": 0},
    {"id": 101, "image_id": 1, "category_id": 3, "bbox": [0, 0, 50, 50], "iscrowd": 1},
    {"id": 102, "image_id": 1, "category_id": 7, "bbox": [90, 70, 30, 30], "iscrowd": 0},  # out of bounds
    {"id": 103, "image_id": 1, "category_id": 3, "bbox": [50, 50, 0, 10], "iscrowd": 0},  # zero width
    {"id": 104, "image_id": 1, "category_id": 3, "bbox": [-5, 10.5, 20, 10], "iscrowd": 0},  # left of image
    {"id": 105, "image_id": 1, "category_id": 7, "bbox": [120, 10, 5, 5], "iscrowd": 0},  # fully outside
    {"id": 106, "image_id": 9, "category_id": 7, "bbox": [1, 1, 5, 5], "iscrowd": 1},
]


def write_coco(tmp_path, annotations=None, images=None, with_images=False):
    (tmp_path / "imgs").mkdir(exist_ok=True)
    data = {"images": images or IMAGES, "annotations": ANNOTATIONS if annotations is None else annotations,
            "categories": CATEGORIES}
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(data))
    if with_images:
        for img in data["images"]:
            image = np.full((img["height"], img["width"], 3), 90, np.uint8)
            cv2.imwrite(str(tmp_path / "imgs" / img["file_name"]), image)
    return str(path), str(tmp_path / "imgs")


def test_tiny_coco_loads_to_exact_targets(tmp_path, caplog):
    ann_file, image_root = write_coco(tmp_path)
    with caplog.at_level(logging.WARNING, logger="detection.data.coco"):
        info = load_coco_json(ann_file, image_root)
    assert info.kind == "coco"
    assert info.class_names == ["zebra", "apple", "mug"]  # sorted by category id 3, 7, 42
    assert info.label_to_category_id == {1: 3, 2: 7, 3: 42}
    assert info.ann_file == os.path.abspath(ann_file)
    assert [r["image_id"] for r in info.records] == [1, 4, 9]  # all images kept, sorted by id
    r1, r4, r9 = info.records
    assert r1["file_name"] == os.path.join(image_root, "a.png")
    assert (r1["height"], r1["width"]) == (80, 100)
    np.testing.assert_array_equal(r1["boxes"], np.array([
        [10, 20, 40, 60],        # XYWH -> XYXY
        [90, 70, 100, 80],       # clipped to the 100x80 image
        [0, 10.5, 15, 20.5],     # clipped at x = 0
    ], dtype=np.float32))
    assert r1["boxes"].dtype == np.float32
    np.testing.assert_array_equal(r1["labels"], np.array([3, 2, 1], dtype=np.int64))
    assert r1["labels"].dtype == np.int64
    np.testing.assert_array_equal(r1["difficult"], np.zeros(3, dtype=np.bool_))
    for empty in (r4, r9):  # no boxes / crowd only: kept for evaluation, with empty arrays
        assert empty["boxes"].shape == (0, 4) and empty["boxes"].dtype == np.float32
        assert empty["labels"].shape == (0,) and empty["labels"].dtype == np.int64
    warnings = [rec.getMessage() for rec in caplog.records if rec.levelno == logging.WARNING]
    # the dropped boxes named, with why (a count alone left a user of many files nowhere to look)
    # (and the clipped ones by id: a curator's trial could not find them in a COCO-sized file)
    assert warnings == [f"{ann_file}: in the boxes training learns from, clipped 2 "
                        "boxes that reach more than a pixel past their image (annotation ids 102, 104) and dropped 2 "
                        "boxes with no area in "
                        "their image (annotation id 103 (image id 1): bbox [50, 50, 0, 10] has a width or "
                        "height <= 0, annotation id 105 (image id 1): bbox [120, 10, 5, 5] lies outside the "
                        "100x80 image); the COCO evaluation (pycocotools) scores the json's boxes as written, and "
                        "--gt and the report draw those"]
    # what --gt and the report's galleries draw: the boxes as the json writes them, which COCOeval counts
    # (a curator's trial: a gallery said "1 missed" of a zero-width box the drawing had dropped)
    from detection.visualization.draw import NO_AREA_TAG, ground_truth_boxes

    boxes, labels, tags = ground_truth_boxes(r1)
    as_written = [[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                  for a in ANNOTATIONS if a["image_id"] == 1 and not a.get("iscrowd")]
    np.testing.assert_array_equal(boxes, as_written)
    assert tags == ["" if a["bbox"][2] > 0 and a["bbox"][3] > 0 else NO_AREA_TAG
                    for a in ANNOTATIONS if a["image_id"] == 1 and not a.get("iscrowd")] and NO_AREA_TAG in tags
    assert "annotated" not in r4 and "annotated" not in r9  # nothing clipped or dropped: the boxes themselves


def test_repeated_boxes_and_zero_areas_are_said(tmp_path, caplog):
    """An annotation tool's export (every annotator's copy of a box; "area": 0 as a placeholder):
    perfect detections scored AP 83 against 100 with 10 of 46 boxes repeated, and APm "-" with
    areas 0, in silence (pycocotools and Detectron2 are silent too). Each is one warning naming
    the first few; a crowd region over an object, or the same box in another class, is no copy."""
    annotations = [
        {"id": 1, "image_id": 1, "category_id": 42, "bbox": [10, 20, 30, 40], "area": 1200},
        {"id": 2, "image_id": 1, "category_id": 42, "bbox": [10, 20, 30, 40], "area": 1200},  # a copy
        {"id": 3, "image_id": 1, "category_id": 7, "bbox": [10, 20, 30, 40], "area": 0},  # another class
        {"id": 4, "image_id": 1, "category_id": 42, "bbox": [10, 20, 30, 40], "iscrowd": 1, "area": 1200},
        {"id": 5, "image_id": 9, "category_id": 42, "bbox": [1, 1, 5.5, 5], "area": 0},
        {"id": 6, "image_id": 9, "category_id": 42, "bbox": [1, 1, 5.5, 5.0], "area": 0},  # a copy
        {"id": 7, "image_id": 9, "category_id": 42, "bbox": [1, 1, 0, 5], "area": 0},  # no size: area 0 is right
    ]
    ann_file, image_root = write_coco(tmp_path, annotations)
    with caplog.at_level(logging.WARNING, logger="detection.data.coco"):
        load_coco_json(ann_file, image_root)
    said = [r.getMessage() for r in caplog.records if "repeat" in r.getMessage()[len(ann_file):]
            or "'area': 0" in r.getMessage()]
    assert said == [
        f"{ann_file}: 2 annotations repeat another of their image with the same category and box (id 2 repeats id 1 "
        "(image id 1), id 6 repeats id 5 (image id 9)): the evaluation counts each copy as one more object to find, "
        "which no detection can match once the first is (AP falls), and training learns the box twice; remove the "
        "copies",
        f"{ann_file}: 3 annotations have 'area': 0 with a box of non-zero size (ids 3, 5, 6): the COCO evaluation "
        "sorts objects by 'area' and counts these small, so APs, APm and APl are wrong (AP and AP50 are not); give "
        "each its area (pixels of the object, or the box's width x height) or leave the key out (then taken as "
        "width x height)"]


def test_an_exports_rounding_past_the_border_is_clipped_without_a_word(tmp_path, caplog):
    """Converters' boxes often end a fraction of a pixel past the image (x + w = 100.4): clipped
    for training like any other, not counted as reaching past it (more than a pixel is)."""
    annotations = [{"id": 1, "image_id": 1, "category_id": 42, "bbox": [60.2, 50, 40.2, 30.9], "iscrowd": 0}]
    ann_file, image_root = write_coco(tmp_path, annotations=annotations)
    with caplog.at_level(logging.WARNING, logger="detection.data.coco"):
        info = load_coco_json(ann_file, image_root)
    record = next(r for r in info.records if r["image_id"] == 1)
    np.testing.assert_allclose(record["boxes"], [[60.2, 50, 100, 80]], rtol=0, atol=1e-5)
    assert not [rec for rec in caplog.records if rec.levelno == logging.WARNING]


def test_boxes_written_as_xyxy_are_asked_about(tmp_path, caplog):
    """[x1, y1, x2, y2] written where COCO's bbox is [x, y, width, height] (an API trial's own json):
    only "clipped 3 boxes" was said. Now the warning asks whether they are XYXY, and only then:
    boxes really past the border of an XYWH json are not asked about."""
    xyxy = [[10, 20, 30, 40], [5, 5, 60, 70], [50, 40, 95, 78], [60, 30, 90, 70], [40, 45, 80, 75]]  # in a 100x80
    annotations = [{"id": i, "image_id": 1, "category_id": 42, "bbox": box, "iscrowd": 0}
                   for i, box in enumerate(xyxy, start=1)]
    ann_file, image_root = write_coco(tmp_path, annotations=annotations)
    with caplog.at_level(logging.WARNING, logger="detection.data.coco"):
        load_coco_json(ann_file, image_root)
    assert "clipped 3 boxes that reach more than a pixel past their image" in caplog.text
    assert "; 5 of its 5 boxes have a width and height above their x and y, as [x1, y1, x2, y2] boxes written " \
        "where COCO's bbox is [x, y, width, height] would: are they XYXY?" in caplog.text
    caplog.clear()
    xywh = [[10, 20, 8, 9], [80, 60, 30, 30], [90, 70, 20, 20], [2, 3, 40, 50]]  # two past the border, as drawn
    annotations = [{"id": i, "image_id": 1, "category_id": 42, "bbox": box, "iscrowd": 0}
                   for i, box in enumerate(xywh, start=1)]
    ann_file, image_root = write_coco(tmp_path, annotations=annotations)
    with caplog.at_level(logging.WARNING, logger="detection.data.coco"):
        load_coco_json(ann_file, image_root)
    assert "clipped 2 boxes" in caplog.text and "XYXY" not in caplog.text


def test_ignore_marked_annotations_leave_training_with_a_warning_since_cocoeval_scores_them(tmp_path, caplog):
    """"ignore": 1 without "iscrowd": 1 was dropped from training without a word, while COCOeval
    (it overwrites "ignore" from "iscrowd") counts the box as an object to find (a helper's trial:
    AP50 1.0 with them detected, 0.78 without). Detectron2 refuses such a file; here one warning."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    annotations = [{"id": 1, "image_id": 1, "category_id": 42, "bbox": [10, 20, 30, 40], "iscrowd": 0, "area": 1200},
                   {"id": 2, "image_id": 1, "category_id": 42, "bbox": [60, 10, 30, 30], "iscrowd": 0, "ignore": 1,
                    "area": 900},
                   {"id": 3, "image_id": 1, "category_id": 42, "bbox": [0, 50, 20, 20], "iscrowd": 1, "ignore": 1,
                    "area": 400}]
    ann_file, image_root = write_coco(tmp_path, annotations=annotations)
    with caplog.at_level(logging.WARNING, logger="detection.data.coco"):
        info = load_coco_json(ann_file, image_root)
    record = next(r for r in info.records if r["image_id"] == 1)
    np.testing.assert_array_equal(record["boxes"], [[10, 20, 40, 60]])  # neither is a training target
    warnings = [rec.getMessage() for rec in caplog.records if rec.levelno == logging.WARNING]
    assert warnings == [f"{ann_file}: 1 annotations are marked 'ignore': 1 but not 'iscrowd': 1 (ids 2): they are "
                        "left out of training, but the COCO evaluation (pycocotools reads only iscrowd) scores them "
                        "as objects to find; mark them 'iscrowd': 1 for both to ignore them"]
    # what the warning says of COCOeval: the ignore-marked box, not detected, is a miss
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        truth = COCO(ann_file)
        found = truth.loadRes([{"image_id": 1, "category_id": 42, "bbox": [10, 20, 30, 40], "score": 0.9}])
        run = COCOeval(truth, found, "bbox")
        run.params.imgIds = [1]
        run.evaluate(), run.accumulate(), run.summarize()
    assert run.stats[1] == pytest.approx(0.5, abs=0.01)  # AP50: one of the two objects found


def test_images_without_boxes_leave_training_but_stay_in_evaluation(tmp_path):
    ann_file, image_root = write_coco(tmp_path, with_images=True)
    info = load_coco_json(ann_file, image_root)
    assert [r["image_id"] for r in training_records(info.records, filter_empty=True, use_difficult=True)] == [1]
    assert len(training_records(info.records, filter_empty=False, use_difficult=True)) == 3
    seen = [rec["image_id"] for _, recs in build_test_loader(info, num_workers=0) for rec in recs]
    assert seen == [1, 4, 9]


def test_unknown_category_id_names_file_and_annotation(tmp_path):
    bad = ANNOTATIONS + [{"id": 777, "image_id": 1, "category_id": 5, "bbox": [1, 1, 2, 2], "iscrowd": 0}]
    ann_file, image_root = write_coco(tmp_path, annotations=bad)
    with pytest.raises(DataError, match="annotation id 777") as err:
        load_coco_json(ann_file, image_root)
    assert ann_file in str(err.value) and "category_id 5" in str(err.value)


def test_two_classes_of_one_name_or_one_file_under_two_image_ids_are_refused(tmp_path):
    """Both were silent: a class's AP was reported under the other's name, and an image listed
    twice with its boxes split taught each copy's boxes as background."""
    ann_file, image_root = write_coco(tmp_path)
    data = json.loads(open(ann_file).read())
    data["categories"][2]["name"] = "mug"
    (tmp_path / "names.json").write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"names.json: category #0 \(id 42\) and category #2 \(id 7\) have the "
                                        r"same name 'mug'; each class needs a name of its own"):
        load_coco_json(str(tmp_path / "names.json"), image_root)
    data = json.loads(open(ann_file).read())
    data["images"].append({**data["images"][1], "id": 100})
    (tmp_path / "files.json").write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"files.json: image #1 \(id 1\) and image #3 \(id 100\) have the same "
                                        r"file_name 'a.png'; list an image once, with all its annotations"):
        load_coco_json(str(tmp_path / "files.json"), image_root)


def test_nan_box_names_file_and_annotation(tmp_path):
    bad = ANNOTATIONS + [{"id": 555, "image_id": 1, "category_id": 3, "bbox": [1, float("nan"), 2, 2], "iscrowd": 0}]
    ann_file, image_root = write_coco(tmp_path, annotations=bad)
    with pytest.raises(DataError, match="annotation id 555") as err:
        load_coco_json(ann_file, image_root)
    assert ann_file in str(err.value) and "non-finite" in str(err.value)


def test_missing_or_malformed_json_and_missing_image_folder(tmp_path):
    with pytest.raises(DataError, match="annotation file not found: .*nope.json"):
        load_coco_json(str(tmp_path / "nope.json"), str(tmp_path))
    broken = tmp_path / "broken.json"
    broken.write_text("{ not json")
    with pytest.raises(DataError, match="broken.json"):
        load_coco_json(str(broken), str(tmp_path))
    ann_file, _ = write_coco(tmp_path)
    with pytest.raises(DataError, match="image folder not found: .*missing_dir"):
        load_coco_json(ann_file, str(tmp_path / "missing_dir"))


def test_known_coco_name_resolves_standard_layout(tmp_path):
    root = tmp_path / "datasets"
    (root / "coco" / "annotations").mkdir(parents=True)
    (root / "coco" / "val2017").mkdir()
    data = {"images": IMAGES, "annotations": ANNOTATIONS, "categories": CATEGORIES}
    (root / "coco" / "annotations" / "instances_val2017.json").write_text(json.dumps(data))
    info = get_dataset("coco_2017_val", str(root), check_images=False)  # the layout only: no image files
    assert info.name == "coco_2017_val"
    assert info.records[0]["file_name"] == str(root / "coco" / "val2017" / "a.png")
    with pytest.raises(DataError, match="instances_train2017.json"):  # train json absent: names the path
        get_dataset("coco_2017_train", str(root))


def test_images_placed_outside_the_image_folder_are_named(tmp_path, caplog):
    """A json's absolute file_name or '..' reads files outside image_root (another machine's paths,
    or a customer's json made to read another's images, which the report then shows): said."""
    write_coco(tmp_path, with_images=True)
    (tmp_path / "elsewhere").mkdir()
    data = json.loads((tmp_path / "ann.json").read_text())
    for img in data["images"][:2]:
        os.replace(tmp_path / "imgs" / img["file_name"], tmp_path / "elsewhere" / img["file_name"])
    first, second = data["images"][0]["file_name"], data["images"][1]["file_name"]
    data["images"][0]["file_name"] = str(tmp_path / "elsewhere" / first)
    data["images"][1]["file_name"] = f"../elsewhere/{second}"
    (tmp_path / "ann.json").write_text(json.dumps(data))
    entry = {"type": "coco", "ann_file": "ann.json", "image_root": "imgs", "name": "mine"}
    with caplog.at_level(logging.WARNING):
        info = get_dataset(entry, str(tmp_path))
    said = [r.getMessage() for r in caplog.records if "outside its image folder" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith(f"data set mine: 2 of its 3 images lie outside its image folder "
                                                 f"{tmp_path / 'imgs'} ("), said
    assert str(tmp_path / "elsewhere" / first) in said[0] and str(tmp_path / "elsewhere" / second) in said[0]
    assert len(info.records) == 3  # read from there, as Detectron2 and pycocotools read them
    caplog.clear()
    write_coco(tmp_path, with_images=True)  # every image inside: nothing said
    with caplog.at_level(logging.WARNING):
        get_dataset(entry, str(tmp_path))
    assert not [r for r in caplog.records if "outside its image folder" in r.getMessage()]


def test_a_json_without_image_sizes_takes_them_from_the_files(tmp_path, caplog):
    """A converter writing no width / height: refused ("has no 'height' field"), where Detectron2
    reads the size from the file. Read from each file's header now, as viewed; a json giving some
    images' sizes and not others' is still refused (a mistake, not a convention)."""
    write_coco(tmp_path, with_images=True)
    data = json.loads((tmp_path / "ann.json").read_text())
    sizes = {img["id"]: (img["height"], img["width"]) for img in data["images"]}
    for img in data["images"]:
        del img["height"], img["width"]
    (tmp_path / "ann.json").write_text(json.dumps(data))
    entry = {"type": "coco", "ann_file": "ann.json", "image_root": "imgs"}
    with caplog.at_level(logging.INFO):
        info = get_dataset(entry, str(tmp_path))
    assert {r["image_id"]: (r["height"], r["width"]) for r in info.records} == sizes
    assert any("gives no image sizes: read from the 3 images' files" in r.getMessage() for r in caplog.records)
    data["images"][0].update(height=80, width=100)
    (tmp_path / "ann.json").write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"image #1 \(id \d+\) has no 'height' field"):
        get_dataset(entry, str(tmp_path))


def test_custom_coco_entry_with_relative_paths(tmp_path):
    write_coco(tmp_path, with_images=True)
    info = get_dataset({"type": "coco", "ann_file": "ann.json", "image_root": "imgs", "name": "mine"}, str(tmp_path))
    assert info.name == "mine" and info.class_names == ["zebra", "apple", "mug"]
    assert info.records[0]["file_name"] == str(tmp_path / "imgs" / "a.png")


def test_a_width_too_small_to_move_x_is_quoted_as_written_and_said_so(tmp_path, caplog):
    """bbox [20, 20, 1e-300, 30]: x + w == x, a box of no area, dropped; the warning quoted it
    as 'bbox [20.0, 20.0, 0.0, 30.0] has a width or height <= 0', not what the file says."""
    annotations = [{"id": 1, "image_id": 1, "category_id": 42, "bbox": [20, 20, 1e-300, 30], "iscrowd": 0},
                   {"id": 2, "image_id": 1, "category_id": 42, "bbox": [10, 20, 30, 40], "iscrowd": 0}]
    ann_file, image_root = write_coco(tmp_path, annotations=annotations)
    with caplog.at_level(logging.WARNING, logger="detection.data.coco"):
        info = load_coco_json(ann_file, image_root)
    assert len(info.records[0]["boxes"]) == 1
    assert "annotation id 1 (image id 1): bbox [20, 20, 1e-300, 30] has a width or height too small to tell from 0 " \
           "at its x or y" in caplog.text
