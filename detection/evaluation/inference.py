"""Run a model over a test loader and report: the inference loop, gathering, metric tables.

An evaluator (`VOCEvaluator`, `COCOEvaluator`) keeps one picklable entry per image in
`evaluator.predictions`; with torch.distributed, `inference_on_dataset` gathers those
entries on rank 0, which alone evaluates.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np
import torch
from tqdm import tqdm

from detection.utils import comm
from detection.utils.files import atomic_write
from detection.utils.progress import ProgressLines
from detection.utils.text import first_few

logger = logging.getLogger(__name__)


class Evaluator(Protocol):
    predictions: list[dict[str, Any]]  # one entry per processed image, with its "image_id"
    pr_curves: dict[str, tuple[np.ndarray, np.ndarray]]  # class name -> (recall, precision), after evaluate
    # whether evaluate's AP-<class> is the area under that class's pr_curves entry (VOC's, at IoU 0.5):
    # then the PR plot titles each curve with it; else (COCO's is over IoU .5:.95) with the curve's own
    curve_ap_in_metrics: bool

    def reset(self) -> None: ...

    # outputs' "labels" are the data set's (1..K in its class_names order); a model trained on its
    # classes in another order needs classes.label_map_for_test_set (evaluate_test_sets applies it)
    def process(self, records: Sequence[dict], outputs: Sequence[dict]) -> None: ...

    def evaluate(self) -> dict[str, float]: ...

    def load_results(self, path: str) -> None: ...  # saved results on the whole data set instead


def inference_on_dataset(model: torch.nn.Module, loader: Iterable, evaluator: Evaluator, *,
                         label_map: Sequence[int] | None = None,
                         between_batches: Callable[[], None] | None = None) -> dict[str, float]:
    """Run `model` in eval mode over `loader` ((images, records) batches) and evaluate.

    The images go to the model as the loader gives them, at their own size in host memory
    (pinned when there is a GPU): the model resizes each there and moves it to its device
    itself (FasterRCNN.preprocess), as Detectron2's models do. Moving them first would send a
    full-size image to the GPU only for it to come back to be resized (and, with test-time
    augmentation or multi-scale testing, once more per size).
    Returns the evaluator's metrics on rank 0 and {} on other ranks. The model's
    train/eval mode is restored afterwards (a user's own loop may pass its training model).
    `label_map` (classes.label_map_for_test_set): model label -> the data set's label, 0 = drop
    the detection; for a test set holding a subset of the model's classes.
    `between_batches` (training's stop check, signals.GracefulStop.check_evaluation) is called
    before each batch; it may be a collective: under torchrun every rank calls it as often as the
    rank with the most batches (the others call it again after their last), so that when it
    raises, every rank raises at the same call.
    """
    # on the CPU, as the outputs it relabels (_to_cpu)
    table = torch.as_tensor(label_map, dtype=torch.int64, device="cpu") if label_map is not None else None
    evaluator.reset()
    was_training = model.training
    model.eval()
    start, num_images, batches = time.perf_counter(), 0, 0
    between_batches, calls = _between_batches(loader, between_batches)
    try:
        with torch.inference_mode():
            bar = tqdm(loader, total=_length(loader), desc="inference", unit="batch",
                       disable=None if comm.is_main_process() else True, dynamic_ncols=True)  # None: a terminal only
            dataset = getattr(loader, "dataset", None)
            lines = ProgressLines("inference", len(dataset) if hasattr(dataset, "__len__") else None,
                                  enabled=bar.disable and comm.is_main_process(), say=logger.info)
            for images, records in bar:
                if between_batches is not None:
                    between_batches()
                outputs = model(images)
                evaluator.process(records, [relabel(_to_cpu(output), table) for output in outputs])
                num_images += len(images)
                batches += 1
                lines.step(len(images))  # off a terminal: a line a minute (a batch job's log)
            for _ in range(calls - batches):  # as many calls as the rank with the most batches makes
                between_batches()
    finally:
        model.train(was_training)
    elapsed = time.perf_counter() - start
    world = comm.get_world_size()  # under torchrun, the set's count (rank 0's share read as images left out)
    total = sum(comm.all_gather_object(num_images)) if world > 1 else num_images
    logger.info("inference: %d images in %.1f s (%.3f s / image)%s", total, elapsed, elapsed / max(total, 1),
                f"; {num_images} of them in this process, one of {world}" if world > 1 else "")
    if not _gather_on_main(evaluator):
        return {}
    return evaluator.evaluate()


def _between_batches(loader: Iterable, check: Callable[[], None] | None) -> tuple[Callable[[], None] | None, int]:
    """(`check`, how often every rank calls it: the most batches any rank has). In one process
    the count does not matter (0). Under torchrun, a loader without a length (never the test
    loader's) cannot say how many batches the others have: no check then (None), since ranks
    calling a collective unequally often would wait for each other for ever."""
    if check is None or comm.get_world_size() == 1:
        return check, 0
    counts = comm.all_gather_object(_length(loader))  # collective: every rank calls it
    return (None, 0) if any(c is None for c in counts) else (check, max(counts))


def _length(loader: Iterable) -> int | None:
    try:
        return len(loader)  # type: ignore[arg-type]
    except TypeError:
        return None


def relabel(output: dict[str, Any], table: torch.Tensor | None) -> dict[str, Any]:
    """One image's detections with labels looked up in `table` (model label -> data set label),
    those mapped to 0 (a class the data set does not have) dropped."""
    if table is None:
        return output
    labels = table[output["labels"].long()]
    keep = labels > 0
    per_detection = lambda v: isinstance(v, torch.Tensor) and v.dim() > 0 and len(v) == len(keep)  # noqa: E731
    return {**{k: v[keep] if per_detection(v) else v for k, v in output.items()}, "labels": labels[keep]}


def _to_cpu(output: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v.to("cpu") if isinstance(v, torch.Tensor) else v for k, v in output.items()}


def _gather_on_main(evaluator: Evaluator) -> bool:
    """Concatenate every rank's entries on rank 0; True where evaluation should run."""
    if comm.get_world_size() == 1:
        return True
    parts = comm.all_gather_object(evaluator.predictions)  # collective: every rank calls it
    if not comm.is_main_process():
        evaluator.predictions = []
        return False
    evaluator.predictions = [entry for part in parts for entry in part]
    return True


def order_by_dataset(predictions: Sequence[dict], records: Sequence[dict]) -> list[dict]:
    """Entries in data set order, one per image id (the first seen), whatever the number of
    processes they were gathered from: score ties then break the same way every time."""
    position = {r["image_id"]: i for i, r in enumerate(records)}
    seen, out = set(), []
    for entry in sorted(predictions, key=lambda e: position.get(e["image_id"], len(position))):
        if entry["image_id"] not in seen:
            seen.add(entry["image_id"])
            out.append(entry)
    return out


def to_numpy(x: Any, dtype: Any) -> np.ndarray:
    """A tensor, array or list -> numpy array of `dtype`."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


def compact_floats(x: Any) -> np.ndarray:
    """Detections' boxes or scores as a numpy array of their own in their own float precision
    (float32 from a model; float64 when given so), to keep per image until they are written:
    widening to float64 then gives the same numbers. A copy, since a view would keep the
    model output's whole storage alive."""
    array = to_numpy(x, None)
    return np.array(array, dtype=array.dtype if array.dtype in (np.float32, np.float64) else np.float64)


PER_CLASS_PREFIXES = ("AP-", "AP50-")  # COCO-type sets give both (IoU .50:.95 and .5), VOC-type AP- (.5)


def is_per_class_key(key: str) -> bool:
    """AP-<class> / AP50-<class>, or <test set>/AP-<class>: a class name may hold "/" itself ("1/2 inch bolt")."""
    return any(key.startswith(p) or f"/{p}" in key for p in PER_CLASS_PREFIXES)


def _fmt(value: Any) -> str:
    value = float(value)
    return "-" if not math.isfinite(value) else f"{value:.2f}"


def format_metrics_table(metrics: Mapping[str, float], per_class_columns: int = 3) -> str:
    """The metrics as a text table: summary numbers first, then per-class AP in columns.

    When "use_07_metric" is present (VOC), the first line says which VOC metric was used.
    Values are percent; "-" stands for "not defined" (nan, e.g. a class without ground truth).
    """
    lines = []
    voc_metric = metrics.get("use_07_metric")
    if voc_metric is not None:
        lines.append("VOC metric: " + ("VOC2007 11-point interpolated AP" if voc_metric
                                       else "VOC2010+ area under the interpolated precision-recall curve"))
    summary = [(k, _fmt(v)) for k, v in metrics.items() if not is_per_class_key(k) and k != "use_07_metric"]
    if summary:
        width = max(len("metric"), *(len(k) for k, _ in summary))
        value_width = max(len("value"), *(len(v) for _, v in summary))
        lines += [f"{'metric':<{width}}  {'value':>{value_width}}", f"{'-' * width}  {'-' * value_width}"]
        lines += [f"{k:<{width}}  {v:>{value_width}}" for k, v in summary]
    per_class = [(k.split("AP-", 1)[1], _fmt(v)) for k, v in metrics.items() if is_per_class_key(k) and "AP-" in k
                 and not k.startswith("AP50-") and "/AP50-" not in k]
    at_50 = {k.split("AP50-", 1)[1]: _fmt(v) for k, v in metrics.items() if k.startswith("AP50-") or "/AP50-" in k}
    if per_class:
        iou = "IoU 0.5" if voc_metric is not None else "IoU 0.50:0.95" + (", AP50 at 0.5" if at_50 else "")
        lines += ["", f"per-class AP ({iou}):"]
        width = max(len("class"), *(len(name) for name, _ in per_class))
        cols = max(1, min(per_class_columns, len(per_class)))
        head = f"{'class':<{width}}  {'AP':>6}" + (f"  {'AP50':>6}" if at_50 else "")
        lines.append(" | ".join([head] * cols))
        for row in range(0, len(per_class), cols):
            cells = per_class[row:row + cols]
            lines.append(" | ".join(f"{name:<{width}}  {value:>6}" + (f"  {at_50.get(name, '-'):>6}" if at_50 else "")
                                    for name, value in cells))
        undefined = [name for name, value in per_class if value == "-"]
        if undefined:  # a long-tail trial: a rare class's "-" said nothing
            lines.append(f"-: undefined, the set has no object of {first_few(undefined, 5)} that the metric scores "
                         "(crowd regions and VOC difficult objects are not)")
    return "\n".join(lines)


def save_metrics_json(metrics: Mapping[str, float], path: str | os.PathLike) -> None:
    """Write the flat metrics dict as strict JSON (nan / inf become null), whole or not at all:
    a failing disk leaves the previous metrics.json and no temporary file."""
    data = {}
    for key, value in metrics.items():
        value = float(value)
        data[str(key)] = value if math.isfinite(value) else None
    with atomic_write(path) as f:
        json.dump(data, f, indent=2, allow_nan=False)
        f.write("\n")
