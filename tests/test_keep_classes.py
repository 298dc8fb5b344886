"""keep_classes: a data-set entry trained and scored on some of its classes (MMDetection's
`classes=(...)`), the other classes' objects left out, scored as pycocotools scores a json that
holds only the kept categories."""
from __future__ import annotations

import contextlib
import io
import json
import logging
import re

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from detection.config import ConfigError, load_config
from detection.data import DataError
from detection.data.catalog import entry_name, get_dataset
from detection.data.voc import VOC_CLASSES
from detection.evaluation import build_evaluator
from detection.evaluation.coco import SUMMARY_KEYS
from detection.evaluation.report import read_detections
from tests.helpers import evaluate_results_file

CATEGORIES = [(3, "circle"), (7, "square"), (42, "triangle")]
OBJECTS = {  # image id -> [(category id, x, y, w, h)]; image 30 has squares only
    10: [(3, 10, 10, 20, 20), (7, 60, 40, 50, 50), (42, 20, 90, 120, 100)],
    20: [(7, 5, 5, 25, 25), (42, 100, 20, 60, 60), (3, 30, 70, 110, 110), (42, 10, 150, 30, 30)],
    30: [(7, 40, 60, 150, 120), (7, 10, 10, 40, 40)],
}


def _write_json(path, keep_ids=None) -> str:
    keep_ids = keep_ids or {c for c, _ in CATEGORIES}
    images = [{"id": i, "file_name": f"{i}.jpg", "width": 200, "height": 200} for i in OBJECTS]
    anns = [{"id": n, "image_id": i, "category_id": c, "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0}
            for n, (i, (c, x, y, w, h)) in enumerate(((i, o) for i in OBJECTS for o in OBJECTS[i]), start=1)
            if c in keep_ids]
    path.write_text(json.dumps({"images": images, "annotations": anns,
                                "categories": [{"id": c, "name": n} for c, n in CATEGORIES if c in keep_ids]}))
    return str(path)


def _entry(tmp_path, **extra) -> dict:
    (tmp_path / "images").mkdir(exist_ok=True)
    return {"type": "coco", "ann_file": _write_json(tmp_path / "instances_tiny.json"),
            "image_root": str(tmp_path / "images"), **extra}


def _noisy_outputs(dataset, seed=0):
    """Each image's objects of every category, jittered, one with another class, two spurious."""
    rng = np.random.default_rng(seed)
    label_of = {c: label for label, c in dataset.label_to_category_id.items()}
    outputs = []
    for image_id, objs in OBJECTS.items():
        boxes = np.array([[x, y, x + w, y + h] for _, x, y, w, h in objs], np.float32)
        boxes = np.concatenate([boxes + rng.normal(0, 4, boxes.shape), [[0, 0, 30, 30], [150, 100, 190, 190]]])
        # a detection of a left-out class is labelled as the kept class of the same index: a model's
        # own false positives of that class
        labels = [label_of.get(c, 1) for c, *_ in objs] + [1, dataset.num_classes]
        labels[0] = labels[0] % dataset.num_classes + 1
        outputs.append({"boxes": torch.tensor(boxes, dtype=torch.float32),
                        "scores": torch.tensor(rng.random(len(boxes)), dtype=torch.float32),
                        "labels": torch.tensor(labels)})
    return outputs


def _cocoeval(ann_file, results) -> np.ndarray:
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(ann_file)
        ev = COCOeval(gt, gt.loadRes(results), iouType="bbox")
        ev.params.imgIds = sorted(OBJECTS)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats


def test_the_kept_classes_are_scored_as_pycocotools_scores_a_json_of_them_alone(tmp_path):
    """Triangle and circle of three: their objects only, labels in keep_classes' order, the json's
    category ids in the results; every COCOeval number equal to pycocotools' on a json holding only
    those two categories (the square's objects, left in COCOeval's categories, made AP fall)."""
    dataset = get_dataset(_entry(tmp_path, keep_classes=["triangle", "circle"]), str(tmp_path), check_images=False)
    assert dataset.class_names == ["triangle", "circle"] and dataset.label_to_category_id == {1: 42, 2: 3}
    assert [r["labels"].tolist() for r in dataset.records] == [[2, 1], [1, 2, 1], []]
    np.testing.assert_array_equal(dataset.records[0]["boxes"], [[10, 10, 30, 30], [20, 90, 140, 190]])
    assert dataset.records[2]["boxes"].shape == (0, 4)  # squares only: kept, with nothing to find

    evaluator = build_evaluator(dataset, str(tmp_path / "out"))
    evaluator.process(dataset.records, _noisy_outputs(dataset))
    metrics = evaluator.evaluate()
    results = json.loads((tmp_path / "out" / "coco_results.json").read_text())
    assert {r["category_id"] for r in results} == {3, 42}
    alone = _write_json(tmp_path / "alone.json", keep_ids={3, 42})
    expected = _cocoeval(alone, str(tmp_path / "out" / "coco_results.json"))
    got = [metrics[key] for key in SUMMARY_KEYS]
    assert got == pytest.approx([100 * v for v in expected], abs=1e-9)  # all twelve
    assert 0 < metrics["AP"] < 100 and set(k for k in metrics if k.startswith("AP-")) == {"AP-triangle", "AP-circle"}
    # the same results scored over the json's three categories: the square's AP 0 in the mean
    assert _cocoeval(str(tmp_path / "instances_tiny.json"), results)[0] * 100 == pytest.approx(metrics["AP"] * 2 / 3)


def test_a_results_file_of_every_class_is_scored_on_the_kept_ones(tmp_path):
    """--results with detections of a left-out category (a model of all 80 COCO classes scored on a
    person-only entry): those are not scored, one line says so; a category the json lacks is still
    refused."""
    whole = get_dataset(_entry(tmp_path), str(tmp_path), check_images=False)
    evaluator = build_evaluator(whole, str(tmp_path / "whole"))
    evaluator.process(whole.records, _noisy_outputs(whole))
    evaluator.evaluate()
    results = json.loads((tmp_path / "whole" / "coco_results.json").read_text())
    assert 7 in {r["category_id"] for r in results}
    kept = get_dataset(_entry(tmp_path, keep_classes=["circle", "triangle"], name="kept"), str(tmp_path),
                       check_images=False)
    metrics = evaluate_results_file(kept, str(tmp_path / "whole" / "coco_results.json"))
    alone = _write_json(tmp_path / "alone.json", keep_ids={3, 42})
    expected = _cocoeval(alone, [r for r in results if r["category_id"] != 7])
    assert metrics["AP"] == pytest.approx(100 * expected[0], abs=1e-9)
    # the report's counts read the same file: the square's detections are not false positives of a "class 0"
    found = read_detections(kept, str(tmp_path / "whole" / "coco_results.json"))
    labels = np.concatenate([d["labels"] for d in found.values()])
    assert sorted(labels.tolist()) == sorted({3: 1, 42: 2}[r["category_id"]] for r in results if r["category_id"] != 7)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{**results[0], "category_id": 99}]))
    with pytest.raises(DataError, match="category_id 99, which is not a category of data set kept"):
        evaluate_results_file(kept, str(bad))


