"""Catalog: known names, explicit entries, relative paths, concatenation checks."""
import json
import logging

import numpy as np
import pytest

from detection.data import KNOWN_DATASETS, DataError, DatasetInfo, concat_datasets, get_dataset, get_datasets


def tiny_coco(root, ann="a/ann.json", images="a/img"):
    (root / ann).parent.mkdir(parents=True, exist_ok=True)
    (root / images).mkdir(parents=True, exist_ok=True)
    data = {"images": [{"id": 1, "file_name": "x.jpg", "height": 10, "width": 10}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 2, 2], "iscrowd": 0}],
            "categories": [{"id": 1, "name": "thing"}]}
    (root / ann).write_text(json.dumps(data))
    (root / images / "x.jpg").write_bytes(b"not decoded here")  # get_dataset checks it exists, non-empty


def test_a_reader_repeating_an_image_id_is_refused(tmp_path, monkeypatch):
    # evaluation keeps one result per image id: two records of one id would be scored as one
    from detection.data import catalog

    def reader(spec, root, name, skip, exif):  # a new format's reader: a.jpg and a.png share the stem
        records = [{"file_name": str(tmp_path / f"a.{ext}"), "image_id": "a", "height": 4, "width": 4,
                    "boxes": np.zeros((0, 4), np.float32), "labels": np.zeros(0, np.int64)} for ext in ("jpg", "png")]
        return DatasetInfo(name=name, kind="voc", class_names=["x"], records=records)

    monkeypatch.setitem(catalog.LOADERS, "voc", reader)
    with pytest.raises(DataError, match=r"data set mine: 1 image ids name more than one record \(a\): each image "
                                        r"needs its own image_id"):
        get_dataset({"type": "voc", "root": ".", "split": "val", "name": "mine"}, str(tmp_path), check_images=False)


def test_unknown_name_lists_the_known_names(tmp_path):
    with pytest.raises(DataError) as err:
        get_dataset("voc_2099_trainval", str(tmp_path))
    message = str(err.value)
    assert "voc_2099_trainval" in message
    for name in ("coco_2017_train", "coco_2017_val", "voc_2007_trainval", "voc_2007_test", "voc_2012_trainval",
                 "shapes_train", "shapes_val", "shapes_test"):
        assert name in message and name in KNOWN_DATASETS


def test_explicit_entry_keys_are_checked(tmp_path):
    with pytest.raises(DataError, match=r"field annfile: unknown key \(did you mean ann_file\?\)"):
        get_dataset({"type": "coco", "annfile": "x.json", "ann_file": "x", "image_root": "y"}, str(tmp_path))
    with pytest.raises(DataError, match="field split: missing; a voc entry takes type, root, split"):
        get_dataset({"type": "voc", "root": "VOC2007"}, str(tmp_path))
    with pytest.raises(DataError, match="'darknet' is not a data set type; valid types: coco .* or voc"):
        get_dataset({"type": "darknet"}, str(tmp_path))
    with pytest.raises(DataError, match="name or a mapping"):
        get_dataset(42, str(tmp_path))
    with pytest.raises(DataError, match="use_07_metric: expected true or false, got 'no'"):
        get_dataset({"type": "voc", "root": "VOC2007", "split": "test", "use_07_metric": "no"}, str(tmp_path))


def test_entry_fields_are_one_table_used_by_catalog_and_config():
    from detection.config import load_config
    from detection.data.catalog import ENTRY_FIELDS, entry_problem

    for kind, (required, optional) in ENTRY_FIELDS.items():
        assert "type" in required and not set(required) & set(optional)
    for name, spec in KNOWN_DATASETS.items():  # the known names are valid explicit entries too
        assert entry_problem(name) is None and entry_problem(spec) is None
    cfg = load_config(None, ["datasets.test=[{type: voc, root: r, split: s, " + ", ".join(
        f"{k}: {v}" for k, v in {"name": "n", "classes": "[a]", "use_07_metric": "true"}.items()) + "}]"])
    assert entry_problem(cfg.datasets.test[0]) is None


def test_relative_paths_under_root_absolute_kept(tmp_path):
    tiny_coco(tmp_path / "root")
    rel = get_dataset({"type": "coco", "ann_file": "a/ann.json", "image_root": "a/img"}, str(tmp_path / "root"))
    assert rel.records[0]["file_name"] == str(tmp_path / "root" / "a" / "img" / "x.jpg")
    assert rel.name == "coco:ann"
    absolute = get_dataset({"type": "coco", "ann_file": str(tmp_path / "root" / "a" / "ann.json"),
                            "image_root": str(tmp_path / "root" / "a" / "img")}, "/elsewhere")
    assert absolute.records[0]["file_name"] == rel.records[0]["file_name"]


