"""The model's classes against a data set's, before anything is scored or drawn.

Label k of a detector means its k-th training class. A test set that lists the same names in
another order (VOC `classes: [box, disc, cross]`, or a COCO json numbering its categories
otherwise, for a model trained on [disc, box, cross]) would score each class against another
class's ground truth: a wrong mAP and no error. So evaluation compares the names first and
scores by name: label k of the model becomes the set's label of the same name
(`label_map_for_test_set`), for the set's classes in another order or a subset of them; a name
the model does not have is refused. Visualisation draws predictions with the model's names.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from detection.data import DataError
from detection.utils.text import first_few

logger = logging.getLogger(__name__)
_TOLD: set[tuple] = set()


def model_class_names(weights: Any, config_names: Sequence[str] | None) -> tuple[list[str] | None, str]:
    """(the model's class names, where they come from as the start of a phrase): those
    training saved in the checkpoint (`DetectorWeights.class_names`; Detectron2 files have
    none), else the config's model.class_names when set, else (None, "")."""
    saved = getattr(weights, "class_names", None)
    if saved:
        told = (tuple(config_names or ()), tuple(saved), str(weights.path))
        if config_names and list(config_names) != list(saved) and told not in _TOLD:  # a growing-data trial: a typo
            _TOLD.add(told)  # fixed there did nothing, unsaid; once a process (ablate.py loads a model per row)
            logger.warning("model.class_names (%s) is not used: the checkpoint %s names the classes it was trained on "
                           "(%s), in its label order, and those are taken; to rename them (a typo fixed), save a copy "
                           "of the checkpoint with its \"class_names\" changed (README, \"Evaluation\")",
                           first_few(list(config_names), 6), weights.path, first_few(list(saved), 6))
        return list(saved), f"the checkpoint {weights.path} was trained on"
    if config_names:
        return list(config_names), "model.class_names is"
    return None, ""


def check_class_names(dataset_name: str, dataset_classes: Sequence[str], model_classes: Sequence[str] | None,
                      num_classes: int, model_source: str = "the model detects") -> None:
    """ValueError (one line with both lists) unless the data set's classes are the model's,
    in the same order. With no model names known, only the count is checked against
    model.num_classes. Evaluation calls it through label_map_for_test_set, which first takes a
    set listing the model's names in another order, or a subset of them, by name: what reaches
    this check is what no table can score (a renamed, extra or repeated class). Called directly
    (tools/visualize.py, with no names known), it refuses another order too: labels are then
    compared as numbers."""
    data, model = list(dataset_classes), list(model_classes) if model_classes else None
    if model is None:
        if len(data) != num_classes:
            raise DataError(f"data set {dataset_name} has {len(data)} classes {data}, but the model detects "
                            f"{num_classes} (model.num_classes; its class names are not known)")
        return
    if data == model:
        return
    if sorted(data) == sorted(model):
        raise DataError(f"data set {dataset_name} lists the classes {data}, but {model_source} {model}: the same "
                        "names in another order, so each label would be scored as another class; give the "
                        f"data set's classes in the model's order ([{', '.join(model)}])")
    unknown = [name for name in data if name not in model]
    if not unknown:  # the model's names, some repeated: a data set lists each class once
        raise DataError(f"data set {dataset_name} lists the classes {data}, but {model_source} {model}: a class "
                        "is listed twice")
    subset = set(model) <= set(data)  # a model of some of the set's classes (trained with keep_classes)
    raise DataError(f"data set {dataset_name} has the classes {data}, but {model_source} {model}: "
                    f"{', '.join(unknown)} {'is' if len(unknown) == 1 else 'are'} not among the model's classes "
                    "(a renamed or extra class cannot be scored; a subset of the model's classes, by name, can"
                    + (f"; to score the model's classes of this set, give its entry keep_classes: "
                       f"[{', '.join(model)}])" if subset else ")"))


def label_map_for_test_set(dataset_name: str, dataset_classes: Sequence[str], model_classes: Sequence[str] | None,
                           num_classes: int, model_source: str = "the model detects") -> list[int] | None:
    """How the model's labels are scored on a test set: None when the set's classes are the
    model's (label k is class k); when they are the model's names in another order, or a proper
    subset of them (a test set of 2 of its 3 classes), a table model label -> the set's label of
    the same name, 0 for the classes the set does not have, whose detections are left out.
    Anything else is check_class_names' ValueError: a renamed or extra class, a repeated one."""
    data, model = list(dataset_classes), list(model_classes or ())
    if model and data != model and len(set(data)) == len(data) and set(data) <= set(model):
        return [0] + [data.index(name) + 1 if name in data else 0 for name in model]
    check_class_names(dataset_name, data, model_classes, num_classes, model_source)
    return None


def subset_note(dataset_name: str, dataset_classes: Sequence[str], model_classes: Sequence[str]) -> str:
    """The line saying a test set is scored by name: its classes are the model's in another
    order, or a subset of them."""
    left_out = [name for name in model_classes if name not in dataset_classes]
    if not left_out:
        return (f"test set {dataset_name}: lists the model's classes in another order ({', '.join(dataset_classes)}); "
                "scored by name")
    return (f"test set {dataset_name}: its {len(dataset_classes)} classes are a subset of the model's "
            f"{len(model_classes)}, scored by name ({', '.join(dataset_classes)}); the detections of "
            f"{', '.join(left_out)} are left out")


def classes_without_results(dataset_name: str, class_names: Sequence[str], records: Sequence[dict],
                            found_labels: set[int], path: str) -> str | None:
    """The warning for a results file or folder (--results) that holds detections of some of a
    set's classes and none of others that have objects there: scored as AP 0, a plausible lower
    mean (a trial re-scored the results of a keep_classes subset on the whole set). None when
    every class with objects has results, or none has."""
    with_objects = sorted({int(label) for record in records for label in record["labels"]})
    missing = [class_names[label - 1] for label in with_objects if label not in found_labels]
    if not missing or not found_labels:
        return None
    return (f"{path}: no detection of {', '.join(missing)}, which {'has' if len(missing) == 1 else 'have'} objects in "
            f"data set {dataset_name}: scored as AP 0 in its mean. Were these results made for some of its classes "
            "(keep_classes) or by a model of other classes?")