def test_results_rescored_against_a_json_numbering_the_classes_otherwise_are_scored_by_name(tmp_path, caplog):
    """A growing-data trial: week 2's results folder re-scored (eval.py --results) against week 3's
    json, whose categories are numbered otherwise, scored circle's detections against square's
    ground truth without a word. coco_categories.json beside coco_results.json names its ids."""
    whole = get_dataset(_entry(tmp_path), str(tmp_path), check_images=False)
    evaluator = build_evaluator(whole, str(tmp_path / "whole"))
    evaluator.process(whole.records, _noisy_outputs(whole))
    expected = evaluator.evaluate()
    assert json.loads((tmp_path / "whole" / "coco_categories.json").read_text()) == {
        "categories": [{"id": 3, "name": "circle"}, {"id": 7, "name": "square"}, {"id": 42, "name": "triangle"}]}
    results = str(tmp_path / "whole" / "coco_results.json")
    # the same objects, the categories renumbered: circle 7, square 3, triangle 5
    new_ids = {3: 7, 7: 3, 42: 5}
    moved = tmp_path / "moved"
    moved.mkdir()
    coco = json.loads((tmp_path / "instances_tiny.json").read_text())
    coco["categories"] = [{**c, "id": new_ids[c["id"]]} for c in coco["categories"]]
    coco["annotations"] = [{**a, "category_id": new_ids[a["category_id"]]} for a in coco["annotations"]]
    (moved / "instances_tiny.json").write_text(json.dumps(coco))
    renumbered = get_dataset({"type": "coco", "ann_file": str(moved / "instances_tiny.json"),
                              "image_root": str(tmp_path / "images"), "name": "renumbered"}, str(tmp_path),
                             check_images=False)
    with caplog.at_level("WARNING"):
        metrics = evaluate_results_file(renumbered, results)
    assert {k: metrics[k] for k in expected} == pytest.approx(expected, nan_ok=True)  # per class too
    assert "written for a json numbering the categories otherwise (circle 3 -> 7, square 7 -> 3, triangle 42 -> 5): " \
           "scored by name" in caplog.text
    found = read_detections(renumbered, results)  # the report's counts and visualize.py --results, alike
    before = read_detections(whole, results)
    assert renumbered.class_names == ["square", "triangle", "circle"]  # labels in ascending category id
    for i in before:  # each detection the class it was
        assert [renumbered.class_names[k - 1] for k in found[i]["labels"]] == \
            [whole.class_names[k - 1] for k in before[i]["labels"]]
    # with keep_classes too: a left-out class's results are matched by name, then left out (a review: circle's
    # id 3 now names square, and circle, not among the kept classes, was refused as gone)
    kept = get_dataset({"type": "coco", "ann_file": str(moved / "instances_tiny.json"), "name": "kept",
                        "image_root": str(tmp_path / "images"), "keep_classes": ["square", "triangle"]}, str(tmp_path),
                       check_images=False)
    metrics = evaluate_results_file(kept, results)
    for key in ("AP-square", "AP-triangle", "AP50-square", "AP50-triangle"):
        assert metrics[key] == pytest.approx(expected[key])
    labels = np.concatenate([d["labels"] for d in read_detections(kept, results).values()])
    assert sorted(labels.tolist()) == sorted({"square": 1, "triangle": 2}[whole.class_names[k - 1]]
                                             for d in before.values() for k in d["labels"]
                                             if whole.class_names[k - 1] != "circle")
    # without the file (another tool's results) the ids are taken as they are, as pycocotools does
    (tmp_path / "whole" / "coco_categories.json").rename(tmp_path / "aside.json")
    with pytest.raises(DataError, match=r"has category_id 42, which is not a category of data set renumbered"):
        evaluate_results_file(renumbered, results)
    # a class renamed since: its id now names another class, and its name none: refused
    (tmp_path / "aside.json").rename(tmp_path / "whole" / "coco_categories.json")
    coco["categories"] = [{**c, "name": {"circle": "disc"}.get(c["name"], c["name"])} for c in coco["categories"]]
    (moved / "instances_tiny.json").write_text(json.dumps(coco))
    renamed = get_dataset({"type": "coco", "ann_file": str(moved / "instances_tiny.json"), "name": "renamed",
                           "image_root": str(tmp_path / "images")}, str(tmp_path), check_images=False)
    with pytest.raises(DataError, match=r"coco_results.json: written for classes of which circle is not in data set "
                                        r"renamed's json, whose category ids now name 3 square, 5 triangle, 7 disc"):
        evaluate_results_file(renamed, results)


