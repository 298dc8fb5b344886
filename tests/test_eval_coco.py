"""COCO evaluation through pycocotools on a tiny json with non-contiguous category ids."""
from __future__ import annotations

import contextlib
import io
import json
import re
import math

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from detection.data.catalog import DatasetInfo
from detection.evaluation import COCOEvaluator, build_evaluator, format_metrics_table
from detection.evaluation.coco import SUMMARY_KEYS
from tests.helpers import evaluate_results_file

CATEGORIES = [(3, "circle"), (7, "square"), (42, "triangle")]
# image id -> [(category id, x, y, w, h)]; small (< 32^2), medium and large objects in each image
OBJECTS = {
    10: [(3, 10, 10, 20, 20), (7, 60, 40, 50, 50), (42, 20, 90, 120, 100)],
    20: [(7, 5, 5, 25, 25), (42, 100, 20, 60, 60), (3, 30, 70, 110, 110)],
    30: [(42, 150, 150, 20, 20), (3, 10, 10, 60, 40), (7, 40, 60, 150, 120)],
}


@pytest.fixture
def dataset(tmp_path) -> DatasetInfo:
    images = [{"id": i, "file_name": f"{i}.jpg", "width": 200, "height": 200} for i in OBJECTS]
    anns = [{"id": n, "image_id": i, "category_id": c, "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0}
            for n, (i, (c, x, y, w, h)) in enumerate(((i, o) for i in OBJECTS for o in OBJECTS[i]), start=1)]
    # a crowd region: not a target; detections on it are ignored by COCOeval
    anns.append({"id": 99, "image_id": 10, "category_id": 3, "bbox": [150, 150, 40, 40], "area": 1600,
                 "iscrowd": 1, "segmentation": {"counts": [0, 40000], "size": [200, 200]}})
    ann_file = tmp_path / "instances_tiny.json"
    ann_file.write_text(json.dumps({"images": images, "annotations": anns,
                                    "categories": [{"id": c, "name": n} for c, n in CATEGORIES]}))
    label_of = {c: k + 1 for k, (c, _) in enumerate(CATEGORIES)}
    records = [{"file_name": f"/nonexistent/{i}.jpg", "image_id": i, "height": 200, "width": 200,
                "boxes": np.array([[x, y, x + w, y + h] for _, x, y, w, h in objs], dtype=np.float32),
                "labels": np.array([label_of[c] for c, *_ in objs], dtype=np.int64),
                "difficult": np.zeros(len(objs), bool)} for i, objs in OBJECTS.items()]
    return DatasetInfo(name="tiny", kind="coco", class_names=[n for _, n in CATEGORIES], records=records,
                       ann_file=str(ann_file), label_to_category_id={label_of[c]: c for c, _ in CATEGORIES})


def _outputs_equal_to_gt(records):
    return [{"boxes": torch.from_numpy(r["boxes"]), "scores": torch.ones(len(r["boxes"])),
             "labels": torch.from_numpy(r["labels"])} for r in records]


def _noisy_outputs(records, seed=0):
    """Jittered ground truth, some with the wrong class, plus spurious boxes."""
    rng = np.random.default_rng(seed)
    outputs = []
    for r in records:
        boxes = r["boxes"] + rng.normal(0, 6, r["boxes"].shape).astype(np.float32)
        boxes = np.concatenate([boxes, rng.uniform(0, 100, (2, 2)).repeat(2, axis=1) + [[0, 0, 30, 30]]])
        labels = np.concatenate([r["labels"], rng.integers(1, 4, 2)])
        labels[0] = labels[0] % 3 + 1
        outputs.append({"boxes": torch.tensor(boxes, dtype=torch.float32),
                        "scores": torch.tensor(rng.random(len(boxes)), dtype=torch.float32),
                        "labels": torch.tensor(labels)})
    return outputs


def _evaluate(dataset, outputs, output_dir=None, records=None):
    evaluator = build_evaluator(dataset, output_dir)
    assert isinstance(evaluator, COCOEvaluator)
    evaluator.process(records or dataset.records, outputs)
    return evaluator.evaluate(), evaluator


def _cocoeval_directly(ann_file, results_file, image_ids):
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(ann_file))
        ev = COCOeval(gt, gt.loadRes(str(results_file)), iouType="bbox")
        ev.params.imgIds = image_ids
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev


