"""Evaluation: VOC (the official devkit's AP) and COCO (pycocotools) evaluators, the
inference loop, and metric reporting.

    evaluator = build_evaluator(dataset, output_dir)        # by dataset.kind
    metrics = inference_on_dataset(model, loader, evaluator, device=device)
    print(format_metrics_table(metrics)); save_metrics_json(metrics, "metrics.json")
    evaluator.pr_curves                                       # class -> (recall, precision)

    metrics = evaluate_results_file(dataset, path)            # saved results, no model
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from detection.evaluation.coco import COCOEvaluator
from detection.evaluation.inference import Evaluator, format_metrics_table, inference_on_dataset, save_metrics_json
from detection.evaluation.voc import VOCEvaluator, eval_class, voc_ap

if TYPE_CHECKING:
    from detection.data.catalog import DatasetInfo

EVALUATORS = {"coco": COCOEvaluator, "voc": VOCEvaluator}


def build_evaluator(dataset: DatasetInfo, output_dir: str | None = None) -> Evaluator:
    """The evaluator for `dataset.kind`; results files go to `output_dir` (None: not written)."""
    if dataset.kind not in EVALUATORS:
        raise ValueError(f"data set {dataset.name}: unknown kind {dataset.kind!r}, "
                         f"expected one of {sorted(EVALUATORS)}")
    return EVALUATORS[dataset.kind](dataset, output_dir)


def evaluate_results_file(dataset: DatasetInfo, path: str) -> dict[str, float]:
    """Metrics of saved results on the whole data set, without a model.

    COCO-type: a results json ([{image_id, category_id, bbox: [x,y,w,h], score}], e.g. the
    coco_results.json that evaluation writes). VOC-type: a folder of
    comp4_det_test_{class}.txt files (devkit lines, 1-based pixels), as evaluation writes
    them. For the PR curves too: `e = build_evaluator(dataset, None); e.load_results(path);
    e.evaluate(); e.pr_curves`.
    """
    evaluator = build_evaluator(dataset, None)
    evaluator.load_results(path)
    return evaluator.evaluate()


__all__ = [
    "COCOEvaluator",
    "EVALUATORS",
    "Evaluator",
    "VOCEvaluator",
    "build_evaluator",
    "eval_class",
    "evaluate_results_file",
    "format_metrics_table",
    "inference_on_dataset",
    "save_metrics_json",
    "voc_ap",
]