def test_a_name_not_among_the_sets_classes_names_the_field_and_the_closest(tmp_path):
    with pytest.raises(DataError, match=r"field keep_classes: 'triangel' is not one of its 3 classes \(did you mean "
                                        r"triangle\?\) \(circle, square, triangle; in .*instances_tiny.json\)"):
        get_dataset(_entry(tmp_path, keep_classes=["circle", "triangel"]), str(tmp_path), check_images=False)


@pytest.mark.parametrize("value", [[], "circle", ["circle", "circle"], [1]])
def test_a_wrong_keep_classes_value_is_refused_when_the_config_is_read(tmp_path, value):
    entry = json.dumps([{"type": "coco", "ann_file": "a.json", "image_root": "images", "keep_classes": value}])
    with pytest.raises(ConfigError, match="keep_classes: expected a list of distinct class names"):
        load_config(None, [f"datasets.test={entry}"])


def test_the_default_name_says_which_classes_are_kept():
    """Its results folder (inference/<name>/) is not the whole set's: one would overwrite the other."""
    entry = {"type": "coco", "ann_file": "annotations/instances_val2017.json", "image_root": "val2017"}
    assert entry_name(entry) == "coco:instances_val2017"
    assert entry_name({**entry, "keep_classes": ["person", "car"]}) == "coco:instances_val2017[person,car]"
    many = [f"class_number_{i}" for i in range(20)]
    name = entry_name({**entry, "keep_classes": many})
    assert re.fullmatch(r"coco:instances_val2017\[class_number_0,class_number_1,\+18,[0-9a-f]{8}\]", name)
    # another list of the same first two and length: another name (a review: they shared a results folder)
    assert entry_name({**entry, "keep_classes": [*many[:-1], "another"]}) != name
    assert entry_name({**entry, "keep_classes": ["car"], "name": "cars"}) == "cars"


