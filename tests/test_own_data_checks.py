"""Checks of a user's own data sets: test sets checked at startup, a test set
holding a subset of the model's classes scored by name, and the smaller points: the closing
line, a custom ann_file's not-found error, files' modes, no trace of a run that never ran an
iteration, and a config file's typo blamed on the file."""
import dataclasses
import json
import logging
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

from detection.config import ConfigError, load_config
from detection.data import DataError
from detection.data.catalog import get_dataset
from detection.data.shapes import generate_shapes
from detection.evaluation.classes import check_class_names, label_map_for_test_set
from detection.evaluation.inference import relabel
from detection.utils.files import atomic_write
from tests.helpers import tiny_cfg

SHAPES = ["circle", "square", "triangle"]
BASE_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "base.yaml"


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    generate_shapes(root / "shapes", num_train=4, num_val=3, seed=0, image_size=(64, 80))
    return root


def subset_json(data_root, tmp_path, keep) -> dict:
    """shapes_val as a custom COCO entry holding only the categories named in `keep`."""
    data = json.loads((data_root / "shapes" / "annotations" / "instances_val.json").read_text())
    ids = {c["id"] for c in data["categories"] if c["name"] in keep}
    data["categories"] = [c for c in data["categories"] if c["id"] in ids]
    data["annotations"] = [a for a in data["annotations"] if a["category_id"] in ids]
    path = tmp_path / "subset.json"
    path.write_text(json.dumps(data))
    return {"type": "coco", "ann_file": str(path), "image_root": str(data_root / "shapes" / "val"), "name": "mine"}


# ----------------------------------------------------------------------------- a test set's classes

def test_a_subset_of_the_model_classes_is_scored_by_name():
    # the set has the model's 3rd and 1st classes (COCO sorts them by category id)
    assert label_map_for_test_set("mine", ["triangle", "circle"], SHAPES, 3) == [0, 2, 0, 1]
    assert label_map_for_test_set("mine", SHAPES, SHAPES, 3) is None  # the model's own classes: as they are
    out = relabel({"boxes": torch.arange(12.0).reshape(3, 4), "scores": torch.tensor([0.9, 0.8, 0.7]),
                   "labels": torch.tensor([1, 2, 3])}, torch.tensor([0, 2, 0, 1]))
    assert out["labels"].tolist() == [2, 1] and out["scores"].tolist() == pytest.approx([0.9, 0.7])
    assert out["boxes"].tolist() == [[0, 1, 2, 3], [8, 9, 10, 11]]  # the square's detection is left out


@pytest.mark.parametrize("classes, wrong", [(["circle", "squares"], "squares is not"),  # renamed
                                            (["circle", "square", "triangle", "star"], "star is not")])  # extra
def test_a_renamed_or_extra_class_is_still_refused_naming_it(classes, wrong):
    with pytest.raises(ValueError, match=wrong) as err:
        label_map_for_test_set("mine", classes, SHAPES, 3, "the checkpoint x.pth was trained on")
    assert "does not detect" not in str(err.value)  # it detects circle: the old wording said otherwise
    # all its names in another order (a COCO json numbering them otherwise): scored by name
    assert label_map_for_test_set("mine", ["square", "circle", "triangle"], SHAPES, 3) == [0, 2, 1, 3]
    with pytest.raises(ValueError, match="listed twice"):
        label_map_for_test_set("mine", ["square", "circle", "circle"], SHAPES, 3)
    check_class_names("mine", SHAPES, SHAPES, 3)
    # the set has every class of the model and more (a keep_classes model on the whole set): how to score it
    with pytest.raises(ValueError) as err:
        label_map_for_test_set("mine", [*SHAPES, "star"], ["triangle", "circle"], 2)
    assert str(err.value).endswith("to score the model's classes of this set, give its entry keep_classes: "
                                   "[triangle, circle])")
    assert "keep_classes" not in str(pytest.raises(ValueError, label_map_for_test_set, "mine", ["circle", "squares"],
                                                   SHAPES, 3).value)  # a renamed class: no such advice


# ----------------------------------------------------------------------------- smaller points

