"""The evaluation a run makes every test.eval_period iterations (and tools/study.py after it)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from torch import nn

from detection.config import Config


def evaluate(cfg: Config, model: nn.Module, output_dir: Optional[Path] = None) -> dict[str, float]:
    """Evaluate on every test set (each process its share of the images; rank 0 scores them,
    other ranks get {}); keys are prefixed by the data set's name when there are several.
    With output_dir, each test set's results go to output_dir/<test set>/ as tools/eval.py
    writes them."""
    from detection.data.catalog import get_datasets
    from detection.evaluation import evaluate_test_sets, flatten_metrics

    datasets = get_datasets(cfg.datasets.test, cfg.datasets.root, skip_bad_images=cfg.dataloader.skip_bad_images,
                            exif_orientation=cfg.input.exif_orientation)
    return flatten_metrics(evaluate_test_sets(datasets, model=model, num_workers=cfg.dataloader.num_workers,
                                              output_dir=output_dir, model_classes=getattr(model, "class_names", None)))