def _voc_xml(objects) -> str:
    parts = "".join(f"<object><name>{n}</name><difficult>{d}</difficult><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}"
                    f"</ymin><xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>" for n, b, d in objects)
    return f"<annotation><size><width>60</width><height>40</height><depth>3</depth></size>{parts}</annotation>"


@pytest.mark.parametrize("classes", [list(VOC_CLASSES), None])
def test_a_voc_entry_keeps_its_classes_objects_and_their_devkit_copy(tmp_path, classes, caplog):
    """The VOC devkit scores boxes as annotated (a record's 'annotated' copy, here for a box past the
    image): the left-out class leaves that copy too, or it would count as a miss of another class.
    Without the entry's `classes` the kept ones are its classes and other names' objects are left
    out as they are read (a trial: a custom VOC set's other names were "unknown class name" errors;
    MMDetection's VOC classes=(...) skips them)."""
    root = tmp_path / "VOC2007"
    for sub in ("ImageSets/Main", "Annotations", "JPEGImages"):
        (root / sub).mkdir(parents=True)
    (root / "ImageSets" / "Main" / "test.txt").write_text("000001\n000002\n")
    (root / "Annotations" / "000001.xml").write_text(_voc_xml([("dog", (1, 1, 10, 20), 0),
                                                               ("person", (48, 30, 70, 40), 1),
                                                               ("cat", (5, 5, 9, 9), 0)]))
    (root / "Annotations" / "000002.xml").write_text(_voc_xml([("dog", (2, 2, 30, 30), 0)]))
    entry = {"type": "voc", "root": str(root), "split": "test", "keep_classes": ["person", "cat"],
             **({"classes": classes} if classes else {})}
    dataset = get_dataset(entry, str(tmp_path), check_images=False)
    assert dataset.name == "voc:VOC2007_test[person,cat]" and dataset.class_names == ["person", "cat"]
    assert dataset.label_to_category_id == {1: 1, 2: 2} and dataset.use_07_metric
    first, second = dataset.records
    assert first["labels"].tolist() == [1, 2] and first["difficult"].tolist() == [True, False]
    np.testing.assert_array_equal(first["boxes"], [[47, 29, 60, 40], [4, 4, 9, 9]])  # clipped to the image
    assert first["annotated"]["labels"].tolist() == [1, 2]
    np.testing.assert_array_equal(first["annotated"]["boxes"], [[47, 29, 70, 40], [4, 4, 9, 9]])
    assert second["labels"].tolist() == [] and second["boxes"].shape == (0, 4)
    if classes:  # a name the set's classes do not have: refused
        with pytest.raises(DataError, match=r"'persn' is not one of its 20 classes \(did you mean person\?\)"):
            get_dataset({**entry, "keep_classes": ["persn"]}, str(tmp_path), check_images=False)
    else:  # no object named so: said, with the closest name found
        (root / "Annotations" / "000002.xml").write_text(_voc_xml([("dog", (2, 2, 30, 30), 0),
                                                                   ("Dog", (2, 2, 9, 9), 0)]))
        caplog.clear()
        caplog.set_level(logging.INFO, logger="detection.data.voc")
        get_dataset({**entry, "keep_classes": ["person", "dgo"]}, str(tmp_path), check_images=False)
        assert "no object is named dgo (keep_classes) (did you mean dog?); the other names found: dog, cat, Dog" \
            in caplog.text
        assert "4 objects of classes not kept left out (dog 2, cat 1, Dog 1)" in caplog.text
        # an object without a <name> is no other class: still an error (a review)
        (root / "Annotations" / "000002.xml").write_text(_voc_xml([("", (2, 2, 30, 30), 0)]))
        with pytest.raises(DataError, match=r"object #0 \(no <name>\) has unknown class name ''"):
            get_dataset({**entry, "keep_classes": ["person"]}, str(tmp_path), check_images=False)