def test_ground_truth_is_read_as_the_data_set_was_whatever_the_locale(dataset, tmp_path):
    """COCOeval's ground truth was read by pycocotools' COCO(path): in the locale's encoding (an
    ASCII locale failed on non-ASCII class names at a run's first evaluation, past every check)
    and refusing a UTF-8 byte-order mark the reader accepts. Both files score the same here."""
    text = open(dataset.ann_file, encoding="utf-8").read().replace('"circle"', '"cercle \u00e9 \u5186"')
    with open(dataset.ann_file, "wb") as f:
        f.write(b"\xef\xbb\xbf" + text.encode("utf-8"))  # the name in UTF-8, as json.dumps(ensure_ascii=False)
    metrics, _ = _evaluate(dataset, _outputs_equal_to_gt(dataset.records))
    assert metrics["AP"] == pytest.approx(100.0)


def test_predictions_equal_to_ground_truth_give_100(dataset, tmp_path):
    metrics, evaluator = _evaluate(dataset, _outputs_equal_to_gt(dataset.records), str(tmp_path))
    for key in ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR10", "AR100", "AP-circle", "AP-square", "AP-triangle"):
        assert metrics[key] == pytest.approx(100.0), key
    assert set(evaluator.pr_curves) == {"circle", "square", "triangle"}
    recall, precision = evaluator.pr_curves["square"]
    assert len(recall) == 101 and precision.min() == pytest.approx(1.0)


def test_results_file_uses_the_datasets_category_ids_and_xywh(dataset, tmp_path):
    _evaluate(dataset, _outputs_equal_to_gt(dataset.records), str(tmp_path))
    results = json.loads((tmp_path / "coco_results.json").read_text())
    assert len(results) == 9 and {r["category_id"] for r in results} == {3, 7, 42}
    first = results[0]
    assert first["image_id"] == 10 and first["category_id"] == 3
    assert first["bbox"] == pytest.approx([10, 10, 20, 20]) and first["score"] == pytest.approx(1.0)


def test_no_predictions_give_zero_without_crashing(dataset, tmp_path):
    empty = {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64)}
    metrics, _ = _evaluate(dataset, [empty] * 3, str(tmp_path))
    assert {k: metrics[k] for k in SUMMARY_KEYS} == dict.fromkeys(SUMMARY_KEYS, 0.0)
    assert metrics["AP-circle"] == 0.0
    assert json.loads((tmp_path / "coco_results.json").read_text()) == []


def test_printed_ap_equals_cocoeval_on_the_written_results(dataset, tmp_path):
    metrics, _ = _evaluate(dataset, _noisy_outputs(dataset.records), str(tmp_path))
    direct = _cocoeval_directly(dataset.ann_file, tmp_path / "coco_results.json", [10, 20, 30])
    assert 0 < metrics["AP"] < 100
    for i, key in enumerate(SUMMARY_KEYS):
        assert metrics[key] == direct.stats[i] * 100, key
    table = format_metrics_table(metrics)
    assert f"{direct.stats[0] * 100:.2f}" in table and "triangle" in table and "0.50:0.95" in table
    # per-class AP: COCOeval's precision of that category (area all, 100 detections)
    k = direct.params.catIds.index(42)
    precision = direct.eval["precision"][:, :, k, 0, -1]
    assert metrics["AP-triangle"] == pytest.approx(precision[precision > -1].mean() * 100)


def test_per_class_ap50_equals_cocoeval_of_that_category_alone(dataset, tmp_path):
    """AP50-<class> (a COCO-type custom set's users ask AP at IoU 0.5 per class, VOC's measure): the
    AP50 pycocotools gives when it evaluates that one category."""
    metrics, _ = _evaluate(dataset, _noisy_outputs(dataset.records), str(tmp_path))
    values = []
    for category, name in CATEGORIES:
        with contextlib.redirect_stdout(io.StringIO()):
            gt = COCO(str(dataset.ann_file))
            ev = COCOeval(gt, gt.loadRes(str(tmp_path / "coco_results.json")), iouType="bbox")
            ev.params.imgIds, ev.params.catIds = [10, 20, 30], [category]
            ev.evaluate(), ev.accumulate(), ev.summarize()
        assert metrics[f"AP50-{name}"] == pytest.approx(ev.stats[1] * 100, abs=1e-9), name
        values.append(ev.stats[1] * 100)
    assert len(set(values)) > 1  # the classes differ: not one number copied
    table = format_metrics_table(metrics)
    summary, per_class = table.split("per-class AP (IoU 0.50:0.95, AP50 at 0.5):")
    assert "AP50-" not in summary  # per class, not among the summary numbers
    assert f"triangle  {metrics['AP-triangle']:6.2f}  {metrics['AP50-triangle']:6.2f}" in per_class, table


