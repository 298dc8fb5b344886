"""COCO-style box metrics with pycocotools' COCOeval, on any COCO-format data set.

Detections are written in the standard results format, `[{image_id, category_id, bbox:
[x, y, w, h], score}]` with the data set's own category ids, to `coco_results.json`;
COCOeval then scores exactly that list, restricted to the images that were processed.

Memory: while the model runs, each image's detections are kept as three small numpy arrays
(about 26 bytes a detection, against about 150 in the results file and about 600 as Python
result dicts), so holding a large test set's detections costs less than the results file
itself; the result dicts exist only while the file is written and COCOeval scores them
(pycocotools keeps its own per-detection records then).
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

from detection.data import DataError
from detection.data.coco import open_coco
from detection.evaluation.classes import classes_without_results
from detection.evaluation.inference import compact_floats, order_by_dataset, to_numpy
from detection.utils.files import USER_TEXT_ENCODING, atomic_write, utf16_hint
from detection.utils.text import first_few

if TYPE_CHECKING:
    from detection.data.dataset_info import DatasetInfo

logger = logging.getLogger(__name__)

RESULTS_FILE = "coco_results.json"
# beside it: the category id -> name of the data set it was written for, so that re-scoring it
# against a json whose categories are numbered otherwise scores by name (a growing-data trial:
# circle's detections were scored against square's ground truth, unsaid)
CATEGORIES_FILE = "coco_categories.json"
# COCOeval.stats in order (all 12); APs/APm/APl, ARs/ARm/ARl: small (< 32^2 px), medium, large (> 96^2 px)
# objects (AR by size at maxDets' last, 100 unless test.coco_max_dets: summary_keys)
SUMMARY_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
COCO_MAX_DETS = 100  # COCOeval's maxDets' last: the detections per image and class AP and AR count


def summary_keys(max_dets: int = COCO_MAX_DETS) -> tuple[str, ...]:
    """SUMMARY_KEYS for COCOeval's maxDets (1, 10, max_dets): AR<max_dets> names its recall at that many
    detections (AR100 at COCO's standard 100; AR1000 when test.coco_max_dets raises it)."""
    return tuple(f"AR{max_dets}" if key == "AR100" else key for key in SUMMARY_KEYS)


class COCOEvaluator:
    """Collects detections as COCO results and reports COCOeval's numbers in percent.

    `evaluate()` returns summary_keys(max_dets), "AP-<class>" (AP@[.50:.95], area all, `max_dets`
    detections per image and class: COCO's 100 unless test.coco_max_dets raises it for crowded images)
    and "AP50-<class>" (the same at IoU .5). A number pycocotools cannot define (no ground truth of that class or
    size among the evaluated images: its -1) is nan. With no detections at all, every
    defined number is 0. After it, `pr_curves[class] = (recall thresholds, precision)`:
    COCOeval's interpolated precision at IoU 0.5 over its 101 recall points.
    """

    curve_ap_in_metrics = False  # AP-<class> is over IoU .5:.95; the PR titles give each curve's (IoU 0.5) own

    def __init__(self, dataset: DatasetInfo, output_dir: str | None = None, max_dets: int = COCO_MAX_DETS) -> None:
        if not dataset.ann_file:
            raise DataError(f"data set {dataset.name}: COCO evaluation needs the annotation json (ann_file)")
        self.dataset = dataset
        self.output_dir = output_dir
        self.max_dets = max_dets
        self._coco_gt: COCO | None = None  # read once, on the first evaluate
        self.reset()

    def reset(self) -> None:
        # per image {"image_id", "boxes" (D,4) XYXY, "scores" (D,), "labels" (D,)} as compact numpy
        # arrays, or {"image_id", "instances": [result dicts]} for results read from a file
        self.predictions: list[dict[str, Any]] = []
        self.pr_curves: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def process(self, records: Sequence[dict], outputs: Sequence[dict]) -> None:
        """Keep each image's XYXY detections as numpy arrays in the model's precision (they
        become COCO results, with the json's category ids, when evaluate writes them). Labels are
        the data set's, 1..K in its class_names order (not the json's category ids); a model's
        labels mean its own classes: evaluate_test_sets maps them by name."""
        if len(records) != len(outputs):
            raise ValueError(f"process: {len(records)} records but {len(outputs)} outputs")
        to_category = self.dataset.label_to_category_id
        for record, output in zip(records, outputs):
            labels = to_numpy(output["labels"], np.int64).reshape(-1)
            unknown = sorted(set(labels.tolist()) - set(to_category))
            if unknown:
                raise ValueError(f"image {record['image_id']}: predicted label {unknown[0]} has no category id "
                                 f"(data set {self.dataset.name} has labels 1..{len(to_category)})")
            self.predictions.append({"image_id": record["image_id"],
                                     "boxes": compact_floats(output["boxes"]).reshape(-1, 4),
                                     "scores": compact_floats(output["scores"]).reshape(-1),
                                     "labels": labels.astype(np.int32)})

    def load_results(self, path: str) -> None:
        """Use a COCO results json (a list of {image_id, category_id, bbox, score}) as the
        detections on every image of the data set."""
        results = read_results_json(path)
        by_image: dict[Any, list] = defaultdict(list)
        known = {r["image_id"] for r in self.dataset.records}
        categories = set(self.dataset.label_to_category_id.values())
        in_json = set(self._ground_truth().cats)  # all of the json's: keep_classes may leave some out
        results = scored_by_name(results, path, self.dataset,
                                 {c: str(cat.get("name")) for c, cat in self._ground_truth().cats.items()})
        left_out = 0
        for index, result in enumerate(results):
            if result["image_id"] not in known:
                raise DataError(f"{path}: result {index} has image_id {result['image_id']!r}, "
                                f"which is not an image of data set {self.dataset.name}")
            if result["category_id"] not in categories:
                if result["category_id"] in in_json:  # a class keep_classes leaves out: not scored
                    left_out += 1
                    continue
                # COCOeval would drop it without a word
                raise DataError(f"{path}: result {index} has category_id {result['category_id']!r}, which is not "
                                f"a category of data set {self.dataset.name} ({sorted(categories)})")
            by_image[result["image_id"]].append(result)
        if left_out:
            logger.info("%s: %d results of the categories data set %s leaves out (keep_classes) are not scored", path,
                        left_out, self.dataset.name)
        label_of = {c: label for label, c in self.dataset.label_to_category_id.items()}
        found = {label_of[r["category_id"]] for rows in by_image.values() for r in rows}
        missing = classes_without_results(self.dataset.name, self.dataset.class_names, self.dataset.records, found,
                                          path)
        if missing:
            logger.warning("%s", missing)
        self.reset()
        self.predictions = [{"image_id": r["image_id"], "instances": by_image.get(r["image_id"], [])}
                            for r in self.dataset.records]

    def _write_results(self) -> tuple[list[dict], list[Any]]:
        """(the COCO results, the processed image ids); coco_results.json written when there is an output_dir."""
        predictions = order_by_dataset(self.predictions, self.dataset.records)
        to_category = self.dataset.label_to_category_id
        results = [inst for p in predictions for inst in _instances(p, to_category)]
        if self.output_dir:  # written whole or not at all: a full disk leaves the old file
            with atomic_write(os.path.join(self.output_dir, CATEGORIES_FILE)) as f:
                json.dump({"categories": [{"id": to_category[label], "name": name} for label, name
                                          in enumerate(self.dataset.class_names, 1)]}, f)
            with atomic_write(os.path.join(self.output_dir, RESULTS_FILE)) as f:
                f.write(json.dumps(results))  # json.dumps uses the C encoder, json.dump never: 2.5x for 500k
        return results, sorted({p["image_id"] for p in predictions})

    def evaluate(self) -> dict[str, float]:
        """Write coco_results.json (when there is an output_dir) and run COCOeval on it."""
        results, image_ids = self._write_results()
        if not image_ids:
            logger.warning("%s: no images were processed, nothing to evaluate", self.dataset.name)
        elif not results:
            logger.warning("%s: no detections on %d images", self.dataset.name, len(image_ids))
        coco_gt = self._ground_truth()
        categories = sorted(self.dataset.label_to_category_id.values())  # all the json's unless keep_classes
        kept = set(categories)
        scored = [a for i in image_ids for a in coco_gt.imgToAnns.get(i, ()) if a["category_id"] in kept]
        if image_ids and not any(not a.get("iscrowd", 0) for a in scored):
            # COCOeval scores a crowd region as an area to ignore, never as an object to find
            crowd = (f" but {len(scored)} crowd region{'s' if len(scored) != 1 else ''} (iscrowd: 1), which "
                     "COCOeval treats as areas whose detections count neither way, not as objects") if scored else ""
            server = "" if scored else ("; a json without an 'annotations' list (as image_info_test-dev2017.json) "
                                        "is written for its evaluation server instead")
            logger.warning("%s: %s holds no ground-truth objects on the evaluated images%s: every metric is "
                           "undefined (-)%s", self.dataset.name, self.dataset.ann_file, crowd, server)
        coco_eval = run_cocoeval(coco_gt, results, image_ids, categories, self.max_dets)
        metrics = {key: _percent(coco_eval.stats[i]) for i, key in enumerate(summary_keys(self.max_dets))}
        metrics.update(self._per_class(coco_eval))
        return metrics

    def _ground_truth(self) -> COCO:
        if self._coco_gt is None:
            if not os.path.isfile(self.dataset.ann_file):
                raise DataError(f"annotation file not found: {self.dataset.ann_file}")
            # read as the data set was (UTF-8, a byte-order mark allowed): COCO(path) opens it in the
            # locale's encoding, an ASCII one failed on non-ASCII class names at the first evaluation
            self._coco_gt = open_coco(self.dataset.ann_file)
            _fill_scoring_defaults(self._coco_gt, self.dataset.ann_file)
        return self._coco_gt

    def _per_class(self, coco_eval: COCOeval) -> dict[str, float]:
        """AP-<class> (IoU .50:.95), AP50-<class> (IoU .5: VOC's AP-<class>) and the PR curve at IoU .5
        of every class of the data set."""
        precision = coco_eval.eval["precision"]  # (T iou, R recall, K class, A area, M max dets); -1: no gt
        index_of = {cat_id: k for k, cat_id in enumerate(coco_eval.params.catIds)}
        metrics, self.pr_curves = {}, {}
        for label, name in enumerate(self.dataset.class_names, start=1):
            k = index_of.get(self.dataset.label_to_category_id.get(label))
            values = precision[:, :, k, 0, -1] if k is not None else np.zeros((0,))
            defined = values[values > -1]
            metrics[f"AP-{name}"] = float(defined.mean() * 100) if defined.size else math.nan
            at_50 = values[0][values[0] > -1] if values.size else values
            metrics[f"AP50-{name}"] = float(at_50.mean() * 100) if at_50.size else math.nan
            if k is not None and (precision[0, :, k, 0, -1] > -1).any():
                self.pr_curves[name] = (np.asarray(coco_eval.params.recThrs), precision[0, :, k, 0, -1].copy())
        return metrics


class COCOSubmissionWriter(COCOEvaluator):
    """A COCO json without an "annotations" list (image_info_test-dev2017.json, as COCO
    publishes its test-dev split): detections -> the evaluation server's results file.

    `evaluate()` writes `<output_dir>/coco_results.json` exactly as `COCOEvaluator` does (the
    json's own image and category ids, XYWH boxes in the images' pixels) and returns no metrics
    ({}): there is no ground truth to score against. The server takes that list renamed
    `detections_test-dev2017_<name>_results.json`, zipped (upload_hint)."""

    def evaluate(self) -> dict[str, float]:
        results, image_ids = self._write_results()
        logger.info("%s: %d images, %d detections, no annotations: no AP computed", self.dataset.name,
                    len(image_ids), len(results))
        self.counts = (len(image_ids), len(results))
        return {}

    @property
    def submission_file(self) -> str | None:
        """Where evaluate() writes the results (None without an output_dir)."""
        return os.path.join(self.output_dir, RESULTS_FILE) if self.output_dir else None

    def upload_hint(self) -> str:
        """What to send the server, once evaluate() has written it."""
        images, detections = getattr(self, "counts", (0, 0))
        stem = os.path.splitext(os.path.basename(self.dataset.ann_file or ""))[0]
        split = stem[len("image_info_"):] if stem.startswith("image_info_") else "<split>"
        own = split == "<split>"  # not a COCO server's image_info json: perhaps the user's own unlabelled images
        return (f"detections {'' if own else 'for the evaluation server '}written to {self.submission_file} "
                f"({detections} detections on {images} images): "
                + ("for an evaluation server, " if own else "")
                + f"rename it detections_{split}_<name>_results.json (your method's name), zip it and upload the zip"
                + ("; to train on them (pseudo-labels), tools/pseudo_labels.py writes visualize.py --no-draw's list "
                   "as a data set's json" if own else ""))


def run_cocoeval(coco_gt: COCO, results: list[dict], image_ids: Sequence[Any],
                 category_ids: Sequence[int] | None = None, max_dets: int = COCO_MAX_DETS) -> COCOeval:
    """COCOeval(iouType="bbox") of `results` on `image_ids` and `category_ids` (None: all of
    `coco_gt`'s, COCOeval's default), with maxDets (1, 10, max_dets), summarized (`stats`); its
    printout is logged. pycocotools' summarize() reads AP at 100 detections whatever maxDets
    says (a -1, "not defined", for another): for max_dets other than 100 its twelve numbers are
    read here from the same arrays at max_dets (Detectron2's COCOevalMaxDets does the same)."""
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        coco_dt = _load_results(coco_gt, results)
        coco_eval = COCOeval(coco_gt, coco_dt, iouType="bbox")
        coco_eval.params.imgIds = list(image_ids)
        if category_ids is not None:
            coco_eval.params.catIds = sorted(category_ids)
        coco_eval.params.maxDets = [1, 10, max_dets]
        coco_eval.evaluate()
        coco_eval.accumulate()
        if max_dets == COCO_MAX_DETS:
            coco_eval.summarize()
    if max_dets != COCO_MAX_DETS:
        coco_eval.stats = _summary_stats(coco_eval)
        output.write("\n".join(f"{key:>5} = {value:.3f}" for key, value in zip(summary_keys(max_dets),
                                                                             coco_eval.stats)))
    logger.info("COCOeval%s:\n%s", f" (maxDets 1, 10, {max_dets})" if max_dets != COCO_MAX_DETS else "",
                output.getvalue())
    return coco_eval


def _summary_stats(coco_eval: COCOeval) -> np.ndarray:
    """COCOeval.summarize()'s twelve numbers (its order, -1 where not defined) at the last of
    params.maxDets for AP, AP by size and AR by size, and at each of them for AR1 / AR10 / AR<n>."""
    params = coco_eval.params
    last = params.maxDets[-1]

    def mean(ap: bool, iou: float | None = None, area: str = "all", max_dets: int = last) -> float:
        a, m = params.areaRngLbl.index(area), params.maxDets.index(max_dets)
        values = coco_eval.eval["precision" if ap else "recall"]  # (T, R, K, A, M) / (T, K, A, M)
        if iou is not None:
            values = values[np.where(np.isclose(params.iouThrs, iou))[0]]
        values = values[..., a, m]
        defined = values[values > -1]
        return float(defined.mean()) if defined.size else -1.0

    return np.array([mean(True), mean(True, 0.5), mean(True, 0.75), mean(True, area="small"),
                     mean(True, area="medium"), mean(True, area="large"), mean(False, max_dets=params.maxDets[0]),
                     mean(False, max_dets=params.maxDets[1]), mean(False), mean(False, area="small"),
                     mean(False, area="medium"), mean(False, area="large")])


def _load_results(coco_gt: COCO, results: list[dict]) -> COCO:
    if results:
        # loadRes adds keys to the dicts (_instances made them for this call), among them a polygon
        # per box (about 380 bytes each) that box evaluation never reads: one shared empty one
        no_polygon: list = []
        for result in results:
            result.setdefault("segmentation", no_polygon)
        return coco_gt.loadRes(results)
    # loadRes fails on an empty list; an empty results set scores 0 wherever there is ground truth
    coco_dt = COCO()
    coco_dt.dataset = {"images": list(coco_gt.dataset.get("images", [])), "annotations": [],
                       "categories": copy.deepcopy(coco_gt.dataset.get("categories", []))}
    coco_dt.createIndex()
    return coco_dt


def scored_by_name(results: list[dict], path: str, dataset: DatasetInfo, json_categories: dict | None = None,
                   say: bool = True) -> list[dict]:
    """`results` (read from `path`, a coco_results.json) with the category ids of `dataset`'s json
    where the data set they were written for (CATEGORIES_FILE beside them) numbered the same
    classes otherwise, said once (`say`); as they are where there is no such file (results of
    another tool: ids are all a results list has, as in pycocotools). `json_categories`: every
    category of the json, id -> name (keep_classes' left-out ones too; read from its file when
    not given and needed). DataError for a class of theirs the json no longer names whose id
    now names another class (renamed: nothing to match it to)."""
    then_path = os.path.join(os.path.dirname(path), CATEGORIES_FILE)
    if os.path.basename(path) != RESULTS_FILE or not os.path.isfile(then_path):
        return results
    try:
        with open(then_path, encoding="utf-8") as f:
            then = {c["id"]: str(c["name"]) for c in json.load(f)["categories"]}
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DataError(f"{then_path}: not the categories evaluation writes beside {RESULTS_FILE} ({err}); remove "
                        "it to score the results by their category ids") from None
    used = {r["category_id"] for r in results}
    kept = {c: dataset.class_names[label - 1] for label, c in dataset.label_to_category_id.items()}
    if all(kept.get(c) == then[c] for c in then if c in used):
        return results  # the same numbering (the usual case): the json is not read again
    if json_categories is None:
        json_categories = _json_categories(dataset)
    by_name = {name: c for c, name in json_categories.items()}
    renumber, gone = {}, []
    for c in (c for c in then if c in used):  # in the file's order: the classes' label order
        if then[c] in by_name:
            if by_name[then[c]] != c:
                renumber[c] = by_name[then[c]]
        elif c in json_categories:  # the id now names another class, and theirs is not in the json
            gone.append(then[c])
    if gone:
        raise DataError(f"{path}: written for classes of which {first_few(gone, 5)} "
                        f"{'is' if len(gone) == 1 else 'are'} not in data set {dataset.name}'s json, whose category "
                        f"ids now name {first_few([f'{c} {n}' for c, n in sorted(json_categories.items())], 8)} "
                        f"({then_path} names theirs): score the model again (--weights), or give the data set they "
                        "were written for")
    if not renumber:
        return results
    if say:
        logger.warning("%s: written for a json numbering the categories otherwise (%s): scored by name", path,
                       first_few([f"{then[c]} {c} -> {new}" for c, new in renumber.items()], 5))
    return [{**r, "category_id": renumber.get(r["category_id"], r["category_id"])} for r in results]


def _json_categories(dataset: DatasetInfo) -> dict:
    """Every category of a COCO data set's json, id -> name."""
    with open(dataset.ann_file, encoding=USER_TEXT_ENCODING) as f:
        return {c["id"]: str(c["name"]) for c in json.load(f).get("categories", [])}


def read_results_json(path: str) -> list[dict]:
    """A COCO results file, checked enough that errors name the file and the entry."""
    try:
        with open(path, encoding=USER_TEXT_ENCODING) as f:
            results = json.load(f)
    except OSError as err:
        raise DataError(f"{path}: cannot read the results file ({err.strerror})") from None
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text (byte {err.start}){utf16_hint(path)}; a results json is "
                        "UTF-8") from None
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid json ({err})") from None
    except RecursionError:
        raise DataError(f"{path}: nests its json too deeply to be a COCO results list") from None
    if not isinstance(results, list):
        raise DataError(f"{path}: expected a COCO results list [{{image_id, category_id, bbox, score}}, ...]")
    for index, result in enumerate(results):
        problem = _result_problem(result)
        if problem:
            raise DataError(f"{path}: result {index} {problem}")
    return results


