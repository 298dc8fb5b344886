"""Evaluation: VOC (the official devkit's AP) and COCO (pycocotools) evaluators, the
inference loop, and metric reporting.

    evaluator = build_evaluator(dataset, output_dir)        # by dataset.kind
    metrics = inference_on_dataset(model, loader, evaluator)
    print(format_metrics_table(metrics)); save_metrics_json(metrics, "metrics.json")
    evaluator.pr_curves                                       # class -> (recall, precision)

    per_set = evaluate_test_sets(datasets, model=model)       # the test-set loop
    per_set = evaluate_test_sets(datasets, results=path)      # saved results, no model
"""
from __future__ import annotations

from detection.evaluation.coco import COCOEvaluator
from detection.evaluation.inference import Evaluator, format_metrics_table, inference_on_dataset, save_metrics_json
from detection.evaluation.test_sets import EVALUATORS, build_evaluator, evaluate_test_sets, flatten_metrics
from detection.evaluation.voc import VOCEvaluator
from detection.evaluation.voc_metric import eval_class, voc_ap

__all__ = [
    "COCOEvaluator",
    "EVALUATORS",
    "Evaluator",
    "VOCEvaluator",
    "build_evaluator",
    "eval_class",
    "evaluate_test_sets",
    "flatten_metrics",
    "format_metrics_table",
    "inference_on_dataset",
    "save_metrics_json",
    "voc_ap",
]