def test_atomic_write_gives_the_mode_of_other_new_files(tmp_path):
    old = os.umask(0o027)
    try:
        with atomic_write(tmp_path / "new.json") as f:
            f.write("{}")
        (tmp_path / "plain.txt").write_text("x")
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(os.stat(p).st_mode)  # noqa: E731
    assert mode(tmp_path / "new.json") == mode(tmp_path / "plain.txt") == 0o640  # mkstemp's 0600 before
    os.chmod(tmp_path / "new.json", 0o604)
    with atomic_write(tmp_path / "new.json") as f:  # a replaced file keeps its mode
        f.write("{}")
    assert mode(tmp_path / "new.json") == 0o604


def test_a_typo_in_the_config_file_is_the_files_not_the_command_lines(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("solver:\n  base_lrr: 0.1\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, ["solver.max_iter=5"])
    assert str(err.value).startswith(f"{path}: unknown key solver.base_lrr") and "overrides" not in str(err.value)
    with pytest.raises(ConfigError, match=r"\(with key=value overrides\): unknown key solver.max_iterr"):
        load_config(None, ["solver.max_iterr=5"])


def test_a_custom_ann_file_not_found_names_the_field_without_the_built_in_layouts(data_root, tmp_path):
    entry = {"type": "coco", "ann_file": "mine/instances.json", "image_root": str(data_root / "shapes" / "val")}
    with pytest.raises(DataError) as err:
        get_dataset(entry, str(tmp_path))
    message = str(err.value)
    assert f"ann_file 'mine/instances.json': file not found: {tmp_path / 'mine' / 'instances.json'}" in message
    assert f"relative path is taken from datasets.root {tmp_path}: datasets.root=DIR gives another)" in message
    assert "shapes" not in message and "2017" not in message  # the known names' paragraph
    entry = {**entry, "ann_file": str(data_root / "shapes" / "annotations" / "instances_val.json"),
             "image_root": str(tmp_path / "photos")}
    with pytest.raises(DataError, match=f"image_root '{tmp_path / 'photos'}': folder not found"):
        get_dataset(entry, str(tmp_path))


# ----------------------------------------------------------------------------- the run: startup and files

@pytest.mark.slow  # builds the model
def test_a_wrong_test_set_stops_the_run_before_anything_is_written(data_root, tmp_path):
    from detection.engine.trainer import train

    wrong = {"type": "coco", "ann_file": "shapes/annotations/instances_vall.json", "image_root": "shapes/val"}
    with pytest.raises(DataError, match="instances_vall.json"):
        train(tiny_cfg(data_root, tmp_path / "run", **{"datasets.test": [wrong]}))
    assert not (tmp_path / "run").exists()
    renamed = subset_json(data_root, tmp_path, SHAPES)
    data = json.loads(open(renamed["ann_file"]).read())
    data["categories"][0]["name"] = "disc"
    open(renamed["ann_file"], "w").write(json.dumps(data))
    with pytest.raises(ValueError, match="disc is not among the model's classes"):
        train(tiny_cfg(data_root, tmp_path / "run", **{"datasets.test": [renamed]}))
    assert not (tmp_path / "run").exists()


@pytest.mark.slow  # trains
def test_a_subset_test_set_is_evaluated_during_training_by_name(data_root, tmp_path, caplog):
    from detection.engine.trainer import train

    caplog.set_level(logging.INFO, logger="detection")
    entry = subset_json(data_root, tmp_path, ["circle", "triangle"])
    train(tiny_cfg(data_root, tmp_path / "run", **{"datasets.test": [entry], "test.eval_period": 1,
                                                   "solver.max_iter": 1}))
    assert "test set mine: its 2 classes are a subset of the model's 3, scored by name (circle, triangle); " \
           "the detections of square are left out" in caplog.text
    assert "test set mine: 3 images, 2 classes" in caplog.text  # the start summary, by the set's name
    final = tmp_path / "run" / "model_final.pth"
    assert f"training finished at iteration 1: the model is {final.resolve()}" in caplog.text
    mode = lambda p: stat.S_IMODE(os.stat(p).st_mode)  # noqa: E731
    assert mode(final) == mode(tmp_path / "run" / "config.yaml")  # the umask's, as every other file (not 0600)
    evaluated = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert "AP-circle" in evaluated and "AP-triangle" in evaluated and "AP-square" not in evaluated


@pytest.mark.slow  # trains through train_det.main
def test_an_error_mid_run_says_which_checkpoint_it_left_on_its_one_line(data_root, tmp_path, capsys, monkeypatch,
                                                                       restore_logging):
    from detection.engine import trainer
    from tests.helpers import load_tool, tiny_overrides

    from detection.data import DataError

    def broken(*args, **kwargs):  # a user's problem (a project error): one line, exit 2
        raise DataError("the test set went away")

    monkeypatch.setattr(trainer, "evaluate", broken)
    overrides = tiny_overrides(data_root, tmp_path / "run", **{"test.eval_period": 2, "solver.max_iter": 4,
                                                                "solver.checkpoint_period": 1})
    with pytest.raises(SystemExit) as exit_:
        load_tool("train_det").main(["--config", str(BASE_CONFIG), *overrides])
    errors = [x for x in capsys.readouterr().err.split("\n") if x.startswith("error:")]
    last = tmp_path / "run" / "last.pth"
    assert exit_.value.code == 2 and errors == [
        f"error: the test set went away; training stopped at iteration 2, the last good checkpoint {last} "
        "(iteration 2) is kept: --resume continues it"]


@pytest.mark.slow  # builds the model and the loader
def test_a_run_failing_before_its_first_iteration_leaves_no_config_or_event_file(data_root, tmp_path,
                                                                                monkeypatch):
    pytest.importorskip("tensorboard")
    from detection.engine import trainer

    def broken(*args, **kwargs):
        raise ValueError("a bad first batch")

    monkeypatch.setattr(trainer, "forward_losses", broken)
    with pytest.raises(ValueError, match="bad first batch") as err:
        trainer.train(tiny_cfg(data_root, tmp_path / "run", **{"log.tensorboard": True}))
    assert "training stopped at iteration 0, and no checkpoint was written yet" in err.value.__notes__[0]
    assert not (tmp_path / "run").exists()  # config.yaml, the empty event file and the folder are gone
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="bad first batch"):
        trainer.train(tiny_cfg(data_root, tmp_path / "kept", **{"log.tensorboard": True}))
    assert sorted(p.name for p in (tmp_path / "kept").iterdir()) == ["notes.txt"]  # a folder it did not make stays


@pytest.mark.slow  # trains, then evaluates through eval.main twice
def test_eval_scores_a_subset_by_name_with_the_full_sets_per_class_ap(data_root, tmp_path, capsys):
    from detection.engine.trainer import train
    from tests.helpers import load_tool, tiny_overrides

    overrides = tiny_overrides(data_root, tmp_path / "run", **{"solver.max_iter": 2,
                                                               "model.roi_heads.score_thresh_test": 0.0})
    train(load_config(None, overrides))
    eval_tool, weights = load_tool("eval"), str(tmp_path / "run" / "model_final.pth")
    full = tmp_path / "full"
    assert eval_tool.main(["--weights", weights, "--output-dir", str(full), *overrides]) == 0
    entry = subset_json(data_root, tmp_path, ["circle", "triangle"])
    capsys.readouterr()
    assert eval_tool.main(["--weights", weights, "--output-dir", str(tmp_path / "sub"), *overrides,
                           f"datasets.test={json.dumps([entry])}"]) == 0
    assert "test set mine: its 2 classes are a subset of the model's 3, scored by name" in capsys.readouterr().out
    everything = json.loads((full / "shapes_val" / "metrics.json").read_text())
    subset = json.loads((tmp_path / "sub" / "mine" / "metrics.json").read_text())
    assert subset["AP-circle"] == everything["AP-circle"] and subset["AP-triangle"] == everything["AP-triangle"]
    assert "AP-square" not in subset
    # the same detections as on the whole set, the square's (category 2) left out, the others' ids kept
    results = json.loads((tmp_path / "sub" / "mine" / "coco_results.json").read_text())
    whole = json.loads((full / "shapes_val" / "coco_results.json").read_text())
    key = lambda r: (r["image_id"], r["category_id"], tuple(r["bbox"]), r["score"])  # noqa: E731
    assert results and sorted(map(key, results)) == sorted(key(r) for r in whole if r["category_id"] != 2)
    # the whole set with its categories numbered otherwise (circle 1 -> 3, square 2 -> 1, triangle
    # 3 -> 2): scored by name, not refused; each detection keeps its class, under the set's id
    data = json.loads((data_root / "shapes" / "annotations" / "instances_val.json").read_text())
    renumber = {1: 3, 2: 1, 3: 2}
    for item in (*data["categories"], *data["annotations"]):
        item["id" if "name" in item else "category_id"] = renumber[item["id" if "name" in item else "category_id"]]
    (tmp_path / "renumbered.json").write_text(json.dumps(data))
    entry = {**entry, "ann_file": str(tmp_path / "renumbered.json"), "name": "renumbered"}
    assert eval_tool.main(["--weights", weights, "--output-dir", str(tmp_path / "renum"), *overrides,
                           f"datasets.test={json.dumps([entry])}"]) == 0
    assert "test set renumbered: lists the model's classes in another order (square, triangle, circle); " \
        "scored by name" in capsys.readouterr().out
    results = json.loads((tmp_path / "renum" / "renumbered" / "coco_results.json").read_text())
    assert sorted(map(key, results)) == sorted(key({**r, "category_id": renumber[r["category_id"]]}) for r in whole)
    renumbered = json.loads((tmp_path / "renum" / "renumbered" / "metrics.json").read_text())
    assert renumbered.keys() == everything.keys()  # every metric, per class by name (summed in another order)
    assert all(renumbered[k] == everything[k] or renumbered[k] == pytest.approx(everything[k]) for k in everything)


def test_a_class_without_objects_is_named_when_num_classes_disagrees(data_root, tmp_path):
    """A Roboflow export lists its project as category 0 above the real classes: the error said
    "set model.num_classes=4", and following it trained a class that never appears. It now names
    the class without objects and what taking it out leaves (an annotation-tool trial)."""
    from detection.engine.startup import build_train_datasets

    data = json.loads((data_root / "shapes" / "annotations" / "instances_train.json").read_text())
    data["categories"].insert(0, {"id": 0, "name": "shapes-xyz", "supercategory": "none"})
    path = tmp_path / "_annotations.coco.json"
    path.write_text(json.dumps(data))
    entry = {"type": "coco", "ann_file": str(path), "image_root": str(data_root / "shapes" / "train")}
    cfg = tiny_cfg(data_root, tmp_path / "out", **{"datasets.train": [entry], "model.num_classes": 3})
    with pytest.raises(ConfigError) as err:
        build_train_datasets(cfg)
    assert str(err.value).endswith(
        "has 4 classes (shapes-xyz, circle, square, triangle): set model.num_classes=4; 'shapes-xyz' has no object "
        "in the training data: a class the model would learn never to find (an export's project or placeholder "
        "category?), which taking out of the annotation file's categories leaves 3")
    cfg = tiny_cfg(data_root, tmp_path / "out", **{"model.num_classes": 2})  # every class has objects: no more words
    with pytest.raises(ConfigError, match=r"set model.num_classes=3$"):
        build_train_datasets(cfg)
    # trained as it is, the start summary says which classes have nothing to learn from (a long
    # tail's were lost in one line of hundreds of counts: a many-class trial)
    from detection.engine.startup import summary_lines

    cfg = tiny_cfg(data_root, tmp_path / "out", **{"datasets.train": [entry], "model.num_classes": 4})
    lines = summary_lines(cfg, build_train_datasets(cfg), torch.device("cpu"), [])
    assert "1 of the 4 classes have no object to train on (shapes-xyz): the model learns never to find them" in lines
    cfg = tiny_cfg(data_root, tmp_path / "out")
    assert not [x for x in summary_lines(cfg, build_train_datasets(cfg), torch.device("cpu"), []) if "no object" in x]


def test_a_training_set_of_reordered_classes_is_relabelled_and_said_once(data_root, tmp_path, caplog):
    """Two COCO exports numbering the same classes otherwise: taken by name, said once (a trial saw
    the line in the start summary and again before iteration 1: the loader concatenated again)."""
    from detection.data.catalog import concat_datasets
    from detection.engine.startup import build_train_data_loader, build_train_datasets

    data = json.loads((data_root / "shapes" / "annotations" / "instances_train.json").read_text())
    new_id = {c["id"]: 10 - c["id"] for c in data["categories"]}  # circle 1 -> 9: the order reversed
    for item in data["categories"] + data["annotations"]:
        key = "id" if "name" in item else "category_id"
        item[key] = new_id[item[key]]
    path = tmp_path / "reordered.json"
    path.write_text(json.dumps(data))
    entry = {"type": "coco", "ann_file": str(path), "image_root": str(data_root / "shapes" / "train"), "name": "re"}
    cfg = tiny_cfg(data_root, tmp_path / "out", **{"datasets.train": ["shapes_train", entry]})
    with caplog.at_level(logging.INFO, logger="detection.data.catalog"):
        datasets = build_train_datasets(cfg)
        build_train_data_loader(cfg, datasets)
        concat_datasets(datasets)
    assert caplog.text.count("re lists the classes of shapes_train in another order (triangle, square, circle)") == 1
    first, again = datasets
    assert again.class_names == first.class_names
    assert [r["labels"].tolist() for r in again.records] == [r["labels"].tolist() for r in first.records]


def test_repeat_factor_sampling_is_said_at_the_start_and_its_threshold_checked(data_root, tmp_path):
    """dataloader.repeat_threshold: the start summary says how many images repeat, by how much at
    most, and the epoch the schedule's epoch count is of; a threshold outside [0, 1] is refused."""
    from detection.data.loader import repeat_factors, training_records
    from detection.engine.startup import build_train_datasets, summary_lines

    cfg = tiny_cfg(data_root, tmp_path / "out", **{"dataloader.repeat_threshold": 1.0, "solver.max_iter": 10})
    datasets = build_train_datasets(cfg)
    kept = training_records(datasets[0].records, filter_empty=True, use_difficult=True)
    # by hand (a review: the expected figures came from repeat_factors itself): of the 4 images, circle
    # is in all (r 1), triangle in the first and third (f 1/2, r sqrt(2)), square in the last (f 1/4, r 2)
    assert [sorted(set(r["labels"].tolist())) for r in kept] == [[1, 3], [1], [1, 3], [1, 2]]
    np.testing.assert_allclose(repeat_factors(kept, 1.0), [2 ** 0.5, 1, 2 ** 0.5, 2])
    lines = summary_lines(cfg, datasets, torch.device("cpu"), [])
    assert ("repeat factor sampling (dataloader.repeat_threshold 1): 3 of the 4 images repeated, up to 2x; an "
            "epoch about 6 images") in lines  # 2 sqrt(2) + 1 + 2 = 5.83
    assert any(line.endswith("10 iterations: 3.43 epochs of the 4 training images (repeated as above)")
               for line in lines), lines  # 10 x 2 / 5.83
    assert not [x for x in summary_lines(tiny_cfg(data_root, tmp_path / "out"), datasets, torch.device("cpu"), [])
                if "repeat factor" in x]
    # a threshold under every class's share (LVIS's 0.001 on a small set): nothing repeats, and why
    low = tiny_cfg(data_root, tmp_path / "out", **{"dataloader.repeat_threshold": 0.001})
    assert ("repeat factor sampling (dataloader.repeat_threshold 0.001): no image repeated: the rarest class is in "
            "1 of the 4 images (0.25 of them), not under the threshold, a share of the images") in \
        summary_lines(low, datasets, torch.device("cpu"), [])
    empty = [dataclasses.replace(datasets[0], records=[{**r, "boxes": r["boxes"][:0], "labels": r["labels"][:0]}
                                                       for r in datasets[0].records])]
    unfiltered = tiny_cfg(data_root, tmp_path / "out", **{"dataloader.repeat_threshold": 0.5,
                                                           "dataloader.filter_empty": False})
    assert "repeat factor sampling (dataloader.repeat_threshold 0.5): no image repeated: no image holds an object" \
        in summary_lines(unfiltered, empty, torch.device("cpu"), [])
    with pytest.raises(ConfigError, match=r"dataloader.repeat_threshold: 2.0 is invalid, expected in \[0, 1\], a share "
                                          r"of the training images, not a count"):
        load_config(None, ["dataloader.repeat_threshold=2"])