@pytest.mark.slow  # trains 2 iterations, then three evaluations through eval.main
def test_a_detector_of_some_classes_trains_evaluates_and_reports_through_the_tools(tmp_path, capsys):
    """Trained on an entry keeping 2 of shapes' 3 classes: its checkpoint names them; eval.py scores it
    on the same entry of shapes_val; a whole-set detector's results file scored on that entry gives
    that entry's AP for both classes, and its report counts no detection of the left-out class."""
    from detection.data.shapes import generate_shapes
    from detection.engine.loading import read_detector_file
    from detection.engine.trainer import train
    from tests.helpers import load_tool, tiny_overrides

    generate_shapes(tmp_path / "data" / "shapes", num_train=4, num_val=3, seed=0, image_size=(64, 80))
    shapes = tmp_path / "data" / "shapes"

    def entry(split: str) -> dict:
        return {"type": "coco", "ann_file": str(shapes / "annotations" / f"instances_{split}.json"),
                "image_root": str(shapes / split), "keep_classes": ["triangle", "circle"]}

    overrides = tiny_overrides(tmp_path / "data", tmp_path / "run", **{
        "solver.max_iter": 2, "model.roi_heads.score_thresh_test": 0.0, "model.num_classes": 2,
        "datasets.train": [entry("train")], "datasets.test": [entry("val")]})
    train(load_config(None, overrides))
    weights = str(tmp_path / "run" / "model_final.pth")
    assert read_detector_file(weights).class_names == ["triangle", "circle"]
    eval_tool = load_tool("eval")
    assert eval_tool.main(["--weights", weights, "--output-dir", str(tmp_path / "ev"), *overrides]) == 0
    folder = tmp_path / "ev" / "coco_instances_val_triangle_circle_"  # the set's name as a folder name
    metrics = json.loads((folder / "metrics.json").read_text())
    assert {k for k in metrics if k.startswith("AP-")} == {"AP-triangle", "AP-circle"}
    assert {r["category_id"] for r in json.loads((folder / "coco_results.json").read_text())} <= {1, 3}

    # a detector of all three classes, scored on the whole set, then its results on the kept two
    whole = tiny_overrides(tmp_path / "data", tmp_path / "whole", **{"solver.max_iter": 2,
                                                                     "model.roi_heads.score_thresh_test": 0.0})
    train(load_config(None, whole))
    assert eval_tool.main(["--weights", str(tmp_path / "whole" / "model_final.pth"), "--output-dir",
                           str(tmp_path / "all"), *whole]) == 0
    results = tmp_path / "all" / "shapes_val" / "coco_results.json"
    assert 2 in {r["category_id"] for r in json.loads(results.read_text())}  # the square's detections
    capsys.readouterr()
    assert eval_tool.main(["--results", str(results), "--config", str(tmp_path / "run" / "config.yaml"),
                           "--output-dir", str(tmp_path / "scored"), *overrides]) == 0
    assert "results of the categories data set coco:instances_val[triangle,circle] leaves out" in \
        capsys.readouterr().err
    scored = tmp_path / "scored" / "coco_instances_val_triangle_circle_"
    kept_metrics = json.loads((scored / "metrics.json").read_text())
    everything = json.loads((tmp_path / "all" / "shapes_val" / "metrics.json").read_text())
    assert kept_metrics["AP-triangle"] == everything["AP-triangle"]
    assert kept_metrics["AP"] == pytest.approx((everything["AP-triangle"] + everything["AP-circle"]) / 2)
    report = (tmp_path / "scored" / "report.html").read_text()
    assert "triangle" in report and "square" not in report and "class 0" not in report


