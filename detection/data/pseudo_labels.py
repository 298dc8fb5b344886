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
at `score_thresh` or above: "bbox" [x, y, w, h], "area" w * h, "iscrowd" 0, "segmentation" []
(CVAT's COCO importer warns of each annotation without one) and the detection's "score" (a field
the reader ignores). A list a stop cut short (detections.source.json's "finished" false), or
whose images are gone or changed size since, is refused. Images without a detection are kept:
training drops them unless dataloader.filter_empty is false (then they teach background, which a
teacher's misses make wrong).
"""
from __future__ import annotations

import json
import os
import shlex
from pathlib import Path
from typing import Any

from detection.data import DataError
from detection.utils.files import atomic_write, utf8_name
from detection.utils.text import first_few

SOURCE_FILE = "detections.source.json"  # visualize.py's record of how detections.jsonl was made


def read_detections(path: str | os.PathLike) -> tuple[list[dict], list[str], dict]:
    """detections.jsonl (or the folder visualize.py wrote it to) -> (the lines of images read, in
    order, their "image" made absolute from the folder visualize.py ran in; the images not read, by
    path; the detections.source.json beside it, with the model's "class_names"). DataError naming
    the file and the line when one is not such a line, the list is a stopped run's, an image is
    listed twice, is not there or is no longer the size listed (from the headers, as viewed when
    the list was made so), or the classes cannot be known."""
    path = Path(path)
    if path.is_dir():  # the folder visualize.py --output wrote (a trial gave it)
        if not (path / "detections.jsonl").is_file():
            raise DataError(f"{path}: a folder without detections.jsonl: give the list visualize.py --no-draw wrote")
        path = path / "detections.jsonl"
    try:
        text = path.read_text(encoding="utf-8", errors="surrogateescape")
    except OSError as err:
        raise DataError(f"could not read {path}: {err.strerror or err}") from None
    _not_one_document(text, path)
    source = _source(path.parent / SOURCE_FILE, path)
    ran_in = source.get("cwd") if isinstance(source.get("cwd"), str) else os.getcwd()  # an older list: here
    images, failed, lines_of = [], [], {}
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
        image = os.path.normpath(os.path.join(ran_in, str(entry["image"])))  # visualize.py's paths are as given
        if "error" in entry:
            failed.append(image)
            continue
        missing = [key for key in ("width", "height", "detections") if key not in entry]
        if missing:
            raise DataError(f"{path}, line {number}: no {', '.join(missing)} (a list from an older visualize.py? "
                            "run it again)")
        if image in lines_of:
            raise DataError(f"{path}, line {number}: {image} is listed again (line {lines_of[image]}): two lists "
                            "joined? run visualize.py once over every image")
        lines_of[image] = number
        images.append({**entry, "image": image})
    if source.get("finished") is False:  # an older list says nothing
        raise DataError(f"{path}: visualize.py stopped before the end of its list ({len(images) + len(failed)} of "
                        f"its {source.get('images', '?')} images listed): run the same visualize.py command with "
                        "--resume to finish it")
    gone = [entry["image"] for entry in images if not os.path.isfile(entry["image"])]
    if gone:
        raise DataError(f"{path}: {len(gone)} of its {len(images)} images are not there ({first_few(gone, 2)}): "
                        "moved or deleted since visualize.py listed them (its detections are of the files where "
                        "they were: put them back, or run visualize.py on them where they are now; --image-root "
                        "only sets the folder the json's file names start from)"
                        + ("" if "cwd" in source else f" (its paths are taken from this folder, {ran_in}: run "
                                                      "this where visualize.py ran)"))
    _check_sizes(images, source, path)
    return images, failed, source


def _not_one_document(text: str, path: Path) -> None:
    """DataError for a file that is one JSON document other than a list's line (a COCO json,
    detections.source.json): it was said as a line cut short by a kill, or as a line without
    "image"."""
    try:
        whole = json.loads(text)
    except ValueError:
        return  # lines (or a line cut short: said with its number)
    if not (isinstance(whole, dict) and "image" in whole):  # a one-image list is one document too
        raise DataError(f"{path}: one JSON document (a COCO json? {SOURCE_FILE}?), not visualize.py's "
                        "detections.jsonl (a line per image): give the detections.jsonl that visualize.py --no-draw "
                        "wrote")


def _check_sizes(images: list[dict], source: dict, path: Path) -> None:
    """The images' sizes now (headers, turned by their EXIF tag as the list was made) against the
    list's: a file replaced after visualize.py listed it kept its old size in the json (a trial)."""
    from detection.data.orientation import header_size

    settings = source.get("settings") if isinstance(source.get("settings"), dict) else {}
    turned = bool((settings.get("input") or {}).get("exif_orientation", True))
    changed = []
    for entry in images:
        size = header_size(entry["image"], apply_tag=turned)
        if size is not None and (size[1], size[0]) != (int(entry["width"]), int(entry["height"])):
            changed.append(f"{entry['image']} is {size[1]}x{size[0]}, listed {entry['width']}x{entry['height']}")
    if changed:
        raise DataError(f"{path}: {len(changed)} of its {len(images)} images changed since visualize.py listed them "
                        f"({first_few(changed, 2)}): its detections are of the old files; run visualize.py on them "
                        "again")


def _source(source: Path, listing: Path) -> dict:
    """detections.source.json, which must name the model's classes."""
    try:
        record = json.loads(source.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        record = None
    names = record.get("class_names") if isinstance(record, dict) else None
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise DataError(f"{source}: no class names of the model that made {listing} (missing, or written by an "
                        "older visualize.py): run visualize.py --no-draw again to write them")
    return record


def pseudo_label_json(detections: list[dict], class_names: list[str], image_root: str | os.PathLike,
                      score_thresh: float) -> dict[str, Any]:
    """The COCO json (module docstring) of `detections` (read_detections' lines); DataError for
    an image outside `image_root` or a detection of a label the class names do not have."""
    root = Path(os.path.abspath(image_root))
    images, annotations = [], []
    for image_id, entry in enumerate(detections, start=1):
        path = Path(entry["image"])
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
            w, h = round(x2 - x1, 4), round(y2 - y1, 4)  # 30.2, not 30.199999999999996 (the list's 2 decimals)
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": label,
                                "bbox": [x1, y1, w, h], "area": round(w * h, 4), "iscrowd": 0, "segmentation": [],
                                "score": float(det["score"])})
    categories = [{"id": label, "name": name} for label, name in enumerate(class_names, start=1)]
    return {"images": images, "annotations": annotations, "categories": categories}


def common_root(detections: list[dict]) -> str:
    """The deepest folder holding every image of the list (its images' common parent)."""
    return os.path.commonpath([os.path.dirname(entry["image"]) for entry in detections])


def write_pseudo_labels(detections_jsonl: str | os.PathLike, output: str | os.PathLike, score_thresh: float,
                        image_root: str | os.PathLike | None = None) -> dict[str, Any]:
    """read_detections -> pseudo_label_json -> `output` (whole or not at all); never over an
    existing file, never without a box. `score_thresh` below the list's own (visualize.py's
    --score-thresh) is the list's. -> {"image_root", "images", "empty", "annotations",
    "per_class", "failed", "score_thresh", "listed_at"}."""
    output = Path(output)
    if output.exists():
        raise DataError(f"{output} exists: give another --output (or remove it); a training json is not replaced")
    entries, failed, source = read_detections(detections_jsonl)
    if not entries:
        raise DataError(f"{detections_jsonl}: holds no image that was read: nothing to label")
    names = source["class_names"]
    listed_at = source.get("score_thresh") if isinstance(source.get("score_thresh"), (int, float)) else None
    score_thresh = max(score_thresh, listed_at or 0.0)
    root = str(image_root) if image_root is not None else common_root(entries)
    data = pseudo_label_json(entries, names, root, score_thresh)
    if not data["annotations"]:
        raise DataError(f"{detections_jsonl}: no detection at score >= {score_thresh:g} on its {len(entries)} images: "
                        "nothing to train on (lower --score-thresh)")
    with atomic_write(output, encoding="utf-8") as f:
        json.dump(data, f)
    per_class = {name: 0 for name in names}
    for ann in data["annotations"]:
        per_class[names[ann["category_id"] - 1]] += 1
    labelled = {ann["image_id"] for ann in data["annotations"]}
    return {"image_root": os.path.abspath(root), "images": len(data["images"]),
            "empty": len(data["images"]) - len(labelled), "annotations": len(data["annotations"]),
            "per_class": per_class, "failed": failed, "score_thresh": score_thresh, "listed_at": listed_at,
            # not UTF-8: kept as surrogate escapes, which training here reads and CVAT, Label Studio match to no file
            "not_utf8": [i["file_name"] for i in data["images"] if not utf8_name(i["file_name"])]}


def summary(counts: dict[str, Any], output: str | os.PathLike, asked: float | None) -> list[str]:
    """What the tool prints: the counts, the images left out, and the config entry to train on it
    (quoted for a shell, its paths for YAML). `asked`: the --score-thresh given (None: none; the
    list's own threshold is then not noted: nothing lower was asked for, a review)."""
    per_class = ", ".join(f"{name} {n}" for name, n in counts["per_class"].items())
    images, boxes = counts["images"], counts["annotations"]
    lines = [f"{output}: {images} image{'s' * (images != 1)}, {boxes} box{'es' * (boxes != 1)} at score >= "
             f"{counts['score_thresh']:g} ({per_class})"]
    if counts["listed_at"] is not None and asked is not None and asked < counts["listed_at"]:
        lines.append(f"note: the list holds detections at score >= {counts['listed_at']:g} only (visualize.py's "
                     "--score-thresh): run it with a lower one for weaker boxes")
    if counts["empty"]:
        empty = counts["empty"]
        lines.append(f"note: {empty} image{'s have' if empty != 1 else ' has'} no detection at that score: training "
                     "drops them (dataloader.filter_empty); with filter_empty: false they would teach that nothing "
                     "is there")
    if counts["failed"]:
        lines.append(f"note: {len(counts['failed'])} images of the list have an error line and are left out "
                     f"({first_few(counts['failed'], 3)}): not read, or their drawing not written (its \"error\" "
                     "says which)")
    if counts.get("not_utf8"):
        shown = [name.encode("utf-8", "surrogateescape").decode("utf-8", "replace") for name in counts["not_utf8"]]
        lines.append(f"note: {len(shown)} file names are not UTF-8 ({first_few(shown, 2)}): training here reads "
                     "them, but CVAT, Label Studio and other programs match no file to them: rename them in UTF-8 "
                     "for those")
    entry = (f"[<your set>, {{type: coco, name: pseudo, ann_file: {json.dumps(os.path.abspath(output))}, "
             f"image_root: {json.dumps(counts['image_root'])}}}]")
    lines.append(f"train on it beside your labelled set: datasets.train={shlex.quote(entry)}")
    return lines