def test_the_table_lists_a_class_named_with_a_slash_among_the_classes():
    """'1/2 inch bolt' (a product catalogue) was printed among the summary numbers, and left out
    of the per-class table, with and without a test set's prefix (a many-class trial)."""
    for prefix in ("", "prod_val/"):
        table = format_metrics_table({f"{prefix}AP": 50.0, f"{prefix}AP-1/2 inch bolt": 10.0, f"{prefix}AP-nut": 20.0})
        summary, per_class = table.split("per-class AP")
        assert "bolt" not in summary and "1/2 inch bolt   10.00" in per_class and "nut" in per_class, table
    assert "undefined" not in table


def test_the_table_says_what_a_class_s_undefined_ap_means():
    """A long-tail trial: a rare class absent from the test set showed '-' with no word why."""
    import math

    table = format_metrics_table({"AP": 40.0, "AP-circle": 50.0, "AP-tri_small": math.nan, "AP50-circle": 70.0,
                                  "AP50-tri_small": math.nan})
    assert re.search(r"tri_small +- +-", table), table
    assert table.splitlines()[-1] == ("-: undefined, the set has no object of tri_small that the metric scores (crowd "
                                      "regions and VOC difficult objects are not)")


def test_a_json_without_iscrowd_or_area_is_scored_as_if_they_were_0_and_the_box_area(dataset, tmp_path, caplog):
    """Converters often leave out 'iscrowd' and 'area', which COCOeval reads (a KeyError from deep
    inside pycocotools at the first evaluation): the same metrics as the json with iscrowd 0 and
    area = w x h, and one warning. (The crowd region is dropped: without iscrowd it is an object.)"""
    import dataclasses
    import logging

    data = json.loads(open(dataset.ann_file).read())
    data["annotations"] = [a for a in data["annotations"] if not a["iscrowd"]]
    full = tmp_path / "full.json"
    full.write_text(json.dumps(data))
    for ann in data["annotations"]:
        del ann["iscrowd"], ann["area"]
    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps(data))
    outputs = _noisy_outputs(dataset.records)
    expected, _ = _evaluate(dataclasses.replace(dataset, ann_file=str(full)), outputs)
    with caplog.at_level(logging.WARNING, logger="detection.evaluation.coco"):
        metrics, _ = _evaluate(dataclasses.replace(dataset, ann_file=str(bare)), outputs)
    assert metrics == expected  # APs / APm / APl too: the areas are the boxes'
    assert "9 annotations have no 'iscrowd' (scored as 0: not a crowd) and 9 no 'area'" in caplog.text


def test_a_test_json_without_annotations_says_why_every_metric_is_undefined(dataset, tmp_path, caplog):
    import dataclasses
    import logging

    data = json.loads(open(dataset.ann_file).read())
    del data["annotations"]
    bare = tmp_path / "no_annotations.json"
    bare.write_text(json.dumps(data))
    with caplog.at_level(logging.WARNING, logger="detection.evaluation.coco"):
        metrics, _ = _evaluate(dataclasses.replace(dataset, ann_file=str(bare)), _noisy_outputs(dataset.records))
    assert math.isnan(metrics["AP"]) and "no_annotations.json holds no ground-truth objects" in caplog.text


