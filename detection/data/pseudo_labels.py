"""A model's detections on unlabelled images as a COCO training json (tools/pseudo_labels.py):
self-training, where a teacher's confident detections become the boxes a student trains on
beside the labelled set (Detectron2 and MMDetection leave the conversion to the user).

The input is visualize.py's detections.jsonl (`--no-draw` for a folder of unlabelled images):
one line per image, {"image", "width", "height" (as viewed), "detections": [{"label" 1..K,
"class", "score", "box": [x1, y1, x2, y2]}]}, or {"image", "error"} for an image not read; its
detections.source.json names the model's classes. The json written has every class of the model
as a category (id = the model's label, so the classes match the labelled set's by name in any
order), each image with its file name relative to `image_root` and its size as viewed (the reader
checks it, EXIF orientation applied as training reads the file), and an annotation per detection
at `score_thresh` or above: "bbox" [x, y, w, h], "area" w * h, "iscrowd" 0 and the detection's
"score" (a field the reader ignores). Images without a detection are kept: training drops them
unless dataloader.filter_empty is false (then they teach background, which a teacher's misses
make wrong).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from detection.data import DataError
from detection.utils.files import atomic_write
from detection.utils.text import first_few

SOURCE_FILE = "detections.source.json"  # visualize.py's record of how detections.jsonl was made


def read_detections(path: str | os.PathLike) -> tuple[list[dict], list[str], list[str]]:
    """detections.jsonl -> (the lines of images read, in order; the images not read, by path;
    the model's class names from the detections.source.json beside it). DataError naming the
    file and the line when one is not such a line, or the class names cannot be known."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8", errors="surrogateescape")
    except OSError as err:
        raise DataError(f"could not read {path}: {err.strerror or err}") from None
    images, failed = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            raise DataError(f"{path}, line {number}: not JSON (a line cut short by a kill? visualize.py --resume "
                            "finishes the list)") from None
        if not isinstance(entry, dict) or "image" not in entry:
            raise DataError(f"{path}, line {number}: not a line of visualize.py's detections.jsonl (no \"image\")")
        if "frame" in entry:
            raise DataError(f"{path}, line {number}: a video's frame: pseudo-labels need image files (save the "
                            "frames as images and run visualize.py on their folder)")
        if "error" in entry:
            failed.append(str(entry["image"]))
            continue
        missing = [key for key in ("width", "height", "detections") if key not in entry]
        if missing:
            raise DataError(f"{path}, line {number}: no {', '.join(missing)} (a list from an older visualize.py? "
                            "run it again)")
        images.append(entry)
    return images, failed, _class_names(path.parent / SOURCE_FILE, path)


def _class_names(source: Path, listing: Path) -> list[str]:
    try:
        names = json.loads(source.read_text(encoding="utf-8")).get("class_names")
    except (OSError, ValueError, AttributeError):
        names = None
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise DataError(f"{source}: no class names of the model that made {listing} (missing, or written by an "
                        "older visualize.py): run visualize.py --no-draw again to write them")
    return names


def pseudo_label_json(detections: list[dict], class_names: list[str], image_root: str | os.PathLike,
                      score_thresh: float) -> dict[str, Any]:
    """The COCO json (module docstring) of `detections` (read_detections' lines); DataError for
    an image outside `image_root` or a detection of a label the class names do not have."""
    root = Path(os.path.abspath(image_root))
    images, annotations = [], []
    for image_id, entry in enumerate(detections, start=1):
        path = Path(os.path.abspath(entry["image"]))
        try:
            name = path.relative_to(root).as_posix()
        except ValueError:
            raise DataError(f"image {path} is not under the image root {root}: give --image-root a folder that "
                            "holds every image of the list") from None
        images.append({"id": image_id, "file_name": name, "width": int(entry["width"]),
                       "height": int(entry["height"])})
        for det in entry["detections"]:
            if float(det["score"]) < score_thresh:
                continue
            label = int(det["label"])
            if not 1 <= label <= len(class_names):
                raise DataError(f"image {path}: a detection of label {label}, but the model has {len(class_names)} "
                                "classes")
            x1, y1, x2, y2 = (float(v) for v in det["box"])
            w, h = x2 - x1, y2 - y1
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": label,
                                "bbox": [x1, y1, w, h], "area": w * h, "iscrowd": 0, "score": float(det["score"])})
    categories = [{"id": label, "name": name} for label, name in enumerate(class_names, start=1)]
    return {"images": images, "annotations": annotations, "categories": categories}


def common_root(detections: list[dict]) -> str:
    """The deepest folder holding every image of the list (its images' common parent)."""
    folders = [os.path.dirname(os.path.abspath(entry["image"])) for entry in detections]
    if not folders:
        raise DataError("the list holds no image that was read: nothing to label")
    return os.path.commonpath(folders)


def write_pseudo_labels(detections_jsonl: str | os.PathLike, output: str | os.PathLike, score_thresh: float,
                        image_root: str | os.PathLike | None = None) -> dict[str, Any]:
    """read_detections -> pseudo_label_json -> `output` (whole or not at all); never over an
    existing file. -> {"image_root", "images", "empty", "annotations", "per_class", "failed"}."""
    output = Path(output)
    if output.exists():
        raise DataError(f"{output} exists: give another --output (or remove it); a training json is not replaced")
    entries, failed, names = read_detections(detections_jsonl)
    root = str(image_root) if image_root is not None else common_root(entries)
    data = pseudo_label_json(entries, names, root, score_thresh)
    with atomic_write(output, encoding="utf-8") as f:
        json.dump(data, f)
    per_class = {name: 0 for name in names}
    for ann in data["annotations"]:
        per_class[names[ann["category_id"] - 1]] += 1
    labelled = {ann["image_id"] for ann in data["annotations"]}
    return {"image_root": os.path.abspath(root), "images": len(data["images"]),
            "empty": len(data["images"]) - len(labelled), "annotations": len(data["annotations"]),
            "per_class": per_class, "failed": failed}


def summary(counts: dict[str, Any], output: str | os.PathLike, score_thresh: float) -> list[str]:
    """What the tool prints: the counts, the images left out, and the config entry to train on it."""
    per_class = ", ".join(f"{name} {n}" for name, n in counts["per_class"].items())
    lines = [f"{output}: {counts['images']} images, {counts['annotations']} boxes at score >= {score_thresh:g} "
             f"({per_class})"]
    if counts["empty"]:
        lines.append(f"note: {counts['empty']} images have no detection at that score: training drops them "
                     "(dataloader.filter_empty); with filter_empty: false they would teach that nothing is there")
    if counts["failed"]:
        lines.append(f"note: {len(counts['failed'])} images of the list were not read and are left out "
                     f"({first_few(counts['failed'], 3)})")
    lines.append(f"train on it beside your labelled set: datasets.train=[<your set>, {{type: coco, name: pseudo, "
                 f"ann_file: {os.path.abspath(output)}, image_root: {counts['image_root']}}}]")
    return lines
