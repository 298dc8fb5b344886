"""COCO test-dev: a COCO json without an "annotations" list (image_info_test-dev2017.json) is a
test set without ground truth: it cannot be trained on or scored, and evaluation writes the
results list COCO's evaluation server takes (the json's ids, XYWH in the images' pixels)."""
import json

import cv2
import numpy as np
import pytest
import torch

from detection.data import DataError, concat_datasets, get_dataset
from detection.evaluation import evaluate_test_sets
from tests.helpers import ROOT, load_tool

# image id -> (file, width, height); ids and category ids as COCO's: large, not 1..K
IMAGES = {397133: ("000000397133.jpg", 60, 40), 37777: ("000000037777.jpg", 50, 70)}
CATEGORIES = [{"id": 18, "name": "dog"}, {"id": 3, "name": "car"}]


def make_test_dev(root, *, annotations=None):
    """coco/annotations/image_info_test-dev2017.json and coco/test2017/ (with `annotations`: a copy that has them)."""
    (root / "coco" / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "coco" / "test2017").mkdir(exist_ok=True)
    data = {"images": [{"id": i, "file_name": f, "width": w, "height": h} for i, (f, w, h) in IMAGES.items()],
            "categories": CATEGORIES}
    for file_name, width, height in IMAGES.values():
        cv2.imwrite(str(root / "coco" / "test2017" / file_name), np.full((height, width, 3), 90, np.uint8))
    name = "image_info_test-dev2017.json"
    if annotations is not None:
        data["annotations"] = annotations
        name = "instances_test-dev2017.json"
    (root / "coco" / "annotations" / name).write_text(json.dumps(data))
    return root / "coco" / "annotations" / name


class FixedDetector(torch.nn.Module):
    """The same detections for every image of a given size; labels 1..K in the json's category order."""

    def forward(self, images):
        by_size = {(40, 60): {"boxes": torch.tensor([[2.0, 3.0, 12.0, 23.0]]), "scores": torch.tensor([0.9]),
                              "labels": torch.tensor([2])},  # label 2: category id 18 (dog), sorted ids 3, 18
                   (70, 50): {"boxes": torch.tensor([[0.0, 0.0, 20.0, 30.0], [5.0, 5.0, 10.0, 10.0]]),
                              "scores": torch.tensor([0.8, 0.3]), "labels": torch.tensor([1, 2])}}
        return [by_size[tuple(image.shape[1:])] for image in images]


def test_known_name_reads_images_and_cannot_be_trained_on(tmp_path):
    make_test_dev(tmp_path)
    info = get_dataset("coco_2017_test-dev", str(tmp_path))
    assert info.has_annotations is False and info.kind == "coco" and info.class_names == ["car", "dog"]
    assert [r["image_id"] for r in info.records] == sorted(IMAGES)
    with pytest.raises(DataError, match="cannot train on coco_2017_test-dev: it has no annotations"):
        concat_datasets([info])
    # a json whose "annotations" list is there but empty is an annotated set (scored: every metric undefined)
    assert get_dataset({"type": "coco", "ann_file": str(make_test_dev(tmp_path, annotations=[])),
                        "image_root": str(tmp_path / "coco" / "test2017")}, str(tmp_path)).has_annotations


def test_evaluation_writes_the_servers_results_list_and_no_metric(tmp_path):
    make_test_dev(tmp_path)
    info = get_dataset("coco_2017_test-dev", str(tmp_path))
    messages = []
    out = tmp_path / "inference"
    per_set = evaluate_test_sets([info], model=FixedDetector(), output_dir=out, echo=messages.append)
    assert per_set == {"coco_2017_test-dev": {}}  # nothing to score: no (fake) AP, no COCOeval table of -1
    folder = out / "coco_2017_test-dev"
    results = json.loads((folder / "coco_results.json").read_text())
    assert sorted(results, key=lambda r: (r["image_id"], -r["score"])) == [
        {"image_id": 37777, "category_id": 3, "bbox": [0.0, 0.0, 20.0, 30.0], "score": pytest.approx(0.8)},
        {"image_id": 37777, "category_id": 18, "bbox": [5.0, 5.0, 5.0, 5.0], "score": pytest.approx(0.3)},
        {"image_id": 397133, "category_id": 18, "bbox": [2.0, 3.0, 10.0, 20.0], "score": pytest.approx(0.9)}]
    assert not (folder / "metrics.json").exists()
    said = "\n".join(messages)
    assert "no annotations, so no AP is computed" in said and str(folder / "coco_results.json") in said
    assert "detections_test-dev2017_<name>_results.json" in said and "AP50" not in said

    # the annotations at hand later: the written list scores as the model itself does (pycocotools)
    ann_file = make_test_dev(tmp_path, annotations=[
        {"id": 1, "image_id": 397133, "category_id": 18, "bbox": [2, 3, 10, 20], "area": 200, "iscrowd": 0},
        {"id": 2, "image_id": 37777, "category_id": 3, "bbox": [30, 40, 10, 10], "area": 100, "iscrowd": 0}])
    annotated = get_dataset({"type": "coco", "ann_file": str(ann_file), "name": "coco_2017_test-dev",
                             "image_root": str(tmp_path / "coco" / "test2017")}, str(tmp_path))
    direct = evaluate_test_sets([annotated], model=FixedDetector())["coco_2017_test-dev"]
    saved = evaluate_test_sets([annotated], results=str(out))["coco_2017_test-dev"]
    assert saved == direct and direct["AP-dog"] == pytest.approx(100.0) and direct["AP-car"] == pytest.approx(0.0)


