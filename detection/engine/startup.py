"""The start and the end of a training run around the loop (trainer.py): the test sets checked
before anything is written, the lines that name them, and what a run that stops before its
first iteration takes back.

A wrong `ann_file` in `datasets.test` used to pass the start and stop the run at its first
evaluation (test.eval_period), hours later, or in tools/eval.py; here it stops the run before
the output folder is written, as a wrong training set does.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from detection.config import Config
from detection.data.dataset_info import DatasetInfo

logger = logging.getLogger(__name__)

EVENT_FILES = "events.out.tfevents.*"  # log.tensorboard's files in the output folder


def build_test_datasets(cfg: Config, class_names: Sequence[str]) -> list[DatasetInfo]:
    """datasets.test read and checked as tools/eval.py checks them (annotations, image files,
    a results folder each, classes): their classes must be the training classes, or a subset
    of them by name (scored so, and said here). A ValueError (DataError) otherwise."""
    from detection.data.catalog import get_datasets
    from detection.evaluation.classes import label_map_for_test_set, subset_note
    from detection.evaluation.outputs import results_subfolders

    datasets = get_datasets(cfg.datasets.test, cfg.datasets.root, skip_bad_images=cfg.dataloader.skip_bad_images,
                            exif_orientation=cfg.input.exif_orientation)
    results_subfolders([d.name for d in datasets])  # two sets that would share a results folder
    for dataset in datasets:
        if label_map_for_test_set(dataset.name, dataset.class_names, class_names, len(class_names),
                                  "the training classes are"):
            logger.info("%s", subset_note(dataset.name, dataset.class_names, class_names))
    return datasets


def summary_of_test_sets(cfg: Config, datasets: Sequence[DatasetInfo]) -> list[str]:
    """The start summary's lines for the test sets, named as the training sets are (the data
    set's name, as eval.py's results folders and the metrics keys name them)."""
    period = f" (evaluated every {cfg.test.eval_period} iterations)" if cfg.test.eval_period else ""
    if not datasets:
        return [f"test sets: none{period}"]
    lines = [f"test set {d.name}: {len(d.records)} images, {d.num_classes} classes"
             + ("" if d.has_annotations else " (no annotations: files for its evaluation server)")
             for d in datasets]
    return lines + ([f"test sets evaluated every {cfg.test.eval_period} iterations"] if period else [])


def event_files(out_dir: Path) -> set[Path]:
    return set(out_dir.glob(EVENT_FILES))


def undo_unstarted_run(out_dir: Path, *, events_before: set[Path], created: Sequence[Path]) -> None:
    """A run that stopped before its first iteration leaves nothing of its own: the files it
    `created` (config.yaml, log.txt: not a resumed run's, which were there before) and the
    TensorBoard event files it opened, empty. The lock's release then removes a folder the run
    created."""
    for path in [*sorted(event_files(out_dir) - events_before), *created]:
        path.unlink(missing_ok=True)


def final_line(path: Path, iteration: int) -> str:
    """The run's closing line: where the trained model went and how to evaluate it."""
    return (f"training finished at iteration {iteration}: the model is {path.resolve()} "
            f"(python tools/eval.py --weights {path} evaluates it on datasets.test)")


def note_stop(err: BaseException, iteration: int, kept: str) -> None:
    """An error that stops the loop (a bad image in a loader worker, a failed evaluation) gets
    a note saying which checkpoint the run left (`kept`: trainer._what_is_kept): shown under
    its traceback (Python 3.11+), and by tools/train_det.py on the error's one line."""
    line = f"training stopped at iteration {iteration}, {kept}"
    if hasattr(err, "add_note"):
        err.add_note(line)
    else:  # Python 3.10: the same attribute, read by train_det.py
        err.__notes__ = [*getattr(err, "__notes__", []), line]