def test_results_without_one_of_the_sets_classes_are_said_when_scored(tmp_path, caplog):
    """A trial re-scored a keep_classes evaluation's results on the whole set: the square, which has
    objects there, scored AP 0 and the mean fell to 49 from 78, without a word."""
    kept = get_dataset(_entry(tmp_path, keep_classes=["circle", "triangle"], name="kept"), str(tmp_path),
                       check_images=False)
    evaluator = build_evaluator(kept, str(tmp_path / "kept"))
    evaluator.process(kept.records, _noisy_outputs(kept))
    evaluator.evaluate()
    whole = get_dataset(_entry(tmp_path), str(tmp_path), check_images=False)
    results = str(tmp_path / "kept" / "coco_results.json")
    evaluate_results_file(whole, results)
    assert (f"{results}: no detection of square, which has objects in data set coco:instances_tiny: scored as AP 0 "
            "in its mean. Were these results made for some of its classes (keep_classes)") in caplog.text
    caplog.clear()
    evaluate_results_file(kept, results)  # every class with objects has results: nothing said
    assert "no detection of" not in caplog.text


def test_a_voc_results_folder_without_a_class_file_is_said_when_scored(tmp_path, caplog):
    root = tmp_path / "VOC2007"
    for sub in ("ImageSets/Main", "Annotations", "JPEGImages"):
        (root / sub).mkdir(parents=True)
    (root / "ImageSets" / "Main" / "test.txt").write_text("000001\n")
    (root / "Annotations" / "000001.xml").write_text(_voc_xml([("dog", (1, 1, 10, 20), 0), ("cat", (5, 5, 9, 9), 0)]))
    dataset = get_dataset({"type": "voc", "root": str(root), "split": "test", "classes": ["cat", "dog"]},
                          str(tmp_path), check_images=False)
    results = tmp_path / "results"
    results.mkdir()
    (results / "comp4_det_test_dog.txt").write_text("000001 0.9 1 1 10 20\n")  # no cat file: no cat detections
    metrics = evaluate_results_file(dataset, str(results))
    assert metrics["AP-dog"] == pytest.approx(100) and metrics["AP-cat"] == 0
    assert f"{results}: no detection of cat, which has objects in data set voc:VOC2007_test" in caplog.text