def test_a_test_json_of_crowd_regions_only_says_why_every_metric_is_undefined(dataset, tmp_path, caplog):
    """COCOeval ignores crowd regions: a set of them only scores nothing; that was said for a json
    without annotations but not for this one (an extreme-inputs trial: a table of '-', no word)."""
    import dataclasses
    import logging

    data = json.loads(open(dataset.ann_file).read())
    for ann in data["annotations"]:
        ann["iscrowd"] = 1
    crowd = tmp_path / "crowd_only.json"
    crowd.write_text(json.dumps(data))
    with caplog.at_level(logging.WARNING, logger="detection.evaluation.coco"):
        metrics, _ = _evaluate(dataclasses.replace(dataset, ann_file=str(crowd)), _noisy_outputs(dataset.records))
    assert math.isnan(metrics["AP"])
    count = len(data["annotations"])
    assert f"crowd_only.json holds no ground-truth objects on the evaluated images but {count} crowd regions " \
           "(iscrowd: 1)" in caplog.text and "evaluation server" not in caplog.text
    caplog.clear()
    data["annotations"][0]["iscrowd"] = 0  # one object: scored, nothing said
    crowd.write_text(json.dumps(data))
    with caplog.at_level(logging.WARNING, logger="detection.evaluation.coco"):
        metrics, _ = _evaluate(dataclasses.replace(dataset, ann_file=str(crowd)), _noisy_outputs(dataset.records))
    assert not math.isnan(metrics["AP"]) and "no ground-truth objects" not in caplog.text


def test_only_processed_images_are_evaluated(dataset):
    # perfect on images 10 and 20; image 30 was not run, so its objects are not misses
    metrics, _ = _evaluate(dataset, _outputs_equal_to_gt(dataset.records[:2]), records=dataset.records[:2])
    assert metrics["AP"] == pytest.approx(100.0)


def test_evaluate_results_file_matches_and_checks_the_file(dataset, tmp_path):
    metrics, _ = _evaluate(dataset, _noisy_outputs(dataset.records, seed=1), str(tmp_path))
    again = evaluate_results_file(dataset, str(tmp_path / "coco_results.json"))
    assert all(again[k] == metrics[k] or (math.isnan(again[k]) and math.isnan(metrics[k])) for k in metrics)
    # re-saved by a Windows tool: with a UTF-8 byte-order mark the same numbers; UTF-16 named
    text = (tmp_path / "coco_results.json").read_text()
    (tmp_path / "bom.json").write_bytes(b"\xef\xbb\xbf" + text.encode())
    again = evaluate_results_file(dataset, str(tmp_path / "bom.json"))
    assert all(again[k] == metrics[k] or (math.isnan(again[k]) and math.isnan(metrics[k])) for k in metrics)
    (tmp_path / "u16.json").write_text(text, encoding="utf-16")
    with pytest.raises(ValueError, match=r"u16.json: not UTF-8 text \(byte 0\) \(it is UTF-16 text"):
        evaluate_results_file(dataset, str(tmp_path / "u16.json"))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"image_id": 10, "bbox": [1, 2, 3, 4], "score": 0.5}]))
    with pytest.raises(ValueError, match="bad.json: result 0"):
        evaluate_results_file(dataset, str(bad))
    bad.write_text(json.dumps([{"image_id": 11, "category_id": 3, "bbox": [1, 2, 3, 4], "score": 0.5}]))
    with pytest.raises(ValueError, match="image_id 11"):
        evaluate_results_file(dataset, str(bad))


def test_results_covering_part_of_the_images_are_scored_on_all_and_say_so(dataset, tmp_path, caplog):
    """Results made on a subset of a set's images, scored on the whole set, count the other images
    as all missed: a lower AP with exit 0 (a trial: 2.55 on the 10 images, 0.79 on the 40). The
    count is said; results on every image say nothing."""
    _evaluate(dataset, _noisy_outputs(dataset.records, seed=1), str(tmp_path))
    every = json.loads((tmp_path / "coco_results.json").read_text())
    part = tmp_path / "part.json"
    part.write_text(json.dumps([r for r in every if r["image_id"] == 10]))
    def said():
        return [r.getMessage() for r in caplog.records if "no detection on" in r.getMessage()]

    with caplog.at_level("WARNING", logger="detection.evaluation.test_sets"):
        evaluate_results_file(dataset, str(tmp_path / "coco_results.json"))
        assert not said()
        evaluate_results_file(dataset, str(part))
    assert said() == [
        f"{part}: the results have no detection on 2 of the 3 images of tiny: they are scored as finding nothing "
        "there (right if the model found nothing; results made on a subset of the images are scored on that "
        "subset alone, as its own test set)"]


def test_build_evaluator_rejects_unknown_kinds(dataset):
    dataset.kind = "kitti"
    with pytest.raises(ValueError, match="kitti"):
        build_evaluator(dataset, None)
