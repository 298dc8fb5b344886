"""COCO-style box metrics with pycocotools' COCOeval, on any COCO-format data set.

Detections are written in the standard results format, `[{image_id, category_id, bbox:
[x, y, w, h], score}]` with the data set's own category ids, to `coco_results.json`;
COCOeval then scores exactly that list, restricted to the images that were processed.
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import math
import os
from collections import defaultdict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from detection.evaluation.inference import order_by_dataset, to_numpy

if TYPE_CHECKING:
    from detection.data.dataset_info import DatasetInfo

logger = logging.getLogger(__name__)

RESULTS_FILE = "coco_results.json"
# COCOeval.stats[0:9] in order; APs/APm/APl: small (< 32^2 px), medium, large (> 96^2 px) objects
SUMMARY_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100")


class COCOEvaluator:
    """Collects detections as COCO results and reports COCOeval's numbers in percent.

    `evaluate()` returns the SUMMARY_KEYS and "AP-<class>" (AP@[.50:.95], area all, 100
    detections). A number pycocotools cannot define (no ground truth of that class or
    size among the evaluated images: its -1) is nan. With no detections at all, every
    defined number is 0. After it, `pr_curves[class] = (recall thresholds, precision)`:
    COCOeval's interpolated precision at IoU 0.5 over its 101 recall points.
    """

    def __init__(self, dataset: DatasetInfo, output_dir: str | None = None) -> None:
        if not dataset.ann_file:
            raise ValueError(f"data set {dataset.name}: COCO evaluation needs the annotation json (ann_file)")
        self.dataset = dataset
        self.output_dir = output_dir
        self._coco_gt: COCO | None = None  # read once, on the first evaluate
        self.reset()

    def reset(self) -> None:
        self.predictions: list[dict[str, Any]] = []  # {"image_id", "instances": [result dicts]} per image
        self.pr_curves: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def process(self, records: Sequence[dict], outputs: Sequence[dict]) -> None:
        """Convert each image's XYXY detections to COCO results with the json's category ids."""
        if len(records) != len(outputs):
            raise ValueError(f"process: {len(records)} records but {len(outputs)} outputs")
        to_category = self.dataset.label_to_category_id
        for record, output in zip(records, outputs):
            boxes = to_numpy(output["boxes"], np.float64).reshape(-1, 4)
            scores = to_numpy(output["scores"], np.float64).reshape(-1).tolist()
            labels = to_numpy(output["labels"], np.int64).reshape(-1).tolist()
            instances = []
            for (x1, y1, x2, y2), score, label in zip(boxes.tolist(), scores, labels):
                if label not in to_category:
                    raise ValueError(f"image {record['image_id']}: predicted label {label} has no category id "
                                     f"(data set {self.dataset.name} has labels 1..{len(to_category)})")
                instances.append({"image_id": record["image_id"], "category_id": int(to_category[label]),
                                  "bbox": [x1, y1, x2 - x1, y2 - y1], "score": score})
            self.predictions.append({"image_id": record["image_id"], "instances": instances})

    def load_results(self, path: str) -> None:
        """Use a COCO results json (a list of {image_id, category_id, bbox, score}) as the
        detections on every image of the data set."""
        results = read_results_json(path)
        by_image: dict[Any, list] = defaultdict(list)
        known = {r["image_id"] for r in self.dataset.records}
        for index, result in enumerate(results):
            if result["image_id"] not in known:
                raise ValueError(f"{path}: result {index} has image_id {result['image_id']!r}, "
                                 f"which is not an image of data set {self.dataset.name}")
            by_image[result["image_id"]].append(result)
        self.reset()
        self.predictions = [{"image_id": r["image_id"], "instances": by_image.get(r["image_id"], [])}
                            for r in self.dataset.records]

    def evaluate(self) -> dict[str, float]:
        """Write coco_results.json (when there is an output_dir) and run COCOeval on it."""
        predictions = order_by_dataset(self.predictions, self.dataset.records)
        results = [inst for p in predictions for inst in p["instances"]]
        if self.output_dir:
            os.makedirs(self.output_dir, exist_ok=True)
            with open(os.path.join(self.output_dir, RESULTS_FILE), "w") as f:
                json.dump(results, f)
        image_ids = sorted({p["image_id"] for p in predictions})
        if not image_ids:
            logger.warning("%s: no images were processed, nothing to evaluate", self.dataset.name)
        elif not results:
            logger.warning("%s: no detections on %d images", self.dataset.name, len(image_ids))
        coco_eval = run_cocoeval(self._ground_truth(), results, image_ids)
        metrics = {key: _percent(coco_eval.stats[i]) for i, key in enumerate(SUMMARY_KEYS)}
        metrics.update(self._per_class(coco_eval))
        return metrics

    def _ground_truth(self) -> COCO:
        if self._coco_gt is None:
            if not os.path.isfile(self.dataset.ann_file):
                raise ValueError(f"annotation file not found: {self.dataset.ann_file}")
            with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
                self._coco_gt = COCO(self.dataset.ann_file)
        return self._coco_gt

    def _per_class(self, coco_eval: COCOeval) -> dict[str, float]:
        """AP-<class> (IoU .50:.95) and the PR curve at IoU .5 of every class of the data set."""
        precision = coco_eval.eval["precision"]  # (T iou, R recall, K class, A area, M max dets); -1: no gt
        index_of = {cat_id: k for k, cat_id in enumerate(coco_eval.params.catIds)}
        metrics, self.pr_curves = {}, {}
        for label, name in enumerate(self.dataset.class_names, start=1):
            k = index_of.get(self.dataset.label_to_category_id.get(label))
            values = precision[:, :, k, 0, -1] if k is not None else np.zeros((0,))
            defined = values[values > -1]
            metrics[f"AP-{name}"] = float(defined.mean() * 100) if defined.size else math.nan
            if k is not None and (precision[0, :, k, 0, -1] > -1).any():
                self.pr_curves[name] = (np.asarray(coco_eval.params.recThrs), precision[0, :, k, 0, -1].copy())
        return metrics


def run_cocoeval(coco_gt: COCO, results: list[dict], image_ids: Sequence[Any]) -> COCOeval:
    """COCOeval(iouType="bbox") of `results` on `image_ids`, summarized; its printout is logged."""
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        coco_dt = _load_results(coco_gt, results)
        coco_eval = COCOeval(coco_gt, coco_dt, iouType="bbox")
        coco_eval.params.imgIds = list(image_ids)
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    logger.info("COCOeval:\n%s", output.getvalue())
    return coco_eval


def _load_results(coco_gt: COCO, results: list[dict]) -> COCO:
    if results:
        return coco_gt.loadRes([dict(r) for r in results])  # loadRes adds keys to the dicts it gets
    # loadRes fails on an empty list; an empty results set scores 0 wherever there is ground truth
    coco_dt = COCO()
    coco_dt.dataset = {"images": list(coco_gt.dataset.get("images", [])), "annotations": [],
                       "categories": copy.deepcopy(coco_gt.dataset.get("categories", []))}
    coco_dt.createIndex()
    return coco_dt


def read_results_json(path: str) -> list[dict]:
    """A COCO results file, checked enough that errors name the file and the entry."""
    try:
        with open(path) as f:
            results = json.load(f)
    except OSError as err:
        raise ValueError(f"{path}: cannot read the results file ({err.strerror})") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid json ({err})") from None
    if not isinstance(results, list):
        raise ValueError(f"{path}: expected a COCO results list [{{image_id, category_id, bbox, score}}, ...]")
    for index, result in enumerate(results):
        ok = isinstance(result, dict) and {"image_id", "category_id", "bbox", "score"} <= result.keys()
        if not ok or not (isinstance(result["bbox"], list) and len(result["bbox"]) == 4):
            raise ValueError(f"{path}: result {index} is not {{image_id, category_id, bbox: [x, y, w, h], score}}")
    return results


def _percent(stat: float) -> float:
    return float(stat) * 100.0 if stat > -1 else math.nan
