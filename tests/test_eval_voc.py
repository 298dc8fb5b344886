"""VOC evaluation against the official devkit's rules (VOCevaldet.m, VOCap.m)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from detection.data.catalog import DatasetInfo
from detection.evaluation import (VOCEvaluator, build_evaluator, eval_class,
                                  format_metrics_table, inference_on_dataset, save_metrics_json, voc_ap)
from tests.helpers import evaluate_results_file, run_forked_processes

CLASSES = ["cat", "dog"]


def _record(image_id: str, boxes, labels, difficult=None) -> dict:
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    return {"file_name": f"/nonexistent/{image_id}.jpg", "image_id": image_id, "height": 200, "width": 200,
            "boxes": boxes, "labels": np.asarray(labels, dtype=np.int64),
            "difficult": np.zeros(len(boxes), bool) if difficult is None else np.asarray(difficult, bool)}


def _dataset(records: list[dict], use_07_metric: bool = True) -> DatasetInfo:
    return DatasetInfo(name="voc_tiny", kind="voc", class_names=list(CLASSES), records=records,
                       label_to_category_id={1: 1, 2: 2}, root=None, split="test", use_07_metric=use_07_metric)


def _output(boxes, scores, labels) -> dict:
    """What the model returns for one image."""
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "scores": torch.tensor(scores, dtype=torch.float32), "labels": torch.tensor(labels, dtype=torch.int64)}


def _evaluate(dataset: DatasetInfo, outputs: list[dict], output_dir=None) -> tuple[dict, VOCEvaluator]:
    evaluator = build_evaluator(dataset, output_dir)
    assert isinstance(evaluator, VOCEvaluator)
    evaluator.process(dataset.records, outputs)
    return evaluator.evaluate(), evaluator


def _one_class(gt, dets, difficult=None, **kwargs):
    """eval_class on image "a" from a list of (score, box)."""
    scores = np.array([s for s, _ in dets], dtype=np.float64)
    boxes = np.array([b for _, b in dets], dtype=np.float64).reshape(-1, 4)
    diff = None if difficult is None else {"a": np.asarray(difficult, bool)}
    return eval_class({"a": np.asarray(gt, np.float64)}, diff, ["a"] * len(dets), scores, boxes, **kwargs)


# Hand computation for npos = 4 and detections (in score order) TP, FP, TP, FP, FP, TP:
#   cumulative tp 1 1 2 2 2 3, fp 0 1 1 2 3 3
#   recall    .25  .25  .5   .5  .5  .75
#   precision 1    1/2  2/3  1/2 2/5 1/2
# 11-point: t = 0, .1, .2 -> max precision at recall >= t = 1; t = .3, .4, .5 -> 2/3;
#   t = .6, .7 -> 1/2; t = .8, .9, 1 -> 0 (recall never gets there).
#   AP = (3 * 1 + 3 * 2/3 + 2 * 1/2) / 11 = 6/11.
# Area: envelope (max precision to the right) is 1 on (0, .25], 2/3 on (.25, .5], 1/2 on (.5, .75],
#   0 on (.75, 1]. AP = .25 * 1 + .25 * 2/3 + .25 * 1/2 = 13/24.
HAND_RECALL = [0.25, 0.25, 0.5, 0.5, 0.5, 0.75]
HAND_PRECISION = [1, 1 / 2, 2 / 3, 1 / 2, 2 / 5, 1 / 2]


def test_voc_ap_hand_computed():
    assert voc_ap(np.array(HAND_RECALL), np.array(HAND_PRECISION), use_07_metric=True) == pytest.approx(6 / 11)
    assert voc_ap(np.array(HAND_RECALL), np.array(HAND_PRECISION), use_07_metric=False) == pytest.approx(13 / 24)


def test_area_ap_takes_the_precision_envelope():
    """A mutation audit: the VOC2010+ area AP without its envelope (each precision raised to the
    highest at any larger recall) passed, the hand example's being one already. 2 objects,
    detections FP, TP, TP: recall 0, .5, 1 at precision 0, 1/2, 2/3; the envelope is 2/3 on
    (0, 1]: AP 2/3 (7/12 without it)."""
    assert voc_ap(np.array([0, 0.5, 1]), np.array([0, 0.5, 2 / 3]), use_07_metric=False) == pytest.approx(2 / 3)


def test_11_point_thresholds_are_matlabs_where_recall_is_exactly_six_tenths():
    """VOCevaldet.m's `for t=0:0.1:1`: MATLAB computes the range's second half from its end, so
    its 0.6 is the double nearest 0.6 and a recall of exactly 3/5 reaches it; the Python port's
    np.arange gives 0.6000000000000001 there. 5 positives, detections TP FP TP TP FP FP FP FP
    (with eval_class, from boxes, so recall is computed as the devkit computes it):
    recall .2 .2 .4 .6 .6 .6 .6 .6, precision 1 1/2 2/3 3/4 3/5 1/2 3/7 3/8.
    t = 0, .1, .2 -> 1; t = .3 (0.30000000000000004), .4, .5 -> 3/4; t = .6 -> 3/4 in MATLAB (0 at
    np.arange's threshold); t >= .7 -> 0. AP = (3 + 4 * 3/4) / 11 = 6/11, not (3 + 3 * 3/4) / 11."""
    gt = {k: np.array([[0, 0, 10, 10]], float) for k in range(5)}
    difficult = {k: np.zeros(1, bool) for k in range(5)}
    tp, fp = [0, 0, 10, 10], [50, 50, 60, 60]
    det_ids = [0, 0, 1, 2, 0, 0, 0, 0]
    boxes = np.array([tp, fp, tp, tp, fp, fp, fp, fp], float)
    scores = np.linspace(1.0, 0.3, len(det_ids))
    result = eval_class(gt, difficult, det_ids, scores, boxes, iou_thresh=0.5, use_07_metric=True)
    assert result.recall[-1] == 3 / 5
    assert result.ap == pytest.approx(6 / 11)
    port = sum(max((p for r, p in zip(result.recall, result.precision) if r >= t), default=0.0)
               for t in np.arange(0.0, 1.1, 0.1)) / 11
    assert port == pytest.approx(5.25 / 11)  # what voc_eval.py (Detectron2) reports for the same detections


def test_eval_class_hand_made_detections_give_hand_computed_ap():
    gt = [[0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50], [60, 60, 70, 70]]  # the last one is missed
    dets = [(0.9, [0, 0, 10, 10]), (0.8, [80, 80, 90, 90]), (0.7, [20, 20, 30, 30]),
            (0.6, [80, 0, 90, 10]), (0.5, [0, 80, 10, 90]), (0.4, [40, 40, 50, 50])]
    shuffled = [dets[i] for i in (3, 0, 5, 1, 4, 2)]  # eval_class sorts by score itself
    for use_07, expected in ((True, 6 / 11), (False, 13 / 24)):
        result = _one_class(gt, shuffled, use_07_metric=use_07)
        np.testing.assert_allclose(result.recall, HAND_RECALL)
        np.testing.assert_allclose(result.precision, HAND_PRECISION)
        assert result.ap == pytest.approx(expected)
        assert result.num_pos == 4


def test_difficult_objects_are_neither_positives_nor_false_positives():
    gt = [[0, 0, 10, 10], [50, 50, 60, 60]]  # the second is difficult
    # the highest-scoring detection hits the difficult object: ignored, not a false positive
    result = _one_class(gt, [(0.9, [50, 50, 60, 60]), (0.8, [0, 0, 10, 10])], difficult=[False, True])
    assert result.num_pos == 1 and result.ap == pytest.approx(1.0)
    np.testing.assert_allclose(result.recall, [0.0, 1.0])
    # missing a difficult object costs no recall
    assert _one_class(gt, [(0.8, [0, 0, 10, 10])], difficult=[False, True]).ap == pytest.approx(1.0)
    # a second detection of a difficult object is still ignored (not a duplicate)
    result = _one_class(gt, [(0.9, [50, 50, 60, 60]), (0.85, [50, 50, 60, 60]), (0.8, [0, 0, 10, 10])],
                        difficult=[False, True])
    assert result.ap == pytest.approx(1.0)


def test_duplicate_detections_are_false_positives_in_score_order():
    gt = [[0, 0, 100, 100], [200, 200, 300, 300]]
    # 0.9 overlaps gt 0 by 0.8 and takes it; 0.8 overlaps it perfectly but comes second: a duplicate
    dets = [(0.9, [0, 0, 100, 80]), (0.8, [0, 0, 100, 100]), (0.7, [200, 200, 300, 300])]
    result = _one_class(gt, dets, use_07_metric=True)
    np.testing.assert_allclose(result.recall, [0.5, 0.5, 1.0])
    np.testing.assert_allclose(result.precision, [1.0, 0.5, 2 / 3])
    # 11-point: t <= .5 -> 1 (6 thresholds), t >= .6 -> 2/3 (5): (6 + 10/3) / 11 = 28/33
    assert result.ap == pytest.approx(28 / 33)
    # area: .5 * 1 + .5 * 2/3 = 5/6
    assert _one_class(gt, dets, use_07_metric=False).ap == pytest.approx(5 / 6)


def test_iou_exactly_half_is_a_match_as_in_the_devkit():
    # devkit numbers: gt (1,1,10,10) -> 10x10 = 100 px; det (1,1,10,5) -> 10x5 = 50 px inside it:
    # IoU = 50 / 100 = 0.5 exactly, and VOCevaldet.m matches on `ovmax >= minoverlap`
    gt = [[0, 0, 10, 10]]  # our 0-based form of the devkit's (1,1,10,10)
    assert _one_class(gt, [(0.9, [0, 0, 10, 5])]).ap == pytest.approx(1.0)
    # (1,1,10,4.9): 49 / 100 < 0.5. Without the conversion to the devkit's numbers, the +1 areas
    # on 0-based boxes would give 11 * 5.9 / 121 = 0.536 and wrongly match.
    assert _one_class(gt, [(0.9, [0, 0, 10, 4.9])]).ap == 0.0


def test_score_ties_keep_input_order_like_matlab_sort():
    gt = [[0, 0, 10, 10]]
    fp, tp = (0.5, [50, 50, 60, 60]), (0.5, [0, 0, 10, 10])
    # FP first: precision 0 then 1/2 at recall 1 -> area AP 0.5; TP first: AP 1
    assert _one_class(gt, [fp, tp], use_07_metric=False).ap == pytest.approx(0.5)
    assert _one_class(gt, [tp, fp], use_07_metric=False).ap == pytest.approx(1.0)
    # with many ties (where numpy's default quicksort reorders): 39 FPs, then the TP -> AP 1/40
    assert _one_class(gt, [fp] * 39 + [tp], use_07_metric=False).ap == pytest.approx(1 / 40)
    assert _one_class(gt, [tp] + [fp] * 39, use_07_metric=False).ap == pytest.approx(1.0)


def _devkit_reference(gt, difficult, det_ids, scores, boxes, thresh):
    """A line-by-line transcription of VOCevaldet.m's loop (1-based devkit numbers in, tp/fp out)."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])  # Python's sort is stable too
    taken = {k: [False] * len(v) for k, v in gt.items()}
    tp, fp = [], []
    for d in order:
        bb, ovmax, jmax = boxes[d], -math.inf, -1
        for j, g in enumerate(gt.get(det_ids[d], [])):
            iw = min(bb[2], g[2]) - max(bb[0], g[0]) + 1
            ih = min(bb[3], g[3]) - max(bb[1], g[1]) + 1
            if iw > 0 and ih > 0:
                ua = (bb[2] - bb[0] + 1) * (bb[3] - bb[1] + 1) + (g[2] - g[0] + 1) * (g[3] - g[1] + 1) - iw * ih
                if iw * ih / ua > ovmax:
                    ovmax, jmax = iw * ih / ua, j
        t = f = 0
        if ovmax >= thresh:
            if not difficult[det_ids[d]][jmax]:
                if not taken[det_ids[d]][jmax]:
                    t, taken[det_ids[d]][jmax] = 1, True
                else:
                    f = 1
        else:
            f = 1
        tp.append(t)
        fp.append(f)
    return np.array(tp), np.array(fp)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_a_transcription_of_the_devkit_on_random_detections(seed):
    rng = np.random.default_rng(seed)
    gt, difficult, det_ids, scores, boxes = {}, {}, [], [], []
    for image in range(6):
        xy = rng.integers(0, 40, size=(rng.integers(0, 5), 2))
        gt[image] = np.concatenate([xy, xy + rng.integers(5, 30, size=xy.shape)], axis=1).astype(float)
        difficult[image] = rng.random(len(xy)) < 0.25
        for _ in range(rng.integers(0, 9)):  # jittered copies of gt (duplicates, near-0.5 overlaps) + noise
            base = gt[image][rng.integers(len(xy))] if len(xy) and rng.random() < 0.8 else np.array([0, 0, 20, 20.])
            det_ids.append(image)
            scores.append(float(rng.integers(0, 6)) / 5)  # coarse scores: plenty of ties
            boxes.append(base + rng.integers(-4, 5, size=4) * 0.5)
    scores, boxes = np.array(scores), np.array(boxes)
    boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2] + 1)
    devkit_gt = {k: [[x1 + 1, y1 + 1, x2, y2] for x1, y1, x2, y2 in v] for k, v in gt.items()}
    devkit_boxes = [[x1 + 1, y1 + 1, x2, y2] for x1, y1, x2, y2 in boxes]
    npos = sum(int((~d).sum()) for d in difficult.values())
    for thresh in (0.5, 0.7):
        tp, fp = _devkit_reference(devkit_gt, difficult, det_ids, scores, devkit_boxes, thresh)
        tp, fp = np.cumsum(tp), np.cumsum(fp)
        result = eval_class(gt, difficult, det_ids, scores, boxes, iou_thresh=thresh, use_07_metric=True)
        np.testing.assert_allclose(result.recall, tp / npos)
        np.testing.assert_allclose(result.precision, tp / np.maximum(tp + fp, np.finfo(float).eps))
        assert result.num_pos == npos


def _three_images() -> list[dict]:
    return [
        _record("000001", [[10, 20, 40, 60], [100, 100, 150, 180]], [1, 2]),
        _record("000002", [[0, 0, 50, 50], [60, 60, 120, 90], [5, 100, 40, 190]], [1, 1, 2], [False, True, False]),
        _record("000003", [], []),
    ]


@pytest.mark.parametrize("use_07_metric", [True, False])
def test_predictions_equal_to_ground_truth_give_100(use_07_metric):
    dataset = _dataset(_three_images(), use_07_metric)
    outputs = [_output(r["boxes"].tolist(), [0.9] * len(r["boxes"]), r["labels"].tolist()) for r in dataset.records]
    metrics, evaluator = _evaluate(dataset, outputs)
    for key in ("mAP", "AP", "AP50", "AP75", "AP-cat", "AP-dog"):
        assert metrics[key] == pytest.approx(100.0), key
    assert metrics["use_07_metric"] == float(use_07_metric)
    assert set(evaluator.pr_curves) == {"cat", "dog"}
    recall, precision = evaluator.pr_curves["cat"]
    assert recall[-1] == pytest.approx(1.0) and precision.min() == pytest.approx(1.0)


def test_no_predictions_give_zero(tmp_path):
    dataset = _dataset(_three_images())
    empty = _output(np.zeros((0, 4)), [], [])
    metrics, _ = _evaluate(dataset, [empty] * 3, str(tmp_path))
    assert {k: metrics[k] for k in ("mAP", "AP", "AP50", "AP75", "AP-cat", "AP-dog")} == dict.fromkeys(
        ("mAP", "AP", "AP50", "AP75", "AP-cat", "AP-dog"), 0.0)
    assert (tmp_path / "comp4_det_test_cat.txt").read_text() == ""


def test_coco_style_ap_averages_iou_thresholds():
    # one object, detected with IoU 0.72 (devkit: 100x72 inside 100x100): a match at thresholds
    # 0.50 .. 0.70 (5 of the 10), a miss from 0.75 on -> AP = 50, AP50 = 100, AP75 = 0
    dataset = _dataset([_record("a", [[0, 0, 100, 100]], [1])])
    metrics, _ = _evaluate(dataset, [_output([[0, 0, 100, 72]], [0.9], [1])])
    assert metrics["AP50"] == pytest.approx(100.0) and metrics["mAP"] == pytest.approx(100.0)
    assert metrics["AP75"] == 0.0
    assert metrics["AP"] == pytest.approx(50.0)


def test_class_without_ground_truth_is_nan_and_left_out_of_the_mean():
    dataset = _dataset([_record("a", [[0, 0, 100, 100]], [1])])
    metrics, evaluator = _evaluate(dataset, [_output([[0, 0, 100, 100], [5, 5, 50, 50]], [0.9, 0.8], [1, 2])])
    assert math.isnan(metrics["AP-dog"])
    assert metrics["mAP"] == pytest.approx(100.0)
    assert "dog" not in evaluator.pr_curves


def test_comp4_files_are_devkit_format_and_reevaluate_to_the_same_metrics(tmp_path):
    dataset = _dataset(_three_images())
    rng = np.random.default_rng(0)
    outputs = []
    for r in dataset.records:  # jittered ground truth plus one spurious box per image
        boxes = np.concatenate([r["boxes"] + rng.normal(0, 4, r["boxes"].shape), [[33.33, 44.44, 99.96, 120.04]]])
        outputs.append(_output(boxes, rng.random(len(boxes)), list(r["labels"]) + [2]))
    outputs[0] = _output([[10, 20, 40, 60]], [0.9], [1])
    metrics, _ = _evaluate(dataset, outputs, str(tmp_path))
    lines = (tmp_path / "comp4_det_test_cat.txt").read_text().splitlines()
    assert lines[0] == "000001 0.900000 11.0 21.0 40.0 60.0"  # 1-based: x1+1, y1+1, x2, y2
    assert "000003 " in (tmp_path / "comp4_det_test_dog.txt").read_text()
    assert "34.3 45.4 100.0 120.0" in (tmp_path / "comp4_det_test_dog.txt").read_text()
    again = evaluate_results_file(dataset, str(tmp_path))
    assert again == metrics
    assert 0 < metrics["mAP"] < 100


def test_a_results_folder_without_lines_for_some_images_says_how_many(tmp_path, caplog):
    """As for a COCO results file: images without a line are scored as finding nothing, and the
    count is said (results made on a subset of the images give a wrong average otherwise)."""
    dataset = _dataset(_three_images())
    names = [r["image_id"] for r in dataset.records]
    (tmp_path / "comp4_det_test_cat.txt").write_text(f"{names[0]} 0.9 11 21 40 60\n")
    with caplog.at_level("WARNING", logger="detection.evaluation.test_sets"):
        evaluate_results_file(dataset, str(tmp_path))
    assert [r.getMessage() for r in caplog.records if "no detection on" in r.getMessage()] == [
        f"{tmp_path}: the results have no detection on 2 of the 3 images of {dataset.name}: they are scored as "
        "finding nothing there (right if the model found nothing; results made on a subset of the images are "
        "scored on that subset alone, as its own test set)"]


def test_a_results_folder_is_scored_as_written_ties_in_file_order_numbers_unrounded(tmp_path):
    """Files from another tool, scored as the devkit reads them. One cat, devkit box 1 1 10 10
    (100 px with the +1 widths), in image 000003, listed after image 000004 (a dog)."""
    dataset = _dataset([_record("000004", [[0, 0, 10, 10]], [2]), _record("000003", [[0, 0, 10, 10]], [1])],
                       use_07_metric=False)

    def cat_ap(*lines: str) -> float:
        (tmp_path / "comp4_det_test_cat.txt").write_text("".join(
            (line if line.startswith("000004") else f"000003 {line}") + "\n" for line in lines))
        return evaluate_results_file(dataset, str(tmp_path))["AP-cat"]

    tp, fp = "1 1 10 10", "51 51 60 60"
    # a tie: the file's order decides (MATLAB's stable sort), not the data set's: FP first ->
    # precision 1/2 at recall 1
    assert cat_ap(f"0.5 {fp}", f"0.5 {tp}") == pytest.approx(50.0)
    assert cat_ap(f"0.5 {tp}", f"0.5 {fp}") == pytest.approx(100.0)
    assert cat_ap(f"0.5 {tp}", f"000004 0.5 {tp}") == pytest.approx(100.0)  # the FP in the image listed first
    assert cat_ap(f"000004 0.5 {tp}", f"0.5 {tp}") == pytest.approx(50.0)
    # scores closer than the 6 decimals eval writes are not a tie
    assert cat_ap(f"0.7000004 {fp}", f"0.7000001 {tp}") == pytest.approx(50.0)
    assert cat_ap(f"0.7000001 {fp}", f"0.7000004 {tp}") == pytest.approx(100.0)
    # coordinates are not rounded to eval's one decimal: 1 1 10 4.96 overlaps 49.6 / 100 = 0.496 < 0.5
    assert cat_ap("0.9 1 1 10 4.96") == 0.0
    assert cat_ap("0.9 1 1 10 5.0") == pytest.approx(100.0)  # 0.5: a match, as in the devkit
    # eval.py --results DIR into DIR rewrites the files with their own lines
    cat_ap(f"0.5 {fp}", f"0.7000001 {tp}")
    before = (tmp_path / "comp4_det_test_cat.txt").read_text()
    _, evaluator = _evaluate(dataset, [_output(np.zeros((0, 4)), [], [])] * 2)
    evaluator.output_dir = str(tmp_path)
    evaluator.load_results(str(tmp_path))
    evaluator.evaluate()
    assert (tmp_path / "comp4_det_test_cat.txt").read_text() == before


def test_results_folder_errors_name_the_problem(tmp_path):
    dataset = _dataset(_three_images())
    with pytest.raises(ValueError, match="no comp4_det_test"):
        evaluate_results_file(dataset, str(tmp_path))
    (tmp_path / "comp4_det_test_cat.txt").write_text("999999 0.5 1 1 10 10\n")
    with pytest.raises(ValueError, match="999999"):
        evaluate_results_file(dataset, str(tmp_path))
    (tmp_path / "comp4_det_test_cat.txt").write_text("000001 0.5 1 1 10\n")
    with pytest.raises(ValueError, match="comp4_det_test_cat.txt:1"):
        evaluate_results_file(dataset, str(tmp_path))
    (tmp_path / "comp4_det_test_cat.txt").write_text("000001 0.5 1 1 10 10\n", encoding="utf-16")
    with pytest.raises(ValueError, match=r"comp4_det_test_cat.txt: not UTF-8 text \(byte 0\) \(it is UTF-16 text"):
        evaluate_results_file(dataset, str(tmp_path))
    (tmp_path / "comp4_det_test_cat.txt").write_bytes(b"\xef\xbb\xbf000001 0.5 1 1 10 10\n")  # a BOM: read as text
    assert evaluate_results_file(dataset, str(tmp_path))["AP-cat"] == 0.0  # (was: image id "\ufeff000001" unknown)


def test_table_names_the_metric_and_json_is_flat(tmp_path):
    dataset = _dataset(_three_images(), use_07_metric=True)
    metrics, _ = _evaluate(dataset, [_output([[10, 20, 40, 60]], [0.9], [1])] + [_output(np.zeros((0, 4)), [], [])] * 2)
    table = format_metrics_table(metrics)
    assert "11-point" in table and "cat" in table and "dog" in table
    assert f"{metrics['mAP']:.2f}" in table
    assert "area" in format_metrics_table({**metrics, "use_07_metric": 0.0})
    save_metrics_json({**metrics, "AP-dog": math.nan}, tmp_path / "sub" / "metrics.json")
    saved = json.loads((tmp_path / "sub" / "metrics.json").read_text())
    assert saved["mAP"] == pytest.approx(metrics["mAP"]) and saved["AP-dog"] is None


class _ReplayModel(torch.nn.Module):
    """Returns prepared outputs in call order; records the mode it ran in."""

    def __init__(self, outputs: list[dict]):
        super().__init__()
        self.outputs, self.calls, self.modes = list(outputs), 0, []
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def forward(self, images):
        self.modes.append((self.training, torch.is_inference_mode_enabled()))
        out = self.outputs[self.calls:self.calls + len(images)]
        self.calls += len(images)
        return out


def test_inference_on_dataset_runs_eval_mode_and_restores_training():
    dataset = _dataset(_three_images())
    outputs = [_output(r["boxes"].tolist(), [0.9] * len(r["boxes"]), r["labels"].tolist()) for r in dataset.records]
    model = _ReplayModel(outputs).train()
    loader = [([torch.zeros(3, 8, 8, dtype=torch.uint8)], [r]) for r in dataset.records]
    metrics = inference_on_dataset(model, loader, build_evaluator(dataset, None))
    assert metrics["mAP"] == pytest.approx(100.0)
    assert model.modes == [(False, True)] * 3 and model.training


def _shard_outputs(records: list[dict]) -> list[dict]:
    """Ground truth as predictions, except nothing on image 000002."""
    return [_output(r["boxes"].tolist(), [0.9] * len(r["boxes"]), r["labels"].tolist())
            if r["image_id"] != "000002" else _output(np.zeros((0, 4)), [], []) for r in records]


def _distributed_worker(rank: int, world: int, init_file: str, out_file: str) -> None:
    import logging

    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    said = logging.FileHandler(f"{out_file}.log.{rank}")
    logger = logging.getLogger("detection.evaluation.inference")
    logger.addHandler(said)
    logger.setLevel(logging.INFO)
    try:
        dataset = _dataset(_three_images())
        shard = dataset.records[rank::world]  # rank 1 gets image 000002
        loader = [([torch.zeros(3, 8, 8, dtype=torch.uint8)], [r]) for r in shard]
        metrics = inference_on_dataset(_ReplayModel(_shard_outputs(shard)), loader,
                                       build_evaluator(dataset, None))
        with open(f"{out_file}.{rank}", "w") as f:
            json.dump(metrics, f)
    finally:
        logger.removeHandler(said)
        said.close()
        torch.distributed.destroy_process_group()


def test_distributed_inference_gathers_on_rank_0(tmp_path):
    out = str(tmp_path / "metrics")
    run_forked_processes(_distributed_worker, (2, str(tmp_path / "init"), out))
    with open(f"{out}.1") as f:
        assert json.load(f) == {}
    with open(f"{out}.0") as f:
        rank0 = json.load(f)
    dataset = _dataset(_three_images())
    expected, _ = _evaluate(dataset, _shard_outputs(dataset.records))
    # image 000002's misses (from rank 1) count: recall 1/2 per class, 6/11 -> 54.5, not rank 0's 100
    assert rank0["mAP"] == pytest.approx(expected["mAP"]) == pytest.approx(600 / 11)
    # the log counts the set's images, not this process's share ("inference: 2 images" read as one left out)
    for rank, mine in ((0, 2), (1, 1)):
        line = (tmp_path / f"metrics.log.{rank}").read_text()
        assert line.startswith("inference: 3 images in ") and line.endswith(f"; {mine} of them in this process, "
                                                                          "one of 2\n"), line


def test_the_pr_plot_titles_a_voc_class_with_the_tables_ap(tmp_path, monkeypatch):
    """Two cats, detections TP .9, FP .8, TP .7: the 11-point AP is (6 + 5 * 2/3) / 11 = 84.8,
    the area 83.3. The plot titled each class with its curve's area (83.3) beside a table
    saying 84.8; it now gets the metrics (COCO's AP-<class> is over IoU .5:.95, not its curve's)."""
    import detection.visualization.plots as plots
    from detection.evaluation import evaluate_test_sets

    dataset = _dataset([_record("000001", [[0, 0, 10, 10], [50, 50, 60, 60]], [1, 1])], use_07_metric=True)
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "comp4_det_test_cat.txt").write_text(
        "000001 0.9 1 1 10 10\n000001 0.8 101 101 110 110\n000001 0.7 51 51 60 60\n")
    given = []
    monkeypatch.setattr(plots, "plot_pr_curves", lambda curves, path, metrics=None: given.append(metrics))
    metrics = evaluate_test_sets([dataset], results=str(tmp_path / "results"), output_dir=tmp_path / "out")
    assert metrics["voc_tiny"]["AP-cat"] == pytest.approx(100 * (6 + 5 * 2 / 3) / 11)
    (titled,) = given
    assert titled["AP-cat"] == metrics["voc_tiny"]["AP-cat"]
    figure = plots.pr_curves_figure({"cat": ([0.5, 0.5, 1.0], [1.0, 0.5, 2 / 3])}, metrics=titled)
    assert figure.axes[0].get_title() == "cat (AP 84.8)"

    # the evaluator says so, not the kind's name: a format of one's own scored by the devkit's rule
    # (docs/ARCHITECTURE.md "Where each kind of change goes": its kind in EVALUATORS) is titled the same
    from detection.evaluation import test_sets

    monkeypatch.setitem(test_sets.EVALUATORS, "my_voc", test_sets.EVALUATORS["voc"])
    dataset.kind = "my_voc"
    given.clear()
    evaluate_test_sets([dataset], results=str(tmp_path / "results"), output_dir=tmp_path / "mine")
    (mine,) = given
    assert mine is not None and mine["AP-cat"] == titled["AP-cat"]


def test_a_results_folder_is_parsed_once_and_scored_as_before(tmp_path, monkeypatch):
    """Reading a comp4 folder checks every line; the detections it feeds the evaluator and the
    scoring reuse that parse (a scale trial: each line was parsed three times here, five with the
    report, 3.5x the time of Detectron2's voc_eval per image)."""
    import detection.evaluation.voc_results as voc_results

    dataset = _dataset(_three_images())
    rng = np.random.default_rng(1)
    outputs = [_output(r["boxes"] + rng.normal(0, 3, r["boxes"].shape), rng.random(len(r["boxes"])), r["labels"])
               for r in dataset.records]
    metrics, _ = _evaluate(dataset, outputs, str(tmp_path))
    calls = []
    real = voc_results.parse_comp4_lines
    monkeypatch.setattr(voc_results, "parse_comp4_lines", lambda lines, source: calls.append(source) or
                        real(lines, source))
    assert evaluate_results_file(dataset, str(tmp_path)) == metrics
    assert sorted(calls) == sorted(str(tmp_path / f"comp4_det_test_{name}.txt") for name in CLASSES)