def _result_problem(result: Any) -> str | None:
    """What is wrong with one entry of a results list, or None."""
    if not isinstance(result, dict) or not {"image_id", "category_id", "bbox", "score"} <= result.keys():
        return "is not {image_id, category_id, bbox: [x, y, w, h], score}"
    image_id, category_id, bbox, score = (result[k] for k in ("image_id", "category_id", "bbox", "score"))
    if isinstance(image_id, bool) or not (isinstance(image_id, int) or (isinstance(image_id, str) and image_id)):
        return f"has image_id {image_id!r}, not an image id"
    if isinstance(category_id, bool) or not isinstance(category_id, int):
        return f"has category_id {category_id!r}, not an integer category id"
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(_finite_number(v) for v in bbox)):
        return f"has bbox {bbox!r}, not [x, y, width, height] of 4 finite numbers"
    if not _finite_number(score):
        return f"has score {score!r}, not a finite number"
    return None


def _finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _instances(prediction: dict, to_category: dict[int, int]) -> list[dict]:
    """One image's COCO result dicts, new ones on every call (COCO.loadRes adds keys to them)."""
    if "instances" in prediction:
        return [dict(r) for r in prediction["instances"]]
    image_id = prediction["image_id"]
    boxes = prediction["boxes"].astype(np.float64)
    return [{"image_id": image_id, "category_id": int(to_category[label]), "bbox": [x1, y1, x2 - x1, y2 - y1],
             "score": score}
            for (x1, y1, x2, y2), score, label in zip(boxes.tolist(), prediction["scores"].astype(np.float64).tolist(),
                                                       prediction["labels"].tolist())]


def _percent(stat: float) -> float:
    return float(stat) * 100.0 if stat > -1 else math.nan


def _fill_scoring_defaults(coco_gt: COCO, ann_file: str) -> None:
    """COCOeval reads every ground-truth annotation's 'iscrowd' and 'area' (KeyError without
    them); many converters leave them out. Taken as 0 (not a crowd, as the reader takes it for
    training) and as the box's width x height (what APs / APm / APl then sort by), with one
    warning; the json is not changed."""
    missing = {"iscrowd": 0, "area": 0}
    for ann in coco_gt.dataset.get("annotations", []):
        if "iscrowd" not in ann:
            ann["iscrowd"] = 0
            missing["iscrowd"] += 1
        if "area" not in ann:
            _, _, width, height = ann["bbox"]
            ann["area"] = float(width) * float(height)
            missing["area"] += 1
    if missing["iscrowd"] or missing["area"]:
        logger.warning("%s: %d annotations have no 'iscrowd' (scored as 0: not a crowd) and %d no 'area' (scored "
                       "as the box's width x height, which decides APs / APm / APl)", ann_file,
                       missing["iscrowd"], missing["area"])