def test_known_shapes_name_and_skip_flag(tmp_path):
    tiny_coco(tmp_path, ann="shapes/annotations/instances_val.json", images="shapes/val")
    (info,) = get_datasets(["shapes_val"], str(tmp_path), skip_bad_images=True)
    assert info.name == "shapes_val" and info.skip_bad_images
    assert info.records[0]["file_name"] == str(tmp_path / "shapes" / "val" / "x.jpg")
    with pytest.raises(DataError, match="make_shapes"):  # a missing shapes set says how to create it
        get_dataset("shapes_train", str(tmp_path))


def _info(name, classes, n):
    recs = [{"file_name": f"{name}{i}", "image_id": i, "height": 1, "width": 1, "boxes": np.zeros((0, 4), np.float32),
             "labels": np.zeros(0, np.int64), "difficult": np.zeros(0, bool)} for i in range(n)]
    return DatasetInfo(name=name, kind="voc", class_names=classes, records=recs)


def test_concat_checks_classes_and_keeps_order():
    both = concat_datasets([_info("a", ["x", "y"], 2), _info("b", ["x", "y"], 1)])
    assert both.name == "a+b" and [r["file_name"] for r in both.records] == ["a0", "a1", "b0"]
    with pytest.raises(DataError, match="different classes"):
        concat_datasets([_info("a", ["x", "y"], 1), _info("b", ["y", "z"], 1)])
    with pytest.raises(DataError, match="at least one"):
        concat_datasets([])


def test_concat_takes_a_sets_labels_by_name_when_it_lists_the_classes_in_another_order(caplog):
    """Two COCO exports numbering the same categories otherwise: b's label 1 is "y", a's 2."""
    a, b = _info("a", ["x", "y", "z"], 1), _info("b", ["y", "z", "x"], 1)
    b.records[0]["labels"] = np.array([1, 2, 3, 1], np.int64)  # y z x y
    b.records[0]["annotated"] = {"labels": np.array([3, 1], np.int64)}  # x y
    with caplog.at_level(logging.INFO, logger="detection.data.catalog"):
        both = concat_datasets([a, b])
    assert both.class_names == ["x", "y", "z"] and both.records[1]["labels"].tolist() == [2, 3, 1, 2]
    assert both.records[1]["annotated"]["labels"].tolist() == [1, 2]
    assert b.records[0]["labels"].tolist() == [1, 2, 3, 1]  # the set itself is left as it was
    assert "b lists the classes of a in another order (y, z, x): its labels are taken by name" in caplog.text
    with pytest.raises(DataError, match="different classes"):
        concat_datasets([a, _info("c", ["y", "y", "x"], 1)])


def test_concat_of_other_classes_says_how_to_make_them_one():
    """A pseudo-label json listing a class no box has, or lacking one the teacher never found: the
    error gave both class lists only, not the fix (keep_classes; the category added)."""
    labelled = _info("labelled", ["circle", "square"], 2)
    extra = _info("extra", ["circle", "square", "star"], 2)
    extra.records[0]["labels"] = np.array([1, 2], np.int64)
    with pytest.raises(DataError, match=r"extra has \['circle', 'square', 'star'\]; extra has star besides \(with no "
                                        r"object\): give its entry keep_classes: \[circle, square\]$"):
        concat_datasets([labelled, extra])
    extra.records[1]["labels"] = np.array([3], np.int64)  # a star: kept_classes would drop it, said by keep_only
    with pytest.raises(DataError, match=r"extra has star besides: give its entry keep_classes: \[circle, square\]$"):
        concat_datasets([labelled, extra])
    with pytest.raises(DataError, match=r"; labelled lacks star: add it to its categories \(a category with no object "
                                        r"is fine"):
        concat_datasets([extra, labelled])
    with pytest.raises(DataError, match=r"; other has star besides \(with no object\); other lacks square: add it"
                                        r".*so do it only if none is\), then give its entry keep_classes: "
                                        r"\[circle, square\]$"):  # both steps, in their order
        concat_datasets([labelled, _info("other", ["circle", "star"], 1)])
