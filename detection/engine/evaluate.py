"""The evaluation a run makes every test.eval_period iterations (and tools/study.py after it)."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Callable, Optional, Sequence

from torch import nn

from detection.config import Config


def evaluate(cfg: Config, model: nn.Module, output_dir: Optional[Path] = None,
             between_batches: Optional[Callable[[], None]] = None, datasets: Optional[Sequence] = None
             ) -> dict[str, float]:
    """Evaluate on every test set (each process its share of the images; rank 0 scores them,
    other ranks get {}); keys are prefixed by the data set's name when there are several.
    With output_dir, each test set's results go to output_dir/<test set>/ as tools/eval.py
    writes them. The model is evaluated as tools/eval.py runs the checkpoint: its weights in
    a detector built from the config and prepared as every tool prepares one (test.amp, the
    fast path's inference copy, test.aug), so metrics.jsonl's numbers are eval.py's.
    `between_batches` (the run's stop check) is called before each batch of images, on every rank
    equally often (inference_on_dataset). `datasets`: the test sets already read (the trainer
    reads and checks them once, at its start; each evaluation read them again, every image's
    header and the readers' warnings too); default: cfg.datasets.test, read here."""
    from detection.data.catalog import get_datasets
    from detection.engine.checkpoint import get_rng_states, set_rng_states
    from detection.evaluation import evaluate_test_sets, flatten_metrics

    # the training's random states as they were: the detector built here draws its initial
    # weights from them, and last.pth (saved before) holds them for --resume, which must go on
    # from the same states as the run that evaluated (exact resume)
    states = get_rng_states()
    try:
        if datasets is None:
            datasets = get_datasets(cfg.datasets.test, cfg.datasets.root,
                                    skip_bad_images=cfg.dataloader.skip_bad_images,
                                    exif_orientation=cfg.input.exif_orientation)
        inference = as_the_tools_run_it(cfg, model)
        return flatten_metrics(evaluate_test_sets(datasets, model=inference, num_workers=cfg.dataloader.num_workers,
                                                  output_dir=output_dir, between_batches=between_batches,
                                                  model_classes=getattr(model, "class_names", None),
                                                  coco_max_dets=cfg.test.coco_max_dets))
    finally:
        set_rng_states(states)


def as_the_tools_run_it(cfg: Config, model: nn.Module) -> nn.Module:
    """A training model's weights in the detector build_inference_model would give for its
    checkpoint (the training model, which may hold the fast path's training form, is not touched)."""
    from detection.engine.inference_model import (check_not_inference_copy, prepare_for_inference,
                                                  warn_settings_not_taken)
    from detection.modeling.model import build_model

    check_not_inference_copy(model)
    warn_settings_not_taken(cfg, model)
    cfg = copy.deepcopy(cfg)
    cfg.model.backbone.weights = None  # the weights come from `model`
    device = next(model.parameters()).device
    inference = build_model(cfg)
    inference.load_state_dict(model.state_dict())
    if getattr(model, "class_names", None):
        inference.class_names = list(model.class_names)
    return prepare_for_inference(cfg, inference, device)