@pytest.mark.slow  # runs tools/eval.py (no model: saved results)
def test_eval_tool_writes_a_submission_and_a_report_without_false_positives(tmp_path, capsys):
    """The report listed every confident detection as a false positive (no ground truth)."""
    make_test_dev(tmp_path)
    saved = tmp_path / "saved.json"
    saved.write_text(json.dumps([{"image_id": 397133, "category_id": 18, "bbox": [2, 3, 10, 20], "score": 0.9}]))
    out = tmp_path / "out"
    code = load_tool("eval").main([
        "--config", str(ROOT / "configs" / "base.yaml"), "--results", str(saved), "--output-dir", str(out),
        f"datasets.root={json.dumps(str(tmp_path))}", "datasets.test=[coco_2017_test-dev]", "model.num_classes=2"])
    printed = capsys.readouterr().out
    assert code == 0
    assert json.loads((out / "coco_2017_test-dev" / "coco_results.json").read_text())[0]["bbox"] == [2, 3, 10, 20]
    assert "detections for the evaluation server written to" in printed and "AP50" not in printed
    section = json.loads((out / "coco_2017_test-dev" / "report_section.json").read_text())
    assert section["metrics"] == {} and section["most_false_positives"] == []
    if (out / "report.html").exists():  # the report extra installed
        assert "No annotations: no metrics" in (out / "report.html").read_text()


def test_an_unreadable_image_of_a_submission_is_named_beside_its_results(tmp_path):
    """A batch-inference trial: with skip_bad_images, a set without annotations wrote no
    skipped_images.json: an unreadable image and one with nothing detected were both simply
    absent from the results."""
    make_test_dev(tmp_path)
    bad = tmp_path / "coco" / "test2017" / IMAGES[37777][0]
    bad.write_bytes(bad.read_bytes()[:400])  # cut short: its header reads, its pixels do not
    info = get_dataset("coco_2017_test-dev", str(tmp_path), skip_bad_images=True)
    messages = []
    evaluate_test_sets([info], model=FixedDetector(), output_dir=tmp_path / "out", echo=messages.append)
    folder = tmp_path / "out" / "coco_2017_test-dev"
    skipped = json.loads((folder / "skipped_images.json").read_text())
    assert skipped["images"] == [{"image_id": 37777, "file_name": str(bad)}]
    assert {r["image_id"] for r in json.loads((folder / "coco_results.json").read_text())} == {397133}
    assert "coco_2017_test-dev (2 images, 1 of them unreadable, skipped (dataloader.skip_bad_images): named in " \
           "skipped_images.json): no annotations" in "\n".join(messages)


def test_visualize_gt_of_a_set_without_annotations_says_there_is_none(tmp_path, capsys):
    """--gt / --compare drew empty ground-truth panels, as if the images held no object (a review)."""
    make_test_dev(tmp_path)
    args = ["--config", str(ROOT / "configs" / "base.yaml"), "--gt", "--output", str(tmp_path / "gt"),
            f"datasets.root={json.dumps(str(tmp_path))}", "--dataset", "coco_2017_test-dev", "model.num_classes=2"]
    try:
        code = load_tool("visualize").main(args)
    except SystemExit as stop:
        code = stop.code
    err = capsys.readouterr().err
    assert code == 2 and "--gt: data set coco_2017_test-dev has no annotations" in err, err
    assert not (tmp_path / "gt").exists() or not list((tmp_path / "gt").iterdir())


def test_a_users_own_unlabelled_set_is_told_of_pseudo_labels_and_a_results_list_as_a_training_json_too(tmp_path):
    """A pseudo-labelling trial: eval.py on a json of its own unlabelled images said only how to
    upload to COCO's server, and that results list given as a training set said 'got a json list'."""
    import shutil

    make_test_dev(tmp_path)
    own = tmp_path / "unlabelled.json"
    shutil.copy(tmp_path / "coco" / "annotations" / "image_info_test-dev2017.json", own)
    info = get_dataset({"type": "coco", "name": "unl", "ann_file": str(own),
                        "image_root": str(tmp_path / "coco" / "test2017")}, str(tmp_path))
    messages = []
    evaluate_test_sets([info], model=FixedDetector(), output_dir=tmp_path / "out", echo=messages.append)
    said = "\n".join(messages)
    assert "for an evaluation server, rename it detections_<split>_<name>_results.json" in said
    assert "to train on them (pseudo-labels), tools/pseudo_labels.py writes visualize.py --no-draw's list" in said
    results = tmp_path / "out" / "unl" / "coco_results.json"
    with pytest.raises(DataError, match=r"coco_results.json: expected a COCO json object .*, got a json list of "
                                        r"detections \(a results file.*tools/pseudo_labels.py"):
        get_dataset({"type": "coco", "name": "r", "ann_file": str(results),
                     "image_root": str(tmp_path / "coco" / "test2017")}, str(tmp_path))
    messages.clear()  # COCO's own test-dev: the server only
    evaluate_test_sets([get_dataset("coco_2017_test-dev", str(tmp_path))], model=FixedDetector(),
                       output_dir=tmp_path / "dev", echo=messages.append)
    assert "pseudo" not in "\n".join(messages) and "for the evaluation server written to" in "\n".join(messages)
