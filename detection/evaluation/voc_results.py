"""The devkit's comp4 result files (`comp4_det_test_{class}.txt`, lines `image_id score x1 y1
x2 y2` in its 1-based pixels): formatted, written, parsed and read back as detections."""
from __future__ import annotations

import logging
import math
import os
from collections import defaultdict
from collections.abc import Mapping, Sequence

import numpy as np

from detection.data import DataError
from detection.evaluation.voc_metric import ImageId
from detection.utils.files import USER_TEXT_ENCODING, atomic_write, utf16_hint

logger = logging.getLogger(__name__)

COMP4_TEMPLATE = "comp4_det_test_{}.txt"
# the devkit's results folder (VOCopts.detrespath): what the evaluation server expects in the upload
SUBMISSION_FOLDER = os.path.join("results", "{}", "Main")


def format_comp4_lines(predictions: Sequence[dict], num_classes: int,
                       sizes: Mapping[ImageId, tuple[int, int]] | None = None) -> dict[int, list[str]]:
    """label -> devkit result lines `image_id score x1 y1 x2 y2` (1-based: x1+1, y1+1, x2, y2;
    one decimal like Detectron2, scores with 6 so that rounding adds few ties); every box as
    given. With `sizes` (image id -> (width, height); for the evaluation server), boxes are
    first clipped to the image (0..width, 0..height), as the model's postprocess clips, and a
    box less than one pixel wide or high is then left out, as the model drops empty boxes: its
    devkit numbers would be inverted (x1 + 1 > x2; e.g. a 0.2 px box at the border)."""
    lines: dict[int, list[str]] = {label: [] for label in range(1, num_classes + 1)}
    for p in predictions:
        size = None if sizes is None else sizes.get(p["image_id"], (0, 0))
        for box, score, label in zip(p["boxes"].tolist(), p["scores"].tolist(), p["labels"].tolist()):
            if label not in lines:
                raise ValueError(f"image {p['image_id']}: predicted label {label} is not in 1..{num_classes}")
            coords = _devkit_coords(box, size)
            if coords is not None:
                lines[label].append(f"{p['image_id']} {score:.6f} {coords}")
    return lines


def _devkit_coords(box: Sequence[float], size: tuple[int, int] | None) -> str | None:
    """A 0-based continuous box as the devkit's 1-based numbers with one decimal. With a size:
    clipped to the image first (unless the size is unknown, 0), and None when the written
    numbers would be inverted (the box is less than one pixel wide or high)."""
    x1, y1, x2, y2 = box
    if size and min(size) > 0:  # 0: a record whose size was not read
        width, height = size
        x1, x2 = (min(max(x, 0.0), width) for x in (x1, x2))
        y1, y2 = (min(max(y, 0.0), height) for y in (y1, y2))
    text = [f"{v:.1f}" for v in (x1 + 1, y1 + 1, x2, y2)]
    if size is None:
        return " ".join(text)
    values = [float(t) for t in text]  # compare what is written, after rounding
    return None if values[2] < values[0] or values[3] < values[1] else " ".join(text)


def image_sizes(records: Sequence[dict]) -> dict[ImageId, tuple[int, int]]:
    """image id -> (width, height) of a data set's records (0 where a size was not read)."""
    return {r["image_id"]: (int(r.get("width") or 0), int(r.get("height") or 0)) for r in records}


def parse_comp4_lines(lines: Sequence[str], source: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Devkit lines -> (image ids, float64[D] scores, float64[D,4] boxes in the devkit's numbers)."""
    ids, values = [], []
    for number, line in enumerate(lines, start=1):
        fields = line.split()
        if not fields:
            continue
        try:
            if len(fields) != 6:
                raise ValueError("wrong number of fields")
            row = [float(v) for v in fields[1:]]
        except ValueError:
            raise DataError(f"{source}:{number}: expected 'image_id score x1 y1 x2 y2', "
                            f"got {line.strip()!r}") from None
        if not all(math.isfinite(v) for v in row):
            raise DataError(f"{source}:{number}: a score or coordinate that is not a finite number: {line.strip()!r}")
        values.append(row)
        ids.append(fields[0])
    array = np.asarray(values, dtype=np.float64).reshape(-1, 5)
    return ids, array[:, 0], array[:, 1:]


class Comp4Lines(dict):
    """label -> a class's comp4 lines (read_comp4_lines), keeping each class's parse once made:
    reading a results folder checks every line, and turning it into detections and scoring it
    use the same numbers (parsed once, not three times: half a million lines take seconds)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.parsed: dict[int, tuple[list[str], np.ndarray, np.ndarray]] = {}


def parsed_comp4_lines(lines: Mapping[int, Sequence[str]], label: int, source: str
                       ) -> tuple[list[str], np.ndarray, np.ndarray]:
    """parse_comp4_lines of lines[label], from the parse a Comp4Lines kept when it has one."""
    kept = getattr(lines, "parsed", None)
    if kept is not None and label in kept:
        return kept[label]
    return parse_comp4_lines(lines[label], source)


def write_comp4_files(lines: Mapping[int, Sequence[str]], class_names: Sequence[str], output_dir: str) -> None:
    """One file per class, each written whole or not at all (a full disk leaves the old file)."""
    for label, name in enumerate(class_names, start=1):
        with atomic_write(os.path.join(output_dir, COMP4_TEMPLATE.format(name))) as f:
            f.writelines(line + "\n" for line in lines[label])


def read_comp4_lines(path: str, class_names: Sequence[str], image_ids: Sequence[ImageId]) -> Comp4Lines:
    """A folder of comp4 files -> label -> its file's non-empty lines (stripped, in file order),
    each checked: six fields, finite numbers, an image of the data set. No file: no lines."""
    if not os.path.isdir(path):
        raise DataError(f"{path}: not a folder; VOC-type results are a folder of "
                        f"{COMP4_TEMPLATE.format('<class>')} files")
    known = {str(i) for i in image_ids}
    out = Comp4Lines()
    found = 0
    for label, name in enumerate(class_names, start=1):
        file = os.path.join(path, COMP4_TEMPLATE.format(name))
        if os.path.isdir(file):
            raise DataError(f"{file}: is a folder, not a results file")
        out[label] = []
        if not os.path.isfile(file):
            logger.warning("%s: missing, no detections of class %s", file, name)
            continue
        found += 1
        try:
            with open(file, encoding=USER_TEXT_ENCODING) as f:
                lines = f.readlines()
        except UnicodeDecodeError as err:
            raise DataError(f"{file}: not UTF-8 text (byte {err.start}){utf16_hint(file)}; results files hold "
                            "'image_id score x1 y1 x2 y2' lines") from None
        parsed = parse_comp4_lines(lines, file)  # errors name the file's own line numbers
        unknown = next((i for i in parsed[0] if i not in known), None)
        if unknown is not None:
            raise DataError(f"{file}: image {unknown!r} is not in the data set")
        out[label] = [line.strip() for line in lines if line.strip()]
        out.parsed[label] = parsed  # the same numbers: blank lines carry none
    if not found:
        raise DataError(f"{path}: no {COMP4_TEMPLATE.format('<class>')} file for any of the data set's classes")
    return out


def comp4_detections(lines: Mapping[int, Sequence[str]], image_ids: Sequence[ImageId]) -> dict[ImageId, dict]:
    """label -> comp4 lines (read_comp4_lines) -> image id -> {"boxes" (0-based), "scores",
    "labels"} as numpy."""
    id_of = {str(i): i for i in image_ids}
    per_image: dict[ImageId, list] = defaultdict(list)  # image id -> [(score, x1, y1, x2, y2, label)]
    for label in lines:
        ids, scores, boxes = parsed_comp4_lines(lines, label, COMP4_TEMPLATE.format(label))
        for image_id, score, (x1, y1, x2, y2) in zip(ids, scores.tolist(), boxes.tolist()):
            per_image[id_of[image_id]].append((score, x1 - 1.0, y1 - 1.0, x2, y2, label))
    out = {}
    for image_id, rows in per_image.items():
        array = np.asarray(rows, dtype=np.float64)  # (D, 6)
        out[image_id] = {"boxes": array[:, 1:5], "scores": array[:, 0], "labels": array[:, 5].astype(np.int64)}
    return out


def read_comp4_dir(path: str, class_names: Sequence[str], image_ids: Sequence[ImageId]) -> dict[ImageId, dict]:
    """A folder of comp4 files -> image id -> {"boxes" (0-based), "scores", "labels"} as numpy."""
    return comp4_detections(read_comp4_lines(path, class_names, image_ids), image_ids)
